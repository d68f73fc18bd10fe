// ExplainResponse / ModelInfo messages -> the public result types (client/sdk.py's
// explanations() and client/models.py).
#include <cstring>

#include "internal.hpp"

namespace camserve::detail {
namespace {

[[noreturn]] void malformed(const std::string& why) {
  throw Error(StatusCode::INTERNAL, "malformed response: " + why);
}

Box box(const pb::Box& b) { return Box{b.x0(), b.y0(), b.x1(), b.y1()}; }

}  // namespace

float halfToFloat(std::uint16_t half) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  std::uint32_t exponent = (half >> 10) & 0x1Fu;
  std::uint32_t mantissa = half & 0x3FFu;
  std::uint32_t bits;
  if (exponent == 0x1F) {  // inf, NaN
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // zero
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

Map decodeMap(const pb::Tensor& tensor) {
  if (tensor.shape_size() != 2 || tensor.shape(0) <= 0 || tensor.shape(1) <= 0)
    malformed("a map must be a non-empty [h, w] tensor");
  Map map;
  map.height = static_cast<int>(tensor.shape(0));
  map.width = static_cast<int>(tensor.shape(1));
  const std::size_t count = static_cast<std::size_t>(map.height) * map.width;
  const std::string& data = tensor.data();
  const auto* bytes = reinterpret_cast<const unsigned char*>(data.data());
  map.data.resize(count);
  // the wire is little-endian (as every platform this targets)
  switch (tensor.dtype()) {
    case pb::FLOAT32:
      if (data.size() != count * 4) malformed("float32 map of the wrong size");
      std::memcpy(map.data.data(), bytes, count * 4);
      break;
    case pb::FLOAT16:
      if (data.size() != count * 2) malformed("float16 map of the wrong size");
      for (std::size_t i = 0; i < count; ++i)
        map.data[i] = halfToFloat(static_cast<std::uint16_t>(bytes[2 * i] | bytes[2 * i + 1] << 8));
      break;
    case pb::UINT8:
      if (data.size() != count) malformed("uint8 map of the wrong size");
      for (std::size_t i = 0; i < count; ++i)
        map.data[i] = static_cast<float>(bytes[i]) / 255.0f;
      break;
    default:
      malformed("a map of dtype " + std::to_string(tensor.dtype()));
  }
  return map;
}

Result toResult(const pb::ExplainResponse& response) {
  Result result;
  result.request_id = response.request_id();
  result.model = response.model();
  result.model_version = response.model_version();
  result.method = response.method();
  result.layers.assign(response.layers().begin(), response.layers().end());
  const pb::Geometry& g = response.geometry();
  result.geometry = Geometry{g.original_height(), g.original_width(), g.resized_height(),
                             g.resized_width(), box(g.crop())};
  const pb::Timings& t = response.timings();
  result.timings = Timings{t.decode_us(), t.preprocess_us(), t.inference_us(),
                           t.postprocess_us()};
  result.skipped = response.skipped();
  result.skip_reason = response.skip_reason();
  if (response.has_error()) {
    result.code = static_cast<StatusCode>(response.error().code());
    if (result.code == StatusCode::OK) result.code = StatusCode::UNKNOWN;
    result.message = response.error().message();
    return result;
  }
  const Box& crop = result.geometry.crop;
  for (const pb::Target& target : response.targets()) {
    Explanation e;
    e.class_index = target.class_index();
    e.label = target.label();
    e.logit = target.logit();
    e.probability = target.probability();
    e.geometry = result.geometry;
    e.request_id = result.request_id;
    e.model = result.model;
    e.method = result.method;
    if (target.has_cam()) {
      // a layer-grid (FEATURE_MAP) map is upsampled to the crop here, as in the Python SDK
      Map map = decodeMap(target.cam());
      const int height = crop.y1 - crop.y0, width = crop.x1 - crop.x0;
      e.cam_input = height > 0 && width > 0 ? resizeMap(map, height, width) : std::move(map);
    }
    for (const pb::Region& r : target.regions()) {
      Region region;
      region.polygon.reserve(static_cast<std::size_t>(r.polygon_size()));
      for (const pb::Point& p : r.polygon()) region.polygon.push_back(Point{p.x(), p.y()});
      region.box = box(r.box());
      region.area = r.area();
      region.peak = r.peak();
      e.regions.push_back(std::move(region));
    }
    result.explanations.push_back(std::move(e));
  }
  return result;
}

ModelInfo toModelInfo(const pb::ModelInfo& m) {
  ModelInfo info;
  info.name = m.name();
  info.version = m.version();
  info.architecture = m.architecture();
  info.labels.assign(m.labels().begin(), m.labels().end());
  info.input_shape.assign(m.input_shape().begin(), m.input_shape().end());
  const pb::Preprocessing& p = m.preprocessing();
  info.preprocessing.resize = p.resize();
  info.preprocessing.crop_height = p.crop_height();
  info.preprocessing.crop_width = p.crop_width();
  info.preprocessing.mean.assign(p.mean().begin(), p.mean().end());
  info.preprocessing.std.assign(p.std().begin(), p.std().end());
  info.preprocessing.scale = p.scale();
  info.preprocessing.channel_order = p.channel_order();
  info.preprocessing.interpolation = p.interpolation();
  info.preprocessing.grayscale = p.grayscale();
  for (const pb::LayerInfo& layer : m.layers())
    info.layers.push_back(LayerInfo{layer.name(), {layer.shape().begin(), layer.shape().end()}});
  info.methods.assign(m.methods().begin(), m.methods().end());
  info.contract_version = m.contract_version();
  info.execution_provider = m.execution_provider();
  info.camserve_version = m.camserve_version();
  for (int format : m.pixel_formats())
    if (format >= 1 && format <= 8) info.pixel_formats.push_back(static_cast<PixelFormat>(format));
  return info;
}

}  // namespace camserve::detail
