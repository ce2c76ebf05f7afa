#!/usr/bin/env python
"""Make the pretrained R-18 trunk of the fine-tune configs: the stand-in for ImageNet weights.

    python tools/pretrain_trunk.py --pretext detection --num-threads 1

The source set: images rendered like `shapes` (same backgrounds, noise and occlusion) but of eight *other* shape
families (``SOURCE_CLASSES``: pentagon, octagon, ellipse, rhombus, arrow, ell, tee, crescent), from a seed of its
own, so that it shares no image and no class with `shapes_train` / `shapes_val` / `shapes_tune`. Two pretexts:

- ``detection`` (the shipped trunk): `train_net.py` trains Mask R-CNN R-18-FPN from scratch on the source set's
  detection splits (``configs/Pretrain/mask_rcnn_R_18_FPN_shapes_source.yaml``: ``shapes_source_train``, scored on
  ``shapes_source_val``), at the detectors' 192 px and batch statistics, so the BN statistics FrozenBN keeps are
  those of the images it will see. ``--checkpoint`` takes the trunk of a finished (or intermediate) run instead.
- ``classification``: multi-label classification (which families are in the image, one sigmoid each) of source
  images rendered here, the ImageNet recipe's own pretext (its trunk was the first one tried).

Only the trunk (stem + res2-res5, built from the shapes configs' ``MODEL.RESNETS`` keys) is written, in detectron2's
model-zoo format, so that the FPN and every head of a fine-tuned model start fresh.

Written: the weights (fp16, detectron2's ``.pkl`` format with ``matching_heuristics``), ``<out>.sha256``, and
the record (``--record``): source set, schedule, seed, time, the pretext's held-out score, sha256, command, commit.
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUNK_CONFIG = "configs/Base-RCNN-FPN-Shapes.yaml"  # the MODEL.RESNETS keys of every shapes model
PRETEXT_CONFIG = "configs/Pretrain/mask_rcnn_R_18_FPN_shapes_source.yaml"  # the detection pretext
TRUNK_PREFIX = "backbone.bottom_up."  # the trunk's parameters in a detectron2 FPN model


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "d2_refine", "pretrained", "R-18-shapes-pretrain.pkl"))
    p.add_argument("--record", default=os.path.join(REPO, "docs", "results", "pretrain_trunk.json"))
    p.add_argument("--pretext", choices=("detection", "classification"), default="detection")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=0, help="torch threads (0: torch's default)")
    d = p.add_argument_group("detection pretext")
    d.add_argument("--output-dir", default=os.path.join(REPO, "output", "pretrain", "source_det"),
                   help="train_net.py's OUTPUT_DIR (resumed if it holds a checkpoint)")
    d.add_argument("--checkpoint", default="", help="take the trunk of this checkpoint instead of training")
    d.add_argument("opts", nargs=argparse.REMAINDER, help="config options for train_net.py (KEY VALUE ...)")
    c = p.add_argument_group("classification pretext")
    c.add_argument("--num-images", type=int, default=24000, help="source-set training images")
    c.add_argument("--num-val", type=int, default=1000, help="held-out source-set images (mAP in the record)")
    c.add_argument("--image-size", type=int, default=96)
    c.add_argument("--iters", type=int, default=1600)
    c.add_argument("--batch", type=int, default=64)
    c.add_argument("--lr", type=float, default=0.025, help="0.1 x batch / 256 (the linear scaling rule)")
    c.add_argument("--weight-decay", type=float, default=5e-5)
    c.add_argument("--eval-period", type=int, default=400)
    return p


def render_source_set(num_images, image_size, seed, split):
    """(N, H, W, 3) uint8 RGB images and (N, C) multi-hot labels of the source set's ``split``."""
    from d2_refine.data.shapes import SOURCE_CLASSES, ShapesParams, render_image

    params = ShapesParams(num_images=num_images, image_size=image_size, seed=seed).validate()
    split_seed = int.from_bytes(hashlib.sha1(f"source/{seed}/{split}".encode()).digest()[:4], "little")
    images = np.empty((num_images, image_size, image_size, 3), np.uint8)
    labels = np.zeros((num_images, len(SOURCE_CLASSES)), np.float32)
    for i in tqdm(range(num_images), desc=f"rendering source set '{split}'", unit="image", mininterval=10):
        img, annos = render_image(np.random.default_rng([split_seed, i]), params, SOURCE_CLASSES)
        images[i] = img
        for a in annos:
            labels[i, a["category_id"] - 1] = 1.0
    return images, labels


