"""Hostile and unusual images: refused quickly with the right status, or explained; the
server keeps serving."""

from __future__ import annotations

import logging
import struct
import time
import zlib

import cv2
import grpc
import numpy as np
import pytest

from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


def encode(ext: str, image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def png_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 64, 9)  # a few rows; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + \
        chunk(b"IEND", b"")


PHOTO = cv2.resize(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8),
                   (90, 70), interpolation=cv2.INTER_CUBIC)

REFUSED = {
    "garbage": (b"\x00\x01garbage" * 50, "INVALID_ARGUMENT"),
    "zero bytes": (b"", "INVALID_ARGUMENT"),
    "truncated jpeg": (encode(".jpg", PHOTO)[:600], "INVALID_ARGUMENT"),
    "truncated png": (encode(".png", PHOTO)[:300], "INVALID_ARGUMENT"),
    "png bomb": (png_bomb(20000, 20000), "RESOURCE_EXHAUSTED"),
    "tiff": (encode(".tiff", PHOTO), "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_images_are_refused_fast(stub, case):
    data, code = REFUSED[case]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(pb.ExplainRequest(encoded=data), timeout=30)
    assert time.monotonic() - started < 1.0
    assert err.value.code().name == code, err.value.details()
    assert stub.Explain(pb.ExplainRequest(encoded=encode(".png", PHOTO))).targets


def test_png_bomb_is_small_on_the_wire():
    assert len(png_bomb(20000, 20000)) < 64 * 1024


ACCEPTED = {
    "1x1": encode(".png", PHOTO[:1, :1]),
    "grayscale": encode(".png", cv2.cvtColor(PHOTO, cv2.COLOR_RGB2GRAY)),
    "16-bit": encode(".png", PHOTO.astype(np.uint16) * 257),
    "rgba": encode(".png", np.dstack([PHOTO, np.full(PHOTO.shape[:2], 128, np.uint8)])),
    "webp": encode(".webp", PHOTO),
    "bmp": encode(".bmp", PHOTO),
    "jpeg": encode(".jpg", PHOTO),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_unusual_images_are_explained(stub, case):
    response = stub.Explain(pb.ExplainRequest(encoded=ACCEPTED[case], top_k=2))
    assert len(response.targets) == 2
    for target in response.targets:
        cam = np.frombuffer(target.cam.data, np.float32)
        assert np.isfinite(cam).all() and 0 <= cam.min() and cam.max() <= 1


def test_raw_pixels_over_the_limit_are_refused(stub):
    huge = pb.RawImage(height=7000, width=7000, pixels=b"")
    with pytest.raises(grpc.RpcError) as err:
        stub.Explain(pb.ExplainRequest(pixels=huge))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


NOT_A_MESSAGE = b"\x00\x01garbage"  # field number 0: no protobuf message parses from it


def test_bytes_that_are_not_a_message_are_refused_with_one_warning(server, caplog):
    """Seen failing before the fix: gRPC answered INTERNAL and logged an ERROR with a
    traceback for each such request (a log flood anyone could cause)."""
    good = pb.ExplainRequest(encoded=encode(".png", PHOTO), top_k=1).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        calls = {  # raw bytes in and out: no serializer on either side
            "Explain": channel.unary_unary("/camserve.v1.Explainer/Explain"),
            "Check": channel.unary_unary("/grpc.health.v1.Health/Check")}
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call(NOT_A_MESSAGE, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "not a valid protobuf message" in caught.value.details(), name
        stream = channel.stream_stream("/camserve.v1.Explainer/ExplainStream")
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream(iter([good, NOT_A_MESSAGE]), timeout=30):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ExplainStream" in caught.value.details()
        answer = pb.ExplainResponse.FromString(calls["Explain"](good, timeout=30))
        assert answer.targets  # still serving
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Exception deserializing" not in caplog.text
    assert caplog.text.count("not a valid message") == 3
