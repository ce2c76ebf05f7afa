// IoU-guided NMS, CUDA kernel.
//
// Candidates are sorted on the device by (class, ranking key descending, index) with two stable sorts; each class
// segment is then scanned greedily by one thread block (a class rarely holds more than a few thousand candidates):
// the block visits the candidates in ranking order, and when one is not yet owned (kept) its threads test every
// later unowned candidate of the segment in parallel and claim those above the threshold. The new scores
// (scatter-max of p over owners) and the final order come from ATen ops, all on the device. iou_guided_nms reads
// three values on the host (whether every candidate is finite, the number of classes, the number kept);
// iou_guided_nms_padded reads none (it drops the candidates with non-finite values on the device, where
// iou_guided_nms compacts them away first).
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

// The greedy scan on the device: candidates sorted by (class, key descending, index) and the owner of each (its
// position in that order). With `sync_free`, the class segments are found without reading their number on the host:
// one block per candidate, the blocks of candidates that do not start a segment returning at once.
struct SortedOwners {
  at::Tensor order;          // original index of each sorted position
  at::Tensor sorted_scores;  // p in sorted order
  at::Tensor owner;          // sorted position of the kept box owning each sorted position
};

// A key to sort by, descending: NaN last and +-inf kept, the CPU kernel's order (isnan ? -inf : value).
at::Tensor nan_last(const at::Tensor& t) {
  const double inf = std::numeric_limits<double>::infinity();
  return at::nan_to_num(t, -inf, inf, -inf);
}

SortedOwners sorted_owners(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& ious,
                           const at::Tensor& idxs, double iou_threshold, int guide_id, bool sync_free) {
  const int64_t n = boxes.size(0);
  const at::Tensor key = nan_last(guide_id == 0 ? ious : (guide_id == 1 ? scores * ious : scores));
  // (class, key descending, index): stable sort by key, then stable sort by class
  const at::Tensor by_key = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const auto by_class = idxs.to(at::kLong).index_select(0, by_key).sort(/*stable=*/true, 0, /*descending=*/false);
  const at::Tensor classes = std::get<0>(by_class);
  SortedOwners r;
  r.order = by_key.index_select(0, std::get<1>(by_class));
  const at::Tensor sorted_boxes = boxes.index_select(0, r.order).contiguous();
  r.sorted_scores = scores.index_select(0, r.order);
  at::Tensor segment_start, segment_end;
  if (sync_free) {
    const at::Tensor positions = at::arange(n, classes.options());
    const at::Tensor starts = at::ones({n}, classes.options().dtype(at::kBool));
    if (n > 1) {
      starts.narrow(0, 1, n - 1).copy_(classes.narrow(0, 1, n - 1) != classes.narrow(0, 0, n - 1));
    }
    const at::Tensor ends = at::searchsorted(classes, classes, /*out_int32=*/false, /*right=*/true);
    segment_start = at::where(starts, positions, at::zeros_like(positions)).contiguous();
    segment_end = at::where(starts, ends, at::zeros_like(ends)).contiguous();
  } else {
    const at::Tensor counts = std::get<2>(at::unique_consecutive(classes, false, /*return_counts=*/true));
    segment_end = counts.cumsum(0);
    segment_start = segment_end - counts;
  }
  const int64_t num_blocks = segment_start.size(0);
  r.owner = at::full({n}, -1, boxes.options().dtype(at::kLong));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "iou_guided_nms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    iou_guided_nms_owner_cuda<scalar_t, acc_t><<<static_cast<unsigned int>(num_blocks), kThreads, 0, stream>>>(
        sorted_boxes.data_ptr<scalar_t>(), segment_start.data_ptr<int64_t>(), segment_end.data_ptr<int64_t>(),
        static_cast<acc_t>(iou_threshold), r.owner.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r;
}

