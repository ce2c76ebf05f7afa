"""d2_refine without detectron2: importable, and one clear error where detectron2 is needed."""
import textwrap

import pytest

from helpers import run_python


def _run(code, *args):
    return run_python(code, *args, detectron2="missing")


def test_import_without_detectron2():
    r = _run("""
        import d2_refine, d2_refine.ops, d2_refine.layers, d2_refine.data.shapes
        from d2_refine.projects import available_projects
        import importlib
        for name in available_projects():
            importlib.import_module("d2_refine.projects." + name)
        assert not d2_refine.has_detectron2()
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_detectron2_parts_raise_one_clear_error():
    r = _run("""
        try:
            import d2_refine.engine
        except ImportError as e:
            print("ERR", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "needs detectron2" in r.stdout and "facebookresearch/detectron2" in r.stdout


def test_train_net_without_detectron2_prints_how_to_install():
    r = _run("""
        import runpy, sys
        sys.argv = ["train_net.py", "--config-file", "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml"]
        runpy.run_path("train_net.py", run_name="__main__")
    """)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "needs detectron2" in r.stderr and "pip install" in r.stderr


# Makes `import torchdeq` and `import ot` (POT) fail in a child process, as where the "methods" extra is absent.
_BLOCK_EXTRAS = "import sys\nsys.modules['torchdeq'] = None\nsys.modules['ot'] = None\n"
_EXTRA_HINT = 'pip install "d2_refine[methods]"'


def _run_without_extras(code):
    return run_python(_BLOCK_EXTRAS + textwrap.dedent(code))


def test_import_without_torchdeq_and_pot():
    r = _run_without_extras("""
        import importlib
        import d2_refine, d2_refine.projects, d2_refine.layers.deq, d2_refine.layers.sinkhorn
        for name in d2_refine.projects.available_projects():
            importlib.import_module("d2_refine.projects." + name)
        assert "torchdeq" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_deq_and_sinkhorn_without_their_library_raise_one_line_naming_the_extra():
    r = _run_without_extras("""
        import torch
        from d2_refine.layers.deq import DEQFixedPoint
        from d2_refine.layers.sinkhorn import sinkhorn_divergence
        for build in (lambda: DEQFixedPoint(), lambda: sinkhorn_divergence(torch.rand(1, 3, 2), torch.rand(1, 3, 2))):
            try:
                build()
            except ImportError as e:
                print("ERR", str(e))
    """)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 2, r.stdout
    assert "torchdeq" in lines[0] and "POT" in lines[1]
    assert all(_EXTRA_HINT in ln for ln in lines)


def test_models_without_torchdeq_and_pot():
    """With detectron2: a non-IFR model and IFR's weight-sharing model build; the implicit IFR model refuses in
    one line naming the extra."""
    pytest.importorskip("detectron2")
    r = _run_without_extras("""
        from detectron2.modeling import build_model
        from d2_refine.engine.config import setup_cfg
        opts = ["MODEL.DEVICE", "cpu"]
        for config in ("configs/RDSNet/rdsnet_R_18_FPN_shapes.yaml",
                       "configs/IFR/ifr_ws_mask_rcnn_R_18_FPN_shapes.yaml"):
            build_model(setup_cfg(config, opts))
            print("BUILT", config)
        try:
            build_model(setup_cfg("configs/IFR/ifr_mask_rcnn_R_18_FPN_shapes.yaml", opts))
        except ImportError as e:
            print("ERR", str(e))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("BUILT") == 2, r.stdout
    err = [ln for ln in r.stdout.splitlines() if ln.startswith("ERR")]
    assert len(err) == 1 and "torchdeq" in err[0] and _EXTRA_HINT in err[0], r.stdout


def test_train_net_help_without_detectron2():
    r = _run("""
        import runpy, sys
        sys.argv = ["train_net.py", "--help"]
        runpy.run_path("train_net.py", run_name="__main__")
    """)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--eval-only" in r.stdout and "--config-file" in r.stdout


# An installed detectron2 whose import fails: as a .so built for another torch does, or a broken dependency.
BROKEN = {
    "ImportError": 'ImportError("libdetectron2.so: undefined symbol: _ZN3c104cuda9SetDeviceEa")',
    "RuntimeError": 'RuntimeError("operator torchvision::nms does not exist")',
}


@pytest.mark.parametrize("error", sorted(BROKEN))
def test_broken_detectron2_is_reported_with_its_import_error(error):
    r = run_python("""
        import runpy, sys, warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import d2_refine, d2_refine.ops  # the detectron2-free parts still import
        assert not d2_refine.has_detectron2()
        print("WARNED", [str(x.message) for x in w if "fails to import" in str(x.message)])
        try:
            import d2_refine.engine
        except ImportError as e:
            print("ERR", e)
        sys.argv = ["train_net.py", "--config-file", "configs/Baselines/mask_rcnn_R_18_FPN_shapes.yaml"]
        runpy.run_path("train_net.py", run_name="__main__")
    """, detectron2=BROKEN[error])
    message = BROKEN[error].split('"')[1]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    for out in (r.stdout, r.stderr):  # d2_refine.engine's error, then train_net.py's one line
        assert f"installed but fails to import: {error}: {message}" in out, out
        assert "not installed" not in out and "pip install" not in out
    assert f"WARNED ['detectron2 is installed but fails to import ({error}: {message})" in r.stdout


def test_methods_load_lazily_and_a_config_registers_them():
    """``import d2_refine`` imports no method package; adding the config (train_net.py, d2_refine.engine) imports
    each one from this checkout's projects/ folder, which registers its components for build_model."""
    pytest.importorskip("detectron2")
    r = run_python("""
        import os, sys
        import d2_refine
        assert not [m for m in sys.modules if m.startswith("d2_refine.projects.")], "a method imported eagerly"
        from detectron2.config import get_cfg
        from detectron2.modeling import ROI_HEADS_REGISTRY
        assert "IoUNetROIHeads" not in ROI_HEADS_REGISTRY
        cfg = d2_refine.add_d2_refine_config(get_cfg())
        assert "IoUNetROIHeads" in ROI_HEADS_REGISTRY and "IOU_NET" in cfg.MODEL
        import d2_refine.projects.iounet.roi_heads as m
        assert m.__file__ == os.path.join(os.getcwd(), "projects", "IoUNet", "iounet", "roi_heads.py"), m.__file__
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
