// Schemas of Precise RoI Pooling. Kernels: cpu/prroi_pool_kernel.cpp, cuda/prroi_pool_kernel.cu; fake kernels and
// autograd: d2_refine/ops/_registrations.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(d2_refine, m) {
  // input (Tensor[N, C, H, W]), rois (Tensor[K, 5]) = (batch index, x1, y1, x2, y2) -> Tensor[K, C, PH, PW]
  m.def(
      "prroi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
      "bool aligned) -> Tensor");
  // Gradients w.r.t. input (Tensor[N, C, H, W]) and rois (Tensor[K, 5], index column 0). A gradient that is not
  // requested comes back as zeros without being computed.
  m.def(
      "_prroi_pool_backward(Tensor grad, Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
      "SymInt pooled_width, bool aligned, bool input_requires_grad, bool rois_requires_grad) -> (Tensor, Tensor)");
}
