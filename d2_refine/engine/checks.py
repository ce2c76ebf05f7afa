"""Checks of a run's config before any process starts (train_net.py's ``cli``): one line for each usual mistake
about the weights or test-time augmentation, instead of a download error or an assertion deep inside a worker."""
import os

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .config import ConfigError

__all__ = ["BACKBONE_ONLY_PREFIXES", "check_weights", "check_test_aug"]

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
