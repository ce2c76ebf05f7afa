// Argument checks and helpers shared by the CPU and CUDA kernels of IoU-guided NMS (spec: shared/specs/iounet.md
// section 4).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <string>

namespace d2_refine {
namespace iou_nms {

// Ranking key: 0 = predicted IoU q ("rank", the paper), 1 = p * q ("weight"), 2 = p (plain NMS, "none").
inline int guide_code(const std::string& guide) {
  if (guide == "rank") return 0;
  if (guide == "weight") return 1;
  if (guide == "none") return 2;
  TORCH_CHECK(false, "iou_guided_nms: guide must be one of 'rank', 'weight', 'none', got '", guide, "'");
}

inline void check_args(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                       const at::Tensor& idxs) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "iou_guided_nms: boxes must be Tensor[N, 4] (x1, y1, x2, y2), got shape ",
              boxes.sizes());
  const int64_t n = boxes.size(0);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == n, "iou_guided_nms: scores must be Tensor[N] with N = ", n,
              ", got shape ", scores.sizes());
  TORCH_CHECK(ious.dim() == 1 && ious.size(0) == n, "iou_guided_nms: ious must be Tensor[N] with N = ", n,
              ", got shape ", ious.sizes());
  TORCH_CHECK(idxs.dim() == 1 && idxs.size(0) == n, "iou_guided_nms: idxs must be Tensor[N] with N = ", n,
              ", got shape ", idxs.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "iou_guided_nms: boxes must be floating point, got ",
              boxes.scalar_type());
  TORCH_CHECK(scores.scalar_type() == boxes.scalar_type() && ious.scalar_type() == boxes.scalar_type(),
              "iou_guided_nms: scores and ious must have the dtype of boxes (", boxes.scalar_type(), "), got ",
              scores.scalar_type(), " and ", ious.scalar_type());
  TORCH_CHECK(!at::isFloatingType(idxs.scalar_type()) && idxs.scalar_type() != at::kBool,
              "iou_guided_nms: idxs (class indices) must be an integer tensor, got ", idxs.scalar_type());
  TORCH_CHECK(scores.device() == boxes.device() && ious.device() == boxes.device() && idxs.device() == boxes.device(),
              "iou_guided_nms: boxes, scores, ious and idxs must be on the same device");
}

template <typename T>
C10_HOST_DEVICE inline T ranking_key(T p, T q, int guide) {
  return guide == 0 ? q : (guide == 1 ? p * q : p);
}

// IoU of two (x1, y1, x2, y2) boxes with precomputed areas; 0/0 (two empty boxes) gives NaN, which never
// exceeds the threshold, as in torchvision's nms.
template <typename T>
C10_HOST_DEVICE inline T box_iou(const T* a, T area_a, const T* b, T area_b) {
  const T w = (a[2] < b[2] ? a[2] : b[2]) - (a[0] > b[0] ? a[0] : b[0]);
  const T h = (a[3] < b[3] ? a[3] : b[3]) - (a[1] > b[1] ? a[1] : b[1]);
  const T inter = (w > T(0) ? w : T(0)) * (h > T(0) ? h : T(0));
  return inter / (area_a + area_b - inter);
}

}  // namespace iou_nms
}  // namespace d2_refine
