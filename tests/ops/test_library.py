"""Loading of the op library: a library whose compiler linked the C++ runtime statically (its errors would crash
Python instead of raising) is refused at import with one error naming the fix, and the ops fall back to their
pure-PyTorch references."""
import os
import shutil

import pytest

from d2_refine.ops import _library
from helpers import run_python


def _elf_without_cxx_runtime():
    """An ELF shared object or executable of this system that needs libc but no C++ runtime."""
    for name in ("true", "ls", "cat"):
        path = shutil.which(name)
        if path and _library.needed_libraries(path) and not any(
                lib.startswith(("libstdc++", "libc++")) for lib in _library.needed_libraries(path)):
            return path
    pytest.skip("no ELF executable without a C++ runtime on this system")


def test_needed_libraries_reads_dt_needed(tmp_path):
    path = _library._library_path()
    if path is None or not _library.has_ops():
        pytest.skip("the compiled op library d2_refine._C is not built")
    needed = _library.needed_libraries(path)
    if needed is None:
        pytest.skip("d2_refine._C is not an ELF file on this platform")
    assert any(lib.startswith("libstdc++") for lib in needed) and any(lib.startswith("libc10") for lib in needed)
    assert _library.static_cxx_runtime_error(path) is None
    not_elf = tmp_path / "not_elf.so"
    not_elf.write_bytes(b"not an ELF file")
    assert _library.needed_libraries(str(not_elf)) is None
    assert _library.needed_libraries(str(tmp_path / "missing.so")) is None
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(open(path, "rb").read(100))
    assert _library.needed_libraries(str(truncated)) is None


def test_library_with_static_cxx_runtime_is_refused_naming_the_fix(monkeypatch):
    fake = _elf_without_cxx_runtime()
    message = _library.static_cxx_runtime_error(fake)
    assert message and "CC=gcc CXX=g++" in message and fake in message
    monkeypatch.setenv("D2_REFINE_ALLOW_STATIC_CXX_RUNTIME", "1")
    assert _library.static_cxx_runtime_error(fake) is None


def test_import_refuses_it_and_the_ops_fall_back_to_the_references():
    """In a fresh process whose d2_refine._C resolves to a library without a shared C++ runtime: d2_refine.ops
    imports, has_ops() is False with the reason, and prroi_pool warns once (naming the fix) and computes."""
    fake = _elf_without_cxx_runtime()
    code = f"""
        import importlib.util, warnings
        real_find_spec = importlib.util.find_spec

        class Spec:
            origin = {fake!r}

        importlib.util.find_spec = lambda name, *a: Spec() if name == "d2_refine._C" else real_find_spec(name, *a)
        import torch
        from d2_refine.ops import has_ops, prroi_pool
        from d2_refine.ops._library import load_error
        importlib.util.find_spec = real_find_spec
        assert not has_ops() and "CXX=g++" in str(load_error()), load_error()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = prroi_pool(torch.ones(1, 2, 8, 8), torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]]), 2, 1.0)
        assert torch.allclose(out, torch.ones_like(out)), out
        assert any("CXX=g++" in str(w.message) for w in caught), [str(w.message) for w in caught]
        print("ok")
    """
    proc = run_python(code, env=dict(os.environ))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_a_built_library_loads():
    """Where ``d2_refine._C`` exists (the README's set-up builds it), it loads with every op: otherwise every test
    marked for the compiled ops would skip as "not built" and the fronts' fallbacks would test the references against
    themselves."""
    path = _library._library_path()
    if path is None:
        pytest.skip("the compiled op library d2_refine._C is not built (no C++ compiler at install time)")
    assert _library.has_ops(), f"{path} exists but did not load: {_library.load_error()}"
