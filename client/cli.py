"""``camserve explain IMAGE...``: overlay PNG, panel PNG and JSON per image and target."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from camserve.errors import CamserveError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="explain images with a running server",
                              description="Explain images with a camserve server; writes "
                                          "overlay and panel PNGs and a JSON file per image.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    p.add_argument("--triton", metavar="HOST:PORT",
                   help="explain through this NVIDIA Triton gRPC endpoint instead of a camserve "
                        "server (needs --model and camserve[triton]; see 'camserve export "
                        "--triton-repo')")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--target", type=int, action="append", dest="targets", metavar="C",
                   help="class index to explain (repeatable)")
    p.add_argument("--top-k", type=int, default=None,
                   help="also explain the K best classes (default: 1 without --target)")
    p.add_argument("--method", default=None,
                   help="CAM method (default: Grad-CAM; get_model() lists a model's methods)")
    p.add_argument("--fuse", choices=("max", "mean"), default=None,
                   help="also write one map fusing all targets of an image")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="map level for masks, contours and boxes")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    video = p.add_argument_group(
        "videos", "a video (by suffix, or a file OpenCV opens as one) becomes CLIP_overlay.mp4 "
                  "and CLIP.jsonl (one line per frame)")
    video.add_argument("--realtime", action="store_true",
                       help="offer the frames at the clip's fps; the server explains the "
                            "newest and skips frames it cannot keep up with")
    video.add_argument("--smooth", type=float, default=0.0, metavar="ALPHA",
                       help="temporal smoothing: EMA weight of each new map, in (0, 1]")
    video.add_argument("--in-flight", type=int, default=4, metavar="N",
                       help="frames sent ahead of their answers (default 4)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import cv2
    import grpc

    from camserve.client import ExplainOptions, fuse, load_image
    from camserve.client.render import panel
    from camserve.client.video import is_video
    from camserve.errors import RemoteError

    for image in args.images:
        if not image.is_file():
            raise CamserveError(f"image {str(image)!r} does not exist")
    if args.triton and not args.model:
        raise CamserveError("--triton needs --model: the Triton model to explain with")
    # an unset --method keeps ExplainOptions' default (the core's), written down once there
    options = ExplainOptions(model=args.model, targets=args.targets, top_k=args.top_k,
                             **({"method": args.method} if args.method else {}))
    args.out.mkdir(parents=True, exist_ok=True)
    # libav's and OpenCV's own messages ("moov atom not found") would print beside our
    # one-line error
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # before OpenCV opens a video
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    videos = [path for path in args.images if is_video(path)]
    if videos and args.triton:
        raise CamserveError("--triton explains photos; videos need a camserve server")
    photos = [path for path in args.images if path not in videos]
    stems = _unique_stems(photos)
    with _connect(args) as client:
        for clip in videos:
            _explain_clip(client, clip, options, args)
        for image_path, image_stem in zip(photos, stems):
            photo = load_image(image_path)
            try:
                found = client.explain(image_path, options=options)
            except grpc.RpcError as exc:  # camserve refused: the status and its message
                raise CamserveError(f"{image_path.name}: {exc.code().name}: "
                                    f"{exc.details()}") from None
            except RemoteError as exc:  # Triton refused or failed
                raise CamserveError(f"{image_path.name}: {exc}") from None
            found = _distinct_classes(found)  # a --target that is also a top-k class
            if args.fuse and len(found) > 1:
                found.append(fuse(found, args.fuse))
            records = []
            for index, explanation in enumerate(found):
                fused = args.fuse and index == len(found) - 1 and len(found) > 1
                tag = f"fused-{args.fuse}" if fused else str(explanation.class_index)
                stem = f"{image_stem}_{tag}"
                _write_png(args.out / f"{stem}_overlay.png", explanation.overlay(photo))
                _write_png(args.out / f"{stem}_panel.png",
                           panel(photo, explanation, args.threshold, fused=bool(fused)))
                record = explanation.to_dict(args.threshold)
                record["fused"] = bool(fused)
                record["files"] = [f"{stem}_overlay.png", f"{stem}_panel.png"]
                records.append(record)
                what = explanation.label if fused else \
                    f"{explanation.label} ({explanation.probability:.1%})"
                print(f"{image_path.name}: {what} -> {args.out / (stem + '_panel.png')}")
            (args.out / f"{image_stem}.json").write_text(
                json.dumps({"image": image_path.name, "explanations": records}, indent=1))
    return 0


def _explain_clip(client, clip: Path, options, args: argparse.Namespace) -> None:
    """One video -> OUT/CLIP_overlay.mp4 and OUT/CLIP.jsonl; prints the frame rate."""
    import grpc

    from camserve.client.options import StreamOptions
    from camserve.client.video import write_explained_clip
    from camserve.errors import RemoteError

    stream = StreamOptions(temporal_smoothing=args.smooth)
    try:
        report = write_explained_clip(client, clip, args.out, options=options, stream=stream,
                                      in_flight=args.in_flight, realtime=args.realtime,
                                      threshold=args.threshold)
    except grpc.RpcError as exc:
        raise CamserveError(f"{clip.name}: {exc.code().name}: {exc.details()}") from None
    except RemoteError as exc:  # a refused frame
        raise CamserveError(f"{clip.name}: frame {exc.request_id}: {exc}") from None
    print(f"{clip.name}: {report.frames} frames ({report.explained} explained, "
          f"{report.skipped} skipped) in {report.seconds:.1f} s = "
          f"{report.frames_per_second:.1f} frames/s -> {report.overlay}, {report.jsonl}")


def _connect(args: argparse.Namespace):
    """A camserve ``Client``, or a ``TritonClient`` with --triton."""
    from camserve.client import Client

    if not args.triton:
        return Client(args.server, timeout=args.timeout)
    try:
        from camserve.client.triton import TritonClient
    except ImportError as exc:
        raise CamserveError(f"--triton needs tritonclient ({exc.name} is missing): "
                            "pip install 'camserve[triton]'") from None
    return TritonClient(args.triton, timeout=args.timeout)


def _distinct_classes(found: list) -> list:
    """The explanations in order, each class once."""
    kept, seen = [], set()
    for explanation in found:
        if explanation.class_index not in seen:
            seen.add(explanation.class_index)
            kept.append(explanation)
    return kept


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems for the outputs; a stem seen before gets -2, -3... appended."""
    stems: list[str] = []
    for path in paths:
        stem, n = path.stem, 1
        while stem in stems:
            n += 1
            stem = f"{path.stem}-{n}"
        stems.append(stem)
    return stems


def _write_png(path: Path, rgb) -> None:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise CamserveError(f"cannot write {str(path)!r}")
