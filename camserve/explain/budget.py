"""What a request will cost in memory, estimated before any work: the server's admission
control (``--max-inflight-mb``) admits requests while the estimates in flight fit.

Reads only what the request declares (an image header, a raw frame's size, the options) and
the model card; nothing is decoded. Numbers are bytes. Each term is what measured RSS showed
(a server process with onnxruntime's CPU arena off, one request at a time): the estimate is
meant as an upper bound of the right order, not an exact figure. It comes in two parts
(``Estimate``): what the request's own code holds, freed when it ends, and what onnxruntime
allocates in its graph runs, which its CPU memory arena keeps for later runs.
"""

from __future__ import annotations

from typing import NamedTuple

from camserve.contract import ModelCard
from camserve.errors import CamserveError
from camserve.explain import attributions, methods
from camserve.explain.frames import declared_bytes
from camserve.explain.image import declared_size
from camserve.v1 import explainer_pb2 as pb

F32 = 4  # bytes per float32
# an image's bytes (raw or encoded) are held twice while the call runs when they are in the
# parsed message: there, and in the copy protobuf hands out when the field is read (decoded
# from that copy); once when the server left them in gRPC's buffer (its ``wire.Received``)
RECEIVED_COPIES = 2
RECEIVED_COPIES_OUTSIDE = 1
# onnxruntime's working memory per image of a graph run (the intermediate activations alive
# at once), in model inputs; the card does not say how big the graph is. Measured per image
# of a smoothed batch: TinyNet ~5, EfficientNet-Lite0 ~6. The liveness bound (the largest
# set of tensors alive at once) of ResNet-50 is 16, DenseNet-121 15, ResNet-18 11,
# EfficientNet-B0 24, ConvNeXt-T 26, VGG-16 43: on such graphs, with a batch, this can fall
# short by a few times.
GRAPH_WORK = 8
# a smoothed batch is built as noise, noise x sigma and their sum: three copies per image
SMOOTHING_COPIES = 3
# maps per image while smoothing: the method's maps, their stack and the un-mirrored copy
SMOOTHED_MAP_COPIES = 3
# the response's maps: computed, stacked or mapped onto the photo, encoded for the wire
RESPONSE_MAP_COPIES = 3
# Score-CAM normalises the upsampled channels [C,H,W] out of place: up to three at once
SCORECAM_MASK_COPIES = 3


class Estimate(NamedTuple):
    """A request's estimated peak memory, in bytes, in two parts: ``host``, what decoding,
    NumPy and protobuf hold (returned to the system when the request ends), and ``graph``,
    what onnxruntime allocates in the request's graph runs: their working memory and the
    outputs they return (with onnxruntime's CPU arena, kept in the arena after the run)."""

    host: int
    graph: int

    @property
    def total(self) -> int:
        return self.host + self.graph


def estimate(request: pb.ExplainRequest, card: ModelCard,
             image: bytes | memoryview | None = None) -> Estimate:
    """A request's peak memory, estimated from what it declares before any work (headers
    only, nothing decoded): decoding (``decoding_bytes``, all host memory) plus explaining
    (``explaining_bytes``). ``image``: the bytes of the request's encoded file or raw frame
    when they travel outside the message (as for ``Pipeline.explain``)."""
    kind = request.WhichOneof("image")
    encoded = b""
    if kind == "encoded":  # reading the field copies it
        encoded = request.encoded if image is None else image
    size = declared_size(encoded) if encoded else None
    if size is not None:
        _, frame_w, frame_h = size
    elif kind == "pixels":
        frame_h, frame_w = request.pixels.height, request.pixels.width
    else:  # a preprocessed tensor, or a header the decoder will refuse
        frame_h = frame_w = 0
    sixteen_bit = request.HasField("window") or (
        size is not None and size[0] == "PNG" and encoded[24:25] == b"\x10")  # IHDR depth
    raw = request.pixels
    # a frame whose pixels differ from its header is refused as soon as they are read
    received = (declared_bytes(raw.height, raw.width, raw.format, raw.step)
                if kind == "pixels" else len(encoded))
    explaining = explaining_bytes(request, card, frame_h * frame_w)
    copies = RECEIVED_COPIES if image is None else RECEIVED_COPIES_OUTSIDE
    return Estimate(decoding_bytes(frame_h * frame_w, sixteen_bit, copies * received, card)
                    + explaining.host, explaining.graph)


