// Geometry shared by the CPU and CUDA kernels of Precise RoI Pooling (IoU-Net paper, Jiang et al.,
// ECCV 2018, "Precise RoI Pooling"; official code vacancy/PreciseRoIPooling, src/prroi_pooling_gpu_impl.cu).
//
// The feature map F (H x W) defines the continuous map f(x, y) = sum_ij hat(x - j) hat(y - i) F[i, j] with
// hat(d) = max(0, 1 - |d|), F = 0 off the map. f is separable, so the integral of f over a bin
// [xs, xe] x [ys, ye] is sum_ij wy(i) wx(j) F[i, j], where wx(j) = integral of hat(x - j) over [xs, xe] is the
// "node weight" below. It is the sum of the per-cell terms of the exact integral: P(a0, a1) from cell j (local weight 1 - a)
// and Q(b0, b1) from cell j - 1 (local weight b). Only nodes j in [floor(xs), ceil(xe)] can be non-zero.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace d2_refine {
namespace prroi {

template <typename T>
C10_HOST_DEVICE inline T clamp01(T v) {
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

// Integral of hat(x - j) over [s, e] (s <= e), written with the local-cell primitives
// P(a0, a1) = (a1 - a1^2/2) - (a0 - a0^2/2) and Q(a0, a1) = (a1^2 - a0^2)/2 in factored (cancellation-free) form.
template <typename T>
C10_HOST_DEVICE inline T node_weight(T s, T e, int64_t j) {
  const T jj = static_cast<T>(j);
  const T a0 = clamp01(s - jj), a1 = clamp01(e - jj);  // cell [j, j+1]: weight 1 - a
  const T b0 = clamp01(s - jj + T(1)), b1 = clamp01(e - jj + T(1));  // cell [j-1, j]: weight b
  return (a1 - a0) * (T(1) - (a0 + a1) * T(0.5)) + (b1 - b0) * (b0 + b1) * T(0.5);
}

// First and last node (inclusive) of [0, size - 1] with a possibly non-zero weight over [s, e]; lo > hi when
// none. fmax/fmin keep NaN coordinates from producing out-of-range indices.
template <typename T>
C10_HOST_DEVICE inline void node_range(T s, T e, int64_t size, int64_t* lo, int64_t* hi) {
  const double l = ::fmin(::fmax(::floor(static_cast<double>(s)), 0.0), static_cast<double>(size));
  const double h = ::fmax(::fmin(::ceil(static_cast<double>(e)), static_cast<double>(size - 1)), -1.0);
  *lo = static_cast<int64_t>(l);
  *hi = static_cast<int64_t>(h);
}

// Linear interpolation taps of f along one axis at coordinate x: value = w0 * F[k0] + w1 * F[k0 + 1], with taps
// off [0, size - 1] given weight 0 (and index 0, so they can be read safely).
template <typename T>
struct Taps {
  int64_t k0, k1;
  T w0, w1;
};

template <typename T>
C10_HOST_DEVICE inline Taps<T> line_taps(T x, int64_t size) {
  Taps<T> t{0, 0, T(0), T(0)};
  const double fx = ::floor(static_cast<double>(x));
  if (!(fx >= -1.0 && fx <= static_cast<double>(size - 1))) {
    return t;  // both taps off the map (or NaN)
  }
  const int64_t k = static_cast<int64_t>(fx);
  const T frac = x - static_cast<T>(k);
  if (k >= 0) {
    t.k0 = k;
    t.w0 = T(1) - frac;
  }
  if (k + 1 <= size - 1) {
    t.k1 = k + 1;
    t.w1 = frac;
  }
  return t;
}

// One RoI in feature coordinates: start/end after scaling (and the -0.5 shift when aligned), bin sizes.
template <typename T>
struct RoIGeometry {
  T x_start, y_start, bin_w, bin_h, area;
};

template <typename T>
C10_HOST_DEVICE inline RoIGeometry<T> roi_geometry(const T* roi, T spatial_scale, bool aligned,
                                                   int64_t pooled_height, int64_t pooled_width) {
  const T offset = aligned ? T(0.5) : T(0);
  RoIGeometry<T> g;
  g.x_start = roi[1] * spatial_scale - offset;
  g.y_start = roi[2] * spatial_scale - offset;
  const T x_end = roi[3] * spatial_scale - offset;
  const T y_end = roi[4] * spatial_scale - offset;
  const T w = x_end - g.x_start, h = y_end - g.y_start;
  g.bin_w = (w > T(0) ? w : T(0)) / static_cast<T>(pooled_width);
  g.bin_h = (h > T(0) ? h : T(0)) / static_cast<T>(pooled_height);
  g.area = g.bin_w * g.bin_h;
  return g;
}

}  // namespace prroi
}  // namespace d2_refine
