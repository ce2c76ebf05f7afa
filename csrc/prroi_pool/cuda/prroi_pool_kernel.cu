// Precise RoI Pooling, CUDA kernels (float32 / float64 / float16 / bfloat16, accumulating in float for the
// half types), two exact evaluations of a bin integral chosen per RoI as on the CPU (cpu/prroi_pool_kernel.cpp):
//  - table path, for RoIs that meet the map with bins of at least kTableMinBin cells on both sides: the CPU's one
//    (cpu/table_path.h) with the summed-area table of every image kept channels-last in double,
//    [N, H + 1, W + 1, channels of a chunk], so that consecutive threads (channels) read consecutive addresses:
//      forward: a thread per (RoI, bin corner, channel) evaluates G (9 taps, prroi_pool_corner.h), then a thread
//      per output element differences its 4 corners;
//      feature gradient: a thread per (RoI, corner, channel) scatters the corner's coefficient at its 9 taps
//      (atomicAdd in double), then one reverse 2-D cumulative sum of that table gives the feature gradient;
//      box gradient: a warp per (RoI, corner), its lanes splitting the channels, sums G, dG/dx and dG/dy times
//      the coefficient (one warp reduction, into the corner's own slot: no atomics), then a thread per RoI adds its
//      corners up in a fixed order (the gradient does not change between calls) and applies the chain rule;
//    the cost per bin does not grow with the bin's area. Channels are processed in chunks so that a table stays
//    under D2_REFINE_PRROI_TABLE_MB MiB (default 256).
//  - direct path, for the other RoIs (bins of a cell or two, where 9 taps per corner in double cost more than
//    the bin's nodes; RoIs off the map, which read nothing):
//      forward: a thread per output element sums the bin's nodes;
//      feature gradient: a thread per output element scattering into the bin's nodes with atomicAdd (into an
//      accumulation buffer of the accumulation type);
//      box gradient: a block per (RoI, bin), its threads splitting the channels, then a block reduction into the
//      bin's 4 terms, added up per RoI in bin order by a second kernel (no atomics: the same result at every call).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "prroi_pool/prroi_pool_checks.h"
#include "prroi_pool/prroi_pool_common.h"
#include "prroi_pool/prroi_pool_corner.h"
#include "prroi_pool/cuda/prroi_pool_device.cuh"

