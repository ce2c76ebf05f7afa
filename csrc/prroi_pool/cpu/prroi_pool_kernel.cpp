// Precise RoI Pooling, CPU kernels (float32 / float64).
//
// Two exact evaluations of a bin integral (spec: shared/specs/iounet.md section 1), chosen per RoI:
//  - direct: sum over the bin's nodes of wy(i) wx(j) F[i, j] (node weights of prroi_pool_common.h), O(bin area);
//    used for bins of a few cells;
//  - table: with the summed-area table S[p][q] = sum_{i < p, j < q} F[i, j] (zero row and column 0, clamped
//    beyond the map), the integral of f over [-inf, x] x [-inf, y] is G(x, y) = sum_{s,t} ay_s(y) ax_t(x)
//    S[my + s][mx + t] with m = floor, a = frac and the cumulative hat weights
//    a_0 = (1 - a)^2 / 2, a_1 = 1/2 + a - a^2, a_2 = a^2 / 2 (taps m, m + 1, m + 2; see corner_taps), so a bin is
//    G(xe, ye) - G(xs, ye) - G(xe, ys) + G(xs, ys): 9 taps per bin corner whatever the bin size, the
//    (PH + 1) x (PW + 1) corners of a RoI being shared by its bins. Used for RoIs whose bins are large. The
//    feature gradient is the transpose: the upstream gradients scattered at the corners' taps, then one reverse
//    2-D cumulative sum; the box gradient differentiates G (dG/dx = the same taps with da_t/dx), summed over
//    channels by dot products at the taps. The table is kept in double (also for float32 maps) so that the
//    differences of large sums stay exact to ~1e-16 |S| / bin area.
//
// Work is split into blocks of kBlock channels x one image: each thread owns whole blocks (no atomics), keeps
// the block channels-last (so every inner loop is a kBlock-wide vector op, weights computed once per block and
// not per channel) and its table in its cache; RoIs are processed image by image. The box gradient is summed
// per thread, then over threads in a fixed order (deterministic for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "prroi_pool/prroi_pool_checks.h"
#include "prroi_pool/prroi_pool_common.h"

