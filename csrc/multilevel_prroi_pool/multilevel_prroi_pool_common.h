// Shared by the CPU and CUDA kernels of multi-level Precise RoI Pooling (defined in multilevel_prroi_pool_common.cpp,
// a C++ translation unit): argument checks (errors name the argument), the level of each box and the image of each
// box, computed with ATen ops on the boxes' device, so that nothing waits for the device.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace d2_refine {
namespace multilevel {

constexpr int64_t kMaxLevels = 8;

// Checks every argument; returns the pyramid's first level (-log2 of spatial_scales[0], an integer).
int64_t check_args(at::TensorList inputs, const at::Tensor& boxes, at::IntArrayRef boxes_per_image,
                   at::ArrayRef<double> spatial_scales, double canonical_box_size, int64_t pooled_height,
                   int64_t pooled_width);

void check_grad(const at::Tensor& grad, at::TensorList inputs, const at::Tensor& boxes, int64_t pooled_height,
                int64_t pooled_width);

// Tensor[K] int64: index in [0, L) of the level of each box (detectron2's assign_boxes_to_levels, in the dtype of
// boxes), -1 when it is NaN or the box has a coordinate that is not finite.
at::Tensor box_levels(const at::Tensor& boxes, double canonical_box_size, int64_t canonical_level, int64_t min_level,
                      int64_t num_levels);

// Tensor[K] int64: the image of each box (boxes_per_image[n] boxes of image n, in order).
at::Tensor box_images(const at::Tensor& boxes, at::IntArrayRef boxes_per_image);

}  // namespace multilevel
}  // namespace d2_refine
