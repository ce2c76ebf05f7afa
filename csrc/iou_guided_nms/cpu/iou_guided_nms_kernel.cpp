// IoU-guided NMS, CPU kernel.
//
// Candidates are sorted once by (class, ranking key descending, index); each class is then an independent
// segment, processed in parallel. Within a segment the greedy scan visits candidates in ranking order; a candidate
// not yet owned is kept and owns itself, then takes every later unowned candidate of its segment overlapping it
// above the threshold. Because kept boxes are visited in ranking order, a suppressed candidate's owner is the first
// kept box overlapping it, and the kept box's new score is the maximum classification score over its members.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "iou_guided_nms/iou_guided_nms_common.h"

namespace d2_refine {
namespace {

template <typename T>
struct SortEntry {
  int64_t cls;
  T key;
  int64_t index;
};

template <typename T>
void iou_guided_nms_impl(const T* boxes, const T* scores, const T* ious, const int64_t* idxs, int64_t n,
                         double iou_threshold, int guide, std::vector<int64_t>& keep, std::vector<T>& kept_scores) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<SortEntry<T>> entries(n);
  for (int64_t i = 0; i < n; ++i) {
    T key = iou_nms::ranking_key(scores[i], ious[i], guide);
    entries[i] = {idxs[i], std::isnan(key) ? neg_inf : key, i};
  }
  std::sort(entries.begin(), entries.end(), [](const SortEntry<T>& a, const SortEntry<T>& b) {
    if (a.cls != b.cls) return a.cls < b.cls;
    if (a.key != b.key) return a.key > b.key;
    return a.index < b.index;
  });

  // Boxes, areas and scores in sorted order (contiguous scans); class segments.
  std::vector<T> sorted_boxes(4 * n), areas(n), p(n);
  std::vector<int64_t> segment_starts;
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = entries[a].index;
    const T* b = boxes + 4 * i;
    std::copy(b, b + 4, sorted_boxes.begin() + 4 * a);
    areas[a] = (b[2] - b[0]) * (b[3] - b[1]);
    p[a] = scores[i];
    if (a == 0 || entries[a].cls != entries[a - 1].cls) segment_starts.push_back(a);
  }
  segment_starts.push_back(n);

  const T threshold = static_cast<T>(iou_threshold);
  std::vector<int64_t> owner(n, -1);  // position (in sorted order) of the owning kept box
  std::vector<T> new_score(n);
  const int64_t num_segments = static_cast<int64_t>(segment_starts.size()) - 1;
  at::parallel_for(0, num_segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = segment_starts[s], last = segment_starts[s + 1];
      for (int64_t a = first; a < last; ++a) {
        if (owner[a] >= 0) continue;
        owner[a] = a;
        const T* box_a = sorted_boxes.data() + 4 * a;
        const T area_a = areas[a];
        T best = p[a];
        for (int64_t b = a + 1; b < last; ++b) {
          if (owner[b] >= 0) continue;
          if (iou_nms::box_iou(box_a, area_a, sorted_boxes.data() + 4 * b, areas[b]) > threshold) {
            owner[b] = a;
            if (p[b] > best) best = p[b];
          }
        }
        new_score[a] = guide == 2 ? p[a] : best;
      }
    }
  });

  // Kept boxes ordered by updated score descending, ties by smaller original index (NaN scores last).
  std::vector<int64_t> kept;  // positions in sorted order
  for (int64_t a = 0; a < n; ++a) {
    if (owner[a] == a) kept.push_back(a);
  }
  std::sort(kept.begin(), kept.end(), [&](int64_t x, int64_t y) {
    const T sx = std::isnan(new_score[x]) ? neg_inf : new_score[x];
    const T sy = std::isnan(new_score[y]) ? neg_inf : new_score[y];
    if (sx != sy) return sx > sy;
    return entries[x].index < entries[y].index;
  });
  keep.resize(kept.size());
  kept_scores.resize(kept.size());
  for (size_t r = 0; r < kept.size(); ++r) {
    keep[r] = entries[kept[r]].index;
    kept_scores[r] = new_score[kept[r]];
  }
}

std::tuple<at::Tensor, at::Tensor> iou_guided_nms_kernel(const at::Tensor& boxes, const at::Tensor& scores,
                                                         const at::Tensor& ious, const at::Tensor& idxs,
                                                         double iou_threshold, c10::string_view guide) {
  iou_nms::check_args(boxes, scores, ious, idxs);
  const int guide_id = iou_nms::guide_code(std::string(guide));
  iou_nms::check_threshold(iou_threshold);
  TORCH_CHECK(boxes.device().is_cpu(), "iou_guided_nms: boxes must be a CPU tensor for the CPU kernel");
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
  const at::Tensor boxes_ = boxes.contiguous(), scores_ = scores.contiguous(), ious_ = ious.contiguous();
  const at::Tensor idxs_ = idxs.to(at::kLong).contiguous();
  at::Tensor keep_t, scores_t;
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "iou_guided_nms_cpu", [&] {
    std::vector<int64_t> keep;
    std::vector<scalar_t> kept_scores;
    iou_guided_nms_impl(boxes_.data_ptr<scalar_t>(), scores_.data_ptr<scalar_t>(), ious_.data_ptr<scalar_t>(),
                        idxs_.data_ptr<int64_t>(), n, iou_threshold, guide_id, keep, kept_scores);
    const int64_t k = static_cast<int64_t>(keep.size());
    keep_t = at::empty({k}, boxes.options().dtype(at::kLong));
    scores_t = at::empty({k}, scores.options());
    std::copy(keep.begin(), keep.end(), keep_t.data_ptr<int64_t>());
    std::copy(kept_scores.begin(), kept_scores.end(), scores_t.data_ptr<scalar_t>());
  });
  return std::make_tuple(keep_t, scores_t);
}

// The compact result padded to N rows (keep -1, kept_scores 0) with its count: on the CPU padding costs nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> iou_guided_nms_padded_kernel(const at::Tensor& boxes,
                                                                            const at::Tensor& scores,
                                                                            const at::Tensor& ious,
                                                                            const at::Tensor& idxs,
                                                                            double iou_threshold,
                                                                            c10::string_view guide) {
  auto [keep, kept_scores] = iou_guided_nms_kernel(boxes, scores, ious, idxs, iou_threshold, guide);
  const int64_t n = boxes.size(0), k = keep.size(0);
  at::Tensor keep_padded = at::full({n}, -1, keep.options());
  at::Tensor scores_padded = at::zeros({n}, scores.options());
  keep_padded.narrow(0, 0, k).copy_(keep);
  scores_padded.narrow(0, 0, k).copy_(kept_scores);
  return std::make_tuple(keep_padded, scores_padded, at::scalar_tensor(k, keep.options()));
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CPU, m) {
  m.impl("iou_guided_nms", TORCH_FN(iou_guided_nms_kernel));
  m.impl("iou_guided_nms_padded", TORCH_FN(iou_guided_nms_padded_kernel));
}

}  // namespace d2_refine
