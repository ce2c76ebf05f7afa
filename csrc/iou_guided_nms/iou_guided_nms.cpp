// Schemas of IoU-guided NMS. Kernels: cpu/iou_guided_nms_kernel.cpp, cuda/iou_guided_nms_kernel.cu; fake kernel:
// d2_refine/ops/_registrations.py. Not differentiable.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(d2_refine, m) {
  // boxes (Tensor[N, 4], x1 y1 x2 y2), scores (Tensor[N]) = classification scores p, ious (Tensor[N]) = predicted
  // IoU q, idxs (Tensor[N], int64) = class; guide in {"rank", "weight", "none"}.
  // Returns (keep: int64 indices sorted by updated score descending, kept_scores).
  m.def(
      "iou_guided_nms(Tensor boxes, Tensor scores, Tensor ious, Tensor idxs, float iou_threshold, str guide) "
      "-> (Tensor, Tensor)");
  // The same NMS with a result of fixed size N: (keep: Tensor[N] int64, the kept indices in the order above and -1
  // after them; kept_scores: Tensor[N], 0 after the kept ones; num_kept: Tensor[] int64 on the device of boxes).
  // Nothing in it waits for the device, so a caller on a GPU can go on queuing work.
  m.def(
      "iou_guided_nms_padded(Tensor boxes, Tensor scores, Tensor ious, Tensor idxs, float iou_threshold, str guide) "
      "-> (Tensor, Tensor, Tensor)");
}
