// Argument checks, levels and images of multi-level Precise RoI Pooling (declared in multilevel_prroi_pool_common.h).
#include "multilevel_prroi_pool/multilevel_prroi_pool_common.h"

#include <ATen/OpMathType.h>

#include <cmath>

namespace d2_refine {
namespace multilevel {

int64_t check_args(at::TensorList inputs, const at::Tensor& boxes, at::IntArrayRef boxes_per_image,
                   at::ArrayRef<double> spatial_scales, double canonical_box_size, int64_t pooled_height,
                   int64_t pooled_width) {
  const int64_t num_levels = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(num_levels >= 1 && num_levels <= kMaxLevels, "multilevel_prroi_pool: inputs must hold 1 to ",
              kMaxLevels, " feature maps, got ", num_levels);
  TORCH_CHECK(static_cast<int64_t>(spatial_scales.size()) == num_levels,
              "multilevel_prroi_pool: spatial_scales must hold one scale per map (", num_levels, "), got ",
              spatial_scales.size());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4,
              "multilevel_prroi_pool: boxes must be Tensor[K, 4] = (x1, y1, x2, y2), got shape ", boxes.sizes());
  const at::Tensor& first = inputs[0];
  TORCH_CHECK(first.dim() == 4, "multilevel_prroi_pool: inputs[0] must be Tensor[N, C, H, W], got shape ",
              first.sizes());
  for (int64_t l = 0; l < num_levels; ++l) {
    const at::Tensor& t = inputs[l];
    TORCH_CHECK(t.dim() == 4 && t.size(0) == first.size(0) && t.size(1) == first.size(1),
                "multilevel_prroi_pool: inputs[", l, "] must be Tensor[N, C, H, W] with the N and C of inputs[0] (",
                first.size(0), ", ", first.size(1), "), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == boxes.scalar_type(), "multilevel_prroi_pool: inputs[", l,
                "] must have the dtype of boxes (", boxes.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == boxes.device(), "multilevel_prroi_pool: inputs[", l,
                "] must be on the device of boxes (", boxes.device(), "), got ", t.device());
  }
  TORCH_CHECK(static_cast<int64_t>(boxes_per_image.size()) == first.size(0),
              "multilevel_prroi_pool: boxes_per_image must hold one count per image (", first.size(0), "), got ",
              boxes_per_image.size());
  int64_t total = 0;
  for (const int64_t c : boxes_per_image) {
    TORCH_CHECK(c >= 0, "multilevel_prroi_pool: boxes_per_image must be counts >= 0, got ", boxes_per_image);
    total += c;
  }
  TORCH_CHECK(total == boxes.size(0), "multilevel_prroi_pool: boxes_per_image must add up to the ", boxes.size(0),
              " rows of boxes, got ", boxes_per_image);
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "multilevel_prroi_pool: output_size must be positive, got (",
              pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK(canonical_box_size > 0, "multilevel_prroi_pool: canonical_box_size must be positive, got ",
              canonical_box_size);
  TORCH_CHECK(spatial_scales[0] > 0, "multilevel_prroi_pool: spatial_scales must be positive, got ", spatial_scales);
  const double min_level = -std::log2(spatial_scales[0]);
  const int64_t rounded = std::llround(min_level);
  TORCH_CHECK(std::abs(min_level - static_cast<double>(rounded)) < 1e-6,
              "multilevel_prroi_pool: spatial_scales[0] must be a power of 2 (1 / stride), got ", spatial_scales[0]);
  for (int64_t l = 1; l < num_levels; ++l) {
    const double expected = spatial_scales[0] / std::ldexp(1.0, static_cast<int>(l));
    TORCH_CHECK(std::abs(spatial_scales[l] - expected) <= 1e-6 * expected,
                "multilevel_prroi_pool: spatial_scales must halve from one level to the next (a pyramid), got ",
                spatial_scales);
  }
  return rounded;
}

void check_grad(const at::Tensor& grad, at::TensorList inputs, const at::Tensor& boxes, int64_t pooled_height,
                int64_t pooled_width) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == boxes.size(0) && grad.size(1) == inputs[0].size(1) &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "_multilevel_prroi_pool_backward: grad must be Tensor[K, C, PH, PW] = [", boxes.size(0), ", ",
              inputs[0].size(1), ", ", pooled_height, ", ", pooled_width, "], got shape ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == boxes.scalar_type() && grad.device() == boxes.device(),
              "_multilevel_prroi_pool_backward: grad must have the dtype and device of boxes");
}

at::Tensor box_levels(const at::Tensor& boxes, double canonical_box_size, int64_t canonical_level, int64_t min_level,
                      int64_t num_levels) {
  // detectron2/modeling/poolers.py assign_boxes_to_levels, op for op (the same float rounding), in float32 for
  // half-precision boxes (the area of a box over 256 x 256 px overflows float16)
  const at::Tensor b = boxes.to(at::toOpMathType(boxes.scalar_type()));
  const at::Tensor width = b.select(1, 2) - b.select(1, 0), height = b.select(1, 3) - b.select(1, 1);
  const at::Tensor area = width * height;
  at::Tensor level = at::floor(at::log2(at::sqrt(area) / canonical_box_size + 1e-8) + canonical_level);
  level = at::clamp(level, min_level, min_level + num_levels - 1);
  const at::Tensor index = at::nan_to_num(level, 0.0).to(at::kLong) - min_level;
  // -1 (pools zeros): a NaN level (negative area), and a box whose width or height is not finite: a NaN or
  // infinite coordinate, whose level would depend on the sign of the infinity, or finite coordinates near the
  // type's largest value whose difference overflows (infinite bins, NaN in the kernels); every coordinate is in
  // one of the two differences. Checked on the device: no host synchronisation
  const at::Tensor none =
      at::isnan(level).logical_or(width.isfinite().logical_and(height.isfinite()).logical_not());
  return at::where(none, at::full({}, -1, index.options()), index);
}

at::Tensor box_images(const at::Tensor& boxes, at::IntArrayRef boxes_per_image) {
  const at::TensorOptions options = boxes.options().dtype(at::kLong);
  if (boxes_per_image.size() == 1) {
    return at::zeros({boxes.size(0)}, options);
  }
  std::vector<at::Tensor> parts;
  parts.reserve(boxes_per_image.size());
  for (size_t n = 0; n < boxes_per_image.size(); ++n) {
    parts.push_back(at::full({boxes_per_image[n]}, static_cast<int64_t>(n), options));
  }
  return at::cat(parts);
}

}  // namespace multilevel
}  // namespace d2_refine
