// Multi-level Precise RoI Pooling, CPU kernel: the boxes of each level go through the single-level CPU kernels of
// csrc/prroi_pool (called directly, below autograd), their results scattered back in box order. On the CPU the
// per-level split costs no device round trip; the CUDA kernel does it per box instead.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "multilevel_prroi_pool/multilevel_prroi_pool_common.h"

namespace d2_refine {
namespace multilevel {
namespace {

const c10::DispatchKeySet kCPU(c10::DispatchKey::CPU);

at::Tensor prroi_pool_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t ph,
                          int64_t pw, bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2_refine::prroi_pool", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::SymInt, c10::SymInt,
                                         bool)>();
  return op.redispatch(kCPU, input, rois, spatial_scale, c10::SymInt(ph), c10::SymInt(pw), aligned);
}

std::tuple<at::Tensor, at::Tensor> prroi_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                           const at::Tensor& rois, double spatial_scale, int64_t ph,
                                                           int64_t pw, bool aligned, bool need_input,
                                                           bool need_rois) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("d2_refine::_prroi_pool_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, double, c10::SymInt, c10::SymInt,
                                                                 bool, bool, bool)>();
  return op.redispatch(kCPU, grad, input, rois, spatial_scale, c10::SymInt(ph), c10::SymInt(pw), aligned, need_input,
                       need_rois);
}

// Per level: the rows of its boxes and their rois (batch index, x1, y1, x2, y2); levels without boxes are skipped.
struct LevelSplit {
  std::vector<at::Tensor> rows, rois;
};

LevelSplit split_by_level(at::TensorList inputs, const at::Tensor& boxes, at::IntArrayRef boxes_per_image,
                          double canonical_box_size, int64_t canonical_level, int64_t min_level) {
  const int64_t num_levels = static_cast<int64_t>(inputs.size());
  const at::Tensor levels = box_levels(boxes, canonical_box_size, canonical_level, min_level, num_levels);
  const at::Tensor all_rois =
      at::cat({box_images(boxes, boxes_per_image).to(boxes.scalar_type()).unsqueeze(1), boxes}, 1);
  LevelSplit s;
  for (int64_t l = 0; l < num_levels; ++l) {
    const at::Tensor rows = at::nonzero(levels == l).select(1, 0);
    s.rows.push_back(rows);
    s.rois.push_back(all_rois.index_select(0, rows));
  }
  return s;
}

at::Tensor forward_kernel(at::TensorList inputs, const at::Tensor& boxes, at::IntArrayRef boxes_per_image,
                          at::ArrayRef<double> spatial_scales, double canonical_box_size, int64_t canonical_level,
                          int64_t pooled_height, int64_t pooled_width, bool aligned) {
  const int64_t min_level = check_args(inputs, boxes, boxes_per_image, spatial_scales, canonical_box_size,
                                       pooled_height, pooled_width);
  TORCH_CHECK(boxes.device().is_cpu(), "multilevel_prroi_pool: boxes must be a CPU tensor for the CPU kernel");
  at::Tensor output = at::zeros({boxes.size(0), inputs[0].size(1), pooled_height, pooled_width}, boxes.options());
  if (output.numel() == 0) {
    return output;
  }
  const LevelSplit s = split_by_level(inputs, boxes, boxes_per_image, canonical_box_size, canonical_level, min_level);
  for (size_t l = 0; l < inputs.size(); ++l) {
    if (s.rows[l].numel() > 0) {
      output.index_copy_(0, s.rows[l],
                         prroi_pool_cpu(inputs[l], s.rois[l], spatial_scales[l], pooled_height, pooled_width, aligned));
    }
  }
  return output;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> backward_kernel(
    const at::Tensor& grad, at::TensorList inputs, const at::Tensor& boxes, at::IntArrayRef boxes_per_image,
    at::ArrayRef<double> spatial_scales, double canonical_box_size, int64_t canonical_level, int64_t pooled_height,
    int64_t pooled_width, bool aligned, bool inputs_require_grad, bool boxes_require_grad) {
  const int64_t min_level = check_args(inputs, boxes, boxes_per_image, spatial_scales, canonical_box_size,
                                       pooled_height, pooled_width);
  check_grad(grad, inputs, boxes, pooled_height, pooled_width);
  TORCH_CHECK(boxes.device().is_cpu(), "_multilevel_prroi_pool_backward: boxes must be a CPU tensor for the CPU kernel");
  std::vector<at::Tensor> grad_inputs;
  for (const at::Tensor& t : inputs) {
    grad_inputs.push_back(at::zeros(t.sizes(), t.options()));
  }
  at::Tensor grad_boxes = at::zeros(boxes.sizes(), boxes.options());
  if (grad.numel() == 0 || !(inputs_require_grad || boxes_require_grad)) {
    return std::make_tuple(grad_inputs, grad_boxes);
  }
  const LevelSplit s = split_by_level(inputs, boxes, boxes_per_image, canonical_box_size, canonical_level, min_level);
  for (size_t l = 0; l < inputs.size(); ++l) {
    if (s.rows[l].numel() == 0) {
      continue;
    }
    auto [grad_input, grad_rois] =
        prroi_pool_backward_cpu(grad.index_select(0, s.rows[l]), inputs[l], s.rois[l], spatial_scales[l],
                                pooled_height, pooled_width, aligned, inputs_require_grad, boxes_require_grad);
    grad_inputs[l] = grad_input;
    grad_boxes.index_copy_(0, s.rows[l], grad_rois.narrow(1, 1, 4));
  }
  return std::make_tuple(grad_inputs, grad_boxes);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CPU, m) {
  m.impl("multilevel_prroi_pool", TORCH_FN(forward_kernel));
  m.impl("_multilevel_prroi_pool_backward", TORCH_FN(backward_kernel));
}

}  // namespace multilevel
}  // namespace d2_refine