def _model_input(card: ModelCard) -> int:
    """Bytes of one model input, float32 [C,H,W]."""
    height, width = card.input_size
    return card.preprocessing.channels * height * width * F32


def decoding_bytes(pixels: int, sixteen_bit: bool, received: int, card: ModelCard) -> int:
    """Decoding a frame of ``pixels`` pixels into the model input: the bytes received (a raw
    frame's or an encoded file's, each copy held: ``received``), the decoded frame and
    its colour conversion (uint8 [H0,W0,3] each; a 16-bit or windowed image also has its
    samples, up to 2 bytes x 3 channels a pixel; one block of rows being resampled takes
    less than a frame) and the preprocessing's float32 copies of the model input."""
    frame = 3 * pixels
    return (received + (4 if sixteen_bit else 2) * frame
            + 3 * _model_input(card))


def explaining_bytes(request: pb.ExplainRequest, card: ModelCard, pixels: int) -> Estimate:
    """Running the graph(s) and making the maps: per image run, its copies (host), the
    graph's working memory (``GRAPH_WORK``) and the activations and gradients it returns
    (graph); the maps (host); Score-CAM's masks and Ablation-CAM's ablated copies (host)
    with their batched runs (graph). ``pixels``: the frame's, for maps on the original
    image."""
    height, width = card.input_size
    model_input = _model_input(card)
    graph = GRAPH_WORK * model_input
    targets = min(max(1, len(request.classes) + request.top_k), max(1, card.num_classes))
    method = request.method or methods.DEFAULT_METHOD
    smoothing = request.smoothing
    names = set(request.layers) or {layer.name for layer in card.layers}
    shapes = [layer.shape for layer in card.layers if layer.name in names]
    outputs = sum(F32 * c * h * w * (1 + targets) for c, h, w in shapes)  # per image
    space = request.output.space or pb.MODEL_INPUT
    area = height * width  # maps are made at the model input, except on the feature map
    if space == pb.FEATURE_MAP:
        area = max((h * w for _, h, w in shapes), default=area)
    response_area = max(area, pixels) if space == pb.ORIGINAL_IMAGE else area
    maps = F32 * targets * area  # one image's maps [K, h, w]
    response = RESPONSE_MAP_COPIES * F32 * targets * response_area
    first_run = graph + outputs  # every request runs the explainer graph once first
    if method in attributions.METHODS:
        try:
            images = max(1, attributions.batch_size(
                method, smoothing.noise_samples or attributions.SMOOTHGRAD_SAMPLES,
                request.integrated_gradients.steps or attributions.IG_STEPS))
        except (CamserveError, ValueError, KeyError):
            images = 1
        # each image: its input and copies (host), one input gradient per target and the
        # graph's work (graph)
        return Estimate(images * SMOOTHING_COPIES * model_input + response,
                        first_run + images * (targets * model_input + graph))
    images = 1
    if smoothing.noise_samples or smoothing.horizontal_flip:
        images = max(smoothing.noise_samples, 1) * (2 if smoothing.horizontal_flip else 1)
    if images > 1:
        return Estimate(images * (SMOOTHING_COPIES * model_input + SMOOTHED_MAP_COPIES * maps)
                        + response, images * (graph + outputs))
    if method == "scorecam":  # every channel upsampled to the input, chunks of masked inputs
        masks = max((SCORECAM_MASK_COPIES * F32 * c * height * width for c, _, _ in shapes),
                    default=0)
        return Estimate(masks + methods.FORWARD_BATCH * 2 * model_input + response,
                        first_run + methods.FORWARD_BATCH * graph)
    if method == "ablationcam":  # chunks of ablated activations through the layer's head
        ablated = max((methods.FORWARD_BATCH * 3 * F32 * c * h * w for c, h, w in shapes),
                      default=0)
        return Estimate(ablated + response, first_run)
    return Estimate(response, first_run)
