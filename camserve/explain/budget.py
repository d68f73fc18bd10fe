"""What a request will cost in memory, estimated before any work: the server's admission
control (``--max-inflight-mb``) admits requests while the estimates in flight fit.

Reads only what the request declares (an image header, a raw frame's size, the options) and
the model card; nothing is decoded. Numbers are bytes.
"""

from __future__ import annotations

from camserve.contract import ModelCard
from camserve.errors import CamserveError
from camserve.explain import attributions, methods
from camserve.explain.image import declared_size
from camserve.v1 import explainer_pb2 as pb

SCORECAM_CHUNK = 32  # masked images per Score-CAM / Ablation-CAM run (methods.Forward)


def estimate_bytes(request: pb.ExplainRequest, card: ModelCard) -> int:
    """A request's peak memory in bytes, estimated from what it declares before any work
    (headers only, nothing decoded): the decoded frame (H x W x 3 from the image header or
    the raw frame's size) and its copies while converting and preprocessing, the model input
    (float32 [3,H,W]) times the images the request runs (smoothing copies, input-space
    batches), the activations and gradients of its layers per image, Score-CAM's and
    Ablation-CAM's masks and batches, and the maps (per image while smoothing). For
    admission control: an upper bound of the right order, not an exact figure."""
    height, width = card.input_size
    model_input = 3 * height * width * 4
    kind = request.WhichOneof("image")
    frame_h = frame_w = 0
    received = 0
    if kind == "encoded":
        size = declared_size(request.encoded)
        if size is not None:
            _, frame_w, frame_h = size
    elif kind == "pixels":
        frame_h, frame_w = request.pixels.height, request.pixels.width
        received = len(request.pixels.pixels)  # converted from, held alongside
    frame = frame_h * frame_w * 3
    # decoded + colour-converted frame, and the resized/cropped/normalised model input
    before = received + 2 * frame + 3 * model_input
    targets = min(max(1, len(request.classes) + request.top_k), max(1, card.num_classes))
    method = request.method or methods.DEFAULT_METHOD
    smoothing = request.smoothing
    if method in attributions.METHODS:
        try:
            images = max(1, attributions.batch_size(
                method, smoothing.noise_samples or attributions.SMOOTHGRAD_SAMPLES,
                request.integrated_gradients.steps or attributions.IG_STEPS))
        except (CamserveError, ValueError, KeyError):
            images = 1
        # each image's input and one input gradient per target, and the maps
        return before + images * model_input * (1 + targets) + 2 * targets * model_input
    images = 1
    if smoothing.noise_samples or smoothing.horizontal_flip:
        images = max(smoothing.noise_samples, 1) * (2 if smoothing.horizontal_flip else 1)
    names = set(request.layers) or {layer.name for layer in card.layers}
    shapes = [layer.shape for layer in card.layers if layer.name in names]
    per_image = model_input + sum(4 * c * h * w * (1 + targets) for c, h, w in shapes)
    space = request.output.space or pb.MODEL_INPUT
    area = height * width
    if space == pb.ORIGINAL_IMAGE and frame_h * frame_w:
        area = max(area, frame_h * frame_w)
    elif space == pb.FEATURE_MAP:
        area = max((h * w for _, h, w in shapes), default=area)
    maps = 4 * targets * area
    extra = 0
    if method == "scorecam":  # every channel upsampled to the input, a chunk of masked inputs
        extra = max((4 * c * height * width for c, _, _ in shapes), default=0) + \
            SCORECAM_CHUNK * model_input
    elif method == "ablationcam":  # a chunk of ablated copies of the activations
        extra = max((SCORECAM_CHUNK * 4 * c * h * w for c, h, w in shapes), default=0)
    return before + images * (per_image + maps) + extra + 2 * maps
