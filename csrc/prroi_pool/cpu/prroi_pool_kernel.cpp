// Precise RoI Pooling, CPU kernels (float32 / float64).
//
// A serial pre-pass tabulates, for every RoI and every bin, the non-zero node weights along x and y (the map is
// separable, see prroi_pool_common.h): a few hundred numbers per RoI. The three passes then read that table:
//  - forward: parallel over (RoI, channel);
//  - gradient w.r.t. input: parallel over channels (each thread owns whole feature planes, so the RoIs that share
//    cells never write concurrently: no atomics);
//  - gradient w.r.t. rois: parallel over RoIs (each RoI owns its row).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "prroi_pool/prroi_pool_checks.h"
#include "prroi_pool/prroi_pool_common.h"

namespace d2_refine {
namespace {

using prroi::node_range;
using prroi::node_weight;
using prroi::RoIGeometry;

// Non-zero node weights of every bin of every RoI along one axis, ragged: bin b (= roi * bins + bin index) has
// weights w[offset[b] .. offset[b + 1]) for the nodes lo[b], lo[b] + 1, ...
template <typename T>
struct AxisTable {
  std::vector<int64_t> lo, offset;
  std::vector<T> w;
  int64_t count(int64_t b) const { return offset[b + 1] - offset[b]; }
  const T* weights(int64_t b) const { return w.data() + offset[b]; }
};

template <typename T>
struct RoITable {
  std::vector<int64_t> batch;
  std::vector<RoIGeometry<T>> geom;
  AxisTable<T> x, y;
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
  t.batch.resize(num_rois);
  t.geom.resize(num_rois);
  t.x.offset.push_back(0);
  t.y.offset.push_back(0);
  for (int64_t k = 0; k < num_rois; ++k) {
    const T* roi = rois + 5 * k;
    const double b = static_cast<double>(roi[0]);
    if (!(b >= 0 && b < static_cast<double>(num_images) && b == std::floor(b))) {
      prroi::fail_batch_index(b, k, num_images);
    }
    t.batch[k] = static_cast<int64_t>(b);
    const RoIGeometry<T> g = prroi::roi_geometry(roi, spatial_scale, aligned, pooled_height, pooled_width);
    t.geom[k] = g;
    const bool empty = !(g.area > T(0));
    append_axis(t.x, g.x_start, g.bin_w, pooled_width, width, empty);
    append_axis(t.y, g.y_start, g.bin_h, pooled_height, height, empty);
  }
  return t;
}

template <typename T>
void forward_impl(const T* input, const RoITable<T>& t, int64_t num_rois, int64_t channels, int64_t height,
                  int64_t width, int64_t pooled_height, int64_t pooled_width, T* output) {
  const int64_t bins = pooled_height * pooled_width;
  at::parallel_for(0, num_rois * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / channels, c = kc % channels;
      const T area = t.geom[k].area;
      if (!(area > T(0))) {
        continue;  // output is zero-initialised
      }
      const T* plane = input + (t.batch[k] * channels + c) * height * width;
      T* out = output + kc * bins;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        const int64_t by = k * pooled_height + ph;
        const int64_t ny = t.y.count(by), y0 = t.y.lo[by];
        const T* wy = t.y.weights(by);
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          const int64_t bx = k * pooled_width + pw;
          const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
          const T* wx = t.x.weights(bx);
          T sum = 0;
          for (int64_t ii = 0; ii < ny; ++ii) {
            const T* row = plane + (y0 + ii) * width + x0;
            T row_sum = 0;
            for (int64_t jj = 0; jj < nx; ++jj) {
              row_sum += wx[jj] * row[jj];
            }
            sum += wy[ii] * row_sum;
          }
          out[ph * pooled_width + pw] = sum / area;
        }
      }
    }
  });
}

