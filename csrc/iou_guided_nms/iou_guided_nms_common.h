// Argument checks and helpers shared by the CPU and CUDA kernels of IoU-guided NMS (IoU-Net paper, Jiang et al.,
// ECCV 2018: rank by predicted IoU, a kept box takes the best classification score of the boxes it suppresses).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <optional>
#include <string>
#include <tuple>

namespace d2_refine {
namespace iou_nms {

// Ranking key: 0 = predicted IoU q ("rank", the paper), 1 = p * q ("weight"), 2 = p (plain NMS, "none"); anything
// else is an error naming the choices. Defined out of line in iou_guided_nms_checks.cpp (a C++ translation unit),
// like check_args: the CUDA wrapper calls the same code as the CPU one.
int guide_code(const std::string& guide);

void check_args(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, const at::Tensor& idxs);

// A ValueError for a NaN threshold (any other value is meaningful: < 0 merges every overlap, >= 1 none).
void check_threshold(double iou_threshold);

// Which candidates take part (a bool mask, no host synchronisation): those whose box coordinates, score p and
// (unless guide is "none") predicted IoU q are all finite. The others are dropped, as detectron2's
// fast_rcnn_inference drops non-finite boxes and scores before NMS.
at::Tensor finite_mask(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, int guide);

// The positions (int64) of finite_mask; an undefined tensor when all candidates are finite (the common case). One
// host synchronisation on CUDA.
at::Tensor finite_candidates(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious, int guide);

// When some candidate is not finite: `nms(boxes, scores, ious, idxs)` on the finite ones, its kept positions mapped
// back to the inputs; std::nullopt when all are finite (the caller then runs on the inputs as they are).
template <typename Nms>
std::optional<std::tuple<at::Tensor, at::Tensor>> nms_of_finite(const at::Tensor& boxes, const at::Tensor& scores,
                                                                const at::Tensor& ious, const at::Tensor& idxs,
                                                                int guide, Nms&& nms) {
  const at::Tensor finite = finite_candidates(boxes, scores, ious, guide);
  if (!finite.defined()) {
    return std::nullopt;
  }
  const auto kept = nms(boxes.index_select(0, finite), scores.index_select(0, finite), ious.index_select(0, finite),
                        idxs.index_select(0, finite));
  return std::make_tuple(finite.index_select(0, std::get<0>(kept)), std::get<1>(kept));
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
