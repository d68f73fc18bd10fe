"""``camserve export``: write NAME.onnx, NAME.head.onnx (and NAME.saliency.onnx) for a named
architecture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a classifier as an explainer ONNX graph",
        description="Export a classifier as one ONNX graph emitting logits, activations and "
                    "class-gradients (graph contract v1). Nothing is downloaded.")
    p.add_argument("--arch", default="efficientnet_lite0",
                   help="torchvision architecture name, or efficientnet_lite0 (pretrained, "
                        "the default)")
    p.add_argument("--weights", type=Path, help="local state_dict file for --arch")
    p.add_argument("--layer", action="append", dest="layers", metavar="NAME",
                   help="target layer by module name (repeatable; default: the last "
                        "convolutional block)")
    p.add_argument("--input-size", type=int, help="model input height = width (default: the "
                   "architecture's evaluation size)")
    p.add_argument("--name", help="file name without .onnx (default: the architecture)")
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
    from camserve.contract import Preprocessing
    from camserve.export import ExportError, export_explainer
    from camserve.export.models import load

    loaded = load(args.arch, args.weights)
    if not loaded.pretrained:
        print(f"WARNING: {args.arch} has RANDOM weights (no --weights given): its explanations "
              "mean nothing. Pass --weights FILE with a local state_dict.", file=sys.stderr)
    preprocessing = loaded.preprocessing
    if args.input_size:
        size = args.input_size
        resize = int(round(size * preprocessing.resize / preprocessing.crop[0]))
        preprocessing = Preprocessing(resize, (size, size), preprocessing.mean,
                                      preprocessing.std, preprocessing.scale,
                                      preprocessing.channel_order, preprocessing.interpolation,
                                      preprocessing.grayscale)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create output folder {str(args.out)!r}: "
                          f"{exc.strerror or exc}") from exc
    path = args.out / f"{args.name or args.arch}.onnx"
    result = export_explainer(loaded.module, path, target_layers=args.layers,
                              input_size=preprocessing.crop, labels=loaded.labels,
                              preprocess=preprocessing, architecture=loaded.architecture,
                              input_gradients=args.input_gradients,
                              precision=args.precision)
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