namespace d2_refine {
namespace {

using prroi::node_range;
using prroi::node_weight;
using prroi::RoIGeometry;

// Channels per block: the width of every inner loop. 8 keeps a thread's working set (the block's map, its table
// and the table gradient: 61 k cells x 8 x (4 + 8 + 8) bytes for a 200 x 304 map) within its share of the L3
// cache; 16 was slower in the forward and no faster in the backward.
constexpr int64_t kBlock = 8;

// A RoI takes the table path when its bins are at least kTableMinBin cells on both sides (the table's rounding,
// ~1e-16 |S| per tap, is divided by the bin area) and its direct cost (node visits, each a kBlock-wide axpy in T)
// exceeds that of the table (9 tap visits per bin corner, each a kBlock-wide axpy in double, i.e.
// sizeof(double) / sizeof(T) times the work of a node visit).
constexpr double kTableMinBin = 1.0;

enum class Path : uint8_t { kEmpty, kDirect, kTable };

// Non-zero node weights of every bin of every RoI along one axis, ragged: bin b (= roi * bins + bin index) has
// weights w[offset[b] .. offset[b + 1]) for the nodes lo[b], lo[b] + 1, ...
template <typename T>
struct AxisTable {
  std::vector<int64_t> lo, offset;
  std::vector<T> w;
  int64_t count(int64_t b) const { return offset[b + 1] - offset[b]; }
  const T* weights(int64_t b) const { return w.data() + offset[b]; }
};

// Taps of G along one axis at a bin corner: G's weight on S row/column idx[t] is w[t], its derivative dw[t].
struct CornerTaps {
  int64_t idx[3];
  double w[3], dw[3];
};

// Coordinate x on an axis of `size` nodes. Beyond [-1, size] the cumulative weights are constant (all 0 / all
// 1): the coordinate is clamped there (so corners beyond the ramp give bit-identical G, hence exactly 0 bins) and
// the derivative is 0. NaN is treated as -1.
inline CornerTaps corner_taps(double x, int64_t size) {
  double dscale = 1.0;
  if (!(x > -1.0)) {
    x = -1.0;
    dscale = 0.0;
  } else if (x > static_cast<double>(size)) {
    x = static_cast<double>(size);
    dscale = 0.0;
  }
  const double m = std::floor(x);
  const double a = x - m;
  const int64_t mi = static_cast<int64_t>(m);
  CornerTaps t;
  for (int s = 0; s < 3; ++s) {
    t.idx[s] = std::min<int64_t>(std::max<int64_t>(mi + s, 0), size);
  }
  t.w[0] = 0.5 * (1.0 - a) * (1.0 - a);
  t.w[1] = 0.5 + a - a * a;
  t.w[2] = 0.5 * a * a;
  t.dw[0] = dscale * (a - 1.0);
  t.dw[1] = dscale * (1.0 - 2.0 * a);
  t.dw[2] = dscale * a;
  return t;
}

template <typename T>
struct RoITable {
  int64_t num_rois, num_images, height, width, pooled_height, pooled_width;
  std::vector<int64_t> batch;
  std::vector<RoIGeometry<T>> geom;
  std::vector<Path> path;
  AxisTable<T> x, y;               // node weights of every bin (read by the direct path)
  std::vector<prroi::Taps<T>> x_taps, y_taps;  // line taps of every bin's start and end edges, [roi][bin][2]
  std::vector<CornerTaps> cx, cy;  // (PW + 1) x-corners and (PH + 1) y-corners per RoI (table path)
  std::vector<std::vector<int64_t>> rois_of_image;  // non-empty RoIs per image, in order
  std::vector<char> has_direct, has_table;          // per image
};

template <typename T>
void append_axis(AxisTable<T>& axis, T start, T bin, int64_t bins, int64_t size, bool empty) {
  for (int64_t b = 0; b < bins; ++b) {
    const T s = start + static_cast<T>(b) * bin;
    const T e = s + bin;
    int64_t lo = 0, hi = -1;
    if (!empty) {
      node_range(s, e, size, &lo, &hi);
    }
    axis.lo.push_back(lo);
    for (int64_t j = lo; j <= hi; ++j) {
      axis.w.push_back(node_weight(s, e, j));
    }
    axis.offset.push_back(static_cast<int64_t>(axis.w.size()));
  }
}

template <typename T>
RoITable<T> build_table(const T* rois, int64_t num_rois, int64_t num_images, int64_t height, int64_t width,
                        T spatial_scale, bool aligned, int64_t pooled_height, int64_t pooled_width) {
  RoITable<T> t;
  t.num_rois = num_rois;
  t.num_images = num_images;
  t.height = height;
  t.width = width;
  t.pooled_height = pooled_height;
  t.pooled_width = pooled_width;
  t.batch.resize(num_rois);
  t.geom.resize(num_rois);
  t.path.resize(num_rois);
  t.cx.resize(num_rois * (pooled_width + 1));
  t.cy.resize(num_rois * (pooled_height + 1));
  t.rois_of_image.resize(num_images);
  t.has_direct.assign(num_images, 0);
  t.has_table.assign(num_images, 0);
  t.x.offset.push_back(0);
  t.y.offset.push_back(0);
  t.x_taps.resize(num_rois * pooled_width * 2);
  t.y_taps.resize(num_rois * pooled_height * 2);
  const double table_cost = 9.0 * static_cast<double>((pooled_height + 1) * (pooled_width + 1)) *
                            static_cast<double>(sizeof(double) / sizeof(T));
  for (int64_t k = 0; k < num_rois; ++k) {
    const T* roi = rois + 5 * k;
    const double b = static_cast<double>(roi[0]);
    if (!(b >= 0 && b < static_cast<double>(num_images) && b == std::floor(b))) {
      prroi::fail_batch_index(b, k, num_images);
    }
    const int64_t n = static_cast<int64_t>(b);
    t.batch[k] = n;
    const RoIGeometry<T> g = prroi::roi_geometry(roi, spatial_scale, aligned, pooled_height, pooled_width);
    t.geom[k] = g;
    const bool empty = !(g.area > T(0));
    append_axis(t.x, g.x_start, g.bin_w, pooled_width, width, empty);
    append_axis(t.y, g.y_start, g.bin_h, pooled_height, height, empty);
    const int64_t nx = t.x.offset.back() - t.x.offset[k * pooled_width];
    const int64_t ny = t.y.offset.back() - t.y.offset[k * pooled_height];
    if (empty || nx == 0 || ny == 0) {
      t.path[k] = Path::kEmpty;  // zero area, or no bin meets the map: zero output and gradients
      continue;
    }
    const double direct_cost = static_cast<double>(nx) * static_cast<double>(ny);
    const bool table = std::min(static_cast<double>(g.bin_w), static_cast<double>(g.bin_h)) >= kTableMinBin &&
                       direct_cost > table_cost;
    t.path[k] = table ? Path::kTable : Path::kDirect;
    for (int64_t pw = 0; pw < pooled_width; ++pw) {
      const T xs = g.x_start + static_cast<T>(pw) * g.bin_w;
      t.x_taps[(k * pooled_width + pw) * 2] = prroi::line_taps(xs, width);
      t.x_taps[(k * pooled_width + pw) * 2 + 1] = prroi::line_taps(xs + g.bin_w, width);
    }
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const T ys = g.y_start + static_cast<T>(ph) * g.bin_h;
      t.y_taps[(k * pooled_height + ph) * 2] = prroi::line_taps(ys, height);
      t.y_taps[(k * pooled_height + ph) * 2 + 1] = prroi::line_taps(ys + g.bin_h, height);
    }
    (table ? t.has_table : t.has_direct)[n] = 1;
    t.rois_of_image[n].push_back(k);
    if (table) {
      for (int64_t p = 0; p <= pooled_width; ++p) {
        const T xc = g.x_start + static_cast<T>(p) * g.bin_w;
        t.cx[k * (pooled_width + 1) + p] = corner_taps(static_cast<double>(xc), width);
      }
      for (int64_t q = 0; q <= pooled_height; ++q) {
        const T yc = g.y_start + static_cast<T>(q) * g.bin_h;
        t.cy[k * (pooled_height + 1) + q] = corner_taps(static_cast<double>(yc), height);
      }
    }
  }
  return t;
}

// ---- kBlock-wide vector helpers ----
// The hot loops are written with 16-byte SIMD registers (GCC / Clang vector extensions: SSE2 on x86-64, NEON on
// arm64), not left to the auto-vectoriser, which keeps them scalar once it has unrolled them (the scattered
// stores may alias) or when they are reductions. Other compilers get the plain loops.
#if defined(__GNUC__) || defined(__clang__)
#define D2R_PRROI_SIMD 1
typedef double f64x2 __attribute__((vector_size(16)));
typedef float f32x4 __attribute__((vector_size(16)));
template <typename T>
struct Simd;
template <>
struct Simd<double> {
  using type = f64x2;
};
template <>
struct Simd<float> {
  using type = f32x4;
};
template <typename T>
inline typename Simd<T>::type vload(const T* p) {
  typename Simd<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Simd<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
#else
#define D2R_PRROI_SIMD 0
#endif

// y[0:kBlock] += a x[0:kBlock]
template <typename T>
inline void axpy_block(T a, const T* __restrict__ x, T* __restrict__ y) {
#if D2R_PRROI_SIMD
  constexpr int64_t lanes = 16 / sizeof(T);
  static_assert(kBlock % lanes == 0, "kBlock must be a multiple of the SIMD width");
  for (int64_t c = 0; c < kBlock; c += lanes) {
    vstore(y + c, vload(y + c) + a * vload(x + c));
  }
#else
  for (int64_t c = 0; c < kBlock; ++c) {
    y[c] += a * x[c];
  }
#endif
}

// g[0:kBlock] . x[0:kBlock] (fixed association: deterministic)
inline double dot_block(const double* __restrict__ g, const double* __restrict__ x) {
#if D2R_PRROI_SIMD
  static_assert(kBlock % 4 == 0, "kBlock must be a multiple of 4");
  f64x2 a0 = vload(g) * vload(x), a1 = vload(g + 2) * vload(x + 2);
  for (int64_t c = 4; c < kBlock; c += 4) {
    a0 += vload(g + c) * vload(x + c);
    a1 += vload(g + c + 2) * vload(x + c + 2);
  }
  const f64x2 s = a0 + a1;
  return s[0] + s[1];
#else
  double acc = 0;
  for (int64_t c = 0; c < kBlock; ++c) {
    acc += g[c] * x[c];
  }
  return acc;
#endif
}

inline double dot_block(const double* __restrict__ g, const float* __restrict__ x) {
  double p[kBlock];
  for (int64_t c = 0; c < kBlock; ++c) {
    p[c] = g[c] * static_cast<double>(x[c]);
  }
  for (int64_t w = kBlock / 2; w >= 1; w /= 2) {  // fixed pairwise tree
    for (int64_t c = 0; c < w; ++c) {
      p[c] += p[c + w];
    }
  }
  return p[0];
}

// Per-thread scratch, allocated on first use and reused for every block of the thread.
template <typename T>
struct Scratch {
  std::vector<T> f;        // [H][W][kBlock]: the block of the map, channels-last (padded channels zero)
  std::vector<double> s;   // [H + 1][W + 1][kBlock]: its summed-area table
  std::vector<T> df;       // [H][W][kBlock]: feature gradient of the direct path (zero between blocks)
  std::vector<double> ds;  // [H + 1][W + 1][kBlock]: table gradient, scattered at the taps (zero between blocks)
  std::vector<double> corner;  // [(PH + 1) (PW + 1)][kBlock]: G (forward) or corner coefficients (backward)
  std::vector<double> g;       // [PH PW][kBlock]: upstream gradient of one RoI
  std::vector<double> col;     // [W + 1][kBlock]: column accumulators of the reverse cumulative sum
  std::vector<T> row;          // [W][kBlock]
  std::vector<double> sums;    // [K][slots]: the box-gradient sums over the thread's channels
  std::vector<double> h;       // [nodes of a bin]: the block's channels reduced against the upstream gradient
};

template <typename V>
inline void ensure(std::vector<V>& v, size_t n) {
  if (v.size() < n) {
    v.resize(n);
  }
}

// f <- channels [c0, c0 + cb) of image n (NCHW), channels-last, channels >= cb zero.
template <typename T>
void load_block(const T* input, int64_t n, int64_t c0, int64_t cb, int64_t channels, int64_t height, int64_t width,
                T* f) {
  const int64_t cells = height * width;
  constexpr int64_t kTile = 256;  // cells per tile: the tile of f stays in L1 while the channels fill it
  for (int64_t t0 = 0; t0 < cells; t0 += kTile) {
    const int64_t t1 = std::min(cells, t0 + kTile);
    for (int64_t cc = 0; cc < kBlock; ++cc) {
      if (cc < cb) {
        const T* plane = input + (n * channels + c0 + cc) * cells;
        for (int64_t i = t0; i < t1; ++i) {
          f[i * kBlock + cc] = plane[i];
        }
      } else {
        for (int64_t i = t0; i < t1; ++i) {
          f[i * kBlock + cc] = T(0);
        }
      }
    }
  }
}

// s[p][q] = sum over i < p, j < q of f[i][j], in double.
template <typename T>
void build_sat(const T* f, int64_t height, int64_t width, double* s) {
  const int64_t stride = (width + 1) * kBlock;
  std::fill(s, s + stride, 0.0);
  for (int64_t i = 0; i < height; ++i) {
    const double* above = s + i * stride;
    double* cur = s + (i + 1) * stride;
    const T* frow = f + i * width * kBlock;
    double acc[kBlock] = {};
    for (int64_t c = 0; c < kBlock; ++c) {
      cur[c] = 0.0;
    }
    for (int64_t j = 0; j < width; ++j) {
      const T* fv = frow + j * kBlock;
      const double* up = above + (j + 1) * kBlock;
      double* out = cur + (j + 1) * kBlock;
      for (int64_t c = 0; c < kBlock; ++c) {
        acc[c] += static_cast<double>(fv[c]);
        out[c] = up[c] + acc[c];
      }
    }
  }
}

// The sizes every pass needs.
struct Dims {
  int64_t channels, height, width, ph, pw;
};

// ---- direct path ----

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

// acc[0 .. 2 PW + 2 PH) += sum over the block's channels of the bin-edge gradients of the spec's closed form:
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
    const prroi::Taps<T>& ys = t.y_taps[by * 2];
    const prroi::Taps<T>& ye = t.y_taps[by * 2 + 1];
    for (int64_t pw = 0; pw < d.pw; ++pw) {
      const int64_t bx = k * d.pw + pw;
      const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
      const T* wx = t.x.weights(bx);
      if (nx == 0 || ny == 0) {
        continue;  // the bin misses the map: every term is zero
      }
      const prroi::Taps<T>& xs = t.x_taps[bx * 2];
      const prroi::Taps<T>& xe = t.x_taps[bx * 2 + 1];
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

// ---- table path ----

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

// grad_input[n][c0 + c][i][j] = (reverse cumulative sum of ds)[i + 1][j + 1] + df[i][j] for c < cb.
template <typename T>
void write_block_gradient(Scratch<T>& sc, bool table, bool direct, int64_t n, int64_t c0, int64_t cb,
                          const Dims& d, T* grad_input) {
  const int64_t stride = (d.width + 1) * kBlock;
  ensure(sc.row, d.width * kBlock);
  T* row = sc.row.data();
  if (table) {
    ensure(sc.col, (d.width + 1) * kBlock);
    std::fill(sc.col.begin(), sc.col.begin() + (d.width + 1) * kBlock, 0.0);
  }
  for (int64_t i = d.height - 1; i >= 0; --i) {
    T* df_row = sc.df.data() + i * d.width * kBlock;
    if (table) {
      double* ds_row = sc.ds.data() + (i + 1) * stride;
      double r[kBlock] = {};
      for (int64_t j = d.width - 1; j >= 0; --j) {
        double* col = sc.col.data() + (j + 1) * kBlock;
        double v[kBlock];
        double* in = ds_row + (j + 1) * kBlock;
#if D2R_PRROI_SIMD
        for (int64_t c = 0; c < kBlock; c += 2) {
          const f64x2 rv = vload(r + c) + vload(in + c);
          vstore(r + c, rv);
          const f64x2 cv = vload(col + c) + rv;
          vstore(col + c, cv);
          vstore(v + c, cv);
        }
#else
        for (int64_t c = 0; c < kBlock; ++c) {
          r[c] += in[c];
          v[c] = col[c] + r[c];
          col[c] = v[c];
        }
#endif
        std::fill(in, in + kBlock, 0.0);  // consumed: the buffer is left zero for the next block
        T* out = row + j * kBlock;
        if (direct) {
          T* dv = df_row + j * kBlock;
          for (int64_t c = 0; c < kBlock; ++c) {
            out[c] = static_cast<T>(v[c]) + dv[c];
          }
          std::fill(dv, dv + kBlock, T(0));
        } else {
          for (int64_t c = 0; c < kBlock; ++c) {
            out[c] = static_cast<T>(v[c]);
          }
        }
      }
      std::fill(ds_row, ds_row + kBlock, 0.0);  // column 0 (taps clamped to 0: no feature gradient)
    } else {
      std::copy(df_row, df_row + d.width * kBlock, row);
      std::fill(df_row, df_row + d.width * kBlock, T(0));
    }
    for (int64_t c = 0; c < cb; ++c) {
      T* dst = grad_input + ((n * d.channels + c0 + c) * d.height + i) * d.width;
      for (int64_t j = 0; j < d.width; ++j) {
        dst[j] = row[j * kBlock + c];
      }
    }
  }
  if (table) {
    std::fill(sc.ds.data(), sc.ds.data() + stride, 0.0);  // row 0
  }
}

// Runs fn(scratch, block index, image) over the (channel block, image) pairs holding RoIs, in parallel; each
// thread's scratch is handed to done(scratch, first pair of the thread) when the thread has finished.
template <typename T, typename Fn, typename Done>
void for_each_block(const RoITable<T>& t, int64_t channels, const Fn& fn, const Done& done) {
  const int64_t blocks = (channels + kBlock - 1) / kBlock;
  std::vector<std::pair<int64_t, int64_t>> units;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t n = 0; n < t.num_images; ++n) {
      if (!t.rois_of_image[n].empty()) {
        units.emplace_back(b, n);
      }
    }
  }
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    for (int64_t u = begin; u < end; ++u) {
      fn(sc, units[u].first, units[u].second);
    }
    done(sc, begin);
  });
}

