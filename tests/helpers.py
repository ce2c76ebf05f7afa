"""Helpers of the test-suite, imported as ``from helpers import ...`` (tests/conftest.py puts tests/ on sys.path).

Idioms: the repository root is :data:`ROOT`; a test file or test that needs detectron2 calls
``pytest.importorskip("detectron2")`` (at the top of the file, before importing detectron2, or first in the test);
a test of the compiled kernels is marked :data:`needs_ops`; device-parametrised tests use
``@pytest.mark.parametrize("device", cpu_and_cuda())``. Helpers that need no pytest
(tiny training runs, synthetic batches) are in :mod:`d2_refine.utils.testing`.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from d2_refine.ops import has_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ops_missing_reason():
    """Why the compiled op library is not there, for a skip: not built, or built and failing to load (with the error;
    tests/ops/test_library.py fails the latter)."""
    from d2_refine.ops import _library

    if _library._library_path() is None:
        return "the compiled op library d2_refine._C is not built"
    return f"d2_refine._C did not load: {_library.load_error()}"


needs_ops = pytest.mark.skipif(not has_ops(), reason=ops_missing_reason())
"""Marks a test of the compiled kernels: skipped, with the reason, where ``d2_refine._C`` is not available (without it
the ops' fronts run the pure-PyTorch references, and a kernel-vs-reference test would compare the reference with
itself)."""


def cpu_and_cuda():
    """pytest parameters: "cpu", plus "cuda" (skipped with a reason where CUDA is absent)."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="CUDA is not available")))


def dispatched_ops(fn):
    """The names ("aten::<op>") of the ops ``fn()`` dispatches, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(f"{func.namespace}::{func._opname}")
            return func(*args, **(kwargs or {}))

    names = []
    with Record():
        fn()
    return names


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


def benchmark_record(model, seed, box, mask=None, baseline=None, s_it=1.0, iters=100, train_s=None, load=None,
                     resumed=False):
    """A made-up results record of tools/benchmark_table.py: ``box`` AP and the other box metrics around it."""
    bbox = {"AP": box, "AP50": box + 20, "AP75": box + 5, "AP90": box - 20, "APs": box - 1}
    metrics = {"bbox": bbox, **({"segm": {"AP": mask}} if mask is not None else {})}
    train = {"s_per_iter": s_it, "train_s": train_s, **({"resumed": True} if resumed else {})}
    return dict(model=model, seed=seed, iters=iters, title=model.upper(), baseline=baseline, metrics=metrics,
                train=train, load={"mean_1min": load} if load else None)


def benchmark_records():
    """Made-up records: three seeds, a missing seed, a seed the baseline lacks, one seed, a baseline without runs."""
    return [
        *(benchmark_record("mask_rcnn", s, box, mask, s_it=1.0 + s / 10, train_s=1200.0 + 300 * s, load=2.0 + s / 10,
               resumed=s == 3)  # a resumed run's time is that of its second part: left out of the range
          for s, box, mask in ((1, 50.0, 45.0), (2, 52.0, 46.0), (3, 54.0, 47.0))),
        *(benchmark_record("ifr", s, box, mask, "mask_rcnn")
          for s, box, mask in ((1, 53.0, 46.0), (2, 55.0, 47.0), (3, 57.5, 48.0))),
        benchmark_record("fpt_lite", 1, 49.0, 45.0, "mask_rcnn"),
        benchmark_record("fpt_lite", 2, 53.0, 46.0, "mask_rcnn"),  # seed 3 missing
        *(benchmark_record("internet_l2", s, box, None, "mask_rcnn") for s, box in ((1, 48.0), (2, 49.5), (3, 51.0))),
        *(benchmark_record("fpt_paper", s, box, None, "mask_rcnn") for s, box in ((2, 50.0), (3, 50.0), (4, 60.0))),
        benchmark_record("faster_rcnn", 1, 40.0), benchmark_record("faster_rcnn", 2, 41.0),
        benchmark_record("iounet", 1, 42.0, None, "faster_rcnn"),
        benchmark_record("rdsnet", 1, 12.0, 10.0, "retinanet"),  # its baseline has no record
    ]


def table_lines(markdown):
    """The table lines of a Markdown text with the cells' padding removed ('| a | b |'), joined by newlines."""
    return "\n".join("| " + " | ".join(c.strip() for c in line.strip().strip("|").split("|")) + " |"
                     for line in markdown.splitlines() if line.startswith("|"))
