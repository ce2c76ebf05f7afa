// Precise RoI Pooling, CPU kernels: the per-RoI precomputation shared by the forward and the backward (node
// weights and line taps of every bin for the direct path, corner taps for the table path, the path of each RoI).
//
// Table path: differences of G, the integral of f from the summed-area table (corner_taps, prroi_pool_corner.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "prroi_pool/prroi_pool_checks.h"
#include "prroi_pool/prroi_pool_common.h"
#include "prroi_pool/prroi_pool_corner.h"

namespace d2_refine {
namespace prroi {
namespace cpu {

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

template <typename T>
struct RoITable {
  int64_t num_rois, num_images, height, width, pooled_height, pooled_width;
  std::vector<int64_t> batch;
  std::vector<RoIGeometry<T>> geom;
  std::vector<Path> path;
  AxisTable<T> x, y;               // node weights of every bin (read by the direct path)
  std::vector<Taps<T>> x_taps, y_taps;  // line taps of every bin's start and end edges, [roi][bin][2]
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
      fail_batch_index(b, k, num_images);
    }
    const int64_t n = static_cast<int64_t>(b);
    t.batch[k] = n;
    const RoIGeometry<T> g = roi_geometry(roi, spatial_scale, aligned, pooled_height, pooled_width);
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
      t.x_taps[(k * pooled_width + pw) * 2] = line_taps(xs, width);
      t.x_taps[(k * pooled_width + pw) * 2 + 1] = line_taps(xs + g.bin_w, width);
    }
    for (int64_t ph = 0; ph < pooled_height; ++ph) {
      const T ys = g.y_start + static_cast<T>(ph) * g.bin_h;
      t.y_taps[(k * pooled_height + ph) * 2] = line_taps(ys, height);
      t.y_taps[(k * pooled_height + ph) * 2 + 1] = line_taps(ys + g.bin_h, height);
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

}  // namespace cpu
}  // namespace prroi
}  // namespace d2_refine
