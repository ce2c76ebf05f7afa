// Precise RoI Pooling, CPU kernels (float32 / float64).
//
// A serial pre-pass tabulates, for every RoI and every bin, the non-zero node weights along x and y (the map is
// separable, see prroi_pool_common.h): a few hundred numbers per RoI. The three passes then read that table and
// work on channels-last copies of the map and of the gradient, so that every inner loop is a vectorised axpy over
// channels:
//  - forward: parallel over (RoI, bin row);
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

// The kernels run on a channels-last copy of the map ([N, H, W, C]): all channels share the node weights, so the
// innermost loops are contiguous axpys over channels, which the compiler vectorises.

template <typename T>
inline void axpy(int64_t n, T a, const T* __restrict__ x, T* __restrict__ y) {
  for (int64_t c = 0; c < n; ++c) {
    y[c] += a * x[c];
  }
}

template <typename T>
inline T dot(int64_t n, const T* __restrict__ x, const T* __restrict__ y) {
  T acc[4] = {0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    acc[0] += x[c] * y[c];
    acc[1] += x[c + 1] * y[c + 1];
    acc[2] += x[c + 2] * y[c + 2];
    acc[3] += x[c + 3] * y[c + 3];
  }
  for (; c < n; ++c) {
    acc[0] += x[c] * y[c];
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// sum[0:C] = integral of the bin (RoI k, bin (ph, pw)) for every channel, from the channels-last map.
template <typename T>
inline void bin_integral(const T* input, const RoITable<T>& t, int64_t k, int64_t ph, int64_t pw, int64_t channels,
                         int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width, T* sum) {
  const int64_t by = k * pooled_height + ph, bx = k * pooled_width + pw;
  const int64_t ny = t.y.count(by), y0 = t.y.lo[by], nx = t.x.count(bx), x0 = t.x.lo[bx];
  const T* wy = t.y.weights(by);
  const T* wx = t.x.weights(bx);
  const T* image = input + t.batch[k] * height * width * channels;
  std::fill(sum, sum + channels, T(0));
  for (int64_t ii = 0; ii < ny; ++ii) {
    const T* row = image + ((y0 + ii) * width + x0) * channels;
    for (int64_t jj = 0; jj < nx; ++jj) {
      axpy(channels, wy[ii] * wx[jj], row + jj * channels, sum);
    }
  }
}

// output: [K, PH, PW, C]
template <typename T>
void forward_impl(const T* input, const RoITable<T>& t, int64_t num_rois, int64_t channels, int64_t height,
                  int64_t width, int64_t pooled_height, int64_t pooled_width, T* output) {
  at::parallel_for(0, num_rois * pooled_height, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kp = begin; kp < end; ++kp) {
      const int64_t k = kp / pooled_height, ph = kp % pooled_height;
      const T area = t.geom[k].area;
      if (!(area > T(0))) {
        continue;  // output is zero-initialised
      }
      for (int64_t pw = 0; pw < pooled_width; ++pw) {
        T* out = output + (kp * pooled_width + pw) * channels;
        bin_integral(input, t, k, ph, pw, channels, height, width, pooled_height, pooled_width, out);
        const T inv = T(1) / area;
        for (int64_t c = 0; c < channels; ++c) {
          out[c] *= inv;
        }
      }
    }
  });
}

// grad: [K, PH, PW, C]; grad_input: [N, H, W, C]. Each thread owns a slice of channels of every cell.
template <typename T>
void backward_input_impl(const T* grad, const RoITable<T>& t, int64_t num_rois, int64_t channels, int64_t height,
                         int64_t width, int64_t pooled_height, int64_t pooled_width, T* grad_input) {
  at::parallel_for(0, channels, 16, [&](int64_t begin, int64_t end) {
    const int64_t span = end - begin;
    for (int64_t k = 0; k < num_rois; ++k) {
      const T area = t.geom[k].area;
      if (!(area > T(0))) {
        continue;
      }
      T* image = grad_input + t.batch[k] * height * width * channels + begin;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        const int64_t by = k * pooled_height + ph;
        const int64_t ny = t.y.count(by), y0 = t.y.lo[by];
        const T* wy = t.y.weights(by);
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          const int64_t bx = k * pooled_width + pw;
          const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
          const T* wx = t.x.weights(bx);
          const T* g = grad + ((k * pooled_height + ph) * pooled_width + pw) * channels + begin;
          for (int64_t ii = 0; ii < ny; ++ii) {
            T* row = image + ((y0 + ii) * width + x0) * channels;
            const T gy = wy[ii] / area;
            for (int64_t jj = 0; jj < nx; ++jj) {
              axpy(span, gy * wx[jj], g, row + jj * channels);
            }
          }
        }
      }
    }
  });
}

