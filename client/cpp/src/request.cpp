// Images and options -> an ExplainRequest (the C++ side of client/options.py).
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include "internal.hpp"

namespace camserve {

Image Image::encoded(std::string bytes) {
  Image image;
  image.encoded_ = std::move(bytes);
  return image;
}

Image Image::encoded(const void* data, std::size_t size) {
  return encoded(std::string(static_cast<const char*>(data), size));
}

Image Image::file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(StatusCode::INVALID_ARGUMENT, "cannot read an image from '" + path + "'");
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (!in.good() && !in.eof())
    throw Error(StatusCode::INVALID_ARGUMENT, "cannot read an image from '" + path + "'");
  return encoded(bytes.str());
}

Image Image::raw(const RawFrame& frame) {
  Image image;
  image.raw_ = frame;
  return image;
}

#if CAMSERVE_WITH_OPENCV
Image Image::mat(const cv::Mat& mat) {
  PixelFormat format;
  switch (mat.type()) {
    case CV_8UC3: format = PixelFormat::BGR8; break;
    case CV_8UC4: format = PixelFormat::BGRA8; break;
    case CV_8UC1: format = PixelFormat::MONO8; break;
    default:
      throw Error(StatusCode::INVALID_ARGUMENT,
                  "a cv::Mat frame must be CV_8UC3 (BGR), CV_8UC4 (BGRA) or CV_8UC1 (grey), "
                  "got type " + std::to_string(mat.type()));
  }
  if (mat.dims != 2 || mat.empty())
    throw Error(StatusCode::INVALID_ARGUMENT, "a cv::Mat frame must be a non-empty 2-D image");
  Image image;
  image.keep_ = mat;  // a header: shares the pixels, keeps them alive
  const std::size_t row = static_cast<std::size_t>(mat.cols) * mat.elemSize();
  image.raw_.data = mat.data;
  image.raw_.size = mat.step[0] * static_cast<std::size_t>(mat.rows - 1) + row;
  image.raw_.width = static_cast<std::uint32_t>(mat.cols);
  image.raw_.height = static_cast<std::uint32_t>(mat.rows);
  image.raw_.format = format;
  image.raw_.step = static_cast<std::uint32_t>(mat.step[0]);
  return image;
}
#endif

