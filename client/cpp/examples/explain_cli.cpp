// camserve-explain-cpp IMAGE... --out DIR: the C++ twin of `camserve explain`.
// Per image and target: an overlay PNG; per image: a JSON summary.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <string>
#include <vector>

#include <opencv2/imgcodecs.hpp>

#include "camserve/client.hpp"

namespace {

const char* const kUsage =
    "usage: camserve-explain-cpp IMAGE... --out DIR [--server HOST:PORT] [--model NAME]\n"
    "       [--target C]... [--top-k K] [--method NAME] [--timeout SECONDS]\n"
    "Explain images with a camserve server; writes an overlay PNG per target and a JSON\n"
    "file per image into DIR.\n";

std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string stem(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::size_t dot = name.find_last_of('.');
  return dot == std::string::npos || dot == 0 ? name : name.substr(0, dot);
}

struct Args {
  std::vector<std::string> images;
  std::string server = "127.0.0.1:50051", out;
  double timeout = 60.0;
  camserve::ExplainOptions options;
};

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--server") { args.server = value();
    } else if (arg == "--model") { args.options.model = value();
    } else if (arg == "--target") { args.options.targets.push_back(std::stoll(value()));
    } else if (arg == "--top-k") { args.options.top_k = static_cast<std::uint32_t>(std::stoul(value()));
    } else if (arg == "--method") { args.options.method = value();
    } else if (arg == "--timeout") { args.timeout = std::stod(value());
    } else if (arg == "--out") { args.out = value();
    } else if (!arg.empty() && arg[0] == '-') { throw std::invalid_argument("unknown option " + arg);
    } else { args.images.push_back(arg); }
  }
  if (args.images.empty() || args.out.empty())
    throw std::invalid_argument("give one or more images and --out");
  return args;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "camserve-explain-cpp: " << e.what() << "\n" << kUsage;
    return 2;
  }
  try {
    std::filesystem::create_directories(args.out);
    camserve::ClientOptions client_options;
    client_options.deadline = std::chrono::milliseconds(static_cast<long>(args.timeout * 1000));
    const camserve::Client client(args.server, client_options);
    for (const std::string& path : args.images) {
      const cv::Mat photo = cv::imread(path, cv::IMREAD_COLOR);  // BGR, as the overlay wants
      if (photo.empty()) throw std::runtime_error("cannot read an image from '" + path + "'");
      const camserve::Result result = client.explain(camserve::Image::file(path), args.options);
      std::string records;
      std::set<std::int64_t> seen;  // a --target that is also a top-k class: once
      for (const camserve::Explanation& e : result.explanations) {
        if (!seen.insert(e.class_index).second) continue;
        const std::string name = stem(path) + "_" + std::to_string(e.class_index) + "_overlay.png";
        if (!cv::imwrite(args.out + "/" + name, e.overlay(photo)))
          throw std::runtime_error("cannot write '" + args.out + "/" + name + "'");
        char scores[128];
        std::snprintf(scores, sizeof scores, "\"logit\": %.9g, \"probability\": %.9g",
                      e.logit, e.probability);
        records += std::string(records.empty() ? "" : ",\n  ") + "{\"class_index\": " +
                   std::to_string(e.class_index) + ", \"label\": " + quoted(e.label) + ", " +
                   scores + ", \"model\": " + quoted(e.model) + ", \"method\": " +
                   quoted(e.method) + ", \"image_size\": [" + std::to_string(photo.cols) +
                   ", " + std::to_string(photo.rows) + "], \"files\": [" + quoted(name) + "]}";
        std::printf("%s: %s (%.1f%%) -> %s/%s\n", path.c_str(), e.label.c_str(),
                    100.0 * e.probability, args.out.c_str(), name.c_str());
      }
      std::ofstream json(args.out + "/" + stem(path) + ".json");
      json << "{\"image\": " << quoted(path.substr(path.find_last_of('/') + 1))
           << ", \"explanations\": [\n  " << records << "]}\n";
      if (!json) throw std::runtime_error("cannot write the JSON file into '" + args.out + "'");
    }
  } catch (const camserve::Error& e) {
    std::cerr << "camserve-explain-cpp: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "camserve-explain-cpp: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