class TrunkClassifier(nn.Module):
    """detectron2's ResNet trunk (built from ``cfg``) + global average pooling + one linear layer."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.resnet import build_resnet_backbone

        self.trunk = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        self.head = nn.Linear(self.trunk.output_shape()["res5"].channels, num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1), False)
        self.bgr = cfg.INPUT.FORMAT == "BGR"

    def forward(self, images_uint8_rgb):
        x = images_uint8_rgb.permute(0, 3, 1, 2).float()
        if self.bgr:
            x = x.flip(1)
        x = (x - self.pixel_mean) / self.pixel_std  # the detector's own input normalisation
        return self.head(self.trunk(x)["res5"].mean((2, 3)))


def trunk_cfg():
    from d2_refine.engine import setup_cfg

    # the detector's trunk, trained with batch statistics; every stage trains
    return setup_cfg(os.path.join(REPO, TRUNK_CONFIG), ["MODEL.RESNETS.OUT_FEATURES", "['res5']",
                                                        "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"])


def mean_average_precision(scores, labels):
    """Mean over classes of the average precision of ranking the images by score (classes with a positive)."""
    aps = []
    for c in range(labels.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        hits = labels[order, c] > 0
        if not hits.any():
            continue
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(precision[hits].mean()))
    return float(np.mean(aps)) if aps else float("nan")


@torch.no_grad()
def evaluate(model, images, labels, batch=200):
    model.eval()
    scores = np.concatenate([torch.sigmoid(model(torch.from_numpy(images[i:i + batch]))).numpy()
                             for i in range(0, len(images), batch)])
    model.train()
    return {"mAP": 100 * mean_average_precision(scores, labels),
            "exact_match": 100 * float(((scores > 0.5) == (labels > 0)).all(1).mean())}


def trunk_state_dict(model):
    """The trunk's parameters and BN statistics as numpy fp16, under detectron2's ResNet names (``stem.conv1.*``,
    ``res2.0.conv1.*``, ...): the classifier head is not part of it."""
    return {k: v.detach().cpu().numpy().astype(np.float16)
            for k, v in model.trunk.state_dict().items() if not k.endswith("num_batches_tracked")}


def classification_pretext(args):
    """Train the trunk on the classification pretext: (trunk state dict, the record's pretext fields)."""
    from d2_refine.data.shapes import SOURCE_CLASSES

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    train_x, train_y = render_source_set(args.num_images, args.image_size, args.seed, "train")
    val_x, val_y = render_source_set(args.num_val, args.image_size, args.seed, "val")
    render_s = time.time() - start

    cfg = trunk_cfg()
    model = TrunkClassifier(cfg, len(SOURCE_CLASSES))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    warmup = max(1, args.iters // 20)

    def lr_at(it):  # linear warm-up, then cosine to zero
        if it < warmup:
            return args.lr * (it + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, args.iters - warmup)))

    history, order, pos = [], rng.permutation(len(train_x)), 0
    t0, loss_avg = time.time(), None
    bar = tqdm(range(args.iters), desc="pretraining the trunk", unit="it", mininterval=30)
    for it in bar:
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(train_x)), 0
        idx = np.sort(order[pos:pos + args.batch])
        pos += args.batch
        x = torch.from_numpy(train_x[idx])
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)  # horizontal flip: every family is mirror-labelled
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = F.binary_cross_entropy_with_logits(model(x), torch.from_numpy(train_y[idx]))
        if not torch.isfinite(loss):
            sys.exit(f"error: the pretraining loss is {loss.item()} at iteration {it}: lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr_at(it):.4f}", refresh=False)
        if (it + 1) % args.eval_period == 0 or it + 1 == args.iters:
            history.append({"iteration": it + 1, "train_loss": loss_avg, **evaluate(model, val_x, val_y)})
            print(json.dumps(history[-1]), flush=True)
    train_s = time.time() - t0

    what = {
        "what": "R-18 trunk (stem + res2-res5) pretrained by multi-label classification of the source set",
        "source_set": {"classes": list(SOURCE_CLASSES), "num_train": args.num_images, "num_val": args.num_val,
                       "image_size": args.image_size, "renderer": "d2_refine.data.shapes.render_image",
                       "seed_namespace": "source/<seed>/<split>"},
        "schedule": {"iters": args.iters, "batch": args.batch, "lr": args.lr, "warmup": warmup,
                     "lr_schedule": "linear warm-up, cosine to 0", "optimizer": "SGD momentum 0.9 nesterov",
                     "weight_decay": args.weight_decay, "augmentation": "horizontal flip"},
        "history": history, "render_s": round(render_s, 1), "train_s": round(train_s, 1),
        "s_per_it": round(train_s / args.iters, 4),
    }
    return trunk_state_dict(model), what