// d O / d (bin edges) by the spec's closed form, summed over channels and bins, then chained to (x1, y1, x2, y2).
// input and grad channels-last as above.
template <typename T>
void backward_rois_impl(const T* grad, const T* input, const RoITable<T>& t, int64_t num_rois, int64_t channels,
                        int64_t height, int64_t width, int64_t pooled_height, int64_t pooled_width,
                        T spatial_scale, T* grad_rois) {
  at::parallel_for(0, num_rois, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> g_xs(pooled_width), g_xe(pooled_width), g_ys(pooled_height), g_ye(pooled_height);
    std::vector<T> sum(channels), l_xs(channels), l_xe(channels), l_ys(channels), l_ye(channels);
    for (int64_t k = begin; k < end; ++k) {
      const RoIGeometry<T> geo = t.geom[k];
      if (!(geo.area > T(0))) {
        continue;  // zero-area bins and inverted boxes: zero gradient
      }
      std::fill(g_xs.begin(), g_xs.end(), T(0));
      std::fill(g_xe.begin(), g_xe.end(), T(0));
      std::fill(g_ys.begin(), g_ys.end(), T(0));
      std::fill(g_ye.begin(), g_ye.end(), T(0));
      const T* image = input + t.batch[k] * height * width * channels;
      for (int64_t ph = 0; ph < pooled_height; ++ph) {
        const int64_t by = k * pooled_height + ph;
        const int64_t ny = t.y.count(by), y0 = t.y.lo[by];
        const T* wy = t.y.weights(by);
        const T ys_coord = geo.y_start + static_cast<T>(ph) * geo.bin_h;
        const prroi::Taps<T> ys = prroi::line_taps(ys_coord, height);
        const prroi::Taps<T> ye = prroi::line_taps(ys_coord + geo.bin_h, height);
        for (int64_t pw = 0; pw < pooled_width; ++pw) {
          const int64_t bx = k * pooled_width + pw;
          const int64_t nx = t.x.count(bx), x0 = t.x.lo[bx];
          const T* wx = t.x.weights(bx);
          const T xs_coord = geo.x_start + static_cast<T>(pw) * geo.bin_w;
          const prroi::Taps<T> xs = prroi::line_taps(xs_coord, width);
          const prroi::Taps<T> xe = prroi::line_taps(xs_coord + geo.bin_w, width);
          bin_integral(input, t, k, ph, pw, channels, height, width, pooled_height, pooled_width, sum.data());
          // Lx(x): integral along the vertical line x over [ys, ye]; Ly(y): along the horizontal line y
          std::fill(l_xs.begin(), l_xs.end(), T(0));
          std::fill(l_xe.begin(), l_xe.end(), T(0));
          std::fill(l_ys.begin(), l_ys.end(), T(0));
          std::fill(l_ye.begin(), l_ye.end(), T(0));
          for (int64_t ii = 0; ii < ny; ++ii) {
            const T* row = image + (y0 + ii) * width * channels;
            axpy(channels, wy[ii] * xs.w0, row + xs.k0 * channels, l_xs.data());
            axpy(channels, wy[ii] * xs.w1, row + xs.k1 * channels, l_xs.data());
            axpy(channels, wy[ii] * xe.w0, row + xe.k0 * channels, l_xe.data());
            axpy(channels, wy[ii] * xe.w1, row + xe.k1 * channels, l_xe.data());
          }
          for (int64_t jj = 0; jj < nx; ++jj) {
            const int64_t j = x0 + jj;
            axpy(channels, wx[jj] * ys.w0, image + (ys.k0 * width + j) * channels, l_ys.data());
            axpy(channels, wx[jj] * ys.w1, image + (ys.k1 * width + j) * channels, l_ys.data());
            axpy(channels, wx[jj] * ye.w0, image + (ye.k0 * width + j) * channels, l_ye.data());
            axpy(channels, wx[jj] * ye.w1, image + (ye.k1 * width + j) * channels, l_ye.data());
          }
          const T* g = grad + ((k * pooled_height + ph) * pooled_width + pw) * channels;
          // sum_c g (h O - Lx(xs)) with O = S / A, etc.
          const T g_out = dot(channels, g, sum.data()) / geo.area;
          const T g_lxs = dot(channels, g, l_xs.data()), g_lxe = dot(channels, g, l_xe.data());
          const T g_lys = dot(channels, g, l_ys.data()), g_lye = dot(channels, g, l_ye.data());
          g_xs[pw] += geo.bin_h * g_out - g_lxs;
          g_xe[pw] += g_lxe - geo.bin_h * g_out;
          g_ys[ph] += geo.bin_w * g_out - g_lys;
          g_ye[ph] += g_lye - geo.bin_w * g_out;
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

// [N, C, H, W] -> contiguous [N, H, W, C] (free when the tensor is already channels-last)
at::Tensor to_nhwc(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).contiguous();
}

at::Tensor prroi_pool_forward_kernel(const at::Tensor& input, const at::Tensor& rois, double spatial_scale,
                                     int64_t pooled_height, int64_t pooled_width, bool aligned) {
  prroi::check_prroi_pool_args(input, rois, spatial_scale, pooled_height, pooled_width);
  TORCH_CHECK(input.device().is_cpu(), "prroi_pool: input must be a CPU tensor for the CPU kernel");
  const int64_t num_rois = rois.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  if (num_rois == 0 || channels == 0) {
    return at::zeros({num_rois, channels, pooled_height, pooled_width}, input.options());
  }
  const at::Tensor rois_ = rois.contiguous();
  at::Tensor output;  // [K, PH, PW, C], returned as a [K, C, PH, PW] view made contiguous
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_forward_cpu", [&] {
    const RoITable<scalar_t> table =
        build_table(rois_.data_ptr<scalar_t>(), num_rois, input.size(0), height, width,
                    static_cast<scalar_t>(spatial_scale), aligned, pooled_height, pooled_width);
    const at::Tensor input_ = to_nhwc(input);
    output = at::zeros({num_rois, pooled_height, pooled_width, channels}, input.options());
    forward_impl(input_.data_ptr<scalar_t>(), table, num_rois, channels, height, width, pooled_height, pooled_width,
                 output.data_ptr<scalar_t>());
  });
  return output.permute({0, 3, 1, 2}).contiguous();
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
  if (num_rois == 0 || grad.numel() == 0 || !(input_requires_grad || rois_requires_grad)) {
    return std::make_tuple(at::zeros(input.sizes(), input.options()), grad_rois);
  }
  const at::Tensor rois_ = rois.contiguous();
  const at::Tensor grad_ = to_nhwc(grad);  // [K, PH, PW, C]
  at::Tensor grad_input_nhwc = at::zeros({input.size(0), height, width, channels}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "prroi_pool_backward_cpu", [&] {
    const RoITable<scalar_t> table =
        build_table(rois_.data_ptr<scalar_t>(), num_rois, input.size(0), height, width,
                    static_cast<scalar_t>(spatial_scale), aligned, pooled_height, pooled_width);
    if (input_requires_grad) {
      backward_input_impl(grad_.data_ptr<scalar_t>(), table, num_rois, channels, height, width, pooled_height,
                          pooled_width, grad_input_nhwc.data_ptr<scalar_t>());
    }
    if (rois_requires_grad) {
      const at::Tensor input_ = to_nhwc(input);
      backward_rois_impl(grad_.data_ptr<scalar_t>(), input_.data_ptr<scalar_t>(), table, num_rois, channels, height,
                         width, pooled_height, pooled_width, static_cast<scalar_t>(spatial_scale),
                         grad_rois.data_ptr<scalar_t>());
    }
  });
  return std::make_tuple(grad_input_nhwc.permute({0, 3, 1, 2}).contiguous(input.suggest_memory_format()), grad_rois);
}

}  // namespace

TORCH_LIBRARY_IMPL(d2_refine, CPU, m) {
  m.impl("prroi_pool", TORCH_FN(prroi_pool_forward_kernel));
  m.impl("_prroi_pool_backward", TORCH_FN(prroi_pool_backward_kernel));
}

}  // namespace d2_refine
