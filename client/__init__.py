"""The thin camserve SDK: ``Client`` -> ``Explanation`` (overlay, mask, contours, boxes).

Needs numpy, OpenCV, grpcio and protobuf only: ``pip install "camserve[client]"``.
"""

from camserve.client.explanation import Explanation, fuse
from camserve.client.sdk import Client, ExplainError, explanations, load_image

__all__ = ["Client", "Explanation", "ExplainError", "explanations", "fuse", "load_image"]
