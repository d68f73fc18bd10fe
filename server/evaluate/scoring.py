"""One image of ``camserve evaluate``: its map from the explain pipeline, then the scores of
a map (``metrics``) from the model's answers to the perturbed copies of the image."""

from __future__ import annotations

from typing import Any

import numpy as np

from camserve.explain.attributions import black_baseline
from camserve.explain.pipeline import (
    Direct,
    ExplainableModel,
    Explained,
    Outputs,
    Pipeline,
)
from camserve.server.evaluate import metrics as ev
from camserve.v1 import explainer_pb2 as pb

MAX_BATCH = 64  # images per graph run; a curve of up to 63 steps is one run


class _KeepInput(Direct):
    """The pipeline's runner without batching, keeping the model input [1,3,H,W] it ran:
    the scores perturb that very tensor."""

    image: np.ndarray | None = None

    def run(self, image, targets, layers, alive=lambda: True) -> Outputs:
        self.image = image
        return super().run(image, targets, layers, alive)


def explain(model: ExplainableModel, data: bytes, method: str,
            target: int | None) -> tuple[Explained, np.ndarray]:
    """The explanation of encoded image ``data`` for class ``target`` (None: the top-1
    class), its map float32 [H,W] at the model input (``targets[0].cam``), and the model
    input [3,H,W] the map explains. CallerError when the image cannot be decoded."""
    request = pb.ExplainRequest(
        encoded=data, method=method, classes=[] if target is None else [target],
        output=pb.OutputOptions(space=pb.MODEL_INPUT, dtype=pb.FLOAT32))
    runner = _KeepInput(model)
    explained = Pipeline().explain(request, model, runner)
    return explained, runner.image[0]


class Scorer:
    """Scores maps of one model's images: deletion and insertion curves and AUC, average drop
    and increase in confidence, peak and box, and with ground-truth boxes the pointing game
    and IoU (definitions in ``metrics``)."""

    def __init__(self, model: ExplainableModel, steps: int, threshold: float) -> None:
        self.model = model
        self.steps = steps
        self.threshold = threshold
        self.black = black_baseline(model.card.preprocessing)[0]

    def logits_of(self, batch: np.ndarray) -> np.ndarray:
        """logits [B,N] of batch [B,3,H,W], in runs of at most MAX_BATCH images.
        onnxruntime's inference builds run every node of the graph whatever is fetched;
        ``logits`` sends K = 0 targets, so the gradient part runs on empty tensors."""
        out = []
        for start in range(0, len(batch), MAX_BATCH):
            chunk = np.ascontiguousarray(batch[start:start + MAX_BATCH], dtype=np.float32)
            out.append(self.model.logits(chunk))
        return np.concatenate(out)

    def probabilities(self, batch: np.ndarray, class_index: int) -> np.ndarray:
        """Softmax probability of class_index for each image of batch [B,3,H,W] -> [B]."""
        return ev.class_probability(self.logits_of(batch), class_index)

    def score(self, image: np.ndarray, cam: np.ndarray, photo_cam: np.ndarray,
              class_index: int, y: float, truth: list | None) -> dict[str, Any]:
        """The scores of map ``cam`` [H,W] at the model input of ``image`` [3,H,W] (the
        same map on the photo's grid: ``photo_cam``) for ``class_index``, whose probability
        on the image is ``y``; ``truth``: the photo's boxes, or None."""
        deletion = self.probabilities(ev.deletion_batch(image, cam, self.steps), class_index)
        insertion = self.probabilities(ev.insertion_batch(image, cam, self.steps), class_index)
        masked = ev.masked_image(image, cam, self.black)[None]
        o = float(self.probabilities(masked, class_index)[0])
        found = ev.largest_region_box(photo_cam, self.threshold)
        return {
            "deletion_auc": ev.auc(deletion), "insertion_auc": ev.auc(insertion),
            "deletion_curve": deletion.tolist(), "insertion_curve": insertion.tolist(),
            "masked_probability": o, "average_drop": ev.average_drop(y, o),
            "increase": ev.increase_in_confidence(y, o),
            "peak": list(ev.peak(photo_cam)),
            "box": list(found) if found else None,
            "pointing_hit": ev.pointing_hit(photo_cam, truth) if truth else None,
            "iou": ev.localisation_iou(photo_cam, truth, self.threshold) if truth else None,
        }
