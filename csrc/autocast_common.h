// Helpers of the Autocast kernels (csrc/<op>/autocast/): under torch.autocast (detectron2's SOLVER.AMP) the ops
// run in float32 whatever the autocast dtype, as torchvision's roi_align and nms do. float64 arguments are
// not lowered (autocast never casts float64), so a float64 argument makes the op run in float64.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>

namespace d2_refine {
namespace autocast {

// float64 when one of the floating-point tensors is float64, else float32.
inline at::ScalarType compute_dtype(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t->scalar_type() == at::kDouble) {
      return at::kDouble;
    }
  }
  return at::kFloat;
}

// t in dtype when it is floating point; other tensors (class indices, or bad input that the kernel then rejects
// with a clear error) unchanged.
inline at::Tensor cast_floating(const at::Tensor& t, at::ScalarType dtype) {
  return t.is_floating_point() ? t.to(dtype) : t;
}

}  // namespace autocast
}  // namespace d2_refine

// Registers fn<AutocastCPU> and fn<AutocastCUDA> as the autocast kernels of the op `name` (as torchvision registers
// each autocast kernel for both keys). Use inside namespace d2_refine.
#define D2R_REGISTER_AUTOCAST(name, fn)                                  \
  TORCH_LIBRARY_IMPL(d2_refine, AutocastCPU, m) {                         \
    m.impl(name, TORCH_FN(fn<c10::DispatchKey::AutocastCPU>));            \
  }                                                                       \
  TORCH_LIBRARY_IMPL(d2_refine, AutocastCUDA, m) {                        \
    m.impl(name, TORCH_FN(fn<c10::DispatchKey::AutocastCUDA>));           \
  }
