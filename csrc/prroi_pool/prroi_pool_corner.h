// Precise RoI Pooling: the cumulative taps of the table path, shared by the CPU and CUDA kernels.
//
// With the summed-area table S[p][q] = sum_{i < p, j < q} F[i, j] (zero row and column 0, clamped beyond the
// map), the integral of f over [-inf, x] x [-inf, y] is G(x, y) = sum_{s,t} ay_s(y) ax_t(x) S[my + s][mx + t]
// with m = floor, a = frac and the cumulative hat weights a_0 = (1 - a)^2 / 2, a_1 = 1/2 + a - a^2,
// a_2 = a^2 / 2 (taps m, m + 1, m + 2). A bin is G(xe, ye) - G(xs, ye) - G(xe, ys) + G(xs, ys).
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace d2_refine {
namespace prroi {

// Taps of G along one axis at a bin corner: G's weight on S row/column idx[t] is w[t], its derivative dw[t].
struct CornerTaps {
  int64_t idx[3];
  double w[3], dw[3];
};

// Coordinate x on an axis of `size` nodes. Beyond [-1, size] the cumulative weights are constant (all 0 / all
// 1): the coordinate is clamped there (so corners beyond the ramp give bit-identical G, hence exactly 0 bins) and
// the derivative is 0. NaN is treated as -1.
C10_HOST_DEVICE inline CornerTaps corner_taps(double x, int64_t size) {
  double dscale = 1.0;
  if (!(x > -1.0)) {
    x = -1.0;
    dscale = 0.0;
  } else if (x > static_cast<double>(size)) {
    x = static_cast<double>(size);
    dscale = 0.0;
  }
  const double m = ::floor(x);
  const double a = x - m;
  const int64_t mi = static_cast<int64_t>(m);
  CornerTaps t;
  for (int s = 0; s < 3; ++s) {
    const int64_t i = mi + s;
    t.idx[s] = i < 0 ? 0 : (i > size ? size : i);
  }
  t.w[0] = 0.5 * (1.0 - a) * (1.0 - a);
  t.w[1] = 0.5 + a - a * a;
  t.w[2] = 0.5 * a * a;
  t.dw[0] = dscale * (a - 1.0);
  t.dw[1] = dscale * (1.0 - 2.0 * a);
  t.dw[2] = dscale * a;
  return t;
}

}  // namespace prroi
}  // namespace d2_refine
