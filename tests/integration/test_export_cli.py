"""``camserve export --module/--timm``: your own network from the command line.

A fixture package written into tmp_path (and put on sys.path) holds small networks: a plain
CNN with a factory, ones returning a tuple or a dict, one that takes a single input size and
one with an operator onnx-ad cannot differentiate. Exports are checked against float64
autograd (``gradcheck``), served maps against a NumPy Grad-CAM from the graph's outputs, the
preprocessing flags against the card and GetModel, and every failure is one line, exit 2,
no file left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import cv2
import gradcheck
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from camserve import contract
from camserve.cli import main as camserve_main
from camserve.contract import ModelCard
from camserve.explain.image import preprocess
from camserve.export.layers import capture

PACKAGE = '''
import torch


class _RoiMax(torch.autograd.Function):
    """A global max pool that exports as the ONNX operator MaxRoiPool (onnx-ad has no
    derivative for it)."""

    @staticmethod
    def forward(ctx, x):
        return x.amax(dim=(2, 3), keepdim=True)

    @staticmethod
    def symbolic(g, x):
        rois = g.op("Constant", value_t=torch.tensor([[0.0, 0.0, 0.0, 1e4, 1e4]]))
        return g.op("MaxRoiPool", x, rois, pooled_shape_i=[1, 1])


class RoiMax(torch.nn.Module):
    def forward(self, x):
        return _RoiMax.apply(x)


class SmallNet(torch.nn.Module):
    def __init__(self, num_classes=5, width=8, mode="plain", in_channels=3):
        super().__init__()
        self.mode = mode
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.BatchNorm2d(2 * width),
            torch.nn.SiLU())
        self.norm = RoiMax() if mode == "roi" else None
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(2 * width, num_classes)

    def forward(self, x):
        a = self.features(x)
        if self.norm is not None:
            a = self.norm(a)
        logits = self.fc(torch.flatten(self.pool(a), 1))
        if self.mode == "tuple":
            return logits, a
        if self.mode == "dict":
            return {"aux": a, "logits": logits}
        return logits


class FixedSize(torch.nn.Module):
    """Takes 32x32 inputs only (a flatten into a Linear)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 32 * 32, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def make(num_classes=5, width=8, mode="plain", in_channels=3):
    torch.manual_seed(0)
    model = SmallNet(num_classes, width, mode, in_channels)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def fixed():
    return FixedSize()