// output: [K, C, PH, PW] (uninitialised: the RoIs outside the blocks' work are zeroed here)
template <typename T>
void forward_impl(const T* input, const RoITable<T>& t, const Dims& d, T* output) {
  const int64_t per_roi = d.channels * d.ph * d.pw;
  for (int64_t k = 0; k < t.num_rois; ++k) {
    if (t.path[k] == Path::kEmpty) {
      std::fill(output + k * per_roi, output + (k + 1) * per_roi, T(0));
    }
  }
  for_each_block(t, d.channels, [&](Scratch<T>& sc, int64_t block, int64_t n) {
    const int64_t c0 = block * kBlock, cb = std::min(kBlock, d.channels - c0);
    ensure(sc.f, d.height * d.width * kBlock);
    load_block(input, n, c0, cb, d.channels, d.height, d.width, sc.f.data());
    if (t.has_table[n]) {
      ensure(sc.s, (d.height + 1) * (d.width + 1) * kBlock);
      ensure(sc.corner, (d.ph + 1) * (d.pw + 1) * kBlock);
      build_sat(sc.f.data(), d.height, d.width, sc.s.data());
    }
    for (const int64_t k : t.rois_of_image[n]) {
      if (t.path[k] == Path::kTable) {
        table_forward(sc.s.data(), t, k, d, c0, cb, sc.corner.data(), output);
      } else {
        direct_forward(sc.f.data(), t, k, d, c0, cb, output);
      }
    }
  }, [](Scratch<T>&, int64_t) {});
}

