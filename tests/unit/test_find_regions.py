"""Regions of a map (``camserve.explain.regions``): known answers on synthetic maps, and the
SDK's mask, contours, boxes and regions built on the same code; regions and map-less targets
through ``to_response`` and back."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from camserve.client import ExplainOptions, Explanation, explanations, fuse
from camserve.errors import CallerError
from camserve.explain.geometry import Geometry
from camserve.explain.pipeline import Explained, Target
from camserve.explain.regions import DEFAULT_THRESHOLD, POLYGON_TOLERANCE, Region, find_regions
from camserve.explain.response import to_response
from camserve.v1 import explainer_pb2 as pb


def _two_blobs() -> np.ndarray:
    """A 40x60 map: a big blob (6 x 10 pixels, peak 0.7) and a small one (4 x 4, peak 0.95)."""
    cam = np.zeros((40, 60), np.float32)
    cam[5:11, 4:14] = 0.65      # big: rows 5..10, columns 4..13
    cam[7, 8] = 0.7
    cam[20:24, 40:44] = 0.9     # small: rows 20..23, columns 40..43
    cam[21, 41] = 0.95
    return cam


def test_two_blobs_ordered_by_peak_with_known_boxes_and_areas():
    found = find_regions(_two_blobs(), 0.6)
    assert [r.box for r in found] == [(40, 20, 44, 24), (4, 5, 14, 11)]  # small, higher peak
    assert [r.peak for r in found] == [pytest.approx(0.95), pytest.approx(0.7)]
    # contourArea through the boundary pixels' centres: a w x h rectangle is (w-1) x (h-1)
    assert [r.area for r in found] == [3 * 3, 9 * 5]
    assert sorted(found[0].polygon.tolist()) == [[40, 20], [40, 23], [43, 20], [43, 23]]
    for region in found:
        assert isinstance(region, Region)
        assert region.polygon.dtype == np.int32 and region.polygon.shape[1] == 2


def test_boxes_are_exclusive_and_hold_their_polygons():
    rng = np.random.default_rng(3)
    cam = cv2.GaussianBlur(rng.random((50, 70)).astype(np.float32), (0, 0), 3)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    found = find_regions(cam, 0.5)
    assert len(found) >= 2
    mask = cam >= 0.5
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    for region in found:
        x0, y0, x1, y1 = region.box
        xs, ys = region.polygon[:, 0], region.polygon[:, 1]
        assert (x0 <= xs).all() and (xs < x1).all() and (y0 <= ys).all() and (ys < y1).all()
        # tight: the simplified polygon departs from the outline by at most the tolerance
        extent = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.abs(np.subtract(extent, region.box)).max() <= POLYGON_TOLERANCE
        # the region is the 8-connected component its outline runs along
        component = labels == labels[ys[0], xs[0]]
        rows, columns = np.nonzero(component)
        assert (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1) == region.box
        assert region.peak == pytest.approx(cam[component].max())
    peaks = [r.peak for r in found]
    assert peaks == sorted(peaks, reverse=True)


def test_a_single_pixel_has_area_zero_and_min_area_compares_with_that():
    cam = np.zeros((10, 10), np.float32)
    cam[2, 2] = 1.0          # one pixel: area 0
    cam[5:8, 5:8] = 0.8      # 3 x 3 pixels: area 4
    assert [r.area for r in find_regions(cam)] == [0.0, 4.0]
    assert [r.box for r in find_regions(cam)] == [(2, 2, 3, 3), (5, 5, 8, 8)]
    assert [r.area for r in find_regions(cam, min_area=0)] == [0.0, 4.0]  # keeps every region
    assert [r.area for r in find_regions(cam, min_area=0.5)] == [4.0]
    assert [r.area for r in find_regions(cam, min_area=4)] == [4.0]        # area >= min_area
    assert find_regions(cam, min_area=4.5) == []


def test_max_regions_keeps_the_highest_peaks():
    cam = np.zeros((10, 40), np.float32)
    for i, peak in enumerate([0.7, 0.9, 0.8, 1.0]):
        cam[3:6, 2 + 9 * i:6 + 9 * i] = peak
    assert [r.peak for r in find_regions(cam, 0.6)] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert [r.peak for r in find_regions(cam, 0.6, max_regions=2)] == pytest.approx([1.0, 0.9])
    assert find_regions(cam, 0.6, max_regions=0) == []
    assert len(find_regions(cam, 0.6, max_regions=None)) == 4


def test_equal_peaks_put_the_larger_area_first():
    cam = np.zeros((20, 40), np.float32)
    cam[2:5, 2:5] = 0.8     # area 4
    cam[10:16, 20:30] = 0.8  # area 45
    assert [r.area for r in find_regions(cam, 0.6)] == [45.0, 4.0]


def test_threshold_edges():
    cam = np.zeros((8, 8), np.float32)
    cam[2:5, 2:5] = 0.6
    cam[3, 3] = 1.0
    assert len(find_regions(cam, 0.6)) == 1                 # at the threshold is in
    assert [r.box for r in find_regions(cam, 0.61)] == [(3, 3, 4, 4)]  # only the peak
    assert [r.box for r in find_regions(cam, 1.0)] == [(3, 3, 4, 4)]  # 1 is a valid level
    assert find_regions(cam, 1.0 + 1e-6) == []               # above the map: nothing
    assert find_regions(np.zeros((8, 8), np.float32), DEFAULT_THRESHOLD) == []
    # a low threshold over a map that is everywhere above it: the whole map, one region
    whole = find_regions(np.full((8, 8), 0.5, np.float32), 0.1)
    assert [r.box for r in whole] == [(0, 0, 8, 8)] and whole[0].area == 49
    # NaN is never at or above a threshold, and does not poison a peak
    cam[3, 2] = np.nan
    assert find_regions(cam, 0.6)[0].peak == 1.0


def test_peak_is_over_the_filled_outer_contour():
    """A ring with a hotter island in its hole: one (outer) region, and its peak is the
    island's, since the island lies inside the ring's contour."""
    cam = np.zeros((20, 20), np.float32)
    cam[2:18, 2:18] = 0.7
    cam[5:15, 5:15] = 0.0
    cam[9:11, 9:11] = 0.95
    found = find_regions(cam, 0.6)
    assert len(found) == 1 and found[0].box == (2, 2, 18, 18)
    assert found[0].peak == pytest.approx(0.95)


# --- the SDK uses the same code -------------------------------------------------------------

def _explanation(cam_input, size=(300, 500)) -> Explanation:
    return Explanation(7, "thing", 1.0, 0.75, cam_input, Geometry.for_image(*size, 128, (112, 112)))


def test_sdk_mask_contours_boxes_are_find_regions_of_cam():
    cam_input = np.zeros((112, 112), np.float32)
    cam_input[10:30, 10:50] = 0.7    # bigger, lower peak
    cam_input[70:80, 80:90] = 1.0    # smaller, higher peak
    explanation = _explanation(cam_input)
    found = find_regions(explanation.cam, 0.6)
    assert len(found) == 2
    assert np.array_equal(explanation.mask(), explanation.cam >= 0.6)
    assert [r.box for r in explanation.regions()] == [r.box for r in found]
    assert explanation.boxes() == [r.box for r in found]
    assert [c.tolist() for c in explanation.contours()] == [r.polygon.tolist() for r in found]
    # largest peak first, though the other region is larger
    assert found[0].peak > found[1].peak and found[0].area < found[1].area
    assert explanation.regions(max_regions=1)[0].box == found[0].box
    assert explanation.server_regions == ()
    record = json.loads(json.dumps(explanation.to_dict()))
    assert record["boxes"] == [list(r.box) for r in found]


def _explained(space_maps, regions) -> Explained:
    geometry = Geometry.for_image(300, 500, 128, (112, 112))
    targets = [Target(c, f"thing {c}", float(c), 0.1 * c, cam, regions)
               for c, cam in zip((2, 5), space_maps)]
    return Explained(model="m", model_version="v", method="gradcam", layers=["l"],
                     geometry=geometry, targets=targets, logits=np.zeros((1, 10), np.float32),
                     per_layer={})


REGIONS = (Region(np.array([[10, 20], [10, 30], [40, 30]], np.int32), (10, 20, 41, 31), 150.0,
                  0.875),
           Region(np.array([[5, 5]], np.int32), (5, 5, 6, 6), 0.0, 0.625))


def test_regions_and_no_map_travel_through_the_response():
    request = ExplainOptions(space="none", regions=True).to_request(b"jpeg")
    response = to_response(_explained([None, None], REGIONS), request)
    assert all(not t.HasField("cam") for t in response.targets)
    assert [r.peak for r in response.targets[0].regions] == [0.875, 0.625]
    assert response.ByteSize() < 1024
    found = explanations(response)
    assert len(found) == 2
    for e in found:
        assert e.cam_input is None
        assert [r.box for r in e.server_regions] == [r.box for r in REGIONS]
        assert [r.polygon.tolist() for r in e.server_regions] == \
            [r.polygon.tolist() for r in REGIONS]
        assert [(r.area, r.peak) for r in e.server_regions] == [(150.0, 0.875), (0.0, 0.625)]
        photo = np.zeros((300, 500, 3), np.uint8)
        for draw, args in [(e.mask, ()), (e.contours, ()), (e.boxes, ()), (e.regions, ()),
                           (e.heatmap, ()), (e.overlay, (photo,))]:
            with pytest.raises(CallerError, match="no map.*model_input"):
                draw(*args)
        with pytest.raises(CallerError, match="no map"):
            _ = e.cam
        # without a map, the summary is the server's regions
        record = json.loads(json.dumps(e.to_dict()))
        assert record["threshold"] is None and record["boxes"] == [list(r.box) for r in REGIONS]
    with pytest.raises(CallerError, match="no map"):
        fuse(found)


def test_maps_and_regions_together():
    rng = np.random.default_rng(1)
    maps = [rng.random((112, 112), dtype=np.float32) for _ in range(2)]
    request = ExplainOptions(regions=True).to_request(b"jpeg")
    found = explanations(to_response(_explained(maps, REGIONS[:1]), request))
    for e, cam in zip(found, maps):
        np.testing.assert_allclose(e.cam_input, cam, atol=1e-3)  # float16 on the wire
        assert [r.box for r in e.server_regions] == [REGIONS[0].box]


def test_explain_options_region_fields():
    plain = ExplainOptions().to_request(b"jpeg")
    assert not plain.output.HasField("regions")  # unchanged default requests
    request = ExplainOptions(regions=True, region_threshold=0.4, max_regions=3, min_area=9,
                             space="none").to_request(b"jpeg")
    assert request.output.space == pb.NO_MAP
    options = request.output.regions
    assert options.enabled and options.max_regions == 3 and options.min_area == 9
    assert options.threshold == pytest.approx(0.4)
    assert ExplainOptions(regions=True).to_request(b"jpeg").output.regions.threshold == \
        pytest.approx(DEFAULT_THRESHOLD)
    for bad, match in [({"region_threshold": 0.0}, "region_threshold"),
                       ({"region_threshold": 1.5}, "region_threshold"),
                       ({"region_threshold": float("nan")}, "region_threshold"),
                       ({"max_regions": -1}, "max_regions must be >= 0"),
                       ({"min_area": -1.0}, "min_area"),
                       ({"min_area": float("inf")}, "min_area")]:
        with pytest.raises(CallerError, match=match):
            ExplainOptions(regions=True, **bad)
