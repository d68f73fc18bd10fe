// camserve C++ client: Grad-CAM explanations from a `camserve serve` server over gRPC.
//
// The C++ twin of the Python SDK (client/sdk.py): the same channel settings (keepalive,
// retries of UNAVAILABLE, a 30 s default deadline), the same explain options
// (client/options.py) and the same maps, heatmaps and overlays (client/explanation.py).
// This header needs neither gRPC nor protobuf; with CAMSERVE_WITH_OPENCV it adds cv::Mat
// helpers. The library prints nothing; every failure is a camserve::Error.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if CAMSERVE_WITH_OPENCV
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
#endif

namespace camserve {

// --- errors ----------------------------------------------------------------------------------

// gRPC's status codes (the values of grpc::StatusCode and of the proto's Error.code).
enum class StatusCode : int {
  OK = 0, CANCELLED = 1, UNKNOWN = 2, INVALID_ARGUMENT = 3, DEADLINE_EXCEEDED = 4,
  NOT_FOUND = 5, ALREADY_EXISTS = 6, PERMISSION_DENIED = 7, RESOURCE_EXHAUSTED = 8,
  FAILED_PRECONDITION = 9, ABORTED = 10, OUT_OF_RANGE = 11, UNIMPLEMENTED = 12, INTERNAL = 13,
  UNAVAILABLE = 14, DATA_LOSS = 15, UNAUTHENTICATED = 16,
};

// "UNAVAILABLE", "DEADLINE_EXCEEDED"...
const char* statusName(StatusCode code) noexcept;

// A refused or failed call: the gRPC status and the server's message. Arguments the client
// refuses before sending (a bad option, an empty frame) are INVALID_ARGUMENT.
class Error : public std::runtime_error {
 public:
  Error(StatusCode code, std::string message, std::string request_id = "");
  StatusCode code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }  // the server's words
  const std::string& requestId() const noexcept { return request_id_; }

 private:
  StatusCode code_;
  std::string message_;
  std::string request_id_;
};

// --- the channel -------------------------------------------------------------------------------

struct ClientOptions {
  // Each call's deadline (gRPC has none by default); ExplainOptions::deadline overrides it.
  std::chrono::milliseconds deadline{30000};
  std::string token;  // bearer token of a server started with --auth-token-file
  std::vector<std::pair<std::string, std::string>> metadata;  // sent on every call
  // TLS: on when `tls` is set or any PEM below is given. root_certs: the CA bundle to trust
  // (empty: the system's); client_cert + client_key: for a server that asks for mutual TLS.
  bool tls = false;
  std::string root_certs;
  std::string client_cert;
  std::string client_key;
  std::string tls_server_name;  // override the name checked in the server's certificate
  int max_message_bytes = 64 * 1024 * 1024;
  bool retries = true;  // retry UNAVAILABLE (exponential backoff, the Python SDK's policy)
};

// --- images ------------------------------------------------------------------------------------

// How a raw frame's bytes hold its pixels (the proto's PixelFormat; ROS 2 encodings).
enum class PixelFormat : int {
  RGB8 = 1, BGR8 = 2, RGBA8 = 3, BGRA8 = 4, MONO8 = 5, YUYV = 6, NV12 = 7, I420 = 8,
};
const char* pixelFormatName(PixelFormat format) noexcept;

// A camera frame as its driver hands it over: `height` rows of `step` bytes (0: packed).
// NV12/I420 hold their chroma planes after the Y plane, with the same `step` (I420: step/2).
struct RawFrame {
  const std::uint8_t* data = nullptr;  // not owned: must live until the call returns
  std::size_t size = 0;                // bytes at `data`
  std::uint32_t width = 0;
  std::uint32_t height = 0;
  PixelFormat format = PixelFormat::RGB8;
  std::uint32_t step = 0;
};

// One image to explain: encoded file bytes (JPEG, PNG, WebP, BMP), a raw frame, or a
// cv::Mat. Raw frames and Mats are views: their pixels are copied once, into the request.
class Image {
 public:
  static Image encoded(std::string bytes);
  static Image encoded(const void* data, std::size_t size);
  static Image file(const std::string& path);  // the file's bytes; Error if unreadable
  static Image raw(const RawFrame& frame);
#if CAMSERVE_WITH_OPENCV
  // CV_8UC3 is BGR8 (OpenCV's order), CV_8UC4 BGRA8, CV_8UC1 MONO8; sent with the Mat's row
  // step (an ROI is sent without a copy of its own). The Mat must outlive the call.
  static Image mat(const cv::Mat& image);
#endif

