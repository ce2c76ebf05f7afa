// Precise RoI Pooling, CPU kernels: the table path, for RoIs whose bins are large. A bin is
// G(xe, ye) - G(xs, ye) - G(xe, ys) + G(xs, ys) (G: roi_table.h), 9 taps of the summed-area table per bin corner
// whatever the bin size, the (PH + 1) x (PW + 1) corners of a RoI being shared by its bins. The feature gradient is
// the transpose (the upstream gradients scattered at the corners' taps, then one reverse 2-D cumulative sum, in
// write_block_gradient); the box gradient differentiates G (dG/dx = the same taps with da_t/dx), summed over
// channels by dot products at the taps.
#pragma once

#include <algorithm>
#include <cstdint>

#include "prroi_pool/cpu/channel_block.h"
#include "prroi_pool/cpu/roi_table.h"

namespace d2_refine {
namespace prroi {
namespace cpu {

// corner[(q (PW + 1) + p) kBlock + c] = G(x_p, y_q) for the block's channels.
template <typename T>
void table_corners(const double* s, const RoITable<T>& t, int64_t k, const Dims& d, double* corner) {
  const int64_t stride = (d.width + 1) * kBlock;
  const CornerTaps* cx = t.cx.data() + k * (d.pw + 1);
  const CornerTaps* cy = t.cy.data() + k * (d.ph + 1);
  for (int64_t q = 0; q <= d.ph; ++q) {
    const CornerTaps& ty = cy[q];
    const double* r0 = s + ty.idx[0] * stride;
    const double* r1 = s + ty.idx[1] * stride;
    const double* r2 = s + ty.idx[2] * stride;
    for (int64_t p = 0; p <= d.pw; ++p) {
      const CornerTaps& tx = cx[p];
      double acc[kBlock] = {};
      for (int u = 0; u < 3; ++u) {
        const int64_t o = tx.idx[u] * kBlock;
        axpy_block(ty.w[0] * tx.w[u], r0 + o, acc);
        axpy_block(ty.w[1] * tx.w[u], r1 + o, acc);
        axpy_block(ty.w[2] * tx.w[u], r2 + o, acc);
      }
      std::copy(acc, acc + kBlock, corner + (q * (d.pw + 1) + p) * kBlock);
    }
  }
}

template <typename T>
void table_forward(const double* s, const RoITable<T>& t, int64_t k, const Dims& d, int64_t c0, int64_t cb,
                   double* corner, T* output) {
  table_corners(s, t, k, d, corner);
  const double inv = 1.0 / static_cast<double>(t.geom[k].area);
  T* out = output + (k * d.channels + c0) * d.ph * d.pw;
  for (int64_t ph = 0; ph < d.ph; ++ph) {
    const double* g0 = corner + ph * (d.pw + 1) * kBlock;
    const double* g1 = g0 + (d.pw + 1) * kBlock;
    for (int64_t pw = 0; pw < d.pw; ++pw) {
      const double* a = g0 + pw * kBlock;  // (ph, pw), (ph, pw + 1), (ph + 1, pw), (ph + 1, pw + 1)
      const double* b = a + kBlock;
      const double* c = g1 + pw * kBlock;
      const double* e = c + kBlock;
      for (int64_t ch = 0; ch < cb; ++ch) {
        const double v = (e[ch] - c[ch]) - (b[ch] - a[ch]);
        out[ch * d.ph * d.pw + ph * d.pw + pw] = static_cast<T>(v * inv);
      }
    }
  }
}

// corner[(q, p)] = the coefficient of G(x_p, y_q) in sum over bins of g * (bin integral): bin (ph, pw) adds +g at
// (ph, pw) and (ph + 1, pw + 1), -g at (ph, pw + 1) and (ph + 1, pw).
inline void corner_coefficients(const double* g, const Dims& d, double* corner) {
  for (int64_t q = 0; q <= d.ph; ++q) {
    for (int64_t p = 0; p <= d.pw; ++p) {
      double* out = corner + (q * (d.pw + 1) + p) * kBlock;
      for (int64_t c = 0; c < kBlock; ++c) {
        out[c] = 0.0;
      }
      if (q < d.ph && p < d.pw) axpy_block(1.0, g + (q * d.pw + p) * kBlock, out);
      if (q < d.ph && p > 0) axpy_block(-1.0, g + (q * d.pw + p - 1) * kBlock, out);
      if (q > 0 && p < d.pw) axpy_block(-1.0, g + ((q - 1) * d.pw + p) * kBlock, out);
      if (q > 0 && p > 0) axpy_block(1.0, g + ((q - 1) * d.pw + p - 1) * kBlock, out);
    }
  }
}

// ds += the corner coefficients / area scattered at the corners' taps.
template <typename T>
void table_backward_input(const double* corner, const RoITable<T>& t, int64_t k, const Dims& d, double* ds) {
  const int64_t stride = (d.width + 1) * kBlock;
  const double inv = 1.0 / static_cast<double>(t.geom[k].area);
  const CornerTaps* cx = t.cx.data() + k * (d.pw + 1);
  const CornerTaps* cy = t.cy.data() + k * (d.ph + 1);
  for (int64_t q = 0; q <= d.ph; ++q) {
    const CornerTaps& ty = cy[q];
    double* r0 = ds + ty.idx[0] * stride;
    double* r1 = ds + ty.idx[1] * stride;
    double* r2 = ds + ty.idx[2] * stride;
    for (int64_t p = 0; p <= d.pw; ++p) {
      const CornerTaps& tx = cx[p];
      double cf[kBlock];  // a local copy: the stores into ds cannot alias it, so the loops vectorise
      std::copy(corner + (q * (d.pw + 1) + p) * kBlock, corner + (q * (d.pw + 1) + p + 1) * kBlock, cf);
      for (int u = 0; u < 3; ++u) {
        const int64_t o = tx.idx[u] * kBlock;
        const double w = tx.w[u] * inv;
        axpy_block(ty.w[0] * w, cf, r0 + o);
        axpy_block(ty.w[1] * w, cf, r1 + o);
        axpy_block(ty.w[2] * w, cf, r2 + o);
      }
    }
  }
}

// acc[0] += J = sum over corners of coefficient . G, acc[1 + p] += dJ/dx_p, acc[2 + PW + q] += dJ/dy_q (over the
// block's channels).
template <typename T>
void table_backward_rois(const double* corner, const double* s, const RoITable<T>& t, int64_t k, const Dims& d,
                         double* acc) {
  const int64_t stride = (d.width + 1) * kBlock;
  const CornerTaps* cx = t.cx.data() + k * (d.pw + 1);
  const CornerTaps* cy = t.cy.data() + k * (d.ph + 1);
  double* jx = acc + 1;
  double* jy = acc + 2 + d.pw;
  double j_total = 0;
  for (int64_t q = 0; q <= d.ph; ++q) {
    const CornerTaps& ty = cy[q];
    for (int64_t p = 0; p <= d.pw; ++p) {
      const CornerTaps& tx = cx[p];
      double cf[kBlock];
      std::copy(corner + (q * (d.pw + 1) + p) * kBlock, corner + (q * (d.pw + 1) + p + 1) * kBlock, cf);
      double gx = 0, gy = 0, gv = 0;
      for (int v = 0; v < 3; ++v) {
        const double* r = s + ty.idx[v] * stride;
        double dots[3];
        for (int u = 0; u < 3; ++u) {
          dots[u] = dot_block(cf, r + tx.idx[u] * kBlock);
        }
        const double along = tx.w[0] * dots[0] + tx.w[1] * dots[1] + tx.w[2] * dots[2];
        gv += ty.w[v] * along;
        gy += ty.dw[v] * along;
        gx += ty.w[v] * (tx.dw[0] * dots[0] + tx.dw[1] * dots[1] + tx.dw[2] * dots[2]);
      }
      j_total += gv;
      jx[p] += gx;
      jy[q] += gy;
    }
  }
  acc[0] += j_total;
}

}  // namespace cpu
}  // namespace prroi
}  // namespace d2_refine
