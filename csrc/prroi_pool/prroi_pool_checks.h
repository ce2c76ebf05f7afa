// Argument checks shared by the CPU and CUDA wrappers of Precise RoI Pooling (errors name the argument). They are
// defined once, out of line, in prroi_pool_checks.cpp (a C++ translation unit): the CUDA wrappers call the same
// code as the CPU ones instead of an nvcc-compiled copy of an inline function.
#pragma once

#include <ATen/ATen.h>

namespace d2_refine {
namespace prroi {

void check_prroi_pool_args(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                           int64_t pooled_height, int64_t pooled_width);

void check_prroi_pool_grad(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& rois,
                           int64_t pooled_height, int64_t pooled_width);

[[noreturn]] void fail_batch_index(double value, int64_t row, int64_t num_images);

// Device-agnostic batch-index check (one host synchronisation on CUDA): every rois[:, 0] an integer in [0, N).
void check_batch_indices(const at::Tensor& rois, int64_t num_images);

// Every box finite in the kernels' geometry (corners after scaling, widths and heights); a ValueError naming the
// first offending row otherwise. One host synchronisation on CUDA.
void check_finite_boxes(const at::Tensor& rois, double spatial_scale, bool aligned);

}  // namespace prroi
}  // namespace d2_refine
