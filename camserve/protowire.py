"""The few pieces of protobuf's wire format camserve writes and reads by hand: an
ExplainRequest's image, which is most of its bytes.

protobuf's Python messages hold bytes fields as copies: setting ``encoded`` or a RawImage's
``pixels`` copies the image into the message, serializing copies it again, and on the
server parsing and reading the field copy it twice more. A 4K RGB8 frame is 25 MB. So the
SDK appends the image to the rest of the request, serialized (``with_image``: one copy),
and the server reads it where gRPC received it (``camserve.server.wire``). Field numbers
come from the descriptors: the .proto stays the one truth for the wire.
"""

from __future__ import annotations

from camserve.v1 import explainer_pb2 as pb

VARINT, I64, LEN, I32 = 0, 1, 2, 5  # the wire types a proto3 message uses

_REQUEST = pb.ExplainRequest.DESCRIPTOR
ENCODED = _REQUEST.fields_by_name["encoded"].number
PIXELS = _REQUEST.fields_by_name["pixels"].number
IMAGE_MEMBERS = {field.number for field in _REQUEST.oneofs_by_name["image"].fields}
RAW_PIXELS = pb.RawImage.DESCRIPTOR.fields_by_name["pixels"].number
SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"].full_name


def method_path(name: str) -> str:
    """The gRPC path of an Explainer method, e.g. "/camserve.v1.Explainer/Explain"."""
    return f"/{SERVICE}/{name}"


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire: int) -> bytes:
    """A field's key: its number and wire type."""
    return varint(number << 3 | wire)


def with_image(head: bytes, member: str, image: bytes | memoryview) -> bytes:
    """A serialized ExplainRequest: ``head`` (the request serialized without its image's
    bytes; for "pixels", with the frame's header in its RawImage) with the image field
    ``member`` ("encoded", or "pixels" for RawImage.pixels) appended, holding ``image``.

    One copy of ``image``. protobuf's parser reads a field that comes last as set last: the
    oneof's member is this one, and a second RawImage merges into the first (its pixels
    beside the header's height, width, format and step)."""
    size = len(image) if not isinstance(image, memoryview) else image.nbytes
    if member == "encoded":
        return b"".join((head, tag(ENCODED, LEN), varint(size), image))
    if member != "pixels":
        raise ValueError(f"an ExplainRequest's image bytes are 'encoded' or 'pixels', not "
                         f"{member!r}")
    inner = tag(RAW_PIXELS, LEN) + varint(size)
    return b"".join((head, tag(PIXELS, LEN), varint(len(inner) + size), inner, image))
