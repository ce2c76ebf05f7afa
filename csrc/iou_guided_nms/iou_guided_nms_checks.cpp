// Argument checks of IoU-guided NMS, shared by the CPU and CUDA wrappers (declared in iou_guided_nms_common.h).
#include "iou_guided_nms/iou_guided_nms_common.h"

#include <cmath>

namespace d2_refine {
namespace iou_nms {

int guide_code(const std::string& guide) {
  if (guide == "rank") return 0;
  if (guide == "weight") return 1;
  if (guide == "none") return 2;
  TORCH_CHECK(false, "iou_guided_nms: guide must be one of 'rank', 'weight', 'none', got '", guide, "'");
}

void check_args(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor& idxs) {
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

void check_threshold(double iou_threshold) {
  TORCH_CHECK_VALUE(!std::isnan(iou_threshold), "iou_guided_nms: iou_threshold must be a number, got nan");
}

at::Tensor finite_mask(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, int guide) {
  at::Tensor finite = boxes.isfinite().all(1).logical_and(scores.isfinite());
  return guide != 2 ? finite.logical_and(ious.isfinite()) : finite;
}

at::Tensor finite_candidates(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, int guide) {
  const at::Tensor finite = finite_mask(boxes, scores, ious, guide);
  if (finite.all().item<bool>()) {
    return at::Tensor();
  }
  return finite.nonzero().select(1, 0);
}

}  // namespace iou_nms
}  // namespace d2_refine
