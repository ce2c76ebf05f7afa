// Entry point of the op library d2_refine._C.
//
// The ops are registered with the PyTorch dispatcher by the static initialisers of the TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL blocks in csrc/<op>/. This file only gives the shared object a Python module init function,
// so that `import d2_refine._C` (which runs those initialisers) works. It uses the limited C API only: torch's
// BuildExtension compiles the py_limited_api extension with Py_LIMITED_API=0x030A0000 and setup.py tags the wheel
// cp310-abi3, so one wheel loads in every CPython >= 3.10 (not 3.9 or older). The kernels link against libtorch's
// C++ ABI, so the wheel still needs the torch version it was built with (and one wheel per platform).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Op library of d2_refine: ops live in torch.ops.d2_refine (prroi_pool, _prroi_pool_backward, "
      "iou_guided_nms).",
      -1,    // no per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
