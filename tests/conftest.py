"""Shared fixtures: small explainer graphs exported by the tests, and live servers on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


class TinyNet(torch.nn.Module):
    """A 10-class CNN small enough to export in a second: [B,3,64,64] -> [B,10]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="session")
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_model) -> Path:
    """A models folder with ``tiny.onnx`` (one layer) and ``tiny2.onnx`` (two layers)."""
    from camserve.export import export_explainer

    folder = tmp_path_factory.mktemp("models")
    labels = [f"thing {i}" for i in range(10)]
    export_explainer(tiny_model, folder / "tiny.onnx", input_size=64, labels=labels,
                     architecture="tinynet")
    export_explainer(tiny_model, folder / "tiny2.onnx", input_size=64, labels=labels,
                     target_layers=["features.2", "features.6"], architecture="tinynet")
    return folder


@pytest.fixture(scope="session")
def server(models_dir):
    """A live server on a free loopback port, serving ``models_dir``."""
    from camserve.server.app import ServerConfig, start

    running = start(ServerConfig(models=models_dir, port=0, device="cpu",
                                 intra_op_threads=1, default_model="tiny"))
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory) -> Path:
    """A models folder with the pretrained EfficientNet-Lite0 explainer."""
    from camserve.export import export_explainer
    from camserve.export.models import load

    folder = tmp_path_factory.mktemp("lite0")
    loaded = load("efficientnet_lite0")
    export_explainer(loaded.module, folder / "efficientnet_lite0.onnx", labels=loaded.labels,
                     preprocess=loaded.preprocessing, input_size=loaded.preprocessing.crop,
                     architecture=loaded.architecture)
    return folder
