#!/usr/bin/env python
"""Draw a model's detections (boxes, masks, class names and scores) on images with detectron2's Visualizer.

    python tools/demo.py --config-file configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml \
        --input img.png --output out.png MODEL.WEIGHTS output/mask_rcnn_R_18_FPN_shapes/model_final.pth
    python tools/demo.py --config-file <cfg> --input imgs/ more.png --output out_dir/ \
        --confidence-threshold 0.3 MODEL.WEIGHTS <checkpoint>

Any config of d2_refine works (every method is chosen by its config). Class names come from the metadata of
the config's first test dataset (the `shapes` registration for the shapes configs). With one input image,
`--output` may be a .png/.jpg file; otherwise it is a folder that receives `<input name>.png` per image.
"""
import argparse
import os
import sys

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE", help="a d2_refine config (YAML)")
    p.add_argument("--input", required=True, nargs="+", help="images and/or folders of images")
    p.add_argument("--output", required=True, help="output image (one input) or folder")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS <file>")
    return p


def list_images(inputs):
    """Image files named by ``inputs`` (files, or folders whose image files are taken in sorted order)."""
    missing = [p for p in inputs if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    images = []
    for p in inputs:
        if os.path.isdir(p):
            images += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            images.append(p)
    if not images:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in: {', '.join(inputs)}")
    return images


def output_paths(images, output):
    """One output file per image: ``output`` itself for a single image and an image file name, else
    ``output/<image name>.png`` (distinct names for equal base names in different folders)."""
    if len(images) == 1 and output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output):
        return [output]
    if os.path.isfile(output):
        raise FileExistsError(f"--output {output} is a file: with {len(images)} inputs, or an output name that is "
                              f"not an image file ({', '.join(IMAGE_EXTENSIONS)}), it must be a folder")
    names = [os.path.splitext(os.path.basename(p))[0] for p in images]
    if len(set(names)) < len(names):
        names = [f"{i:04d}_{n}" for i, n in enumerate(names)]
    return [os.path.join(output, n + ".png") for n in names]


def setup(args):
    from d2_refine.data import configure_shapes
    from d2_refine.engine import check_model, setup_cfg

    thr = str(args.confidence_threshold)
    # the models' own score filters at the threshold (detectron2's demo does the same), then the user's options
    cfg = setup_cfg(args.config_file, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", thr, "MODEL.RETINANET.SCORE_THRESH_TEST",
                                       thr, *args.opts])
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise FileNotFoundError("MODEL.WEIGHTS is empty: pass a checkpoint, e.g. MODEL.WEIGHTS "
                                f"{os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS not found: {weights}")
    check_model(cfg)  # a config value the model refuses, in one line
    configure_shapes(cfg)  # the shapes metadata (class names) with the config's parameters; no files generated
    return cfg


def run(args):
    """Predict and draw every input; returns the list of written files."""
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image

    from d2_refine.data import read_image_checked
    from d2_refine.engine import CheckedCheckpointer

    images = list_images(args.input)  # input errors first, before the model is built
    outputs = output_paths(images, args.output)
    cfg = setup(args)
    # built without weights, then loaded by a checkpointer that names a checkpoint it cannot read in one line
    no_weights = cfg.clone()
    no_weights.defrost()
    no_weights.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(no_weights)
    CheckedCheckpointer(predictor.model).load(cfg.MODEL.WEIGHTS)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else predictor.metadata
    written = []
    for path, out in zip(images, outputs):
        image = read_image_checked(path, format="RGB")
        instances = predictor(image[:, :, ::-1])["instances"].to("cpu")  # DefaultPredictor takes BGR
        instances = instances[instances.scores >= args.confidence_threshold]
        vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(instances)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        Image.fromarray(vis.get_image()).save(out)
        print(f"{path}: {len(instances)} detections -> {out}")
        written.append(out)
    return written


def main(argv=None):
    from d2_refine.utils.env import MissingDetectron2Error, require_detectron2

    args = get_parser().parse_args(argv)
    try:
        require_detectron2("tools/demo.py")
    except MissingDetectron2Error as e:
        sys.exit(f"error: {e}")
    import d2_refine  # noqa: F401  (registers every component)
    from d2_refine.data import DatasetError
    from d2_refine.engine import ConfigError

    try:
        return run(args)
    except (ConfigError, DatasetError, FileNotFoundError, FileExistsError) as e:  # one line instead of a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
