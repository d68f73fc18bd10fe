"""The SDK without a server: geometry (the photo <-> model-input mapping), Explanation's
overlay, mask, contours and boxes, fusion, ExplainOptions, and the one Explanation builder."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from camserve.client import (
    Client,
    ExplainOptions,
    Explanation,
    ServerTimings,
    explanations,
    fuse,
    load_image,
)
from camserve.client.explanation import explanations_from
from camserve.errors import CallerError
from camserve.explain import methods, smoothing
from camserve.explain.geometry import Geometry
from camserve.explain.pipeline import Explained, Target
from camserve.explain.response import to_response
from camserve.v1 import explainer_pb2 as pb

# --- geometry ---------------------------------------------------------------------------

# (height, width) -> torchvision Resize(128) + CenterCrop(112), worked out by hand:
#   Resize(int): the shorter side becomes 128, the longer int(128 * long / short);
#   CenterCrop: top = int(round((Hr - 112) / 2)), left = int(round((Wr - 112) / 2)).
GEOMETRY_CASES = [
    # landscape 300x500: 128 x int(213.33) = 128 x 213; top round(8) = 8, left round(50.5) = 50
    ((300, 500), (128, 213), (50, 8, 162, 120)),
    # portrait 500x300: 213 x 128; top 50, left 8
    ((500, 300), (213, 128), (8, 50, 120, 162)),
    # portrait 480x270: int(227.56) = 227 x 128; top round(57.5) = 58 (round half to even), left 8
    ((480, 270), (227, 128), (8, 58, 120, 170)),
]


@pytest.mark.parametrize("size, resized, crop", GEOMETRY_CASES)
def test_geometry_for_image_known_answers(size, resized, crop):
    g = Geometry.for_image(*size, 128, (112, 112))
    assert g.original == size
    assert g.resized == resized
    assert g.crop == crop
    x0, y0, x1, y1 = g.crop
    assert (y1 - y0, x1 - x0) == (112, 112)


@pytest.mark.parametrize("size, resized, crop", GEOMETRY_CASES)
def test_geometry_matches_torchvision(size, resized, crop):
    torch = pytest.importorskip("torch")
    tvf = pytest.importorskip("torchvision.transforms.functional")
    image = torch.zeros(3, *size)
    out = tvf.resize(image, 128, antialias=True)
    assert tuple(out.shape[1:]) == resized
    # A resized-size image whose pixels hold their own (row, col): the crop's first pixel
    # tells torchvision's crop offsets.
    rows, cols = torch.meshgrid(torch.arange(resized[0]), torch.arange(resized[1]),
                                indexing="ij")
    coords = torch.stack([rows, cols, rows]).float()
    cropped = tvf.center_crop(coords, [112, 112])
    top, left = int(cropped[0, 0, 0]), int(cropped[1, 0, 0])
    assert Geometry.for_image(*size, 128, (112, 112)).crop == (left, top, left + 112, top + 112)


def _square_explanation(size, square, value=1.0):
    """An Explanation of a size[0] x size[1] photo whose 112x112 map is ``value`` on the
    (r0, r1, c0, c1) square and 0 elsewhere."""
    geometry = Geometry.for_image(*size, 128, (112, 112))
    cam_input = np.zeros((112, 112), np.float32)
    r0, r1, c0, c1 = square
    cam_input[r0:r1, c0:c1] = value
    return Explanation(7, "thing", 2.5, 0.75, cam_input, geometry)


def _expected_box(geometry, square):
    """The square's model-input rows/cols -> resized pixels -> original pixels (x0,y0,x1,y1)."""
    r0, r1, c0, c1 = square
    x0, y0 = geometry.crop[:2]
    sy = geometry.original[0] / geometry.resized[0]
    sx = geometry.original[1] / geometry.resized[1]
    return (round((c0 + x0) * sx), round((r0 + y0) * sy),
            round((c1 + x0) * sx), round((r1 + y0) * sy))


SQUARE_CASES = [((300, 500), (40, 60, 30, 50)),    # landscape
                ((500, 300), (70, 94, 20, 44))]    # portrait


