"""Whether detectron2 is importable, and one clear error when it is needed but missing or broken."""
import functools
import warnings
from typing import Optional

DETECTRON2_INSTALL_HINT = (
    "detectron2 is not installed. It is not on PyPI; install it from its official repository, after torch:\n"
    "    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)."
)
# What has_detectron2() imports: every d2_refine model needs detectron2's layers and structures.
_PROBE = "detectron2.layers"


class MissingDetectron2Error(ImportError):
    """detectron2 is needed but not installed, or installed but failing to import (the message says which)."""


@functools.lru_cache(maxsize=None)
def detectron2_import_error() -> Optional[Exception]:
    """None when detectron2 imports, else the exception its import raised.

    detectron2's import does not need its compiled ops (``detectron2._C``): the pure-Python package builds every
    model, and only the few ops that need ``_C`` (deformable convolution, for one) raise, when called. An error
    here is therefore a missing package, or a broken one (a missing dependency, a torch it does not work with).
    """
    try:
        import detectron2.layers  # noqa: F401
    except Exception as e:  # noqa: BLE001  (any failure of the import is reported by require_detectron2)
        return e
    return None


def _not_installed(e: Exception) -> bool:
    return isinstance(e, ModuleNotFoundError) and e.name == "detectron2"


@functools.lru_cache(maxsize=None)
def has_detectron2() -> bool:
    """True when detectron2 can be imported. An installed detectron2 whose import fails counts as absent (the
    detectron2-free parts of d2_refine still work), with a warning naming the error; :func:`require_detectron2`
    raises it."""
    e = detectron2_import_error()
    if e is not None and not _not_installed(e):
        warnings.warn(f"detectron2 is installed but fails to import ({type(e).__name__}: {e}); d2_refine works "
                      "without it", RuntimeWarning, stacklevel=2)
    return e is None


def require_detectron2(what: str = "this feature") -> None:
    """Raise one clear :class:`MissingDetectron2Error`: how to install detectron2 where it is missing, the real
    import error where it is installed but broken."""
    e = detectron2_import_error()
    if e is None:
        return
    if _not_installed(e):
        raise MissingDetectron2Error(f"{what} needs detectron2. {DETECTRON2_INSTALL_HINT}")
    raise MissingDetectron2Error(
        f"{what} needs detectron2, which is installed but fails to import: {type(e).__name__}: {e} "
        f"(the full traceback: python -c 'import {_PROBE}')"
    ) from e
