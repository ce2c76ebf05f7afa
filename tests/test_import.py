"""d2_refine without detectron2: importable, and one clear error where detectron2 is needed."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `import detectron2` fail in a child process, as on a machine without it.
_BLOCK = textwrap.dedent("""
    import sys
    class _NoD2:
        def find_spec(self, name, path=None, target=None):
            if name == "detectron2" or name.startswith("detectron2."):
                raise ModuleNotFoundError("No module named 'detectron2'")
    sys.meta_path.insert(0, _NoD2())
""")


def _run(code, *args):
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


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
