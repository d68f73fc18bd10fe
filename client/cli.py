"""``camserve explain IMAGE...``: overlay PNG, panel PNG and JSON per image and target."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import sys
from pathlib import Path

from camserve.errors import CamserveError

# the SDK's DEFAULT_TIMEOUT; written here too so that ``camserve --help`` does not import
# grpc through the SDK (tests/integration/test_cli_errors.py checks they agree)
DEFAULT_TIMEOUT = 30.0
_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


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
                   help="class index to explain (repeatable); -1 is the predicted class, -r "
                        "the r-th best")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="also explain the K >= 1 best classes (default: 1 without --target)")
    from camserve.explain.methods import DEFAULT_METHOD, method_names  # NumPy only

    p.add_argument("--method", default=None, metavar="M",
                   help=f"CAM method, one of: {', '.join(method_names())} (default: "
                        f"{DEFAULT_METHOD}; a model may list fewer: get_model())")
    p.add_argument("--fuse", choices=("max", "mean"), default=None,
                   help="also write one map fusing all targets of an image")
    p.add_argument("--noise-samples", type=int, default=0, metavar="N",
                   help="average each map over N noisy copies of the image (the article's "
                        "SmoothGrad: 50); for --method smoothgrad, its number of samples")
    p.add_argument("--noise-sigma", type=float, default=None, metavar="S",
                   help="the noise's std as a fraction of the image's value range (default "
                        "0.15)")
    p.add_argument("--window", metavar="CENTER,WIDTH",
                   help="intensity window for 16-bit (or 8-bit) files, in the file's sample "
                        "units: CENTER +- WIDTH/2 maps onto 0..255 (default: a 16-bit PNG's "
                        "own min..max; 8-bit files as they are)")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="map level in (0, 1] for masks, contours and boxes")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per call (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (created when the first file is written)")
    security = p.add_argument_group("security", "for a server started with "
                                    "--auth-token-file or --tls-cert/--tls-key")
    security.add_argument("--token-file", type=Path, metavar="FILE",
                          help="send the bearer token in FILE")
    security.add_argument("--tls-ca", type=Path, metavar="FILE",
                          help="connect with TLS, trusting the server certificate's CA in "
                               "FILE (default with --tls-cert: the system's roots)")
    security.add_argument("--tls-cert", type=Path, metavar="FILE",
                          help="client certificate for mutual TLS (with --tls-key)")
    security.add_argument("--tls-key", type=Path, metavar="FILE",
                          help="the client certificate's private key")
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
    _check_arguments(args)
    import cv2
    import grpc

    from camserve.client import ExplainOptions, fuse, load_image
    from camserve.client.explanation import FLAT_MAP_HINT
    from camserve.client.render import panel
    from camserve.client.video import is_video
    from camserve.errors import RemoteError

    for image in args.images:
        if not image.is_file():
            raise CamserveError(f"image {str(image)!r} does not exist")
    # an unset --method keeps ExplainOptions' default (the core's), written down once there
    options = ExplainOptions(model=args.model, targets=args.targets, top_k=args.top_k,
                             noise_samples=args.noise_samples, window=args.window,
                             **({"method": args.method} if args.method else {}),
                             **({"noise_sigma": args.noise_sigma} if args.noise_sigma else {}))
    # libav's and OpenCV's own messages ("moov atom not found") would print beside our
    # one-line error
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # before OpenCV opens a video
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    videos = [path for path in args.images if is_video(path)]
    if videos and args.triton:
        raise CamserveError("--triton explains photos; videos need a camserve server")
    photos = [path for path in args.images if path not in videos]
    for image_path in photos:  # a file that is no image fails before anything is sent
        if not cv2.haveImageReader(str(image_path)):
            raise CamserveError(f"{image_path.name}: not an image OpenCV can decode (JPEG, "
                                "PNG, WebP, BMP...) nor a video")
    stems = _unique_stems(photos)
    with _connect(args) as client:
        for clip in videos:
            _make_folder(args.out)
            _explain_clip(client, clip, options, args)
        for image_path, image_stem in zip(photos, stems):
            with _native_stderr_silenced():  # libjpeg's "Premature end of JPEG file"
                photo = load_image(image_path, options.window)
            try:
                found = client.explain(image_path, options=options)
            except grpc.RpcError as exc:  # camserve refused: the status and its message
                raise CamserveError(_rpc_error(image_path.name, exc, args)) from None
            except RemoteError as exc:  # Triton refused or failed
                raise CamserveError(f"{image_path.name}: {exc}") from None
            found = _distinct_classes(found)  # a --target that is also a top-k class
            if args.fuse and len(found) > 1:
                found.append(fuse(found, args.fuse))
            records = []
            for explanation in found:
                fused = explanation.fused
                tag = f"fused-{args.fuse}" if fused else str(explanation.class_index)
                stem = f"{image_stem}_{tag}_{explanation.method}"
                _write_png(args.out / f"{stem}_overlay.png", explanation.overlay(photo))
                _write_png(args.out / f"{stem}_panel.png",
                           panel(photo, explanation, args.threshold))
                record = explanation.to_dict(args.threshold)
                record["files"] = [f"{stem}_overlay.png", f"{stem}_panel.png"]
                records.append(record)
                what = explanation.label if explanation.probability is None else \
                    f"{explanation.label} ({explanation.probability:.1%})"
                print(f"{image_path.name}: {what} -> {args.out / (stem + '_panel.png')}")
                if explanation.is_flat:
                    print(f"{image_path.name}: warning: class {tag}: {FLAT_MAP_HINT}")
            _write_text(args.out / f"{image_stem}.json",
                        json.dumps({"image": image_path.name, "explanations": records},
                                   indent=1))
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse what cannot work, in one line, before anything is imported or sent."""
    if args.top_k is not None and args.top_k < 1:
        raise CamserveError(f"--top-k must be >= 1, got {args.top_k} (without --top-k: 1 "
                            "class without --target, none beside them)")
    if not 0 < args.threshold <= 1:  # NaN too
        raise CamserveError(f"--threshold is a map level in (0, 1], got {args.threshold}")
    if not 0 < args.timeout < float("inf"):
        raise CamserveError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.in_flight < 1:
        raise CamserveError(f"--in-flight must be >= 1, got {args.in_flight}")
    if not 0 <= args.smooth <= 1:
        raise CamserveError(f"--smooth is an EMA weight in (0, 1] (0: off), got {args.smooth}")
    if args.noise_samples < 0:
        raise CamserveError(f"--noise-samples must be >= 0, got {args.noise_samples}")
    if args.noise_sigma is not None and not 0 < args.noise_sigma <= 10:
        raise CamserveError(f"--noise-sigma must be in (0, 10], got {args.noise_sigma}")
    if args.window is not None:
        args.window = _window(args.window)
    if args.triton:
        if not args.model:
            raise CamserveError("--triton needs --model: the Triton model to explain with")
        if args.token_file or args.tls_ca or args.tls_cert or args.tls_key:
            raise CamserveError("--token-file and --tls-* are for a camserve server, not "
                                "--triton")
        _check_target("--triton", args.triton)
    else:
        _check_target("--server", args.server)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CamserveError("mutual TLS needs both --tls-cert and --tls-key")
    if args.out.exists() and not args.out.is_dir():
        raise CamserveError(f"--out {str(args.out)!r} is a file, not a folder")


