// Between the public types and the generated protobuf messages (not installed).
#pragma once

#include <cstdint>
#include <string>

#include "camserve/client.hpp"
#include "camserve/v1/explainer.pb.h"

namespace camserve::detail {

namespace pb = ::camserve::v1;

// The ExplainRequest for `image` with `options` (checked here: INVALID_ARGUMENT).
void fillRequest(pb::ExplainRequest& request, const Image& image, const ExplainOptions& options);

// An ExplainResponse -> Result: maps decoded to float32 and brought to the crop size.
Result toResult(const pb::ExplainResponse& response);
ModelInfo toModelInfo(const pb::ModelInfo& info);

// A wire map tensor (float32, float16, or uint8 = map * 255) -> float32 [h, w].
Map decodeMap(const pb::Tensor& tensor);
float halfToFloat(std::uint16_t half) noexcept;

// The bilinear resize without OpenCV (cv::resize INTER_LINEAR's sampling rule).
Map resizeMapPortable(const Map& map, int height, int width);

}  // namespace camserve::detail
