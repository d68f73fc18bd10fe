"""onnxruntime IO binding (``ExplainerModel.io_binding``, ``run_bound``): on by default on the
CUDA provider only, and returning exactly what ``session.run`` returns.

This machine has no GPU, so the binding path runs here on the CPU provider (inputs bound
from host arrays, outputs allocated by onnxruntime and copied out once): the same code the
CUDA provider runs, with device "cpu" instead of "cuda".
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from camserve.export import export_explainer
from camserve.server import runtime as runtime
from camserve.server.runtime import CUDA, load_model, load_models, run_bound


def _pair(path):
    """The same file opened twice on the CPU: without and with IO binding."""
    return (load_model(path, device="cpu", threads=1, io_binding=False),
            load_model(path, device="cpu", threads=1, io_binding=True))


def _same(a, b) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b)


def _check_run(plain, bound, batch: int) -> None:
    height, width = plain.card.input_size
    image = np.random.default_rng(batch).standard_normal((batch, 3, height, width)
                                                          ).astype(np.float32)
    targets = np.array([[-1, 3, -2]] * batch, np.int64)
    layers = [layer.name for layer in plain.card.layers]
    logits, classes, per_layer = plain.run(image, targets, layers)
    logits_b, classes_b, per_layer_b = bound.run(image, targets, layers)
    _same(logits, logits_b)
    _same(classes, classes_b)
    assert list(per_layer) == list(per_layer_b) == layers
    for name in layers:
        for x, y in zip(per_layer[name], per_layer_b[name]):
            _same(x, y)
    _same(plain.logits(image), bound.logits(image))
    for name in plain.head_layers:  # the other layers' heads are fed an empty batch
        _same(plain.head_logits(name, per_layer[name][0]),
              bound.head_logits(name, per_layer[name][0]))
    first = plain.run(image, targets, layers[:1])  # a subset of the outputs, in order
    for x, y in zip(first[2][layers[0]], bound.run(image, targets, layers[:1])[2][layers[0]]):
        _same(x, y)


@pytest.mark.parametrize("name", ["tiny", "tiny2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bound_runs_equal_plain_runs(models_dir, name, batch):
    _check_run(*_pair(models_dir / f"{name}.onnx"), batch)


def test_bound_runs_equal_plain_runs_on_efficientnet_lite0(lite0_dir):
    _check_run(*_pair(lite0_dir / "efficientnet_lite0.onnx"), 2)


def test_bound_saliency_companion_equals_plain(tmp_path, tiny_model):
    export_explainer(tiny_model, tmp_path / "t.onnx", input_size=64, input_gradients=True)
    plain, bound = _pair(tmp_path / "t.onnx")
    assert plain.saliency is not None and bound.saliency is not None
    images = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    for x, y in zip(plain.gradients_of(images, [2, 5]), bound.gradients_of(images, [2, 5])):
        _same(x, y)


def test_run_bound_equals_session_run(models_dir):
    session = load_model(models_dir / "tiny.onnx", device="cpu", threads=1).session
    feeds = {"image": np.ones((2, 3, 64, 64), np.float32),
             "targets": np.array([[0, -1], [9, -3]], np.int64)}
    names = ["gradients", "logits", "classes"]  # not the graph's order
    for x, y in zip(session.run(names, feeds), run_bound(session, names, feeds)):
        _same(x, y)


def test_concurrent_bound_runs_do_not_mix(models_dir):
    _, bound = _pair(models_dir / "tiny.onnx")
    images = [np.full((1, 3, 64, 64), value, np.float32) for value in np.linspace(-1, 1, 8)]
    targets = np.full((1, 1), -1, np.int64)
    expected = [bound.run(image, targets, ["features"])[0] for image in images]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda image: bound.run(image, targets, ["features"])[0],
                                images))
            for x, y in zip(expected, got):
                _same(x, y)


def test_default_is_on_for_cuda_only(models_dir, monkeypatch):
    assert not load_model(models_dir / "tiny.onnx", device="cpu").io_binding
    assert not any(m.io_binding for m in load_models(models_dir, device="cpu").values())
    assert load_model(models_dir / "tiny.onnx", device="cpu", io_binding=True).io_binding

    real = runtime.open_session

    def as_if_cuda(path, device, threads, cpu_arena=True):  # a CPU session that says it got CUDA
        return real(path, "cpu", threads, cpu_arena)[0], CUDA

    monkeypatch.setattr(runtime, "open_session", as_if_cuda)
    model = load_model(models_dir / "tiny.onnx", device="cuda")
    assert model.provider == CUDA and model.io_binding
    assert not load_model(models_dir / "tiny.onnx", device="cuda", io_binding=False).io_binding
    model.warm_up()  # runs bound, on the CPU session underneath
