"""The SDK's own serialization of a request (``Outgoing.serialized``: the image appended to
the rest, ``camserve.protowire.with_image``) parses to the message ``to_request`` builds, for
every kind of image; an array is not copied before it."""

from __future__ import annotations

import numpy as np
import pytest

from camserve import protowire
from camserve.client import ExplainOptions, Frame
from camserve.client.options import Outgoing
from camserve.v1 import explainer_pb2 as pb

RNG = np.random.default_rng(5)
RGB = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
NV12 = RNG.integers(0, 256, (9, 8), dtype=np.uint8)

CASES = {
    "jpeg bytes": (b"\xff\xd8 not decoded here \xff\xd9", {}),
    "jpeg bytearray": (bytearray(b"\xff\xd8 bytes-like"), {}),
    "rgb8 array": (RGB, {}),
    "bgr8 array": (RGB, {"pixel_format": "bgr8"}),
    "nv12 array": (NV12, {"pixel_format": "nv12"}),
    "mono8 array, strided": (RGB[:, ::2, 0], {"pixel_format": "mono8"}),
    "padded frame": (Frame(bytes(6 * 30), 6, 8, "bgr8", step=30), {}),
    "ros dict": ({"height": 6, "width": 8, "encoding": "rgb8", "step": 24,
                  "data": RGB.tobytes()}, {}),
    "empty array": (np.zeros((0, 0, 3), np.uint8), {}),
    "window": (b"\x89PNG\r\n\x1a\n", {"window": (40.0, 400.0)}),
}


@pytest.mark.parametrize("name", CASES)
def test_serialized_is_the_request(name):
    image, options = CASES[name]
    options = ExplainOptions(top_k=3, regions=True, **options)
    wire = options.outgoing(image).serialized()
    assert pb.ExplainRequest.FromString(wire) == options.to_request(image)


def test_a_tensor_rides_in_the_message():
    tensor = RNG.random((1, 3, 4, 4), dtype=np.float32)
    outgoing = ExplainOptions().outgoing(tensor=tensor)
    assert outgoing.member is None and outgoing.request.HasField("tensor")
    assert outgoing.serialized() == outgoing.request.SerializeToString()


def test_an_array_is_sent_from_its_own_memory():
    outgoing = ExplainOptions().outgoing(RGB)
    assert outgoing.member == "pixels" and not outgoing.request.pixels.pixels
    assert np.shares_memory(np.frombuffer(outgoing.image, np.uint8), RGB)
    assert (outgoing.request.pixels.height, outgoing.request.pixels.width) == (6, 8)


def test_a_later_member_and_stream_options_survive_the_append():
    """What explain_stream sends: the request id and stream options set on the message,
    the image appended after them."""
    outgoing = ExplainOptions().outgoing(RGB)
    outgoing.request.request_id = "7"
    outgoing.request.stream.CopyFrom(pb.StreamOptions(latest_frame_wins=True))
    parsed = pb.ExplainRequest.FromString(outgoing.serialized())
    assert parsed.request_id == "7" and parsed.stream.latest_frame_wins
    assert parsed.pixels.pixels == RGB.tobytes() and parsed.pixels.width == 8


def test_with_image_refuses_a_member_without_bytes():
    with pytest.raises(ValueError, match="'encoded' or 'pixels'"):
        protowire.with_image(b"", "tensor", b"x")
    assert Outgoing(pb.ExplainRequest(), None).serialized() == b""