namespace detail {
namespace {

[[noreturn]] void refuse(const std::string& why) {
  throw Error(StatusCode::INVALID_ARGUMENT, why);
}

// Bytes of one packed row of the (first) plane.
std::size_t packedRow(PixelFormat format, std::size_t width) {
  switch (format) {
    case PixelFormat::RGB8: case PixelFormat::BGR8: return 3 * width;
    case PixelFormat::RGBA8: case PixelFormat::BGRA8: return 4 * width;
    case PixelFormat::YUYV: return 2 * width;
    case PixelFormat::MONO8: case PixelFormat::NV12: case PixelFormat::I420: return width;
  }
  refuse("unknown pixel format " + std::to_string(static_cast<int>(format)));
}

// RawImage from a frame: `height` rows of `step` bytes (plus the chroma planes of NV12 and
// I420), copied once; a last row the caller's buffer cuts short (a cv::Mat ROI) is padded.
void fillPixels(pb::RawImage& out, const RawFrame& frame) {
  if (frame.data == nullptr || frame.width == 0 || frame.height == 0)
    refuse("the raw frame is empty (no data, or a zero width or height)");
  const bool yuv420 = frame.format == PixelFormat::NV12 || frame.format == PixelFormat::I420;
  if ((frame.format == PixelFormat::YUYV || yuv420) && frame.width % 2 != 0)
    refuse(std::string(pixelFormatName(frame.format)) + " needs an even width");
  if (yuv420 && frame.height % 2 != 0)
    refuse(std::string(pixelFormatName(frame.format)) + " needs an even height");
  const std::size_t row = packedRow(frame.format, frame.width);
  const std::size_t step = frame.step ? frame.step : row;
  if (step < row)
    refuse("the row step (" + std::to_string(step) + " bytes) is shorter than a row of " +
           std::to_string(frame.width) + " " + pixelFormatName(frame.format) + " pixels (" +
           std::to_string(row) + " bytes)");
  if (frame.format == PixelFormat::I420 && step % 2 != 0)
    refuse("I420 needs an even row step (its chroma rows are step / 2 bytes)");
  const std::size_t rows = yuv420 ? frame.height + frame.height / 2 : frame.height;
  const std::size_t needed = step * rows;
  // the last row may stop at its pixels (an OpenCV ROI); planar formats need whole planes
  const std::size_t least = yuv420 ? needed : needed - (step - row);
  if (frame.size < least)
    refuse("the raw frame has " + std::to_string(frame.size) + " bytes; " +
           std::to_string(frame.width) + "x" + std::to_string(frame.height) + " " +
           pixelFormatName(frame.format) + " with a step of " + std::to_string(step) +
           " needs " + std::to_string(needed));
  out.set_width(frame.width);
  out.set_height(frame.height);
  out.set_format(static_cast<pb::PixelFormat>(static_cast<int>(frame.format)));
  out.set_step(frame.step);
  std::string* pixels = out.mutable_pixels();
  const std::size_t copied = std::min(frame.size, needed);
  pixels->reserve(needed);
  pixels->assign(reinterpret_cast<const char*>(frame.data), copied);
  pixels->append(needed - copied, '\0');
}

pb::LayerFusion fusion(Fusion value) {
  switch (value) {
    case Fusion::Mean: return pb::MEAN;
    case Fusion::Sum: return pb::SUM;
    case Fusion::Max: return pb::MAX;
  }
  refuse("unknown fusion");
}

}  // namespace

void fillRequest(pb::ExplainRequest& request, const Image& image, const ExplainOptions& o) {
  if (o.noise_sigma < 0) refuse("noise_sigma must be >= 0");
  if (o.regions.enabled && (o.regions.threshold < 0 || o.regions.threshold > 1))
    refuse("regions.threshold must be in (0, 1] (0: the server's default)");
  request.set_model(o.model);
  request.set_request_id(o.request_id);
  for (std::int64_t target : o.targets) request.add_classes(target);
  request.set_top_k(o.top_k ? *o.top_k : (o.targets.empty() ? 1u : 0u));
  request.set_method(o.method);
  for (const std::string& layer : o.layers) request.add_layers(layer);
  request.set_fusion(fusion(o.fusion));

  pb::OutputOptions* output = request.mutable_output();
  switch (o.space) {
    case MapSpace::ModelInput: output->set_space(pb::MODEL_INPUT); break;
    case MapSpace::FeatureMap: output->set_space(pb::FEATURE_MAP); break;
    case MapSpace::None: output->set_space(pb::NO_MAP); break;
  }
  switch (o.dtype) {
    case MapDType::Auto: output->set_dtype(o.normalize ? pb::FLOAT16 : pb::FLOAT32); break;
    case MapDType::Float32: output->set_dtype(pb::FLOAT32); break;
    case MapDType::Float16: output->set_dtype(pb::FLOAT16); break;
    case MapDType::UInt8: output->set_dtype(pb::UINT8); break;
  }
  if (o.regions.enabled) {
    pb::RegionOptions* regions = output->mutable_regions();
    regions->set_enabled(true);
    regions->set_threshold(o.regions.threshold);
    regions->set_max_regions(o.regions.max_regions);
    regions->set_min_area(o.regions.min_area);
  }
  pb::Smoothing* smoothing = request.mutable_smoothing();
  smoothing->set_noise_samples(o.noise_samples);
  smoothing->set_noise_sigma(o.noise_sigma);
  smoothing->set_horizontal_flip(o.flip);
  smoothing->set_seed(o.seed);
  request.set_raw_maps(!o.normalize);
  pb::IntegratedGradients* ig = request.mutable_integrated_gradients();
  ig->set_steps(o.ig_steps);
  ig->set_baseline(o.ig_baseline == IgBaseline::Zero ? pb::IntegratedGradients::ZERO
                                                     : pb::IntegratedGradients::BLACK);

  if (image.isEncoded()) {
    request.set_encoded(image.encodedBytes());
  } else {
    fillPixels(*request.mutable_pixels(), image.rawFrame());
  }
}

}  // namespace detail
}  // namespace camserve
