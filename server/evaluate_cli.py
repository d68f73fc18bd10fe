"""``camserve evaluate IMAGE_OR_DIR...``: score CAM maps quantitatively, in-process.

Runs an explainer graph on onnxruntime's CPU provider (no server) and, per image, scores the
map of the explained class (``--target C`` or the top-1 class): deletion and insertion AUC,
average drop and increase in confidence, and with ``--boxes`` the pointing game and box IoU
(definitions in ``camserve.server.evaluation``). ``--baseline-random`` scores a seeded smooth
random map the same way. Prints a Markdown table and writes ``evaluation.json`` and, when
matplotlib is installed, ``curves.png`` (mean deletion and insertion curves).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from pathlib import Path
from typing import Any

from camserve.errors import CamserveError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_BATCH = 64  # images per graph run; a curve of up to 63 steps is one run


class EvaluationError(CamserveError):
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
    p.add_argument("--method", default="gradcam", help="CAM method (default: gradcam)")
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
    import numpy as np

    from camserve.geometry import to_original
    from camserve.server import evaluation as ev
    from camserve.server.attributions import black_baseline
    from camserve.server.cam import Forward, cam_maps, check_method
    from camserve.server.models import load_model
    from camserve.server.preprocess import decode, preprocess

    check_method(args.method)  # an unknown method fails before the model loads
    if args.steps < 1:
        raise EvaluationError(f"--steps must be at least 1, got {args.steps}")
    if not 0.0 < args.threshold <= 1.0:
        raise EvaluationError(f"--threshold must be in (0, 1], got {args.threshold}")
    if not args.model.is_file():
        raise EvaluationError(f"model file {str(args.model)!r} does not exist; "
                              "write one with 'camserve export'")
    images = collect_images(args.images)
    boxes = read_boxes(args.boxes) if args.boxes else {}
    names = {path.name for path in images}
    unused = sorted(set(boxes) - names)
    if unused:
        print(f"camserve evaluate: note: boxes for {', '.join(unused)} match no image",
              file=sys.stderr)

    model = load_model(args.model, device="cpu")
    card = model.card
    spec = card.preprocessing
    if args.target is not None and not 0 <= args.target < model.num_classes:
        raise EvaluationError(f"--target {args.target} is out of range; this model has "
                              f"{model.num_classes} classes (0..{model.num_classes - 1})")
    layers = [layer.name for layer in card.layers]
    finest = max((layer.shape[1:] for layer in card.layers), key=lambda hw: hw[0] * hw[1])
    random_sigma = ev.layer_cell_sigma(spec.crop, finest)
    black = black_baseline(spec)[0]
    steps = args.steps

    def logits_of(batch: np.ndarray) -> np.ndarray:
        """logits [B,N] of batch [B,3,H,W], in runs of at most MAX_BATCH images; only the
        logits are fetched, so onnxruntime skips the gradient part of the graph."""
        out = []
        for start in range(0, len(batch), MAX_BATCH):
            chunk = np.ascontiguousarray(batch[start:start + MAX_BATCH], dtype=np.float32)
            out.append(model.logits(chunk))
        return np.concatenate(out)

    def probabilities(batch: np.ndarray, class_index: int) -> np.ndarray:
        """Softmax probability of class_index for each image of batch [B,3,H,W] -> [B]."""
        return ev.class_probability(logits_of(batch), class_index)

    def score(image: np.ndarray, cam: np.ndarray, photo_cam: np.ndarray, class_index: int,
              y: float, truth: list | None) -> dict[str, Any]:
        deletion = probabilities(ev.deletion_batch(image, cam, steps), class_index)
        insertion = probabilities(ev.insertion_batch(image, cam, steps), class_index)
        o = float(probabilities(ev.masked_image(image, cam, black)[None], class_index)[0])
        found = ev.largest_region_box(photo_cam, args.threshold)
        return {
            "deletion_auc": ev.auc(deletion), "insertion_auc": ev.auc(insertion),
            "deletion_curve": deletion.tolist(), "insertion_curve": insertion.tolist(),
            "masked_probability": o, "average_drop": ev.average_drop(y, o),
            "increase": ev.increase_in_confidence(y, o),
            "peak": list(ev.peak(photo_cam)),
            "box": list(found) if found else None,
            "pointing_hit": ev.pointing_hit(photo_cam, truth) if truth else None,
            "iou": ev.localisation_iou(photo_cam, truth, args.threshold) if truth else None,
        }

    records = []
    for path in images:
        try:
            photo = decode(path.read_bytes())
        except CamserveError as exc:
            raise EvaluationError(f"{path.name}: {exc}") from None
        tensor, geometry = preprocess(photo, spec)
        target = -1 if args.target is None else args.target
        logits, classes, per_layer = model.run(tensor, np.full((1, 1), target, np.int64),
                                               layers)
        class_index = int(classes[0, 0])
        y = float(ev.class_probability(logits, class_index)[0])
        cam = cam_maps(args.method, [(a[0], g[0]) for a, g in per_layer.values()],
                       spec.crop, forward=Forward(tensor, classes[0], logits_of))[0]
        if float(cam.max() - cam.min()) < 1e-6:
            print(f"camserve evaluate: note: {path.name}: the {args.method} map is constant, "
                  "so its pixel order is raster order", file=sys.stderr)
        truth = boxes.get(path.name)
        image = tensor[0]
        record: dict[str, Any] = {
            "image": path.name, "path": str(path),
            "size": [geometry.original[1], geometry.original[0]],
            "class_index": class_index, "label": card.labels[class_index], "probability": y,
            "boxes": truth, "constant_map": bool(cam.max() - cam.min() < 1e-6),
            args.method: score(image, cam, to_original(cam, geometry), class_index, y, truth),
        }
        if args.baseline_random:
            seed = random_seed(path.name, args.seed)
            noise = ev.random_map(spec.crop, seed, random_sigma)
            record["random_seed"] = seed
            record["random"] = score(image, noise, to_original(noise, geometry), class_index,
                                     y, truth)
        records.append(record)

    kinds = [args.method] + (["random"] if args.baseline_random else [])
    summary = {kind: summarise([r[kind] for r in records]) for kind in kinds}
    report = {
        "model": model.name, "model_version": model.version,
        "architecture": card.architecture, "layers": layers, "method": args.method,
        "target": "top-1" if args.target is None else args.target,
        "steps": steps, "fractions": ev.fractions(steps).tolist(),
        "threshold": args.threshold,
        "deletion_substrate": "mean colour (zeros in preprocessed space)",
        "insertion_start": "Gaussian blur, sigma "
                           f"{ev.INSERTION_BLUR * max(spec.crop):.1f} px at model input",
        "average_drop_mask": "photo x map (black where the map is 0), then normalised",
        "random_blur_sigma_px": random_sigma if args.baseline_random else None,
        "images": records, "mean": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(report, indent=1))
    print(markdown_table(records, summary, kinds))
    print(f"\nwrote {args.out / 'evaluation.json'}")
    plotted = plot_curves(args.out / "curves.png", report["fractions"], summary, args.method)
    if plotted:
        print(f"wrote {args.out / 'curves.png'}")
    else:
        print("camserve evaluate: note: matplotlib is not installed, so curves.png was not "
              "written (pip install matplotlib)", file=sys.stderr)
    return 0


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
        checked = []
        for box in entries:
            if (not isinstance(box, list) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) for v in box)):
                raise EvaluationError(f"boxes file {path.name}: {name!r}: box {box!r} is not "
                                      "four numbers [x0, y0, x1, y1]")
            if not (box[0] < box[2] and box[1] < box[3]):
                raise EvaluationError(f"boxes file {path.name}: {name!r}: box {box!r} needs "
                                      "x0 < x1 and y0 < y1")
            checked.append([float(v) for v in box])
        boxes[str(name)] = checked
    return boxes


def random_seed(name: str, seed: int) -> int:
    """The random baseline's seed for an image: stable per file name, shifted by --seed."""
    return (zlib.crc32(name.encode()) + seed) % 2**32


