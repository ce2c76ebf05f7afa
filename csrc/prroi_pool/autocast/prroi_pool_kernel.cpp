// Precise RoI Pooling under autocast (torchvision's autocast/roi_align_kernel.cpp pattern): input and rois are
// cast to float32 (float64 if either is float64), the op runs with autocast excluded, and the output comes back
// in the dtype of input (the autocast dtype when the features come from autocast layers). The casts are
// recorded by autograd, so gradients w.r.t. the features and the boxes reach the original tensors in their own
// dtypes. Mixed dtypes (float16 features with float32 boxes) are accepted here, unlike in the backend kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "autocast_common.h"

namespace d2_refine {
namespace {

at::Tensor prroi_pool_call(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                           c10::SymInt pooled_height, c10::SymInt pooled_width, bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2_refine::prroi_pool", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt, c10::SymInt,
                                         bool)>();
  return op.call(input, rois, spatial_scale, std::move(pooled_height), std::move(pooled_width), aligned);
}

template <c10::DispatchKey autocast_key>
at::Tensor prroi_pool_autocast(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                               c10::SymInt pooled_height, c10::SymInt pooled_width, bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype = autocast::compute_dtype({&input, &rois});
  return prroi_pool_call(autocast::cast_floating(input, dtype), autocast::cast_floating(rois, dtype), spatial_scale,
                         std::move(pooled_height), std::move(pooled_width), aligned)
      .to(input.scalar_type());
}

}  // namespace

D2R_REGISTER_AUTOCAST("prroi_pool", prroi_pool_autocast)

}  // namespace d2_refine
