"""``server.wire``: an ExplainRequest read with its image's bytes left in the received buffer
is protobuf's own parse of it, for every mix of fields, repeated and merged occurrences,
oneof switches, unknown fields and cut-off bytes."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from camserve import protowire
from camserve.server import wire
from camserve.v1 import explainer_pb2 as pb


def _request(rng: random.Random) -> pb.ExplainRequest:
    """A request with a random set of options and a random image member (or none)."""
    request = pb.ExplainRequest()
    if rng.random() < 0.5:
        request.request_id = f"frame-{rng.randrange(1000)}"
    if rng.random() < 0.5:
        request.top_k = rng.randrange(1, 5)
    if rng.random() < 0.3:
        request.classes.extend(rng.sample(range(-3, 1000), 3))  # packed
    if rng.random() < 0.3:
        request.output.space = pb.ORIGINAL_IMAGE
    kind = rng.choice(["encoded", "pixels", "pixels-no-bytes", "tensor", "none"])
    payload = rng.randbytes(rng.choice([0, 1, 200, 70_000]))
    if kind == "encoded":
        request.encoded = payload
    elif kind.startswith("pixels"):
        request.pixels.height, request.pixels.width = rng.randrange(1, 99), 3
        request.pixels.format = rng.choice([0, pb.BGR8, pb.NV12])
        if kind == "pixels":
            request.pixels.pixels = payload
    elif kind == "tensor":
        request.tensor.shape.extend([1, 3, 2, 2])
        request.tensor.data = rng.randbytes(48)
    return request


def _unknown_field(rng: random.Random) -> bytes:
    """A field this schema does not have (number 900), varint or length-delimited."""
    if rng.random() < 0.5:
        return protowire.tag(900, 0) + protowire.varint(rng.randrange(1 << 40))
    return protowire.tag(900, 2) + protowire.varint(3) + b"abc"


def _wires(count: int) -> list[bytes]:
    """Single requests and concatenations of two or three (what a parser merges), some with
    unknown fields between them."""
    rng = random.Random(7)
    out = []
    for _ in range(count):
        parts = [_request(rng).SerializeToString() for _ in range(rng.choice([1, 1, 2, 3]))]
        if rng.random() < 0.3:
            parts.insert(rng.randrange(len(parts) + 1), _unknown_field(rng))
        out.append(b"".join(parts))
    return out


def _restored(rest: bytes, image: memoryview) -> pb.ExplainRequest:
    """The split request with its image put back where protobuf would hold it."""
    message = pb.ExplainRequest.FromString(rest)
    member = message.WhichOneof("image")
    assert member in ("encoded", "pixels")
    assert not (message.encoded if member == "encoded" else message.pixels.pixels)
    if member == "encoded":
        message.encoded = bytes(image)
    else:
        message.pixels.pixels = bytes(image)
    return message


def test_the_split_request_is_protobufs_parse():
    split_count = 0
    for data in _wires(600):
        expected = pb.ExplainRequest.FromString(data)
        split = wire._split(data)
        if split is None:
            assert expected.WhichOneof("image") in (None, "tensor")
            continue
        split_count += 1
        assert _restored(*split) == expected
        assert split[1].obj is data  # a view of what was received, not a copy
    assert split_count > 200


def test_member_switches_clear_what_the_oneof_held():
    first = pb.ExplainRequest(pixels=pb.RawImage(height=2, width=3, pixels=b"A" * 18))
    then = pb.ExplainRequest(encoded=b"JPEG")
    last = pb.ExplainRequest(pixels=pb.RawImage(height=5))  # no pixels of its own
    data = b"".join(m.SerializeToString() for m in (first, then, last))
    rest, image = wire._split(data)
    assert bytes(image) == b"" and _restored(rest, image) == pb.ExplainRequest.FromString(data)
    merged = first.SerializeToString() + last.SerializeToString()  # no switch: they merge
    rest, image = wire._split(merged)
    assert bytes(image) == b"A" * 18
    assert _restored(rest, image).pixels.height == 5


def test_cut_or_malformed_bytes_are_left_to_protobuf():
    data = pb.ExplainRequest(encoded=b"x" * 1000, top_k=2).SerializeToString()
    for cut in (1, 2, 500, len(data) - 1):
        assert wire._split(data[:cut]) is None
        with pytest.raises(DecodeError):
            pb.ExplainRequest.FromString(data[:cut])
    group = protowire.tag(5, 3) + protowire.tag(5, 4)  # a group: proto2 only
    assert wire._split(group + data) is None


def test_large_requests_are_split_and_small_ones_parsed_whole():
    frame = pb.ExplainRequest(request_id="big", pixels=pb.RawImage(
        height=512, width=512, format=pb.BGR8, pixels=bytes(512 * 512 * 3)))
    data = frame.SerializeToString()
    received = wire.parse_explain_request(data)
    assert received.image is not None and received.image.obj is data
    assert len(received.image) == 512 * 512 * 3 and received.message.request_id == "big"
    assert received.message.pixels.width == 512 and not received.message.pixels.pixels
    small = pb.ExplainRequest(encoded=b"\xff\xd8 small").SerializeToString()
    assert len(small) < wire.SPLIT_ABOVE_BYTES
    whole = wire.parse_explain_request(small)
    assert whole.image is None and whole.message.encoded == b"\xff\xd8 small"
    with pytest.raises(DecodeError):
        wire.parse_explain_request(data[:-1])


def test_a_request_of_many_small_fields_is_parsed_whole():
    """A large message made of many tiny (unknown) fields is left to protobuf's parser in C
    after MAX_FIELDS of them, not walked field by field in Python."""
    filler = (protowire.tag(900, 0) + b"\x01") * 200_000
    data = filler + pb.ExplainRequest(encoded=b"\xff\xd8" * 10).SerializeToString()
    assert len(data) > wire.SPLIT_ABOVE_BYTES
    assert wire._split(data) is None
    received = wire.parse_explain_request(data)
    assert received.image is None and received.message.encoded == b"\xff\xd8" * 10


def test_a_large_request_whose_image_is_small_is_parsed_whole():
    """Splitting copies the rest of the message twice: not worth it for a small image."""
    data = pb.ExplainRequest(request_id="x" * 400_000, encoded=b"\xff\xd8").SerializeToString()
    assert wire._split(data) is not None
    received = wire.parse_explain_request(data)
    assert received.image is None and received.message.encoded == b"\xff\xd8"

