"""Whether detectron2 is importable, and one clear error when it is needed but missing."""
import functools

DETECTRON2_INSTALL_HINT = (
    "detectron2 is not installed. It is not on PyPI; install it from its official repository, after torch:\n"
    "    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)."
)


class MissingDetectron2Error(ImportError):
    pass


@functools.lru_cache(maxsize=None)
def has_detectron2() -> bool:
    """True when detectron2 (with its compiled ops) can be imported."""
    try:
        import detectron2.layers  # noqa: F401  (fails too when detectron2's compiled ops are missing)
    except Exception:
        return False
    return True


def require_detectron2(what: str = "this feature") -> None:
    """Raise one clear ImportError naming how to install detectron2."""
    if not has_detectron2():
        raise MissingDetectron2Error(f"{what} needs detectron2. {DETECTRON2_INSTALL_HINT}")
