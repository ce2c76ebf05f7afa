// Entry point of the op library d2_refine._C.
//
// The ops are registered with the PyTorch dispatcher by the static initialisers of the TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL blocks in csrc/<op>/. This file only gives the shared object a Python module init function,
// so that `import d2_refine._C` (which runs those initialisers) works. It uses the limited C API only, hence
// one wheel per platform serves every CPython >= 3.9.
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
