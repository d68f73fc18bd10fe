"""Real-time ExplainStream semantics (server/streams.py) and videos (client/video.py) on a
live server with the tiny model: latest frame wins, per-frame deadlines, temporal smoothing,
scene changes, concurrent streams, abandoned streams, and ``camserve explain CLIP``."""

from __future__ import annotations

import gc
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from camserve.cli import main
from camserve.client import Client
from camserve.client.options import StreamOptions
from camserve.client.video import pan_zoom_clip, write_clip
from camserve.explain.temporal import correlation
from camserve.server.streams import STATS_METADATA, FrameStream
from camserve.tensors import from_proto
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
SLOW = 96  # smoothing copies per frame: a frame takes tens of ms, a list arrives at once


def _photo(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    """A smooth random picture (a few blobs): maps that are not flat."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def _raw(photo: np.ndarray) -> pb.RawImage:
    return pb.RawImage(height=photo.shape[0], width=photo.shape[1], pixels=photo.tobytes())


def _request(photo, request_id: str, stream: pb.StreamOptions | None = None, *,
             slow: bool = False, **fields) -> pb.ExplainRequest:
    request = pb.ExplainRequest(pixels=_raw(photo), request_id=request_id,
                                output=pb.OutputOptions(dtype=pb.FLOAT32), **fields)
    if slow:
        request.smoothing.CopyFrom(pb.Smoothing(noise_samples=SLOW, noise_sigma=0.1, seed=1))
    if stream is not None:
        request.stream.CopyFrom(stream)
    return request


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


def _maps(response: pb.ExplainResponse) -> dict[int, np.ndarray]:
    return {t.class_index: from_proto(t.cam) for t in response.targets}


# --- latest frame wins, deadlines ------------------------------------------------------------
def test_latest_frame_wins_answers_every_frame_in_order(stub):
    photo = _photo(1)
    started = time.perf_counter()
    stub.Explain(_request(photo, "alone", slow=True), timeout=30)
    one = time.perf_counter() - started  # one slow frame, alone

    frames = [_request(np.roll(photo, i, axis=1), f"f{i}", slow=True) for i in range(30)]
    frames[0].stream.latest_frame_wins = True
    call = stub.ExplainStream(iter(frames), timeout=60)
    responses = list(call)
    assert [r.request_id for r in responses] == [f"f{i}" for i in range(30)]
    explained = [r for r in responses if not r.skipped]
    skipped = [r for r in responses if r.skipped]
    assert all(len(r.targets) == 1 and not r.HasField("error") for r in explained)
    assert all(not r.targets and r.skip_reason == "replaced by a newer frame" for r in skipped)
    assert responses[-1] in explained  # the newest frame wins in the end
    assert len(skipped) >= 10, len(skipped)  # sent at once, explained one at a time
    stats = responses[-1].stream_stats
    assert (stats.frames_received, stats.frames_explained, stats.frames_skipped) == (
        30, len(explained), len(skipped))
    # a frame waits for at most the one frame in progress
    assert stats.latency_p99_ms < (3 * one + 0.3) * 1e3, (stats.latency_p99_ms, one)
    trailing = json.loads(dict(call.trailing_metadata())[STATS_METADATA])
    assert trailing["frames_skipped"] == len(skipped)


def test_frames_past_their_deadline_are_skipped_not_explained_late(stub):
    photo = _photo(2)
    frames = [_request(photo, f"d{i}", slow=True) for i in range(12)]
    frames[0].stream.frame_deadline_ms = 30
    responses = list(stub.ExplainStream(iter(frames), timeout=60))
    assert [r.request_id for r in responses] == [f"d{i}" for i in range(12)]
    late = [r for r in responses if r.skipped]
    assert late and all(r.skip_reason.startswith("deadline") for r in late)
    assert not responses[0].skipped and len(responses[0].targets) == 1
    stats = responses[-1].stream_stats
    assert stats.frames_explained + stats.frames_skipped == 12
    assert stats.frames_skipped == len(late)


def test_default_stream_explains_every_frame_and_reports_stats(stub, server):
    frames = [_request(_photo(i), f"p{i}") for i in range(6)]
    responses = list(stub.ExplainStream(iter(frames), timeout=30))
    assert [r.request_id for r in responses] == [f"p{i}" for i in range(6)]
    assert not any(r.skipped for r in responses)
    # the SDK gives the stats too: from the last response or the trailing metadata
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        call = client.explain_stream([_photo(i) for i in range(3)],
                                     stream=StreamOptions(frame_deadline_ms=10_000))
        results = list(call)
    assert [r.request_id for r in results] == ["0", "1", "2"]
    assert not any(r.skipped for r in results)
    assert call.stats["frames_received"] == 3 and call.stats["frames_explained"] == 3


def test_refused_stream_options_end_the_call(stub):
    bad = _request(_photo(1), "x", pb.StreamOptions(temporal_smoothing=1.5))
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ExplainStream(iter([bad]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temporal_smoothing" in caught.value.details()


# --- temporal smoothing ---------------------------------------------------------------------
def _ema(raw_frames: list[dict[int, np.ndarray]], alpha: float, scene: float,
         resets=()) -> list[dict[int, np.ndarray]]:
    """The EMA per class, computed here from the unsmoothed maps."""
    state: dict[int, np.ndarray] = {}
    out = []
    for index, maps in enumerate(raw_frames):
        if index in resets:
            state.clear()
        for c, m in maps.items():
            previous = state.get(c)
            if previous is None or correlation(m, previous) < scene:
                state[c] = m
            else:
                state[c] = (alpha * m + (1 - alpha) * previous).astype(np.float32)
        out.append({c: state[c] for c in maps})
    return out


def test_smoothing_is_the_ema_of_the_unsmoothed_maps_and_streams_do_not_mix(stub):
    """Two streams at once on the same frames, smoothed and not: the first's maps are the
    EMA of the second's; neither sees the other's state."""
    photo = _photo(3)
    frames = [np.roll(photo, 6 * i, axis=1) for i in range(8)]
    alpha = 0.3

    def stream(options: pb.StreamOptions | None):
        requests = [_request(f, str(i), options if i == 0 else None, classes=[2, 5])
                    for i, f in enumerate(frames)]
        return [_maps(r) for r in stub.ExplainStream(iter(requests), timeout=30)]

    results: dict[str, list] = {}
    threads = [threading.Thread(target=lambda k=k, o=o: results.__setitem__(k, stream(o)))
               for k, o in (("smooth", pb.StreamOptions(temporal_smoothing=alpha,
                                                        scene_change_correlation=-1)),
                            ("raw", None))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    raw, smooth = results["raw"], results["smooth"]
    unary = [_maps(stub.Explain(_request(f, "u", classes=[2, 5]), timeout=30)) for f in frames]
    for got, want in zip(raw, unary):
        for c in (2, 5):
            np.testing.assert_allclose(got[c], want[c], atol=1e-5)
    for got, want in zip(smooth, _ema(raw, alpha, -1)):
        for c in (2, 5):
            np.testing.assert_allclose(got[c], want[c], atol=1e-5)
    assert not np.allclose(smooth[-1][2], raw[-1][2], atol=1e-3)  # it did smooth


def test_scene_change_and_caller_reset_restart_the_average(stub):
    a, b = _photo(4), _photo(5)[::-1, ::-1].copy()
    frames = [a, a, np.roll(a, 3, axis=1), b, b, a, a]
    scene = 0.9
    raw = [_maps(stub.Explain(_request(f, "u", classes=[1]), timeout=30)) for f in frames]
    cut = correlation(raw[3][1], raw[2][1])
    assert cut < scene, cut  # b is a new scene for class 1
    requests = [_request(f, str(i), classes=[1]) for i, f in enumerate(frames)]
    requests[0].stream.CopyFrom(pb.StreamOptions(temporal_smoothing=0.5,
                                                 scene_change_correlation=scene))
    requests[5].stream.reset = True  # the caller knows the scene changed back
    smooth = [_maps(r) for r in stub.ExplainStream(iter(requests), timeout=30)]
    np.testing.assert_allclose(smooth[3][1], raw[3][1], atol=1e-5)  # restarted at b
    np.testing.assert_allclose(smooth[5][1], raw[5][1], atol=1e-5)  # reset by the caller
    for got, want in zip(smooth, _ema(raw, 0.5, scene, resets={5})):
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)


# --- clients that leave ---------------------------------------------------------------------
def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("camserve-stream-")]


def _live_streams() -> int:
    gc.collect()
    return sum(type(o) is FrameStream for o in gc.get_objects())


def test_abandoned_streams_free_their_state(models_dir):
    from camserve.server.app import start
    from camserve.server.config import ServerConfig

    running = start(ServerConfig(models=models_dir, port=0, device="cpu", intra_op_threads=1,
                                 workers=4, default_model="tiny"))
    try:
        target = f"127.0.0.1:{running.port}"
        photo = _photo(6)
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.ExplainerStub(channel)

        def abandon(count: int, *, close_channel: bool = False) -> None:
            """``count`` streams at a time: each sends frames, reads one answer, leaves."""
            feeds, calls = [], []
            own = grpc.insecure_channel(target) if close_channel else channel
            for n in range(count):
                feed: queue.SimpleQueue = queue.SimpleQueue()
                first = _request(photo, "0", pb.StreamOptions(latest_frame_wins=n % 2 == 0),
                                 slow=n % 4 == 0)
                for frame in (first, _request(photo, "1"), _request(photo, "2")):
                    feed.put(frame)
                call = pb_grpc.ExplainerStub(own).ExplainStream(iter(feed.get, None),
                                                                timeout=30)
                assert next(call).request_id == "0"
                feeds.append(feed)
                calls.append(call)
            if close_channel:
                own.close()
            for call, feed in zip(calls, feeds):
                call.cancel()
                feed.put(None)  # our request iterator ends too

        abandon(4)  # warm up: the server's worker pool at its size
        deadline = time.monotonic() + 5
        while _stream_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        baseline = threading.active_count()
        for _ in range(24):
            abandon(4)
        abandon(4, close_channel=True)
        deadline = time.monotonic() + 5
        while (_stream_threads() or threading.active_count() > baseline) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _stream_threads(), _stream_threads()
        assert threading.active_count() <= baseline, (
            baseline, [t.name for t in threading.enumerate()])
        assert _live_streams() == 0  # no stream object outlives its call
        # and the server still answers
        assert len(list(stub.ExplainStream(iter([_request(photo, "ok")]), timeout=30))) == 1
        channel.close()
    finally:
        running.stop(grace=1)


# --- videos ---------------------------------------------------------------------------------
def _clip(path: Path, count: int = 12, fourcc: str = "mp4v") -> Path:
    frames = pan_zoom_clip(_photo(7, 240, 320), seconds=count / 10, fps=10, size=(96, 64))
    assert len(frames) == count
    if fourcc == "mp4v":
        return write_clip(frames, path, 10)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (96, 64))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _read_back(path: Path) -> tuple[int, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    count = 0
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    while capture.read()[0]:
        count += 1
    capture.release()
    return count, size


def test_cli_explains_a_clip_into_an_mp4_and_jsonl(server, tmp_path, capsys):
    clip = _clip(tmp_path / "walk.mp4")
    out = tmp_path / "out"
    rc = main(["explain", str(clip), "--server", f"127.0.0.1:{server.port}", "--out", str(out),
               "--smooth", "0.5", "--top-k", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "walk.mp4: 12 frames (12 explained, 0 skipped)" in printed and "frames/s" in printed
    assert _read_back(out / "walk_overlay.mp4") == (12, (96, 64))
    lines = [json.loads(line) for line in (out / "walk.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(12))
    for line in lines:
        assert not line["skipped"] and len(line["classes"]) == 2
        assert len(line["probabilities"]) == 2 and len(line["boxes"]) == 2
        assert all(len(box) == 4 for boxes in line["boxes"] for box in boxes)


def test_cli_realtime_clip_accounts_for_every_frame(server, tmp_path, capsys):
    clip = _clip(tmp_path / "live.avi", fourcc="MJPG")  # not mp4: any video OpenCV reads
    out = tmp_path / "out"
    assert main(["explain", str(clip), "--server", f"127.0.0.1:{server.port}",
                 "--out", str(out), "--realtime"]) == 0
    assert _read_back(out / "live_overlay.mp4") == (12, (96, 64))
    lines = (out / "live.jsonl").read_text().splitlines()
    assert len(lines) == 12


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_cli_truncated_clip_is_one_error_line_and_keeps_what_was_explained(server, tmp_path,
                                                                           keep):
    whole = _clip(tmp_path / "whole.avi", fourcc="MJPG").read_bytes()
    clip = tmp_path / "cut.avi"
    clip.write_bytes(whole[:int(len(whole) * keep)])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "camserve", "explain", str(clip), "--server",
                           f"127.0.0.1:{server.port}", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, (done.stdout, done.stderr)
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("camserve explain: error: "), errors
    assert "cut.avi" in errors[0]
    jsonl = out / "cut.jsonl"
    lines = jsonl.read_text().splitlines() if jsonl.exists() else []
    assert len(lines) < 12
    if keep == 0.9:  # OpenCV reads its first frames: they are explained and kept
        assert lines and "truncated" in errors[0]
    if lines:
        assert _read_back(out / "cut_overlay.mp4")[0] == len(lines)