template <typename T>
void backward_input_impl(const T* grad, const RoITable<T>& t, int64_t num_rois, int64_t channels, int64_t height,
                         int64_t width, int64_t pooled_height, int64_t pooled_width, T* grad_input) {
  const int64_t bins = pooled_height * pooled_width;
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < num_rois; ++k) {
      const T area = t.geom[k].area;
      if (!(area > T(0))) {
        continue;
      }
      for (int64_t c = begin; c < end; ++c) {
        T* plane = grad_input + (t.batch[k] * channels + c) * height * width;
        const T* g = grad + (k * channels + c) * bins;
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          const int64_t by = k * pooled_height + ph;
          const int64_t ny = t.y.count(by), y0 = t.y.lo[by];
          const T* wy = t.y.weights(by);
          for (int64_t pw = 0; pw < pooled_width; ++pw) {
            const T gv = g[ph * pooled_width + pw] / area;
            if (gv == T(0)) {
              continue;
            }
            const int64_t bx = k * pooled_width + pw;
            const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
            const T* wx = t.x.weights(bx);
            for (int64_t ii = 0; ii < ny; ++ii) {
              T* row = plane + (y0 + ii) * width + x0;
              const T gy = gv * wy[ii];
              for (int64_t jj = 0; jj < nx; ++jj) {
                row[jj] += gy * wx[jj];
              }
            }
          }
        }
      }
    }
  });
}

// d O / d (bin edges) by the spec's closed form, summed over channels and bins, then chained to (x1, y1, x2, y2).
template <typename T>
void backward_rois_impl(const T* grad, const T* input, const RoITable<T>& t, int64_t num_rois, int64_t channels,
                        int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                        T spatial_scale, T* grad_rois) {
  const int64_t bins = pooled_height * pooled_width;
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> g_xs(pooled_width), g_xe(pooled_width), g_ys(pooled_height), g_ye(pooled_height);
    std::vector<prroi::Taps<T>> t_xs(pooled_width), t_xe(pooled_width), t_ys(pooled_height), t_ye(pooled_height);
    for (int64_t k = begin; k < end; ++k) {
      const RoIGeometry<T> geo = t.geom[k];
      if (!(geo.area > T(0))) {
        continue;  // zero-area bins and inverted boxes: zero gradient
      }
      std::fill(g_xs.begin(), g_xs.end(), T(0));
      std::fill(g_xe.begin(), g_xe.end(), T(0));
      std::fill(g_ys.begin(), g_ys.end(), T(0));
      std::fill(g_ye.begin(), g_ye.end(), T(0));
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const T xs = geo.x_start + static_cast<T>(pw) * geo.bin_w;
        t_xs[pw] = prroi::line_taps(xs, width);
        t_xe[pw] = prroi::line_taps(xs + geo.bin_w, width);
      }
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        const T ys = geo.y_start + static_cast<T>(ph) * geo.bin_h;
        t_ys[ph] = prroi::line_taps(ys, height);
        t_ye[ph] = prroi::line_taps(ys + geo.bin_h, height);
      }
      for (int64_t c = 0; c < channels; ++c) {
        const T* plane = input + (t.batch[k] * channels + c) * height * width;
        const T* g = grad + (k * channels + c) * bins;
        for (int64_t ph = 0; ph < pooled_height; ++ph) {
          const int64_t by = k * pooled_height + ph;
          const int64_t ny = t.y.count(by), y0 = t.y.lo[by];
          const T* wy = t.y.weights(by);
          const prroi::Taps<T> ys = t_ys[ph], ye = t_ye[ph];
          const T* ys0 = plane + ys.k0 * width;
          const T* ys1 = plane + ys.k1 * width;
          const T* ye0 = plane + ye.k0 * width;
          const T* ye1 = plane + ye.k1 * width;
          for (int64_t pw = 0; pw < pooled_width; ++pw) {
            const T gv = g[ph * pooled_width + pw];
            if (gv == T(0)) {
              continue;
            }
            const int64_t bx = k * pooled_width + pw;
            const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
            const T* wx = t.x.weights(bx);
            const prroi::Taps<T> xs = t_xs[pw], xe = t_xe[pw];
            // S = integral over the bin; Lx(x) = integral along the vertical line x over [ys, ye]
            T sum = 0, l_xs = 0, l_xe = 0;
            for (int64_t ii = 0; ii < ny; ++ii) {
              const T* row = plane + (y0 + ii) * width;
              T row_sum = 0;
              for (int64_t jj = 0; jj < nx; ++jj) {
                row_sum += wx[jj] * row[x0 + jj];
              }
              sum += wy[ii] * row_sum;
              l_xs += wy[ii] * (xs.w0 * row[xs.k0] + xs.w1 * row[xs.k1]);
              l_xe += wy[ii] * (xe.w0 * row[xe.k0] + xe.w1 * row[xe.k1]);
            }
            // Ly(y) = integral along the horizontal line y over [xs, xe]
            T l_ys = 0, l_ye = 0;
            for (int64_t jj = 0; jj < nx; ++jj) {
              const int64_t j = x0 + jj;
              l_ys += wx[jj] * (ys.w0 * ys0[j] + ys.w1 * ys1[j]);
              l_ye += wx[jj] * (ye.w0 * ye0[j] + ye.w1 * ye1[j]);
            }
            const T out = sum / geo.area;
            g_xs[pw] += gv * (geo.bin_h * out - l_xs);
            g_xe[pw] += gv * (l_xe - geo.bin_h * out);
            g_ys[ph] += gv * (geo.bin_w * out - l_ys);
            g_ye[ph] += gv * (l_ye - geo.bin_w * out);
          }
        }
      }
      // xs = x1' (1 - u) + x2' u, xe = x1' (1 - u') + x2' u' with u = pw / PW, u' = (pw + 1) / PW, x' = s x
      T gx1 = 0, gx2 = 0, gy1 = 0, gy2 = 0;
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        const T u = static_cast<T>(pw) / pooled_width, u1 = static_cast<T>(pw + 1) / pooled_width;
        gx1 += (T(1) - u) * g_xs[pw] + (T(1) - u1) * g_xe[pw];
        gx2 += u * g_xs[pw] + u1 * g_xe[pw];
      }
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        const T u = static_cast<T>(ph) / pooled_height, u1 = static_cast<T>(ph + 1) / pooled_height;
        gy1 += (T(1) - u) * g_ys[ph] + (T(1) - u1) * g_ye[ph];
        gy2 += u * g_ys[ph] + u1 * g_ye[ph];
      }
      const T f = spatial_scale / geo.area;
      T* out = grad_rois + 5 * k;
      out[1] = gx1 * f;
      out[2] = gy1 * f;
      out[3] = gx2 * f;
      out[4] = gy2 * f;
    }
  });
}

