// IoU-guided NMS, CUDA kernel.
//
// Candidates are sorted on the device by (class, ranking key descending, index) with two stable sorts; each class
// segment is then scanned greedily by one thread block (a class rarely holds more than a few thousand candidates):
// the block visits the candidates in ranking order, and when one is not yet owned (kept) its threads test every
// later unowned candidate of the segment in parallel and claim those above the threshold. The new scores
// (scatter-max of p over owners) and the final order come from ATen ops, all on the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "iou_guided_nms/iou_guided_nms_common.h"

namespace d2_refine {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void iou_guided_nms_owner_cuda(const scalar_t* boxes, const int64_t* segment_start,
                                          const int64_t* segment_end, acc_t threshold, int64_t* owner) {
  const int64_t first = segment_start[blockIdx.x], last = segment_end[blockIdx.x];
  for (int64_t a = first; a < last; ++a) {
    __syncthreads();  // the claims of the previous kept box are visible to the whole block
    if (owner[a] >= 0) {
      continue;  // suppressed (the same value for every thread: owner[a] is not written during iteration a)
    }
    acc_t box_a[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      box_a[t] = static_cast<acc_t>(boxes[4 * a + t]);
    }
    const acc_t area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1]);
    for (int64_t b = a + 1 + threadIdx.x; b < last; b += blockDim.x) {
      if (owner[b] >= 0) {
        continue;
      }
      acc_t box_b[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        box_b[t] = static_cast<acc_t>(boxes[4 * b + t]);
      }
      const acc_t area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1]);
      if (iou_nms::box_iou(box_a, area_a, box_b, area_b) > threshold) {
        owner[b] = a;
      }
    }
  }
  __syncthreads();
  for (int64_t a = first + threadIdx.x; a < last; a += blockDim.x) {
    if (owner[a] < 0) {
      owner[a] = a;  // kept boxes own themselves
    }
  }
}

std::tuple<at::Tensor, at::Tensor> iou_guided_nms_kernel(const at::Tensor& boxes, const at::Tensor& scores,
                                                         const at::Tensor& ious, const at::Tensor& idxs,
                                                         double iou_threshold, c10::string_view guide) {
  iou_nms::check_args(boxes, scores, ious, idxs);
  const int guide_id = iou_nms::guide_code(std::string(guide));
  iou_nms::check_threshold(iou_threshold);
  TORCH_CHECK(boxes.is_cuda(), "iou_guided_nms: boxes must be a CUDA tensor for the CUDA kernel");
  at::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) {
    return std::make_tuple(at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options()));
  }
  const at::Tensor finite = iou_nms::finite_candidates(boxes, scores, ious, guide_id);
  if (finite.defined()) {  // drop the candidates with non-finite values, map the kept positions back
    const auto kept = iou_guided_nms_kernel(boxes.index_select(0, finite), scores.index_select(0, finite),
                                            ious.index_select(0, finite), idxs.index_select(0, finite),
                                            iou_threshold, guide);
    return std::make_tuple(finite.index_select(0, std::get<0>(kept)), std::get<1>(kept));
  }
  const double neg_inf = -std::numeric_limits<double>::infinity();
  at::Tensor key = guide_id == 0 ? ious : (guide_id == 1 ? scores * ious : scores);
  key = at::nan_to_num(key, neg_inf);
  // (class, key descending, index): stable sort by key, then stable sort by class
  const at::Tensor by_key = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const auto by_class = idxs.to(at::kLong).index_select(0, by_key).sort(/*stable=*/true, 0, /*descending=*/false);
  const at::Tensor classes = std::get<0>(by_class);
  const at::Tensor order = by_key.index_select(0, std::get<1>(by_class));
  const at::Tensor sorted_boxes = boxes.index_select(0, order).contiguous();
  const at::Tensor sorted_scores = scores.index_select(0, order);
  const at::Tensor counts = std::get<2>(at::unique_consecutive(classes, false, /*return_counts=*/true));
  const at::Tensor segment_end = counts.cumsum(0);
  const at::Tensor segment_start = segment_end - counts;
  const int64_t num_segments = counts.size(0);
  at::Tensor owner = at::full({n}, -1, boxes.options().dtype(at::kLong));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "iou_guided_nms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    iou_guided_nms_owner_cuda<scalar_t, acc_t><<<static_cast<unsigned int>(num_segments), kThreads, 0, stream>>>(
        sorted_boxes.data_ptr<scalar_t>(), segment_start.data_ptr<int64_t>(), segment_end.data_ptr<int64_t>(),
        static_cast<acc_t>(iou_threshold), owner.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor positions = at::arange(n, owner.options());
  at::Tensor new_scores = sorted_scores;
  if (guide_id != 2) {
    new_scores = at::full({n}, neg_inf, sorted_scores.options())
                     .scatter_reduce(0, owner, sorted_scores, "amax", /*include_self=*/true);
  }
  const at::Tensor kept = at::nonzero(owner == positions).select(1, 0);
  // by original index, then stably by updated score descending
  const auto by_index = order.index_select(0, kept).sort(/*stable=*/true, 0, false);
  const at::Tensor keep = std::get<0>(by_index);
  const at::Tensor kept_scores = new_scores.index_select(0, kept.index_select(0, std::get<1>(by_index)));
  const at::Tensor final_order =
      std::get<1>(at::nan_to_num(kept_scores, neg_inf).sort(/*stable=*/true, 0, /*descending=*/true));
  return std::make_tuple(keep.index_select(0, final_order), kept_scores.index_select(0, final_order));
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CUDA, m) {
  m.impl("iou_guided_nms", TORCH_FN(iou_guided_nms_kernel));
}

}  // namespace d2_refine
