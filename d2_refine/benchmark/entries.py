"""The models of the shapes benchmark: each one's config, baseline and variants, the two training regimes, and
the schedule every run shares."""
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

#: Every model's config (from scratch), one line each.
CONFIGS = {
    "mask_rcnn": "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml",
    "faster_rcnn": "configs/Baselines/faster_rcnn_R_18_FPN_shapes.yaml",
    "retinanet": "configs/Baselines/retinanet_R_18_FPN_shapes.yaml",
    "iounet": "configs/IoUNet/iounet_R_18_FPN_shapes.yaml",
    "fpt_lite": "configs/FPT/mask_rcnn_fpt_lite_R_18_shapes.yaml",
    "fpt_paper": "configs/FPT/mask_rcnn_fpt_paper_R_18_shapes.yaml",
    "ifr": "configs/IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml",
    "ifr_ws": "configs/IFR/ifr_ws_mask_rcnn_R_18_FPN_shapes.yaml",
    "cascade_mask_rcnn": "configs/Baselines/cascade_mask_rcnn_R_18_FPN_shapes.yaml",
    "cascade_ifr": "configs/IFR/ifr_cascade_mask_rcnn_R_18_FPN_shapes.yaml",
    "internet_l2": "configs/InterNet/internet_l2_R_18_FPN_shapes.yaml",
    "internet_ot": "configs/InterNet/internet_ot_R_18_FPN_shapes.yaml",
    "internet_makeup": "configs/InterNet/internet_makeup_only_R_18_FPN_shapes.yaml",
    "rdsnet": "configs/RDSNet/rdsnet_R_18_FPN_shapes.yaml",
}

#: "scratch": every model from random weights; "finetune": the models below from a pretrained R-18 trunk
#: (tools/pretrain_trunk.py), each with the config ``<config>_pretrained.yaml``.
REGIMES = ("scratch", "finetune")
FINETUNE_MODELS = ("mask_rcnn", "faster_rcnn", "retinanet", "iounet", "fpt_lite", "ifr", "ifr_ws",
                   "cascade_mask_rcnn", "cascade_ifr", "internet_l2", "internet_ot", "internet_makeup", "rdsnet")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    title: str
    config: str
    baseline: Optional[str] = None
    # extra KEY VALUE opts that depend on the schedule (e.g. IFR's warm-up is a fraction of it)
    opts: Callable[[int], List[str]] = lambda iters: []
    # name -> (title, KEY VALUE opts): evaluated with this entry's weights, no training
    variants: Dict[str, tuple] = dataclasses.field(default_factory=dict)


def _ifr_warm_up(iters: int) -> List[str]:
    """The paper's explicit warm-up of the implicit IFR head (the block unrolled K times): 50k of its 90k iterations."""
    return ["MODEL.IFR.PRETRAIN_STEPS", str(round(iters * 5 / 9))]


ENTRIES = [
    Entry("mask_rcnn", "Mask R-CNN (FPN)", CONFIGS["mask_rcnn"]),
    Entry("faster_rcnn", "Faster R-CNN (FPN)", CONFIGS["faster_rcnn"]),
    Entry("retinanet", "RetinaNet (FPN)", CONFIGS["retinanet"]),
    Entry("iounet", "IoU-Net (IoU-NMS + refinement)", CONFIGS["iounet"], "faster_rcnn"),
    Entry("fpt_lite", "Mask R-CNN + FPT `fpt_lite`", CONFIGS["fpt_lite"], "mask_rcnn"),
    Entry("fpt_paper", "Mask R-CNN + FPT `fpt_paper`", CONFIGS["fpt_paper"], "mask_rcnn"),
    Entry("ifr", "Mask R-CNN + IFR (implicit)", CONFIGS["ifr"], "mask_rcnn", opts=_ifr_warm_up),
    Entry("ifr_ws", "Mask R-CNN + IFR (weight sharing, K = 4)", CONFIGS["ifr_ws"], "mask_rcnn"),
    # the cascade alone, against Mask R-CNN; Cascade + IFR against it, so that its Δ is IFR's share
    Entry("cascade_mask_rcnn", "Cascade Mask R-CNN (FPN)", CONFIGS["cascade_mask_rcnn"], "mask_rcnn"),
    Entry("cascade_ifr", "Cascade Mask R-CNN + IFR (implicit)", CONFIGS["cascade_ifr"], "cascade_mask_rcnn",
          opts=_ifr_warm_up),
    Entry("internet_l2", "Mask R-CNN + InterNet (l2)", CONFIGS["internet_l2"], "mask_rcnn"),
    Entry("internet_ot", "Mask R-CNN + InterNet (ot)", CONFIGS["internet_ot"], "mask_rcnn"),
    # ablation: InterNet (l2) without its loss, to tell the intertwiner loss from the make-up layer's extra convs
    Entry("internet_makeup", "Mask R-CNN + InterNet make-up layer only (l2, loss weight 0; ablation)",
          CONFIGS["internet_makeup"], "mask_rcnn"),
    Entry("rdsnet", "RDSNet", CONFIGS["rdsnet"], "retinanet",
          variants={"rdsnet_mbrm": ("RDSNet + MBRM (same weights)", ["MODEL.RDSNET.MBRM.ENABLED", "True"])}),
]
ENTRY_BY_NAME = {e.name: e for e in ENTRIES}
VARIANT_OF = {v: e.name for e in ENTRIES for v in e.variants}
ROW_ORDER = [n for e in ENTRIES for n in (e.name, *e.variants)]