namespace d2_refine {
namespace {

using prroi::node_range;
using prroi::node_weight;
using prroi::RoIGeometry;
using prroi::device::bin_index;
using prroi::device::bin_integral;
using prroi::device::BinIndex;
using prroi::device::block_reduce_sum;
using prroi::device::horizontal_line_integral;
using prroi::device::vertical_line_integral;

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

// torchvision's grid-stride loop: thread t handles t, t + stride, ... below n (n may exceed the grid).
#define D2R_CUDA_1D_KERNEL_LOOP(i, n)                                                            \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n);      \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

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

// The table path's threshold: at a bin of 2 x 2 cells the direct path reads about 9 nodes (in T), the table
// about 12 taps per bin (4 corners of 9 taps, each shared by 4 bins, in double).
constexpr double kTableMinBin = 2.0;

// Whether the bins start .. start + bins x bin (an axis of a RoI) have a node of [0, size - 1] under them: the
// union of the bins' node ranges is the node range of their whole span (the bins are contiguous).
template <typename acc_t>
__device__ inline bool meets_axis(acc_t start, acc_t bin, int64_t bins, int64_t size) {
  const acc_t last = start + static_cast<acc_t>(bins - 1) * bin;  // the last bin's start, as the CPU's append_axis
  int64_t lo, hi;
  node_range(start, last + bin, size, &lo, &hi);
  return lo <= hi;
}

// The table path takes a RoI with bins of at least kTableMinBin cells on both sides that meets the map. A RoI none
// of whose bins meets it (the CPU's kEmpty, cpu/roi_table.h) takes the direct path, whose loops are empty there:
// exact zeros, where the differences of the table's corners would leave rounding residue in the box gradient.
template <typename acc_t>
__device__ inline bool takes_table(const RoIGeometry<acc_t>& g, int64_t height, int64_t width, int64_t pooled_height,
                                   int64_t pooled_width) {
  return g.area > acc_t(0) && ::fmin(static_cast<double>(g.bin_w), static_cast<double>(g.bin_h)) >= kTableMinBin &&
         meets_axis(g.x_start, g.bin_w, pooled_width, width) && meets_axis(g.y_start, g.bin_h, pooled_height, height);
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
    if (takes_table(g, height, width, pooled_height, pooled_width)) {
      continue;  // written by prroi_table_forward_cuda
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
    if (!(g.area > acc_t(0)) || gv == acc_t(0) || takes_table(g, height, width, pooled_height, pooled_width)) {
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

constexpr int kBoxThreads = 128;  // threads of a (RoI, bin) block, striding over the channels

// One block per (RoI, bin): its threads split the channels, each summing the bin's four edge derivatives over
// its channels; a block reduction then gives 4 atomicAdds per bin. (A thread per bin looping over all channels
// serialises C x cells loads per thread: ~100x slower at C = 256.)
template <typename scalar_t, typename acc_t>
__global__ void prroi_pool_backward_rois_cuda(int64_t num_bins, const scalar_t* grad, const scalar_t* input,
                                              const scalar_t* rois, int64_t channels, int64_t height, int64_t width,
                                              int64_t pooled_height, int64_t pooled_width, acc_t spatial_scale,
                                              bool aligned, acc_t* bin_grads) {
  __shared__ acc_t partial[kBoxThreads / 32];
  for (int64_t index = blockIdx.x; index < num_bins; index += gridDim.x) {  // uniform over the block
    const BinIndex b = bin_index(index, /*channels=*/1, pooled_height, pooled_width);
    const int64_t pw = b.pw, ph = b.ph, k = b.k;
    const RoIGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!(g.area > acc_t(0)) || height == 0 || width == 0 ||
        takes_table(g, height, width, pooled_height, pooled_width)) {
      continue;  // zero-area bins, inverted boxes and a map without cells (whose line integrals would read it):
                 // zero gradient; table RoIs: prroi_table_*_cuda (the same branch for the whole block)
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
      g_xs += gv * (g.bin_h * out - vertical_line_integral(plane, width, t_xs, y0, y1, ys, ye));
      g_xe += gv * (vertical_line_integral(plane, width, t_xe, y0, y1, ys, ye) - g.bin_h * out);
      g_ys += gv * (g.bin_w * out - horizontal_line_integral(plane, width, t_ys, x0, x1, xs, xe));
      g_ye += gv * (horizontal_line_integral(plane, width, t_ye, x0, x1, xs, xe) - g.bin_w * out);
    }
    g_xs = block_reduce_sum(g_xs, partial);
    g_xe = block_reduce_sum(g_xe, partial);
    g_ys = block_reduce_sum(g_ys, partial);
    g_ye = block_reduce_sum(g_ye, partial);
    if (threadIdx.x == 0) {
      const acc_t u = static_cast<acc_t>(pw) / pooled_width, u1 = static_cast<acc_t>(pw + 1) / pooled_width;
      const acc_t v = static_cast<acc_t>(ph) / pooled_height, v1 = static_cast<acc_t>(ph + 1) / pooled_height;
      const acc_t f = spatial_scale / g.area;
      acc_t* out = bin_grads + 4 * index;  // this bin's terms, added up per RoI by sum_bin_terms
      out[0] = f * ((acc_t(1) - u) * g_xs + (acc_t(1) - u1) * g_xe);
      out[1] = f * ((acc_t(1) - v) * g_ys + (acc_t(1) - v1) * g_ye);
      out[2] = f * (u * g_xs + u1 * g_xe);
      out[3] = f * (v * g_ys + v1 * g_ye);
    }
  }
}

// ---- table path ----------------------------------------------------------------------------------------------

// A corner's (RoI, row q, column p) and the channel within the chunk from a flat index in (R, PH + 1, PW + 1, cb)
// order.
struct CornerIndex {
  int64_t k, q, p, c;
};

__device__ inline CornerIndex corner_index(int64_t index, int64_t chunk, int64_t pooled_height,
                                           int64_t pooled_width) {
  CornerIndex r;
  r.c = index % chunk;
  index /= chunk;
  r.p = index % (pooled_width + 1);
  index /= pooled_width + 1;
  r.q = index % (pooled_height + 1);
  r.k = index / (pooled_height + 1);
  return r;
}

template <typename acc_t>
__device__ inline prroi::CornerTaps corner_taps_x(const RoIGeometry<acc_t>& g, int64_t p, int64_t width) {
  return prroi::corner_taps(static_cast<double>(g.x_start + static_cast<acc_t>(p) * g.bin_w), width);
}

template <typename acc_t>
__device__ inline prroi::CornerTaps corner_taps_y(const RoIGeometry<acc_t>& g, int64_t q, int64_t height) {
  return prroi::corner_taps(static_cast<double>(g.y_start + static_cast<acc_t>(q) * g.bin_h), height);
}

// The coefficient of G(x_p, y_q) in sum over bins of grad * (bin integral) for channel c: bin (ph, pw) adds +grad
// at corners (ph, pw) and (ph + 1, pw + 1), -grad at (ph, pw + 1) and (ph + 1, pw) (cpu/table_path.h,
// corner_coefficients). grad is channels-last, [R, PH, PW, C].
template <typename scalar_t>
__device__ inline double corner_coefficient(const scalar_t* grad, int64_t k, int64_t q, int64_t p, int64_t c,
                                            int64_t channels, int64_t pooled_height, int64_t pooled_width) {
  const scalar_t* g = grad + k * pooled_height * pooled_width * channels + c;
  double v = 0;
  if (q < pooled_height && p < pooled_width) v += static_cast<double>(g[(q * pooled_width + p) * channels]);
  if (q < pooled_height && p > 0) v -= static_cast<double>(g[(q * pooled_width + p - 1) * channels]);
  if (q > 0 && p < pooled_width) v -= static_cast<double>(g[((q - 1) * pooled_width + p) * channels]);
  if (q > 0 && p > 0) v += static_cast<double>(g[((q - 1) * pooled_width + p - 1) * channels]);
  return v;
}

// corner[k][q][p][c] = G(x_p, y_q) of channel c0 + c for the table RoIs (the others are left unwritten).
template <typename scalar_t, typename acc_t>
__global__ void prroi_table_corners_cuda(int64_t total, const double* table, const scalar_t* rois, int64_t chunk,
                                         int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                                         acc_t spatial_scale, bool aligned, double* corner) {
  D2R_CUDA_1D_KERNEL_LOOP(index, total) {
    const CornerIndex ci = corner_index(index, chunk, pooled_height, pooled_width);
    const RoIGeometry<acc_t> g = load_geometry(rois, ci.k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!takes_table(g, height, width, pooled_height, pooled_width)) {
      continue;
    }
    const int64_t batch = static_cast<int64_t>(static_cast<acc_t>(rois[5 * ci.k]));
    const prroi::CornerTaps tx = corner_taps_x(g, ci.p, width), ty = corner_taps_y(g, ci.q, height);
    const double* s = table + batch * (height + 1) * (width + 1) * chunk + ci.c;
    double v = 0;
#pragma unroll
    for (int r = 0; r < 3; ++r) {
      const double* row = s + ty.idx[r] * (width + 1) * chunk;
      v += ty.w[r] * (tx.w[0] * row[tx.idx[0] * chunk] + tx.w[1] * row[tx.idx[1] * chunk] +
                      tx.w[2] * row[tx.idx[2] * chunk]);
    }
    corner[index] = v;
  }
}

// output[k][c0 + c][ph][pw] for the table RoIs: the difference of the bin's 4 corners over the area.
template <typename scalar_t, typename acc_t>
__global__ void prroi_table_forward_cuda(int64_t total, const double* corner, const scalar_t* rois, int64_t c0,
                                         int64_t chunk, int64_t channels, int64_t height, int64_t width,
                                         int64_t pooled_height, int64_t pooled_width, acc_t spatial_scale, bool aligned,
                                         scalar_t* output) {
  D2R_CUDA_1D_KERNEL_LOOP(index, total) {
    const BinIndex b = bin_index(index, chunk, pooled_height, pooled_width);
    const RoIGeometry<acc_t> g = load_geometry(rois, b.k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!takes_table(g, height, width, pooled_height, pooled_width)) {
      continue;
    }
    const int64_t row = (pooled_width + 1) * chunk;
    const double* a = corner + ((b.k * (pooled_height + 1) + b.ph) * (pooled_width + 1) + b.pw) * chunk + b.c;
    const double v = (a[row + chunk] - a[row]) - (a[chunk] - a[0]);
    output[((b.k * channels + c0 + b.c) * pooled_height + b.ph) * pooled_width + b.pw] =
        static_cast<scalar_t>(v * (1.0 / static_cast<double>(g.area)));
  }
}

// ds[n][tap y][tap x][c] += coefficient / area x the tap weights (cpu/table_path.h, table_backward_input).
template <typename scalar_t, typename acc_t>
__global__ void prroi_table_backward_input_cuda(int64_t total, const scalar_t* grad, const scalar_t* rois,
                                                int64_t c0, int64_t chunk, int64_t channels, int64_t height,
                                                int64_t width, int64_t pooled_height, int64_t pooled_width,
                                                acc_t spatial_scale, bool aligned, double* ds) {
  D2R_CUDA_1D_KERNEL_LOOP(index, total) {
    const CornerIndex ci = corner_index(index, chunk, pooled_height, pooled_width);
    const RoIGeometry<acc_t> g = load_geometry(rois, ci.k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!takes_table(g, height, width, pooled_height, pooled_width)) {
      continue;
    }
    const double cf = corner_coefficient(grad, ci.k, ci.q, ci.p, c0 + ci.c, channels, pooled_height,
                                         pooled_width) / static_cast<double>(g.area);
    if (cf == 0.0) {
      continue;
    }
    const int64_t batch = static_cast<int64_t>(static_cast<acc_t>(rois[5 * ci.k]));
    const prroi::CornerTaps tx = corner_taps_x(g, ci.p, width), ty = corner_taps_y(g, ci.q, height);
    double* s = ds + batch * (height + 1) * (width + 1) * chunk + ci.c;
#pragma unroll
    for (int r = 0; r < 3; ++r) {
      double* row = s + ty.idx[r] * (width + 1) * chunk;
      const double wr = ty.w[r] * cf;
#pragma unroll
      for (int u = 0; u < 3; ++u) {
        gpuAtomicAdd(row + tx.idx[u] * chunk, wr * tx.w[u]);
      }
    }
  }
}

constexpr int kCornerThreads = 256;  // 8 warps, a warp per (RoI, corner)

// sums[k][q][p] += (coefficient x G, coefficient x dG/dx, coefficient x dG/dy) of corner (x_p, y_q), summed over
// the chunk's channels (cpu/table_path.h, table_backward_rois). Each corner is written by one warp only (the chunks
// run one after another on the stream), without atomics: the box gradient then adds the corners up in a fixed
// order, so that it does not change from one call to the next (gradcheck's reentrancy check).
template <typename scalar_t, typename acc_t>
__global__ void prroi_table_backward_rois_cuda(int64_t num_corners, const scalar_t* grad, const double* table,
                                               const scalar_t* rois, int64_t c0, int64_t chunk, int64_t channels,
                                               int64_t height, int64_t width, int64_t pooled_height,
                                               int64_t pooled_width, acc_t spatial_scale, bool aligned,
                                               double* sums) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x >> 5;
  for (int64_t index = blockIdx.x * warps + (threadIdx.x >> 5); index < num_corners;
       index += static_cast<int64_t>(gridDim.x) * warps) {  // uniform over the warp
    const CornerIndex ci = corner_index(index, /*chunk=*/1, pooled_height, pooled_width);
    const RoIGeometry<acc_t> g = load_geometry(rois, ci.k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!takes_table(g, height, width, pooled_height, pooled_width)) {
      continue;
    }
    const int64_t batch = static_cast<int64_t>(static_cast<acc_t>(rois[5 * ci.k]));
    const prroi::CornerTaps tx = corner_taps_x(g, ci.p, width), ty = corner_taps_y(g, ci.q, height);
    const double* s = table + batch * (height + 1) * (width + 1) * chunk;
    double gv = 0, gx = 0, gy = 0;
    for (int64_t c = lane; c < chunk; c += 32) {
      const double cf = corner_coefficient(grad, ci.k, ci.q, ci.p, c0 + c, channels, pooled_height, pooled_width);
      if (cf == 0.0) {
        continue;
      }
#pragma unroll
      for (int r = 0; r < 3; ++r) {
        const double* row = s + ty.idx[r] * (width + 1) * chunk + c;
        const double d0 = cf * row[tx.idx[0] * chunk], d1 = cf * row[tx.idx[1] * chunk],
                     d2 = cf * row[tx.idx[2] * chunk];
        const double along = tx.w[0] * d0 + tx.w[1] * d1 + tx.w[2] * d2;
        gv += ty.w[r] * along;
        gy += ty.dw[r] * along;
        gx += ty.w[r] * (tx.dw[0] * d0 + tx.dw[1] * d1 + tx.dw[2] * d2);
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      gv += __shfl_down_sync(0xffffffffu, gv, offset);
      gx += __shfl_down_sync(0xffffffffu, gx, offset);
      gy += __shfl_down_sync(0xffffffffu, gy, offset);
    }
    if (lane == 0) {
      double* out = sums + 3 * index;
      out[0] += gv;
      out[1] += gx;
      out[2] += gy;
    }
  }
}

// The box gradient of the table RoIs from their corners' sums (cpu/prroi_pool_kernel.cpp, backward_impl): L = J / A
// with J the sum over the corners, corners x_p = x1' + p (x2' - x1') / PW and A = bin_w bin_h.
template <typename scalar_t, typename acc_t>
__global__ void prroi_table_box_gradient_cuda(int64_t num_rois, const double* sums, const scalar_t* rois,
                                              int64_t height, int64_t width, int64_t pooled_height,
                                              int64_t pooled_width, acc_t spatial_scale, bool aligned,
                                              acc_t* grad_rois) {
  D2R_CUDA_1D_KERNEL_LOOP(k, num_rois) {
    const RoIGeometry<acc_t> g = load_geometry(rois, k, spatial_scale, aligned, pooled_height, pooled_width);
    if (!takes_table(g, height, width, pooled_height, pooled_width)) {
      continue;
    }
    const double* s = sums + 3 * k * (pooled_height + 1) * (pooled_width + 1);
    const double area = static_cast<double>(g.area);
    double sum_g = 0, gx1 = 0, gx2 = 0, gy1 = 0, gy2 = 0;
    for (int64_t q = 0; q <= pooled_height; ++q) {
      const double v = static_cast<double>(q) / pooled_height;
      for (int64_t p = 0; p <= pooled_width; ++p, s += 3) {
        const double u = static_cast<double>(p) / pooled_width;
        sum_g += s[0];
        gx1 += (1 - u) * s[1];
        gx2 += u * s[1];
        gy1 += (1 - v) * s[2];
        gy2 += v * s[2];
      }
    }
    const double j = sum_g / area;
    gx1 += j * static_cast<double>(g.bin_h) / pooled_width;
    gx2 -= j * static_cast<double>(g.bin_h) / pooled_width;
    gy1 += j * static_cast<double>(g.bin_w) / pooled_height;
    gy2 -= j * static_cast<double>(g.bin_w) / pooled_height;
    const double f = static_cast<double>(spatial_scale) / area;
    grad_rois[5 * k + 1] = static_cast<acc_t>(gx1 * f);
    grad_rois[5 * k + 2] = static_cast<acc_t>(gy1 * f);
    grad_rois[5 * k + 3] = static_cast<acc_t>(gx2 * f);
    grad_rois[5 * k + 4] = static_cast<acc_t>(gy2 * f);
  }
}

// Channels per table chunk: the table [N, H + 1, W + 1, chunk] in double, and `extra` more doubles per channel (the
// forward's corner values), under D2_REFINE_PRROI_TABLE_MB MiB.
int64_t table_chunk(int64_t num_images, int64_t height, int64_t width, int64_t channels, int64_t extra = 0) {
  double mib = 256.0;
  if (const char* env = std::getenv("D2_REFINE_PRROI_TABLE_MB")) {
    const double v = std::atof(env);
    if (v > 0) {
      mib = v;
    }
  }
  const double per_channel =
      (static_cast<double>(num_images) * (height + 1) * (width + 1) + static_cast<double>(extra)) * sizeof(double);
  const int64_t chunk = static_cast<int64_t>(mib * 1024.0 * 1024.0 / per_channel);
  return std::max<int64_t>(1, std::min<int64_t>(chunk, channels));
}

// The summed-area table of channels [c0, c0 + chunk): [N, H + 1, W + 1, chunk] in double, zero row and column 0.
at::Tensor build_table(const at::Tensor& input, int64_t c0, int64_t chunk) {
  const int64_t n = input.size(0), height = input.size(2), width = input.size(3);
  at::Tensor s = at::zeros({n, height + 1, width + 1, chunk}, input.options().dtype(at::kDouble));
  const at::Tensor f = input.narrow(1, c0, chunk).permute({0, 2, 3, 1}).to(at::kDouble);
  s.narrow(1, 1, height).narrow(2, 1, width).copy_(f.cumsum(1).cumsum(2));
  return s;
}

at::Tensor prroi_pool_forward_kernel(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                     int64_t pooled_height, int64_t pooled_width, bool aligned) {
  prroi::check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  TORCH_CHECK(input.is_cuda(), "prroi_pool: input must be a CUDA tensor for the CUDA kernel");
  at::cuda::CUDAGuard device_guard(input.device());
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  at::Tensor output = at::zeros({num_rois, channels, pooled_height, pooled_width}, input.options());
  prroi::check_finite_boxes(rois, spatial_scale, aligned);  // also without RoIs or channels, as on the CPU
  if (output.numel() == 0) {
    return output;
  }
  prroi::check_batch_indices(rois, input.size(0));
  const at::Tensor input_ = input.contiguous(), rois_ = rois.contiguous();
  const int64_t total = output.numel();
  const int64_t corners = num_rois * (pooled_height + 1) * (pooled_width + 1);
  const int64_t chunk = table_chunk(input.size(0), height, width, channels, corners);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(spatial_scale);
    for (int64_t c0 = 0; c0 < channels; c0 += chunk) {
      const int64_t cb = std::min(chunk, channels - c0);
      const at::Tensor table = build_table(input_, c0, cb);
      at::Tensor corner = at::empty({corners * cb}, input.options().dtype(at::kDouble));
      prroi_table_corners_cuda<scalar_t, acc_t><<<blocks_for(corners * cb), kThreads, 0, stream>>>(
          corners * cb, table.data_ptr<double>(), rois_.data_ptr<scalar_t>(), cb, height, width, pooled_height,
          pooled_width, scale, aligned, corner.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t outputs = num_rois * cb * pooled_height * pooled_width;
      prroi_table_forward_cuda<scalar_t, acc_t><<<blocks_for(outputs), kThreads, 0, stream>>>(
          outputs, corner.data_ptr<double>(), rois_.data_ptr<scalar_t>(), c0, cb, channels, height, width,
          pooled_height, pooled_width, scale, aligned, output.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    prroi_pool_forward_cuda<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        total, input_.data_ptr<scalar_t>(), rois_.data_ptr<scalar_t>(), channels, height, width, pooled_height,
        pooled_width, scale, aligned, output.data_ptr<scalar_t>());
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
  prroi::check_finite_boxes(rois, spatial_scale, aligned);  // also without RoIs or channels, as on the CPU
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  if (num_rois == 0 || grad.numel() == 0 || !(input_requires_grad || rois_requires_grad)) {
    return std::make_tuple(at::zeros(input.sizes(), input.options()), at::zeros(rois.sizes(), rois.options()));
  }
  prroi::check_batch_indices(rois, input.size(0));
  if (input_requires_grad) {  // the feature gradient is scattered with atomics (the box gradient is deterministic)
    at::globalContext().alertNotDeterministic("prroi_pool_backward_cuda (feature gradient)");
  }
  const at::Tensor grad_ = grad.contiguous(), input_ = input.contiguous(), rois_ = rois.contiguous();
  const at::Tensor grad_last = grad.permute({0, 2, 3, 1}).contiguous();  // [R, PH, PW, C] for the table path
  const int64_t corners = num_rois * (pooled_height + 1) * (pooled_width + 1);
  const int64_t chunk = table_chunk(input.size(0), height, width, channels);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad_input, grad_rois;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "prroi_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(spatial_scale);
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_type));
    at::Tensor grad_rois_acc = at::zeros(rois.sizes(), rois.options().dtype(acc_type));
    at::Tensor sums = at::zeros({corners, 3}, input.options().dtype(at::kDouble));
    for (int64_t c0 = 0; c0 < channels; c0 += chunk) {
      const int64_t cb = std::min(chunk, channels - c0);
      if (input_requires_grad) {
        at::Tensor ds = at::zeros({input.size(0), height + 1, width + 1, cb}, input.options().dtype(at::kDouble));
        prroi_table_backward_input_cuda<scalar_t, acc_t><<<blocks_for(corners * cb), kThreads, 0, stream>>>(
            corners * cb, grad_last.data_ptr<scalar_t>(), rois_.data_ptr<scalar_t>(), c0, cb, channels, height,
            width, pooled_height, pooled_width, scale, aligned, ds.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // grad F[i][j] = sum over p > i, q > j of ds[p][q]: a reverse 2-D cumulative sum
        const at::Tensor inner = ds.narrow(1, 1, height).narrow(2, 1, width).flip({1, 2});
        const at::Tensor df = inner.cumsum(1).cumsum(2).flip({1, 2});
        grad_input_acc.narrow(1, c0, cb).add_(df.permute({0, 3, 1, 2}));
      }
      if (rois_requires_grad) {
        const at::Tensor table = build_table(input_, c0, cb);
        const int warps = kCornerThreads / 32;
        const int grid = static_cast<int>(std::min<int64_t>((corners + warps - 1) / warps, 65535 * 64));
        prroi_table_backward_rois_cuda<scalar_t, acc_t><<<grid, kCornerThreads, 0, stream>>>(
            corners, grad_last.data_ptr<scalar_t>(), table.data_ptr<double>(), rois_.data_ptr<scalar_t>(), c0, cb,
            channels, height, width, pooled_height, pooled_width, scale, aligned, sums.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (input_requires_grad) {
      const int64_t total = grad_.numel();
      prroi_pool_backward_input_cuda<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          total, grad_.data_ptr<scalar_t>(), rois_.data_ptr<scalar_t>(), channels, height, width, pooled_height,
          pooled_width, scale, aligned, grad_input_acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (rois_requires_grad) {
      prroi_table_box_gradient_cuda<scalar_t, acc_t><<<blocks_for(num_rois), kThreads, 0, stream>>>(
          num_rois, sums.data_ptr<double>(), rois_.data_ptr<scalar_t>(), height, width, pooled_height,
          pooled_width, scale, aligned, grad_rois_acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t num_bins = num_rois * pooled_height * pooled_width;
      const int grid = static_cast<int>(std::min<int64_t>(num_bins, 65535 * 64));
      at::Tensor bin_grads = at::zeros({num_bins, 4}, input.options().dtype(acc_type));
      prroi_pool_backward_rois_cuda<scalar_t, acc_t><<<grid, kBoxThreads, 0, stream>>>(
          num_bins, grad_.data_ptr<scalar_t>(), input_.data_ptr<scalar_t>(), rois_.data_ptr<scalar_t>(), channels,
          height, width, pooled_height, pooled_width, scale, aligned, bin_grads.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // the direct RoIs' gradient (the table RoIs' bins hold zeros: their gradient, written above, stays)
      prroi::device::sum_bin_terms<acc_t><<<blocks_for(num_rois), kThreads, 0, stream>>>(
          num_rois, pooled_height * pooled_width, bin_grads.data_ptr<acc_t>(), 5, 1, grad_rois_acc.data_ptr<acc_t>());
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
