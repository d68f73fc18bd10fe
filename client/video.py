"""Explain a video: frames -> one ``ExplainStream`` -> an explained clip.

``explain_video`` explains any iterator of RGB frames over one stream, pipelined (``in_flight``
frames on the way at once) or, with ``fps``, paced like a camera; it yields each frame's
index and Explanations (None for a frame the server skipped). ``write_explained_clip`` turns a
video file into ``DIR/CLIP_overlay.mp4`` (the top class's map over each frame, with its label
and probability, at the clip's size and fps) and ``DIR/CLIP.jsonl`` (one line per frame), both
written frame by frame, so a clip that breaks off keeps what was explained. ``camserve explain
CLIP.mp4`` is that function. ``pan_zoom_clip`` makes the demo's clip from a photo.

Frames are RGB uint8 [H,W,3] here, as everywhere in the SDK; OpenCV's BGR stays inside.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from camserve.client.explanation import Explanation
from camserve.client.options import ExplainOptions, StreamOptions
from camserve.errors import CallerError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg",
                            ".wmv", ".flv", ".ts", ".3gp"})
JPEG_QUALITY = 90  # frames travel as JPEG: ~15x smaller than raw RGB at 640x480


def is_video(path: str | Path) -> bool:
    """A video file: by its suffix, or a file that is no image OpenCV knows but that OpenCV
    opens as a video."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return True
    if not path.is_file() or cv2.haveImageReader(str(path)):
        return False
    capture = _open(path)
    try:
        return capture.isOpened() and capture.read()[0]
    finally:
        capture.release()


