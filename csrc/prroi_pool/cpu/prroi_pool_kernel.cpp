// Precise RoI Pooling, CPU kernels (float32 / float64).
//
// Two exact evaluations of a bin integral (Precise RoI Pooling, Jiang et al., ECCV 2018), chosen per RoI
// (roi_table.h):
//  - direct (direct_path.h): sum over the bin's nodes of wy(i) wx(j) F[i, j], O(bin area); for bins of a few
//    cells;
//  - table (table_path.h): differences of the integral G of f from the summed-area table, 9 taps per bin corner
//    whatever the bin size; for RoIs whose bins are large. The table is kept in double (also for float32 maps) so
//    that the differences of large sums stay exact to ~1e-16 |S| / bin area.
//
// Work is split into blocks of kBlock channels x one image (channel_block.h): each thread owns whole blocks (no
// atomics), keeps the block channels-last (so every inner loop is a kBlock-wide vector op, weights computed once
// per block and not per channel) and its table in its cache; RoIs are processed image by image. The box gradient
// is summed per thread, then over threads in a fixed order (deterministic for a given thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#include "prroi_pool/cpu/channel_block.h"
#include "prroi_pool/cpu/direct_path.h"
#include "prroi_pool/cpu/roi_table.h"
#include "prroi_pool/cpu/table_path.h"
#include "prroi_pool/prroi_pool_checks.h"

namespace d2_refine {
namespace prroi {
namespace cpu {
namespace {

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
  check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  TORCH_CHECK(input.device().is_cpu(), "prroi_pool: input must be a CPU tensor for the CPU kernel");
  check_finite_boxes(rois, spatial_scale, aligned);
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
  check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  check_prroi_pool_grad(grad, input, rois, pooled_height, pooled_width);
  TORCH_CHECK(input.device().is_cpu(), "_prroi_pool_backward: input must be a CPU tensor for the CPU kernel");
  check_finite_boxes(rois, spatial_scale, aligned);
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

}  // namespace cpu
}  // namespace prroi
}  // namespace d2_refine
