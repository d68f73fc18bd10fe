"""An ``Explained`` result as the wire's ``ExplainResponse``: maps encoded in the requested
dtype (FLOAT32, FLOAT16, or UINT8 in 0..255; none for CamSpace NO_MAP), regions, geometry,
timings and, when asked for, the raw logits, activations and gradients."""

from __future__ import annotations

import numpy as np

from camserve import tensors
from camserve.explain.geometry import Geometry
from camserve.explain.pipeline import Explained
from camserve.explain.regions import Region
from camserve.v1 import explainer_pb2 as pb


def to_response(explained: Explained, request: pb.ExplainRequest) -> pb.ExplainResponse:
    """The ExplainResponse of ``explained``: maps encoded in the request's dtype, raw tensors
    when asked for."""
    dtype = request.output.dtype or pb.FLOAT32
    response = pb.ExplainResponse(
        request_id=request.request_id, model=explained.model,
        model_version=explained.model_version, method=explained.method,
        layers=explained.layers, geometry=_geometry(explained.geometry),
        timings=pb.Timings(**explained.timings_us))
    for target in explained.targets:
        added = response.targets.add(class_index=target.class_index, label=target.label,
                                     logit=target.logit, probability=target.probability,
                                     regions=[_region(r) for r in target.regions])
        if target.cam is not None:  # None: CamSpace NO_MAP
            added.cam.CopyFrom(_encode_map(target.cam, dtype))
    options = request.output
    if options.include_logits:
        response.raw.logits.CopyFrom(tensors.to_proto(explained.logits))
    for name, (activations, gradients) in explained.per_layer.items():
        if options.include_activations:
            response.raw.activations[name].CopyFrom(tensors.to_proto(activations))
        if options.include_gradients:
            response.raw.gradients[name].CopyFrom(tensors.to_proto(gradients))
    return response


def _geometry(g: Geometry) -> pb.Geometry:
    x0, y0, x1, y1 = g.crop
    return pb.Geometry(original_height=g.original[0], original_width=g.original[1],
                       resized_height=g.resized[0], resized_width=g.resized[1],
                       crop=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))


def _region(region: Region) -> pb.Region:
    x0, y0, x1, y1 = region.box
    return pb.Region(polygon=[pb.Point(x=int(x), y=int(y)) for x, y in region.polygon],
                     box=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1), area=region.area,
                     peak=region.peak)


def _encode_map(cam_map: np.ndarray, dtype: int) -> pb.Tensor:
    if dtype == pb.UINT8:
        return tensors.to_proto(tensors.to_levels(cam_map))
    return tensors.to_proto(cam_map, dtype)