def _window(text: str) -> tuple[float, float]:
    """"CENTER,WIDTH" -> (center, width), width > 0."""
    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise CamserveError(f"--window is CENTER,WIDTH in the file's sample units (e.g. "
                            f"2048,4096), got {text!r}") from None
    if not (abs(center) < float("inf") and 0 < width < float("inf")):
        raise CamserveError(f"--window needs a finite CENTER and a WIDTH > 0, got {text!r}")
    return center, width


def _check_target(flag: str, target: str) -> None:
    """HOST:PORT (or [IPv6]:PORT, or a gRPC scheme such as unix:PATH) with 1 <= PORT <=
    65535."""
    if target.startswith(_SCHEMES):
        return
    host, colon, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            host = ""
    elif ":" in host:  # a bare IPv6 address, or junk
        host = ""
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CamserveError(f"{flag} {target!r} is not HOST:PORT (e.g. 127.0.0.1:50051, "
                            "[::1]:50051; PORT 1-65535)")


def _rpc_error(name: str, exc, args: argparse.Namespace) -> str:
    """One line for a failed call; where no server answered, the hint where to look."""
    import grpc

    line = f"{name}: {exc.code().name}: {exc.details()}"
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        line += f" (is 'camserve serve' running on {args.server}?)"
    return " ".join(line.split())


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null for a while: native libraries (libjpeg) write there
    beside our one-line messages. Python's own sys.stderr is untouched."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CamserveError(f"cannot create the output folder {str(folder)!r}: "
                            f"{exc.strerror or exc}") from None


def _write_text(path: Path, text: str) -> None:
    _make_folder(path.parent)
    try:
        path.write_text(text)
    except OSError as exc:
        raise CamserveError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


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
        raise CamserveError(_rpc_error(clip.name, exc, args)) from None
    except RemoteError as exc:  # a refused frame
        raise CamserveError(f"{clip.name}: frame {exc.request_id}: {exc}") from None
    print(f"{clip.name}: {report.frames} frames ({report.explained} explained, "
          f"{report.skipped} skipped) in {report.seconds:.1f} s = "
          f"{report.frames_per_second:.1f} frames/s -> {report.overlay}, {report.jsonl}")


def _connect(args: argparse.Namespace):
    """A camserve ``Client``, or a ``TritonClient`` with --triton."""
    from camserve.client import Client

    if not args.triton:
        return Client(args.server, timeout=args.timeout, credentials=_credentials(args),
                      token=_read_token(args.token_file) if args.token_file else None)
    try:
        from camserve.client.triton import TritonClient
    except ImportError as exc:
        raise CamserveError(f"--triton needs tritonclient ({exc.name} is missing): "
                            "pip install 'camserve[triton]'") from None
    return TritonClient(args.triton, timeout=args.timeout)


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CamserveError(f"{flag} {str(path)!r}: cannot be read "
                            f"({exc.strerror or exc})") from None


def _read_token(path: Path) -> str:
    try:
        token = _read("--token-file", path).decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or any(c.isspace() for c in token):
        raise CamserveError(f"--token-file {str(path)!r} holds no token (one line of "
                            "printable ASCII)")
    return token


def _credentials(args: argparse.Namespace):
    """grpc.ssl_channel_credentials from --tls-ca/--tls-cert/--tls-key, or None."""
    if not (args.tls_ca or args.tls_cert):
        return None
    import grpc

    ca = _read("--tls-ca", args.tls_ca) if args.tls_ca else None
    cert = _read("--tls-cert", args.tls_cert) if args.tls_cert else None
    key = _read("--tls-key", args.tls_key) if args.tls_key else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


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

    _make_folder(path.parent)
    try:
        written = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error:
        written = False
    if not written:
        raise CamserveError(f"cannot write {str(path)!r}")
