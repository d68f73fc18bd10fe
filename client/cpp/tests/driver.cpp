// Test driver for tests/integration/test_cpp.py: one command per run, one JSON object on
// stdout. Maps go to raw float32 files, overlays to PNG files, for pytest to compare with
// the Python SDK.
//
//   driver explain --server S --image P --out DIR [--target C]... [--top-k K] [--model M]
//                  [--method M] [--mat [--roi X,Y,W,H]] [--deadline-ms N] [--token T]
//                  [--regions] [--space model_input|feature_map|none]
//   driver models  --server S [--token T]
//   driver stream  --server S --image P --frames N [--bad-at I]
//   driver bench   --server S --image P [--calls N] [--model M]
//   driver selftest
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>

#include "camserve/client.hpp"
#include "internal.hpp"

namespace {

using Clock = std::chrono::steady_clock;

std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string number(double value) {
  char text[40];
  std::snprintf(text, sizeof text, "%.9g", value);
  return text;
}

struct Args {
  std::string command;
  std::multimap<std::string, std::string> values;
  std::string get(const std::string& key, const std::string& fallback = "") const {
    const auto found = values.find(key);
    return found == values.end() ? fallback : found->second;
  }
  bool has(const std::string& key) const { return values.count(key) > 0; }
};

Args parse(int argc, char** argv) {
  Args args;
  args.command = argc > 1 ? argv[1] : "";
  for (int i = 2; i < argc; ++i) {
    std::string key = argv[i];
    if (key.rfind("--", 0) != 0) throw std::invalid_argument("unexpected " + key);
    key = key.substr(2);
    const bool flag = key == "mat" || key == "regions";
    args.values.emplace(key, flag ? "1" : (i + 1 < argc ? argv[++i] : ""));
  }
  return args;
}

camserve::Client connect(const Args& args) {
  camserve::ClientOptions options;
  options.token = args.get("token");
  return camserve::Client(args.get("server"), options);
}

std::string explanationsJson(const camserve::Result& result, const std::string& out,
                             const cv::Mat* image) {
  std::string json = "[";
  for (std::size_t i = 0; i < result.explanations.size(); ++i) {
    const camserve::Explanation& e = result.explanations[i];
    json += (i ? ", " : "") + std::string("{\"class_index\": ") + std::to_string(e.class_index) +
            ", \"label\": " + quoted(e.label) + ", \"logit\": " + number(e.logit) +
            ", \"probability\": " + number(e.probability);
    if (!e.cam_input.empty() && !out.empty()) {
      const camserve::Map cam = e.cam();
      const std::string file = out + "/cam_" + std::to_string(i) + ".bin";
      std::ofstream(file, std::ios::binary)
          .write(reinterpret_cast<const char*>(cam.data.data()),
                 static_cast<std::streamsize>(cam.data.size() * sizeof(float)));
      json += ", \"cam_file\": " + quoted(file) + ", \"cam_shape\": [" +
              std::to_string(cam.height) + ", " + std::to_string(cam.width) + "]";
      json += ", \"cam_input_shape\": [" + std::to_string(e.cam_input.height) + ", " +
              std::to_string(e.cam_input.width) + "]";
      if (image != nullptr) {
        const std::string png = out + "/overlay_" + std::to_string(i) + ".png";
        cv::imwrite(png, e.overlay(*image));
        json += ", \"overlay_file\": " + quoted(png);
      }
    }
    json += ", \"regions\": [";
    for (std::size_t r = 0; r < e.regions.size(); ++r) {
      const camserve::Region& region = e.regions[r];
      json += (r ? ", " : "") + std::string("{\"box\": [") + std::to_string(region.box.x0) +
              ", " + std::to_string(region.box.y0) + ", " + std::to_string(region.box.x1) +
              ", " + std::to_string(region.box.y1) + "], \"area\": " + number(region.area) +
              ", \"peak\": " + number(region.peak) + ", \"points\": " +
              std::to_string(region.polygon.size()) + "}";
    }
    json += "]}";
  }
  return json + "]";
}

std::string explain(const Args& args) {
  const camserve::Client client = connect(args);
  camserve::ExplainOptions options;
  options.model = args.get("model");
  options.method = args.get("method", options.method);
  for (auto [it, end] = args.values.equal_range("target"); it != end; ++it)
    options.targets.push_back(std::stoll(it->second));
  if (args.has("top-k")) options.top_k = static_cast<std::uint32_t>(std::stoul(args.get("top-k")));
  if (args.has("deadline-ms")) options.deadline = std::chrono::milliseconds(std::stol(args.get("deadline-ms")));
  options.regions.enabled = args.has("regions");
  const std::string space = args.get("space", "model_input");
  options.space = space == "feature_map" ? camserve::MapSpace::FeatureMap
                  : space == "none"     ? camserve::MapSpace::None
                                        : camserve::MapSpace::ModelInput;
  options.request_id = "cpp-1";
  cv::Mat photo = cv::imread(args.get("image"), cv::IMREAD_COLOR);
  if (args.has("roi")) {
    int x, y, w, h;
    if (std::sscanf(args.get("roi").c_str(), "%d,%d,%d,%d", &x, &y, &w, &h) != 4)
      throw std::invalid_argument("--roi X,Y,W,H");
    photo = photo(cv::Rect(x, y, w, h));  // a view with the parent's row step
  }
  const camserve::Image image = args.has("mat") ? camserve::Image::mat(photo)
                                                : camserve::Image::file(args.get("image"));
  const camserve::Result result = client.explain(image, options);
  if (!args.get("out").empty()) cv::imwrite(args.get("out") + "/photo.png", photo);
  const camserve::Geometry& g = result.geometry;
  return "{\"ok\": true, \"request_id\": " + quoted(result.request_id) + ", \"model\": " +
         quoted(result.model) + ", \"method\": " + quoted(result.method) +
         ", \"continuous\": " + (photo.isContinuous() ? "true" : "false") +
         ", \"geometry\": [" + std::to_string(g.original_height) + ", " +
         std::to_string(g.original_width) + ", " + std::to_string(g.resized_height) + ", " +
         std::to_string(g.resized_width) + ", " + std::to_string(g.crop.x0) + ", " +
         std::to_string(g.crop.y0) + ", " + std::to_string(g.crop.x1) + ", " +
         std::to_string(g.crop.y1) + "], \"explanations\": " +
         explanationsJson(result, args.get("out"), &photo) + "}";
}

std::string models(const Args& args) {
  const camserve::Client client = connect(args);
  std::string json = "{\"ok\": true, \"health\": " + quoted(client.health()) + ", \"models\": [";
  const std::vector<camserve::ModelInfo> found = client.listModels();
  for (std::size_t i = 0; i < found.size(); ++i) {
    json += (i ? ", " : "") + std::string("{\"name\": ") + quoted(found[i].name) +
            ", \"labels\": " + std::to_string(found[i].labels.size()) +
            ", \"methods\": " + std::to_string(found[i].methods.size()) + ", \"pixel_formats\": [";
    for (std::size_t f = 0; f < found[i].pixel_formats.size(); ++f)
      json += (f ? ", " : "") + quoted(camserve::pixelFormatName(found[i].pixel_formats[f]));
    json += "]}";
  }
  const camserve::ModelInfo fallback = client.getModel();
  return json + "], \"default\": " + quoted(fallback.name) + "}";
}

std::string stream(const Args& args) {
  const camserve::Client client = connect(args);
  const int frames = std::stoi(args.get("frames", "4"));
  const int bad_at = std::stoi(args.get("bad-at", "-1"));
  std::vector<camserve::Image> images;
  const camserve::Image good = camserve::Image::file(args.get("image"));
  for (int i = 0; i < frames; ++i)
    images.push_back(i == bad_at ? camserve::Image::encoded(std::string("this is no image"))
                                 : good);
  std::string json = "{\"ok\": true, \"frames\": [";
  int index = 0;
  client.explainStream(images, [&](const camserve::Result& r) {
    json += (index++ ? ", " : "") + std::string("{\"request_id\": ") + quoted(r.request_id) +
            ", \"code\": " + quoted(camserve::statusName(r.code)) + ", \"message\": " +
            quoted(r.message) + ", \"explanations\": " + explanationsJson(r, "", nullptr) + "}";
  });
  return json + "]}";
}

// `calls` explain calls of one image on a warm client, each one's latency in ms (the
// C++ half of bench/cpp_client.py).
std::string bench(const Args& args) {
  const camserve::Client client = connect(args);
  camserve::ExplainOptions options;
  options.model = args.get("model");
  const camserve::Image image = camserve::Image::file(args.get("image"));
  client.explain(image, options);  // connect, warm up
  const int calls = std::stoi(args.get("calls", "20"));
  std::string json = "{\"ok\": true, \"latencies_ms\": [";
  for (int i = 0; i < calls; ++i) {
    const Clock::time_point start = Clock::now();
    const camserve::Result result = client.explain(image, options);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    if (result.explanations.empty()) throw std::runtime_error("no explanation");
    json += (i ? ", " : "") + number(ms);
  }
  return json + "]}";
}

// The portable bilinear resize against cv::resize, and float16 decoding.
std::string selftest() {
  std::mt19937 random(7);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  double worst = 0.0;
  const int sizes[][4] = {{7, 7, 64, 64}, {64, 64, 224, 300}, {10, 13, 5, 4}, {3, 5, 3, 9},
                          {224, 224, 100, 451}, {1, 1, 4, 4}};
  for (const auto& s : sizes) {
    camserve::Map map;
    map.height = s[0];
    map.width = s[1];
    for (int i = 0; i < s[0] * s[1]; ++i) map.data.push_back(uniform(random));
    const camserve::Map mine = camserve::detail::resizeMapPortable(map, s[2], s[3]);
    cv::Mat theirs;
    cv::resize(cv::Mat(map.height, map.width, CV_32FC1, map.data.data()), theirs,
               cv::Size(s[3], s[2]), 0, 0, cv::INTER_LINEAR);
    for (int y = 0; y < s[2]; ++y)
      for (int x = 0; x < s[3]; ++x)
        worst = std::max(worst, static_cast<double>(std::fabs(mine.at(y, x) - theirs.at<float>(y, x))));
  }
  const bool halves = camserve::detail::halfToFloat(0x3C00) == 1.0f &&
                      camserve::detail::halfToFloat(0xC000) == -2.0f &&
                      camserve::detail::halfToFloat(0x3555) == 0.333251953125f &&
                      camserve::detail::halfToFloat(0x0001) == std::ldexp(1.0f, -24) &&
                      std::isinf(camserve::detail::halfToFloat(0x7C00));
  // a cv::Mat ROI: BGR8 rows of the parent's step, the last row padded, one copy
  cv::Mat parent(40, 50, CV_8UC3);
  cv::randu(parent, 0, 256);
  const cv::Mat roi = parent(cv::Rect(7, 5, 30, 20));
  camserve::detail::pb::ExplainRequest request;
  camserve::detail::fillRequest(request, camserve::Image::mat(roi), {});
  const auto& raw = request.pixels();
  bool frame_ok = raw.format() == camserve::detail::pb::BGR8 && raw.step() == 150 &&
                  raw.width() == 30 && raw.height() == 20 && raw.pixels().size() == 20 * 150;
  for (int y = 0; frame_ok && y < 20; ++y)
    frame_ok = std::memcmp(raw.pixels().data() + y * 150, roi.ptr(y), 90) == 0;
  return "{\"ok\": true, \"mat_frame_ok\": " + std::string(frame_ok ? "true" : "false") +
         ", \"max_resize_diff\": " + number(worst) +
         ", \"half_ok\": " + (halves ? "true" : "false") + "}";
}

}  // namespace

int main(int argc, char** argv) {
  const Clock::time_point start = Clock::now();
  auto elapsed = [&] {
    return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count());
  };
  try {
    const Args args = parse(argc, argv);
    std::string json;
    if (args.command == "explain") json = explain(args);
    else if (args.command == "models") json = models(args);
    else if (args.command == "stream") json = stream(args);
    else if (args.command == "selftest") json = selftest();
    else if (args.command == "bench") json = bench(args);
    else throw std::invalid_argument("unknown command " + args.command);
    json.insert(json.size() - 1, ", \"elapsed_ms\": " + elapsed());
    std::cout << json << "\n";
  } catch (const camserve::Error& e) {
    std::cout << "{\"ok\": false, \"code\": " << quoted(camserve::statusName(e.code()))
              << ", \"message\": " << quoted(e.message()) << ", \"elapsed_ms\": " << elapsed()
              << "}\n";
  } catch (const std::exception& e) {
    std::cerr << "driver: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
