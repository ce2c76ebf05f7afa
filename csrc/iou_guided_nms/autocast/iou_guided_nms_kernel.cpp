// IoU-guided NMS under autocast (torchvision's autocast/nms_kernel.cpp pattern): boxes, scores and ious are cast
// to float32 (float64 if one of them is float64) and the op runs with autocast excluded, so that IoUs near the
// threshold are not decided in float16 / bfloat16. keep stays int64; kept_scores come back in the dtype of scores
// (they are values of scores, so the round trip is exact).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

#include "autocast_common.h"

namespace d2_refine {
namespace {

using NmsResult = std::tuple<at::Tensor, at::Tensor>;

NmsResult iou_guided_nms_call(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                              const at::Tensor& idxs, double iou_threshold, c10::string_view guide) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2_refine::iou_guided_nms", "")
                       .typed<NmsResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        double, c10::string_view)>();
  return op.call(boxes, scores, ious, idxs, iou_threshold, guide);
}

template <c10::DispatchKey autocast_key>
NmsResult iou_guided_nms_autocast(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                                  const at::Tensor& idxs, double iou_threshold, c10::string_view guide) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype = autocast::compute_dtype({&boxes, &scores, &ious});
  auto [keep, kept_scores] =
      iou_guided_nms_call(autocast::cast_floating(boxes, dtype), autocast::cast_floating(scores, dtype),
                          autocast::cast_floating(ious, dtype), idxs, iou_threshold, guide);
  return NmsResult(keep, kept_scores.to(scores.scalar_type()));
}

using PaddedResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <c10::DispatchKey autocast_key>
PaddedResult iou_guided_nms_padded_autocast(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                                            const at::Tensor& idxs, double iou_threshold, c10::string_view guide) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2_refine::iou_guided_nms_padded", "")
                       .typed<PaddedResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, double, c10::string_view)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype = autocast::compute_dtype({&boxes, &scores, &ious});
  auto [keep, kept_scores, num_kept] =
      op.call(autocast::cast_floating(boxes, dtype), autocast::cast_floating(scores, dtype),
              autocast::cast_floating(ious, dtype), idxs, iou_threshold, guide);
  return PaddedResult(keep, kept_scores.to(scores.scalar_type()), num_kept);
}

}  // namespace

D2R_REGISTER_AUTOCAST("iou_guided_nms", iou_guided_nms_autocast)
D2R_REGISTER_AUTOCAST("iou_guided_nms_padded", iou_guided_nms_padded_autocast)

}  // namespace d2_refine
