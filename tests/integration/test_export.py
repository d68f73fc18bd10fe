"""Export: explainer graphs against torch.autograd, the ONNX file against graph contract v1,
a pretrained model on a real photo, and the ``camserve export`` CLI on bad input.

Every export here is real (torch.onnx + onnx-ad) and every graph runs in onnxruntime on the
CPU. Each model is exported once per module and its B/K cases are checked together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import gradcheck
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from camserve import contract
from camserve.cli import main as camserve_main
from camserve.contract import ModelCard, Preprocessing
from camserve.export import ExportResult, export_explainer
from camserve.export.layers import capture
from camserve.export.models import load

# (B, K) cases per model: explicit, negative (-r = r-th highest logit) and mixed targets.
TARGET_CASES = {
    "B1K1": [[-1]],
    "B1K3": [[-1, 7, -3]],
    "B4K1": [[-1], [3], [-2], [0]],
    "B4K3": [[-1, 7, -3], [0, -2, 5], [-1, -1, 3], [9, -5, 2]],
}


class SmallNet(torch.nn.Module):
    """conv-bn-relu-conv-relu, adaptive average pool, linear: [B,3,64,64] -> [B,10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _small_net() -> SmallNet:
    model = SmallNet().eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        bn = model.features[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model


@dataclass(frozen=True)
class Spec:
    """What to export: a torchvision architecture (or "custom"), its input size and layers."""

    arch: str
    size: int
    layers: tuple[str, ...] | None = None
    seed: int = 0


# Inputs are as small as the architecture allows while the activations stay spatial (>1x1).
# vgg11 needs 224: its AdaptiveAvgPool2d(7) exports only when 7 divides the feature size.
SPECS = {
    "resnet18": Spec("resnet18", 128),
    "vgg11": Spec("vgg11", 224),
    "densenet121": Spec("densenet121", 64),
    "mobilenet_v3_small": Spec("mobilenet_v3_small", 96),
    "efficientnet_b0": Spec("efficientnet_b0", 96),
    "resnet18_layer3": Spec("resnet18", 128, ("layer3",)),
    "resnet18_two_layers": Spec("resnet18", 128, ("layer3", "layer4")),
    "custom": Spec("custom", 64),
    "custom_conv_head": Spec("custom", 64, ("features.2",)),
}
PARITY = ["resnet18", "vgg11", "densenet121", "mobilenet_v3_small", "efficientnet_b0",
          "resnet18_layer3", "custom", "custom_conv_head"]


@dataclass
class Exported:
    spec: Spec
    module: torch.nn.Module
    result: ExportResult
    session: ort.InferenceSession
    labels: list[str]
    preprocessing: Preprocessing | None

    @property
    def path(self) -> Path:
        return self.result.path

    @property
    def layers(self) -> list[str]:
        return [layer.name for layer in self.result.card.layers]


def _export(spec: Spec, folder: Path, name: str) -> Exported:
    torch.manual_seed(spec.seed)
    if spec.arch == "custom":
        module, labels, preprocessing, architecture = _small_net(), None, None, "custom"
    else:
        loaded = load(spec.arch)
        module, labels, architecture = loaded.module, loaded.labels, loaded.architecture
        preprocessing = Preprocessing.imagenet(spec.size)
    result = export_explainer(module, folder / f"{name}.onnx", input_size=spec.size,
                              target_layers=list(spec.layers) if spec.layers else None,
                              labels=labels, preprocess=preprocessing,
                              architecture=architecture)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    labels = labels or [f"class {i}" for i in range(10)]
    return Exported(spec, module, result, session, labels, preprocessing)


class Exports:
    """Exports made on first use and kept for the module; ``drop`` frees a big one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[str, Exported] = {}

    def get(self, name: str) -> Exported:
        if name not in self.done:
            self.done[name] = _export(SPECS[name], self.folder, name)
        return self.done[name]

    def drop(self, name: str) -> None:
        self.done.pop(name, None)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


def _images(exported: Exported, batch: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    size = exported.spec.size
    return torch.randn(batch, 3, size, size, generator=generator).numpy()


def _run(exported: Exported, images: np.ndarray, targets) -> dict[str, np.ndarray]:
    names = [o.name for o in exported.session.get_outputs()]
    values = exported.session.run(None, {contract.IMAGE: images,
                                         contract.TARGETS: np.asarray(targets, np.int64)})
    return dict(zip(names, values))


@dataclass
class Reference:
    logits: np.ndarray  # [B,N]
    classes: np.ndarray  # [B,K]
    activations: dict[str, np.ndarray]  # layer -> [B,C,h,w]
    gradients: dict[str, gradcheck.Reference]  # layer -> [B,K,C,h,w]


def _autograd(model: torch.nn.Module, layers: list[str], images: np.ndarray,
              classes: np.ndarray | None, targets=None):
    """float64 autograd: logits, classes (resolved from ``targets`` when None), each layer's
    activation and d logits[b, class] / d activation [B,K,C,h,w]; per k one backward of the
    sum over the batch (in eval mode the samples do not interact)."""
    x = torch.from_numpy(np.asarray(images, np.float64))
    with torch.enable_grad(), capture(model, layers) as store:
        logits = model(x)
    acts = [store[name] for name in layers]
    if classes is None:
        classes = gradcheck.resolve_classes(logits.detach().numpy(), targets)
    rows = torch.arange(len(images))
    per_k = [torch.autograd.grad(logits[rows, torch.from_numpy(classes[:, k])].sum(), acts,
                                 retain_graph=True) for k in range(classes.shape[1])]
    grads = {name: np.stack([grads[i].numpy() for grads in per_k], axis=1)
             for i, name in enumerate(layers)}
    return logits.detach().numpy(), classes, acts, grads


def _reference(module: torch.nn.Module, layers: list[str], images: np.ndarray,
               targets) -> Reference:
    """float64 torch.autograd: d logits[b, class] / d activation, per sample and target, as
    ``gradcheck.Reference``s (their kink spread from the images' neighbours, on demand)."""
    model = gradcheck.float64(module)
    logits, classes, acts, grads = _autograd(model, layers, images, None, targets)
    near: list[dict[str, np.ndarray]] = []

    def at_neighbours(name: str) -> list[np.ndarray]:
        if not near:  # all layers at once, the first time one is asked for
            near.extend(_autograd(model, layers, x, classes)[3]
                        for x in gradcheck.neighbours(images))
        return [grads_near[name] for grads_near in near]

    return Reference(logits, classes,
                     {name: act.detach().numpy() for name, act in zip(layers, acts)},
                     {name: gradcheck.Reference(grads[name],
                                                lambda name=name: at_neighbours(name))
                      for name in layers})


def _assert_close(actual: np.ndarray, expected: np.ndarray, what: str,
                  rel: float = 1e-4) -> None:
    """Element-wise, for values (logits, activations): continuous, so no kinks."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max())
    error = float(np.abs(actual - expected).max())
    assert scale > 0, f"{what}: the reference is all zeros"
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel} * {scale:.3g}"


def _check_against_torch(exported: Exported, images: np.ndarray, targets) -> None:
    out = _run(exported, images, targets)
    ref = _reference(exported.module, exported.layers, images, targets)
    _assert_close(out[contract.LOGITS], ref.logits, "logits")
    np.testing.assert_array_equal(out[contract.CLASSES], ref.classes)
    for layer in exported.result.card.layers:
        _assert_close(out[layer.activations], ref.activations[layer.name],
                      f"activations of {layer.name}")
        verdict = gradcheck.assert_gradients_close(
            out[layer.gradients], ref.gradients[layer.name], f"gradients of {layer.name}")
        print(f"{exported.spec.arch} {layer.name} B{len(images)}: {verdict}")


def _nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its control-flow bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


# --- 1. gradients (and logits, classes, activations) against torch.autograd ----------------

@pytest.mark.parametrize("name", PARITY)
def test_matches_torch_autograd(exports, name):
    exported = exports.get(name)
    for seed, (case, targets) in enumerate(TARGET_CASES.items()):
        images = _images(exported, len(targets), seed)
        try:
            _check_against_torch(exported, images, targets)
        except AssertionError as exc:
            raise AssertionError(f"{name} {case} targets={targets}: {exc}") from exc
    if name not in ("resnet18", "resnet18_layer3", "mobilenet_v3_small"):
        exports.drop(name)  # used by no other test; frees vgg11's 500 MB early


# --- 2. gradients are computed from the input, not folded into constants ---------------------

@pytest.mark.parametrize("name", ["resnet18_layer3", "mobilenet_v3_small"])
def test_gradients_change_with_the_input(exports, name):
    """Heads with a nonlinearity (a linear head's gradient does not depend on the input)."""
    exported = exports.get(name)
    targets = [[7, -1]]
    first, second = _images(exported, 1, 100), _images(exported, 1, 101)
    g1 = _run(exported, first, targets)[contract.GRADIENTS]
    g2 = _run(exported, second, targets)[contract.GRADIENTS]
    assert np.abs(g1 - g2).max() > 0.01 * np.abs(g1).max()
    _check_against_torch(exported, second, targets)


# --- 3. the file: valid ONNX, default domain only, metadata, named outputs -------------------

def test_file_is_valid_default_domain_onnx_with_metadata(exports):
    exported = exports.get("resnet18")
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model, full_check=True)
    assert all(op.domain in ("", "ai.onnx") for op in model.opset_import)
    foreign = {(n.domain, n.op_type) for n in _nodes(model.graph)
               if n.domain not in ("", "ai.onnx")}
    assert not foreign

    assert [i.name for i in model.graph.input] == [contract.IMAGE, contract.TARGETS]
    assert [o.name for o in model.graph.output] == [
        contract.LOGITS, contract.CLASSES, contract.ACTIVATIONS, contract.GRADIENTS]

    props = {p.key: p.value for p in model.metadata_props}
    assert set(contract.METADATA_KEYS) <= set(props)
    card = ModelCard.from_metadata(props)
    assert card == exported.result.card
    assert card.architecture == "resnet18"
    assert list(card.labels) == exported.labels and len(card.labels) == 1000
    assert card.preprocessing == exported.preprocessing
    assert card.contract_version == contract.CONTRACT_VERSION
    (layer,) = card.layers
    assert (layer.name, layer.activations, layer.gradients) == (
        "layer4", contract.ACTIVATIONS, contract.GRADIENTS)
    assert layer.shape == (512, 4, 4)
    assert exported.result.default_layer_chosen


def test_scan_bodies_are_default_domain_too(exports):
    model = onnx.load(str(exports.get("resnet18_layer3").path))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in _nodes(model.graph)]
    assert "Scan" in ops  # the conv head runs per sample inside a Scan
    assert all(n.domain in ("", "ai.onnx") for n in _nodes(model.graph))


def test_two_layers_name_their_outputs_and_match_autograd(exports):
    exported = exports.get("resnet18_two_layers")
    model = onnx.load(str(exported.path))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == [
        contract.LOGITS, contract.CLASSES, "activations.layer3", "gradients.layer3",
        "activations.layer4", "gradients.layer4"]
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert [(lay.name, lay.activations, lay.gradients, lay.shape) for lay in card.layers] == [
        ("layer3", "activations.layer3", "gradients.layer3", (256, 8, 8)),
        ("layer4", "activations.layer4", "gradients.layer4", (512, 4, 4))]
    assert not exported.result.default_layer_chosen
    for seed, targets in enumerate([TARGET_CASES["B1K1"], TARGET_CASES["B4K3"]]):
        _check_against_torch(exported, _images(exported, len(targets), 50 + seed), targets)


# --- 4. no weight is transposed at run time ---------------------------------------------------

def test_no_runtime_transpose_of_weights(exports):
    model = onnx.load(str(exports.get("resnet18").path))
    weights = {init.name for init in model.graph.initializer}
    transposed = [list(n.input) for n in _nodes(model.graph)
                  if n.op_type == "Transpose" and any(i in weights for i in n.input)]
    assert not transposed


@pytest.mark.parametrize("name", ["resnet18", "resnet18_layer3"])
def test_onnxruntime_optimised_graph_transposes_no_weights(exports, tmp_path, name):
    """After onnxruntime's own graph optimisation (constant folding included; Scan bodies
    too), no Transpose reads a weight at run time."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(exports.get(name).path), options,
                         providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimised.onnx"))
    weights = {init.name for init in model.graph.initializer}
    for graph in [model.graph, *(a.g for n in _nodes(model.graph) for a in n.attribute
                                 if a.type == onnx.AttributeProto.GRAPH)]:
        weights |= {init.name for init in graph.initializer}
    transposed = [list(n.input) for n in _nodes(model.graph)
                  if n.op_type == "Transpose" and any(i in weights for i in n.input)]
    assert not transposed


def _dead_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes none of whose outputs reach the graph's outputs, in ``graph`` and its bodies."""
    live = {o.name for o in graph.output}
    dead = []
    for node in reversed(graph.node):
        bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        if any(o in live for o in node.output):
            live.update(node.input)
            live.update(i for body in bodies for n in _nodes(body) for i in n.input)
        else:
            dead.append(f"{node.op_type}({', '.join(node.input)})")
        for body in bodies:
            dead += _dead_nodes(body)
    return dead


@pytest.mark.parametrize("name", ["resnet18_layer3", "mobilenet_v3_small"])
def test_no_dead_nodes(exports, name):
    """onnx-ad also differentiates the weights; nothing may compute that per call (inside a
    Scan body it cost vgg11 a minute per image)."""
    assert not _dead_nodes(onnx.load(str(exports.get(name).path)).graph)


@pytest.mark.parametrize("name", ["resnet18", "resnet18_layer3", "mobilenet_v3_small"])
def test_no_targets_runs_the_forward_only(exports, name, tmp_path):
    """K = 0 targets (what the server's logits-only calls send): same logits, empty
    classes and gradients; a file without ``allowzero`` on its Reshapes (an older export)
    is recognised and gets K = 1 instead."""
    from camserve.onnxgraph import accepts_no_targets
    from camserve.server.runtime import load_model

    exported = exports.get(name)
    images = _images(exported, 2, 7)
    full = _run(exported, images, [[-1], [-1]])
    empty = _run(exported, images, np.zeros((2, 0), np.int64))
    np.testing.assert_array_equal(empty[contract.LOGITS], full[contract.LOGITS])
    assert empty[contract.CLASSES].shape == (2, 0)
    assert empty[exported.result.card.layers[0].gradients].shape[:2] == (2, 0)
    model = onnx.load(str(exported.path))
    assert accepts_no_targets(model.graph)
    loaded = load_model(exported.path, "cpu")
    assert loaded.empty_targets
    np.testing.assert_allclose(loaded.logits(images), full[contract.LOGITS], rtol=1e-6)

    def strip(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            keep = [a for a in node.attribute if a.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(keep)
            for attr in keep:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)

    strip(model.graph)
    older = tmp_path / f"{exported.path.stem}.onnx"
    onnx.save(model, str(older))
    loaded = load_model(older, "cpu")
    # the pooling + fc adjoint computes its shapes; a Scan body's shapes are constants
    assert loaded.empty_targets == (name == "resnet18_layer3")
    np.testing.assert_allclose(loaded.logits(images), full[contract.LOGITS], rtol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "efficientnet_b0"])
def test_adjoint_runs_no_slow_kernels(exports, name):
    """The batched adjoint gathers weight rows instead of multiplying one-hot seeds, masks
    with a Mul instead of Where, scales flattened tensors (onnxruntime is 20-40x slower on
    an innermost axis of 1), and stores each weight once (the gradients themselves are
    checked against torch above)."""
    model = onnx.load(str(exports.get(name).path))
    adjoint = [n for n in model.graph.node if any(o.startswith("explain/") for o in n.output)]
    kinds = {n.op_type for n in adjoint}
    assert "Gather" in kinds and not {"MatMul", "Gemm", "Where"} & kinds, sorted(kinds)
    assert "OneHot" not in {n.op_type for n in model.graph.node}
    sizes = [int(np.prod(i.dims)) for i in model.graph.initializer]
    contents = {numpy_helper.to_array(i).tobytes() for i in model.graph.initializer
                if int(np.prod(i.dims)) >= 4096}
    assert len(contents) == sum(s >= 4096 for s in sizes)


# --- 5. a pretrained model on a real photo ----------------------------------------------------

def _preprocess(rgb: np.ndarray, p: Preprocessing) -> np.ndarray:
    """The photo -> ``image`` transform that the file's Preprocessing describes."""
    assert (p.channel_order, p.interpolation) == ("RGB", "bilinear")
    h, w = rgb.shape[:2]
    scale = p.resize / min(h, w)
    nh, nw = (p.resize, int(round(w * scale))) if h <= w else (int(round(h * scale)), p.resize)
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    ch, cw = p.crop
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = resized[top:top + ch, left:left + cw].astype(np.float32) * p.scale
    x = (x - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def _chelsea() -> np.ndarray:
    """The bundled cat photo (scikit-image's chelsea) as RGB uint8."""
    bgr = cv2.imread(str(Path(__file__).resolve().parents[2] / "samples" / "cat.jpg"))
    assert bgr is not None, "samples/cat.jpg is missing"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_pretrained_lite0_sees_a_cat(lite0_dir):
    path = lite0_dir / "efficientnet_lite0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.architecture == "efficientnet_lite0"
    assert card.preprocessing.crop == (224, 224) and card.preprocessing.mean == (0.5,) * 3
    image = _preprocess(_chelsea(), card.preprocessing)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, classes, activations, gradients = session.run(
        None, {contract.IMAGE: image, contract.TARGETS: np.array([[-1]], np.int64)})
    predicted = int(classes[0, 0])
    assert predicted == int(logits[0].argmax())
    assert 281 <= predicted <= 285, (predicted, card.labels[predicted])
    assert "cat" in card.labels[predicted].lower()
    assert gradients.shape == (1, 1, *activations.shape[1:])
    assert np.isfinite(gradients).all() and np.abs(gradients).max() > 0


# --- 6. the CLI: bad input is one error line and exit 2, and leaves no file behind ------------

def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = camserve_main(["export", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _left_over(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.name.endswith(".onnx") or ".partial" in p.name)


def _assert_one_error_line(err: str, *fragments: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("camserve export: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_cli_unknown_arch_suggests_names(tmp_path, capsys):
    code, _, err = _cli(capsys, "--arch", "resnet19", "--out", str(tmp_path / "out"))
    assert code == 2
    _assert_one_error_line(err, "unknown architecture 'resnet19'", "did you mean", "resnet18")
    assert not _left_over(tmp_path)


def test_cli_unknown_layer_lists_candidates(tmp_path, capsys):
    code, _, err = _cli(capsys, "--arch", "resnet18", "--input-size", "64", "--layer",
                        "layer9", "--out", str(tmp_path / "out"))
    assert code == 2
    _assert_one_error_line(err, "'layer9'", "candidates", "layer4")
    assert not _left_over(tmp_path)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(load("resnet18").module.state_dict(), path)
    return path


@pytest.mark.parametrize("case", ["other_arch", "random_tensors", "not_a_checkpoint",
                                  "missing_file"])
def test_cli_weights_that_do_not_fit(tmp_path, capsys, resnet18_weights, case):
    if case == "other_arch":
        arch, weights, expected = "resnet34", resnet18_weights, "do not fit architecture"
    elif case == "random_tensors":
        weights = tmp_path / "random.pt"
        torch.save({"conv9.weight": torch.randn(3, 3), "fc.bias": torch.randn(7)}, weights)
        arch, expected = "resnet18", "do not fit architecture"
    elif case == "not_a_checkpoint":
        weights = tmp_path / "notes.pt"
        weights.write_text("not a checkpoint\n")
        arch, expected = "resnet18", "cannot read weights"
    else:
        arch, weights, expected = "resnet18", tmp_path / "nowhere.pt", "does not exist"
    code, _, err = _cli(capsys, "--arch", arch, "--weights", str(weights), "--input-size", "64",
                        "--out", str(tmp_path / "out"))
    assert code == 2
    _assert_one_error_line(err, expected, str(weights))
    assert not _left_over(tmp_path)


def test_cli_out_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file\n")
    for out in (blocker / "models", blocker):
        code, _, err = _cli(capsys, "--arch", "squeezenet1_1", "--input-size", "64",
                            "--out", str(out))
        assert code == 2
        _assert_one_error_line(err, "cannot create output folder", str(out))
    assert blocker.read_text() == "a regular file\n"
    assert not _left_over(tmp_path)


def test_cli_out_file_that_cannot_be_replaced(tmp_path, capsys):
    """The target NAME.onnx is a folder: the whole export runs, then the write fails."""
    out = tmp_path / "out"
    (out / "sq.onnx").mkdir(parents=True)
    code, _, err = _cli(capsys, "--arch", "squeezenet1_1", "--input-size", "64",
                        "--out", str(out), "--name", "sq")
    assert code == 2
    _assert_one_error_line(err, "cannot write", "sq.onnx")
    assert (out / "sq.onnx").is_dir()
    assert sorted(os.listdir(out)) == ["sq.onnx"]  # no .sq.onnx.*.partial left


def test_cli_exports_a_random_weights_model_with_a_warning(tmp_path, capsys):
    out = tmp_path / "tmp"
    code, stdout, err = _cli(capsys, "--arch", "squeezenet1_1", "--input-size", "96",
                             "--out", str(out), "--name", "sq")
    assert code == 0, err
    assert "RANDOM" in err and "error" not in err
    assert sorted(os.listdir(out)) == ["sq.head.onnx", "sq.onnx"]
    assert f"wrote {out / 'sq.onnx'}" in stdout and f"wrote {out / 'sq.head.onnx'}" in stdout
    model = onnx.load(str(out / "sq.onnx"))
    card = ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert card.architecture == "squeezenet1_1"
    assert card.preprocessing.crop == (96, 96)
    assert card.preprocessing.resize == round(96 * 256 / 224)
    session = ort.InferenceSession(str(out / "sq.onnx"), providers=["CPUExecutionProvider"])
    logits, classes, activations, gradients = session.run(
        None, {contract.IMAGE: np.zeros((2, 3, 96, 96), np.float32),
               contract.TARGETS: np.array([[-1], [3]], np.int64)})
    assert logits.shape == (2, 1000) and classes[1, 0] == 3
    assert gradients.shape == (2, 1, *activations.shape[1:])
