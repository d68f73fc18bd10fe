"""The demo's path on the real model: pretrained EfficientNet-Lite0 served on loopback,
the sample photos explained, and ``scripts/demo.sh`` run end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from camserve.client import Client, fuse, load_image

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {967, 968, 504, 441, 509}  # espresso, cup, coffee mug, beer glass, confectionery
# samples/cat.jpg (skimage.data.chelsea(), 451x300): the cat fills the left 4/5 of the
# photo; the model sees the center crop x ~94..357, y ~19..281. A conservative box on it:
CAT_BOX = (100, 30, 350, 290)  # x0, y0, x1, y1
# samples/coffee.jpg (skimage.data.coffee(), 600x400): the cup (not the saucer or table)
CUP_BOX = (160, 10, 420, 300)


def _peak(cam: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    return int(x), int(y)


def _inside(point, box) -> bool:
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


@pytest.fixture(scope="module")
def lite0_server(lite0_dir):
    from camserve.server.app import start
    from camserve.server.config import ServerConfig

    running = start(ServerConfig(models=lite0_dir, port=0, device="cpu"))
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def client(lite0_server):
    with Client(f"127.0.0.1:{lite0_server.port}", timeout=60) as c:
        yield c


def test_cat_is_a_cat_and_the_heat_is_on_it(client):
    photo = load_image(SAMPLES / "cat.jpg")
    assert photo.shape == (300, 451, 3)
    found = client.explain(SAMPLES / "cat.jpg", targets=[285, 281], top_k=1)
    assert [e.class_index for e in found[:2]] == [285, 281]
    assert len(found) == 3
    egyptian, tabby, top1 = found
    assert top1.class_index in CATS, (top1.class_index, top1.label)
    assert egyptian.label == "Egyptian cat" and tabby.label == "tabby"
    assert egyptian.probability + tabby.probability > 0.2

    for e in found:
        assert e.cam.shape == photo.shape[:2]
        assert e.cam_input.shape == (224, 224)
        assert e.cam.max() > 0.9  # a normalised map
    assert _inside(_peak(egyptian.cam), CAT_BOX), _peak(egyptian.cam)
    assert _inside(_peak(tabby.cam), CAT_BOX), _peak(tabby.cam)

    fused = fuse([egyptian, tabby], "max")
    assert np.array_equal(fused.cam_input, np.maximum(egyptian.cam_input, tabby.cam_input))
    assert _inside(_peak(fused.cam), CAT_BOX), _peak(fused.cam)
    # the main region's box overlaps the cat box
    x0, y0, x1, y1 = fused.boxes()[0]
    assert x0 < CAT_BOX[2] and x1 > CAT_BOX[0] and y0 < CAT_BOX[3] and y1 > CAT_BOX[1]
    assert fused.overlay(photo).shape == photo.shape


@pytest.mark.parametrize("corner", [(0, 0), (140, 200)])
def test_small_cat_on_gray_is_found_where_it_is(client, corner):
    """The whole center crop of the sample is cat; a smaller cat pasted on a gray canvas
    shows the map (and the geometry that maps it back) really points at the cat."""
    cat = cv2.resize(load_image(SAMPLES / "cat.jpg"), (260, 173), interpolation=cv2.INTER_AREA)
    canvas = np.full((400, 400, 3), 127, np.uint8)
    cx, cy = corner
    canvas[cy:cy + 173, cx:cx + 260] = cat
    found = client.explain(canvas, targets=[285], top_k=1)
    assert found[1].class_index in CATS, (found[1].class_index, found[1].label)
    cam = found[0].cam
    assert cam.shape == (400, 400)
    assert _inside(_peak(cam), (cx, cy, cx + 260, cy + 173)), _peak(cam)
    inside = cam[cy:cy + 173, cx:cx + 260].sum() / cam.sum()
    assert inside > 0.6, inside  # the cat is 28% of the photo


def test_coffee_is_coffee(client):
    photo = load_image(SAMPLES / "coffee.jpg")
    found = client.explain(photo, top_k=3)
    top1 = found[0]
    assert top1.class_index in CUPS, (top1.class_index, top1.label)
    assert top1.probability > 0.3
    assert [e.probability for e in found] == sorted((e.probability for e in found),
                                                    reverse=True)
    assert top1.cam.shape == photo.shape[:2]
    assert _inside(_peak(top1.cam), CUP_BOX), _peak(top1.cam)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_script(lite0_dir, tmp_path):
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("scripts/demo.sh runs .venv/bin/python, which this checkout lacks")
    out = tmp_path / "out"
    env = dict(os.environ, CAMSERVE_MODELS=str(lite0_dir), CAMSERVE_OUT=str(out),
               CAMSERVE_DEMO_PORT=str(_free_port()))
    done = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    log = tmp_path / "out.server.log"
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:],
                                  log.read_text()[-2000:] if log.exists() else "")
    assert "server up: model efficientnet_lite0" in done.stdout
    assert "done:" in done.stdout

    names = {p.name for p in out.iterdir()}
    for name in ("cat_285_gradcam_panel.png", "cat_281_gradcam_panel.png",
                 "cat_fused-max_gradcam_panel.png", "cat_285_gradcam_overlay.png", "cat.json",
                 "coffee.json"):
        assert name in names, sorted(names)
    coffee_panels = [n for n in names if n.startswith("coffee_") and n.endswith("_panel.png")]
    assert len(coffee_panels) == 1, sorted(names)

    cat = json.loads((out / "cat.json").read_text())
    assert [e["class_index"] for e in cat["explanations"]] == [285, 281, 285]
    assert [e["fused"] for e in cat["explanations"]] == [False, False, True]
    coffee = json.loads((out / "coffee.json").read_text())
    assert len(coffee["explanations"]) == 1
    assert coffee["explanations"][0]["class_index"] in CUPS
    assert coffee_panels[0] == \
        f"coffee_{coffee['explanations'][0]['class_index']}_gradcam_panel.png"

    panel = cv2.imread(str(out / "cat_285_gradcam_panel.png"))
    tile = round(451 * 256 / 300)
    assert panel is not None and abs(panel.shape[1] - 4 * tile) <= 4
