"""One ExplainStream: frames in, one response per frame out, in order of arrival.

A ``FrameStream`` is driven by an iterator of requests (``wire.Received``: each message with
its image's bytes) and is itself an iterator of responses; it knows nothing of gRPC
(``service.ExplainStream`` wires it to a call).

    requests --reader thread--> frames (arrival order) --the caller's thread--> responses
                                 │ latest_frame_wins: a new frame marks every frame still
                                 │   waiting "skipped" (its payload is dropped at once)
                                 │ otherwise: explain every frame; the reader waits while
                                 │   FIFO_DEPTH frames wait (back-pressure on the sender),
                                 │   unless a deadline lets stale frames be dropped instead

The reader takes each frame off the transport as soon as it arrives and stamps its arrival;
the caller's thread answers frames in order: a skipped frame gets a short response (its
request id, ``skipped``, the reason), a frame whose ``frame_deadline_ms`` passed before its
graph run is skipped too (never explained late), the others are explained, smoothed over
time (``camserve.explain.temporal``) and encoded. ``StreamOptions`` come from the first
request; a later request's ``stream.reset`` restarts the smoothing at that frame (a skipped
frame's reset carries over to the next explained one).

The stream's last response carries its ``StreamStats``. ``close`` (the call ended, the
client left) drops the waiting frames and stops the answering loop at once; the reader ends
when the transport stops its iterator.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from camserve.errors import CamserveError, DeadlineError
from camserve.explain.pipeline import Explained
from camserve.explain.response import to_response
from camserve.explain.temporal import DEFAULT_SCENE_CHANGE, TemporalSmoother
from camserve.server.wire import Received
from camserve.v1 import explainer_pb2 as pb

log = logging.getLogger("camserve.server")

STATS_METADATA = "camserve-stream-stats"  # trailing metadata key: StreamStats as JSON
FIFO_DEPTH = 4  # explain-every-frame: frames waiting before the reader stops reading
LATENCY_WINDOW = 10_000  # explained frames the latency percentiles are taken over
REPLACED = "replaced by a newer frame"

_numbers = itertools.count(1)

# request, alive -> Explained; ``alive`` False: drop the request before its graph run
Explain = Callable[[Received, Callable[[], bool]], Explained]


@dataclass(eq=False)
class _Frame:
    request: Received | None  # None once skipped: the payload is not kept
    request_id: str
    arrived: float  # clock seconds
    reset: bool
    skip_reason: str = ""

    def skip(self, reason: str) -> None:
        self.request, self.skip_reason = None, reason


class FrameStream:
    """Answers the frames of ``requests`` with ``explain``; iterate it for the responses.

    ``failed(exc, request_id)`` turns a frame's failure into the ``pb.Error`` its response
    carries (and may log or count it); ``alive()`` says whether the caller still listens;
    ``clock`` gives seconds (monotonic).
    """

    def __init__(self, requests: Iterator[Received], explain: Explain, *,
                 failed: Callable[[Exception, str], pb.Error],
                 alive: Callable[[], bool] = lambda: True,
                 encode: Callable[[Explained, pb.ExplainRequest], pb.ExplainResponse]
                 = to_response,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._requests = requests
        self._explain = explain
        self._failed = failed
        self._alive = alive
        self._encode = encode
        self._clock = clock
        self._cond = threading.Condition()
        self._frames: deque[_Frame] = deque()
        self._done = False  # the request iterator ended
        self._closed = False
        self._error: CamserveError | None = None  # refused StreamOptions
        self.options: pb.StreamOptions | None = None  # set by the first request
        self._smoother: TemporalSmoother | None = None
        self._reset_pending = False
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)  # ms
        self.received = self.explained = self.skipped = self.failed = 0
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"camserve-stream-{next(_numbers)}")
        self._reader.start()

    # --- the reader thread ----------------------------------------------------------------
    def _read(self) -> None:
        try:
            for request in self._requests:
                arrived, message = self._clock(), request.message
                with self._cond:
                    if self._closed:
                        return
                    if self.options is None:
                        self._configure(message)
                    self._admit(_Frame(request, message.request_id, arrived,
                                       message.stream.reset))
        except CamserveError as exc:  # the first request's StreamOptions
            with self._cond:
                self._error = exc
        except Exception as exc:  # noqa: BLE001 -- the transport ended the call
            # the transport may keep its exception: through the traceback it would keep this
            # frame, and the stream, alive
            exc.__traceback__ = None
            log.debug("stream reader stopped (%s)", type(exc).__name__)
        finally:
            with self._cond:
                self._done = True
                self._requests = iter(())  # nothing of the call is held past its end
                self._cond.notify_all()

    def _configure(self, request: pb.ExplainRequest) -> None:
        """Check and keep the first request's StreamOptions (under the lock)."""
        options = request.stream
        if options.temporal_smoothing:
            self._smoother = TemporalSmoother(
                options.temporal_smoothing,
                options.scene_change_correlation or DEFAULT_SCENE_CHANGE)
        self.options = options

    def _admit(self, frame: _Frame) -> None:
        """Queue an arrived frame (under the lock)."""
        self.received += 1
        if self.options.latest_frame_wins:
            for waiting in self._frames:
                if waiting.request is not None:
                    waiting.skip(REPLACED)
        elif self.options.frame_deadline_ms:
            now = self._clock()
            for waiting in self._frames:
                if waiting.request is not None and now > self._deadline(waiting):
                    waiting.skip(self._late(waiting, now))
        else:
            while len(self._frames) >= FIFO_DEPTH and not self._closed:
                self._cond.wait()
        self._frames.append(frame)
        self._cond.notify_all()

    # --- the answering loop ---------------------------------------------------------------
    def __iter__(self) -> Iterator[pb.ExplainResponse]:
        """One response per frame, in order of arrival; the last carries ``stats()``.
        Raises CamserveError when the first request's StreamOptions are refused."""
        stats_sent = False
        try:
            while True:
                with self._cond:
                    while not (self._frames or self._done or self._closed):
                        self._cond.wait()
                    if self._error is not None:
                        raise self._error
                    if self._closed or not self._frames:
                        break
                    frame = self._frames.popleft()
                    self._cond.notify_all()  # room for the reader
                response = self._answer(frame)
                with self._cond:
                    last = self._done and not self._frames and not self._closed
                if last:
                    response.stream_stats.CopyFrom(self.stats())
                    stats_sent = True
                yield response
            # the client closed its side after its last frame was answered: with
            # StreamOptions, one more response carries the stats
            if not (stats_sent or self._closed) and self.options is not None \
                    and self.options.ByteSize():
                yield pb.ExplainResponse(stream_stats=self.stats())
        finally:
            self.close()

    def _answer(self, frame: _Frame) -> pb.ExplainResponse:
        self._reset_pending |= frame.reset
        if frame.request is None:
            return self._skipped(frame)
        deadline = self._deadline(frame)
        if self._clock() > deadline:
            frame.skip(self._late(frame, self._clock()))
            return self._skipped(frame)
        request = frame.request
        frame.request = None
        alive, clock = self._alive, self._clock  # what a queued job may hold: not the stream
        try:
            explained = self._explain(request, lambda: alive() and clock() <= deadline)
        except DeadlineError:
            if self._clock() > deadline and self._alive():
                frame.skip(self._late(frame, self._clock()))
                return self._skipped(frame)
            return self._failure(frame, DeadlineError("the caller gave up before the model "
                                                      "ran"))
        except Exception as exc:  # noqa: BLE001 -- one bad frame must not end the stream
            return self._failure(frame, exc)
        if self._smoother is not None:
            explained = dataclasses.replace(explained, targets=self._smoother.apply(
                explained.targets, reset=self._reset_pending))
            self._reset_pending = False
        response = self._encode(explained, request.message)
        self.explained += 1
        self._latencies.append((self._clock() - frame.arrived) * 1e3)
        return response

    def _deadline(self, frame: _Frame) -> float:
        ms = self.options.frame_deadline_ms
        return frame.arrived + ms / 1e3 if ms else float("inf")

    def _late(self, frame: _Frame, now: float) -> str:
        return (f"deadline: {(now - frame.arrived) * 1e3:.0f} ms after arrival, over "
                f"frame_deadline_ms {self.options.frame_deadline_ms}")

    def _skipped(self, frame: _Frame) -> pb.ExplainResponse:
        self.skipped += 1
        return pb.ExplainResponse(request_id=frame.request_id, skipped=True,
                                  skip_reason=frame.skip_reason)

    def _failure(self, frame: _Frame, exc: Exception) -> pb.ExplainResponse:
        self.failed += 1
        return pb.ExplainResponse(request_id=frame.request_id,
                                  error=self._failed(exc, frame.request_id))

    # --- the end --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop answering and drop the waiting frames (the call ended or its client left)."""
        with self._cond:
            self._closed = True
            self._frames.clear()
            self._smoother = None
            self._cond.notify_all()

    def stats(self) -> pb.StreamStats:
        """Frames received, explained, skipped, failed; latency p50/p99 of the explained."""
        with self._cond:
            latencies = np.asarray(self._latencies, np.float64)
            received = self.received
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies.size else (0.0, 0.0)
        return pb.StreamStats(frames_received=received, frames_explained=self.explained,
                              frames_skipped=self.skipped, frames_failed=self.failed,
                              latency_p50_ms=float(p50), latency_p99_ms=float(p99))

    def stats_json(self) -> str:
        """``stats()`` as the JSON of the trailing metadata (numbers, proto field names)."""
        stats = self.stats()
        values = {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}
        return json.dumps({name: round(v, 3) if isinstance(v, float) else v
                           for name, v in values.items()})
