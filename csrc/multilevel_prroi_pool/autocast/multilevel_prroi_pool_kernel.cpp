// Multi-level Precise RoI Pooling under autocast (as csrc/prroi_pool/autocast): maps and boxes cast to float32
// (float64 if one is float64), the op run with autocast excluded, the output in the dtype of inputs[0].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <vector>

#include "autocast_common.h"

namespace d2_refine {
namespace {

template <c10::DispatchKey autocast_key>
at::Tensor multilevel_prroi_pool_autocast(at::TensorList inputs, const at::Tensor& boxes,
                                          c10::SymIntArrayRef boxes_per_image, at::ArrayRef<double> spatial_scales,
                                          double canonical_box_size, int64_t canonical_level,
                                          c10::SymInt pooled_height, c10::SymInt pooled_width, bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2_refine::multilevel_prroi_pool", "")
                       .typed<at::Tensor(at::TensorList, const at::Tensor&, c10::SymIntArrayRef,
                                         at::ArrayRef<double>, double, int64_t, c10::SymInt, c10::SymInt, bool)>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  std::vector<const at::Tensor*> all{&boxes};
  for (const at::Tensor& t : inputs) {
    all.push_back(&t);
  }
  at::ScalarType dtype = at::kFloat;
  for (const at::Tensor* t : all) {
    if (t->scalar_type() == at::kDouble) {
      dtype = at::kDouble;
    }
  }
  std::vector<at::Tensor> cast;
  for (const at::Tensor& t : inputs) {
    cast.push_back(autocast::cast_floating(t, dtype));
  }
  const at::ScalarType out_dtype = inputs.empty() ? boxes.scalar_type() : inputs[0].scalar_type();
  return op.call(cast, autocast::cast_floating(boxes, dtype), boxes_per_image, spatial_scales, canonical_box_size,
                 canonical_level, std::move(pooled_height), std::move(pooled_width), aligned)
      .to(out_dtype);
}

}  // namespace

D2R_REGISTER_AUTOCAST("multilevel_prroi_pool", multilevel_prroi_pool_autocast)

}  // namespace d2_refine
