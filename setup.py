"""Build script: Python packages (d2_refine + every projects/<Method>/<pkg>) and the op library d2_refine._C.

The extension is compiled from csrc/**/*.cpp (CPU, always) and csrc/**/*.cu (when CUDA is available or
FORCE_CUDA=1). Without a C++ compiler the package still installs and the ops fall back to their pure-PyTorch
references (with a warning at first use).
"""
import ast
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))



def _project_map():
    """d2_refine.projects.PROJECTS (package -> method folder), read from its source: the one map of the methods."""
    with open(os.path.join(ROOT, "d2_refine", "projects", "__init__.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "PROJECTS":
            return ast.literal_eval(node.value)
    raise RuntimeError("d2_refine/projects/__init__.py defines no PROJECTS map")


# projects/<Method>/<pkg>  ->  d2_refine.projects.<pkg>
PROJECTS = {name: f"projects/{folder}/{name}" for name, folder in _project_map().items()}


def _packages():
    packages = find_packages(include=["d2_refine", "d2_refine.*"])
    package_dir = {}
    for name, path in PROJECTS.items():
        if not os.path.isdir(os.path.join(ROOT, path)):
            continue
        base = f"d2_refine.projects.{name}"
        package_dir[base] = path
        packages.append(base)
        packages += [f"{base}.{sub}" for sub in find_packages(where=path)]
    return packages, package_dir


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script outside the
    toolkit. Prefer an explicit CUDA_HOME/CUDA_PATH, else the first root that holds lib64/libcudart.so."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "lib64", "libcudart.so")):
            return root
    return None


def _nvidia_pip_includes():
    """torch's CUDA headers include cusparse.h & co.; with pip-installed CUDA they live in nvidia/cu*/include."""
    try:
        import nvidia  # namespace package from the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return found


def _have_cxx_compiler():
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx.split()[0]) is not None or shutil.which("g++") is not None


def _needed_libraries(path):
    """The shared libraries an ELF file names (DT_NEEDED), or None where that cannot be read (not Linux, no
    readelf)."""
    readelf = shutil.which("readelf")
    if not sys.platform.startswith("linux") or readelf is None or not os.path.exists(path):
        return None
    out = subprocess.run([readelf, "-d", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def _check_cxx_runtime(path):
    """torch raises its errors (TORCH_CHECK) as C++ exceptions that cross from the op library into libtorch.
    A compiler that links its own C++ runtime statically (some toolchains do by default) gives the library a
    second copy of that runtime; where the copy comes from another GCC than torch's, every error an op raises --
    a bad batch index, a wrong shape -- kills the process (SIGSEGV: seen on a GPU machine whose $CXX was not the
    system's GCC) instead of reaching Python as a RuntimeError. Refuse such a build unless told otherwise."""
    needed = _needed_libraries(path)
    if needed is None or any(lib.startswith(("libstdc++", "libc++")) for lib in needed):
        return
    message = (
        f"d2_refine: {os.path.basename(path)} does not link the C++ runtime as a shared library (it needs only "
        f"{needed}): the compiler ({os.environ.get('CXX') or 'c++'}) linked it statically, and an error raised "
        "by an op then crosses between two copies of the C++ runtime, which crashes Python (SIGSEGV) instead of "
        "raising RuntimeError when the copies differ. Build with the system "
        "compiler torch is built against, e.g. `CC=gcc CXX=g++ pip install --no-build-isolation -e .`"
        " (D2_REFINE_ALLOW_STATIC_CXX_RUNTIME=1 builds it anyway).")
    if os.environ.get("D2_REFINE_ALLOW_STATIC_CXX_RUNTIME") == "1":
        sys.stderr.write("warning: " + message + "\n")
        return
    os.remove(path)
    raise RuntimeError(message)


def _build_ext_class(base):
    class BuildExtensionChecked(base):
        """torch's BuildExtension, then a check that each library links the C++ runtime dynamically."""

        def build_extensions(self):
            super().build_extensions()
            for ext in self.extensions:
                _check_cxx_runtime(self.get_ext_fullpath(ext.name))

    return BuildExtensionChecked


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        return [], {}
    if not _have_cxx_compiler():
        sys.stderr.write(
            "d2_refine: no C++ compiler found (install g++ or set CXX); building without the op library "
            "d2_refine._C. The ops will use their pure-PyTorch references (slower).\n"
        )
        return [], {}

    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    use_cuda = (torch.cuda.is_available() or force_cuda) and cuda_home is not None
    if force_cuda and cuda_home is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root "
                           "(the folder holding lib64/libcudart.so).")

    # Py_LIMITED_API is defined by torch's BuildExtension for py_limited_api extensions; csrc/d2_refine.cpp
    # uses the limited C API only (a module init stub), the ops are reached through torch.ops.d2_refine.
    define_macros = []
    extra_compile_args = {"cxx": ["-O3", "-std=c++20"]}
    include_dirs = [os.path.join(ROOT, "csrc")]
    ext_cls = CppExtension
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        ext_cls = CUDAExtension
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        include_dirs += _nvidia_pip_includes()
    ext = ext_cls(
        "d2_refine._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        py_limited_api=True,
    )
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"d2_refine.pretrained": ["*.pkl", "*.sha256"]},  # the shipped trunk (d2_refine://pretrained/...)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
