"""``camserve evaluate IMAGE_OR_DIR...``: score CAM maps quantitatively, in-process.

Runs an explainer graph on onnxruntime's CPU provider (no server) and, per image, scores the
map of the explained class (``--target C`` or the top-1 class): deletion and insertion AUC,
average drop and increase in confidence, and with ``--boxes`` the pointing game and box IoU
(definitions in ``camserve.server.evaluate.metrics``). ``--baseline-random`` scores a seeded
smooth random map the same way. Prints a Markdown table and writes ``evaluation.json`` and,
when matplotlib is installed, ``curves.png`` (mean deletion and insertion curves).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

from camserve.errors import CallerError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class EvaluationError(CallerError):
    """Bad input to ``camserve evaluate``: files, boxes or options."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score CAM maps (deletion, insertion, drop, pointing, IoU)",
        description="Score the CAM maps of an explainer graph on images, in-process on "
                    "onnxruntime: deletion/insertion AUC, average drop and increase in "
                    "confidence, and with --boxes the pointing game and box IoU.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_DIR",
                   help="image files, or folders of .jpg/.jpeg/.png/.webp/.bmp files")
    p.add_argument("--model", type=Path, required=True, metavar="FILE.onnx",
                   help="explainer graph written by 'camserve export'")
    p.add_argument("--method", default=None,
                   help="CAM method (default: the server's, gradcam)")
    p.add_argument("--target", type=int, default=None, metavar="C",
                   help="class index to explain (default: each image's top-1 class)")
    p.add_argument("--boxes", type=Path, default=None, metavar="boxes.json",
                   help='ground truth {"file name": [[x0, y0, x1, y1], ...]} in photo pixels')
    p.add_argument("--steps", type=int, default=20,
                   help="deletion/insertion steps; each curve has steps+1 points")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="map level for the IoU box (maps are in [0, 1])")
    p.add_argument("--baseline-random", action="store_true",
                   help="also score a seeded smooth random map per image")
    p.add_argument("--seed", type=int, default=0, help="random baseline seed")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from camserve.server.evaluate import metrics as ev
    from camserve.server.evaluate import report
    from camserve.server.evaluate.scoring import Scorer
    from camserve.server.runtime import load_model

    images, boxes = _check(args)
    model = load_model(args.model, device="cpu")
    card = model.card
    if args.target is not None and not 0 <= args.target < card.num_classes:
        raise EvaluationError(f"--target {args.target} is out of range; this model has "
                              f"{card.num_classes} classes (0..{card.num_classes - 1})")
    finest = max((layer.shape[1:] for layer in card.layers), key=lambda hw: hw[0] * hw[1])
    random_sigma = (ev.layer_cell_sigma(card.preprocessing.crop, finest)
                    if args.baseline_random else None)
    scorer = Scorer(model, args.steps, args.threshold)
    records = [evaluate_image(path, model, scorer, args, boxes.get(path.name), random_sigma)
               for path in images]
    kinds = [args.method] + (["random"] if args.baseline_random else [])
    summary = {kind: report.summarise([r[kind] for r in records]) for kind in kinds}
    report.write(args.out, _report(model, args, records, summary, random_sigma), kinds)
    return 0


def _check(args: argparse.Namespace) -> tuple[list[Path], dict[str, list[list[float]]]]:
    """Refuse bad options before the model loads; the images and ground-truth boxes."""
    from camserve.explain.methods import DEFAULT_METHOD, check_method

    args.method = args.method or DEFAULT_METHOD
    check_method(args.method)
    if args.steps < 1:
        raise EvaluationError(f"--steps must be at least 1, got {args.steps}")
    if not 0.0 < args.threshold <= 1.0:
        raise EvaluationError(f"--threshold must be in (0, 1], got {args.threshold}")
    if not args.model.is_file():
        raise EvaluationError(f"model file {str(args.model)!r} does not exist; "
                              "write one with 'camserve export'")
    images = collect_images(args.images)
    boxes = read_boxes(args.boxes) if args.boxes else {}
    unused = sorted(set(boxes) - {path.name for path in images})
    if unused:
        print(f"camserve evaluate: note: boxes for {', '.join(unused)} match no image",
              file=sys.stderr)
    return images, boxes


