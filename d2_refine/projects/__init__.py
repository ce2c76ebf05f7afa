"""The method packages, one per ``projects/<Method>/<pkg>`` folder, importable as ``d2_refine.projects.<pkg>``.

:data:`PROJECTS` is the one map of them: setup.py reads it to install each folder as its package, and in a source
checkout (or an editable install, where setup.py's package_dir does not apply) a finder maps
``d2_refine.projects.<pkg>`` to its folder when it is first imported, in the style of detectron2's own projects.
Nothing is imported here: a method's components are registered when its package is imported, which
:func:`register_all` does for every method, and which building a config with ``add_d2_refine_config`` (and so
``train_net.py``, ``d2_refine.engine.setup_cfg``) does through each method's ``config`` module.
"""
import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__all__ = ["PROJECTS", "available_projects", "import_config_functions", "register_all"]

#: package name -> method folder under projects/ (read by setup.py: keep it a literal)
PROJECTS = {
    "iounet": "IoUNet",
    "fpt": "FPT",
    "ifr": "IFR",
    "internet": "InterNet",
    "rdsnet": "RDSNet",
}
_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent / "projects"


class _ProjectsFinder(importlib.abc.MetaPathFinder):
    """Finds ``d2_refine.projects.<pkg>`` in ``projects/<Method>/<pkg>`` of a source checkout (its submodules
    are then found through the package's own ``__path__``)."""

    def find_spec(self, name, path, target=None):
        prefix, _, pkg = name.rpartition(".")
        if prefix != __name__ or pkg not in PROJECTS:
            return None
        init = _PROJECT_ROOT / PROJECTS[pkg] / pkg / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


# First in line: the checkout this d2_refine comes from wins over another copy an editable install maps the names to.
if _PROJECT_ROOT.is_dir() and not any(isinstance(f, _ProjectsFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _ProjectsFinder())


def available_projects():
    """Names of the method packages present in this installation."""
    return [name for name in PROJECTS if importlib.util.find_spec(f"{__name__}.{name}") is not None]


def import_config_functions():
    """``add_<method>_config`` of every present method (importing its package, which with detectron2 registers
    the method's components)."""
    fns = []
    for name in available_projects():
        if importlib.util.find_spec(f"{__name__}.{name}.config") is None:
            continue
        mod = importlib.import_module(f"{__name__}.{name}.config")
        fn = getattr(mod, f"add_{name}_config", None)
        if fn is not None:
            fns.append(fn)
    return fns


def register_all():
    """Import every present method package: with detectron2, each registers its components (backbones, ROI
    heads, meta-architectures)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in available_projects()]