'''


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "src"
    (root / "mynets").mkdir(parents=True)
    (root / "mynets" / "__init__.py").write_text("")
    (root / "mynets" / "nets.py").write_text(textwrap.dedent(PACKAGE))
    monkeypatch.syspath_prepend(str(root))
    return root


def _nets():
    import mynets.nets

    return mynets.nets


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = camserve_main(["export", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error_line(err: str, *fragments: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("camserve export: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _card(path: Path) -> ModelCard:
    return ModelCard.from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})


def _autograd(model: torch.nn.Module, layer: str, images: np.ndarray, classes: np.ndarray):
    """float64: logits, activations, d logits[b, classes[b,k]] / d activations [B,K,C,h,w]."""
    x = torch.from_numpy(np.asarray(images, np.float64))
    with torch.enable_grad(), capture(model, [layer]) as store:
        logits = model(x)
    rows = torch.arange(len(images))
    grads = [torch.autograd.grad(logits[rows, torch.from_numpy(classes[:, k])].sum(),
                                 store[layer], retain_graph=True)[0].numpy()
             for k in range(classes.shape[1])]
    return logits.detach().numpy(), store[layer].detach().numpy(), np.stack(grads, axis=1)


# --- 1. a custom module from the command line, its weights in both forms ------------------

@pytest.mark.parametrize("form", ["state_dict", "checkpoint"])
def test_module_export_matches_autograd(package, tmp_path, capsys, form):
    nets = _nets()
    trained = nets.make(num_classes=7, width=6)
    torch.manual_seed(1)
    with torch.no_grad():  # weights different from what the factory makes
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = tmp_path / "w.pt"
    state = trained.state_dict()
    torch.save(state if form == "state_dict" else {"epoch": 3, "state_dict": state}, weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"kind {i}\n" for i in range(7)))
    out = tmp_path / "out"
    code, stdout, err = _cli(
        capsys, "--module", "mynets.nets:make", "--factory-arg", "num_classes=7",
        "--factory-arg", "width=6", "--weights", str(weights), "--labels", str(labels),
        "--crop", "32", "--out", str(out))
    assert code == 0, err
    found = "a state_dict" if form == "state_dict" else "a checkpoint's 'state_dict'"
    assert f"loaded {weights}: {found}" in stdout
    assert sorted(os.listdir(out)) == ["make.head.onnx", "make.onnx"]
    card = _card(out / "make.onnx")
    assert card.architecture == "mynets.nets:make"
    assert card.labels == tuple(f"kind {i}" for i in range(7))
    assert card.preprocessing.crop == (32, 32)
    assert card.preprocessing.resize == round(32 * 256 / 224)
    assert [layer.name for layer in card.layers] == ["features"]

    session = ort.InferenceSession(str(out / "make.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    logits, classes, activations, gradients = session.run(
        None, {contract.IMAGE: images, contract.TARGETS: np.array([[2, -1], [5, -2]])})
    model = gradcheck.float64(trained.eval())
    ref_classes = gradcheck.resolve_classes(_autograd(model, "features", images,
                                                      np.zeros((2, 1), np.int64))[0],
                                            [[2, -1], [5, -2]])
    np.testing.assert_array_equal(classes, ref_classes)
    ref_logits, ref_acts, ref_grads = _autograd(model, "features", images, ref_classes)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max())
    np.testing.assert_allclose(activations, ref_acts, atol=1e-4 * np.abs(ref_acts).max())
    near = [_autograd(model, "features", x, ref_classes)[2]
            for x in gradcheck.neighbours(images)]
    gradcheck.assert_gradients_close(gradients, gradcheck.Reference(ref_grads, lambda: near))


# --- 2. preprocessing flags: in the card, applied and reported by the server --------------

def _gradcam(session: ort.InferenceSession, image: np.ndarray, classes: list[int]):
    """Grad-CAM from the graph's own outputs, normalised twice as grad-cam 1.5.7."""
    _, _, activations, gradients = session.run(
        None, {"image": image, "targets": np.asarray([classes], np.int64)})
    maps = []
    for k in range(len(classes)):
        weights = gradients[0, k].mean(axis=(1, 2))
        m = np.maximum((weights[:, None, None] * activations[0]).sum(axis=0), 0)
        m = (m - m.min()) / (m.max() - m.min() + 1e-7)
        m = np.maximum(cv2.resize(m.astype(np.float32), (image.shape[3], image.shape[2])), 0)
        maps.append((m - m.min()) / (m.max() - m.min() + 1e-7))
    return np.stack(maps)


def test_preprocessing_flags_recorded_served_and_reported(package, tmp_path, capsys):
    from camserve import tensors
    from camserve.server.app import start
    from camserve.server.config import ServerConfig
    from camserve.v1 import explainer_pb2 as pb
    from camserve.v1 import explainer_pb2_grpc as pb_grpc

    out = tmp_path / "out"
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["a", "b", "c", "d", "e"]))
    code, _, err = _cli(
        capsys, "--module", "mynets.nets:make", "--name", "mine", "--labels", str(labels),
        "--resize", "40", "--crop", "32x36", "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3",
        "--scale", "1/255", "--interpolation", "bicubic", "--grayscale", "replicate",
        "--out", str(out))
    assert code == 0, err
    assert "no --weights" in err
    spec = _card(out / "mine.onnx").preprocessing
    assert (spec.resize, spec.crop, spec.interpolation, spec.grayscale) == (
        40, (32, 36), "bicubic", "replicate")
    assert spec.mean == (0.5, 0.4, 0.3) and spec.std == (0.2, 0.25, 0.3)
    assert spec.scale == pytest.approx(1 / 255)

    running = start(ServerConfig(models=out, port=0, device="cpu", intra_op_threads=1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            info = stub.GetModel(pb.GetModelRequest(name="mine"))
            p = info.preprocessing
            assert (p.resize, p.crop_height, p.crop_width) == (40, 32, 36)
            assert np.allclose(p.mean, [0.5, 0.4, 0.3]) and np.allclose(p.std, [0.2, 0.25, 0.3])
            assert p.scale == pytest.approx(1 / 255)
            assert (p.interpolation, p.grayscale) == ("bicubic", "replicate")
            assert list(info.input_shape) == [1, 3, 32, 36] and info.labels[0] == "a"
            rng = np.random.default_rng(1)
            photo = cv2.resize(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), (100, 60),
                               interpolation=cv2.INTER_CUBIC)
            response = stub.Explain(pb.ExplainRequest(
                pixels=pb.RawImage(height=60, width=100, pixels=photo.tobytes()),
                model="mine", classes=[1, 3]))
    finally:
        running.stop(grace=1)
    image, _ = preprocess(photo, spec)
    assert image.shape == (1, 3, 32, 36)
    session = ort.InferenceSession(str(out / "mine.onnx"), providers=["CPUExecutionProvider"])
    expected = _gradcam(session, image, [1, 3])
    for k, target in enumerate(response.targets):
        got = tensors.from_proto(target.cam).astype(np.float32)
        np.testing.assert_allclose(got, expected[k], atol=1e-5)
    assert [t.label for t in response.targets] == ["b", "d"]


# --- 3. failures: one line, exit 2, nothing left in --out --------------------------------

def _failure(tmp_path, capsys, argv, *fragments):
    out = tmp_path / "out"
    code, _, err = _cli(capsys, *argv, "--out", str(out))
    assert code == 2, err
    line = _assert_one_error_line(err, *fragments)
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())
    return line


@pytest.mark.parametrize("case", [
    "layer_not_a_module", "tuple", "dict", "bad_output_key", "input_size", "not_differentiable",
    "labels_count", "weights_keys", "factory_fails", "no_factory", "no_package",
    "crop", "mean", "std", "scale", "resize", "interpolation", "grayscale", "channels"])
def test_failures_say_what_to_do(package, tmp_path, capsys, case):
    module = ["--module", "mynets.nets:make", "--crop", "32"]
    if case == "layer_not_a_module":
        _failure(tmp_path, capsys, [*module, "--layer", "feature.6"],
                 "'feature.6' is not a module", "did you mean", "features.6")
    elif case == "tuple":
        _failure(tmp_path, capsys, [*module, "--factory-arg", "mode=tuple"],
                 "returns a tuple of 2", "--output INDEX")
    elif case == "dict":
        _failure(tmp_path, capsys, [*module, "--factory-arg", "mode=dict"],
                 "'aux'", "'logits'", "--output KEY")
    elif case == "bad_output_key":
        _failure(tmp_path, capsys, [*module, "--factory-arg", "mode=dict", "--output", "x"],
                 "--output 'x'", "'logits'")
    elif case == "input_size":
        _failure(tmp_path, capsys, ["--module", "mynets.nets:fixed", "--crop", "48"],
                 "rejects an input of size [1,3,48,48]", "RuntimeError: ", "--input-size")
    elif case == "not_differentiable":
        _failure(tmp_path, capsys, [*module, "--factory-arg", "mode='roi'"],
                 "ONNX operator MaxRoiPool", "module 'norm' (RoiMax)", "--layer")
    elif case == "labels_count":
        labels = tmp_path / "labels.txt"
        labels.write_text("a\nb\nc\n")
        _failure(tmp_path, capsys, [*module, "--labels", str(labels)], "3 labels", "5 classes")
    elif case == "weights_keys":
        weights = tmp_path / "w.pt"
        torch.save({"model": {"fc.weight": torch.zeros(5, 16), "head.bias": torch.zeros(5)}},
                   weights)
        _failure(tmp_path, capsys, [*module, "--weights", str(weights)],
                 "a checkpoint's 'model'", "missing keys features.0.weight",
                 "unexpected keys head.bias")
    elif case == "factory_fails":
        _failure(tmp_path, capsys, [*module, "--factory-arg", "width=-1"],
                 "make(width=-1) failed: RuntimeError")
    elif case == "no_factory":
        _failure(tmp_path, capsys, ["--module", "mynets.nets:maek"], "has no 'maek'", "make")
    elif case == "channels":
        _failure(tmp_path, capsys, [*module, "--factory-arg", "in_channels=1"],
                 "[1,3,32,32]", "--grayscale single")
    elif case == "no_package":
        _failure(tmp_path, capsys, ["--module", "nowhere.nets:make"], "cannot import")
    else:
        value = {"crop": "0x32", "mean": "0.5,0.5", "std": "0.2,0,0.2", "scale": "abc",
                 "resize": "16", "interpolation": "nearest", "grayscale": "none"}[case]
        _failure(tmp_path, capsys, [*module, f"--{case}", value], case)


def test_output_picks_the_logits(package, tmp_path, capsys):
    out = tmp_path / "out"
    for mode, output in (("tuple", "0"), ("dict", "logits")):
        code, _, err = _cli(capsys, "--module", "mynets.nets:make", "--factory-arg",
                            f"mode={mode}", "--output", output, "--crop", "32", "--name", mode,
                            "--out", str(out))
        assert code == 0, err
    plain = _nets().make().eval()
    image = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = plain(torch.from_numpy(image)).numpy()
    for mode in ("tuple", "dict"):
        session = ort.InferenceSession(str(out / f"{mode}.onnx"),
                                       providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"image": image,
                                          "targets": np.zeros((1, 1), np.int64)})[0]
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


# --- 4. timm --------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_model_with_random_weights(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "--timm", "resnet10t", "--input-size", "64",
                             "--out", str(out))
    assert code == 0, err
    assert "RANDOM" in err and "timm model resnet10t" in err
    card = _card(out / "resnet10t.onnx")
    assert card.architecture == "timm/resnet10t" and card.num_classes == 1000
    assert card.preprocessing.crop == (64, 64)
    session = ort.InferenceSession(str(out / "resnet10t.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits, _, activations, gradients = session.run(
        None, {"image": np.zeros((1, 3, 64, 64), np.float32),
               "targets": np.array([[-1]], np.int64)})
    assert logits.shape == (1, 1000) and gradients.shape == (1, 1, *activations.shape[1:])


# --- 5. one-channel models: --grayscale single ----------------------------------------------

def test_one_channel_model(package, tmp_path, capsys):
    from camserve import tensors
    from camserve.server.app import start
    from camserve.server.config import ServerConfig
    from camserve.v1 import explainer_pb2 as pb
    from camserve.v1 import explainer_pb2_grpc as pb_grpc

    out = tmp_path / "out"
    code, _, err = _cli(capsys, "--module", "mynets.nets:make", "--factory-arg", "in_channels=1",
                        "--grayscale", "single", "--mean", "0.45", "--std", "0.22",
                        "--crop", "32", "--input-gradients", "--name", "gray",
                        "--out", str(out))
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["gray.head.onnx", "gray.onnx", "gray.saliency.onnx"]
    spec = _card(out / "gray.onnx").preprocessing
    assert (spec.grayscale, spec.channels, spec.mean, spec.std) == ("single", 1, (0.45,), (0.22,))

    # gradients against float64 autograd on one-channel inputs
    session = ort.InferenceSession(str(out / "gray.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(3).standard_normal((2, 1, 32, 32)).astype(np.float32)
    _, classes, activations, gradients = session.run(
        None, {contract.IMAGE: images, contract.TARGETS: np.array([[0, 4], [2, 1]])})
    model = gradcheck.float64(_nets().make(in_channels=1).eval())
    _, ref_acts, ref_grads = _autograd(model, "features", images, classes)
    np.testing.assert_allclose(activations, ref_acts, atol=1e-4 * np.abs(ref_acts).max())
    near = [_autograd(model, "features", x, classes)[2] for x in gradcheck.neighbours(images)]
    gradcheck.assert_gradients_close(gradients, gradcheck.Reference(ref_grads, lambda: near))

    # the server's input: luma of the resampled RGB crop, then normalised
    rng = np.random.default_rng(4)
    photo = cv2.resize(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), (100, 60),
                       interpolation=cv2.INTER_CUBIC)
    image, _ = preprocess(photo, spec)
    assert image.shape == (1, 1, 32, 32)
    raw = preprocess(photo, contract.Preprocessing(spec.resize, spec.crop, (0.0,) * 3,
                                                   (1.0,) * 3, 1.0))[0][0]
    luma = 0.299 * raw[0] + 0.587 * raw[1] + 0.114 * raw[2]
    np.testing.assert_allclose(image[0, 0], (luma / 255 - 0.45) / 0.22, atol=1e-4)

    running = start(ServerConfig(models=out, port=0, device="cpu", intra_op_threads=1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            info = stub.GetModel(pb.GetModelRequest(name="gray"))
            assert list(info.input_shape) == [1, 1, 32, 32]
            assert info.preprocessing.grayscale == "single"
            pixels = pb.RawImage(height=60, width=100, pixels=photo.tobytes())
            response = stub.Explain(pb.ExplainRequest(pixels=pixels, model="gray",
                                                      classes=[1, 3]))
            expected = _gradcam(session, image, [1, 3])
            for k, target in enumerate(response.targets):
                np.testing.assert_allclose(tensors.from_proto(target.cam).astype(np.float32),
                                           expected[k], atol=1e-5)
            gray_png = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY))[1]
            by_tensor = stub.Explain(pb.ExplainRequest(tensor=tensors.to_proto(image),
                                                       model="gray", classes=[1]))
            assert len(by_tensor.targets) == 1
            assert "saliency" in info.methods and "ablationcam" in info.methods
            for method in info.methods:
                for request in (pb.ExplainRequest(pixels=pixels, model="gray", classes=[2],
                                                  method=method),
                                pb.ExplainRequest(encoded=gray_png.tobytes(), model="gray",
                                                  classes=[2], method=method)):
                    cam = tensors.from_proto(stub.Explain(request).targets[0].cam)
                    assert cam.shape == (32, 32) and np.isfinite(cam).all(), method
    finally:
        running.stop(grace=1)
