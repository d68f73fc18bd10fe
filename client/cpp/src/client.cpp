// The channel and the calls (the C++ side of client/sdk.py's Client).
#include <exception>
#include <future>
#include <mutex>
#include <thread>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "camserve/v1/explainer.grpc.pb.h"
#include "internal.hpp"

namespace camserve {
namespace {

namespace pb = ::camserve::v1;

// The Python SDK's RETRY_POLICY: unary calls (and streams before their first answer) that
// find the server UNAVAILABLE are retried with exponential backoff; nothing else is.
constexpr const char* kServiceConfig = R"({"methodConfig": [{
  "name": [{"service": "camserve.v1.Explainer"}],
  "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s",
                  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})";

Error fromStatus(const grpc::Status& status, const std::string& request_id = "") {
  return Error(static_cast<StatusCode>(status.error_code()), status.error_message(), request_id);
}

std::shared_ptr<grpc::Channel> makeChannel(const std::string& target, const ClientOptions& o) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(o.max_message_bytes);
  args.SetMaxSendMessageSize(o.max_message_bytes);
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, o.retries ? 1 : 0);
  if (o.retries) args.SetServiceConfigJSON(kServiceConfig);
  // keepalive pings every 30 s notice a dead connection (the server allows pings that often)
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  // reconnect soon enough for the retries to find a restarted server
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  const bool tls = o.tls || !o.root_certs.empty() || !o.client_cert.empty() ||
                   !o.client_key.empty();
  if (o.client_cert.empty() != o.client_key.empty())
    throw Error(StatusCode::INVALID_ARGUMENT, "mutual TLS needs both client_cert and client_key");
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = o.root_certs;
    ssl.pem_private_key = o.client_key;
    ssl.pem_cert_chain = o.client_cert;
    credentials = grpc::SslCredentials(ssl);
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  return grpc::CreateCustomChannel(target, credentials, args);
}

// grpc.health.v1 messages, encoded by hand (as the Python SDK does): HealthCheckRequest
// {1: service}, HealthCheckResponse {1: status enum}.
std::string encodeHealthRequest(const std::string& service) {
  if (service.empty()) return {};
  std::string out(1, '\x0a');
  for (std::size_t n = service.size();; n >>= 7) {
    out.push_back(static_cast<char>((n & 0x7F) | (n > 0x7F ? 0x80 : 0)));
    if (n <= 0x7F) break;
  }
  return out + service;
}

std::string decodeHealthResponse(const std::string& data) {
  static const char* const names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  if (data.size() >= 2 && data[0] == '\x08') {
    const unsigned value = static_cast<unsigned char>(data[1]);
    return value < 4 ? names[value] : std::to_string(value);
  }
  return "UNKNOWN";
}

}  // namespace

// --- the client -----------------------------------------------------------------------------

struct Client::Impl {
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::Explainer::Stub> stub;

  // A call's context: its deadline, the metadata and the bearer token.
  void prepare(grpc::ClientContext& context, std::chrono::milliseconds deadline) const {
    context.set_deadline(std::chrono::system_clock::now() +
                         (deadline.count() > 0 ? deadline : options.deadline));
    for (const auto& [key, value] : options.metadata) context.AddMetadata(key, value);
    if (!options.token.empty()) context.AddMetadata("authorization", "Bearer " + options.token);
  }
};

struct ExplainStream::Impl {
  std::shared_ptr<grpc::Channel> channel;  // outlives the call
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<pb::ExplainRequest, pb::ExplainResponse>> call;
  bool finished = false;
};

Client::Client(const std::string& target, ClientOptions options) : impl_(new Impl) {
  impl_->channel = makeChannel(target, options);
  impl_->stub = pb::Explainer::NewStub(impl_->channel);
  impl_->options = std::move(options);
}

Client::~Client() = default;
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;

const ClientOptions& Client::options() const noexcept { return impl_->options; }

Result Client::explain(const Image& image, const ExplainOptions& options) const {
  pb::ExplainRequest request;
  detail::fillRequest(request, image, options);
  grpc::ClientContext context;
  impl_->prepare(context, options.deadline);
  pb::ExplainResponse response;
  const grpc::Status status = impl_->stub->Explain(&context, request, &response);
  if (!status.ok()) throw fromStatus(status, options.request_id);
  return detail::toResult(response);
}