def summarise(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over images; pointing and IoU over the images that have boxes (None if none)."""
    count = len(scores)
    curves = {}
    for curve in ("deletion_curve", "insertion_curve"):
        columns = zip(*(s[curve] for s in scores))
        curves[curve] = [sum(col) / count for col in columns]
    boxed = [s for s in scores if s["pointing_hit"] is not None]
    return {
        "images": count,
        "deletion_auc": sum(s["deletion_auc"] for s in scores) / count,
        "insertion_auc": sum(s["insertion_auc"] for s in scores) / count,
        "average_drop": sum(s["average_drop"] for s in scores) / count,
        "increase": sum(bool(s["increase"]) for s in scores) / count,
        "images_with_boxes": len(boxed),
        "pointing": sum(bool(s["pointing_hit"]) for s in boxed) / len(boxed) if boxed else None,
        "iou": sum(s["iou"] for s in boxed) / len(boxed) if boxed else None,
        **curves,
    }


def markdown_table(records: list[dict[str, Any]], summary: dict[str, Any],
                   kinds: list[str]) -> str:
    """Per image and map one row, then one mean row per map."""
    lines = ["| image | map | class | deletion AUC ↓ | insertion AUC ↑ | avg drop ↓ | "
             "increase ↑ | pointing ↑ | IoU ↑ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        label = f"{record['class_index']} {record['label']} ({record['probability']:.1%})"
        for kind in kinds:
            s = record[kind]
            pointing = "–" if s["pointing_hit"] is None else ("hit" if s["pointing_hit"]
                                                               else "miss")
            iou = "–" if s["iou"] is None else f"{s['iou']:.3f}"
            lines.append(f"| {record['image']} | {kind} | {label} | {s['deletion_auc']:.3f} | "
                         f"{s['insertion_auc']:.3f} | {s['average_drop']:.1%} | "
                         f"{'yes' if s['increase'] else 'no'} | {pointing} | {iou} |")
    for kind in kinds:
        s = summary[kind]
        pointing = "–" if s["pointing"] is None else f"{s['pointing']:.0%}"
        iou = "–" if s["iou"] is None else f"{s['iou']:.3f}"
        lines.append(f"| **mean of {s['images']}** | {kind} | | {s['deletion_auc']:.3f} | "
                     f"{s['insertion_auc']:.3f} | {s['average_drop']:.1%} | "
                     f"{s['increase']:.0%} | {pointing} | {iou} |")
    return "\n".join(lines)


def plot_curves(path: Path, fractions: list[float], summary: dict[str, Any],
                method_name: str) -> bool:
    """Mean deletion and insertion curves, one line per map, into a PNG at ``path``.

    Uses matplotlib's object API on the Agg canvas (no pyplot, no global backend); returns
    False without writing when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, curve, title in ((axes[0], "deletion_curve", "Deletion (lower AUC is better)"),
                             (axes[1], "insertion_curve", "Insertion (higher AUC is better)")):
        for kind, s in summary.items():
            name = curve.split("_")[0] + "_auc"
            ax.plot(fractions, s[curve], linestyle="--" if kind == "random" else "-",
                    marker=".", label=f"{kind} (AUC {s[name]:.3f})")
        ax.set_title(title)
        ax.set_xlabel("fraction of pixels " + ("removed" if curve == "deletion_curve"
                                               else "inserted"))
        ax.set_ylabel("probability of the class")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    count = next(iter(summary.values()))["images"]
    figure.suptitle(f"{method_name}: mean over {count} image{'s' * (count != 1)}")
    figure.tight_layout()
    figure.savefig(path)
    return True
