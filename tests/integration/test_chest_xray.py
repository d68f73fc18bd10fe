"""The README's chest X-ray recipe, end to end: a DenseNet-121 with 14 findings exported by the
CLI (--grayscale replicate --resize 512 --crop 480 --labels), served over gRPC, fed 16-bit
grayscale PNGs.

Checked: the exported gradients against float64 autograd (``gradcheck``); the served
Grad-CAM maps of several findings in one request against grad-cam 1.5.7 on the same weights
and model input; the server's windowing of the 16-bit PNG (its own min..max, and a fixed
``window``) against an independent NumPy computation of the stated formula sent as plain
8-bit pixels; regions at 0.6 in the X-ray's own pixels; the article's SmoothGrad (50 noisy
copies, sigma 0.15) in one request against the same average computed here with NumPy from the
exported graph's outputs; and the window's errors.

Random weights (nothing is downloaded); real use loads a local checkpoint with --weights.
"""

from __future__ import annotations

import json

import cv2
import gradcheck
import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

from camserve import contract
from camserve.cli import main as camserve_main
from camserve.client import Client
from camserve.explain.image import preprocess
from camserve.export.layers import capture
from camserve.server.app import start
from camserve.server.config import ServerConfig
from camserve.v1 import explainer_pb2 as pb

pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia"]
HEIGHT, WIDTH = 700, 600  # the X-ray: not square, larger than the 512/480 preprocessing


@pytest.fixture(scope="module")
def densenet():
    torch.manual_seed(5)
    model = torchvision.models.densenet121(num_classes=len(FINDINGS)).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def recipe(densenet, tmp_path_factory):
    """The recipe's export (the README's command) and a server on it."""
    folder = tmp_path_factory.mktemp("xray")
    weights, labels = folder / "chexnet.pt", folder / "findings.txt"
    torch.save(densenet.state_dict(), weights)
    labels.write_text("\n".join(FINDINGS) + "\n")
    out = folder / "models"
    code = camserve_main([
        "export", "--module", "torchvision.models:densenet121",
        "--factory-arg", f"num_classes={len(FINDINGS)}", "--weights", str(weights),
        "--grayscale", "replicate", "--resize", "512", "--crop", "480",
        "--labels", str(labels), "--name", "chestxray", "--out", str(out)])
    assert code == 0
    running = start(ServerConfig(models=out, port=0, device="cpu"))
    with Client(f"127.0.0.1:{running.port}", timeout=120) as client:
        client.models_folder = out  # the exported files, for the gradient check
        client.address = f"127.0.0.1:{running.port}"
        yield client
    running.stop(grace=0)


class _OutOfPlaceReLU(torchvision.models.DenseNet):
    """torchvision's DenseNet with its final ReLU out of place. The original's
    ``F.relu(features, inplace=True)`` overwrites the ``features`` output that grad-cam's
    hook saved, so grad-cam would weight the ReLU'd activations (another map than Grad-CAM's
    A of the layer). The logits are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.relu(self.features(x))
        return self.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(out, 1), 1))


@pytest.fixture(scope="module")
def graph(recipe) -> ort.InferenceSession:
    """The exported explainer graph itself, on onnxruntime's CPU provider."""
    return ort.InferenceSession(str(recipe.models_folder / "chestxray.onnx"),
                                providers=["CPUExecutionProvider"])


def _grad_cam_reference(densenet: torch.nn.Module) -> torch.nn.Module:
    reference = torchvision.models.densenet121(num_classes=len(FINDINGS))
    reference.__class__ = _OutOfPlaceReLU
    reference.load_state_dict(densenet.state_dict())
    return reference.eval()


