// Precise RoI Pooling, CUDA kernels (float32 / float64 / float16 / bfloat16, accumulating in float for the
// half types).
//  - forward: a thread per output element (RoI, channel, bin);
//  - gradient w.r.t. input: a thread per output element scattering into the bin's nodes with atomicAdd (into an
//    accumulation buffer of the accumulation type);
//  - gradient w.r.t. rois: a block per (RoI, bin), its threads splitting the channels, then a block reduction
//    and 4 atomicAdds per bin (not one per channel and bin).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "prroi_pool/prroi_pool_checks.h"
#include "prroi_pool/prroi_pool_common.h"

namespace d2_refine {
namespace {

using prroi::node_range;
using prroi::node_weight;
using prroi::RoIGeometry;

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

// torchvision's grid-stride loop: thread t handles t, t + stride, ... below n (n may exceed the grid).
#define D2R_CUDA_1D_KERNEL_LOOP(i, n)                                                            \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n);      \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// An output element's (RoI, channel, bin row, bin column) from its flat index in (R, C, PH, PW) order.
struct BinIndex {
  int64_t k, c, ph, pw;
};

__device__ inline BinIndex bin_index(int64_t index, int64_t channels, int64_t pooled_height, int64_t pooled_width) {
  BinIndex b;
  b.pw = index % pooled_width;
  index /= pooled_width;
  b.ph = index % pooled_height;
  index /= pooled_height;
  b.c = index % channels;
  b.k = index / channels;
  return b;
}

template <typename scalar_t, typename acc_t>
__device__ inline RoIGeometry<acc_t> load_geometry(const scalar_t* rois, int64_t k, acc_t spatial_scale,
                                                   bool aligned, int64_t pooled_height, int64_t pooled_width) {
  acc_t roi[5];
#pragma unroll
  for (int t = 0; t < 5; ++t) {
    roi[t] = static_cast<acc_t>(rois[5 * k + t]);
  }
  return prroi::roi_geometry(roi, spatial_scale, aligned, pooled_height, pooled_width);
}

// Integral of the interpolated plane over [xs, xe] x [ys, ye].
template <typename scalar_t, typename acc_t>
__device__ inline acc_t bin_integral(const scalar_t* plane, int64_t height, int64_t width, acc_t xs, acc_t xe,
                                     acc_t ys, acc_t ye) {
  int64_t x0, x1, y0, y1;
  node_range(xs, xe, width, &x0, &x1);
  node_range(ys, ye, height, &y0, &y1);
  acc_t sum = 0;
  for (int64_t i = y0; i <= y1; ++i) {
    const scalar_t* row = plane + i * width;
    acc_t row_sum = 0;
    for (int64_t j = x0; j <= x1; ++j) {
      row_sum += node_weight(xs, xe, j) * static_cast<acc_t>(row[j]);
    }
    sum += node_weight(ys, ye, i) * row_sum;
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
__global__ void prroi_pool_forward_cuda(int64_t total, const scalar_t* input, const scalar_t* rois, int64_t channels,
                                        int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                                        acc_t spatial_scale, bool aligned, scalar_t* output) {
  D2R_CUDA_1D_KERNEL_LOOP(index, total) {
    const BinIndex b = bin_index(index, channels, pooled_height, pooled_width);
    const int64_t pw = b.pw, ph = b.ph, c = b.c, k = b.k;
    const RoIGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!(g.area > acc_t(0))) {
      output[index] = static_cast<scalar_t>(0);
      continue;
    }
    const int64_t batch = static_cast<int64_t>(static_cast<acc_t>(rois[5 * k]));
    const scalar_t* plane = input + (batch * channels + c) * height * width;
    const acc_t xs = g.x_start + static_cast<acc_t>(pw) * g.bin_w;
    const acc_t ys = g.y_start + static_cast<acc_t>(ph) * g.bin_h;
    const acc_t sum = bin_integral(plane, height, width, xs, xs + g.bin_w, ys, ys + g.bin_h);
    output[index] = static_cast<scalar_t>(sum / g.area);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void prroi_pool_backward_input_cuda(int64_t total, const scalar_t* grad, const scalar_t* rois,
                                               int64_t channels, int64_t height, int64_t width,
                                               int64_t pooled_height, int64_t pooled_width, acc_t spatial_scale,
                                               bool aligned, acc_t* grad_input) {
  D2R_CUDA_1D_KERNEL_LOOP(index, total) {
    const BinIndex b = bin_index(index, channels, pooled_height, pooled_width);
    const int64_t pw = b.pw, ph = b.ph, c = b.c, k = b.k;
    const RoIGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, aligned, pooled_height, pooled_width);
    const acc_t gv = static_cast<acc_t>(grad[index]);
    if (!(g.area > acc_t(0)) || gv == acc_t(0)) {
      continue;
    }
    const acc_t scaled = gv / g.area;
    const int64_t batch = static_cast<int64_t>(static_cast<acc_t>(rois[5 * k]));
    acc_t* plane = grad_input + (batch * channels + c) * height * width;
    const acc_t xs = g.x_start + static_cast<acc_t>(pw) * g.bin_w, xe = xs + g.bin_w;
    const acc_t ys = g.y_start + static_cast<acc_t>(ph) * g.bin_h, ye = ys + g.bin_h;
    int64_t x0, x1, y0, y1;
    node_range(xs, xe, width, &x0, &x1);
    node_range(ys, ye, height, &y0, &y1);
    for (int64_t i = y0; i <= y1; ++i) {
      const acc_t gy = scaled * node_weight(ys, ye, i);
      for (int64_t j = x0; j <= x1; ++j) {
        gpuAtomicAdd(plane + i * width + j, gy * node_weight(xs, xe, j));
      }
    }
  }
}

// Line integral of the interpolated plane along x = const (taps tx) over the rows [y0, y1] weighted for [ys, ye].
template <typename scalar_t, typename acc_t>
__device__ inline acc_t line_integral_x(const scalar_t* plane, int64_t width, const prroi::Taps<acc_t>& tx,
                                        int64_t y0, int64_t y1, acc_t ys, acc_t ye) {
  acc_t sum = 0;
  for (int64_t i = y0; i <= y1; ++i) {
    const scalar_t* row = plane + i * width;
    sum += node_weight(ys, ye, i) *
           (tx.w0 * static_cast<acc_t>(row[tx.k0]) + tx.w1 * static_cast<acc_t>(row[tx.k1]));
  }
  return sum;
}

// Line integral along y = const (taps ty) over the columns [x0, x1] weighted for [xs, xe].
template <typename scalar_t, typename acc_t>
__device__ inline acc_t line_integral_y(const scalar_t* plane, int64_t width, const prroi::Taps<acc_t>& ty,
                                        int64_t x0, int64_t x1, acc_t xs, acc_t xe) {
  const scalar_t* r0 = plane + ty.k0 * width;
  const scalar_t* r1 = plane + ty.k1 * width;
  acc_t sum = 0;
  for (int64_t j = x0; j <= x1; ++j) {
    sum += node_weight(xs, xe, j) * (ty.w0 * static_cast<acc_t>(r0[j]) + ty.w1 * static_cast<acc_t>(r1[j]));
  }
  return sum;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `shared` holds one value per warp; the trailing __syncthreads lets the caller reuse it at once.
template <typename T>
__device__ inline T block_sum(T v, T* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared[warp] = v;
  }
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[lane] : T(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  __syncthreads();
  return v;
}

constexpr int kBoxThreads = 128;  // threads of a (RoI, bin) block, striding over the channels

// One block per (RoI, bin): its threads split the channels, each summing the bin's four edge derivatives over
// its channels; a block reduction then gives 4 atomicAdds per bin. (A thread per bin looping over all channels
// serialises C x cells loads per thread: ~100x slower at C = 256.)
template <typename scalar_t, typename acc_t>
__global__ void prroi_pool_backward_rois_cuda(int64_t num_bins, const scalar_t* grad, const scalar_t* input,
                                              const scalar_t* rois, int64_t channels, int64_t height, int64_t width,
                                              int64_t pooled_height, int64_t pooled_width, acc_t spatial_scale,
                                              bool aligned, acc_t* grad_rois) {
  __shared__ acc_t partial[kBoxThreads / 32];
  for (int64_t index = blockIdx.x; index < num_bins; index += gridDim.x) {  // uniform over the block
    const BinIndex b = bin_index(index, /*channels=*/1, pooled_height, pooled_width);
    const int64_t pw = b.pw, ph = b.ph, k = b.k;
    const RoIGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!(g.area > acc_t(0))) {
      continue;  // zero-area bins and inverted boxes: zero gradient (the same branch for the whole block)
    }
    const int64_t batch = static_cast<int64_t>(static_cast<acc_t>(rois[5 * k]));
    const acc_t xs = g.x_start + static_cast<acc_t>(pw) * g.bin_w, xe = xs + g.bin_w;
    const acc_t ys = g.y_start + static_cast<acc_t>(ph) * g.bin_h, ye = ys + g.bin_h;
    int64_t x0, x1, y0, y1;
    node_range(xs, xe, width, &x0, &x1);
    node_range(ys, ye, height, &y0, &y1);
    const prroi::Taps<acc_t> t_xs = prroi::line_taps(xs, width), t_xe = prroi::line_taps(xe, width);
    const prroi::Taps<acc_t> t_ys = prroi::line_taps(ys, height), t_ye = prroi::line_taps(ye, height);
    acc_t g_xs = 0, g_xe = 0, g_ys = 0, g_ye = 0;
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
      const acc_t gv = static_cast<acc_t>(grad[(k * channels + c) * pooled_height * pooled_width +
                                               ph * pooled_width + pw]);
      if (gv == acc_t(0)) {
        continue;
      }
      const scalar_t* plane = input + (batch * channels + c) * height * width;
      const acc_t out = bin_integral(plane, height, width, xs, xe, ys, ye) / g.area;
      g_xs += gv * (g.bin_h * out - line_integral_x(plane, width, t_xs, y0, y1, ys, ye));
      g_xe += gv * (line_integral_x(plane, width, t_xe, y0, y1, ys, ye) - g.bin_h * out);
      g_ys += gv * (g.bin_w * out - line_integral_y(plane, width, t_ys, x0, x1, xs, xe));
      g_ye += gv * (line_integral_y(plane, width, t_ye, x0, x1, xs, xe) - g.bin_w * out);
    }
    g_xs = block_sum(g_xs, partial);
    g_xe = block_sum(g_xe, partial);
    g_ys = block_sum(g_ys, partial);
    g_ye = block_sum(g_ye, partial);
    if (threadIdx.x == 0) {
      const acc_t u = static_cast<acc_t>(pw) / pooled_width, u1 = static_cast<acc_t>(pw + 1) / pooled_width;
      const acc_t v = static_cast<acc_t>(ph) / pooled_height, v1 = static_cast<acc_t>(ph + 1) / pooled_height;
      const acc_t f = spatial_scale / g.area;
      gpuAtomicAdd(grad_rois + 5 * k + 1, f * ((acc_t(1) - u) * g_xs + (acc_t(1) - u1) * g_xe));
      gpuAtomicAdd(grad_rois + 5 * k + 2, f * ((acc_t(1) - v) * g_ys + (acc_t(1) - v1) * g_ye));
      gpuAtomicAdd(grad_rois + 5 * k + 3, f * (u * g_xs + u1 * g_xe));
      gpuAtomicAdd(grad_rois + 5 * k + 4, f * (v * g_ys + v1 * g_ye));
    }
  }
}

at::Tensor prroi_pool_forward_kernel(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                     int64_t pooled_height, int64_t pooled_width, bool aligned) {
  prroi::check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  TORCH_CHECK(input.is_cuda(), "prroi_pool: input must be a CUDA tensor for the CUDA kernel");
  at::cuda::CUDAGuard device_guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  at::Tensor output = at::zeros({num_rois, channels, pooled_height, pooled_width}, input.options());
  if (output.numel() == 0) {
    return output;
  }
  prroi::check_batch_indices(rois, input.size(0));
  prroi::check_finite_boxes(rois, spatial_scale, aligned);
  const at::Tensor input_ = input.contiguous(), rois_ = rois.contiguous();
  const int64_t total = output.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    prroi_pool_forward_cuda<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        total, input_.data_ptr<scalar_t>(), rois_.data_ptr<scalar_t>(), channels, height, width, pooled_height,
        pooled_width, static_cast<acc_t>(spatial_scale), aligned, output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> prroi_pool_backward_kernel(const at::Tensor& grad, const at::Tensor& input,
                                                              const at::Tensor& rois, double spatial_scale,
                                                              int64_t pooled_height, int64_t pooled_width,
                                                              bool aligned, bool input_requires_grad,
                                                              bool rois_requires_grad) {
  prroi::check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  prroi::check_prroi_pool_grad(grad, input, rois, pooled_height, pooled_width);
  TORCH_CHECK(input.is_cuda(), "_prroi_pool_backward: input must be a CUDA tensor for the CUDA kernel");
  at::cuda::CUDAGuard device_guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  if (num_rois == 0 || grad.numel() == 0 || !(input_requires_grad || rois_requires_grad)) {
    return std::make_tuple(at::zeros(input.sizes(), input.options()), at::zeros(rois.sizes(), rois.options()));
  }
  prroi::check_batch_indices(rois, input.size(0));
  prroi::check_finite_boxes(rois, spatial_scale, aligned);
  const at::Tensor grad_ = grad.contiguous(), input_ = input.contiguous(), rois_ = rois.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_input, grad_rois;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_type));
    at::Tensor grad_rois_acc = at::zeros(rois.sizes(), rois.options().dtype(acc_type));
    if (input_requires_grad) {
      const int64_t total = grad_.numel();
      prroi_pool_backward_input_cuda<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          total, grad_.data_ptr<scalar_t>(), rois_.data_ptr<scalar_t>(), channels, height, width, pooled_height,
          pooled_width, static_cast<acc_t>(spatial_scale), aligned, grad_input_acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (rois_requires_grad) {
      const int64_t num_bins = num_rois * pooled_height * pooled_width;
      const int grid = static_cast<int>(std::min<int64_t>(num_bins, 65535 * 64));
      prroi_pool_backward_rois_cuda<scalar_t, acc_t><<<grid, kBoxThreads, 0, stream>>>(
          num_bins, grad_.data_ptr<scalar_t>(), input_.data_ptr<scalar_t>(), rois_.data_ptr<scalar_t>(), channels,
          height, width, pooled_height, pooled_width, static_cast<acc_t>(spatial_scale), aligned,
          grad_rois_acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_input = grad_input_acc.to(input.scalar_type());
    grad_rois = grad_rois_acc.to(rois.scalar_type());
  });
  return std::make_tuple(grad_input, grad_rois);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CUDA, m) {
  m.impl("prroi_pool", TORCH_FN(prroi_pool_forward_kernel));
  m.impl("_prroi_pool_backward", TORCH_FN(prroi_pool_backward_kernel));
}

}  // namespace d2_refine