std::unique_ptr<ExplainStream> Client::openStream(std::chrono::milliseconds deadline) const {
  auto impl = std::make_unique<ExplainStream::Impl>();
  impl->channel = impl_->channel;
  impl_->prepare(impl->context, deadline);
  impl->call = impl_->stub->ExplainStream(&impl->context);
  return std::make_unique<ExplainStream>(std::move(impl));
}

void Client::explainStream(const std::vector<Image>& frames,
                           const std::function<void(const Result&)>& on_result,
                           const ExplainOptions& options) const {
  std::unique_ptr<ExplainStream> stream = openStream(options.deadline);
  std::exception_ptr failure;  // the writer's (a frame the client refuses) or the callback's
  std::thread writer([&] {
    try {
      ExplainOptions frame_options = options;
      for (std::size_t i = 0; i < frames.size(); ++i) {
        frame_options.request_id = options.request_id.empty() ? std::to_string(i)
                                                              : options.request_id;
        if (!stream->write(frames[i], frame_options)) return;  // the call ended: read why
      }
      stream->writesDone();
    } catch (...) {
      failure = std::current_exception();
      stream->cancel();
    }
  });
  std::exception_ptr callback_failure;
  try {
    Result result;
    while (stream->read(result)) on_result(result);
  } catch (...) {
    callback_failure = std::current_exception();
    stream->cancel();
  }
  writer.join();
  if (callback_failure) std::rethrow_exception(callback_failure);
  if (failure) std::rethrow_exception(failure);
  stream->finish();
}

std::vector<ModelInfo> Client::listModels() const {
  grpc::ClientContext context;
  impl_->prepare(context, {});
  pb::ListModelsResponse response;
  const grpc::Status status = impl_->stub->ListModels(&context, pb::ListModelsRequest(), &response);
  if (!status.ok()) throw fromStatus(status);
  std::vector<ModelInfo> models;
  for (const pb::ModelInfo& model : response.models()) models.push_back(detail::toModelInfo(model));
  return models;
}

ModelInfo Client::getModel(const std::string& name) const {
  grpc::ClientContext context;
  impl_->prepare(context, {});
  pb::GetModelRequest request;
  request.set_name(name);
  pb::ModelInfo response;
  const grpc::Status status = impl_->stub->GetModel(&context, request, &response);
  if (!status.ok()) throw fromStatus(status);
  return detail::toModelInfo(response);
}

std::string Client::health(const std::string& service) const {
  grpc::GenericStub stub(impl_->channel);
  grpc::ClientContext context;
  impl_->prepare(context, {});
  const std::string encoded = encodeHealthRequest(service);
  grpc::Slice slice(encoded);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                 &response, [&done](grpc::Status status) { done.set_value(std::move(status)); });
  const grpc::Status status = done.get_future().get();
  if (!status.ok()) throw fromStatus(status);
  std::vector<grpc::Slice> slices;
  std::string data;
  if (response.Dump(&slices).ok())
    for (const grpc::Slice& s : slices)
      data.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return decodeHealthResponse(data);
}

// --- the stream -----------------------------------------------------------------------------

ExplainStream::ExplainStream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ExplainStream::~ExplainStream() {
  if (!impl_ || impl_->finished) return;
  try {  // an unfinished stream: cancel it, drain it, collect its status; nothing escapes
    impl_->context.TryCancel();
    pb::ExplainResponse ignored;
    while (impl_->call->Read(&ignored)) {
    }
    impl_->call->Finish();
  } catch (...) {
  }
}

bool ExplainStream::write(const Image& image, const ExplainOptions& options) {
  pb::ExplainRequest request;
  detail::fillRequest(request, image, options);
  return impl_->call->Write(request);
}

bool ExplainStream::writesDone() { return impl_->call->WritesDone(); }

bool ExplainStream::read(Result& result) {
  pb::ExplainResponse response;
  if (!impl_->call->Read(&response)) return false;
  result = detail::toResult(response);
  return true;
}

void ExplainStream::finish() {
  if (impl_->finished) return;
  impl_->finished = true;
  const grpc::Status status = impl_->call->Finish();
  if (!status.ok()) throw fromStatus(status);
}

void ExplainStream::cancel() noexcept { impl_->context.TryCancel(); }

}  // namespace camserve
