// Precise RoI Pooling, CPU kernels: the direct path, for RoIs whose bins span a few cells. A bin integral is the
// sum over the bin's nodes of wy(i) wx(j) F[i, j] (node weights of prroi_pool_common.h), O(bin area).
#pragma once

#include <cstdint>
#include <vector>

#include "prroi_pool/cpu/channel_block.h"
#include "prroi_pool/cpu/roi_table.h"

namespace d2_refine {
namespace prroi {
namespace cpu {

// sum[0:kBlock] = integral of bin (ph, pw) of RoI k over the block.
template <typename T>
inline void direct_bin_integral(const T* f, const RoITable<T>& t, int64_t k, int64_t ph, int64_t pw, const Dims& d,
                                T* sum) {
  const int64_t by = k * d.ph + ph, bx = k * d.pw + pw;
  const int64_t ny = t.y.count(by), y0 = t.y.lo[by], nx = t.x.count(bx), x0 = t.x.lo[bx];
  const T* wy = t.y.weights(by);
  const T* wx = t.x.weights(bx);
  for (int64_t c = 0; c < kBlock; ++c) {
    sum[c] = T(0);
  }
  for (int64_t ii = 0; ii < ny; ++ii) {
    const T* row = f + ((y0 + ii) * d.width + x0) * kBlock;
    T rs[kBlock] = {};
    for (int64_t jj = 0; jj < nx; ++jj) {
      axpy_block(wx[jj], row + jj * kBlock, rs);
    }
    axpy_block(wy[ii], rs, sum);
  }
}

template <typename T>
void direct_forward(const T* f, const RoITable<T>& t, int64_t k, const Dims& d, int64_t c0, int64_t cb, T* output) {
  const T inv = T(1) / t.geom[k].area;
  T* out = output + (k * d.channels + c0) * d.ph * d.pw;
  for (int64_t ph = 0; ph < d.ph; ++ph) {
    for (int64_t pw = 0; pw < d.pw; ++pw) {
      T sum[kBlock];
      direct_bin_integral(f, t, k, ph, pw, d, sum);
      for (int64_t c = 0; c < cb; ++c) {
        out[c * d.ph * d.pw + ph * d.pw + pw] = sum[c] * inv;
      }
    }
  }
}

// df += the transpose of the forward for RoI k; g: [PH PW][kBlock] upstream gradient.
template <typename T>
void direct_backward_input(const double* g, const RoITable<T>& t, int64_t k, const Dims& d, T* df) {
  const double inv = 1.0 / static_cast<double>(t.geom[k].area);
  for (int64_t ph = 0; ph < d.ph; ++ph) {
    const int64_t by = k * d.ph + ph;
    const int64_t ny = t.y.count(by), y0 = t.y.lo[by];
    const T* wy = t.y.weights(by);
    for (int64_t pw = 0; pw < d.pw; ++pw) {
      const int64_t bx = k * d.pw + pw;
      const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
      const T* wx = t.x.weights(bx);
      const double* gb = g + (ph * d.pw + pw) * kBlock;
      for (int64_t ii = 0; ii < ny; ++ii) {
        T gy[kBlock];
        for (int64_t c = 0; c < kBlock; ++c) {
          gy[c] = static_cast<T>(gb[c] * inv) * wy[ii];
        }
        T* row = df + ((y0 + ii) * d.width + x0) * kBlock;
        for (int64_t jj = 0; jj < nx; ++jj) {
          axpy_block(wx[jj], gy, row + jj * kBlock);
        }
      }
    }
  }
}

// acc[0 .. 2 PW + 2 PH) += sum over the block's channels of the bin-edge gradients of the closed form:
// g_xs[pw], g_xe[pw], g_ys[ph], g_ye[ph] (before the division by the area and the chain to the box). Every term
// is linear in the map, so the channels are reduced first: h[i][j] = sum_c g_c F_c[i][j] over the bin's nodes
// (which hold the line integrals' taps too), then the integral and the four line integrals are scalar sums of h.
// h: scratch of at least (nodes of the largest bin) doubles.
template <typename T>
void direct_backward_rois(const double* g, const T* f, const RoITable<T>& t, int64_t k, const Dims& d, double* acc,
                          std::vector<double>& h) {
  const RoIGeometry<T> geo = t.geom[k];
  double* g_xs = acc;
  double* g_xe = acc + d.pw;
  double* g_ys = acc + 2 * d.pw;
  double* g_ye = acc + 2 * d.pw + d.ph;
  const double inv_area = 1.0 / static_cast<double>(geo.area);
  const double bh = static_cast<double>(geo.bin_h), bw = static_cast<double>(geo.bin_w);
  for (int64_t ph = 0; ph < d.ph; ++ph) {
    const int64_t by = k * d.ph + ph;
    const int64_t ny = t.y.count(by), y0 = t.y.lo[by];
    const T* wy = t.y.weights(by);
    const Taps<T>& ys = t.y_taps[by * 2];
    const Taps<T>& ye = t.y_taps[by * 2 + 1];
    for (int64_t pw = 0; pw < d.pw; ++pw) {
      const int64_t bx = k * d.pw + pw;
      const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
      const T* wx = t.x.weights(bx);
      if (nx == 0 || ny == 0) {
        continue;  // the bin misses the map: every term is zero
      }
      const Taps<T>& xs = t.x_taps[bx * 2];
      const Taps<T>& xe = t.x_taps[bx * 2 + 1];
      const double* gb = g + (ph * d.pw + pw) * kBlock;
      ensure(h, static_cast<size_t>(nx * ny));
      double* hv = h.data();
      for (int64_t ii = 0; ii < ny; ++ii) {
        const T* row = f + ((y0 + ii) * d.width + x0) * kBlock;
        for (int64_t jj = 0; jj < nx; ++jj) {
          hv[ii * nx + jj] = dot_block(gb, row + jj * kBlock);
        }
      }
      // h at node (y0 + ii, column j); a line tap off the bin's nodes has weight 0 (line_taps' index 0)
      const auto at_col = [&](int64_t ii, int64_t j) {
        return j >= x0 && j < x0 + nx ? hv[ii * nx + (j - x0)] : 0.0;
      };
      const auto at_row = [&](int64_t i, int64_t jj) {
        return i >= y0 && i < y0 + ny ? hv[(i - y0) * nx + jj] : 0.0;
      };
      // g . (bin integral), g . Lx(xs), g . Lx(xe): Lx(x) = sum_i wy(i) f(x, i)
      double g_int = 0, g_lxs = 0, g_lxe = 0;
      for (int64_t ii = 0; ii < ny; ++ii) {
        double along = 0;
        for (int64_t jj = 0; jj < nx; ++jj) {
          along += static_cast<double>(wx[jj]) * hv[ii * nx + jj];
        }
        const double w = static_cast<double>(wy[ii]);
        g_int += w * along;
        g_lxs += w * (static_cast<double>(xs.w0) * at_col(ii, xs.k0) + static_cast<double>(xs.w1) * at_col(ii, xs.k1));
        g_lxe += w * (static_cast<double>(xe.w0) * at_col(ii, xe.k0) + static_cast<double>(xe.w1) * at_col(ii, xe.k1));
      }
      // g . Ly(ys), g . Ly(ye): Ly(y) = sum_j wx(j) f(j, y)
      double g_lys = 0, g_lye = 0;
      for (int64_t jj = 0; jj < nx; ++jj) {
        const double w = static_cast<double>(wx[jj]);
        g_lys += w * (static_cast<double>(ys.w0) * at_row(ys.k0, jj) + static_cast<double>(ys.w1) * at_row(ys.k1, jj));
        g_lye += w * (static_cast<double>(ye.w0) * at_row(ye.k0, jj) + static_cast<double>(ye.w1) * at_row(ye.k1, jj));
      }
      // sum_c g (h O - Lx(xs)) with O = integral / A, etc.
      const double g_out = g_int * inv_area;
      g_xs[pw] += bh * g_out - g_lxs;
      g_xe[pw] += g_lxe - bh * g_out;
      g_ys[ph] += bw * g_out - g_lys;
      g_ye[ph] += g_lye - bw * g_out;
    }
  }
}

}  // namespace cpu
}  // namespace prroi
}  // namespace d2_refine
