// Device-side integrals of Precise RoI Pooling over one feature plane (the geometry is in prroi_pool_common.h):
// the bin integral (forward) and the line integrals along the bin edges (gradient w.r.t. the box), and a block
// sum, shared by the single-level (csrc/prroi_pool/cuda) and multi-level (csrc/multilevel_prroi_pool/cuda) kernels.
#pragma once

#include "prroi_pool/prroi_pool_common.h"

namespace d2_refine {
namespace prroi {
namespace device {

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

// Integral along the vertical line with taps tx over the rows [y0, y1], weighted for [ys, ye].
template <typename scalar_t, typename acc_t>
__device__ inline acc_t vertical_line_integral(const scalar_t* plane, int64_t width, const Taps<acc_t>& tx,
                                               int64_t y0, int64_t y1, acc_t ys, acc_t ye) {
  acc_t sum = 0;
  for (int64_t i = y0; i <= y1; ++i) {
    const scalar_t* row = plane + i * width;
    sum += node_weight(ys, ye, i) * (tx.w0 * static_cast<acc_t>(row[tx.k0]) + tx.w1 * static_cast<acc_t>(row[tx.k1]));
  }
  return sum;
}

// Integral along the horizontal line with taps ty over the columns [x0, x1], weighted for [xs, xe].
template <typename scalar_t, typename acc_t>
__device__ inline acc_t horizontal_line_integral(const scalar_t* plane, int64_t width, const Taps<acc_t>& ty,
                                                 int64_t x0, int64_t x1, acc_t xs, acc_t xe) {
  const scalar_t* r0 = plane + ty.k0 * width;
  const scalar_t* r1 = plane + ty.k1 * width;
  acc_t sum = 0;
  for (int64_t j = x0; j <= x1; ++j) {
    sum += node_weight(xs, xe, j) * (ty.w0 * static_cast<acc_t>(r0[j]) + ty.w1 * static_cast<acc_t>(r1[j]));
  }
  return sum;
}

// Sum of v over a block of a multiple of 32 threads (at most 1024), valid in thread 0; `shared` holds one value
// per warp and may be reused at once (the trailing barrier).
template <typename T>
__device__ inline T block_reduce_sum(T v, T* shared) {
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

// grad[k * stride + offset + t] += the sum over the bins of box k of bin_grads[k][bin][t], t = 0..3, in bin order:
// the direct box-gradient kernels write one term per (box, bin) instead of adding them atomically, so that the box
// gradient is the same at every call (atomic sums come in any order).
template <typename acc_t>
__global__ void sum_bin_terms(int64_t num_boxes, int64_t bins, const acc_t* bin_grads, int64_t stride,
                              int64_t offset, acc_t* grad) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < num_boxes;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const acc_t* terms = bin_grads + 4 * k * bins;
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t b = 0; b < bins; ++b, terms += 4) {
      s0 += terms[0];
      s1 += terms[1];
      s2 += terms[2];
      s3 += terms[3];
    }
    acc_t* out = grad + k * stride + offset;
    out[0] += s0;
    out[1] += s1;
    out[2] += s2;
    out[3] += s3;
  }
}

}  // namespace device
}  // namespace prroi
}  // namespace d2_refine
