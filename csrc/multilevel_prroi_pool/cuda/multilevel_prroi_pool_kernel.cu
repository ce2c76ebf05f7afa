// Multi-level Precise RoI Pooling, CUDA kernels: every launch covers all boxes of all levels, each thread (or
// block) reading its box's level and image from two Tensor[K] computed on the device, and the level's map from a
// table of pointers passed by value. No host synchronisation: no split per level, no batch-index check (the image
// of each box comes from boxes_per_image, known on the host).
//  - forward: a thread per output element (box, channel, bin);
//  - gradient w.r.t. the maps: a thread per output element scattering into its level's accumulation buffer;
//  - gradient w.r.t. the boxes: a block per (box, bin), its threads splitting the channels, then a block sum into
//    the bin's 4 terms, added up per box in bin order (prroi::device::sum_bin_terms: the same result at every call).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "multilevel_prroi_pool/multilevel_prroi_pool_common.h"
#include "prroi_pool/cuda/prroi_pool_device.cuh"
#include "prroi_pool/prroi_pool_common.h"

namespace d2_refine {
namespace multilevel {
namespace {

using prroi::node_range;
using prroi::RoIGeometry;

constexpr int kThreads = 256;
constexpr int kBoxThreads = 128;

inline int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535 * 8));
}

// The pyramid, by value: map, gradient buffer, size and scale of each level.
template <typename scalar_t, typename acc_t>
struct Pyramid {
  const scalar_t* data[kMaxLevels];
  acc_t* grad[kMaxLevels];
  int64_t height[kMaxLevels];
  int64_t width[kMaxLevels];
  acc_t scale[kMaxLevels];
};

template <typename scalar_t, typename acc_t>
__device__ inline RoIGeometry<acc_t> geometry(const scalar_t* boxes, int64_t k, acc_t scale, bool aligned,
                                              int64_t pooled_height, int64_t pooled_width) {
  acc_t roi[5];
  roi[0] = acc_t(0);
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    roi[t + 1] = static_cast<acc_t>(boxes[4 * k + t]);
  }
  return prroi::roi_geometry(roi, scale, aligned, pooled_height, pooled_width);
}

template <typename scalar_t, typename acc_t>
__global__ void forward_cuda(int64_t total, Pyramid<scalar_t, acc_t> pyr, const scalar_t* boxes,
                             const int64_t* levels, const int64_t* images, int64_t channels, int64_t pooled_height,
                             int64_t pooled_width, bool aligned, scalar_t* output) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const prroi::device::BinIndex e = prroi::device::bin_index(index, channels, pooled_height, pooled_width);
    const int64_t l = levels[e.k];
    output[index] = static_cast<scalar_t>(0);
    if (l < 0) {
      continue;
    }
    const RoIGeometry<acc_t> g = geometry(boxes, e.k, pyr.scale[l], aligned, pooled_height, pooled_width);
    if (!(g.area > acc_t(0))) {
      continue;
    }
    const int64_t height = pyr.height[l], width = pyr.width[l];
    const scalar_t* plane = pyr.data[l] + (images[e.k] * channels + e.c) * height * width;
    const acc_t xs = g.x_start + static_cast<acc_t>(e.pw) * g.bin_w;
    const acc_t ys = g.y_start + static_cast<acc_t>(e.ph) * g.bin_h;
    const acc_t sum = prroi::device::bin_integral(plane, height, width, xs, xs + g.bin_w, ys, ys + g.bin_h);
    output[index] = static_cast<scalar_t>(sum / g.area);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_inputs_cuda(int64_t total, Pyramid<scalar_t, acc_t> pyr, const scalar_t* grad,
                                     const scalar_t* boxes, const int64_t* levels, const int64_t* images,
                                     int64_t channels, int64_t pooled_height, int64_t pooled_width, bool aligned) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const prroi::device::BinIndex e = prroi::device::bin_index(index, channels, pooled_height, pooled_width);
    const int64_t l = levels[e.k];
    const acc_t gv = static_cast<acc_t>(grad[index]);
    if (l < 0 || gv == acc_t(0)) {
      continue;
    }
    const RoIGeometry<acc_t> g = geometry(boxes, e.k, pyr.scale[l], aligned, pooled_height, pooled_width);
    if (!(g.area > acc_t(0))) {
      continue;
    }
    const int64_t height = pyr.height[l], width = pyr.width[l];
    acc_t* plane = pyr.grad[l] + (images[e.k] * channels + e.c) * height * width;
    const acc_t scaled = gv / g.area;
    const acc_t xs = g.x_start + static_cast<acc_t>(e.pw) * g.bin_w, xe = xs + g.bin_w;
    const acc_t ys = g.y_start + static_cast<acc_t>(e.ph) * g.bin_h, ye = ys + g.bin_h;
    int64_t x0, x1, y0, y1;
    node_range(xs, xe, width, &x0, &x1);
    node_range(ys, ye, height, &y0, &y1);
    for (int64_t i = y0; i <= y1; ++i) {
      const acc_t gy = scaled * prroi::node_weight(ys, ye, i);
      for (int64_t j = x0; j <= x1; ++j) {
        gpuAtomicAdd(plane + i * width + j, gy * prroi::node_weight(xs, xe, j));
      }
    }
  }
}

