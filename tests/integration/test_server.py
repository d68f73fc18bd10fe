"""The gRPC service over a real loopback channel: results, streams, metadata, health,
reflection, and every error path (with the server still answering afterwards)."""

from __future__ import annotations

import filecmp
import logging
import subprocess
import sys

import cv2
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from camserve import tensors
from camserve.contract import ModelCard
from camserve.errors import CamserveError
from camserve.explain.image import preprocess
from camserve.server.runtime import load_models
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                               options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.ExplainerStub(channel)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(1)
    base = cv2.resize(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), (100, 60),
                      interpolation=cv2.INTER_CUBIC)
    return base  # RGB uint8 [60,100,3], smooth enough to give structured maps


def png(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def raw(rgb: np.ndarray) -> pb.RawImage:
    return pb.RawImage(height=rgb.shape[0], width=rgb.shape[1], pixels=rgb.tobytes())


def cam_of(target: pb.Target) -> np.ndarray:
    return tensors.from_proto(target.cam).astype(np.float32)


def direct_gradcam(model_path, image: np.ndarray, classes: list[int]) -> np.ndarray:
    """Grad-CAM computed here, from the graph's own outputs, without the server's code."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    _, _, activations, gradients = session.run(
        None, {"image": image, "targets": np.asarray([classes], np.int64)})
    maps = []
    for k in range(len(classes)):
        weights = gradients[0, k].mean(axis=(1, 2))
        m = np.maximum((weights[:, None, None] * activations[0]).sum(axis=0), 0)
        m = (m - m.min()) / (m.max() - m.min() + 1e-7)
        m = cv2.resize(m.astype(np.float32), (image.shape[3], image.shape[2]))
        m = np.maximum(m, 0)
        maps.append((m - m.min()) / (m.max() - m.min() + 1e-7))
    return np.stack(maps)


def test_explain_matches_numpy_from_graph_outputs(stub, models_dir, photo):
    response = stub.Explain(pb.ExplainRequest(encoded=png(photo), classes=[3, 7], request_id="r1"))
    assert response.request_id == "r1" and response.model == "tiny"
    assert [t.class_index for t in response.targets] == [3, 7]
    card = ModelCard.from_metadata({p.key: p.value for p in
                                    onnx.load(str(models_dir / "tiny.onnx")).metadata_props})
    image, _ = preprocess(photo, card.preprocessing)
    expected = direct_gradcam(models_dir / "tiny.onnx", image, [3, 7])
    for k, target in enumerate(response.targets):
        got = cam_of(target)
        assert got.shape == (64, 64)
        np.testing.assert_allclose(got, expected[k], atol=1e-5)
        assert target.label == f"thing {target.class_index}"
    assert all(t.cam.dtype == pb.FLOAT32 for t in response.targets)
    timings = response.timings
    assert timings.inference_us > 0 and timings.postprocess_us > 0


def test_targets_explicit_then_top_k(stub, photo):
    response = stub.Explain(pb.ExplainRequest(pixels=raw(photo), classes=[9], top_k=3,
                                              output=pb.OutputOptions(include_logits=True)))
    logits = tensors.from_proto(response.raw.logits)[0]
    order = np.argsort(-logits)
    assert [t.class_index for t in response.targets] == [9, *order[:3].tolist()]
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    for t in response.targets:
        assert t.logit == pytest.approx(logits[t.class_index], rel=1e-6)
        assert t.probability == pytest.approx(probabilities[t.class_index], rel=1e-5)
    default = stub.Explain(pb.ExplainRequest(pixels=raw(photo)))
    assert [t.class_index for t in default.targets] == [int(order[0])]
    # the contract's ranks as explicit classes: -r is the r-th highest logit
    ranked = stub.Explain(pb.ExplainRequest(pixels=raw(photo), classes=[-2, 4, -1], top_k=1))
    assert [t.class_index for t in ranked.targets] == [int(order[1]), 4, int(order[0]),
                                                       int(order[0])]


def test_three_image_forms_agree(stub, models_dir, photo):
    by_png = stub.Explain(pb.ExplainRequest(encoded=png(photo), top_k=1))
    by_pixels = stub.Explain(pb.ExplainRequest(pixels=raw(photo), top_k=1))
    np.testing.assert_array_equal(cam_of(by_png.targets[0]), cam_of(by_pixels.targets[0]))
    card = ModelCard.from_metadata({p.key: p.value for p in
                                    onnx.load(str(models_dir / "tiny.onnx")).metadata_props})
    image, geometry = preprocess(photo, card.preprocessing)
    by_tensor = stub.Explain(pb.ExplainRequest(tensor=tensors.to_proto(image), top_k=1))
    np.testing.assert_allclose(cam_of(by_tensor.targets[0]), cam_of(by_pixels.targets[0]),
                               atol=1e-6)
    g = by_pixels.geometry
    assert (g.original_height, g.original_width) == (60, 100)
    assert (g.resized_height, g.resized_width) == geometry.resized
    assert (g.crop.x0, g.crop.y0, g.crop.x1, g.crop.y1) == geometry.crop
    assert by_tensor.geometry.original_height == 64


def test_output_spaces_and_dtypes(stub, photo):
    def one(**options):
        r = stub.Explain(pb.ExplainRequest(pixels=raw(photo), classes=[1],
                                           output=pb.OutputOptions(**options)))
        return r.targets[0].cam

    feature = one(space=pb.FEATURE_MAP, dtype=pb.FLOAT16)
    assert list(feature.shape) == [32, 32] and feature.dtype == pb.FLOAT16
    assert len(feature.data) == 32 * 32 * 2
    original = one(space=pb.ORIGINAL_IMAGE)
    assert list(original.shape) == [60, 100]
    as_uint8 = tensors.from_proto(one(dtype=pb.UINT8))
    as_float = tensors.from_proto(one())
    assert as_uint8.dtype == np.uint8 and as_uint8.max() == 255
    np.testing.assert_allclose(as_uint8 / 255.0, as_float, atol=0.5 / 255 + 1e-6)


def test_raw_tensors(stub, photo):
    r = stub.Explain(pb.ExplainRequest(
        pixels=raw(photo), top_k=2,
        output=pb.OutputOptions(include_logits=True, include_activations=True,
                                include_gradients=True)))
    assert tensors.from_proto(r.raw.logits).shape == (1, 10)
    assert tensors.from_proto(r.raw.activations["features"]).shape == (1, 16, 32, 32)
    assert tensors.from_proto(r.raw.gradients["features"]).shape == (1, 2, 16, 32, 32)


def test_multi_layer_model_and_fusion(stub, photo):
    maps = {}
    for fusion in (pb.MEAN, pb.SUM, pb.MAX):
        r = stub.Explain(pb.ExplainRequest(model="tiny2", pixels=raw(photo), classes=[4],
                                           fusion=fusion))
        assert list(r.layers) == ["features.2", "features.6"]
        maps[fusion] = cam_of(r.targets[0])
        assert maps[fusion].shape == (64, 64)
        assert maps[fusion].min() >= 0 and maps[fusion].max() == pytest.approx(1, abs=1e-5)
    raw_tensors = stub.Explain(pb.ExplainRequest(
        model="tiny2", pixels=raw(photo), classes=[4],
        output=pb.OutputOptions(include_activations=True, include_gradients=True))).raw
    per_layer = []
    for name in ("features.2", "features.6"):
        a = tensors.from_proto(raw_tensors.activations[name])[0]
        g = tensors.from_proto(raw_tensors.gradients[name])[0, 0]
        m = np.maximum(np.einsum("c,chw->hw", g.mean(axis=(1, 2)), a), 0)
        m = (m - m.min()) / (m.max() - m.min() + 1e-7)
        per_layer.append(cv2.resize(m.astype(np.float32), (64, 64)))
    for fusion, combine in ((pb.MEAN, np.mean), (pb.SUM, np.sum), (pb.MAX, np.max)):
        fused = np.maximum(combine(per_layer, axis=0), 0)
        expected = (fused - fused.min()) / (fused.max() - fused.min() + 1e-7)
        np.testing.assert_allclose(maps[fusion], expected, atol=1e-5)


def test_stream_answers_in_order_and_survives_a_bad_frame(stub, photo):
    frames = [pb.ExplainRequest(pixels=raw(np.roll(photo, i * 7, axis=1)), request_id=f"f{i}")
              for i in range(10)]
    responses = list(stub.ExplainStream(iter(frames)))
    assert [r.request_id for r in responses] == [f"f{i}" for i in range(10)]
    assert all(len(r.targets) == 1 and not r.HasField("error") for r in responses)
    mixed = [frames[0], pb.ExplainRequest(encoded=b"not an image", request_id="bad"), frames[1]]
    out = list(stub.ExplainStream(iter(mixed)))
    assert [r.request_id for r in out] == ["f0", "bad", "f1"]
    assert out[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "JPEG, PNG, WebP or BMP" in out[1].error.message
    assert len(out[2].targets) == 1


def test_list_and_get_model(stub):
    listing = stub.ListModels(pb.ListModelsRequest())
    assert [m.name for m in listing.models] == ["tiny", "tiny2"]
    assert listing.default_model == "tiny"
    info = stub.GetModel(pb.GetModelRequest(name="tiny2"))
    assert list(info.input_shape) == [1, 3, 64, 64]
    assert [layer.name for layer in info.layers] == ["features.2", "features.6"]
    assert list(info.layers[1].shape) == [16, 32, 32]
    assert len(info.labels) == 10 and "gradcam" in info.methods
    assert info.contract_version == 1 and info.execution_provider == "CPUExecutionProvider"
    assert info.preprocessing.crop_height == 64 and len(info.preprocessing.mean) == 3
    assert stub.GetModel(pb.GetModelRequest()).name == "tiny"


def test_health_serving_overall_and_per_model(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tiny", "tiny2", "camserve.v1.Explainer"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(channel):
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"camserve.v1.Explainer", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(services)


def _bad_requests(photo):
    good = raw(photo)
    return {
        "undecodable": (pb.ExplainRequest(encoded=b"\x89PNG garbage"), "INVALID_ARGUMENT"),
        "empty image": (pb.ExplainRequest(encoded=b""), "INVALID_ARGUMENT"),
        "no image": (pb.ExplainRequest(), "INVALID_ARGUMENT"),
        "raw size": (pb.ExplainRequest(pixels=pb.RawImage(height=5, width=5, pixels=b"x" * 10)),
                     "INVALID_ARGUMENT"),
        "tensor shape": (pb.ExplainRequest(tensor=tensors.to_proto(
            np.zeros((1, 3, 32, 32), np.float32))), "INVALID_ARGUMENT"),
        "tensor dtype": (pb.ExplainRequest(tensor=tensors.to_proto(
            np.zeros((1, 3, 64, 64), np.float16))), "INVALID_ARGUMENT"),
        "tensor bytes": (pb.ExplainRequest(tensor=pb.Tensor(
            dtype=pb.FLOAT32, shape=[1, 3, 64, 64], data=b"\0" * 100)), "INVALID_ARGUMENT"),
        "tensor nan": (pb.ExplainRequest(tensor=tensors.to_proto(
            np.full((1, 3, 64, 64), np.nan, np.float32))), "INVALID_ARGUMENT"),
        "tensor inf": (pb.ExplainRequest(tensor=tensors.to_proto(
            np.full((1, 3, 64, 64), np.inf, np.float32))), "INVALID_ARGUMENT"),
        "class range": (pb.ExplainRequest(pixels=good, classes=[10]), "INVALID_ARGUMENT"),
        "huge class": (pb.ExplainRequest(pixels=good, classes=[10**9]), "INVALID_ARGUMENT"),
        "class -5000": (pb.ExplainRequest(pixels=good, classes=[-5000]), "INVALID_ARGUMENT"),
        "rank beyond the classes": (pb.ExplainRequest(pixels=good, classes=[-11]),
                                    "INVALID_ARGUMENT"),
        "top_k": (pb.ExplainRequest(pixels=good, top_k=11), "INVALID_ARGUMENT"),
        "method": (pb.ExplainRequest(pixels=good, method="magic"), "INVALID_ARGUMENT"),
        "layer": (pb.ExplainRequest(pixels=good, layers=["layer9"]), "INVALID_ARGUMENT"),
        "dtype": (pb.ExplainRequest(pixels=good, output=pb.OutputOptions(dtype=pb.INT64)),
                  "INVALID_ARGUMENT"),
        "model": (pb.ExplainRequest(pixels=good, model="nope"), "NOT_FOUND"),
        "too many targets": (pb.ExplainRequest(pixels=good, classes=[0] * 65),
                             "RESOURCE_EXHAUSTED"),
        "oversized": (pb.ExplainRequest(encoded=b"\0" * (17 << 20)), "RESOURCE_EXHAUSTED"),
    }


@pytest.mark.parametrize("case", list(_bad_requests(np.zeros((4, 4, 3), np.uint8))))
def test_bad_requests_get_the_right_status(stub, photo, case):
    request, code = _bad_requests(photo)[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(request, timeout=30)
    assert err.value.code().name == code, err.value.details()
    assert err.value.details()  # a message a person can act on
    assert stub.Explain(pb.ExplainRequest(pixels=raw(photo)), timeout=30).targets


def test_messages_name_the_problem(stub, photo):
    def details(request):
        with pytest.raises(grpc.RpcError) as err:
            stub.Explain(request)
        return err.value.details()

    assert "0..9" in details(pb.ExplainRequest(pixels=raw(photo), classes=[12]))
    assert "gradcam" in details(pb.ExplainRequest(pixels=raw(photo), method="magic"))
    assert "tiny2" in details(pb.ExplainRequest(pixels=raw(photo), model="nope"))
    assert "[1, 3, 64, 64]" in details(pb.ExplainRequest(
        tensor=tensors.to_proto(np.zeros((1, 3, 8, 8), np.float32))))


def test_unknown_model_in_get_model(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_models_folder_refuses_files_that_are_not_explainers(tmp_path, models_dir, caplog):
    (tmp_path / "garbage.onnx").write_bytes(b"not a model at all")
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(CamserveError, match="no explainer graph"):
        load_models(tmp_path, device="cpu")
    (tmp_path / "tiny.onnx").write_bytes((models_dir / "tiny.onnx").read_bytes())
    with caplog.at_level(logging.ERROR, logger="camserve.server"):
        models = load_models(tmp_path, device="cpu")
    assert list(models) == ["tiny"]
    refused = " ".join(r.getMessage() for r in caplog.records)
    assert "garbage.onnx" in refused and "plain.onnx" in refused
    assert "camserve export" in refused  # says what to do


def _cuda_works() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    ort.set_default_logger_severity(4)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    ort.set_default_logger_severity(3)
    return session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.skipif(_cuda_works(), reason="this machine has a working CUDA GPU")
def test_serve_cuda_without_gpu_is_a_clear_startup_error(models_dir):
    run = subprocess.run([sys.executable, "-m", "camserve", "serve", "--models", str(models_dir),
                          "--device", "cuda", "--port", "0"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert lines == [lines[0]] and "--device cuda" in lines[0]


def test_server_process_loads_no_torch(models_dir):
    code = (
        "import sys\n"
        "from camserve.server.app import start\n"
        "from camserve.server.config import ServerConfig\n"
        f"s = start(ServerConfig(models=__import__('pathlib').Path({str(models_dir)!r}), "
        "port=0, device='cpu'))\n"
        "s.stop(0)\n"
        "assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'torch loaded'\n"
        "print('clean')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "clean" in run.stdout


def test_committed_stubs_are_fresh(tmp_path):
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            str(ROOT / "protos/camserve/v1/explainer.proto")]
    assert protoc.main(args) == 0
    for name in ("explainer_pb2.py", "explainer_pb2.pyi", "explainer_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "camserve/v1" / name,
                           ROOT / "protos/camserve/v1" / name, shallow=False), \
            f"protos/camserve/v1/{name} is stale: run 'make proto'"


def test_models_whose_external_data_leaves_the_folder_are_refused(tmp_path, models_dir,
                                                                   caplog):
    (tmp_path / "tiny.onnx").write_bytes((models_dir / "tiny.onnx").read_bytes())
    sneaky = onnx.load(str(models_dir / "tiny.onnx"))
    weight = max(sneaky.graph.initializer, key=lambda t: len(t.raw_data))
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../outside.bin")
    onnx.save(sneaky, str(tmp_path / "sneaky.onnx"))
    with caplog.at_level(logging.ERROR, logger="camserve.server"):
        models = load_models(tmp_path, device="cpu")
    assert list(models) == ["tiny"]
    assert "outside the models folder" in caplog.text


def test_each_explain_call_leaves_one_access_log_line(stub, photo, caplog):
    with caplog.at_level(logging.INFO, logger="camserve.access"):
        stub.Explain(pb.ExplainRequest(pixels=raw(photo), request_id="abc-1"))
        with pytest.raises(grpc.RpcError):
            stub.Explain(pb.ExplainRequest(encoded=b"junk", request_id="abc-2"))
    lines = [r.getMessage() for r in caplog.records if r.name == "camserve.access"]
    assert any("request_id=abc-1" in line and "code=OK" in line for line in lines)
    assert any("request_id=abc-2" in line and "code=INVALID_ARGUMENT" in line for line in lines)
