#!/usr/bin/env python
"""IoU-Net's inference ablation in one pass over the test set.

The backbone, RPN and box head run once per image; the ROI-heads post-processing then runs once per row
(IoU head unused / + IoU-guided NMS / + refinement / ...), each feeding its own COCO evaluator (with AP60-AP90)
and its own timer. A Faster R-CNN baseline (its own config and weights) is evaluated on the same images in the
same run when ``--baseline-weights`` is given. ms/img = shared part + the row's ROI-heads part.

    python tools/iounet_ablation.py --weights output/benchmark_table/2000it/seed1/iounet/model_final.pth \
        [--baseline-weights output/benchmark_table/2000it/seed1/faster_rcnn/model_final.pth] [KEY VALUE ...]
"""
import argparse
import json
import os
import shlex
import sys
from collections import OrderedDict

import torch

#: row name -> (NMS_TEST, REFINE_TEST, SCORE_TIMES_IOU_TEST) of MODEL.IOU_NET; the last row is the reproduction's
#: extra "NMS ordered by cls x IoU" on top of the full model.
ROWS = OrderedDict([
    ("IoU head only (unused at test)", ("plain", False, False)),
    ("+ IoU-guided NMS", ("iou_guided", False, False)),
    ("+ IoU-guided NMS + refinement (full)", ("iou_guided", True, True)),
    ("+ refinement, plain NMS", ("plain", True, True)),
    ("full, NMS ranked by cls x IoU", ("iou_guided_score_x_iou", True, True)),
])


def _evaluate(evaluator):
    res = evaluator.evaluate() or {}
    return res.get("bbox", {})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", default="configs/IoUNet/iounet_R_18_FPN_shapes.yaml")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--baseline-config", default="configs/Baselines/faster_rcnn_R_18_FPN_shapes.yaml")
    ap.add_argument("--baseline-weights", default="")
    ap.add_argument("--output", default=os.path.join("output", "iounet_ablation"),
                    help="folder of ablation.json and the evaluators' files (default: output/iounet_ablation)")
    ap.add_argument("--max-images", type=int, default=0, help="0: the whole test set")
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    args = ap.parse_args()

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model
    from detectron2.modeling.meta_arch import GeneralizedRCNN
    from detectron2.utils.logger import setup_logger

    import d2_refine  # noqa: F401
    from d2_refine.benchmark.record import git_commit
    from d2_refine.benchmark.timer import clock
    from d2_refine.data import prepare_datasets
    from d2_refine.engine import setup_cfg
    from d2_refine.engine.evaluator import D2RefineCOCOEvaluator

    setup_logger(name="d2_refine")
    cfg = setup_cfg(args.config_file, args.opts)
    prepare_datasets(cfg)
    dataset = cfg.DATASETS.TEST[0]
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(args.weights)
    base = None
    if args.baseline_weights:
        bcfg = setup_cfg(args.baseline_config, args.opts)
        base = build_model(bcfg).eval()
        DetectionCheckpointer(base).load(args.baseline_weights)
    names = (["Faster R-CNN baseline"] if base is not None else []) + list(ROWS)
    evaluators = {n: D2RefineCOCOEvaluator(dataset, output_dir=os.path.join(args.output, f"row{i}"))
                  for i, n in enumerate(names)}
    for e in evaluators.values():
        e.reset()
    times = {n: 0.0 for n in names}
    shared, count = 0.0, 0
    refine_stats = {}
    loader = build_detection_test_loader(cfg, dataset)
    heads = model.roi_heads
    now = clock(cfg.MODEL.DEVICE)
    with torch.no_grad():
        for inputs in loader:
            if args.max_images and count >= args.max_images:
                break
            if base is not None:
                t = now()
                out = base(inputs)
                times["Faster R-CNN baseline"] += now() - t
                evaluators["Faster R-CNN baseline"].process(inputs, out)
            t = now()
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, features, None)
            shared += now() - t
            for name, (nms, refine, sti) in ROWS.items():
                heads.nms, heads.refine, heads.score_times_iou = nms, refine, sti
                heads.reset_refine_stats()
                t = now()
                results, _ = heads(images, features, proposals, None)
                out = GeneralizedRCNN._postprocess(results, inputs, images.image_sizes)
                times[name] += now() - t
                evaluators[name].process(inputs, out)
                st = refine_stats.setdefault(name, {"boxes": 0, "steps": 0.0, "gain": 0.0})
                s = heads.refine_stats()
                st["boxes"] += s["boxes"]
                st["steps"] += s["mean_steps"] * s["boxes"]
                st["gain"] += s["mean_iou_gain"] * s["boxes"]
            count += len(inputs)
    rows = []
    for name in names:
        r = _evaluate(evaluators[name])
        ms = (times[name] + (shared if name in ROWS else 0.0)) / max(count, 1) * 1e3
        st = refine_stats.get(name, {"boxes": 0})
        extra = ""
        if st["boxes"]:
            extra = f"refined {st['boxes'] / count:.0f}/img, {st['steps'] / st['boxes']:.2f} steps, " \
                    f"IoU gain {st['gain'] / st['boxes']:+.4f}"
        rows.append({"row": name, **{k: r.get(k, float("nan")) for k in ("AP", "AP50", "AP75", "AP90")},
                     "ms_per_img": ms, "refinement": extra})
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "ablation.json"), "w") as f:
        json.dump({"images": count, "rows": rows, "argv": sys.argv,
                   "command": "python tools/iounet_ablation.py " + shlex.join(sys.argv[1:]), "code": git_commit()},
                  f, indent=1)
    print(f"images: {count}, torch threads {torch.get_num_threads()}")
    print("| row | AP | AP50 | AP75 | AP90 | ms/img | refinement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | {r['AP90']:.1f} | "
              f"{r['ms_per_img']:.0f} | {r['refinement']} |")


if __name__ == "__main__":
    main()
