"""The thin camserve SDK: ``Client`` -> ``Explanation`` (overlay, mask, contours, boxes).

Needs numpy, OpenCV, grpcio and protobuf only: ``pip install "camserve[client]"``.
``ExplainOptions`` holds the options of an explanation, ``ModelInfo`` what a server says
about a model; a refused stream frame raises ``ExplainError`` (a ``camserve.errors.
RemoteError``).
"""

from camserve.client.explanation import Explanation, fuse
from camserve.client.models import ModelInfo
from camserve.client.options import ExplainOptions
from camserve.client.sdk import Client, ExplainError, explanations, load_image

__all__ = ["Client", "ExplainError", "ExplainOptions", "Explanation", "ModelInfo",
           "explanations", "fuse", "load_image"]
