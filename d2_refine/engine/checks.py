"""Checks of a run's config before any process starts (train_net.py's ``cli``): one line for each usual mistake
about the weights, the model's config values or test-time augmentation, instead of a download error or a traceback
from deep inside a worker; and a checkpointer that names a checkpoint file it cannot read."""
import os
import pickle
import re
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_model

from ..utils.messages import exception_line
from .config import ConfigError

__all__ = ["BACKBONE_ONLY_PREFIXES", "CheckedCheckpointer", "check_amp", "check_model", "check_weights",
           "check_test_aug"]

# a config key at the start of a word: the methods' checks name the key they refuse ("MODEL.IFR.MODE must be ...")
_CONFIG_KEY = re.compile(r"\b(MODEL|INPUT|SOLVER|DATASETS|DATALOADER|TEST)\.[A-Z][A-Z0-9_]*")
_NOT_REGISTERED = re.compile(r"No object named '([^']*)' found in '([^']*)' registry")

#: MODEL.WEIGHTS prefixes of weights that initialise a backbone only (the heads stay random): ImageNet
#: classification trunks of detectron2's model zoo (detectron2://, the https address it resolves to, and the
#: catalog:// names of detectron2/checkpoint/catalog.py) and d2_refine's shipped pretrained trunk
BACKBONE_ONLY_PREFIXES = (
    "detectron2://ImageNetPretrained/",
    "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/",
    "catalog://ImageNetPretrained/",
    "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/",
    "d2_refine://pretrained/",
)


def check_weights(cfg, eval_only: bool = False, resume: bool = False) -> None:
    """Raise one :class:`ConfigError` line for weights that cannot be used: with ``eval_only``, empty weights or
    weights that only initialise the backbone (they would score a detector whose heads are random, after a
    download); a local file that does not exist (it would fail deep inside the loader). Nothing is checked when
    ``resume`` finds a checkpoint in OUTPUT_DIR (MODEL.WEIGHTS is then not used)."""
    if resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    weights = cfg.MODEL.WEIGHTS
    if eval_only:
        fix = f"pass a trained checkpoint, e.g. MODEL.WEIGHTS {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}"
        if not weights:
            raise ConfigError(f"--eval-only needs trained weights but MODEL.WEIGHTS is empty: {fix}")
        if weights.startswith(BACKBONE_ONLY_PREFIXES):
            raise ConfigError(f"--eval-only needs trained weights but MODEL.WEIGHTS {weights} only initialises the "
                              f"backbone (the heads would be random): {fix}")
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"MODEL.WEIGHTS not found: {weights}")


def _keys_with_value(node, value, prefix=""):
    """The full names of the keys of a CfgNode whose value is ``value``."""
    out = []
    for k, v in node.items():
        if isinstance(v, dict):
            out += _keys_with_value(v, value, f"{prefix}{k}.")
        elif v == value:
            out.append(prefix + k)
    return out


def check_model(cfg) -> None:
    """Build the model once on the CPU (random weights, nothing loaded, then dropped) and raise one
    :class:`ConfigError` line for a config value it refuses: a ValueError that names a config key (the methods'
    checks, e.g. "MODEL.IOU_NET.NMS_TEST must be one of ...") or a component name that no registry holds (a
    ``NAME`` key with a typo). Other errors propagate as they are."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
    try:
        with torch.random.fork_rng(devices=[]):  # the run's own initialisation is not shifted by this build
            build_model(cfg)
    except ConfigError:
        raise
    except ValueError as e:
        line = exception_line(e)
        if not _CONFIG_KEY.search(line):
            raise
        raise ConfigError(line) from None
    except KeyError as e:
        found = _NOT_REGISTERED.search(str(e))
        if not found:
            raise
        name, registry = found.groups()
        keys = _keys_with_value(cfg, name)
        raise ConfigError(f"{' / '.join(keys) or 'a config key'} {name!r}: no such component in detectron2's "
                          f"{registry} registry (a typo, or the module that registers it is not imported)") from None


def check_test_aug(cfg) -> None:
    """Raise one :class:`ConfigError` line when TEST.AUG.ENABLED asks for test-time augmentation of a model that
    detectron2's ``GeneralizedRCNNWithTTA`` cannot wrap: a meta-architecture that is not a GeneralizedRCNN
    (RetinaNet, RDSNet, ...), or what GeneralizedRCNNWithTTA refuses itself (keypoints, precomputed proposals)."""
    if not cfg.TEST.AUG.ENABLED:
        return
    name = cfg.MODEL.META_ARCHITECTURE
    arch = META_ARCH_REGISTRY.get(name) if name in META_ARCH_REGISTRY else None
    if arch is None or not issubclass(arch, GeneralizedRCNN):
        raise ConfigError(f"TEST.AUG.ENABLED: test-time augmentation (detectron2's GeneralizedRCNNWithTTA) works on "
                          f"R-CNN models (GeneralizedRCNN) only, not on MODEL.META_ARCHITECTURE {name}: set "
                          "TEST.AUG.ENABLED False")
    for key, what in (("KEYPOINT_ON", "keypoints"), ("LOAD_PROPOSALS", "precomputed proposals")):
        if cfg.MODEL[key]:
            raise ConfigError(f"TEST.AUG.ENABLED: detectron2's GeneralizedRCNNWithTTA does not support {what} "
                              f"(MODEL.{key} True): set TEST.AUG.ENABLED False")


def check_amp(cfg) -> None:
    """Raise one :class:`ConfigError` line when SOLVER.AMP.ENABLED asks for mixed-precision training on a device
    that is not CUDA: detectron2's ``AMPTrainer`` autocasts with ``torch.cuda.amp`` and asserts CUDA at its first
    step, after the data and the model are built. Evaluation does not read the key, so only training is checked."""
    if not cfg.SOLVER.AMP.ENABLED or cfg.MODEL.DEVICE.startswith("cuda"):
        return
    why = " (CUDA is not available here)" if not torch.cuda.is_available() else ""
    raise ConfigError(f"SOLVER.AMP.ENABLED: mixed-precision training (detectron2's AMPTrainer) needs a CUDA device, "
                      f"and MODEL.DEVICE is {cfg.MODEL.DEVICE!r}{why}: set SOLVER.AMP.ENABLED False to train on the "
                      "CPU")


class CheckedCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` (same arguments and behaviour) that raises one :class:`ConfigError`
    line naming a checkpoint file it cannot read (corrupt, truncated, not a checkpoint) instead of torch's or
    pickle's traceback (whose advice, to load it with ``weights_only=False``, is wrong for a corrupt file)."""

    def _load_file(self, filename):
        try:
            return super()._load_file(filename)
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, RuntimeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # torch's weights-only refusal: the reason is on its "WeightsUnpickler error:" line
            reason = next((line for line in lines if "WeightsUnpickler error:" in line), lines[0] if lines else "")
            raise ConfigError(f"checkpoint {filename} cannot be read ({type(e).__name__}: {reason[:160]}): a "
                              "corrupt or truncated file, or not a PyTorch / detectron2 checkpoint") from None
