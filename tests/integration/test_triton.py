"""The Triton path: ``camserve export --triton-repo`` writes a model repository entry whose
config.pbtxt Triton's own ModelConfig protobuf parses and which names the ONNX file's tensors;
``camserve.client.triton.TritonClient`` explains through Triton's KServe v2 gRPC protocol and
answers what ``camserve serve`` answers."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import ROOT, SAMPLES
from triton_standin import load_config, serve
from tritonclient.grpc import model_config_pb2 as mc

from camserve import contract
from camserve.cli import main as camserve_main
from camserve.client import Client, ExplainOptions
from camserve.client.triton import TritonClient, TritonError
from camserve.contract import ModelCard
from camserve.errors import CallerError, CamserveError, RemoteError
from camserve.export.triton import TritonRepoError, write_triton_model

CAT = SAMPLES / "cat.jpg"
ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: mc.TYPE_FP32, onnx.TensorProto.INT64: mc.TYPE_INT64}


@pytest.fixture(scope="module")
def repo(models_dir, tmp_path_factory):
    """A Triton repository with tiny (max batch 8) and tiny2 (max batch 4, so that smoothing
    and Score-CAM batches are split into several ModelInfer calls)."""
    folder = tmp_path_factory.mktemp("triton")
    write_triton_model(models_dir / "tiny.onnx", folder)
    write_triton_model(models_dir / "tiny2.onnx", folder, max_batch_size=4)
    return folder


@pytest.fixture(scope="module")
def standin(repo):
    """The address of a Triton stand-in serving ``repo``."""
    server, port = serve(repo)
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture(scope="module")
def triton(standin):
    with TritonClient(standin, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def camserve_client(server):
    with Client(f"127.0.0.1:{server.port}") as client:
        yield client


# --- the repository entry ---------------------------------------------------------------------

def _assert_config_matches(config: mc.ModelConfig, onnx_path, name: str) -> None:
    model = onnx.load(str(onnx_path))
    assert config.name == name and config.backend == "onnxruntime"
    assert config.HasField("dynamic_batching")
    for kind, values in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [t.name for t in kind] == [v.name for v in values]
        for tensor, value in zip(kind, values):
            shape = [d.dim_value if d.HasField("dim_value") else -1
                     for d in value.type.tensor_type.shape.dim]
            assert list(tensor.dims) == shape[1:], tensor.name  # batch is Triton's
            assert tensor.data_type == ONNX_TO_TRITON[value.type.tensor_type.elem_type]
    props = {key: value.string_value for key, value in config.parameters.items()}
    card = ModelCard.from_metadata(props)
    assert card == ModelCard.from_metadata({p.key: p.value for p in model.metadata_props})
    assert props[contract.KEY_SHA256] and len(props[contract.KEY_SHA256]) == 12


def test_config_parses_with_tritons_protobuf_and_names_the_onnx_tensors(repo, models_dir):
    for name, batch in (("tiny", 8), ("tiny2", 4)):
        assert (repo / name / "1" / "model.onnx").read_bytes() == \
            (models_dir / f"{name}.onnx").read_bytes()
        config = load_config(repo / name / "config.pbtxt")
        assert config.max_batch_size == batch
        _assert_config_matches(config, repo / name / "1" / "model.onnx", name)
    # the contract's tensors, by name: targets and gradients keep K as -1
    config = load_config(repo / "tiny" / "config.pbtxt")
    dims = {t.name: list(t.dims) for t in [*config.input, *config.output]}
    assert dims[contract.IMAGE] == [3, 64, 64] and dims[contract.TARGETS] == [-1]
    assert dims[contract.GRADIENTS][0] == -1 and dims[contract.ACTIVATIONS][0] == 16


def test_cli_export_writes_the_triton_repository(tmp_path, capsys):
    repo = tmp_path / "repo"
    code = camserve_main(["export", "--arch", "resnet18", "--input-size", "64", "--name", "r18",
                          "--out", str(tmp_path / "models"), "--triton-repo", str(repo)])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == \
        ["r18", "r18/1", "r18/1/model.onnx", "r18/config.pbtxt"]
    assert f"and {repo / 'r18' / 'config.pbtxt'}: Triton model 'r18'" in out
    _assert_config_matches(load_config(repo / "r18" / "config.pbtxt"),
                           repo / "r18" / "1" / "model.onnx", "r18")


def test_only_explainers_become_triton_models(models_dir, tmp_path):
    with pytest.raises(TritonRepoError, match="companion"):
        write_triton_model(contract.companion_path(models_dir / "tiny.onnx", contract.HEAD),
                           tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(TritonRepoError, match="not an ONNX file"):
        write_triton_model(junk, tmp_path / "repo")
    with pytest.raises(TritonRepoError, match="Triton model name"):
        write_triton_model(models_dir / "tiny.onnx", tmp_path, name="a/b")
    assert not (tmp_path / "repo").exists()


# --- explaining through Triton equals explaining through camserve -----------------------------

CASES = [
    {"model": "tiny", "top_k": 2},
    {"model": "tiny", "targets": [3, 7], "method": "gradcam++"},
    {"model": "tiny2", "fusion": "max", "method": "layercam"},
    {"model": "tiny2", "method": "scorecam"},
    {"model": "tiny2", "noise_samples": 3, "noise_sigma": 0.2, "flip": True, "seed": 5},
    {"model": "tiny", "normalize": False, "space": "feature_map"},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in
                                                                   o.items()))
def test_triton_answers_what_camserve_answers(triton, camserve_client, options):
    via_triton = triton.explain(CAT, **options)
    via_camserve = camserve_client.explain(CAT, **options)
    assert len(via_triton) == len(via_camserve) >= 1
    for a, b in zip(via_triton, via_camserve):
        assert (a.class_index, a.label, a.model, a.method) == \
            (b.class_index, b.label, b.model, b.method)
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert a.geometry == b.geometry
        np.testing.assert_allclose(a.cam_input, b.cam_input, atol=2e-3)
        assert a.cam_input.max() > 0


def test_triton_takes_an_options_object(triton, camserve_client):
    options = ExplainOptions(model="tiny", targets=[4], request_id="t1")
    via_triton = triton.explain(CAT, options=options, top_k=1)
    via_camserve = camserve_client.explain(CAT, options=options, top_k=1)
    assert [e.class_index for e in via_triton] == [e.class_index for e in via_camserve]
    assert [e.request_id for e in via_triton] == ["t1", "t1"]
    np.testing.assert_allclose(via_triton[0].cam_input, via_camserve[0].cam_input, atol=2e-3)


def test_triton_model_card_and_index(triton, models_dir):
    assert triton.ready(["tiny", "tiny2"])
    assert triton.models() == ["tiny", "tiny2"]
    model = triton.model("tiny2")
    assert [layer.name for layer in model.card.layers] == ["features.2", "features.6"]
    assert model.max_batch_size == 4 and model.card.input_size == (64, 64)


def test_refusals_are_readable(triton):
    with pytest.raises(CamserveError, match="ablationcam runs the head companion"):
        triton.explain(CAT, model="tiny", method="ablationcam")
    with pytest.raises(CamserveError, match="integrated_gradients needs the saliency companion"):
        triton.explain(CAT, model="tiny", method="integrated_gradients")
    with pytest.raises(CamserveError, match="class index 10 is out of range"):
        triton.explain(CAT, model="tiny", targets=[10])
    with pytest.raises(CamserveError, match="unknown method .nope."):
        triton.explain(CAT, model="tiny", method="nope")
    with pytest.raises(TritonError, match="unknown model") as info:
        triton.explain(CAT, model="absent")
    assert isinstance(info.value, RemoteError)
    assert info.value.code == info.value.status == "NOT_FOUND"
    with pytest.raises(CallerError, match="name the Triton model"):
        triton.explain(CAT)


def test_triton_client_stays_thin():
    """The Triton path imports neither torch, onnx nor onnxruntime."""
    code = ("import sys, camserve.client.triton; "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_explains_through_triton(standin, tmp_path, capsys):
    code = camserve_main(["explain", str(CAT), "--triton", standin, "--model", "tiny",
                          "--top-k", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len([p for p in tmp_path.iterdir() if p.name.endswith("_panel.png")]) == 2
    assert '"model": "tiny"' in (tmp_path / "cat.json").read_text()

    code = camserve_main(["explain", str(CAT), "--triton", standin, "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip() == \
        "camserve explain: error: --triton needs --model: the Triton model to explain with"