def evaluate_image(path: Path, model, scorer, args: argparse.Namespace,
                   truth: list | None, random_sigma: float | None) -> dict[str, Any]:
    """One image's record: its class and the scores of its map (and of a random map when
    ``random_sigma`` is set)."""
    from camserve.explain.geometry import to_original
    from camserve.server.evaluate import metrics as ev
    from camserve.server.evaluate.scoring import explain

    try:
        explained, image = explain(model, path.read_bytes(), args.method, args.target)
    except CallerError as exc:
        raise EvaluationError(f"{path.name}: {exc}") from None
    target, geometry = explained.targets[0], explained.geometry
    cam = target.cam
    constant = float(cam.max() - cam.min()) < 1e-6
    if constant:
        print(f"camserve evaluate: note: {path.name}: the {args.method} map is constant, "
              "so its pixel order is raster order", file=sys.stderr)
    y = float(ev.class_probability(explained.logits, target.class_index)[0])
    # The photo-grid map is what the pipeline's ORIGINAL_IMAGE space returns (to_original of
    # the model-input map); mapping this one explanation spares a second graph run.
    record: dict[str, Any] = {
        "image": path.name, "path": str(path),
        "size": [geometry.original[1], geometry.original[0]],
        "class_index": target.class_index, "label": target.label, "probability": y,
        "boxes": truth, "constant_map": constant,
        args.method: scorer.score(image, cam, to_original(cam, geometry), target.class_index,
                                  y, truth),
    }
    if random_sigma is not None:
        seed = random_seed(path.name, args.seed)
        noise = ev.random_map(model.card.preprocessing.crop, seed, random_sigma)
        record["random_seed"] = seed
        record["random"] = scorer.score(image, noise, to_original(noise, geometry),
                                        target.class_index, y, truth)
    return record


def _report(model, args: argparse.Namespace, records: list[dict[str, Any]],
            summary: dict[str, Any], random_sigma: float | None) -> dict[str, Any]:
    """``evaluation.json``: the settings, every image's record and the means."""
    from camserve.server.evaluate import metrics as ev

    crop = model.card.preprocessing.crop
    return {
        "model": model.name, "model_version": model.version,
        "architecture": model.card.architecture,
        "layers": [layer.name for layer in model.card.layers], "method": args.method,
        "target": "top-1" if args.target is None else args.target,
        "steps": args.steps, "fractions": ev.fractions(args.steps).tolist(),
        "threshold": args.threshold,
        "deletion_substrate": "mean colour (zeros in preprocessed space)",
        "insertion_start": "Gaussian blur, sigma "
                           f"{ev.INSERTION_BLUR * max(crop):.1f} px at model input",
        "average_drop_mask": "photo x map (black where the map is 0), then normalised",
        "random_blur_sigma_px": random_sigma,
        "images": records, "mean": summary,
    }


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted), in order, each once."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise EvaluationError(f"folder {str(path)!r} holds no "
                                      f"{'/'.join(IMAGE_SUFFIXES)} image")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise EvaluationError(f"image {str(path)!r} does not exist")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise EvaluationError("no images to evaluate")
    return unique


def read_boxes(path: Path) -> dict[str, list[list[float]]]:
    """boxes.json: {"file name": [[x0, y0, x1, y1], ...]} with x0 < x1 and y0 < y1."""
    if not path.is_file():
        raise EvaluationError(f"boxes file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"boxes file {path.name} is not JSON: {exc}") from None
    shape = 'expected {"file name": [[x0, y0, x1, y1], ...], ...}'
    if not isinstance(data, dict):
        raise EvaluationError(f"boxes file {path.name}: {shape}")
    boxes: dict[str, list[list[float]]] = {}
    for name, entries in data.items():
        if not isinstance(entries, list):
            raise EvaluationError(f"boxes file {path.name}: {name!r}: {shape}")
        boxes[str(name)] = [_box(path.name, name, box) for box in entries]
    return boxes


def _box(file: str, name: str, box: Any) -> list[float]:
    """One checked [x0, y0, x1, y1] of image ``name`` in boxes file ``file``."""
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in box)):
        raise EvaluationError(f"boxes file {file}: {name!r}: box {box!r} is not four numbers "
                              "[x0, y0, x1, y1]")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise EvaluationError(f"boxes file {file}: {name!r}: box {box!r} needs x0 < x1 and "
                              "y0 < y1")
    return [float(v) for v in box]


def random_seed(name: str, seed: int) -> int:
    """The random baseline's seed for an image: stable per file name, shifted by --seed."""
    return (zlib.crc32(name.encode()) + seed) % 2**32