// A block per (box, bin): dL/d(bin edges) summed over the channels, then the chain rule to the box corners.
template <typename scalar_t, typename acc_t>
__global__ void backward_boxes_cuda(int64_t num_bins, Pyramid<scalar_t, acc_t> pyr, const scalar_t* grad,
                                    const scalar_t* boxes, const int64_t* levels, const int64_t* images,
                                    int64_t channels, int64_t pooled_height, int64_t pooled_width, bool aligned,
                                    acc_t* bin_grads) {
  __shared__ acc_t partial[kBoxThreads / 32];
  for (int64_t index = blockIdx.x; index < num_bins; index += gridDim.x) {  // uniform over the block
    const prroi::device::BinIndex e = prroi::device::bin_index(index, /*channels=*/1, pooled_height, pooled_width);
    const int64_t k = e.k, ph = e.ph, pw = e.pw;
    const int64_t l = levels[k];
    if (l < 0) {
      continue;
    }
    const acc_t scale = pyr.scale[l];
    const RoIGeometry<acc_t> g = geometry(boxes, k, scale, aligned, pooled_height, pooled_width);
    if (!(g.area > acc_t(0))) {
      continue;
    }
    const int64_t height = pyr.height[l], width = pyr.width[l];
    if (height == 0 || width == 0) {
      continue;  // a level without cells: zero gradient (its line integrals would read the empty map)
    }
    const acc_t xs = g.x_start + static_cast<acc_t>(pw) * g.bin_w, xe = xs + g.bin_w;
    const acc_t ys = g.y_start + static_cast<acc_t>(ph) * g.bin_h, ye = ys + g.bin_h;
    int64_t x0, x1, y0, y1;
    node_range(xs, xe, width, &x0, &x1);
    node_range(ys, ye, height, &y0, &y1);
    const prroi::Taps<acc_t> t_xs = prroi::line_taps(xs, width), t_xe = prroi::line_taps(xe, width);
    const prroi::Taps<acc_t> t_ys = prroi::line_taps(ys, height), t_ye = prroi::line_taps(ye, height);
    acc_t g_xs = 0, g_xe = 0, g_ys = 0, g_ye = 0;
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
      const acc_t gv =
          static_cast<acc_t>(grad[(k * channels + c) * pooled_height * pooled_width + ph * pooled_width + pw]);
      if (gv == acc_t(0)) {
        continue;
      }
      const scalar_t* plane = pyr.data[l] + (images[k] * channels + c) * height * width;
      const acc_t out = prroi::device::bin_integral(plane, height, width, xs, xe, ys, ye) / g.area;
      g_xs += gv * (g.bin_h * out - prroi::device::vertical_line_integral(plane, width, t_xs, y0, y1, ys, ye));
      g_xe += gv * (prroi::device::vertical_line_integral(plane, width, t_xe, y0, y1, ys, ye) - g.bin_h * out);
      g_ys += gv * (g.bin_w * out - prroi::device::horizontal_line_integral(plane, width, t_ys, x0, x1, xs, xe));
      g_ye += gv * (prroi::device::horizontal_line_integral(plane, width, t_ye, x0, x1, xs, xe) - g.bin_w * out);
    }
    g_xs = prroi::device::block_reduce_sum(g_xs, partial);
    g_xe = prroi::device::block_reduce_sum(g_xe, partial);
    g_ys = prroi::device::block_reduce_sum(g_ys, partial);
    g_ye = prroi::device::block_reduce_sum(g_ye, partial);
    if (threadIdx.x == 0) {
      // xs = x1' (1 - u) + x2' u and xe = x1' (1 - u') + x2' u' (x' = scale * x), u = pw / PW, u' = (pw + 1) / PW
      const acc_t u = static_cast<acc_t>(pw) / pooled_width, u1 = static_cast<acc_t>(pw + 1) / pooled_width;
      const acc_t v = static_cast<acc_t>(ph) / pooled_height, v1 = static_cast<acc_t>(ph + 1) / pooled_height;
      const acc_t f = scale / g.area;
      acc_t* out = bin_grads + 4 * index;  // this bin's terms, added up per box by sum_bin_terms
      out[0] = f * ((acc_t(1) - u) * g_xs + (acc_t(1) - u1) * g_xe);
      out[1] = f * ((acc_t(1) - v) * g_ys + (acc_t(1) - v1) * g_ye);
      out[2] = f * (u * g_xs + u1 * g_xe);
      out[3] = f * (v * g_ys + v1 * g_ye);
    }
  }
}