def entry_of(name: str) -> Entry:
    """The entry of a model, or of a variant the entry that trains its weights."""
    return ENTRY_BY_NAME.get(name) or ENTRY_BY_NAME[VARIANT_OF[name]]


def in_regime(name: str, regime: str) -> bool:
    """Whether ``regime`` trains the model (for a variant: the entry that trains its weights)."""
    return regime == "scratch" or entry_of(name).name in FINETUNE_MODELS


def row_title(name: str) -> str:
    """The title of an entry or of a variant (evaluated with its entry's weights)."""
    if name in ENTRY_BY_NAME:
        return ENTRY_BY_NAME[name].title
    return entry_of(name).variants[name][0]


def pretrained_config(config: str) -> str:
    """The finetune regime's config of a model: ``_pretrained`` before ``.yaml``."""
    if not config.endswith(".yaml"):
        raise ValueError(f"not a .yaml config: {config}")
    return config[: -len(".yaml")] + "_pretrained.yaml"


def regime_entries(regime: str) -> List[Entry]:
    """The entries a regime trains: every one from scratch; those of FINETUNE_MODELS, with their pretrained
    configs, in the finetune regime."""
    if regime == "scratch":
        return list(ENTRIES)
    if regime == "finetune":
        return [dataclasses.replace(e, config=pretrained_config(e.config)) for e in ENTRIES
                if e.name in FINETUNE_MODELS]
    raise ValueError(f"unknown regime {regime!r} (one of {', '.join(REGIMES)})")


def with_baselines(names: Sequence[str]) -> List[str]:
    """``names`` and, before them, their baselines and their baselines' own: a method always trains next to
    its baseline."""
    names = list(names)
    for n in list(names):
        b = ENTRY_BY_NAME[n].baseline
        while b and b not in names:
            names.insert(0, b)
            b = ENTRY_BY_NAME[b].baseline
    return names


def rows_with_baselines(names: Sequence[str]) -> List[str]:
    """The table rows of ``names`` (entries): :func:`with_baselines`, each followed by its variants."""
    return [r for n in with_baselines(names) for r in (n, *ENTRY_BY_NAME[n].variants)]


def schedule_opts(iters: int, seed: int) -> List[str]:
    """The shapes schedule (2,000 iterations: warm-up 200, decay at 75 % and 90 %) scaled to ``iters``."""
    if iters < 10:
        raise ValueError(f"--iters must be at least 10, got {iters}")
    steps = (round(iters * 0.75), round(iters * 0.9))
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps), "SOLVER.WARMUP_ITERS", str(iters // 10),
            "SEED", str(seed)]


def checkpoint_period(iters: int) -> int:
    """A checkpoint every twentieth of the schedule (100 of 2,000 iterations), so that a run cut off (a session that
    ends) resumes from at most that far back: an implicit IFR iteration takes up to ~13 s on one CPU thread, so a
    quarter of the schedule could lose hours. The tool removes them once ``model_final.pth`` is written."""
    return max(1, iters // 20)


def run_opts(entry: Entry, out_dir: str, iters: int, seed: int, extra: Sequence[str] = ()) -> List[str]:
    """The KEY VALUE options of one model: the common schedule, the checkpoint period, the entry's own, the user's,
    the output folder."""
    return [*schedule_opts(iters, seed), "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period(iters)), *entry.opts(iters),
            *extra, "OUTPUT_DIR", out_dir]
