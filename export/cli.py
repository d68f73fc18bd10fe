"""``camserve export``: write NAME.onnx, NAME.head.onnx (and NAME.saliency.onnx) for a named
architecture, any module a Python factory returns (``--module pkg.module:factory``) or a timm
model (``--timm NAME``)."""

from __future__ import annotations

import argparse
import ast
import math
import re
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a classifier as an explainer ONNX graph",
        description="Export a classifier as one ONNX graph emitting logits, activations and "
                    "class-gradients (graph contract v1). Nothing is downloaded.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--arch",
                        help="torchvision architecture name, or efficientnet_lite0 "
                             "(pretrained, the default)")
    source.add_argument("--module", metavar="PKG.MODULE:FACTORY",
                        help="your own network: import PKG.MODULE (from the current folder "
                             "or PYTHONPATH) and call FACTORY(**--factory-arg) for the "
                             "nn.Module")
    source.add_argument("--timm", metavar="NAME",
                        help="a timm model (needs timm installed), created with "
                             "pretrained=False: give its weights with --weights")
    p.add_argument("--factory-arg", action="append", dest="factory_args", metavar="K=V",
                   help="keyword argument for the --module factory (repeatable); V is read "
                        "as a Python literal (3, 0.5, True, [1, 2], 'x'), else as a string")
    p.add_argument("--weights", type=Path,
                   help="local weights file: a state_dict, or a checkpoint dict holding one "
                        "under 'state_dict' or 'model'; loaded strictly")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="class names: one per line, or a JSON list; as many as the logits "
                        "(default: the architecture's, else 'class <i>')")
    p.add_argument("--output", metavar="KEY|INDEX",
                   help="the model returns a tuple/list or a dict: export its item INDEX or "
                        "KEY as the logits")
    p.add_argument("--layer", action="append", dest="layers", metavar="NAME",
                   help="target layer by module name (repeatable; default: the last "
                        "convolutional block)")
    p.add_argument("--input-size", type=int, help="model input height = width (default: the "
                   "architecture's evaluation size)")
    p.add_argument("--name", help="file name without .onnx (default: the architecture, "
                                  "the factory or the timm model name)")
    pre = p.add_argument_group(
        "preprocessing", "how the server turns a photo into the model input (recorded in the "
        "file; default: the architecture's, else ImageNet's at the input size)")
    pre.add_argument("--resize", metavar="N",
                     help="resize the shorter side to N pixels before cropping")
    pre.add_argument("--crop", metavar="H[xW]",
                     help="center crop, the model input size (H alone: square)")
    pre.add_argument("--mean", metavar="R,G,B", help="per-channel mean, after --scale (one "
                     "value with --grayscale single)")
    pre.add_argument("--std", metavar="R,G,B", help="per-channel standard deviation (one "
                     "value with --grayscale single)")
    pre.add_argument("--scale", metavar="X",
                     help="multiply pixel values 0..255 by X first (default 1/255; 1 for "
                          "models trained on 0..255)")
    pre.add_argument("--interpolation", metavar="bilinear|bicubic",
                     help="resampling of the resize (antialiased as PIL)")
    pre.add_argument("--grayscale", metavar="replicate|single",
                     help="replicate: a grayscale photo becomes three equal channels (the "
                          "default); single: the model takes ONE channel [B,1,H,W] and the "
                          "server turns every photo into luma (0.299 R + 0.587 G + 0.114 B)")
    p.add_argument("--input-gradients", action="store_true",
                   help="also write NAME.saliency.onnx, the gradients of the class logits "
                        "with respect to the input image (for saliency, SmoothGrad, "
                        "Integrated Gradients)")
    p.add_argument("--precision", choices=("float32", "float16"), default="float32",
                   help="what the graphs compute in: float16 halves the files and runs faster "
                        "on GPUs; inputs and outputs stay float32 (default: float32)")
    p.add_argument("--out", type=Path, default=Path("models"), help="output folder")
    p.add_argument("--triton-repo", type=Path, metavar="DIR",
                   help="also add the explainer to this NVIDIA Triton model repository: "
                        "DIR/NAME/1/model.onnx and DIR/NAME/config.pbtxt (onnxruntime "
                        "backend, dynamic batching, the model card as parameters)")
    p.add_argument("--triton-max-batch-size", type=int, default=8, metavar="N",
                   help="max_batch_size of the Triton model (default 8)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from camserve.export import ExportError, export_explainer

    loaded = _load(args)
    if loaded.weights_found is not None:
        print(f"loaded {args.weights}: {loaded.weights_found}")
    labels = loaded.labels or None
    if args.labels is not None:
        from camserve.export.models import read_labels

        labels = read_labels(args.labels)
    preprocessing = _preprocessing(args, loaded.preprocessing)
    name = args.name or _default_name(args, loaded.architecture)
    if not name or "/" in name or name in (".", ".."):
        raise ExportError(f"--name {name!r} is not a file name")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create output folder {str(args.out)!r}: "
                          f"{exc.strerror or exc}") from exc
    path = args.out / f"{name}.onnx"
    result = export_explainer(loaded.module, path, target_layers=args.layers,
                              input_size=preprocessing.crop, labels=labels,
                              preprocess=preprocessing, architecture=loaded.architecture,
                              input_gradients=args.input_gradients,
                              precision=args.precision, output=_output_key(args.output))
    layer_text = ", ".join(f"{layer.name} {list(layer.shape)}" for layer in result.card.layers)
    if result.default_layer_chosen:
        layer_text += " (chosen automatically: the last convolutional block)"
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB): "
          f"{loaded.architecture}, layers {layer_text}, {result.card.precision}")
    if result.companion is not None:
        print(f"wrote {result.companion} ({result.companion.stat().st_size / 1e6:.1f} MB): "
              "input gradients")
    if result.head is not None:
        print(f"wrote {result.head} ({result.head.stat().st_size / 1e6:.1f} MB): the heads "
              f"(activations -> logits, for ablationcam) of {', '.join(result.head_layers)}")
    if args.triton_repo is not None:
        from camserve.export.triton import write_triton_model

        entry = write_triton_model(result.path, args.triton_repo,
                                   max_batch_size=args.triton_max_batch_size)
        print(f"wrote {entry.model} and {entry.config}: Triton model {entry.name!r} "
              f"(onnxruntime backend, dynamic batching up to {args.triton_max_batch_size}); "
              "explain through it with camserve.client.triton.TritonClient")
    left_out = [layer.name for layer in result.card.layers
                if layer.name not in result.head_layers]
    if left_out:
        print(f"note: no head for {', '.join(left_out)} (the network after it also reads "
              "tensors from before it): ablationcam cannot explain it", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace):
    """The model the flags name, with a loud warning when its weights are random."""
    from camserve.export import models

    if args.factory_args and not args.module:
        raise models.ModelLoadError("--factory-arg needs --module")
    if args.module:
        loaded = models.load_module(args.module, models.parse_factory_args(args.factory_args),
                                    args.weights)
        if args.weights is None:
            print(f"note: no --weights: {args.module} exports with the weights its factory "
                  "set (RANDOM unless it loads them itself)", file=sys.stderr)
        return loaded
    if args.timm:
        loaded = models.load_timm(args.timm, args.weights)
        what = f"timm model {args.timm}"
    else:
        arch = args.arch or models.LITE0
        loaded = models.load(arch, args.weights)
        what = arch
    if not loaded.pretrained:
        print(f"WARNING: {what} has RANDOM weights (no --weights given): its explanations "
              "mean nothing. Pass --weights FILE with a local state_dict.", file=sys.stderr)
    return loaded