def checkpoint_trunk(path):
    """The trunk of a detectron2 FPN checkpoint (``backbone.bottom_up.*``) as numpy fp16 under detectron2's ResNet
    names; a SystemExit with one line if the file has no such trunk."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    trunk = {k[len(TRUNK_PREFIX):]: v for k, v in state.items() if k.startswith(TRUNK_PREFIX)}
    if not trunk:
        raise SystemExit(f"error: {path} has no {TRUNK_PREFIX}* parameters: not a checkpoint of an FPN detector")
    return {k: v.detach().float().numpy().astype(np.float16) for k, v in trunk.items()
            if not k.endswith("num_batches_tracked")}


def detection_pretext(args):
    """Train (or resume) the detection pretext with train_net.py and take its trunk: (trunk, the record's fields)."""
    from d2_refine.benchmark.logs import final_results, train_speed, train_time
    from d2_refine.data.datasets import NUM_SOURCE_TRAIN, NUM_SOURCE_VAL
    from d2_refine.data.shapes import SOURCE_CLASSES

    command = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(REPO, PRETEXT_CONFIG),
               "--resume", "SEED", str(args.seed), "OUTPUT_DIR", args.output_dir, *args.opts]
    start = time.time()
    if not args.checkpoint:
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.num_threads)} if args.num_threads else {}))
        if subprocess.call(command, env=env) != 0:
            raise SystemExit("error: the detection pretext (train_net.py) failed; its log: "
                             + os.path.join(args.output_dir, "log.txt"))
    checkpoint = args.checkpoint or os.path.join(args.output_dir, "model_final.pth")
    trunk = checkpoint_trunk(checkpoint)
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    results, log = final_results(os.path.join(run_dir, "metrics.json")), os.path.join(run_dir, "log.txt")
    what = {
        "what": "R-18 trunk (stem + res2-res5) of Mask R-CNN R-18-FPN trained from scratch on the source set",
        "pretext_config": PRETEXT_CONFIG, "pretext_opts": list(args.opts), "checkpoint":
            os.path.relpath(os.path.abspath(checkpoint), REPO),
        "source_set": {"classes": list(SOURCE_CLASSES), "train": "shapes_source_train", "val": "shapes_source_val",
                       "num_train": NUM_SOURCE_TRAIN, "num_val": NUM_SOURCE_VAL,
                       "renderer": "d2_refine.data.shapes.render_image", "seed_namespace": "<seed>/source_<split>"},
        "source_val_results": results,
        # detectron2's "Overall training speed" of the last training logged (a resumed run: its last part)
        "last_training_s": train_time(log), "last_training_s_per_it": train_speed(log),
        "command_s": round(time.time() - start, 1),  # this command's wall time (a finished run is only scored)
    }
    return trunk, what


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    trunk, what = (detection_pretext if args.pretext == "detection" else classification_pretext)(args)

    from d2_refine.benchmark.record import git_commit, now
    from d2_refine.collect_env import machine_info
    from d2_refine.pretrained import sha256_file

    code = git_commit()  # before the trunk is written: rewriting the shipped trunk does not change the code
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        pickle.dump({"model": trunk, "__author__": "d2_refine tools/pretrain_trunk.py",
                     "matching_heuristics": True}, f)
    digest = sha256_file(args.out)
    with open(args.out + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(args.out)}\n")
    record = {
        **what, "pretext": args.pretext,
        "weights": os.path.relpath(os.path.abspath(args.out), REPO), "sha256": digest,
        "size_bytes": os.path.getsize(args.out), "trunk_config": TRUNK_CONFIG,
        "seed": args.seed, "threads": torch.get_num_threads(),
        "machine": machine_info(torch.get_num_threads()),
        "command": "python tools/pretrain_trunk.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": code["commit"], "dirty": code["dirty"], "finished": now(),
    }
    if args.record:
        os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
        with open(args.record, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    print(f"wrote {args.out} (sha256 {digest}), {record['size_bytes'] / 2**20:.1f} MiB; record {args.record}")
    return record


if __name__ == "__main__":
    main()
