"""What a newcomer and an operator hit: ``camserve explain`` refuses bad input in one line
(exit 2) and never tracebacks, not even on random arguments and junk files; exported files
get the umask's mode; an unreadable model says so; fused explanations say they are fused;
the panel's layout."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camserve.cli import build_parser, main
from camserve.client.explanation import Explanation, fuse
from camserve.errors import ContractError
from camserve.explain.geometry import Geometry

CAT = ROOT / "samples" / "cat.jpg"


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("junk")
    files = {"text.jpg": b"hello, not a JPEG", "empty.png": b"",
             "half.jpg": CAT.read_bytes()[:200], "noise.bin": bytes(range(256)) * 4}
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    paths["readme"] = ROOT / "README.md"
    return paths


def _run(argv, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


ERRORS = {  # name: (arguments after IMAGE, what the one line says)
    "top-k 0": (["--top-k", "0"], "--top-k must be >= 1"),
    "top-k -2": (["--top-k", "-2"], "--top-k must be >= 1"),
    "threshold 2": (["--threshold", "2"], "(0, 1]"),
    "threshold 0": (["--threshold", "0"], "(0, 1]"),
    "threshold nan": (["--threshold", "nan"], "(0, 1]"),
    "no port": (["--server", "127.0.0.1"], "HOST:PORT"),
    "port range": (["--server", "127.0.0.1:70000"], "HOST:PORT"),
    "port 0": (["--server", "localhost:0"], "HOST:PORT"),
    "bare ipv6": (["--server", "::1"], "HOST:PORT"),
    "timeout 0": (["--timeout", "0"], "--timeout"),
    "half mTLS": (["--tls-cert", "c.pem"], "--tls-cert and --tls-key"),
    "missing token": (["--token-file", "/nonexistent/token"], "--token-file"),
    "missing CA": (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca"),
    "triton model": (["--triton", "127.0.0.1:8001"], "--model"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_explain_refuses_in_one_line(name, tmp_path, capsys):
    extra, says = ERRORS[name]
    out = tmp_path / "out"
    code, err = _run(["explain", CAT, "--out", out, "--timeout", "3", *extra], capsys)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("camserve explain: error: ") and says in err[0], err
    assert not out.exists()  # nothing written: no folder either


@pytest.mark.parametrize("name", ["text.jpg", "empty.png", "noise.bin", "readme"])
def test_explain_refuses_a_non_image_in_one_line(name, junk, tmp_path, capsys):
    code, err = _run(["explain", junk[name], "--server", f"127.0.0.1:{_closed_port()}",
                      "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1, err
    assert junk[name].name in err[0]
    assert not (tmp_path / "out").exists()


def test_unreachable_server_hints_at_camserve_serve(tmp_path, capsys):
    target = f"127.0.0.1:{_closed_port()}"
    code, err = _run(["explain", CAT, "--server", target, "--timeout", "2", "--target", "-1",
                      "--out", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"is 'camserve serve' running on {target}?" in err[0]
    assert not (tmp_path / "out").exists()


def test_unwritable_out_is_one_line(server, tmp_path, capsys):
    code, err = _run(["explain", CAT, "--server", f"127.0.0.1:{server.port}",
                      "--out", "/dev/null/x"], capsys)
    assert code == 2 and len(err) == 1 and "/dev/null/x" in err[0], err


def test_explain_names_files_with_the_method_and_takes_negative_targets(server, tmp_path,
                                                                        capsys):
    # the contract's "-1 = predicted class" passes the command line (the server may still
    # refuse it: that is its answer, in one line)
    args = build_parser().parse_args(["explain", "x.jpg", "--target", "-1", "--out", "o"])
    assert args.targets == [-1]
    out = tmp_path / "out"
    code = main(["explain", str(CAT), "--server", f"127.0.0.1:{server.port}", "--top-k", "1",
                 "--target", "3", "--fuse", "max", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert "cat_3_gradcam_overlay.png" in names and "cat_3_gradcam_panel.png" in names
    assert "cat_fused-max_gradcam_panel.png" in names


def test_version_and_method_help(capsys):
    import camserve
    from camserve.explain.methods import method_names

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and camserve.__version__ in capsys.readouterr().out
    helptext = " ".join(build_parser()._subparsers._group_actions[0].choices["explain"]
                        .format_help().split())
    for method in method_names():
        assert method in helptext


def test_explain_timeout_default_is_the_sdks():
    from camserve.client import cli, sdk

    assert cli.DEFAULT_TIMEOUT == sdk.DEFAULT_TIMEOUT
    args = build_parser().parse_args(["explain", "x.jpg", "--out", "o"])
    assert args.timeout == sdk.DEFAULT_TIMEOUT


def test_explain_with_token_and_tls(pki, tmp_path, models_dir, capsys):
    """--tls-ca/--tls-cert/--tls-key and --token-file reach a server asking for them."""
    from camserve.server.app import start
    from camserve.server.config import ServerConfig

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    running = start(ServerConfig(models=models_dir, port=0, device="cpu", intra_op_threads=1,
                                 default_model="tiny", tls_cert=pki["server_cert"],
                                 tls_key=pki["server_key"],
                                 tls_client_ca=pki["ca"], auth_token_file=token))
    try:
        base = ["explain", str(CAT), "--server", f"localhost:{running.port}", "--timeout", "10",
                "--tls-ca", str(pki["ca"])]
        client = ["--tls-cert", str(pki["client_cert"]),
                  "--tls-key", str(pki["client_key"])]
        assert main([*base, *client, "--out", str(tmp_path / "no")]) == 2  # no token
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main([*base, *client, "--token-file", str(token),
                     "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    finally:
        running.stop(grace=0)


# --- the property: random arguments and junk files never traceback --------------------

_TOKENS = st.sampled_from([
    "--top-k", "--target", "--threshold", "--timeout", "--server", "--method", "--fuse",
    "--model", "--smooth", "--in-flight", "--token-file", "--tls-ca", "--tls-cert",
    "--tls-key", "--triton", "--realtime", "--out", "-1", "0", "2", "1e9", "nan", "-inf",
    "max", "gradcam", "nope", "127.0.0.1", "127.0.0.1:0", "[::1]:99999", "::", "", " ",
    "/dev/null", "/dev/null/x", "/nonexistent", "--", "-x", "é"])


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_arguments_never_traceback(data, junk, tmp_path_factory, capsys):
    files = data.draw(st.lists(st.sampled_from([*junk.values(), CAT]), max_size=2))
    words = data.draw(st.lists(st.one_of(_TOKENS, st.text(max_size=6)), max_size=8))
    out = tmp_path_factory.mktemp("out")
    argv = ["explain", *map(str, files), *words,
            "--server", f"127.0.0.1:{_closed_port()}", "--timeout", "1", "--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help 0
        code = exc.code
    capsys.readouterr()
    assert code in (0, 2), argv


# --- exported files get the umask's mode; unreadable models say why ---------------------

def test_export_honours_the_umask(tiny_model, tmp_path):
    from camserve.export import export_explainer
    from camserve.export.triton import write_triton_model

    old = os.umask(0o022)
    try:
        path = tmp_path / "tiny.onnx"
        export_explainer(tiny_model, path, input_size=64, architecture="tinynet")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        write_triton_model(path, tmp_path / "repo")
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "repo").rglob("*") if p.is_file()]
    assert written and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written)


def test_unreadable_model_says_permission_denied(tmp_path, monkeypatch):
    from camserve import modelfile

    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ContractError) as err:
        modelfile.read(path)
    assert f"runs as uid {os.geteuid()}" in str(err.value) and "chmod a+r" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_mode_0000_model_says_permission_denied(tmp_path):
    from camserve import modelfile

    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(ContractError) as err:
        modelfile.read(path)
    assert "permission denied" in str(err.value) and "chmod a+r" in str(err.value)


# --- fused explanations; flat maps; the panel -------------------------------------------

def _explanation(cls: int, label: str, cam: np.ndarray, geometry: Geometry) -> Explanation:
    return Explanation(cls, label, 1.0, 0.5, cam.astype(np.float32), geometry)


def test_fuse_says_it_is_fused():
    geometry = Geometry.identity(32, 32)
    a = _explanation(1, "a", np.eye(32), geometry)
    b = _explanation(4, "b", np.fliplr(np.eye(32)), geometry)
    fused = fuse([a, b])
    assert fused.fused and fused.class_indices == (1, 4) and fused.label == "a + b"
    assert fused.probability is None and fused.logit is None
    record = fused.to_dict()
    assert record["fused"] is True and record["class_indices"] == [1, 4]
    assert record["probability"] is None
    assert not a.fused and a.class_indices == (1,) and a.to_dict()["fused"] is False


def test_flat_map_is_flagged():
    geometry = Geometry.identity(16, 16)
    assert _explanation(0, "x", np.zeros((16, 16)), geometry).is_flat
    assert not _explanation(0, "x", np.eye(16), geometry).is_flat


def test_panel_layout():
    from camserve.client import render

    photo = np.full((300, 500, 3), 120, np.uint8)
    geometry = Geometry.for_image(300, 500, 64, (64, 64))  # the crop cuts the sides off
    cam = np.zeros((64, 64), np.float32)
    cam[20:40, 20:40] = 1
    explanation = _explanation(3, "thing", cam, geometry)
    picture = render.panel(photo, explanation, 0.5)
    tile = round(500 * render.TILE_HEIGHT / 300)
    assert picture.shape == (render.BANNER + render.CAPTION + render.TILE_HEIGHT
                             + render.LEGEND, 4 * tile, 3)
    top = render.BANNER
    captions = picture[top:top + render.CAPTION]
    assert (captions < 128).any()  # the caption row has text
    tiles = picture[top + render.CAPTION:top + render.CAPTION + render.TILE_HEIGHT]
    heatmap = tiles[:, tile:2 * tile]
    corner = heatmap[render.TILE_HEIGHT // 2, 2]  # cut off by the crop: neutral grey
    assert int(corner.max()) - int(corner.min()) <= 2, corner
    legend = picture[-render.LEGEND:]
    bar = legend[9, tile + 20:2 * tile - 20]
    assert bar[0, 2] > bar[0, 0] and bar[-1, 0] > bar[-1, 2]  # blue 0 ... red 1
    fused = render.panel(photo, fuse([explanation, explanation]), 0.5)
    assert fused.shape == picture.shape
    assert cv2.imencode(".png", picture)[0]