def _default_name(args: argparse.Namespace, architecture: str) -> str:
    if args.module:
        base = args.module.partition(":")[2].split(".")[-1]
    elif args.timm:
        base = args.timm
    else:
        base = architecture
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def _output_key(text: str | None) -> str | int | None:
    if text is None:
        return None
    return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text


def _preprocessing(args: argparse.Namespace, base):
    """The card's Preprocessing: ``base`` (the architecture's), then --input-size, --crop,
    --resize, --mean, --std, --scale, --interpolation, --grayscale; checked."""
    from camserve.contract import Preprocessing
    from camserve.errors import ContractError
    from camserve.export import ExportError

    crop = base.crop
    if args.input_size is not None:
        if args.input_size < 1:
            raise ExportError(f"--input-size {args.input_size} must be a positive integer")
        crop = (args.input_size, args.input_size)
    if args.crop is not None:
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", args.crop)
        if match is None or int(match[1]) < 1 or int(match[2] or 1) < 1:
            raise ExportError(f"--crop {args.crop!r} is not H or HxW with positive integers "
                              "(e.g. 224 or 256x192)")
        size = (int(match[1]), int(match[2] or match[1]))
        if args.input_size is not None and size != crop:
            raise ExportError(f"--crop {args.crop} and --input-size {args.input_size} "
                              "disagree; give one of them")
        crop = size
    if args.resize is not None:
        try:
            resize = int(args.resize)
        except ValueError:
            raise ExportError(f"--resize {args.resize!r} is not a whole number of "
                              "pixels") from None
    elif crop != base.crop:  # keep the architecture's resize-to-crop ratio
        resize = round(min(crop) * base.resize / min(base.crop))
    else:
        resize = base.resize
    grayscale = args.grayscale if args.grayscale is not None else base.grayscale
    n = 1 if grayscale == "single" else 3
    spec = Preprocessing(
        resize=resize, crop=crop,
        mean=_values("--mean", args.mean, n) if args.mean is not None else _fit(base.mean, n),
        std=_values("--std", args.std, n) if args.std is not None else _fit(base.std, n),
        scale=_number("--scale", args.scale) if args.scale is not None else base.scale,
        channel_order=base.channel_order,
        interpolation=(args.interpolation if args.interpolation is not None
                       else base.interpolation),
        grayscale=grayscale)
    try:
        return spec.check()
    except ContractError as exc:
        raise ExportError(f"preprocessing: {exc}") from exc


def _number(flag: str, text: str) -> float:
    """A float, or a fraction such as 1/255."""
    try:
        num, sep, den = text.partition("/")
        value = float(num) / float(den) if sep else float(ast.literal_eval(text.strip()))
    except (ValueError, SyntaxError, TypeError, ZeroDivisionError):
        raise _flag_error(flag, text, "is not a number (e.g. 0.5 or 1/255)") from None
    if not math.isfinite(value):
        raise _flag_error(flag, text, "is not a finite number")
    return value


def _values(flag: str, text: str, n: int) -> tuple[float, ...]:
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    if len(parts) != n:
        what = "three numbers R,G,B" if n == 3 else "one number (--grayscale single)"
        raise _flag_error(flag, text, f"needs {what}, not {len(parts)}")
    return tuple(_number(flag, part) for part in parts)


def _fit(values: tuple[float, ...], n: int) -> tuple[float, ...]:
    """The architecture's per-channel values for ``n`` channels: their mean for one."""
    if len(values) == n:
        return values
    return (float(sum(values)) / len(values),) if n == 1 else (values[0],) * n


def _flag_error(flag: str, text: str, why: str):
    from camserve.export import ExportError

    return ExportError(f"{flag} {text!r} {why}")
