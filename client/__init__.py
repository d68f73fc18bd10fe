"""The thin camserve SDK: ``Client`` -> ``Explanation`` (overlay, mask, contours, boxes).

Needs numpy, OpenCV, grpcio and protobuf only: ``pip install "camserve[client]"``.
``ExplainOptions`` holds the options of an explanation, ``ModelInfo`` what a server says
about a model, ``Frame`` a raw camera frame (ROS 2 images too), ``StreamOptions`` the
real-time semantics of ``Client.explain_stream`` (latest-frame-wins, per-frame deadlines,
temporal smoothing); a refused stream frame raises ``ExplainError`` (a
``camserve.errors.RemoteError``). ``camserve.client.video`` explains clips.
"""

from camserve.client.explanation import Explanation, ServerTimings, fuse
from camserve.client.frames import Frame
from camserve.client.models import ModelInfo
from camserve.client.options import ExplainOptions, StreamOptions
from camserve.client.sdk import (
    Client,
    ExplainError,
    StreamCall,
    StreamFrame,
    explanations,
    load_image,
)

__all__ = ["Client", "ExplainError", "ExplainOptions", "Explanation", "Frame", "ModelInfo",
           "ServerTimings", "StreamCall", "StreamFrame", "StreamOptions", "explanations", "fuse",
           "load_image"]