@pytest.mark.parametrize("size, square", SQUARE_CASES)
def test_hot_square_maps_back_to_the_photo(size, square):
    explanation = _square_explanation(size, square)
    expected = _expected_box(explanation.geometry, square)

    cam = explanation.cam
    assert cam.shape == size and cam.dtype == np.float32

    boxes = explanation.boxes()
    assert len(boxes) == 1
    assert np.allclose(boxes[0], expected, atol=2), (boxes[0], expected)

    # the mask is the box: all True well inside, all False a little outside
    x0, y0, x1, y1 = expected
    mask = explanation.mask()
    assert mask.shape == size and mask.dtype == bool
    assert mask[y0 + 2:y1 - 2, x0 + 2:x1 - 2].all()
    outside = np.ones(size, bool)
    outside[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = False
    assert not mask[outside].any()

    contours = explanation.contours()
    assert len(contours) == 1
    c = contours[0]
    assert c.dtype == np.int32 and c.ndim == 2 and c.shape[1] == 2
    bx, by, bw, bh = cv2.boundingRect(c.reshape(-1, 1, 2))
    assert (bx, by, bx + bw, by + bh) == boxes[0]

    # the peak is inside the box, and the map is exactly 0 far from it
    peak_y, peak_x = np.unravel_index(np.argmax(cam), cam.shape)
    assert x0 <= peak_x < x1 and y0 <= peak_y < y1
    assert cam[outside].max() < 0.6


@pytest.mark.parametrize("size", [(300, 500), (500, 300)])
def test_cam_is_zero_outside_the_crop(size):
    geometry = Geometry.for_image(*size, 128, (112, 112))
    explanation = Explanation(0, "x", 0.0, 1.0, np.ones((112, 112), np.float32), geometry)
    cam = explanation.cam
    assert cam.shape == size
    x0, y0, x1, y1 = _expected_box(geometry, (0, 112, 0, 112))  # the crop, in photo pixels
    outside = np.ones(size, bool)
    outside[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = False
    assert outside.any()
    assert (cam[outside] == 0).all()
    assert np.allclose(cam[y0 + 2:y1 - 2, x0 + 2:x1 - 2], 1.0, atol=1e-5)
    # the whole crop is one region
    assert np.allclose(explanation.boxes()[0], (x0, y0, x1, y1), atol=2)


def test_identity_geometry_keeps_the_map():
    cam_input = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    explanation = Explanation(0, "x", 0.0, 1.0, cam_input, Geometry.identity(64, 64))
    assert np.array_equal(explanation.cam, cam_input)


# --- overlay, heatmap, to_dict ------------------------------------------------------------

def test_overlay_blends_and_keeps_rgb_order():
    size, square = (300, 500), (40, 60, 30, 50)
    explanation = _square_explanation(size, square)
    photo = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)

    out = explanation.overlay(photo)
    assert out.dtype == np.uint8 and out.shape == (*size, 3)
    assert np.array_equal(explanation.overlay(photo, alpha=0.0), photo)
    heat = explanation.heatmap()
    assert heat.dtype == np.uint8 and heat.shape == (*size, 3)
    assert np.array_equal(explanation.overlay(photo, alpha=1.0), heat)
    # a 50/50 blend is between the two
    mid = (photo.astype(np.int32) + heat) / 2
    assert np.abs(out - mid).max() <= 1

    # jet: 1 is red, 0 is blue -- in RGB order
    x0, y0, x1, y1 = _expected_box(explanation.geometry, square)
    hot = heat[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
    cold = heat[5, 5].astype(int)
    assert hot[0] > 100 and hot[0] > hot[2] + 50, hot
    assert cold[2] > 100 and cold[2] > cold[0] + 50, cold

    with pytest.raises(ValueError):
        explanation.overlay(photo[:-1])
    with pytest.raises(ValueError):
        explanation.overlay(photo.transpose(1, 0, 2).copy())
    with pytest.raises(ValueError):
        explanation.overlay(photo.astype(np.float32))
    with pytest.raises(ValueError):
        explanation.heatmap("no-such-colormap")


def test_to_dict_is_json_safe():
    size, square = (500, 300), (70, 94, 20, 44)
    explanation = _square_explanation(size, square)
    record = json.loads(json.dumps(explanation.to_dict()))
    assert record["class_index"] == 7 and record["label"] == "thing"
    assert record["probability"] == pytest.approx(0.75)
    assert record["boxes"] == [list(b) for b in explanation.boxes()]
    assert len(record["boxes"]) == 1
    assert len(record["contours"]) == 1
    assert record["contours"][0] == explanation.contours()[0].tolist()
    assert record["image_size"] == [300, 500]  # width, height
    # a high threshold finds nothing, and that is still JSON
    empty = json.loads(json.dumps(explanation.to_dict(threshold=1.5)))
    assert empty["boxes"] == [] and empty["contours"] == []


# --- fuse --------------------------------------------------------------------------------

def test_fuse_max_and_mean():
    rng = np.random.default_rng(2)
    geometry = Geometry.for_image(300, 500, 128, (112, 112))
    a = Explanation(1, "a", 1.0, 0.5, rng.random((112, 112), dtype=np.float32), geometry)
    b = Explanation(2, "b", 0.5, 0.3, rng.random((112, 112), dtype=np.float32), geometry)

    fused = fuse([a, b], "max")
    assert np.array_equal(fused.cam_input, np.maximum(a.cam_input, b.cam_input))
    assert fused.geometry == geometry and fused.cam.shape == (300, 500)
    assert fused.class_index == 1 and "a" in fused.label and "b" in fused.label

    mean = fuse([a, b], "mean")
    assert np.allclose(mean.cam_input, (a.cam_input + b.cam_input) / 2, atol=1e-6)
    assert mean.cam_input.dtype == np.float32

    with pytest.raises(ValueError):
        fuse([a, b], "median")
    with pytest.raises(ValueError):
        fuse([])
    other = Explanation(3, "c", 0.0, 0.1, a.cam_input, Geometry.for_image(500, 300, 128,
                                                                          (112, 112)))
    with pytest.raises(ValueError):
        fuse([a, other])


# --- ExplainOptions, and the one way an Explanation is built ------------------------------

def test_explain_options_defaults_are_the_cores():
    options = ExplainOptions()
    assert options.method == methods.DEFAULT_METHOD
    assert options.fusion == methods.FUSIONS[0]
    assert options.noise_sigma == smoothing.NOISE_SIGMA
    assert options.targets == () and options.top_k is None
    request = options.to_request(b"jpeg")
    assert request.top_k == 1 and request.method == methods.DEFAULT_METHOD
    # explicit targets alone: no top-k; numpy class indices are fine
    request = ExplainOptions(targets=np.array([3, 7])).to_request(b"jpeg")
    assert list(request.classes) == [3, 7] and request.top_k == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize("option, value, allowed", [
    ("fusion", "median", "mean, sum, max"),
    ("ig_baseline", "white", "black, zero"),
    ("space", "original", "model_input, feature_map"),
])
def test_explain_options_refuse_unknown_choices(option, value, allowed):
    with pytest.raises(CallerError, match=f"unknown {option} '{value}'; choose one of: {allowed}"):
        ExplainOptions(**{option: value})
    with pytest.raises(CallerError):  # the keyword path checks the same way
        Client.request(b"jpeg", **{option: value})
    with pytest.raises(CallerError, match="top_k must be >= 0"):
        ExplainOptions(top_k=-1)


def test_keywords_and_options_make_the_same_request():
    options = ExplainOptions(model="tiny", targets=[3], top_k=2, method="layercam",
                             noise_samples=4, flip=True, seed=9)
    by_keywords = Client.request(b"jpeg", model="tiny", targets=[3], top_k=2,
                                 method="layercam", noise_samples=4, flip=True, seed=9)
    assert Client.request(b"jpeg", options=options) == by_keywords
    assert options.to_request(b"jpeg") == by_keywords
    # keywords override the options object
    assert Client.request(b"jpeg", options=options, top_k=5).top_k == 5
    with pytest.raises(TypeError, match="no_such_option"):
        Client.request(b"jpeg", no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        Client.request(b"jpeg", options=options, no_such_option=1)


def test_response_and_pipeline_result_give_the_same_explanations():
    """``explanations`` (a gRPC response) and ``explanations_from`` (a pipeline result, the
    Triton path) build Explanations alike, here from maps on a 4x4 feature grid."""
    rng = np.random.default_rng(8)
    geometry = Geometry.for_image(300, 500, 128, (112, 112))
    explained = Explained(
        model="m", model_version="v", method="xgradcam", layers=["l"], geometry=geometry,
        targets=[Target(c, f"thing {c}", float(c), 0.1 * c, rng.random((4, 4), np.float32))
                 for c in (2, 5)],
        logits=np.zeros((1, 10), np.float32), per_layer={})
    request = ExplainOptions(request_id="r7", normalize=False).to_request(b"jpeg")
    direct = explanations_from(explained, "r7")
    via_proto = explanations(to_response(explained, request))
    assert len(direct) == len(via_proto) == 2
    for a, b in zip(direct, via_proto):
        assert (a.class_index, a.label, a.model, a.method, a.request_id) == \
            (b.class_index, b.label, "m", "xgradcam", "r7")
        assert a.probability == pytest.approx(b.probability) and a.geometry == b.geometry
        assert a.cam_input.shape == (112, 112)  # upsampled to the crop
        np.testing.assert_allclose(a.cam_input, b.cam_input, atol=1e-6)


def test_server_timings_come_from_the_response_in_ms():
    geometry = Geometry.for_image(300, 500, 128, (112, 112))
    explained = Explained(
        model="m", model_version="v", method="gradcam", layers=["l"], geometry=geometry,
        targets=[Target(c, f"thing {c}", 1.0, 0.5, np.ones((4, 4), np.float32))
                 for c in (1, 2)],
        logits=np.zeros((1, 10), np.float32), per_layer={},
        timings_us={"decode_us": 1500, "preprocess_us": 2001, "inference_us": 7000,
                    "postprocess_us": 250})
    found = explanations(to_response(explained, ExplainOptions().to_request(b"jpeg")))
    want = ServerTimings(1.5, 2.001, 7.0, 0.25)
    assert [e.server_timings for e in found] == [want, want]  # the request's, per target
    assert want.total_ms == pytest.approx(10.751)
    assert fuse(found).server_timings == want
    # no timings on the wire (a refused stream frame's answer, an old server): None
    bare = pb.ExplainResponse(model="m", method="gradcam")
    bare.targets.add(class_index=1, label="a")
    assert explanations(bare)[0].server_timings is None
    # the Triton path runs the pipeline here: no server's timings to give
    assert explanations_from(explained)[0].server_timings is None


def test_load_image_refuses_what_it_cannot_read(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    for path in (junk, tmp_path / "missing.jpg"):
        with pytest.raises(CallerError, match="cannot read an image from"):
            load_image(path)
