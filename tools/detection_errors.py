#!/usr/bin/env python
"""Where a detector's box AP goes: localisation or classification.

Reads the detections COCOEvaluator wrote (``<run>/inference/<dataset>/coco_instances_results.json``) and the
dataset's ground truth, and prints per run: box AP and AP50 as scored (class-aware), the same with every class
merged into one (class-agnostic: what localisation alone would give), AR@100, and for each ground-truth object the
class of the highest-scoring detection that overlaps it at IoU >= 0.5 (a confusion matrix of those top classes,
the share they get right, for small and other objects).

    python tools/detection_errors.py output/benchmark_table/2000it/seed*/retinanet \\
        output/benchmark_table/2000it/seed1/faster_rcnn
    python tools/detection_errors.py RUN --gt path/to/annotations.json --json out.json

The ground truth defaults to the generated ``shapes_val`` split named in the run's ``config.yaml`` (that
look-up uses d2_refine's dataset registration, so detectron2); with ``--gt``, pycocotools alone (no model).
"""
import argparse
import collections
import contextlib
import copy
import io
import json
import os
import sys

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (train_net.py OUTPUT_DIR) that were evaluated")
    p.add_argument("--dataset", default="shapes_val", help="the evaluated dataset's folder under inference/")
    p.add_argument("--gt", help="COCO json of the ground truth (default: the run's shapes_val split)")
    p.add_argument("--iou", type=float, default=0.5, help="overlap at which a detection covers an object")
    p.add_argument("--json", help="write the figures of every run here")
    return p.parse_args(argv)


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def shapes_gt_of(run: str, dataset: str) -> str:
    """The annotations.json of the shapes split ``dataset`` as registered with the ``DATASETS.SHAPES`` node of
    ``run/config.yaml`` (only that node is read: a config dumped by an older version may hold keys renamed since)."""
    import yaml

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from detectron2.data import MetadataCatalog
    from fvcore.common.config import CfgNode

    from d2_refine.data.datasets import SPLITS, configure_shapes
    from d2_refine.engine import setup_cfg

    if dataset not in SPLITS:
        raise SystemExit(f"{dataset} is not a shapes split ({', '.join(SPLITS)}): pass its ground truth with --gt")
    with open(os.path.join(run, "config.yaml")) as f:
        shapes = (yaml.safe_load(f).get("DATASETS") or {}).get("SHAPES") or {}
    cfg = setup_cfg(freeze=False)
    cfg.DATASETS.SHAPES.merge_from_other_cfg(CfgNode(shapes))
    configure_shapes(cfg)
    json_file = MetadataCatalog.get(dataset).json_file
    if not os.path.isfile(json_file):
        raise SystemExit(f"{dataset}: no ground truth at {json_file} (evaluate the run first, or pass --gt)")
    return json_file


def coco_ap(gt, dets):
    """(AP, AP50, AR@100) x 100 of ``dets`` on the COCO object ``gt``."""
    from pycocotools.cocoeval import COCOeval

    if not dets:
        return 0.0, 0.0, 0.0
    with _quiet():
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0] * 100), float(ev.stats[1] * 100), float(ev.stats[8] * 100)


def class_agnostic(gt):
    """``gt`` with every category merged into one (id 1)."""
    from pycocotools.coco import COCO

    d = copy.deepcopy(gt.dataset)
    for a in d["annotations"]:
        a["category_id"] = 1
    d["categories"] = [{"id": 1, "name": "object"}]
    with _quiet():
        out = COCO()
        out.dataset = d
        out.createIndex()
    return out


def top_class_confusion(gt, dets, iou=0.5):
    """For each ground-truth object, the class of the highest-scoring detection at IoU >= ``iou`` with it.
    Returns (confusion matrix [true, top] over ``gt``'s category ids in sorted order, objects without such a
    detection, {"small" | "other": [right, covered]})."""
    from pycocotools import mask as mask_util

    ids = sorted(gt.getCatIds())
    conf = np.zeros((len(ids), len(ids)), dtype=np.int64)
    by_image = collections.defaultdict(list)
    for d in dets:
        by_image[d["image_id"]].append(d)
    missed, sizes = 0, {"small": [0, 0], "other": [0, 0]}
    for img in gt.getImgIds():
        anns = gt.imgToAnns.get(img, [])
        ds = by_image.get(img, [])
        ious = mask_util.iou([d["bbox"] for d in ds], [a["bbox"] for a in anns], [0] * len(anns)) if ds and anns \
            else np.zeros((len(ds), len(anns)))
        for j, a in enumerate(anns):
            hits = [(ds[i]["score"], ds[i]["category_id"]) for i in range(len(ds)) if ious[i, j] >= iou]
            if not hits:
                missed += 1
                continue
            top = max(hits)[1]
            conf[ids.index(a["category_id"]), ids.index(top)] += 1
            s = sizes["small" if a["area"] < 32 ** 2 else "other"]
            s[0] += int(top == a["category_id"])
            s[1] += 1
    return conf, missed, sizes


def analyse(run, gt_file, dataset="shapes_val", iou=0.5):
    from pycocotools.coco import COCO

    path = os.path.join(run, "inference", dataset, "coco_instances_results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{run}: no {path} (evaluate the run first: train_net.py --eval-only ...)")
    with open(path) as f:
        dets = [d for d in json.load(f) if "bbox" in d]
    with _quiet():
        gt = COCO(gt_file)
    aware = coco_ap(gt, dets)
    agnostic = coco_ap(class_agnostic(gt), [dict(d, category_id=1) for d in dets])
    conf, missed, sizes = top_class_confusion(gt, dets, iou)
    covered = int(conf.sum())
    return dict(run=run, ap=aware[0], ap50=aware[1], ar100=aware[2], agnostic_ap=agnostic[0],
                agnostic_ap50=agnostic[1], objects=covered + missed, covered=covered, missed=missed,
                top_class_right=float(np.trace(conf) / covered * 100) if covered else None,
                right_by_size={k: (v[0] / v[1] * 100 if v[1] else None) for k, v in sizes.items()},
                classes=[gt.cats[i]["name"] for i in sorted(gt.getCatIds())], confusion=conf.tolist())


def report(r):
    lines = [f"{r['run']}",
             f"  box AP {r['ap']:.1f} (AP50 {r['ap50']:.1f}), class-agnostic {r['agnostic_ap']:.1f} "
             f"(AP50 {r['agnostic_ap50']:.1f}); AR@100 {r['ar100']:.1f}",
             f"  {r['covered']} of {r['objects']} objects have a detection at IoU >= 0.5; its top-scoring class is "
             f"right for {r['top_class_right']:.0f} % (small {r['right_by_size']['small'] or 0:.0f} %, "
             f"others {r['right_by_size']['other'] or 0:.0f} %)",
             "  true \\ top  " + " ".join(f"{c[:6]:>6}" for c in r["classes"])]
    for c, row in zip(r["classes"], r["confusion"]):
        lines.append(f"  {c[:10]:>10}  " + " ".join(f"{v:>6}" for v in row))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = []
    for run in args.runs:
        gt = args.gt or shapes_gt_of(run, args.dataset)
        out.append(analyse(run, gt, args.dataset, args.iou))
        print(report(out[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