// new score of each sorted position: the max p over the members of a kept box (p itself for guide "none")
at::Tensor updated_scores(const SortedOwners& r, int guide_id) {
  if (guide_id == 2) {
    return r.sorted_scores;
  }
  const double neg_inf = -std::numeric_limits<double>::infinity();
  return at::full({r.owner.size(0)}, neg_inf, r.sorted_scores.options())
      .scatter_reduce(0, r.owner, r.sorted_scores, "amax", /*include_self=*/true);
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
  auto on_finite = iou_nms::nms_of_finite(boxes, scores, ious, idxs, guide_id, [&](auto... finite_args) {
    return iou_guided_nms_kernel(finite_args..., iou_threshold, guide);
  });
  if (on_finite) {  // some candidates had non-finite values: the others' result, at their original positions
    return *on_finite;
  }
  const SortedOwners r = sorted_owners(boxes, scores, ious, idxs, iou_threshold, guide_id, /*sync_free=*/false);
  const at::Tensor new_scores = updated_scores(r, guide_id);
  const at::Tensor positions = at::arange(n, r.owner.options());
  const at::Tensor kept = at::nonzero(r.owner == positions).select(1, 0);
  // by original index, then stably by updated score descending
  const auto by_index = r.order.index_select(0, kept).sort(/*stable=*/true, 0, false);
  const at::Tensor keep = std::get<0>(by_index);
  const at::Tensor kept_scores = new_scores.index_select(0, kept.index_select(0, std::get<1>(by_index)));
  const at::Tensor final_order =
      std::get<1>(nan_last(kept_scores).sort(/*stable=*/true, 0, /*descending=*/true));
  return std::make_tuple(keep.index_select(0, final_order), kept_scores.index_select(0, final_order));
}

// The same order as iou_guided_nms_kernel, on N rows: three stable sorts (original index; updated score
// descending; kept before suppressed) instead of compacting the kept boxes, and the count as a device tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> iou_guided_nms_padded_kernel(const at::Tensor& boxes,
                                                                            const at::Tensor& scores,
                                                                            const at::Tensor& ious,
                                                                            const at::Tensor& idxs,
                                                                            double iou_threshold,
                                                                            c10::string_view guide) {
  iou_nms::check_args(boxes, scores, ious, idxs);
  iou_nms::check_threshold(iou_threshold);
  const int guide_id = iou_nms::guide_code(std::string(guide));
  TORCH_CHECK(boxes.is_cuda(), "iou_guided_nms_padded: boxes must be a CUDA tensor for the CUDA kernel");
  at::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = boxes.size(0);
  const at::TensorOptions long_options = boxes.options().dtype(at::kLong);
  if (n == 0) {
    return std::make_tuple(at::empty({0}, long_options), at::empty({0}, scores.options()),
                           at::zeros({}, long_options));
  }
  // non-finite candidates take no part, as in iou_guided_nms, without a host synchronisation: they go to a class of
  // their own (one above the largest), where they can neither suppress nor lend a score, and are not kept
  const at::Tensor finite = iou_nms::finite_mask(boxes, scores, ious, guide_id);
  const at::Tensor classes = idxs.to(at::kLong);
  const at::Tensor own_class = at::where(finite, classes, classes.max() + 1);
  const SortedOwners r = sorted_owners(boxes, scores, ious, own_class, iou_threshold, guide_id, /*sync_free=*/true);
  const at::Tensor new_scores = updated_scores(r, guide_id);
  const at::Tensor positions = at::arange(n, long_options);
  const at::Tensor kept = (r.owner == positions).logical_and(finite.index_select(0, r.order));
  at::Tensor perm = std::get<1>(r.order.sort(/*stable=*/true, 0, false));
  perm = perm.index_select(
      0, std::get<1>(nan_last(new_scores.index_select(0, perm)).sort(/*stable=*/true, 0, /*descending=*/true)));
  perm = perm.index_select(0, std::get<1>(kept.index_select(0, perm).to(at::kByte).sort(true, 0, /*descending=*/true)));
  const at::Tensor num_kept = kept.sum(at::kLong);
  const at::Tensor valid = positions < num_kept;
  const at::Tensor keep = at::where(valid, r.order.index_select(0, perm), at::full({}, -1, long_options));
  const at::Tensor kept_scores = at::where(valid, new_scores.index_select(0, perm), at::zeros({}, scores.options()));
  return std::make_tuple(keep, kept_scores, num_kept);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CUDA, m) {
  m.impl("iou_guided_nms", TORCH_FN(iou_guided_nms_kernel));
  m.impl("iou_guided_nms_padded", TORCH_FN(iou_guided_nms_padded_kernel));
}

}  // namespace d2_refine