template <typename scalar_t, typename acc_t>
Pyramid<scalar_t, acc_t> make_pyramid(const std::vector<at::Tensor>& maps, const std::vector<at::Tensor>& grads,
                                      at::ArrayRef<double> spatial_scales) {
  Pyramid<scalar_t, acc_t> p{};
  for (size_t l = 0; l < maps.size(); ++l) {
    p.data[l] = maps[l].data_ptr<scalar_t>();
    p.grad[l] = grads.empty() ? nullptr : grads[l].data_ptr<acc_t>();
    p.height[l] = maps[l].size(2);
    p.width[l] = maps[l].size(3);
    p.scale[l] = static_cast<acc_t>(spatial_scales[l]);
  }
  return p;
}

std::vector<at::Tensor> contiguous_maps(at::TensorList inputs) {
  std::vector<at::Tensor> maps;
  for (const at::Tensor& t : inputs) {
    maps.push_back(t.contiguous());
  }
  return maps;
}

at::Tensor forward_kernel(at::TensorList inputs, const at::Tensor& boxes, at::IntArrayRef boxes_per_image,
                          at::ArrayRef<double> spatial_scales, double canonical_box_size, int64_t canonical_level,
                          int64_t pooled_height, int64_t pooled_width, bool aligned) {
  const int64_t min_level = check_args(inputs, boxes, boxes_per_image, spatial_scales, canonical_box_size,
                                       pooled_height, pooled_width);
  TORCH_CHECK(boxes.is_cuda(), "multilevel_prroi_pool: boxes must be a CUDA tensor for the CUDA kernel");
  at::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t channels = inputs[0].size(1);
  at::Tensor output = at::empty({boxes.size(0), channels, pooled_height, pooled_width}, boxes.options());
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor levels =
      box_levels(boxes, canonical_box_size, canonical_level, min_level, static_cast<int64_t>(inputs.size()));
  const at::Tensor images = box_images(boxes, boxes_per_image);
  const at::Tensor boxes_ = boxes.contiguous();
  const std::vector<at::Tensor> maps = contiguous_maps(inputs);
  const int64_t total = output.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "multilevel_prroi_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto pyr = make_pyramid<scalar_t, acc_t>(maps, {}, spatial_scales);
    forward_cuda<scalar_t, acc_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        total, pyr, boxes_.data_ptr<scalar_t>(), levels.data_ptr<int64_t>(), images.data_ptr<int64_t>(), channels,
        pooled_height, pooled_width, aligned, output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> backward_kernel(
    const at::Tensor& grad, at::TensorList inputs, const at::Tensor& boxes, at::IntArrayRef boxes_per_image,
    at::ArrayRef<double> spatial_scales, double canonical_box_size, int64_t canonical_level, int64_t pooled_height,
    int64_t pooled_width, bool aligned, bool inputs_require_grad, bool boxes_require_grad) {
  const int64_t min_level = check_args(inputs, boxes, boxes_per_image, spatial_scales, canonical_box_size,
                                       pooled_height, pooled_width);
  check_grad(grad, inputs, boxes, pooled_height, pooled_width);
  TORCH_CHECK(boxes.is_cuda(), "_multilevel_prroi_pool_backward: boxes must be a CUDA tensor for the CUDA kernel");
  at::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t channels = inputs[0].size(1);
  std::vector<at::Tensor> grad_inputs;
  at::Tensor grad_boxes;
  if (grad.numel() == 0 || !(inputs_require_grad || boxes_require_grad)) {
    for (const at::Tensor& t : inputs) {
      grad_inputs.push_back(at::zeros(t.sizes(), t.options()));
    }
    return std::make_tuple(grad_inputs, at::zeros(boxes.sizes(), boxes.options()));
  }
  if (inputs_require_grad) {  // the maps' gradient is scattered with atomics (the box gradient is deterministic)
    at::globalContext().alertNotDeterministic("multilevel_prroi_pool_backward_cuda (feature gradient)");
  }
  const at::Tensor levels =
      box_levels(boxes, canonical_box_size, canonical_level, min_level, static_cast<int64_t>(inputs.size()));
  const at::Tensor images = box_images(boxes, boxes_per_image);
  const at::Tensor grad_ = grad.contiguous(), boxes_ = boxes.contiguous();
  const std::vector<at::Tensor> maps = contiguous_maps(inputs);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "multilevel_prroi_pool_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    std::vector<at::Tensor> acc;
    for (const at::Tensor& t : inputs) {
      acc.push_back(inputs_require_grad ? at::zeros(t.sizes(), t.options().dtype(acc_type)) : at::Tensor());
    }
    at::Tensor grad_boxes_acc = at::zeros(boxes.sizes(), boxes.options().dtype(acc_type));
    if (inputs_require_grad) {
      const auto pyr = make_pyramid<scalar_t, acc_t>(maps, acc, spatial_scales);
      const int64_t total = grad_.numel();
      backward_inputs_cuda<scalar_t, acc_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
          total, pyr, grad_.data_ptr<scalar_t>(), boxes_.data_ptr<scalar_t>(), levels.data_ptr<int64_t>(),
          images.data_ptr<int64_t>(), channels, pooled_height, pooled_width, aligned);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (boxes_require_grad) {
      const auto pyr = make_pyramid<scalar_t, acc_t>(maps, {}, spatial_scales);
      const int64_t num_bins = boxes.size(0) * pooled_height * pooled_width;
      at::Tensor bin_grads = at::zeros({num_bins, 4}, boxes.options().dtype(acc_type));
      backward_boxes_cuda<scalar_t, acc_t><<<static_cast<int>(std::min<int64_t>(num_bins, 65535 * 8)), kBoxThreads,
                                             0, stream>>>(
          num_bins, pyr, grad_.data_ptr<scalar_t>(), boxes_.data_ptr<scalar_t>(), levels.data_ptr<int64_t>(),
          images.data_ptr<int64_t>(), channels, pooled_height, pooled_width, aligned, bin_grads.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      prroi::device::sum_bin_terms<acc_t><<<blocks_for(boxes.size(0), kThreads), kThreads, 0, stream>>>(
          boxes.size(0), pooled_height * pooled_width, bin_grads.data_ptr<acc_t>(), 4, 0,
          grad_boxes_acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (size_t l = 0; l < inputs.size(); ++l) {
      grad_inputs.push_back(inputs_require_grad ? acc[l].to(inputs[l].scalar_type())
                                                : at::zeros(inputs[l].sizes(), inputs[l].options()));
    }
    grad_boxes = grad_boxes_acc.to(boxes.scalar_type());
  });
  return std::make_tuple(grad_inputs, grad_boxes);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CUDA, m) {
  m.impl("multilevel_prroi_pool", TORCH_FN(forward_kernel));
  m.impl("_multilevel_prroi_pool_backward", TORCH_FN(backward_kernel));
}

}  // namespace multilevel
}  // namespace d2_refine
