"""The small shared pieces: the model card's metadata, the error family's status table, and
``ServerConfig`` as the one source of serve options (flags, parsing, argv)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import pytest

from camserve import contract, errors
from camserve.contract import Layer, ModelCard, Preprocessing
from camserve.server import config as serve_config


def _card() -> ModelCard:
    return ModelCard(architecture="tinynet", labels=("a", "b", "c"),
                     preprocessing=Preprocessing.imagenet(64),
                     layers=(Layer("features", "activations", "gradients", (16, 8, 8)),))


def test_card_round_trips_through_metadata():
    card = _card()
    again = ModelCard.from_metadata(card.to_metadata())
    assert again == card
    assert again.input_size == (64, 64) and again.num_classes == 3
    assert card.fetches(["features"]) == ["logits", "classes", "activations", "gradients"]


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop(contract.KEY_LABELS), "lacks camserve.labels"),
    (lambda m: m.update({contract.KEY_CONTRACT: "2"}), "version 2 is not supported"),
    (lambda m: m.update({contract.KEY_PRECISION: '"int4"'}), "precision 'int4'"),
    (lambda m: m.update({contract.KEY_LAYERS: "[]"}), "non-empty"),
])
def test_malformed_metadata_is_a_contract_error(change, message):
    metadata = _card().to_metadata()
    change(metadata)
    with pytest.raises(errors.ContractError, match=message):
        ModelCard.from_metadata(metadata)


def test_companion_marks_and_paths():
    props = contract.companion_metadata("resnet", contract.HEAD)
    assert contract.companion_of(props) == ("resnet", "head")
    assert contract.companion_path("m/resnet.onnx", "head") == Path("m/resnet.head.onnx")
    with pytest.raises(errors.ContractError, match="unknown companion kind"):
        contract.companion_of({contract.KEY_COMPANION: json.dumps({"model": "x",
                                                                   "kind": "tail"})})


@pytest.mark.parametrize("error,status", [
    (errors.NotFoundError("x"), "NOT_FOUND"), (errors.LimitError("x"), "RESOURCE_EXHAUSTED"),
    (errors.DeadlineError("x"), "DEADLINE_EXCEEDED"), (errors.CallerError("x"),
                                                       "INVALID_ARGUMENT"),
    (errors.ContractError("x"), "FAILED_PRECONDITION"),
    (errors.RemoteError("x", "UNAVAILABLE"), "UNAVAILABLE"), (KeyError("x"), "INTERNAL")])
def test_each_error_has_one_status(error, status):
    assert errors.status_name(error) == status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    serve_config.add_arguments(parser)
    return parser


def test_defaults_of_the_flags_are_the_configs():
    assert serve_config.from_args(_parser().parse_args([])) == serve_config.ServerConfig()


def test_every_option_round_trips_through_argv():
    changed = serve_config.ServerConfig(
        models=Path("elsewhere"), host="0.0.0.0", port=1, device="cpu", intra_op_threads=2,
        batching=False, max_batch_size=3, max_queue_delay_ms=0.5, default_model="m",
        tls_cert=Path("c.pem"), tls_key=Path("k.pem"), tls_client_ca=Path("ca.pem"),
        auth_token_file=Path("t"), workers=4, max_queue=5, max_message_bytes=6,
        metrics_port=7, health_port=8, grace_seconds=9.5, max_connection_age=300.0,
        max_connection_age_grace=60.0, max_inflight_mb=512.0, drain_seconds=1.5,
        cpu_arena=False)
    default = serve_config.ServerConfig()
    assert all(getattr(changed, f.name) != getattr(default, f.name)
               for f in fields(serve_config.ServerConfig)), "the test must change every field"
    argv = serve_config.to_argv(changed)
    assert serve_config.from_args(_parser().parse_args(argv)) == changed
    assert serve_config.to_argv(default) == []


def test_a_subset_of_flags_for_another_command():
    parser = argparse.ArgumentParser()
    serve_config.add_arguments(parser, ["device", "batching"])
    args = parser.parse_args(["--device", "cuda", "--no-batching"])
    assert serve_config.from_args(args, port=5) == serve_config.ServerConfig(
        device="cuda", batching=False, port=5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--workers", "3"])
