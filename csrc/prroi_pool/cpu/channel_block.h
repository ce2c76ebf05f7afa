// Precise RoI Pooling, CPU kernels: the channel block, the unit of work of every pass. A thread owns whole blocks
// of kBlock channels x one image, stored channels-last so that every inner loop is a kBlock-wide vector op: the
// vector helpers, the per-thread scratch, the loading of a block and its summed-area table.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "prroi_pool/cpu/roi_table.h"

namespace d2_refine {
namespace prroi {
namespace cpu {

// Channels per block: the width of every inner loop. 8 keeps a thread's working set (the block's map, its table
// and the table gradient: 61 k cells x 8 x (4 + 8 + 8) bytes for a 200 x 304 map) within its share of the L3
// cache; 16 was slower in the forward and no faster in the backward.
constexpr int64_t kBlock = 8;

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

}  // namespace cpu
}  // namespace prroi
}  // namespace d2_refine
