"""ExplainRequests read without copying their image: its bytes stay where gRPC received them.

gRPC hands the servicer each request as one bytes object. protobuf's parser copies an image
field (a raw frame's ``pixels``, an ``encoded`` file) into the message, and reading the
field copies it again. A 1080p BGR8 frame is 6 MB, a 4K one 25 MB, and under the server's
malloc settings (``lifecycle.return_freed_memory``) every copy that size lands in fresh
pages that fault in one by one: parsing and then reading a 1080p BGR8 frame took 3.2 + 3.2
ms on a request thread here, against 0.6 + 0.6 with glibc's defaults.

``parse_explain_request`` walks the request's fields (and those of its RawImage) on the
wire, leaves the image's bytes in gRPC's buffer (``Received.image``, a memoryview of it) and
has protobuf parse the rest: the same message with the image field present but empty, so
that the ``image`` oneof still says which member it is. Field numbers come from the
descriptors, so the .proto stays the one truth for the wire. Requests below
``SPLIT_ABOVE_BYTES`` (a copy costs less than the walk), whose image is the smaller part of
them, with a tensor image, with more than ``MAX_FIELDS`` fields, or with wire this walk
does not expect (groups, a truncated field) are parsed whole, as before: the parser then
accepts or refuses them exactly as it did.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from camserve.protowire import (
    ENCODED,
    I32,
    I64,
    IMAGE_MEMBERS,
    LEN,
    PIXELS,
    RAW_PIXELS,
    VARINT,
    method_path,
    tag,
    varint,
)
from camserve.v1 import explainer_pb2 as pb

SPLIT_ABOVE_BYTES = 256 * 1024
# a walk in Python over many small fields would cost more than protobuf's parse in C: a
# message with more fields than this (a real request has a few dozen) is parsed whole
MAX_FIELDS = 256
EXPLAIN_METHODS = (method_path("Explain"), method_path("ExplainStream"))  # take Received


@dataclass(frozen=True)
class Received:
    """One ExplainRequest as the server received it.

    ``message`` is the request; when ``image`` is not None, the image field of its oneof
    (``encoded``, or ``pixels.pixels``) is empty and ``image`` holds its bytes instead.
    """

    message: pb.ExplainRequest
    image: memoryview | None = None


def parse_explain_request(data: bytes) -> Received:
    """gRPC's bytes of an ExplainRequest -> ``Received``; raises what protobuf's parser
    raises for bytes that are not one (the caller's ``MalformedMessageInterceptor`` turns
    that into INVALID_ARGUMENT)."""
    split = _split(data) if len(data) >= SPLIT_ABOVE_BYTES else None
    # a split copies the rest twice (joined, then parsed), a whole parse the image twice:
    # split only when the image is the larger part
    if split is None or 2 * len(split[1]) < len(split[0]):
        return Received(pb.ExplainRequest.FromString(data))
    rest, image = split
    return Received(pb.ExplainRequest.FromString(rest), image)


class _Unexpected(Exception):
    """Wire the walk leaves to protobuf's parser."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Unexpected
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of each field of the message
    in data[start:end] (a length-delimited value is its payload); raises _Unexpected beyond
    ``MAX_FIELDS`` fields."""
    found = list(itertools.islice(_walk(data, start, end), MAX_FIELDS + 1))
    if len(found) > MAX_FIELDS:
        raise _Unexpected
    return found


def _walk(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    pos = start
    while pos < end:
        key, value = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            stop = _varint(data, value)[1]
        elif wire == I64:
            stop = value + 8
        elif wire == I32:
            stop = value + 4
        elif wire == LEN:
            length, value = _varint(data, value)
            stop = value + length
        else:  # groups (proto2 only) or no wire type at all
            raise _Unexpected
        if stop > end:
            raise _Unexpected
        yield number, wire, pos, value, stop
        pos = stop


_EMPTY_ENCODED = tag(ENCODED, LEN) + b"\x00"  # present (the oneof is set), empty


def _split(data: bytes) -> tuple[bytes, memoryview] | None:
    """(the request without its image's bytes, those bytes), or None to parse it whole.

    protobuf's rules decide what the parsed message holds, and the walk follows them: the
    oneof member whose field comes last is the one set; setting a member anew clears what
    the oneof held; a bytes field that comes again keeps its last value, and the
    occurrences of a message field merge. Every ``encoded`` keeps its place, emptied (its
    presence sets the oneof), and every RawImage keeps its place without its ``pixels``."""
    try:
        fields = _fields(data, 0, len(data))
    except _Unexpected:
        return None
    members = [f[0] for f in fields if f[0] in IMAGE_MEMBERS and f[1] == LEN]
    if not members or members[-1] not in (ENCODED, PIXELS):
        return None  # no image, or a tensor
    view = memoryview(data)
    image, previous, mark = view[:0], None, 0
    parts: list[bytes | bytearray | memoryview] = []
    for number, wire, start, value, stop in fields:
        if wire != LEN or number not in IMAGE_MEMBERS:
            continue
        if number != previous:  # the member is set anew: it starts empty
            image, previous = view[:0], number
        if number == ENCODED:
            image, kept = view[value:stop], _EMPTY_ENCODED
        elif number == PIXELS:
            try:
                kept, pixels = _raw_image_without_pixels(data, value, stop)
            except _Unexpected:
                return None
            image = image if pixels is None else pixels
        else:  # a tensor, left as it is
            continue
        parts += [view[mark:start], kept]
        mark = stop
    parts.append(view[mark:])
    return b"".join(parts), image


def _raw_image_without_pixels(data: bytes, start: int, end: int
                              ) -> tuple[bytearray, memoryview | None]:
    """The RawImage field whose payload is data[start:end], re-encoded without its
    ``pixels`` values, and the last of those values (None if it has none)."""
    view = memoryview(data)
    payload, pixels, mark = bytearray(), None, start
    for number, wire, field_start, value, stop in _fields(data, start, end):
        if number == RAW_PIXELS and wire == LEN:
            payload += view[mark:field_start]
            pixels, mark = view[value:stop], stop
    payload += view[mark:end]
    return bytearray(tag(PIXELS, LEN) + varint(len(payload))) + payload, pixels


class ZeroCopyImageInterceptor(grpc.ServerInterceptor):
    """Explain and ExplainStream take their requests as ``Received`` (``parse_explain_
    request``) instead of protobuf's parse; every other method is left as it is. Put it
    after ``MalformedMessageInterceptor``, which then wraps this parser like any other."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in EXPLAIN_METHODS:
            return handler
        make = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                else grpc.unary_unary_rpc_method_handler)
        behavior = handler.stream_stream if handler.request_streaming else handler.unary_unary
        return make(behavior, request_deserializer=parse_explain_request,
                    response_serializer=handler.response_serializer)