  bool isEncoded() const noexcept { return !encoded_.empty(); }
  const std::string& encodedBytes() const noexcept { return encoded_; }
  const RawFrame& rawFrame() const noexcept { return raw_; }

 private:
  std::string encoded_;
  RawFrame raw_;
#if CAMSERVE_WITH_OPENCV
  cv::Mat keep_;  // holds a Mat's buffer alive while the Image lives
#endif
};

// --- options -------------------------------------------------------------------------------------

enum class Fusion { Mean, Sum, Max };                 // how several layers' maps become one
enum class MapSpace { ModelInput, FeatureMap, None };  // None: no map, regions only
enum class MapDType { Auto, Float32, Float16, UInt8 };  // Auto: float16, float32 if !normalize
enum class IgBaseline { Black, Zero };

// Regions the server finds in each map (polygons, boxes) at or above `threshold`.
struct RegionOptions {
  bool enabled = false;
  float threshold = 0.0f;         // 0: the server's 0.6
  std::uint32_t max_regions = 0;  // 0: 16
  float min_area = 0.0f;          // original-image pixels
};

// Every option of one explanation, as the Python SDK's ExplainOptions (same defaults).
struct ExplainOptions {
  std::string model;                  // empty: the server's default model
  std::vector<std::int64_t> targets;  // explicit classes, explained first
  std::optional<std::uint32_t> top_k;  // unset: 1 without targets, else 0
  std::string method = "gradcam";
  std::vector<std::string> layers;  // empty: every layer the model explains
  Fusion fusion = Fusion::Mean;
  std::uint32_t noise_samples = 0;  // smoothing: noisy copies averaged
  float noise_sigma = 0.15f;
  bool flip = false;
  std::uint64_t seed = 0;
  bool normalize = true;  // false: raw ReLU'd maps (sent as float32)
  std::uint32_t ig_steps = 0;  // integrated_gradients; 0: the server's default
  IgBaseline ig_baseline = IgBaseline::Black;
  MapSpace space = MapSpace::ModelInput;
  MapDType dtype = MapDType::Auto;
  RegionOptions regions;
  std::string request_id;  // echoed back
  std::chrono::milliseconds deadline{0};  // 0: the client's
};

// --- results -------------------------------------------------------------------------------------

struct Point { std::int32_t x = 0, y = 0; };
struct Box { std::int32_t x0 = 0, y0 = 0, x1 = 0, y1 = 0; };  // x1, y1 exclusive

// A connected area of a map at or above the threshold, in the sent image's pixels.
struct Region {
  std::vector<Point> polygon;
  Box box;
  float area = 0.0f;
  float peak = 0.0f;
};

// original (height, width) -> resized -> crop box (in resized pixels) -> model input.
struct Geometry {
  std::uint32_t original_height = 0, original_width = 0;
  std::uint32_t resized_height = 0, resized_width = 0;
  Box crop;
};

// A float32 map, row-major [height, width].
struct Map {
  int height = 0;
  int width = 0;
  std::vector<float> data;
  bool empty() const noexcept { return data.empty(); }
  float at(int y, int x) const { return data[static_cast<std::size_t>(y) * width + x]; }
};

// Bilinear resize (cv::resize INTER_LINEAR's rule), the one the server and the Python SDK use.
Map resizeMap(const Map& map, int height, int width);
// A map at the crop's size -> the original image's grid: into the crop box of a zero canvas
// of the resized size, then the canvas resized to the original size (Python's to_original).
Map toOriginal(const Map& cam_input, const Geometry& geometry);

// One target of one image.
struct Explanation {
  std::int64_t class_index = 0;
  std::string label;
  float logit = 0.0f;
  float probability = 0.0f;
  Map cam_input;  // in [0, 1] at the crop (model input) size; empty for MapSpace::None
  Geometry geometry;
  std::vector<Region> regions;  // when RegionOptions::enabled, largest peak first
  std::string request_id, model, method;