def _xray(seed: int = 0) -> np.ndarray:
    """uint16 [700, 600] in a 12-bit range: two lung fields, a brighter blob, noise."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    lungs = sum(np.exp(-(((y - 330) / 220) ** 2 + ((x - cx) / 110) ** 2)) for cx in (180, 420))
    blob = np.exp(-(((y - 250) / 40) ** 2 + ((x - 430) / 40) ** 2))
    noise = np.random.default_rng(seed).normal(0, 30, (HEIGHT, WIDTH))
    return np.clip(3600 - 2400 * lungs + 900 * blob + noise, 200, 4000).astype(np.uint16)


def _png(samples: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", samples)
    assert ok
    return data.tobytes()


def _windowed(samples: np.ndarray, lower: float, width: float) -> np.ndarray:
    """The stated formula in float64 NumPy, replicated to RGB uint8 [H,W,3]."""
    v8 = np.floor(np.clip((samples.astype(np.float64) - lower) / width, 0, 1) * 255 + 0.5)
    return np.repeat(v8.astype(np.uint8)[..., None], 3, axis=2)


def test_the_recipe_is_in_the_card_and_get_model(recipe):
    info = recipe.get_model("chestxray")
    assert info.labels == tuple(FINDINGS)
    assert info.input_shape[1:] == (3, 480, 480)
    spec = info.preprocessing
    assert (spec.resize, spec.crop, spec.grayscale) == (512, (480, 480), "replicate")
    assert [layer.name for layer in info.layers] == ["features"]


@pytest.mark.parametrize("window", [None, (2000.0, 1500.0)])
def test_the_server_windows_a_16bit_png_as_stated(recipe, window):
    """The PNG, windowed by the server, explains exactly as the NumPy-windowed 8-bit pixels."""
    xray = _xray()
    if window is None:  # min..max of the image
        lower, width = float(xray.min()), float(xray.max() - xray.min())
    else:
        lower, width = window[0] - window[1] / 2, window[1]
    from_png = recipe.explain(_png(xray), model="chestxray", top_k=2, window=window)
    from_pixels = recipe.explain(_windowed(xray, lower, width), model="chestxray", top_k=2)
    for a, b in zip(from_png, from_pixels, strict=True):
        assert a.class_index == b.class_index and a.logit == b.logit
        np.testing.assert_array_equal(a.cam_input, b.cam_input)
    plain_8bit = recipe.explain(_windowed(xray, 0.0, 65535.0), model="chestxray", top_k=2)
    assert plain_8bit[0].logit != from_png[0].logit  # the windowing did something


def test_several_findings_equal_grad_cam_with_regions_in_xray_pixels(recipe, densenet):
    xray = _xray(seed=1)
    asked = [2, 7, 9]  # Effusion, Pneumothorax, Edema, in one request
    found = recipe.explain(_png(xray), model="chestxray", targets=asked, regions=True,
                           region_threshold=0.6)
    assert [e.class_index for e in found] == asked
    assert [e.label for e in found] == [FINDINGS[c] for c in asked]
    spec = recipe.get_model("chestxray").preprocessing
    lower, width = float(xray.min()), float(xray.max() - xray.min())
    image, _ = preprocess(_windowed(xray, lower, width), spec)
    reference = _grad_cam_reference(densenet)
    for explanation in found:
        with GradCAM(model=reference, target_layers=[reference.features]) as cam:
            expected = cam(input_tensor=torch.from_numpy(image),
                           targets=[ClassifierOutputTarget(explanation.class_index)])[0]
        assert np.abs(explanation.cam_input - expected).max() <= 1e-3
        assert explanation.cam.shape == (HEIGHT, WIDTH)  # back on the X-ray's grid
        assert explanation.server_regions, "a normalised map has a region at 0.6"
        for region in explanation.server_regions:
            x0, y0, x1, y1 = region.box
            assert 0 <= x0 < x1 <= WIDTH and 0 <= y0 < y1 <= HEIGHT
            assert region.peak >= 0.6
            assert explanation.cam[y0:y1, x0:x1].max() == pytest.approx(region.peak, abs=1e-6)
        assert [r.box for r in explanation.server_regions] == \
            [r.box for r in explanation.regions(0.6)]  # the server's equal the SDK's


def test_the_exported_gradients_equal_float64_autograd(recipe, densenet, graph):
    """At the recipe's 480x480 input, one finding and the predicted one."""
    spec = recipe.get_model("chestxray").preprocessing
    xray = _xray(seed=2)
    image, _ = preprocess(_windowed(xray, float(xray.min()), float(np.ptp(xray))), spec)
    targets = np.array([[4, -1]], np.int64)
    logits, classes, activations, gradients = graph.run(
        None, {contract.IMAGE: image, contract.TARGETS: targets})
    model = gradcheck.float64(densenet)
    x = torch.from_numpy(image.astype(np.float64))

    def autograd(at: np.ndarray, resolved: np.ndarray):
        with torch.enable_grad(), capture(model, ["features"]) as store:
            out = model(torch.from_numpy(np.asarray(at, np.float64)))
        grads = [torch.autograd.grad(out[0, int(c)], store["features"], retain_graph=True)[0]
                 for c in resolved[0]]
        return (out.detach().numpy(), store["features"].detach().numpy(),
                torch.stack(grads, dim=1).numpy())

    with torch.no_grad():
        ref_logits = model(x).numpy()
    resolved = gradcheck.resolve_classes(ref_logits, targets.tolist())
    np.testing.assert_array_equal(classes, resolved)
    ref_logits, ref_acts, ref_grads = autograd(image, resolved)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max())
    np.testing.assert_allclose(activations, ref_acts, atol=1e-4 * np.abs(ref_acts).max())
    gradcheck.assert_gradients_close(gradients, gradcheck.Reference(
        ref_grads, lambda: [autograd(n, resolved)[2] for n in gradcheck.neighbours(image)]))


def _min_max(maps: np.ndarray) -> np.ndarray:
    """grad-cam's scale_cam_image without the resize: (x - min) / (max - min + 1e-7)."""
    shifted = maps - maps.min(axis=(-2, -1), keepdims=True)
    return shifted / (shifted.max(axis=(-2, -1), keepdims=True) + 1e-7)


