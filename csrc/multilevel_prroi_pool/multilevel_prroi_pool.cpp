// Schemas of multi-level Precise RoI Pooling: PrRoIPool over an FPN, each box pooled from the level its size
// selects, in one call (instead of one call and one host-side split per level). Kernels: cpu/, cuda/; autocast:
// autocast/; fake kernels and autograd: d2_refine/ops/_registrations.py; reference:
// d2_refine/ops/multilevel_prroi_pool.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(d2_refine, m) {
  // inputs: L maps Tensor[N, C, H_l, W_l] with spatial_scales s_l = s_0 / 2^l; boxes (Tensor[K, 4]) x1, y1, x2, y2
  // in image coordinates, the first boxes_per_image[0] of image 0, and so on. Box k is pooled from the level
  // floor(canonical_level + log2(sqrt(area_k) / canonical_box_size + 1e-8)) clamped to the pyramid (detectron2's
  // assign_boxes_to_levels); a box with a NaN level (negative area, NaN coordinates) pools zeros.
  // -> Tensor[K, C, PH, PW]
  m.def(
      "multilevel_prroi_pool(Tensor[] inputs, Tensor boxes, SymInt[] boxes_per_image, float[] spatial_scales, "
      "float canonical_box_size, int canonical_level, SymInt pooled_height, SymInt pooled_width, bool aligned) "
      "-> Tensor");
  // Gradients w.r.t. every map (Tensor[N, C, H_l, W_l]) and the boxes (Tensor[K, 4]); one not requested comes back
  // as zeros without being computed.
  m.def(
      "_multilevel_prroi_pool_backward(Tensor grad, Tensor[] inputs, Tensor boxes, SymInt[] boxes_per_image, "
      "float[] spatial_scales, float canonical_box_size, int canonical_level, SymInt pooled_height, "
      "SymInt pooled_width, bool aligned, bool inputs_require_grad, bool boxes_require_grad) -> (Tensor[], Tensor)");
}
