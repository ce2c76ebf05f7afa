// Argument checks of Precise RoI Pooling, shared by the CPU and CUDA wrappers (declared in prroi_pool_checks.h).
#include "prroi_pool/prroi_pool_checks.h"

#include <ATen/OpMathType.h>

#include <cmath>
#include <iomanip>
#include <sstream>

namespace d2_refine {
namespace prroi {

void check_prroi_pool_args(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                           int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(input.dim() == 4, "prroi_pool: input must be Tensor[N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "prroi_pool: rois must be Tensor[K, 5] = (batch index, x1, y1, x2, y2), got shape ", rois.sizes());
  TORCH_CHECK(rois.scalar_type() == input.scalar_type(), "prroi_pool: rois must have the dtype of input (",
              input.scalar_type(), "), got ", rois.scalar_type());
  TORCH_CHECK(rois.device() == input.device(), "prroi_pool: rois must be on the device of input (", input.device(),
              "), got ", rois.device());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "prroi_pool: output_size must be positive, got (",
              pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0,
              "prroi_pool: spatial_scale must be positive and finite, got ", spatial_scale);
}

void check_prroi_pool_grad(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& rois,
                           int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == input.size(1) &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "_prroi_pool_backward: grad must be Tensor[K, C, PH, PW] = [", rois.size(0), ", ", input.size(1), ", ",
              pooled_height, ", ", pooled_width, "], got shape ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == input.scalar_type(), "_prroi_pool_backward: grad must have the dtype of input (",
              input.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == input.device(), "_prroi_pool_backward: grad must be on the device of input");
}

void fail_batch_index(double value, int64_t row, int64_t num_images) {
  std::ostringstream shown;  // every digit: 1.0000001 must not read as 1
  shown << std::setprecision(17) << value;
  TORCH_CHECK(false, "prroi_pool: rois[:, 0] (batch index) must be an integer in [0, N) with N = ", num_images,
              " images in input; got ", shown.str(), " in row ", row);
}

// One host synchronisation on CUDA.
void check_batch_indices(const at::Tensor& rois, int64_t num_images) {
  if (rois.size(0) == 0) {
    return;
  }
  const at::Tensor b = rois.select(1, 0);
  const at::Tensor bad = (b < 0).logical_or(b >= static_cast<double>(num_images)).logical_or(b != b.floor());
  if (bad.any().item<bool>()) {
    const int64_t row = bad.nonzero().select(1, 0)[0].item<int64_t>();
    fail_batch_index(b[row].item<double>(), row, num_images);
  }
}

void check_finite_boxes(const at::Tensor& rois, double spatial_scale, bool aligned) {
  if (rois.size(0) == 0) {
    return;
  }
  // the kernels' geometry (prroi_pool_common.h, roi_geometry): x * spatial_scale - offset and the extents x1 - x0,
  // in the kernels' arithmetic type (float for float16 / bfloat16)
  const at::ScalarType type = at::toOpMathType(rois.scalar_type());
  const at::Tensor corners = rois.narrow(1, 1, 4).to(type) * spatial_scale - (aligned ? 0.5 : 0.0);
  const at::Tensor extents = corners.narrow(1, 2, 2) - corners.narrow(1, 0, 2);
  const at::Tensor bad = corners.isfinite().all(1).logical_and(extents.isfinite().all(1)).logical_not();
  if (bad.any().item<bool>()) {
    const int64_t row = bad.nonzero().select(1, 0)[0].item<int64_t>();
    const at::Tensor box = rois[row].to(at::kDouble).cpu();
    const double* v = box.data_ptr<double>();
    TORCH_CHECK_VALUE(false, "prroi_pool: box coordinates must be finite, also after scaling by spatial_scale = ",
                      spatial_scale, " and as widths and heights in ", type, "; got rois row ", row, " = (", v[0],
                      ", ", v[1], ", ", v[2], ", ", v[3], ", ", v[4], ")");
  }
}

}  // namespace prroi
}  // namespace d2_refine
