"""Regions computed on the server (``OutputOptions.regions``) against the SDK's own on the
same response, map-less (NO_MAP) answers and their size, and refused region options."""

from __future__ import annotations

import re

import grpc
import pytest
from conftest import SAMPLES

from camserve.client import Client, ExplainOptions, explanations
from camserve.explain.regions import DEFAULT_MAX_REGIONS
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

CAT = (SAMPLES / "cat.jpg").read_bytes()  # 451 x 300


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


def _explain(stub, dtype: int | None = None, **options) -> pb.ExplainResponse:
    request = ExplainOptions(**options).to_request(CAT)
    if dtype is not None:
        request.output.dtype = dtype
    return stub.Explain(request, timeout=30)


def _summary(regions) -> list:
    return [(r.box, r.polygon.tolist(), r.area, r.peak) for r in regions]


@pytest.mark.parametrize("dtype", [None, pb.FLOAT32, pb.UINT8])  # None: the SDK's float16
@pytest.mark.parametrize("space", ["model_input", "feature_map"])
@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_server_regions_are_the_sdks_on_the_same_response(stub, space, dtype, threshold):
    response = _explain(stub, dtype, top_k=4, space=space, regions=True,
                        region_threshold=threshold)
    found = explanations(response)
    assert len(found) == 4
    assert any(e.server_regions for e in found)
    for e in found:
        assert e.cam.shape == (300, 451)
        server = list(e.server_regions)
        count = min(len(e.contours(threshold)), DEFAULT_MAX_REGIONS)
        assert len(server) == count
        assert [r.box for r in server] == e.boxes(threshold)[:count]
        assert [r.polygon.tolist() for r in server] == \
            [c.tolist() for c in e.contours(threshold)[:count]]
        assert _summary(server) == _summary(e.regions(threshold, DEFAULT_MAX_REGIONS))
        peaks = [r.peak for r in server]
        assert peaks == sorted(peaks, reverse=True)
        assert all(threshold <= p <= 1 for p in peaks)


def test_max_regions_and_min_area_match_the_sdk(stub):
    found = explanations(_explain(stub, top_k=3, regions=True, region_threshold=0.2,
                                  max_regions=2, min_area=30))
    for e in found:
        assert len(e.server_regions) <= 2
        assert all(r.area >= 30 for r in e.server_regions)
        assert _summary(e.server_regions) == _summary(e.regions(0.2, 2, 30))


def test_no_map_sends_regions_only(stub):
    """Without the map a response is its regions: under 1 KB for the main region of the top
    class, and a fraction of the float16 map's response with the default 16 regions (the
    tiny model's map is speckled: about a dozen regions at 0.6 on the cat)."""
    for options, under in [({"max_regions": 1}, 1024), ({}, None)]:
        without = _explain(stub, space="none", top_k=1, regions=True, **options)
        with_map = _explain(stub, space="model_input", top_k=1, regions=True, **options)
        assert not without.targets[0].HasField("cam") and with_map.targets[0].HasField("cam")
        assert without.targets[0].regions
        if under:
            assert without.ByteSize() < under, without.ByteSize()
        assert with_map.ByteSize() > 2 * without.ByteSize(), \
            (with_map.ByteSize(), without.ByteSize())
        # the same regions as when the map travels along (both from the float16 map)
        assert list(without.targets[0].regions) == list(with_map.targets[0].regions)
        # the SDK copes: regions, and a summary of them
        (e,) = explanations(without)
        assert e.cam_input is None and e.server_regions
        assert e.to_dict()["boxes"] == [list(r.box) for r in e.server_regions]


def test_client_explain_without_a_map(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        (e,) = client.explain(CAT, space="none", regions=True, min_area=1)
        (f,) = client.explain(CAT, regions=True, min_area=1)
    assert e.cam_input is None and f.cam_input is not None
    assert _summary(e.server_regions) == _summary(f.server_regions)
    assert _summary(f.server_regions) == _summary(f.regions(min_area=1, max_regions=16))


@pytest.mark.parametrize("field, value, match", [
    ("threshold", 1.5, "output.regions.threshold is a map level in \\(0, 1\\]"),
    ("threshold", -0.2, "output.regions.threshold"),
    ("threshold", float("nan"), "output.regions.threshold"),
    ("threshold", float("inf"), "output.regions.threshold"),
    ("max_regions", 257, "output.regions.max_regions must be at most 256"),
    ("min_area", -1.0, "output.regions.min_area .* >= 0"),
    ("min_area", float("nan"), "output.regions.min_area"),
    ("min_area", float("inf"), "output.regions.min_area"),
])
def test_bad_region_options_are_invalid_arguments(stub, field, value, match):
    request = ExplainOptions(regions=True).to_request(CAT)
    setattr(request.output.regions, field, value)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, caught.value.details()), caught.value.details()


def test_regions_of_raw_maps_are_refused_and_disabled_options_are_ignored(stub):
    request = ExplainOptions(regions=True, normalize=False).to_request(CAT)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_maps" in caught.value.details()
    # not enabled: the other fields are not read, and no regions come back
    request = ExplainOptions().to_request(CAT)
    request.output.regions.threshold = 7
    response = stub.Explain(request, timeout=30)
    assert not response.targets[0].regions and response.targets[0].HasField("cam")
    # NO_MAP without regions: scores only
    response = _explain(stub, space="none", top_k=2)
    assert [t.HasField("cam") or bool(t.regions) for t in response.targets] == [False, False]
    assert 0 < response.targets[0].probability <= 1
