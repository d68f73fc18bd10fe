// Maps back onto the photo (camserve/explain/geometry.py) and the colours drawn from them
// (client/explanation.py: heatmap, overlay).
#include <algorithm>
#include <cmath>

#include "internal.hpp"

namespace camserve {
namespace detail {
namespace {

// Source index and weight of the second sample, for destination index `d` (OpenCV's rule:
// pixel centres aligned, clamped at the borders).
void sample(int d, double scale, int size, int& index, float& weight) {
  float f = static_cast<float>((d + 0.5) * scale - 0.5);
  int i = static_cast<int>(std::floor(f));
  f -= static_cast<float>(i);
  if (i < 0) { i = 0; f = 0.0f; }
  if (i >= size - 1) { i = size - 1; f = 0.0f; }
  index = i;
  weight = f;
}

}  // namespace

Map resizeMapPortable(const Map& map, int height, int width) {
  Map out;
  out.height = height;
  out.width = width;
  out.data.assign(static_cast<std::size_t>(height) * width, 0.0f);
  const double sx = static_cast<double>(map.width) / width;
  const double sy = static_cast<double>(map.height) / height;
  std::vector<int> xi(static_cast<std::size_t>(width));
  std::vector<float> xw(static_cast<std::size_t>(width));
  for (int x = 0; x < width; ++x) sample(x, sx, map.width, xi[x], xw[x]);
  std::vector<float> row0(static_cast<std::size_t>(width)), row1(row0.size());
  auto horizontal = [&](int y, std::vector<float>& row) {
    const float* src = map.data.data() + static_cast<std::size_t>(y) * map.width;
    for (int x = 0; x < width; ++x) {
      const int i = xi[x];
      const int j = std::min(i + 1, map.width - 1);
      row[x] = src[i] * (1.0f - xw[x]) + src[j] * xw[x];
    }
  };
  for (int y = 0; y < height; ++y) {
    int i;
    float w;
    sample(y, sy, map.height, i, w);
    horizontal(i, row0);
    horizontal(std::min(i + 1, map.height - 1), row1);
    float* dst = out.data.data() + static_cast<std::size_t>(y) * width;
    for (int x = 0; x < width; ++x) dst[x] = row0[x] * (1.0f - w) + row1[x] * w;
  }
  return out;
}

}  // namespace detail

Map resizeMap(const Map& map, int height, int width) {
  if (height <= 0 || width <= 0 || map.empty())
    throw Error(StatusCode::INVALID_ARGUMENT, "resizeMap needs a map and a positive size");
  if (map.height == height && map.width == width) return map;
#if CAMSERVE_WITH_OPENCV
  const cv::Mat src(map.height, map.width, CV_32FC1, const_cast<float*>(map.data.data()));
  Map out;
  out.height = height;
  out.width = width;
  out.data.resize(static_cast<std::size_t>(height) * width);
  cv::Mat dst(height, width, CV_32FC1, out.data.data());
  cv::resize(src, dst, dst.size(), 0, 0, cv::INTER_LINEAR);
  return out;
#else
  return detail::resizeMapPortable(map, height, width);
#endif
}

Map toOriginal(const Map& cam_input, const Geometry& g) {
  if (cam_input.empty()) return cam_input;
  const Box& c = g.crop;
  const int rh = static_cast<int>(g.resized_height), rw = static_cast<int>(g.resized_width);
  if (c.x0 < 0 || c.y0 < 0 || c.x1 > rw || c.y1 > rh || c.x1 <= c.x0 || c.y1 <= c.y0)
    throw Error(StatusCode::INTERNAL, "the response's geometry has a crop outside the image");
  const Map inside = resizeMap(cam_input, c.y1 - c.y0, c.x1 - c.x0);
  Map canvas;
  canvas.height = rh;
  canvas.width = rw;
  canvas.data.assign(static_cast<std::size_t>(rh) * rw, 0.0f);
  for (int y = 0; y < inside.height; ++y)
    std::copy_n(inside.data.data() + static_cast<std::size_t>(y) * inside.width, inside.width,
                canvas.data.data() + static_cast<std::size_t>(y + c.y0) * rw + c.x0);
  return resizeMap(canvas, static_cast<int>(g.original_height),
                   static_cast<int>(g.original_width));
}

#if CAMSERVE_WITH_OPENCV
cv::Mat Explanation::camMat() const {
  Map map = cam();
  if (map.empty()) return cv::Mat();
  return cv::Mat(map.height, map.width, CV_32FC1, map.data.data()).clone();
}

cv::Mat Explanation::heatmap(int colormap) const {
  const Map map = cam();
  if (map.empty()) throw Error(StatusCode::INVALID_ARGUMENT, "this explanation has no map");
  cv::Mat scaled(map.height, map.width, CV_8UC1);
  auto* out = scaled.ptr<std::uint8_t>();  // continuous: a fresh Mat
  for (std::size_t i = 0; i < map.data.size(); ++i) {
    // np.rint(np.clip(cam, 0, 1) * 255) in float32: round half to even
    const float v = std::min(std::max(map.data[i], 0.0f), 1.0f) * 255.0f;
    out[i] = static_cast<std::uint8_t>(std::nearbyint(v));
  }
  cv::Mat colours;
  cv::applyColorMap(scaled, colours, colormap);  // BGR
  return colours;
}

cv::Mat Explanation::overlay(const cv::Mat& image, double alpha, int colormap) const {
  cv::Mat bgr;
  if (image.type() == CV_8UC1) {
    cv::cvtColor(image, bgr, cv::COLOR_GRAY2BGR);
  } else if (image.type() == CV_8UC3) {
    bgr = image;
  } else {
    throw Error(StatusCode::INVALID_ARGUMENT, "overlay needs a CV_8UC3 (BGR) or CV_8UC1 image");
  }
  if (bgr.rows != static_cast<int>(geometry.original_height) ||
      bgr.cols != static_cast<int>(geometry.original_width))
    throw Error(StatusCode::INVALID_ARGUMENT,
                "image is " + std::to_string(bgr.cols) + "x" + std::to_string(bgr.rows) +
                " but the explained photo was " + std::to_string(geometry.original_width) +
                "x" + std::to_string(geometry.original_height));
  cv::Mat blended;
  cv::addWeighted(bgr, 1.0 - alpha, heatmap(colormap), alpha, 0.0, blended);
  return blended;
}
#endif

}  // namespace camserve