at::Tensor prroi_pool_forward_kernel(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                     int64_t pooled_height, int64_t pooled_width, bool aligned) {
  prroi::check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  TORCH_CHECK(input.device().is_cpu(), "prroi_pool: input must be a CPU tensor for the CPU kernel");
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  at::Tensor output = at::zeros({num_rois, channels, pooled_height, pooled_width}, input.options());
  if (num_rois == 0) {
    return output;
  }
  const at::Tensor input_ = input.contiguous(), rois_ = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_forward_cpu", [&] {
    const RoITable<scalar_t> table =
        build_table(rois_.data_ptr<scalar_t>(), num_rois, input.size(0), height, width,
                    static_cast<scalar_t>(spatial_scale), aligned, pooled_height, pooled_width);
    if (output.numel() > 0) {
      forward_impl(input_.data_ptr<scalar_t>(), table, num_rois, channels, height, width, pooled_height,
                   pooled_width, output.data_ptr<scalar_t>());
    }
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
  at::Tensor grad_input = at::zeros(input.sizes(), input.options());
  at::Tensor grad_rois = at::zeros(rois.sizes(), rois.options());
  if (num_rois == 0 || grad.numel() == 0 || !(input_requires_grad || rois_requires_grad)) {
    return std::make_tuple(grad_input, grad_rois);
  }
  const at::Tensor grad_ = grad.contiguous(), input_ = input.contiguous(), rois_ = rois.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_backward_cpu", [&] {
    const RoITable<scalar_t> table =
        build_table(rois_.data_ptr<scalar_t>(), num_rois, input.size(0), height, width,
                    static_cast<scalar_t>(spatial_scale), aligned, pooled_height, pooled_width);
    if (input_requires_grad) {
      backward_input_impl(grad_.data_ptr<scalar_t>(), table, num_rois, channels, height, width, pooled_height,
                          pooled_width, grad_input.data_ptr<scalar_t>());
    }
    if (rois_requires_grad) {
      backward_rois_impl(grad_.data_ptr<scalar_t>(), input_.data_ptr<scalar_t>(), table, num_rois, channels, height,
                         width, pooled_height, pooled_width, static_cast<scalar_t>(spatial_scale),
                         grad_rois.data_ptr<scalar_t>());
    }
  });
  return std::make_tuple(grad_input, grad_rois);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CPU, m) {
  m.impl("prroi_pool", TORCH_FN(prroi_pool_forward_kernel));
  m.impl("_prroi_pool_backward", TORCH_FN(prroi_pool_backward_kernel));
}

}  // namespace d2_refine