// grad: channels-last [K, PH, PW, C]; grad_input: [N, C, H, W] (every image with RoIs is written, the others are
// zeroed here); grad_rois: [K, 5] zero-initialised.
template <typename T>
void backward_impl(const T* grad, const T* input, const RoITable<T>& t, const Dims& d, T spatial_scale,
                   bool need_input, bool need_rois, T* grad_input, T* grad_rois) {
  const int64_t slots = 2 * (d.pw + d.ph) + 3;  // per RoI: direct (2 PW + 2 PH) or table (PW + PH + 3) sums
  if (need_input) {
    const int64_t per_image = d.channels * d.height * d.width;
    for (int64_t n = 0; n < t.num_images; ++n) {
      if (t.rois_of_image[n].empty()) {
        std::fill(grad_input + n * per_image, grad_input + (n + 1) * per_image, T(0));
      }
    }
  }
  std::mutex mutex;
  std::vector<std::pair<int64_t, std::vector<double>>> partials;  // (first pair of a thread, its sums)
  const auto block_fn = [&](Scratch<T>& sc, int64_t block, int64_t n) {
    const int64_t c0 = block * kBlock, cb = std::min(kBlock, d.channels - c0);
    const bool table = t.has_table[n], direct = t.has_direct[n];
    const int64_t table_cells = (d.height + 1) * (d.width + 1) * kBlock;
    if (need_rois) {
      ensure(sc.f, d.height * d.width * kBlock);
      load_block(input, n, c0, cb, d.channels, d.height, d.width, sc.f.data());
      if (table) {
        ensure(sc.s, table_cells);
        build_sat(sc.f.data(), d.height, d.width, sc.s.data());
      }
      if (sc.sums.empty()) {
        sc.sums.assign(t.num_rois * slots, 0.0);
      }
    }
    if (need_input) {
      if (table) {
        ensure(sc.ds, table_cells);  // zero: new, or left zero by write_block_gradient
      }
      if (direct) {
        ensure(sc.df, d.height * d.width * kBlock);  // likewise
      }
    }
    ensure(sc.g, d.ph * d.pw * kBlock);
    ensure(sc.corner, (d.ph + 1) * (d.pw + 1) * kBlock);
    const int64_t bins = d.ph * d.pw;
    for (const int64_t k : t.rois_of_image[n]) {
      // this RoI's upstream gradient for the block's channels, [bin][channel]
      double* g = sc.g.data();
      const T* src = grad + k * bins * d.channels + c0;
      for (int64_t b = 0; b < bins; ++b) {
        double* gb = g + b * kBlock;
        const T* sb = src + b * d.channels;
        if (cb == kBlock) {
          for (int64_t c = 0; c < kBlock; ++c) {
            gb[c] = static_cast<double>(sb[c]);
          }
        } else {
          for (int64_t c = 0; c < kBlock; ++c) {
            gb[c] = c < cb ? static_cast<double>(sb[c]) : 0.0;
          }
        }
      }
      if (t.path[k] == Path::kTable) {
        corner_coefficients(g, d, sc.corner.data());
        if (need_input) {
          table_backward_input(sc.corner.data(), t, k, d, sc.ds.data());
        }
        if (need_rois) {
          table_backward_rois(sc.corner.data(), sc.s.data(), t, k, d, sc.sums.data() + k * slots);
        }
      } else {
        if (need_input) {
          direct_backward_input(g, t, k, d, sc.df.data());
        }
        if (need_rois) {
          direct_backward_rois(g, sc.f.data(), t, k, d, sc.sums.data() + k * slots, sc.h);
        }
      }
    }
    if (need_input) {
      write_block_gradient(sc, table, direct, n, c0, cb, d, grad_input);
    }
  };
  for_each_block(t, d.channels, block_fn, [&](Scratch<T>& sc, int64_t first) {
    if (!sc.sums.empty()) {
      std::lock_guard<std::mutex> lock(mutex);
      partials.emplace_back(first, std::move(sc.sums));
    }
  });
  if (!need_rois) {
    return;
  }
  std::sort(partials.begin(), partials.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  const double scale = static_cast<double>(spatial_scale);
  at::parallel_for(0, t.num_rois, 256, [&](int64_t begin, int64_t end) {
    std::vector<double> s(slots);
    for (int64_t k = begin; k < end; ++k) {
      if (t.path[k] == Path::kEmpty) {
        continue;  // zero-area bins, inverted boxes, boxes beyond the ramp: zero gradient
      }
      std::fill(s.begin(), s.end(), 0.0);
      for (const auto& part : partials) {
        for (int64_t i = 0; i < slots; ++i) {
          s[i] += part.second[k * slots + i];
        }
      }
      const RoIGeometry<T> geo = t.geom[k];
      const double area = static_cast<double>(geo.area);
      const double bw = static_cast<double>(geo.bin_w), bh = static_cast<double>(geo.bin_h);
      double gx1 = 0, gx2 = 0, gy1 = 0, gy2 = 0;
      if (t.path[k] == Path::kDirect) {
        // xs = x1' (1 - u) + x2' u, xe = x1' (1 - u') + x2' u' with u = pw / PW, u' = (pw + 1) / PW, x' = s x
        const double* g_xs = s.data();
        const double* g_xe = g_xs + d.pw;
        const double* g_ys = g_xs + 2 * d.pw;
        const double* g_ye = g_ys + d.ph;
        for (int64_t pw = 0; pw < d.pw; ++pw) {
          const double u = static_cast<double>(pw) / d.pw, u1 = static_cast<double>(pw + 1) / d.pw;
          gx1 += (1 - u) * g_xs[pw] + (1 - u1) * g_xe[pw];
          gx2 += u * g_xs[pw] + u1 * g_xe[pw];
        }
        for (int64_t ph = 0; ph < d.ph; ++ph) {
          const double u = static_cast<double>(ph) / d.ph, u1 = static_cast<double>(ph + 1) / d.ph;
          gy1 += (1 - u) * g_ys[ph] + (1 - u1) * g_ye[ph];
          gy2 += u * g_ys[ph] + u1 * g_ye[ph];
        }
      } else {
        // L = J / A with corners x_p = x1' + p (x2' - x1') / PW and A = bin_w bin_h: dL/dx1' = (sum_p (1 - p/PW)
        // dJ/dx_p + (J / A) bin_h / PW) / A, dL/dx2' = (sum_p (p/PW) dJ/dx_p - (J / A) bin_h / PW) / A, y alike.
        const double j = s[0] / area;
        const double* jx = s.data() + 1;
        const double* jy = s.data() + 2 + d.pw;
        for (int64_t p = 0; p <= d.pw; ++p) {
          const double u = static_cast<double>(p) / d.pw;
          gx1 += (1 - u) * jx[p];
          gx2 += u * jx[p];
        }
        for (int64_t q = 0; q <= d.ph; ++q) {
          const double u = static_cast<double>(q) / d.ph;
          gy1 += (1 - u) * jy[q];
          gy2 += u * jy[q];
        }
        gx1 += j * bh / d.pw;
        gx2 -= j * bh / d.pw;
        gy1 += j * bw / d.ph;
        gy2 -= j * bw / d.ph;
      }
      const double f = scale / area;
      T* out = grad_rois + 5 * k;
      out[1] = static_cast<T>(gx1 * f);
      out[2] = static_cast<T>(gy1 * f);
      out[3] = static_cast<T>(gx2 * f);
      out[4] = static_cast<T>(gy2 * f);
    }
  });
}

at::Tensor prroi_pool_forward_kernel(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                     int64_t pooled_height, int64_t pooled_width, bool aligned) {
  prroi::check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  TORCH_CHECK(input.device().is_cpu(), "prroi_pool: input must be a CPU tensor for the CPU kernel");
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  if (num_rois == 0 || channels == 0) {
    return at::zeros({num_rois, channels, pooled_height, pooled_width}, input.options());
  }
  at::Tensor output = at::empty({num_rois, channels, pooled_height, pooled_width}, input.options());
  const at::Tensor rois_ = rois.contiguous(), input_ = input.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_forward_cpu", [&] {
    const RoITable<scalar_t> table =
        build_table(rois_.data_ptr<scalar_t>(), num_rois, input.size(0), height, width,
                    static_cast<scalar_t>(spatial_scale), aligned, pooled_height, pooled_width);
    const Dims d{channels, height, width, pooled_height, pooled_width};
    forward_impl(input_.data_ptr<scalar_t>(), table, d, output.data_ptr<scalar_t>());
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
  TORCH_CHECK(input.device().is_cpu(), "_prroi_pool_backward: input must be a CPU tensor for the CPU kernel");
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  at::Tensor grad_rois = at::zeros(rois.sizes(), rois.options());
  if (num_rois == 0 || channels == 0 || !(input_requires_grad || rois_requires_grad)) {
    return std::make_tuple(at::zeros(input.sizes(), input.options()), grad_rois);
  }
  // every element of grad_input is written by the kernel when it is requested
  at::Tensor grad_input = input_requires_grad ? at::empty(input.sizes(), input.options())
                                              : at::zeros(input.sizes(), input.options());
  const at::Tensor rois_ = rois.contiguous(), input_ = input.contiguous();
  const at::Tensor grad_ = grad.permute({0, 2, 3, 1}).contiguous();  // [K, PH, PW, C]
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_backward_cpu", [&] {
    const RoITable<scalar_t> table =
        build_table(rois_.data_ptr<scalar_t>(), num_rois, input.size(0), height, width,
                    static_cast<scalar_t>(spatial_scale), aligned, pooled_height, pooled_width);
    const Dims d{channels, height, width, pooled_height, pooled_width};
    backward_impl(grad_.data_ptr<scalar_t>(), input_.data_ptr<scalar_t>(), table, d,
                  static_cast<scalar_t>(spatial_scale), input_requires_grad, rois_requires_grad,
                  grad_input.data_ptr<scalar_t>(), grad_rois.data_ptr<scalar_t>());
  });
  return std::make_tuple(grad_input.contiguous(input.suggest_memory_format()), grad_rois);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CPU, m) {
  m.impl("prroi_pool", TORCH_FN(prroi_pool_forward_kernel));
  m.impl("_prroi_pool_backward", TORCH_FN(prroi_pool_backward_kernel));
}

}  // namespace d2_refine
