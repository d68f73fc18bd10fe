"""Export: a PyTorch classifier -> one explainer ONNX graph (graph contract v1).

Attributes load lazily so that ``camserve.export.cli`` can be imported without torch.
"""

from __future__ import annotations

__all__ = ["ExportError", "ExportResult", "export_explainer"]


def __getattr__(name: str):
    if name in __all__:
        from camserve.export import explainer

        return getattr(explainer, name)
    raise AttributeError(name)
