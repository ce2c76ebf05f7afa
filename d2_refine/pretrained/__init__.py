"""Weights shipped with d2_refine, addressed as ``d2_refine://pretrained/<file>``, the way detectron2 addresses its
model zoo (``detectron2://ImageNetPretrained/...``).

Importing this module registers a handler with detectron2's ``PathManager``: ``MODEL.WEIGHTS
d2_refine://pretrained/R-18-shapes-pretrain.pkl`` then loads ``d2_refine/pretrained/R-18-shapes-pretrain.pkl``, checked
once per process against the sha256 written beside it. ``R-18-shapes-pretrain.pkl`` is the trunk (stem + res2-res5) of
the shapes models, made by ``tools/pretrain_trunk.py`` (its record: ``docs/results/pretrain_trunk.json``); detectron2's
checkpointer loads only what matches, so the FPN and every head start fresh, as with ImageNet weights.
"""
import hashlib
import os

from detectron2.utils.file_io import PathHandler, PathManager

__all__ = ["PREFIX", "local_path", "sha256_file", "PretrainedHandler"]

PREFIX = "d2_refine://"
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the d2_refine package folder
_verified = set()


def sha256_file(path):
    """The hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_path(address: str) -> str:
    """The file of ``d2_refine://<path>`` inside the installed package, checked against ``<file>.sha256``; a
    FileNotFoundError or ValueError with one line saying what is wrong otherwise."""
    if not address.startswith(PREFIX):
        raise ValueError(f"not a d2_refine address: {address!r} (expected {PREFIX}pretrained/<file>)")
    rel = os.path.normpath(address[len(PREFIX):])
    if rel.startswith("..") or os.path.isabs(rel):
        raise ValueError(f"{address}: the path must stay inside the d2_refine package")
    path = os.path.join(_PACKAGE, rel)
    if path in _verified:
        return path
    if not os.path.isfile(path):
        shipped = sorted(f for f in os.listdir(os.path.dirname(path)) if not f.endswith((".py", ".sha256"))) \
            if os.path.isdir(os.path.dirname(path)) else []
        raise FileNotFoundError(f"{address}: no such file in this installation ({path}); shipped: "
                                f"{', '.join(shipped) or 'none'}")
    digest_file = path + ".sha256"
    if os.path.isfile(digest_file):
        with open(digest_file) as f:
            expected = f.read().split()[0]
        if sha256_file(path) != expected:
            raise ValueError(f"{address}: {path} does not match its sha256 ({digest_file}): a partial copy or a "
                             "Git LFS pointer? Reinstall d2_refine from a full clone")
    _verified.add(path)
    return path


class PretrainedHandler(PathHandler):
    """Resolves ``d2_refine://<path>`` to the file shipped in the package (see :func:`local_path`)."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path, **kwargs):
        return local_path(path)

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(local_path(path), mode, **kwargs)

    def _isfile(self, path, **kwargs):
        try:
            return os.path.isfile(local_path(path))
        except (FileNotFoundError, ValueError):
            return False

    def _exists(self, path, **kwargs):
        return self._isfile(path)


PathManager.register_handler(PretrainedHandler(), allow_override=True)  # a second import replaces the first
