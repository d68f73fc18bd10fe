"""Target layers: find them in a module, pick a default, and capture their outputs.

A target layer is a submodule, named as in ``model.named_modules()`` (``layer4``,
``features.28``), that runs once per forward pass and outputs a [B,C,h,w] tensor.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from camserve.errors import OperatorError

# Modules that may follow the last convolution and keep its shape: the default layer is the
# last of them, so the map is taken after normalisation and activation.
_FOLLOWERS = (torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU,
              torch.nn.Hardswish, torch.nn.GELU, torch.nn.LeakyReLU, torch.nn.Identity)


class LayerError(OperatorError):
    """A target layer name that cannot be explained."""


@dataclass(frozen=True)
class Candidate:
    """A submodule with a 4-D output, in the order the forward pass finishes them."""

    name: str
    shape: tuple[int, int, int]  # C, h, w
    calls: int
    has_conv: bool
    module_type: type


def candidates(model: torch.nn.Module, example: torch.Tensor) -> list[Candidate]:
    """Every named submodule whose output is [B,C,h,w], in order of completion."""
    order: list[str] = []
    shapes: dict[str, tuple[int, int, int]] = {}
    calls: dict[str, int] = {}
    modules = dict(model.named_modules())
    handles = []

    def hook(name: str):
        def record(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                shapes[name] = tuple(output.shape[1:])  # type: ignore[assignment]
                if name in order:
                    order.remove(name)
                order.append(name)
        return record

    for name, module in modules.items():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return [Candidate(n, shapes[n], calls[n], _has_conv(modules[n]), type(modules[n]))
            for n in order]


def default_layer(found: list[Candidate]) -> str:
    """The last convolutional block: the last module that holds a convolution and outputs a
    spatial map (h, w > 1), or a normalisation/activation that follows it with the same
    shape."""
    usable = [c for c in found if c.calls == 1 and c.shape[1] * c.shape[2] > 1]
    conv_blocks = [i for i, c in enumerate(usable) if c.has_conv]
    if not conv_blocks:
        raise LayerError("found no convolutional layer with a spatial output; "
                         "name the target layer explicitly (--layer)")
    best = conv_blocks[-1]
    for i in range(best + 1, len(usable)):
        c = usable[i]
        if c.shape == usable[best].shape and issubclass(c.module_type, _FOLLOWERS):
            best = i
    return usable[best].name


def check_layers(names: list[str], found: list[Candidate],
                 modules: list[str] | None = None) -> list[Candidate]:
    """The candidates for ``names``, or a LayerError that lists the usable names (and, for
    a name that is no submodule at all, the names of ``modules`` closest to it)."""
    by_name = {c.name: c for c in found}
    chosen = []
    for name in names:
        c = by_name.get(name)
        if c is None or c.calls != 1:
            usable = [c.name for c in found if c.calls == 1 and c.shape[1] * c.shape[2] > 1]
            hint = ", ".join(usable[-12:][::-1])
            if c is not None:
                why = "runs more than once per forward pass"
            elif modules is not None and name not in modules:
                close = difflib.get_close_matches(name, modules, n=5, cutoff=0.6)
                close += [m for m in modules if m.startswith(name + ".")][:3]
                why = "is not a module of this model" + (
                    f" (did you mean: {', '.join(dict.fromkeys(close))}?)" if close else "")
            else:
                why = "is not a submodule with a [B,C,h,w] output"
            raise LayerError(f"layer {name!r} {why}; candidates (last first): {hint}")
        chosen.append(c)
    if len(set(names)) != len(names):
        raise LayerError(f"target layers repeat a name: {names}")
    return chosen


@contextlib.contextmanager
def capture(model: torch.nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during forward passes.

    The recorded tensor is the module's own output; the rest of the network gets a copy,
    so an in-place operation after the layer (DenseNet's ReLU) cannot change what was
    recorded, and autograd w.r.t. the recorded tensor is the layer's gradient.
    """
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def keep(_module, _inputs, output):
            store[name] = output
            return output.clone()
        return keep

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _has_conv(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in module.modules())