  // The map on the original image's pixel grid [H0, W0] (zero where the crop cut it).
  Map cam() const { return toOriginal(cam_input, geometry); }
#if CAMSERVE_WITH_OPENCV
  cv::Mat camMat() const;  // CV_32FC1 [H0, W0]
  // The map as colours, BGR uint8 [H0, W0, 3] (the Python SDK's pixels, in OpenCV's order).
  cv::Mat heatmap(int colormap = cv::COLORMAP_JET) const;
  // (1 - alpha) * image + alpha * heatmap; `image` BGR CV_8UC3 (or CV_8UC1) of the sent size.
  cv::Mat overlay(const cv::Mat& image, double alpha = 0.5,
                  int colormap = cv::COLORMAP_JET) const;
#endif
};

struct Timings { std::uint64_t decode_us = 0, preprocess_us = 0, inference_us = 0,
                 postprocess_us = 0; };

// One answer: an image's explanations, one per target (explicit targets first, then top_k).
struct Result {
  std::string request_id, model, model_version, method;
  std::vector<std::string> layers;
  Geometry geometry;
  Timings timings;
  std::vector<Explanation> explanations;
  // explainStream only: a frame the server refused (code != OK, no explanations).
  StatusCode code = StatusCode::OK;
  std::string message;
  // explainStream only: a frame the server answered without explaining it (real-time
  // stream options: replaced by a newer frame, or its deadline passed).
  bool skipped = false;
  std::string skip_reason;
  bool ok() const noexcept { return code == StatusCode::OK; }
};

struct Preprocessing {
  std::uint32_t resize = 0, crop_height = 0, crop_width = 0;
  std::vector<float> mean, std;
  float scale = 0.0f;
  std::string channel_order, interpolation, grayscale;
};
struct LayerInfo { std::string name; std::vector<std::int64_t> shape; };  // C, h, w
struct ModelInfo {
  std::string name, version, architecture;
  std::vector<std::string> labels;
  std::vector<std::int64_t> input_shape;  // [1, 3, H, W]
  Preprocessing preprocessing;
  std::vector<LayerInfo> layers;
  std::vector<std::string> methods;
  std::uint32_t contract_version = 0;
  std::string execution_provider, camserve_version;
  std::vector<PixelFormat> pixel_formats;  // raw frame formats the server accepts
};

// --- the client -----------------------------------------------------------------------------------

// A bidirectional ExplainStream: write frames, read one Result per frame, in order. write and
// read may run on two threads (one writer, one reader). Destroying an unfinished stream
// cancels it.
class ExplainStream {
 public:
  struct Impl;
  explicit ExplainStream(std::unique_ptr<Impl> impl);
  ~ExplainStream();
  ExplainStream(const ExplainStream&) = delete;
  ExplainStream& operator=(const ExplainStream&) = delete;

  bool write(const Image& image, const ExplainOptions& options = {});  // false: stream closed
  bool writesDone();                // no more frames
  bool read(Result& result);        // false: no more responses; then call finish()
  void finish();                    // Error unless the stream ended OK
  void cancel() noexcept;

 private:
  std::unique_ptr<Impl> impl_;
};

class Client {
 public:
  explicit Client(const std::string& target, ClientOptions options = {});  // "host:port"
  ~Client();
  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Explain one image: one Explanation per target. Error on a refused call.
  Result explain(const Image& image, const ExplainOptions& options = {}) const;
  // Frames over one stream; `on_result` gets one Result per frame, in order (a refused frame
  // as a Result with code != OK; the stream goes on). A frame without a request id gets its
  // index. Error if the stream itself fails.
  void explainStream(const std::vector<Image>& frames,
                     const std::function<void(const Result&)>& on_result,
                     const ExplainOptions& options = {}) const;
  // The stream as a writer/reader pair; `deadline` 0: the client's.
  std::unique_ptr<ExplainStream> openStream(std::chrono::milliseconds deadline =
                                                std::chrono::milliseconds{0}) const;
  std::vector<ModelInfo> listModels() const;
  ModelInfo getModel(const std::string& name = "") const;  // "": the default model
  // grpc.health.v1 status of the server ("") or a model: "SERVING", "NOT_SERVING"...
  std::string health(const std::string& service = "") const;

  const ClientOptions& options() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace camserve