class Clip:
    """A video file opened for reading: ``fps``, ``size`` (width, height), ``frame_count``
    (0: unknown) and ``frames()``. CallerError when OpenCV cannot read it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._capture = _open(self.path)
        if not self._capture.isOpened():
            raise CallerError(f"cannot read a video from {str(self.path)!r}: the file is "
                              "missing, truncated or not a video OpenCV can decode")
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if 0 < fps < 1000 else 25.0
        self.size = (int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                     int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self.frame_count = max(0, int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)))

    def frames(self) -> Iterator[np.ndarray]:
        """RGB uint8 [H,W,3] frames in order; CallerError (after the frames it could read)
        when the file ends before the frame count its header promised."""
        read = 0
        try:
            while True:
                ok, bgr = self._capture.read()
                if not ok:
                    break
                read += 1
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            self._capture.release()
        if read == 0:
            raise CallerError(f"cannot read any frame of {self.path.name!r}: the video is "
                              "truncated or damaged")
        if self.frame_count and read < self.frame_count:
            raise CallerError(f"{self.path.name!r} is truncated: {read} of its "
                              f"{self.frame_count} frames could be read")


def _open(path: Path) -> cv2.VideoCapture:
    """OpenCV's FFmpeg reader when it has one (it reads a truncated file up to its end;
    the other readers would try the file next, each printing its complaint)."""
    api = cv2.CAP_FFMPEG if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG) else cv2.CAP_ANY
    return cv2.VideoCapture(str(path), api)


def explain_video(client, frames: Iterable[np.ndarray], *,
                  options: ExplainOptions | None = None, stream: StreamOptions | None = None,
                  in_flight: int = 4, fps: float | None = None
                  ) -> Iterator[tuple[int, list[Explanation] | None]]:
    """Explain RGB frames over one stream of ``client`` (a ``camserve.client.Client``).

    Yields (index, Explanations) per frame, in order; Explanations is None for a frame the
    server skipped (``stream.latest_frame_wins``, ``frame_deadline_ms``). Without ``fps``
    at most ``in_flight`` frames are sent ahead of their answers (the next frame is read
    and encoded while earlier ones are explained); with ``fps`` frames are offered at that
    rate, as a camera would, whatever the server's pace. A frame the server refused raises
    ``ExplainError``; an error of ``frames`` is raised after the frames before it.
    """
    for index, _frame, found in _Explained(client, frames, options, stream, in_flight, fps):
        yield index, found


@dataclass
class ClipReport:
    """What ``write_explained_clip`` did: frames, explained and skipped counts, wall
    seconds, the server's stream stats and the two files written."""

    frames: int = 0
    explained: int = 0
    skipped: int = 0
    seconds: float = 0.0
    stats: dict[str, Any] | None = None
    overlay: Path | None = None
    jsonl: Path | None = None
    fps: float = 0.0  # the clip's

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def write_explained_clip(client, clip: str | Path, out_dir: str | Path, *,
                         options: ExplainOptions | None = None,
                         stream: StreamOptions | None = None, in_flight: int = 4,
                         realtime: bool = False, threshold: float = 0.6) -> ClipReport:
    """Explain the video file ``clip``; writes ``out_dir/STEM_overlay.mp4`` (mp4v, the clip's
    size and fps) and ``out_dir/STEM.jsonl`` (per frame: index, skipped, classes, labels,
    probabilities, boxes per class at ``threshold``), frame by frame. ``realtime`` offers
    the frames at the clip's fps with latest-frame-wins (a skipped frame shows the last
    map). A clip that cannot be read, or breaks off, raises CallerError after the outputs
    hold every frame explained before it."""
    source = Clip(clip)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.path.stem
    report = ClipReport(overlay=out_dir / f"{stem}_overlay.mp4", jsonl=out_dir / f"{stem}.jsonl",
                        fps=source.fps)
    if realtime:
        stream = StreamOptions(**{**_fields(stream), "latest_frame_wins": True})
    writer: cv2.VideoWriter | None = None
    last: list[Explanation] | None = None
    started = time.perf_counter()
    results = _Explained(client, source.frames(), options, stream, in_flight,
                         source.fps if realtime else None)
    try:
        with open(report.jsonl, "w") as lines:
            for index, frame, found in results:
                if writer is None:
                    writer = _writer(report.overlay, source.fps, frame.shape[1],
                                     frame.shape[0])
                last = found if found is not None else last
                writer.write(cv2.cvtColor(_annotated(frame, last, found is None),
                                          cv2.COLOR_RGB2BGR))
                lines.write(json.dumps(_record(index, found, threshold)) + "\n")
                lines.flush()
                report.frames += 1
                report.explained += found is not None
                report.skipped += found is None
    finally:
        report.seconds = time.perf_counter() - started
        report.stats = results.stats
        if writer is not None:
            writer.release()
    return report


def _fields(stream: StreamOptions | None) -> dict[str, Any]:
    return {} if stream is None else {name: getattr(stream, name)
                                      for name in StreamOptions.__dataclass_fields__}


class _Explained:
    """(index, frame, Explanations | None) per frame; ``stats`` once the stream ended."""

    def __init__(self, client, frames: Iterable[np.ndarray], options: ExplainOptions | None,
                 stream: StreamOptions | None, in_flight: int, fps: float | None) -> None:
        if in_flight < 1:
            raise CallerError(f"in_flight must be >= 1, got {in_flight}")
        self._frames = iter(frames)
        self._pending: dict[int, np.ndarray] = {}  # sent, not answered yet
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(in_flight)
        self._paced = fps
        self._stop = threading.Event()
        self._failure: BaseException | None = None  # raised by ``frames``
        self.stats: dict[str, Any] | None = None
        self._call = client.explain_stream(self._requests(), options=options,
                                           stream=stream or StreamOptions(), timeout=None)

    def _requests(self) -> Iterator[bytes]:
        """JPEG bytes per frame (in gRPC's sending thread): paced at ``fps``, or at most
        ``in_flight`` ahead of the answers. An error of ``frames`` ends the stream cleanly
        and is raised to the reader of the answers."""
        start = time.monotonic()
        index = 0
        while not self._stop.is_set():
            if self._paced:
                time.sleep(max(0.0, start + index / self._paced - time.monotonic()))
            else:
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
            try:
                frame = next(self._frames)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 -- raised where the answers are read
                self._failure = exc
                return
            ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                self._failure = CallerError(f"frame {index} cannot be encoded as JPEG")
                return
            with self._lock:
                self._pending[index] = frame
            index += 1
            yield jpeg.tobytes()

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, list[Explanation] | None]]:
        finished = False
        try:
            for answer in self._call:
                index = int(answer.request_id)
                with self._lock:
                    frame = self._pending.pop(index)
                if not self._paced:
                    self._slots.release()
                yield index, frame, answer.explanations
            finished = True
        finally:
            self._stop.set()
            self._slots.release()
            self.stats = self._call.stats
            if not finished:
                self._call.cancel()
        if self._failure is not None:
            raise self._failure


