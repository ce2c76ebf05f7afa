"""Helpers of the test-suite, imported as ``from helpers import ...`` (tests/conftest.py puts tests/ on sys.path).

Idioms: the repository root is :data:`ROOT`; a test file or test that needs detectron2 calls
``pytest.importorskip("detectron2")`` (at the top of the file, before importing detectron2, or first in the test);
device-parametrised tests use ``@pytest.mark.parametrize("device", cpu_and_cuda())``. Helpers that need no pytest
(tiny training runs, synthetic batches) are in :mod:`d2_refine.utils.testing`.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_and_cuda():
    """pytest parameters: "cpu", plus "cuda" (skipped with a reason where CUDA is absent)."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="CUDA is not available")))


def load_script(path):
    """The script ``path`` (relative to the repository root, e.g. "train_net.py") imported as a module."""
    name = "d2_refine_script_" + os.path.splitext(path)[0].replace(os.sep, "_").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name):
    """The script ``tools/<name>.py`` of the repository imported as a module (tools/ is not a package). tools/ is
    put on sys.path, as Python does for a script it runs, so that the tools import their siblings plainly."""
    tools = os.path.join(ROOT, "tools")
    if tools not in sys.path:
        sys.path.append(tools)
    return load_script(os.path.join("tools", f"{name}.py"))


def run_python(code, *args, detectron2=None, env=None, timeout=300):
    """Run ``code`` in a fresh ``python -c`` in the repository root; returns the CompletedProcess (text output).

    ``detectron2``: None leaves it alone; "missing" makes ``import detectron2`` fail as on a machine without it
    (ModuleNotFoundError naming detectron2); an exception expression (e.g. ``'ImportError("undefined symbol")'``)
    makes the import of detectron2 raise it, as an installed but broken detectron2 does."""
    block = ""
    if detectron2 == "missing":
        block = """
            import sys
            class _NoDetectron2:
                def find_spec(self, name, path=None, target=None):
                    if name == "detectron2" or name.startswith("detectron2."):
                        raise ModuleNotFoundError("No module named 'detectron2'", name="detectron2")
            sys.meta_path.insert(0, _NoDetectron2())
        """
    elif detectron2 is not None:
        block = f"""
            import sys
            class _BrokenDetectron2:
                def find_spec(self, name, path=None, target=None):
                    if name == "detectron2" or name.startswith("detectron2."):
                        raise {detectron2}
            sys.meta_path.insert(0, _BrokenDetectron2())
        """
    return subprocess.run([sys.executable, "-c", textwrap.dedent(block) + textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def bare_model_cfg(*add_config_fns):
    """A plain fvcore CfgNode with an empty MODEL node (no detectron2 needed), after each ``add_<method>_config``."""
    from fvcore.common.config import CfgNode

    cfg = CfgNode()
    cfg.MODEL = CfgNode()
    for add in add_config_fns:
        add(cfg)
    return cfg
