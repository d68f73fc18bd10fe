"""The request -> result pipeline of an explanation, free of gRPC and of the runtime.

    ExplainRequest --prepare--> Job (model input [1,3,H,W], targets [K], options)
                   --runner---> graph outputs (logits, classes, activations, gradients)
                   --finish---> Explained (maps [K,H',W'], scores, geometry, timings)
                   --response.to_response--> ExplainResponse (server)
                   (the Triton client builds its Explanations from Explained directly)

``Pipeline.prepare`` validates the request and builds the model input (decode, preprocess,
targets); a ``Runner`` runs the graph (the model itself, or the server's dynamic batcher);
``Pipeline.finish`` turns the graph's outputs into maps with NumPy; ``response.to_response``
encodes the result for the wire. The model is anything shaped like ``ExplainableModel``: an
onnxruntime session in the server, a Triton endpoint in ``camserve.client.triton``. Imports
numpy, OpenCV and protobuf only, so a client can run the same postprocessing next to a
remote graph.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from camserve import tensors
from camserve.contract import ModelCard
from camserve.errors import CallerError, CamserveError, DeadlineError, LimitError
from camserve.explain import attributions, methods
from camserve.explain.frames import frame_to_rgb
from camserve.explain.geometry import Geometry, resize_map, to_original
from camserve.explain.image import DEFAULT_MAX_PIXELS, Decoded, Window, decode_for, preprocess
from camserve.explain.regions import Region, RegionQuery, find_regions, region_query
from camserve.explain.smoothing import average_maps, perturbed_batch
from camserve.v1 import explainer_pb2 as pb

_FUSION = {pb.LAYER_FUSION_UNSPECIFIED: "mean", pb.MEAN: "mean", pb.SUM: "sum", pb.MAX: "max"}

# (logits [B,N], classes [B,K], {layer: (activations [B,C,h,w], gradients [B,K,C,h,w])})
Outputs = tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]


class ExplainableModel(Protocol):
    """What the pipeline needs of a model: its card and the graph's outputs.

    ``camserve.server.runtime.ExplainerModel`` (onnxruntime) and
    ``camserve.client.triton.TritonModel`` (KServe v2) are the two.
    """

    name: str
    version: str
    card: ModelCard
    saliency: Any  # None when input-space methods are not available

    def run(self, image: np.ndarray, targets: np.ndarray, layers: list[str]) -> Outputs:
        """image [B,3,H,W], targets [B,K] -> ``Outputs``"""

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """batch [S,3,H,W] -> logits [S,N]"""

    def head_logits(self, layer: str, activations: np.ndarray) -> np.ndarray:
        """activations [S,C,h,w] of ``layer`` -> logits [S,N]"""

    def gradients_of(self, batch: np.ndarray, classes: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """batch [S,3,H,W], classes [K] -> (logits [S,N], input gradients [S,K,3,H,W])"""


class Runner(Protocol):
    """How one prepared image reaches its graph. ``expect`` is called before the request is
    prepared (a batch may wait for it), ``cancel`` when preparing failed, ``run`` with the
    model input [1,3,H,W] and targets [K] -> ``Outputs`` of batch 1. The server's
    ``Batcher`` is one; ``Direct`` runs the model at once."""

    def expect(self) -> None: ...

    def cancel(self) -> None: ...

    def run(self, image: np.ndarray, targets: np.ndarray, layers: list[str],
            alive: Callable[[], bool]) -> Outputs: ...


class Direct:
    """The ``Runner`` without batching: one ``model.run`` per request."""

    def __init__(self, model: ExplainableModel) -> None:
        self.model = model

    def expect(self) -> None:
        pass

    def cancel(self) -> None:
        pass

    def run(self, image: np.ndarray, targets: np.ndarray, layers: list[str],
            alive: Callable[[], bool] = lambda: True) -> Outputs:
        return self.model.run(image, targets[None, :], layers)


@dataclass(frozen=True)
class Limits:
    """Per-request limits (RESOURCE_EXHAUSTED beyond them; ``max_regions``, the range of an
    option, is INVALID_ARGUMENT)."""

    max_targets: int = 64
    max_samples: int = 128  # smoothing copies per request
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded image size, checked first
    max_regions: int = 256  # OutputOptions.regions.max_regions (INVALID_ARGUMENT beyond)


@dataclass
class Job:
    """A validated request, ready for the graph: model input [1,3,H,W], targets [K]."""

    image: np.ndarray
    geometry: Geometry
    targets: np.ndarray
    method: str
    fusion: str
    layers: list[str]
    space: int
    dtype: int
    samples: int
    started: int  # perf_counter_ns stamps
    decoded: int
    prepared: int
    inferred: int = 0
    regions: RegionQuery | None = None  # None: no regions asked for


@dataclass(frozen=True)
class Target:
    """One explained class: its index, label, logit, softmax probability, map and regions."""

    class_index: int
    label: str
    logit: float
    probability: float
    cam: np.ndarray | None  # float32 [H',W'] in the requested space, in [0, 1] unless
    # raw; None for CamSpace NO_MAP
    regions: tuple[Region, ...] = ()  # in original-image pixels, largest peak first


@dataclass
class Explained:
    """An answered request, before any encoding: what the response and the SDK carry."""

    model: str
    model_version: str
    method: str
    layers: list[str]
    geometry: Geometry
    targets: list[Target]
    logits: np.ndarray  # [1,N]
    per_layer: dict[str, tuple[np.ndarray, np.ndarray]]  # activations, gradients per layer
    timings_us: dict[str, int] = field(default_factory=dict)  # decode, preprocess, ...


class Pipeline:
    """Validates requests against ``limits`` and turns graph outputs into maps."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()

    def explain(self, request: pb.ExplainRequest, model: ExplainableModel,
                runner: Runner | None = None, alive: Callable[[], bool] = lambda: True,
                image: bytes | memoryview | None = None) -> Explained:
        """prepare -> ``runner.run`` (default: ``Direct``) -> finish. ``alive`` says whether
        the caller still waits: a request whose caller gave up is dropped before the graph
        runs (DeadlineError). ``image``: the bytes of the request's encoded file or raw
        frame when they travel outside the message (the server's ``wire.Received``);
        None: the message's own."""
        runner = runner or Direct(model)
        runner.expect()
        try:
            job = self.prepare(request, model, image)
            if not alive():
                raise DeadlineError("the caller gave up before the model ran")
        except BaseException:
            runner.cancel()
            raise
        outputs = runner.run(job.image, job.targets, job.layers, alive)
        job.inferred = time.perf_counter_ns()
        return self.finish(request, model, job, outputs)

    def prepare(self, request: pb.ExplainRequest, model: ExplainableModel,
                image: bytes | memoryview | None = None) -> Job:
        """Validate the request and build the model input; nothing runs the graph yet
        (``image`` as for ``explain``)."""
        card = model.card
        started = time.perf_counter_ns()
        rgb = self._decode(request, card.preprocessing.resize, image)
        decoded = time.perf_counter_ns()
        if rgb is None:
            image = self._tensor(request.tensor, model)
            geometry = Geometry.identity(*model.card.input_size)
        else:
            image, geometry = preprocess(rgb, card.preprocessing)
        targets = self._targets(request, model)
        method = request.method or methods.DEFAULT_METHOD
        input_space = method in attributions.METHODS
        if input_space and model.saliency is None:
            raise CamserveError(f"method {method!r} needs model {model.name!r} exported with "
                                "--input-gradients (its .saliency.onnx companion)")
        if not input_space:
            methods.check_method(method)
        fusion = _FUSION.get(request.fusion)
        if fusion is None:
            raise CamserveError(f"unknown layer fusion value {request.fusion}")
        layers = list(request.layers) or [layer.name for layer in card.layers]
        for name in layers:
            try:
                card.layer(name)
            except KeyError as exc:
                raise CamserveError(exc.args[0]) from None
        space = request.output.space or pb.MODEL_INPUT
        if space not in pb.CamSpace.values():
            raise CamserveError(f"unknown map space value {space}")
        dtype = request.output.dtype or pb.FLOAT32
        if dtype not in (pb.FLOAT32, pb.FLOAT16, pb.UINT8):
            raise CamserveError("a map's dtype can be FLOAT32, FLOAT16 or UINT8")
        if request.raw_maps and dtype == pb.UINT8:
            raise CamserveError("raw_maps are not in [0, 1]: ask for FLOAT32 or FLOAT16")
        if input_space:
            self._check_attribution_size(request, method, len(targets))
            samples = 0
        else:
            samples = self._samples(request.smoothing)
        regions = region_query(request, self.limits.max_regions)
        return Job(image, geometry, targets, method, fusion, layers, space, dtype, samples,
                    started, decoded, time.perf_counter_ns(), regions=regions)

    def finish(self, request: pb.ExplainRequest, model: ExplainableModel, job: Job,
               outputs: Outputs) -> Explained:
        """Maps [K,H',W'] from the graph's outputs, with the scores of each target."""
        logits, classes, per_layer = outputs
        size = None if job.space == pb.FEATURE_MAP else model.card.input_size
        normalize = not request.raw_maps
        if job.method in attributions.METHODS:
            maps = self._input_space_maps(request, model, job, classes[0], per_layer)
        elif job.samples:
            maps = self._smoothed(model, job.image, classes, job.layers, request.smoothing,
                                  (job.method, size, job.fusion, normalize))
        else:
            forward = _forwards(model, job.image, classes[0], list(per_layer))
            maps = methods.cam_maps(job.method, [(a[0], g[0]) for a, g in per_layer.values()],
                                    size, job.fusion, normalize, forward)
        if job.space == pb.ORIGINAL_IMAGE:
            maps = np.stack([to_original(m, job.geometry) for m in maps])
        regions = [_regions_of(m, job, job.regions) if job.regions else () for m in maps]
        probabilities = _softmax(logits[0])
        labels = model.card.labels
        targets = [Target(int(c), labels[c], float(logits[0, c]), float(probabilities[c]),
                          None if job.space == pb.NO_MAP else maps[k], regions[k])
                   for k, c in enumerate(classes[0])]
        finished = time.perf_counter_ns()
        timings = {"decode_us": (job.decoded - job.started) // 1000,
                   "preprocess_us": (job.prepared - job.decoded) // 1000,
                   "inference_us": (job.inferred - job.prepared) // 1000,
                   "postprocess_us": (finished - job.inferred) // 1000}
        return Explained(model.name, model.version, job.method, job.layers, job.geometry,
                         targets, logits, per_layer, timings)

    def _check_attribution_size(self, request: pb.ExplainRequest, method: str,
                                targets: int) -> None:
        """Input-space methods run images x targets gradients of the whole input at once."""
        steps = request.integrated_gradients.steps or attributions.IG_STEPS
        samples = request.smoothing.noise_samples or attributions.SMOOTHGRAD_SAMPLES
        if method == "smoothgrad" and request.smoothing.noise_sigma < 0:
            raise CamserveError("noise_sigma must be > 0")
        if method == "integrated_gradients" and not 2 <= steps <= 1024:
            raise CamserveError(f"integrated_gradients steps must be in 2..1024, got {steps}")
        images = max(1, attributions.batch_size(method, samples, steps))
        if images * targets > self.limits.max_samples * 2:
            raise LimitError(f"{method} would run {images} images x {targets} targets; the "
                             f"limit is {self.limits.max_samples * 2} image-targets")

    def _input_space_maps(self, request: pb.ExplainRequest, model: ExplainableModel, job: Job,
                          classes: np.ndarray, per_layer: dict) -> np.ndarray:
        """Maps [K,H,W] at the model input from the saliency companion (one run)."""
        image, method = job.image, job.method
        if method == "smoothgrad":
            smoothing = request.smoothing
            return attributions.smoothgrad(
                image, classes, model.gradients_of,
                smoothing.noise_samples or attributions.SMOOTHGRAD_SAMPLES,
                smoothing.noise_sigma or attributions.SMOOTHGRAD_SIGMA,
                np.random.default_rng(smoothing.seed or None))
        if method == "integrated_gradients":
            options = request.integrated_gradients
            baseline = (attributions.zero_baseline(image)
                        if options.baseline == pb.IntegratedGradients.ZERO
                        else attributions.black_baseline(model.card.preprocessing))
            return attributions.integrated_gradients(
                image, classes, model.gradients_of, baseline,
                options.steps or attributions.IG_STEPS).maps
        gradients = attributions.saliency(image, classes, model.gradients_of)
        if method == "saliency":
            return gradients
        grad_cam = methods.cam_maps("gradcam", [(a[0], g[0]) for a, g in per_layer.values()],
                                    None, job.fusion)
        return attributions.guided_gradcam(gradients, grad_cam)

    def _samples(self, smoothing: pb.Smoothing) -> int:
        """How many perturbed copies a smoothing request runs (0: no smoothing)."""
        n = smoothing.noise_samples
        if not (n or smoothing.horizontal_flip):
            return 0
        if n and not (0 < smoothing.noise_sigma <= 10):
            raise CamserveError(f"noise_sigma must be in (0, 10], got {smoothing.noise_sigma}")
        total = max(n, 1) * (2 if smoothing.horizontal_flip else 1)
        if total > self.limits.max_samples:
            raise LimitError(f"smoothing asks for {total} copies; the limit is "
                             f"{self.limits.max_samples}")
        return total

    @staticmethod
    def _smoothed(model: ExplainableModel, image: np.ndarray, classes: np.ndarray,
                  layers: list[str], smoothing: pb.Smoothing, how: tuple) -> np.ndarray:
        """Maps [K,H,W] averaged over perturbed copies, all run through the graph at once."""
        method, size, fusion, normalize = how
        rng = np.random.default_rng(smoothing.seed or None)
        batch, mirrored = perturbed_batch(image, smoothing.noise_samples,
                                              smoothing.noise_sigma, smoothing.horizontal_flip,
                                              rng)
        targets = np.repeat(classes, len(batch), axis=0)  # the clean image's classes
        _, _, per_layer = model.run(batch, targets, layers)
        maps = np.stack([
            methods.cam_maps(method, [(a[s], g[s]) for a, g in per_layer.values()], size, fusion,
                         normalize, _forwards(model, batch[s:s + 1], classes[0],
                                              list(per_layer)))
            for s in range(len(batch))])
        return average_maps(maps, mirrored, normalize)

    def _decode(self, request: pb.ExplainRequest, resize: int = 0,
                image: bytes | memoryview | None = None) -> np.ndarray | Decoded | None:
        """The request's photo as uint8 RGB [H,W,3] (a JPEG maybe decoded smaller for a
        model resizing to ``resize``: ``Decoded``), or None for a preprocessed tensor.
        ``image``: the encoded file's or raw frame's bytes, if not in the message."""
        kind = request.WhichOneof("image")
        window = None
        if request.HasField("window"):
            if kind != "encoded":
                raise CallerError(f"an intensity window applies to encoded images; the request "
                                  f"sends {kind or 'no image'}: drop `window` or send the file")
            window = Window(request.window.center, request.window.width)
        if kind == "encoded":
            return decode_for(request.encoded if image is None else image, resize,
                              self.limits.max_pixels, window)
        if kind == "pixels":
            p = request.pixels
            return frame_to_rgb(p.height, p.width, p.pixels if image is None else image,
                                p.format, p.step, self.limits.max_pixels)
        if kind == "tensor":
            return None
        raise CamserveError("the request has no image: set encoded, pixels or tensor")

    def _tensor(self, message: pb.Tensor, model: ExplainableModel) -> np.ndarray:
        height, width = model.card.input_size
        if message.dtype != pb.FLOAT32:
            raise CamserveError(f"a preprocessed tensor must be FLOAT32, got "
                                f"{tensors.dtype_name(message.dtype)}")
        expected = [1, model.card.preprocessing.channels, height, width]
        if list(message.shape) != expected:
            raise CamserveError(f"a preprocessed tensor for model {model.name!r} must have "
                                f"shape {expected}, got {list(message.shape)}")
        array = tensors.from_proto(message)
        if not np.isfinite(array).all():
            raise CamserveError("the preprocessed tensor holds NaN or Inf values")
        return array

    def _targets(self, request: pb.ExplainRequest, model: ExplainableModel) -> np.ndarray:
        """The graph's ``targets`` row: explicit classes, then -1..-top_k. A negative class
        -r is the contract's rank: the r-th highest logit (-1 = the predicted class)."""
        n = model.card.num_classes
        bad = [c for c in request.classes if not -n <= c < n]
        if bad:
            raise CallerError(f"class index {bad[0]} is out of range: model {model.name!r} "
                              f"has classes 0..{n - 1} (or ranks -1..-{n}: -r is the r-th "
                              "highest logit)")
        top_k = request.top_k or (0 if request.classes else 1)
        if top_k > n:
            raise CamserveError(f"top_k {top_k} is larger than the {n} classes of the model")
        count = len(request.classes) + top_k
        if count > self.limits.max_targets:
            raise LimitError(f"{count} targets requested; the limit is "
                             f"{self.limits.max_targets} per image")
        ranks = -np.arange(1, top_k + 1, dtype=np.int64)
        return np.concatenate([np.asarray(request.classes, np.int64), ranks])


def _forwards(model: ExplainableModel, image: np.ndarray, classes: np.ndarray,
              layers: list[str]) -> list[methods.Forward]:
    """One ``methods.Forward`` per layer, for the methods that run the network again: the
    explainer's logits of a batch, and the layer's head (``ablationcam``; a model without
    one answers with a MissingCompanionError saying what to do)."""
    return [methods.Forward(image, classes, model.logits,
                        head_logits_of=functools.partial(model.head_logits, layer))
            for layer in layers]


def _regions_of(cam: np.ndarray, job: Job, query: RegionQuery) -> tuple[Region, ...]:
    """The regions of one map [H',W'] on the original image's grid, from the map as the
    caller receives it in ``job.dtype`` and lays it on the photo exactly as the SDK's
    ``Explanation.cam`` does (the crop's size, then ``to_original``), so that server regions
    equal the SDK's on the same response. Only requests that ask for regions pay for the
    original-size map."""
    cam = _as_received(cam, job.dtype)
    if job.space != pb.ORIGINAL_IMAGE:
        x0, y0, x1, y1 = job.geometry.crop
        cam = to_original(resize_map(cam, y1 - y0, x1 - x0), job.geometry)
    return tuple(find_regions(cam, query.threshold, query.max_regions, query.min_area))


def _as_received(cam: np.ndarray, dtype: int) -> np.ndarray:
    """float32 [h,w]: ``cam`` after the wire's ``dtype`` (``response.to_response`` encodes,
    the SDK decodes: float16 rounding, UINT8 = rint(map * 255) / 255)."""
    if dtype == pb.UINT8:
        return tensors.to_levels(cam).astype(np.float32) / np.float32(255)
    if dtype == pb.FLOAT16:
        return tensors.cast(tensors.cast(cam, np.float16), np.float32)
    return cam.astype(np.float32, copy=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