def _writer(path: Path, fps: float, width: int, height: int) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise CallerError(f"cannot write a video to {str(path)!r}")
    return writer


def _annotated(frame: np.ndarray, found: list[Explanation] | None, held: bool) -> np.ndarray:
    """The frame with the top class's map over it and its label and probability; ``held``
    (a skipped frame) marks a map carried over from an earlier frame."""
    if not found or found[0].geometry.original != frame.shape[:2]:
        return frame
    top = found[0]
    image = top.overlay(frame)
    text = f"{top.label} {top.probability:.0%}" + (" (held)" if held else "")
    scale = max(0.4, frame.shape[0] / 600)
    origin = (8, 8 + int(24 * scale))
    for colour, width in (((0, 0, 0), 4), ((255, 255, 255), 1)):  # outlined, readable anywhere
        cv2.putText(image, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour,
                    max(1, round(width * scale)), cv2.LINE_AA)
    return image


def _record(index: int, found: list[Explanation] | None, threshold: float) -> dict[str, Any]:
    found = found or []
    return {"index": index, "skipped": not found,
            "classes": [e.class_index for e in found], "labels": [e.label for e in found],
            "probabilities": [round(e.probability, 6) for e in found],
            "boxes": [[list(box) for box in e.boxes(threshold)] for e in found]}


# --- the demo's clip ------------------------------------------------------------------------
def pan_zoom_clip(photo: np.ndarray, seconds: float = 3.0, fps: float = 24.0,
                  size: tuple[int, int] = (320, 240)) -> list[np.ndarray]:
    """A camera panning across ``photo`` (RGB) left to right while zooming in from the whole
    height to 60% of it: RGB frames of ``size`` (width, height)."""
    height, width = photo.shape[:2]
    aspect = size[0] / size[1]
    count = max(2, round(seconds * fps))
    frames = []
    for i in range(count):
        t = i / (count - 1)
        crop_h = min(height, width / aspect) * (1.0 - 0.4 * t)
        crop_w = crop_h * aspect
        x0 = (width - crop_w) * t
        y0 = (height - crop_h) / 2
        # the crop [x0, x0 + crop_w) x [y0, y0 + crop_h) onto the output size
        matrix = np.array([[size[0] / crop_w, 0, -x0 * size[0] / crop_w],
                           [0, size[1] / crop_h, -y0 * size[1] / crop_h]])
        frames.append(cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT))
    return frames


def write_clip(frames: Iterable[np.ndarray], path: str | Path, fps: float) -> Path:
    """RGB frames -> an MP4 (mp4v) file."""
    writer = None
    try:
        for frame in frames:
            if writer is None:
                writer = _writer(Path(path), fps, frame.shape[1], frame.shape[0])
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        if writer is not None:
            writer.release()
    return Path(path)


def strip(path: str | Path, count: int = 4) -> np.ndarray:
    """``count`` evenly spaced frames of a video side by side: RGB [H, count*W, 3]."""
    clip = Clip(path)
    frames = list(clip.frames())
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return np.hstack([frames[i] for i in picks])
