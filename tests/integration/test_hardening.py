"""Production fleets: connections that age out so load rebalances (with a grace for long
streams), Envoy -> replica TLS, and the memory budget."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time

import cv2
import grpc
import numpy as np
import pytest

from camserve.errors import CamserveError
from camserve.server.cluster import cli as cluster_cli
from camserve.server.cluster import envoy
from camserve.server.cluster.children import Replica
from camserve.server.cluster.options import (
    ClusterConfig,
    find_envoy,
    free_ports,
    replica_configs,
)
from camserve.server.config import ServerConfig
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

try:
    ENVOY = find_envoy()
except CamserveError:
    ENVOY = None

PHOTO = cv2.imencode(".png", np.random.default_rng(5).integers(0, 256, (48, 64, 3),
                                                                  dtype=np.uint8))[1].tobytes()


def _serve(models_dir, **changes):
    from camserve.server.app import start

    return start(ServerConfig(models=models_dir, port=0, device="cpu", intra_op_threads=1,
                              default_model="tiny", **changes))


# --- rebalancing: max connection age ------------------------------------------------------
def test_connection_age_flags_reach_the_replicas():
    parser = argparse.ArgumentParser()
    cluster_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["cluster", "--max-connection-age", "300",
                              "--max-connection-age-grace", "60"])
    config = cluster_cli.config_from(args)
    assert config.replica.max_connection_age == 300.0
    argv = Replica(0, replica_configs(ClusterConfig(replica=config.replica, replicas=1))[0],
                   None).argv()
    assert argv[argv.index("--max-connection-age") + 1] == "300.0"
    assert argv[argv.index("--max-connection-age-grace") + 1] == "60.0"
    assert "--max-connection-age" not in Replica(
        0, replica_configs(ClusterConfig(replicas=1))[0], None).argv()  # off by default


def test_an_aged_connection_is_replaced_while_calls_go_on(models_dir):
    running = _serve(models_dir, max_connection_age=1.0)
    readies: list[float] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            channel.subscribe(lambda state: state == grpc.ChannelConnectivity.READY
                              and readies.append(time.monotonic()))
            stub = pb_grpc.ExplainerStub(channel)
            calls, failed = 0, 0
            end = time.monotonic() + 3.5
            while time.monotonic() < end:
                try:
                    stub.Explain(pb.ExplainRequest(encoded=PHOTO, top_k=1), timeout=10,
                                 wait_for_ready=True)
                    calls += 1
                except grpc.RpcError:
                    failed += 1
                time.sleep(0.02)
    finally:
        running.stop(grace=1)
    print(f"{calls} calls, {failed} failed, {len(readies)} connections in 3.5 s")
    assert len(readies) >= 3, readies  # a new connection about every second
    assert failed == 0


def _stream(port: int, frames: int, every_s: float) -> tuple[int, grpc.StatusCode | None]:
    """An ExplainStream of ``frames`` frames, one every ``every_s``: (answers, error)."""
    def requests():
        for _ in range(frames):
            yield pb.ExplainRequest(encoded=PHOTO, top_k=1)
            time.sleep(every_s)

    answers = 0
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            for response in pb_grpc.ExplainerStub(channel).ExplainStream(requests(),
                                                                         timeout=30):
                answers += not response.HasField("error")
        except grpc.RpcError as exc:
            return answers, exc.code()
    return answers, None


@pytest.mark.parametrize("grace, completes", [(5.0, True), (0.5, False)])
def test_a_long_stream_gets_the_grace_to_finish(models_dir, grace, completes):
    running = _serve(models_dir, max_connection_age=1.0, max_connection_age_grace=grace)
    try:
        started = time.monotonic()
        answers, error = _stream(running.port, frames=12, every_s=0.25)  # about 3 s
        took = time.monotonic() - started
    finally:
        running.stop(grace=1)
    print(f"grace {grace} s: {answers} answers in {took:.1f} s, error {error}")
    if completes:
        assert (answers, error) == (12, None)
    else:
        assert error is not None and answers < 12


# --- TLS from Envoy to the replicas ---------------------------------------------------------
def _validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path),
                           "--disable-hot-restart", "--log-level", "warn"],
                          check=False, capture_output=True, text=True, timeout=60)


def _explain_through_envoy(config: dict, tmp_path, wait_s: float) -> tuple[int | None, str]:
    """Run Envoy with ``config`` and explain through it until it answers or ``wait_s``
    passes: (class index or None, the last error)."""
    path = tmp_path / "envoy.json"
    path.write_text(envoy.render(config))
    checked = _validate(path)
    assert checked.returncode == 0, checked.stderr[-2000:]
    port = config["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"]
    process = subprocess.Popen([str(ENVOY), "-c", str(path), "--disable-hot-restart",
                                "--log-level", "warn"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    error = ""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            end = time.monotonic() + wait_s
            while time.monotonic() < end:
                try:
                    response = stub.Explain(pb.ExplainRequest(encoded=PHOTO, classes=[3]),
                                            timeout=5)
                    return response.targets[0].class_index, ""
                except grpc.RpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                    time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(10)
        process.stderr.close()
    return None, error


@pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (camserve[cluster])")
def test_envoy_explains_through_a_tls_only_replica(models_dir, pki, tmp_path):
    # the replica serves mutual TLS only (its health-only port stays plaintext)
    running = _serve(models_dir, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                     tls_client_ca=pki["ca"], health_port=0)
    listen, admin = free_ports(2)
    try:
        def config(ca, server_name="localhost"):
            return envoy.bootstrap(
                [f"127.0.0.1:{running.port}"], listen_port=listen, admin_port=admin,
                health_ports=[running.health_port], upstream=envoy.upstream_tls(
                    ca, pki["client_cert"], pki["client_key"], server_name))

        rendered = config(pki["ca"])
        cluster = rendered["static_resources"]["clusters"][0]
        assert cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        assert cluster["health_checks"][0]["transport_socket_match_criteria"] == \
            envoy.PLAINTEXT_HEALTH
        started = time.monotonic()
        assert _explain_through_envoy(rendered, tmp_path, 30) == (3, "")
        print(f"first answer through Envoy -> TLS replica after "
              f"{time.monotonic() - started:.1f} s")
        # a replica certificate that does not chain to the CA, or names another server,
        # gets no call
        for refused in (config(pki["rogue_ca"]), config(pki["ca"], "other.example")):
            index, error = _explain_through_envoy(refused, tmp_path, 4)
            assert index is None and error.startswith("UNAVAILABLE"), error
    finally:
        running.stop(grace=1)


def test_upstream_tls_flags_render_and_incomplete_sets_are_refused(pki, capsys):
    argv = ["10.0.0.5:50051", "--health-port", "50052", "--upstream-tls-ca", str(pki["ca"]),
            "--upstream-tls-cert", str(pki["client_cert"]), "--upstream-tls-key",
            str(pki["client_key"]), "--upstream-tls-server-name", "camserve.internal"]
    assert envoy.main(argv) == 0
    cluster = json.loads(capsys.readouterr().out)["static_resources"]["clusters"][0]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "camserve.internal"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"] == \
        str(pki["ca"].resolve())
    assert cluster["transport_socket_matches"][0]["match"] == envoy.PLAINTEXT_HEALTH
    assert envoy.main(["10.0.0.5:50051", "--upstream-tls-cert", str(pki["client_cert"])]) == 2
    assert "needs --upstream-tls-ca" in capsys.readouterr().err
    assert envoy.main(["10.0.0.5:50051", "--upstream-tls-ca", str(pki["ca"]),
                       "--upstream-tls-key", str(pki["client_key"])]) == 2
    assert "both --upstream-tls-cert and --upstream-tls-key" in capsys.readouterr().err
    plain = envoy.bootstrap(["10.0.0.5:50051"])["static_resources"]["clusters"][0]
    assert "transport_socket" not in plain  # plaintext unless asked


# --- memory budget --------------------------------------------------------------------------
def _png(height: int, width: int) -> bytes:
    return cv2.imencode(".png", np.zeros((height, width, 3), np.uint8))[1].tobytes()


def estimate_bytes(request: pb.ExplainRequest, card) -> int:
    from camserve.explain.budget import estimate

    return estimate(request, card).total


def test_the_estimate_follows_frame_size_smoothing_and_method(models_dir):
    from camserve.modelfile import explainer, read

    card = explainer(read(models_dir / "tiny.onnx")).card
    small_png, large_png = _png(48, 64), _png(2000, 3000)
    small = estimate_bytes(pb.ExplainRequest(encoded=small_png), card)
    large = estimate_bytes(pb.ExplainRequest(encoded=large_png), card)
    # decoded frame + converted copy, and the file's bytes in the message and read from it
    assert large - small == (2 * (2000 * 3000 - 48 * 64) * 3
                             + 2 * (len(large_png) - len(small_png)))
    raw = pb.ExplainRequest(pixels=pb.RawImage(height=1000, width=1000,
                                               pixels=bytes(3 * 10**6)))
    assert estimate_bytes(raw, card) >= 3 * 3 * 10**6  # received + decoded + converted
    smoothed = estimate_bytes(pb.ExplainRequest(encoded=_png(48, 64), smoothing=pb.Smoothing(
        noise_samples=50, noise_sigma=0.15, horizontal_flip=True)), card)
    assert smoothed > 50 * small
    scorecam = estimate_bytes(pb.ExplainRequest(encoded=_png(48, 64), method="scorecam"), card)
    assert scorecam > small + 32 * 3 * 64 * 64 * 4  # a chunk of masked inputs


def test_memory_budget_admits_what_fits_and_refuses_the_rest_at_once():
    from camserve.errors import LimitError
    from camserve.explain.budget import Estimate
    from camserve.server.lifecycle import MIB, MemoryBudget

    budget = MemoryBudget(10 * MIB)  # without the arena: both parts go back
    with budget.admit(Estimate(2 * MIB, 4 * MIB)):
        with pytest.raises(LimitError, match=r"about 6\.0 MiB .* 6\.0 MiB are in use .* "
                                             r"budget is 10\.0 MiB"), \
                budget.admit(Estimate(6 * MIB, 0)):
            pass
        with budget.admit(Estimate(0, 4 * MIB)):
            assert budget.in_flight == 10 * MIB
    assert budget.in_flight == 0
    with budget.admit(Estimate(0, 10 * MIB)):
        pass
    with pytest.raises(LimitError, match="never fits"), budget.admit(Estimate(11 * MIB, 0)):
        pass
    assert MemoryBudget.from_mb(0).limit is None
    assert MemoryBudget.from_mb(None).limit > 0  # a quarter of physical memory


def test_with_the_arena_the_budget_counts_what_the_arena_keeps():
    from camserve.errors import LimitError
    from camserve.explain.budget import Estimate
    from camserve.server.lifecycle import ARENA_SHARE, MIB, MemoryBudget

    budget = MemoryBudget(10 * MIB, arena_kept=True)
    assert ARENA_SHARE == 0.5
    with budget.admit(Estimate(1 * MIB, 3 * MIB)), budget.admit(Estimate(1 * MIB, 2 * MIB)):
        pass
    # nothing in flight, but the arena keeps the 5 MiB the two runs took at once
    assert budget.in_flight == 0 and budget.arena_held == 5 * MIB
    with pytest.raises(LimitError, match=r"5\.0 MiB held by onnxruntime's CPU arena"), \
            budget.admit(Estimate(6 * MIB, 0)):
        pass
    with budget.admit(Estimate(5 * MIB, 0)):  # host memory up to the rest of the budget
        pass
    with budget.admit(Estimate(0, 5 * MIB)):  # graph runs reuse what the arena holds
        pass
    # the arena may not grow past its share: host memory always keeps the other half
    with pytest.raises(LimitError, match="at most 50% of the budget.*never fits.*"
                                         "--no-cpu-arena"), budget.admit(Estimate(0, 6 * MIB)):
        pass
    assert budget.arena_held == 5 * MIB


def test_a_request_over_the_budget_is_refused_with_the_numbers(models_dir):
    running = _serve(models_dir, max_inflight_mb=4)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            ok = stub.Explain(pb.ExplainRequest(encoded=PHOTO, classes=[2]), timeout=30)
            assert ok.targets[0].class_index == 2
            smoothed = stub.Explain(pb.ExplainRequest(
                encoded=PHOTO, classes=[2], smoothing=pb.Smoothing(noise_samples=4,
                                                                   noise_sigma=0.1)),
                timeout=30)
            assert smoothed.targets[0].class_index == 2
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Explain(pb.ExplainRequest(encoded=_png(2000, 3000), classes=[2]),
                             timeout=30)
            took = time.monotonic() - started
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            message = refused.value.details()
            assert re.search(r"needs about \d+\.\d MiB .* budget is 4\.0 MiB "
                             r"\(--max-inflight-mb\)", message), message
            print(f"refused in {took * 1e3:.0f} ms: {message}")
            big_smoothing = pb.ExplainRequest(encoded=PHOTO, classes=[2], smoothing=pb.Smoothing(
                noise_samples=100, noise_sigma=0.1, horizontal_flip=True))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Explain(big_smoothing, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert running.service.budget.in_flight == 0
    finally:
        running.stop(grace=1)
