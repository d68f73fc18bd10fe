// Status names, pixel format names and the Error type.
#include "camserve/client.hpp"

namespace camserve {

const char* statusName(StatusCode code) noexcept {
  static const char* const names[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
      "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
      "UNAUTHENTICATED"};
  const int index = static_cast<int>(code);
  return index >= 0 && index <= 16 ? names[index] : "UNKNOWN";
}

const char* pixelFormatName(PixelFormat format) noexcept {
  switch (format) {
    case PixelFormat::RGB8: return "RGB8";
    case PixelFormat::BGR8: return "BGR8";
    case PixelFormat::RGBA8: return "RGBA8";
    case PixelFormat::BGRA8: return "BGRA8";
    case PixelFormat::MONO8: return "MONO8";
    case PixelFormat::YUYV: return "YUYV";
    case PixelFormat::NV12: return "NV12";
    case PixelFormat::I420: return "I420";
  }
  return "UNSPECIFIED";
}

Error::Error(StatusCode code, std::string message, std::string request_id)
    : std::runtime_error(std::string(statusName(code)) + ": " + message),
      code_(code), message_(std::move(message)), request_id_(std::move(request_id)) {}

}  // namespace camserve
