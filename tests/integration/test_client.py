"""The thin client SDK: geometry, Explanation (maps, overlays, regions), fuse, the gRPC
Client against a live server, the no-heavy-imports promise, and ``camserve explain``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import cv2
import grpc
import numpy as np
import pytest

from camserve.client import (
    Client,
    ExplainError,
    ExplainOptions,
    ModelInfo,
    load_image,
)
from camserve.contract import Preprocessing
from camserve.errors import CallerError, RemoteError
from camserve.explain import methods

# --- the Client against a live server (tiny model, 64x64 input, 10 classes) ----------------

def _photo(seed, height=80, width=120):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _check(explanations, shape, model="tiny"):
    for e in explanations:
        assert e.cam_input.shape == (64, 64) and e.cam_input.dtype == np.float32
        assert e.cam.shape == shape
        assert 0.0 <= e.cam_input.min() and e.cam_input.max() <= 1.0
        assert 0.0 <= e.cam.min() and e.cam.max() <= 1.0 + 1e-6
        assert 0.0 <= e.probability <= 1.0
        assert e.model == model
        assert e.label == f"thing {e.class_index}"


def test_client_explain_path_bytes_and_array(server, tmp_path):
    photo = _photo(3)
    path = tmp_path / "photo.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    assert np.array_equal(load_image(path), photo)

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        by_path = client.explain(path, targets=[3], top_k=2)
        by_bytes = client.explain(path.read_bytes(), targets=[3], top_k=2)
        by_array = client.explain(photo, targets=[3], top_k=2)
        best = client.explain(photo)

    for found in (by_path, by_bytes, by_array):
        assert len(found) == 3
        assert found[0].class_index == 3
        assert found[1].probability >= found[2].probability
        assert found[1].class_index != found[2].class_index
        _check(found, photo.shape[:2])
    # with neither targets nor top_k: the predicted class, which top-k ranks first
    assert len(best) == 1 and best[0].class_index == by_array[1].class_index
    # the same pixels, however they were sent, give the same maps
    for a, b, c in zip(by_path, by_bytes, by_array):
        assert a.class_index == b.class_index == c.class_index
        assert np.allclose(a.cam_input, b.cam_input, atol=1e-3)
        assert np.allclose(a.cam_input, c.cam_input, atol=1e-3)
    # the overlay fits the photo that was sent
    assert by_array[0].overlay(photo).shape == photo.shape
    # where the server's time went: one request's stages, shared by its targets
    stages = by_bytes[0].server_timings
    assert stages is not None and stages.decode_ms > 0 and stages.inference_ms > 0
    assert all(e.server_timings == stages for e in by_bytes)


def test_client_explain_tensor(server):
    tensor = np.random.default_rng(4).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        found = client.explain(tensor=tensor, targets=[0, 9])
    assert [e.class_index for e in found] == [0, 9]
    _check(found, (64, 64))
    for e in found:
        assert np.array_equal(e.cam, e.cam_input)
    with pytest.raises(CallerError, match="exactly one of image= or tensor="):
        Client.request(_photo(0), tensor=tensor)
    with pytest.raises(CallerError, match="RGB uint8"):
        Client.request(_photo(0).astype(np.float32))


def test_client_explain_stream_in_order(server):
    # frames of different sizes, so the order of the answers shows
    frames = [_photo(10 + i, 60 + 10 * i, 90 + 7 * i) for i in range(5)]
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        results = list(client.explain_stream(iter(frames), top_k=2))
    assert len(results) == 5
    for index, (frame, found) in enumerate(zip(frames, results)):
        assert len(found) == 2
        assert found[0].request_id == str(index)
        _check(found, frame.shape[:2])


def test_client_explain_stream_refused_frame_is_a_remote_error(server):
    photo = _photo(12)
    bad = Client.request(photo, targets=[99], request_id="bad")  # the model has 10 classes
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        answers = client.explain_stream([photo, bad, photo], options=ExplainOptions(top_k=2))
        assert len(next(answers)) == 2
        with pytest.raises(ExplainError, match="class index 99 is out of range") as caught:
            next(answers)
    assert isinstance(caught.value, RemoteError)
    assert caught.value.code == "INVALID_ARGUMENT" and caught.value.request_id == "bad"


def test_client_explain_with_an_options_object(server):
    photo = _photo(13)
    options = ExplainOptions(targets=[1], top_k=1, request_id="opt")
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        found = client.explain(photo, options=options)
        again = client.explain(photo, options=options, targets=[2])
        with pytest.raises(grpc.RpcError) as caught:  # unary calls raise gRPC's own error
            client.explain(photo, model="no-such-model")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert found[0].class_index == 1 and found[0].request_id == "opt"
    assert again[0].class_index == 2 and again[1].class_index == found[1].class_index
    _check(found, photo.shape[:2])


def test_client_models_and_health(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        names = [m.name for m in client.list_models()]
        assert "tiny" in names
        info = client.get_model("tiny")
        assert isinstance(info, ModelInfo) and info.name == "tiny"
        assert len(info.labels) == 10 and info.labels[3] == "thing 3"
        assert info.input_shape == (1, 3, 64, 64)
        assert isinstance(info.preprocessing, Preprocessing)
        assert info.preprocessing.crop == (64, 64)
        # float32 on the wire, the card's decimals here
        assert all(len(repr(v)) < 10 for v in (*info.preprocessing.mean,
                                                 *info.preprocessing.std))
        assert info.layers and info.layers[0].name and len(info.layers[0].shape) == 3
        assert methods.DEFAULT_METHOD in info.methods and info.contract_version == 1
        assert info.execution_provider and info.version
        assert client.get_model().name == "tiny"  # the server's default
        assert client.health() == "SERVING"
        assert client.health("tiny") == "SERVING"
        with pytest.raises(grpc.RpcError) as caught:  # grpc.health.v1: unknown service
            client.health("no-such-model")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_thin_client_imports_no_ml_runtime(server):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import camserve.client
        from camserve.client import Client
        photo = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
        with Client("127.0.0.1:{server.port}", timeout=30) as client:
            found = client.explain(photo, top_k=2)
        assert len(found) == 2
        assert found[0].overlay(photo).shape == photo.shape
        found[0].contours(); found[0].boxes(); found[0].mask()
        heavy = [m for m in ("torch", "onnxruntime", "onnx", "torchvision") if m in sys.modules]
        assert not heavy, heavy
        print("THIN-CLIENT-OK")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "THIN-CLIENT-OK" in done.stdout


# --- camserve explain ---------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_explain_end_to_end(server, tmp_path, capsys):
    from camserve.cli import main

    photo = _photo(5, 90, 140)
    image = tmp_path / "photo.png"
    assert cv2.imwrite(str(image), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        found = client.explain(photo, targets=[2], top_k=1)
    top1 = found[1].class_index

    out = tmp_path / "out"
    code = main(["explain", str(image), "--server", f"127.0.0.1:{server.port}",
                 "--target", "2", "--top-k", "1", "--fuse", "max", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "photo.png" in printed

    tile_width = round(photo.shape[1] * 256 / photo.shape[0])
    for tag in {"2", str(top1), "fused-max"}:
        overlay = cv2.imread(str(out / f"photo_{tag}_gradcam_overlay.png"))
        assert overlay is not None and overlay.shape == photo.shape
        panel = cv2.imread(str(out / f"photo_{tag}_gradcam_panel.png"))
        assert panel is not None
        assert abs(panel.shape[1] - 4 * tile_width) <= 4
        assert panel.shape[0] >= 256
    # the overlay PNG is the SDK's RGB overlay, saved in the right channel order
    saved = cv2.cvtColor(cv2.imread(str(out / "photo_2_gradcam_overlay.png")),
                         cv2.COLOR_BGR2RGB)
    assert np.abs(saved.astype(int) - found[0].overlay(photo)).max() <= 2

    record = json.loads((out / "photo.json").read_text())
    assert record["image"] == "photo.png"
    entries = record["explanations"]
    assert [e["class_index"] for e in entries[:2]] == [2, top1]
    assert len(entries) == 3 and entries[2]["fused"] is True
    assert entries[0]["fused"] is False
    assert entries[2]["probability"] is None  # a fused map has no one class's probability
    for e in entries:
        assert e["fused"] or 0.0 <= e["probability"] <= 1.0
        assert isinstance(e["boxes"], list) and isinstance(e["contours"], list)
        assert e["image_size"] == [140, 90]
        for name in e["files"]:
            assert (out / name).is_file()
    assert entries[0]["probability"] == pytest.approx(found[0].probability, rel=1e-5)


def test_cli_explain_unreachable_server(tmp_path, capsys):
    from camserve.cli import main

    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), _photo(6))
    code = main(["explain", str(image), "--server", f"127.0.0.1:{_closed_port()}",
                 "--timeout", "2", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("camserve explain: error:")
    assert "photo.png" in err[0]
    assert "Traceback" not in err[0]


def test_cli_explain_missing_image(server, tmp_path, capsys):
    from camserve.cli import main

    missing = tmp_path / "nope.jpg"
    code = main(["explain", str(missing), "--server", f"127.0.0.1:{server.port}",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jpg" in err[0] and "does not exist" in err[0]


def test_client_retries_unavailable_until_the_server_is_up(models_dir):
    import socket
    import threading

    from camserve.server.app import start
    from camserve.server.config import ServerConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = {}

    def late_start() -> None:
        threading.Event().wait(0.3)
        started["server"] = start(ServerConfig(models=models_dir, port=port, device="cpu"))

    thread = threading.Thread(target=late_start)
    thread.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=20) as client:
            assert client.list_models()  # first attempts find nothing listening
    finally:
        thread.join()
        started["server"].stop(grace=0)
