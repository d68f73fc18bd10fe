"""How far a float16 explainer is from the float32 one: logits, top-1 and Grad-CAM maps.

``.venv/bin/python bench/precision.py [--models efficientnet_lite0 resnet18] [--device cpu]``
(by hand; not part of the test suite). Each model is exported twice with ``camserve
export``'s code (``precision="float32"`` and ``"float16"``), both files are run on
onnxruntime on the same preprocessed photos (samples/cat.jpg and samples/coffee.jpg), and
for each photo we compare:

  logits    max |l16 - l32| [1,N], and that divided by max |l32|; whether the top-1 class
            is the same, and how many of the top-5 are
  Grad-CAM  for the float32 top-1 class (the same target in both): the normalised 224x224
            maps (``methods.cam_maps``, grad-cam 1.5.7's normalisation) -- max and mean
            |m16 - m32| (maps lie in [0,1]) and their correlation
  gradients the 99th percentile of |g16 - g32| / |g32| over the non-zero gradients

On the CPU provider onnxruntime has float16 kernels for few operators and runs the others in
float32 between casts it inserts, so CPU numbers mostly measure float16 storage (weights and
the tensors between nodes rounded to float16); ``--device cuda`` measures float16 arithmetic
as a GPU serves it. resnet18 has random weights (torchvision ships none offline); the
pretrained EfficientNet-Lite0 is the realistic case.

Prints a Markdown table and writes it to bench/results/precision.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from camserve.explain import methods
from camserve.explain.image import decode, preprocess
from camserve.export import export_explainer
from camserve.export.models import load
from camserve.server.runtime import load_model

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("cat.jpg", "coffee.jpg")
COLUMNS = ["model", "photo", "max abs Δ logits", "max rel Δ logits", "top-1 same",
           "top-5 shared", "map max abs Δ", "map mean abs Δ", "map correlation",
           "gradient rel Δ p99"]


def compare(arch: str, folder: Path, device: str) -> list[dict]:
    """One row per photo for ``arch`` exported in float32 and float16 into ``folder``."""
    loaded = load(arch)
    models = {}
    for precision in ("float32", "float16"):
        path = folder / precision / f"{arch}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        export_explainer(loaded.module, path, labels=loaded.labels,
                         preprocess=loaded.preprocessing, input_size=loaded.preprocessing.crop,
                         architecture=loaded.architecture, precision=precision)
        models[precision] = load_model(path, device=device)
    full, half = models["float32"], models["float16"]
    layers = [layer.name for layer in full.card.layers]
    rows = []
    for photo in PHOTOS:
        rgb = decode((ROOT / "samples" / photo).read_bytes())
        image, _ = preprocess(rgb, full.card.preprocessing)
        top = np.array([[-1]], np.int64)
        logits32 = full.run(image, top, layers)[0][0]
        target = np.array([[int(logits32.argmax())]], np.int64)  # the same class in both
        l32, _, per32 = full.run(image, target, layers)
        l16, _, per16 = half.run(image, target, layers)
        maps = [methods.cam_maps("gradcam", [(a[0], g[0]) for a, g in per.values()],
                             full.input_size)[0] for per in (per32, per16)]
        g32 = np.concatenate([g.ravel() for _, g in per32.values()])
        g16 = np.concatenate([g.ravel() for _, g in per16.values()])
        nonzero = g32 != 0
        delta = np.abs(l16 - l32)
        rows.append({
            "model": arch, "photo": photo, "provider": full.provider,
            "max_abs_logits": float(delta.max()),
            "max_rel_logits": float(delta.max() / np.abs(l32).max()),
            "top1_same": bool(l16[0].argmax() == l32[0].argmax()),
            "top5_shared": len(set(np.argsort(-l16[0])[:5]) & set(np.argsort(-l32[0])[:5])),
            "map_max_abs": float(np.abs(maps[1] - maps[0]).max()),
            "map_mean_abs": float(np.abs(maps[1] - maps[0]).mean()),
            "map_correlation": float(np.corrcoef(maps[0].ravel(), maps[1].ravel())[0, 1]),
            "gradient_rel_p99": float(np.quantile(
                np.abs(g16 - g32)[nonzero] / np.abs(g32[nonzero]), 0.99)),
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['photo']} | {r['max_abs_logits']:.2e} | "
                     f"{r['max_rel_logits']:.2e} | {'yes' if r['top1_same'] else 'NO'} | "
                     f"{r['top5_shared']}/5 | {r['map_max_abs']:.2e} | {r['map_mean_abs']:.2e} | "
                     f"{r['map_correlation']:.6f} | {r['gradient_rel_p99']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="camserve-precision-") as folder:
        for arch in args.models:
            rows += compare(arch, Path(folder) / arch, args.device)
    provider = rows[0]["provider"]
    text = (f"# float16 vs float32 explainer ({provider}; Grad-CAM of the float32 top-1 "
            f"class, maps at the model's input size)\n\n{table(rows)}\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    (args.out / f"precision{suffix}.md").write_text(text)
    (args.out / f"precision{suffix}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
