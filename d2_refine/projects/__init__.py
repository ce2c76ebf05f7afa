"""The method packages, one per ``projects/<Method>/<pkg>`` folder, importable as ``d2_refine.projects.<pkg>``.

Installed packages get them through setup.py's package_dir; a source checkout (and an editable install) also
finds them through ``__path__`` below, so a new project folder needs no re-install.
"""
import importlib
import importlib.util
import os

from ..utils.env import has_detectron2

#: package name -> method folder under projects/
PROJECTS = {
    "iounet": "IoUNet",
    "fpt": "FPT",
    "ifr": "IFR",
    "internet": "InterNet",
    "rdsnet": "RDSNet",
}

_REPO_PROJECTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "projects")
for _folder in PROJECTS.values():
    _p = os.path.join(_REPO_PROJECTS, _folder)
    if os.path.isdir(_p) and _p not in __path__:
        __path__.append(_p)


def available_projects():
    """Names of the method packages present in this installation."""
    return [name for name in PROJECTS if importlib.util.find_spec(f"{__name__}.{name}") is not None]


def import_config_functions():
    """``add_<method>_config`` of every present method (detectron2-free: they only add CfgNode keys)."""
    fns = []
    for name in available_projects():
        if importlib.util.find_spec(f"{__name__}.{name}.config") is None:
            continue
        mod = importlib.import_module(f"{__name__}.{name}.config")
        fn = getattr(mod, f"add_{name}_config", None)
        if fn is not None:
            fns.append(fn)
    return fns


if has_detectron2():
    for _name in available_projects():
        importlib.import_module(f"{__name__}.{_name}")  # registers the method's components