def _grad_cams(activations: np.ndarray, gradients: np.ndarray, size: int) -> np.ndarray:
    """Grad-CAM as grad-cam 1.5.7 computes it for one layer and target, per image:
    activations [S,C,h,w] and gradients [S,1,C,h,w] -> maps [S,size,size]."""
    weights = gradients[:, 0].mean(axis=(2, 3))                           # [S,C]
    cams = _min_max(np.maximum(np.einsum("sc,schw->shw", weights, activations), 0))
    resized = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR)
                        for c in cams])
    return _min_max(np.maximum(resized, 0))  # its layer aggregation, even for one layer


def test_the_articles_smoothgrad_averages_50_copies_at_sigma_015(recipe, graph):
    """The article's SmoothGrad of Grad-CAM in one request: 50 copies of the model input
    with Gaussian noise of std 0.15 x (its max - min), their maps averaged and min-max
    normalised. The same average is computed here from the exported graph's activations and
    gradients of the same copies (the seed's NumPy stream: default_rng(seed), float32
    standard normals [50,3,480,480]); this costs one more 50-image run (~15 s here)."""
    xray, finding, seed, samples, sigma = _xray(seed=3), 2, 7, 50, 0.15
    smooth = recipe.explain(_png(xray), model="chestxray", targets=[finding],
                            noise_samples=samples, noise_sigma=sigma, seed=seed,
                            regions=True, region_threshold=0.6)[0]
    spec = recipe.get_model("chestxray").preprocessing
    image, _ = preprocess(_windowed(xray, float(xray.min()), float(np.ptp(xray))), spec)
    noise = np.random.default_rng(seed).standard_normal((samples, *image.shape[1:]),
                                                        dtype=np.float32)
    copies = image + np.float32(sigma * float(image.max() - image.min())) * noise
    maps = []
    for chunk in np.array_split(copies, 5):  # 10 at a time: a smaller peak of memory
        _, _, activations, gradients = graph.run(None, {
            contract.IMAGE: chunk, contract.TARGETS: np.full((len(chunk), 1), finding)})
        maps.append(_grad_cams(activations, gradients, image.shape[-1]))
    expected = _min_max(np.concatenate(maps).mean(axis=0))
    assert np.abs(smooth.cam_input - expected).max() <= 1e-3
    _, _, activations, gradients = graph.run(None, {
        contract.IMAGE: image, contract.TARGETS: np.array([[finding]])})
    plain = _grad_cams(activations, gradients, image.shape[-1])[0]
    assert np.abs(expected - plain).max() > 0.05  # the 50 noisy copies do change the map
    assert smooth.server_regions and all(r.peak >= 0.6 for r in smooth.server_regions)


@pytest.mark.parametrize("window, what", [
    ((2000.0, 0.0), "a width > 0"), ((float("nan"), 100.0), "a width > 0")])
def test_a_bad_window_is_invalid_argument_with_its_values(recipe, window, what):
    request = pb.ExplainRequest(model="chestxray", encoded=_png(_xray()),
                                window=pb.IntensityWindow(center=window[0], width=window[1]))
    with pytest.raises(grpc.RpcError) as caught:
        recipe._stub.Explain(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert what in caught.value.details()


@pytest.mark.parametrize("image, what", [
    ({"pixels": pb.RawImage(height=4, width=4, pixels=bytes(48))}, "sends pixels"),
    ({"tensor": pb.Tensor(dtype=pb.FLOAT32, shape=[1, 3, 480, 480])}, "sends tensor"),
    ({}, "sends no image"),
    ({"encoded": b"not an image"}, "not a JPEG, PNG, WebP or BMP file"),
])
def test_a_window_on_a_request_without_a_file_is_invalid_argument(recipe, image, what):
    request = pb.ExplainRequest(model="chestxray", window=pb.IntensityWindow(center=100,
                                                                              width=50), **image)
    with pytest.raises(grpc.RpcError) as caught:
        recipe._stub.Explain(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert what in caught.value.details(), caught.value.details()


def test_the_cli_explains_several_findings_with_a_window(recipe, tmp_path, capsys):
    xray = _xray(seed=4)
    path = tmp_path / "xray.png"
    path.write_bytes(_png(xray))
    out = tmp_path / "out"
    code = camserve_main(["explain", str(path), "--server", recipe.address,
                          "--model", "chestxray", "--target", "2", "--target", "9",
                          "--window", "2000,3000", "--threshold", "0.6", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = json.loads((out / "xray.json").read_text())["explanations"]
    assert [r["label"] for r in records] == ["Effusion", "Edema"]
    direct = recipe.explain(str(path), model="chestxray", targets=[2, 9],
                            window=(2000.0, 3000.0))
    for record, explanation in zip(records, direct, strict=True):
        assert record["boxes"] == [list(b) for b in explanation.boxes(0.6)]
    overlay = cv2.imread(str(out / f"xray_2_{records[0]['method']}_overlay.png"))
    assert overlay.shape == (HEIGHT, WIDTH, 3)  # drawn on the X-ray, at its size


@pytest.mark.parametrize("window", ["2000", "2000,0", "a,b", "1,2,3"])
def test_a_bad_cli_window_is_one_line(tmp_path, capsys, window):
    path = tmp_path / "xray.png"
    path.write_bytes(_png(_xray()))
    code = camserve_main(["explain", str(path), "--window", window, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--window" in err, err
