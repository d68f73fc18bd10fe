"""Explanations through an NVIDIA Triton endpoint (KServe v2 gRPC) instead of ``camserve serve``.

Triton runs the explainer graph exactly as exported (``camserve export --triton-repo``); this
module does the rest in the caller's process with the same code the server runs
(``camserve.explain.pipeline``: decode, preprocess, then NumPy maps): one ``ModelInfer`` with
``image`` and ``targets`` per explanation, and the model card read from the model's Triton
configuration (its ``parameters``). So ``TritonClient.explain`` answers what
``Client.explain`` answers for the same model and options.

Served this way: every gradient CAM method, Score-CAM (its extra forwards are more
``ModelInfer`` calls), several layers and targets, noise/flip smoothing. Not served: the
methods that need a companion graph (``ablationcam``, the input-space methods), which the
Triton entry does not hold.

Needs ``pip install "camserve[triton]"`` (tritonclient's gRPC client); imports neither
torch, onnx nor onnxruntime.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from camserve import contract
from camserve.client.explanation import Explanation, explanations_from
from camserve.client.options import ExplainOptions
from camserve.client.sdk import DEFAULT_TIMEOUT
from camserve.contract import ModelCard
from camserve.errors import CallerError, CamserveError, ContractError, RemoteError
from camserve.explain import attributions
from camserve.explain.pipeline import Limits, Pipeline

if TYPE_CHECKING:
    from typing_extensions import Self


class TritonError(RemoteError):
    """Triton refused or failed a call; ``code`` is its gRPC status name ("NOT_FOUND")."""

    @property
    def status(self) -> str:
        """The former name of ``code``."""
        return self.code


class TritonModel:
    """One explainer model in a Triton server, shaped like the server's ``ExplainerModel``
    (the ``camserve.explain.pipeline.ExplainableModel`` protocol)."""

    saliency = None  # the Triton entry has no companions

    def __init__(self, client: triton.InferenceServerClient, name: str, version: str = "",
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self._client = client
        self._version = version
        self.timeout = timeout
        config = _call(client.get_model_config, name, version, client_timeout=timeout).config
        props = {key: value.string_value for key, value in config.parameters.items()}
        try:
            self.card = ModelCard.from_metadata(props)
        except ContractError as exc:
            raise CamserveError(f"Triton model {name!r} is not a camserve explainer "
                                f"(its config.pbtxt parameters lack the model card: {exc}); "
                                "add it with 'camserve export --triton-repo'") from None
        self.name = name
        self.version = props.get(contract.KEY_SHA256) or version or "latest"
        self.max_batch_size = max(1, config.max_batch_size)

    def run(self, image: np.ndarray, targets: np.ndarray,
            layers: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, tuple]]:
        """image float32 [B,3,H,W], targets int64 [B,K] -> (logits [B,N], classes [B,K],
        {layer: (activations [B,C,h,w], gradients [B,K,C,h,w])}), in runs of at most the
        model's ``max_batch_size`` images."""
        return self.card.unpack(layers, self._infer(image, targets, self.card.fetches(layers)))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """logits [S,N] of a batch float32 [S,3,H,W] (for the top-1 class targets)."""
        targets = np.full((len(batch), 1), -1, np.int64)
        return self._infer(batch, targets, [contract.LOGITS])[0]

    def head_logits(self, layer: str, activations: np.ndarray) -> np.ndarray:
        raise CamserveError("ablationcam runs the head companion graph, which a Triton entry "
                            "does not hold: explain with 'camserve serve' for this method")

    def gradients_of(self, batch: np.ndarray, classes: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        raise CamserveError("input-space methods need the saliency companion graph, which a "
                            "Triton entry does not hold: use 'camserve serve'")

    def _infer(self, image: np.ndarray, targets: np.ndarray,
               names: list[str]) -> list[np.ndarray]:
        chunks = []
        for start in range(0, len(image), self.max_batch_size):
            part = slice(start, start + self.max_batch_size)
            inputs = [triton.InferInput(contract.IMAGE, list(image[part].shape), "FP32"),
                      triton.InferInput(contract.TARGETS, list(targets[part].shape), "INT64")]
            inputs[0].set_data_from_numpy(np.ascontiguousarray(image[part], np.float32))
            inputs[1].set_data_from_numpy(np.ascontiguousarray(targets[part], np.int64))
            result = _call(self._client.infer, self.name, inputs, self._version,
                           outputs=[triton.InferRequestedOutput(n) for n in names],
                           client_timeout=self.timeout)
            chunks.append([result.as_numpy(n) for n in names])
        if len(chunks) == 1:
            return chunks[0]
        return [np.concatenate(parts) for parts in zip(*chunks)]


class TritonClient:
    """Explains images with explainer graphs served by Triton at ``url`` ("host:port" of its
    gRPC endpoint). ``explain`` takes ``Client.explain``'s keywords and returns the same
    Explanations; ``limits`` are the request limits the server would apply."""

    def __init__(self, url: str, *, timeout: float | None = DEFAULT_TIMEOUT,
                 limits: Limits | None = None, **client_options) -> None:
        self._client = triton.InferenceServerClient(url, **client_options)
        self.timeout = timeout
        self._pipeline = Pipeline(limits)
        self._models: dict[tuple[str, str], TritonModel] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def model(self, name: str, version: str = "") -> TritonModel:
        """The Triton model ``name`` (its card is read once and kept)."""
        with self._lock:
            key = (name, version)
            if key not in self._models:
                self._models[key] = TritonModel(self._client, name, version, self.timeout)
            return self._models[key]

    def explain(self, image=None, *, version: str = "", tensor: np.ndarray | None = None,
                options: ExplainOptions | None = None, **overrides) -> list[Explanation]:
        """Explain one image with the Triton model named by ``model`` (required) at
        ``version`` ("": Triton's choice); ``image``, ``tensor``, ``options`` and the keyword
        ``overrides`` as for ``Client.explain``. Raises CamserveError for a request camserve
        would refuse, TritonError when Triton fails."""
        options = ExplainOptions.merged(options, overrides)
        if not options.model:
            raise CallerError("name the Triton model to explain with (model=...)")
        if options.method in attributions.METHODS:
            raise CamserveError(f"{options.method} needs the saliency companion graph, which "
                                "a Triton entry does not hold: use 'camserve serve'")
        explained = self._pipeline.explain(options.to_request(image, tensor),
                                           self.model(options.model, version))
        return explanations_from(explained, options.request_id)

    def models(self) -> list[str]:
        """Names of the models in Triton's repository index that are ready."""
        index = _call(self._client.get_model_repository_index, client_timeout=self.timeout)
        return sorted(m.name for m in index.models if m.state in ("", "READY"))

    def ready(self, models: Sequence[str] = ()) -> bool:
        """Whether Triton is ready (and each of ``models`` is)."""
        try:
            return (self._client.is_server_ready(client_timeout=self.timeout)
                    and all(self._client.is_model_ready(m, client_timeout=self.timeout)
                            for m in models))
        except InferenceServerException:
            return False


def _call(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except InferenceServerException as exc:
        # tritonclient says "StatusCode.NOT_FOUND"; the family's codes are bare names
        code = (exc.status() or "UNKNOWN").removeprefix("StatusCode.")
        raise TritonError(f"Triton: {exc.message() or exc}", code) from None
