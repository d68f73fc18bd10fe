"""Requests above ``wire.SPLIT_ABOVE_BYTES`` through a live server (tiny model): the server
leaves their image in gRPC's buffer, and answers exactly as it does for the same request
parsed whole (its own ``ExplainerService.explain`` in-process): raw frames of several
formats and padded steps, an encoded JPEG, a stream, and refusals with the same messages."""

from __future__ import annotations

import cv2
import grpc
import numpy as np
import pytest

from camserve.client import Client, ExplainOptions, explanations
from camserve.errors import CallerError
from camserve.server import wire
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

H, W = 480, 640  # 921,600 bytes of RGB8


def _picture() -> np.ndarray:
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth + rng.integers(-20, 21, (H, W, 3)), 0, 255).astype(np.uint8)


def _frames() -> dict[str, pb.RawImage]:
    rgb = _picture()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    padded = np.zeros((H, W * 3 + 64), np.uint8)
    padded[:, :W * 3] = bgr.reshape(H, -1)
    nv12 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)  # the planes, then U and V interleaved
    u, v = nv12[H:H + H // 4].reshape(H // 2, W // 2), nv12[H + H // 4:].reshape(H // 2, W // 2)
    nv12 = np.concatenate([nv12[:H], np.stack([u, v], axis=-1).reshape(H // 2, W)])
    return {"rgb8": pb.RawImage(height=H, width=W, pixels=rgb.tobytes()),
            "bgr8 padded": pb.RawImage(height=H, width=W, pixels=padded.tobytes(),
                                       format=pb.BGR8, step=W * 3 + 64),
            "nv12": pb.RawImage(height=H, width=W, pixels=nv12.tobytes(), format=pb.NV12)}


def _request(**image) -> pb.ExplainRequest:
    return pb.ExplainRequest(request_id="large", top_k=2,
                             output=pb.OutputOptions(dtype=pb.FLOAT32), **image)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield pb_grpc.ExplainerStub(channel)


@pytest.fixture
def split_calls(monkeypatch) -> list[bool]:
    """Whether each request the server parsed left its image outside the message (the real
    parser, counted)."""
    seen: list[bool] = []
    parse = wire.parse_explain_request

    def counted(data: bytes) -> wire.Received:
        received = parse(data)
        seen.append(received.image is not None)
        return received

    monkeypatch.setattr(wire, "parse_explain_request", counted)
    return seen


def _same(over_grpc: pb.ExplainResponse, in_process: pb.ExplainResponse) -> None:
    """Equal but for the timings (and a stream's stats on its last response)."""
    for response in (over_grpc, in_process):
        response.ClearField("timings")
        response.ClearField("stream_stats")
    assert over_grpc == in_process


@pytest.mark.parametrize("name", ["rgb8", "bgr8 padded", "nv12"])
def test_a_large_frame_is_answered_as_parsed_whole(server, stub, split_calls, name):
    request = _request(pixels=_frames()[name])
    assert request.ByteSize() > wire.SPLIT_ABOVE_BYTES
    _same(stub.Explain(request, timeout=60), server.service.explain(request))
    assert split_calls == [True]


def test_a_large_jpeg_is_answered_as_parsed_whole(server, stub, split_calls):
    picture = cv2.resize(_picture(), (1600, 1200), interpolation=cv2.INTER_NEAREST)
    jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    request = _request(encoded=jpeg)
    assert len(jpeg) > wire.SPLIT_ABOVE_BYTES
    _same(stub.Explain(request, timeout=60), server.service.explain(request))
    assert split_calls == [True]


def test_a_stream_of_large_frames(server, stub, split_calls):
    frames = list(_frames().values())
    requests = [_request(pixels=frame) for frame in frames]
    answers = list(stub.ExplainStream(iter(requests), timeout=60))
    assert len(answers) == len(frames) and split_calls == [True] * len(frames)
    for answer, request in zip(answers, requests):
        _same(answer, server.service.explain(request))


def test_a_large_frame_of_the_wrong_size_is_refused_with_the_same_message(server, stub,
                                                                          split_calls):
    frame = _frames()["rgb8"]
    frame.pixels = frame.pixels[:-5]
    request = _request(pixels=frame)
    with pytest.raises(CallerError) as in_process:
        server.service.explain(request)
    with pytest.raises(grpc.RpcError) as over_grpc:
        stub.Explain(request, timeout=60)
    assert over_grpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert over_grpc.value.details() == str(in_process.value)
    assert "needs 921600 bytes, got 921595" in over_grpc.value.details()
    assert split_calls == [True]


def test_large_bytes_that_are_no_request_are_invalid_argument(server, split_calls):
    whole = _request(pixels=_frames()["rgb8"]).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[
            ("grpc.max_send_message_length", 64 << 20)]) as channel:
        explain = channel.unary_unary("/camserve.v1.Explainer/Explain")
        with pytest.raises(grpc.RpcError) as cut:
            explain(whole[:-1000], timeout=60)
    assert cut.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in cut.value.details()
    assert split_calls == []  # the parser raised: nothing was counted


def test_the_sdk_sends_a_large_array_as_it_is(server, split_calls):
    """Client.explain serializes the request itself (the array's bytes appended once); the
    server reads it in place and answers as for the message parsed whole."""
    bgr = cv2.cvtColor(_picture(), cv2.COLOR_RGB2BGR)
    options = ExplainOptions(top_k=2, pixel_format="bgr8")
    expected = explanations(server.service.explain(options.to_request(bgr)))
    with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
        found = client.explain(bgr, options=options)
        streamed = list(client.explain_stream([bgr, bgr], options=options))
    for answer in (found, *streamed):
        assert [e.class_index for e in answer] == [e.class_index for e in expected]
        for a, b in zip(answer, expected):
            np.testing.assert_array_equal(a.cam, b.cam)
    assert split_calls == [True] * 3

