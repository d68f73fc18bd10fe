"""Scale-out behind Envoy: the committed Envoy configuration is the rendered one and Envoy
accepts it; three replicas share a load and one of them stopped by SIGTERM in the middle
costs no call; ``camserve cluster`` prints its address, exits 0 on SIGTERM, and says in one
line what is wrong with a command that cannot work."""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import psutil
import pytest

from camserve.cli import main
from camserve.client import Client, sdk
from camserve.errors import CamserveError
from camserve.server.cluster import envoy, probes
from camserve.server.cluster.children import Child
from camserve.server.cluster.options import REPLICA_DRAIN_S, ClusterConfig, find_envoy
from camserve.server.cluster.supervisor import start_cluster
from camserve.server.config import ServerConfig
from camserve.v1 import explainer_pb2 as pb
from camserve.v1 import explainer_pb2_grpc as pb_grpc

try:
    ENVOY = find_envoy()
except CamserveError:
    ENVOY = None

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
              pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (camserve[cluster])")]

ROOT = Path(__file__).resolve().parents[2]
DEPLOYED = ROOT / "deploy" / "envoy" / "envoy.json"
EXAMPLE_REPLICAS = ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]

CLIENTS = 16
REQUESTS = 600
SIGNAL_AT = REQUESTS // 2  # completed calls when one replica gets SIGTERM
GONE_FROM = REQUESTS * 3 // 4  # calls from this one on start once that replica has exited
PHOTOS = [cv2.imencode(".png", np.random.default_rng(i).integers(0, 256, (40 + 7 * i, 64, 3),
                                                                  dtype=np.uint8))[1].tobytes()
          for i in range(8)]


def work(i: int) -> tuple[bytes, list[int]]:
    """The i-th call's photo and targets (40 distinct calls, repeated)."""
    return PHOTOS[i % 8], [i % 10, (3 * i + 1) % 10]


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path),
                           "--disable-hot-restart", "--log-level", "warn"],
                          check=False, capture_output=True, text=True, timeout=60)


# --- deploy/envoy ---------------------------------------------------------------------------
def test_committed_envoy_config_is_the_rendered_one_and_envoy_accepts_it(capsys):
    assert envoy.main(EXAMPLE_REPLICAS) == 0
    assert capsys.readouterr().out == DEPLOYED.read_text(), \
        "deploy/envoy/envoy.json is stale: render it again (deploy/envoy/README.md)"
    checked = _validate(DEPLOYED)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "OK" in checked.stdout


def test_envoy_config_has_what_the_replicas_need(tmp_path):
    config = envoy.bootstrap(["10.0.0.5:50051", "camserve-1.internal:50051"], listen_port=0,
                             admin_port=0, num_retries=3)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["type"] == "STRICT_DNS"  # a name among the addresses
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    options = cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in next(iter(options.values()))["explicit_http_config"]
    manager = (config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
               ["typed_config"])
    host = manager["route_config"]["virtual_hosts"][0]
    assert host["request_body_buffer_limit"] > envoy.MAX_MESSAGE_BYTES
    route = host["routes"][0]["route"]
    assert route["timeout"] == "0s"
    assert "max_stream_duration" not in route  # the caller's deadline, enforced end to end
    retry = route["retry_policy"]
    assert {"unavailable", "connect-failure", "reset"} <= set(retry["retry_on"].split(","))
    # refused for size or load: back to the caller, never a retry racing the request body
    assert "resource-exhausted" not in retry["retry_on"]
    assert retry["num_retries"] == 3
    assert retry["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    path = tmp_path / "envoy.json"
    path.write_text(envoy.render(config))
    checked = _validate(path)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert envoy.bootstrap(EXAMPLE_REPLICAS)["static_resources"]["clusters"][0]["type"] \
        == "STATIC"
    with pytest.raises(CamserveError, match="HOST:PORT"):
        envoy.bootstrap(["127.0.0.1"])


def _endpoints(config: dict) -> list[dict]:
    assignment = config["static_resources"]["clusters"][0]["load_assignment"]
    return [e["endpoint"] for e in assignment["endpoints"][0]["lb_endpoints"]]


def test_envoy_checks_health_where_the_replicas_answer_it(capsys):
    endpoints = _endpoints
    plain = envoy.bootstrap(EXAMPLE_REPLICAS)
    assert all("health_check_config" not in e for e in endpoints(plain))
    assert envoy.main([*EXAMPLE_REPLICAS, "--health-port", "50060"]) == 0
    rendered = json.loads(capsys.readouterr().out)
    assert [e["health_check_config"]["port_value"] for e in endpoints(rendered)] == [50060] * 3
    with pytest.raises(CamserveError, match="one health port"):
        envoy.bootstrap(EXAMPLE_REPLICAS, health_ports=[50060])


# --- three replicas under load --------------------------------------------------------------
def _replica(models_dir: Path, **changes) -> ServerConfig:
    """The replicas' options in these tests: one CPU thread each, model "tiny"."""
    return ServerConfig(models=models_dir, device="cpu", intra_op_threads=1,
                        default_model="tiny", grace_seconds=2).with_(**changes)


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory):
    output = (tmp_path_factory.mktemp("cluster") / "children.log").open("w")
    running = start_cluster(ClusterConfig(
        _replica(models_dir, grace_seconds=5), replicas=3, port=0, start_timeout_s=120,
        output=output))
    yield running
    running.stop()
    output.close()


def _no_client_retries(monkeypatch) -> None:
    """The SDK retries UNAVAILABLE on its own; without that every failure Envoy lets through
    reaches the test."""
    options = [o for o in sdk.CHANNEL_OPTIONS
               if o[0] not in ("grpc.enable_retries", "grpc.service_config")]
    monkeypatch.setattr(sdk, "CHANNEL_OPTIONS", [*options, ("grpc.enable_retries", 0)])


def _rq_total(cluster) -> dict[str, int]:
    return {address: stats["rq_total"] for address, stats in cluster.host_stats().items()}


def _envoy_counter(cluster, name: str) -> int:
    for line in cluster.admin(f"/stats?filter=^{re.escape(name)}$").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def test_three_replicas_share_the_load_and_a_sigterm_costs_no_call(cluster, server,
                                                                   monkeypatch, caplog):
    caplog.set_level("INFO", logger="camserve.cluster")
    _no_client_retries(monkeypatch)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as single:  # one server, no Envoy
        expected = {i: single.explain(work(i)[0], targets=work(i)[1]) for i in range(40)}

    victim = cluster.replicas[1]
    victim_process = victim.process
    before = _rq_total(cluster)
    retries_before = _envoy_counter(cluster, "cluster.camserve.upstream_rq_retry")
    results: dict[int, list] = {}
    failures: list[tuple[int, str]] = []
    lock = threading.Lock()
    counter = iter(range(REQUESTS))
    halfway = threading.Event()
    victim_gone = threading.Event()

    def client_loop() -> None:
        with Client(cluster.address, timeout=30) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if i >= GONE_FROM:  # the last quarter runs without the victim
                    victim_gone.wait(60)
                photo, targets = work(i)
                try:
                    answer = client.explain(photo, targets=targets, request_id=str(i))
                except Exception as exc:  # noqa: BLE001 -- every failure is recorded
                    with lock:
                        failures.append((i, repr(exc)[:300]))
                    continue
                with lock:
                    results[i] = answer
                    if len(results) + len(failures) >= SIGNAL_AT:
                        halfway.set()

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    assert halfway.wait(120), "the load did not get halfway"
    signalled_after = len(results) + len(failures)
    victim_process.send_signal(signal.SIGTERM)
    victim_code = victim_process.wait(30)  # it drains, closes and exits
    gone_after = len(results) + len(failures)
    victim_gone.set()
    for thread in threads:
        thread.join(180)
    took = time.monotonic() - started
    after = _rq_total(cluster)
    retries = _envoy_counter(cluster, "cluster.camserve.upstream_rq_retry") - retries_before

    assert not failures, failures[:5]
    assert len(results) == REQUESTS
    for i, answer in results.items():
        reference = expected[i % 40]
        assert [e.class_index for e in answer] == [e.class_index for e in reference]
        assert [e.label for e in answer] == [e.label for e in reference]
        np.testing.assert_allclose([e.probability for e in answer],
                                   [e.probability for e in reference], rtol=1e-4, atol=1e-6)
        for got, want in zip(answer, reference):
            # float16 maps on the wire: one unit in the last place is ~5e-4 near 1
            np.testing.assert_allclose(got.cam_input, want.cam_input, atol=2e-3)
            assert got.request_id == str(i)

    shares = {address: after[address] - before.get(address, 0) for address in after}
    print(f"\ncluster: {REQUESTS} calls from {CLIENTS} clients in {took:.1f} s; upstream "
          f"attempts per replica {shares}; Envoy retries {retries}; SIGTERM after "
          f"{signalled_after} calls, the replica gone after {gone_after}")
    assert set(shares) == {r.address for r in cluster.replicas}
    assert all(share >= REQUESTS // 20 for share in shares.values()), shares

    # the replica drained and exited 0; the supervisor started it again on its port
    assert victim_code == 0
    deadline = time.monotonic() + 60
    while not (victim.restarts >= 1 and victim.alive() and victim.ready.is_set()
               and cluster.host_stats()[victim.address]["healthy"]):
        assert time.monotonic() < deadline, "the replica was not restarted"
        time.sleep(0.2)
    assert victim.pid != victim_process.pid
    assert any("replica 1" in r.getMessage() and "restarting it in" in r.getMessage()
               for r in caplog.records)
    with Client(cluster.address, timeout=30) as client:
        assert client.explain(PHOTOS[0], targets=[3])[0].class_index == 3


STREAMS = 24  # streams reaching their deadline at once through Envoy
STREAM_DEADLINE_S = 0.6


def test_streams_reaching_their_deadline_end_deadline_exceeded(cluster):
    """A stream whose deadline passes while frames flow ends DEADLINE_EXCEEDED through Envoy.
    Seen failing before the fix: Envoy enforced the caller's grpc-timeout itself
    (``max_stream_duration``) and, the response headers being sent, reset the stream, which
    the caller saw as INTERNAL (RST_STREAM) in about 1 stream of 30 under load."""
    request = pb.ExplainRequest(encoded=PHOTOS[0], classes=[1],
                                stream=pb.StreamOptions(latest_frame_wins=True))
    busy = threading.Event()
    codes: list[str] = []
    lock = threading.Lock()

    def frames():
        while not busy.is_set():
            yield request
            time.sleep(0.005)

    def stream(stub: pb_grpc.ExplainerStub) -> None:
        try:
            for _ in stub.ExplainStream(frames(), timeout=STREAM_DEADLINE_S):
                pass
            code = "OK"
        except grpc.RpcError as exc:
            code = f"{exc.code().name}: {exc.details()}"
        with lock:
            codes.append(code)

    with grpc.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        threads = [threading.Thread(target=stream, args=(stub,)) for _ in range(STREAMS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        busy.set()
    assert len(codes) == STREAMS
    assert all(code.startswith("DEADLINE_EXCEEDED") for code in codes), codes


def test_messages_up_to_the_servers_limit_pass_and_larger_ones_are_refused_once(cluster):
    noise = np.random.default_rng(9).integers(0, 256, (2250, 2200, 3), dtype=np.uint8)
    large = cv2.imencode(".png", noise)[1].tobytes()
    assert 14 * 2**20 < len(large) < envoy.MAX_MESSAGE_BYTES
    retried = _envoy_counter(cluster, "cluster.camserve.upstream_rq_retry")
    oversize = b"\xff\xd8" + bytes(envoy.MAX_MESSAGE_BYTES + 2**20)
    with Client(cluster.address, timeout=60) as client:
        assert client.explain(large, targets=[4])[0].class_index == 4
        for _ in range(3):  # the refusal races the body: each time RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as caught:
                client.explain(oversize, targets=[4])
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, \
                caught.value.details()
            assert "larger than max" in caught.value.details()
    # refused once by the replica that got it, not tried on every replica
    assert _envoy_counter(cluster, "cluster.camserve.upstream_rq_retry") == retried


class DyingReplica:
    """A fault, not a replica: a port that takes a connection, reads its first bytes and
    resets it, as a replica SIGKILLed while a request body arrives looks to Envoy."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._die, args=(conn,), daemon=True).start()

    @staticmethod
    def _die(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            time.sleep(0.2)  # Envoy is streaming the body meanwhile
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_body_over_the_retry_buffer_on_a_dying_replica_is_resource_exhausted(tmp_path):
    # Envoy retries the reset but cannot keep a body over its buffer: without the rendered
    # local_reply_config it answered UNKNOWN ("exceeded request buffer limit while retrying
    # upstream"), which the soak met when a replica was SIGKILLed under an oversize message
    faults = [DyingReplica() for _ in range(3)]
    config = envoy.bootstrap([f.address for f in faults], listen_port=0, admin_port=0)
    # no health checks: replicas that die on every call would never be sent one
    config["static_resources"]["clusters"][0].pop("health_checks")
    path = tmp_path / "envoy.json"
    path.write_text(envoy.render(config))
    admin_file = tmp_path / "admin-address"
    proxy = subprocess.Popen([str(ENVOY), "-c", str(path), "--admin-address-path",
                              str(admin_file), "--disable-hot-restart", "--log-level", "error"])
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline and proxy.poll() is None:
            time.sleep(0.1)
            admin = admin_file.read_text().strip() if admin_file.exists() else ""
            port = probes.listener_port(admin) if admin else None
        assert port, "Envoy did not start"
        oversize = pb.ExplainRequest(encoded=bytes(envoy.MAX_MESSAGE_BYTES + 2**20))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            explain = pb_grpc.ExplainerStub(channel).Explain
            codes = []
            for _ in range(4):
                with pytest.raises(grpc.RpcError) as caught:
                    explain(oversize, timeout=30)
                codes.append((caught.value.code(), caught.value.details()))
    finally:
        proxy.terminate()
        proxy.wait(30)
        for fault in faults:
            fault.sock.close()
    # each call either met the full buffer (RESOURCE_EXHAUSTED, saying what to do) or the
    # reset of its last try before the buffer filled (UNAVAILABLE, retryable); never UNKNOWN
    assert all(code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
               for code, _ in codes), codes
    exhausted = [details for code, details in codes
                 if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert exhausted, codes  # the 507 path was taken
    assert all("16 MiB limit" in details for details in exhausted), exhausted


# --- overload ---------------------------------------------------------------------------------
def test_saturated_replicas_shed_load_but_stay_healthy(models_dir, tmp_path, monkeypatch):
    """Replicas with one call slot each, 24 clients: the excess is refused with
    RESOURCE_EXHAUSTED, but Envoy checks health on the replicas' health-only ports, which
    answer under any load, so it never takes a saturated replica out (on the main port the
    health checks were refused too, and every replica went unhealthy at once)."""
    _no_client_retries(monkeypatch)
    with (tmp_path / "children.log").open("w") as output:
        running = start_cluster(ClusterConfig(
            _replica(models_dir, workers=1, max_queue=1), replicas=2, port=0,
            output=output))
        try:
            assert all(r.health_port not in (0, r.port) for r in running.replicas)
            codes: dict[str, int] = {}
            unhealthy: list[dict] = []
            lock = threading.Lock()
            stop = time.monotonic() + 6

            def client_loop() -> None:
                with Client(running.address, timeout=30) as client:
                    while time.monotonic() < stop:
                        try:
                            client.explain(PHOTOS[1], targets=[2], noise_samples=16)
                            code = "OK"
                        except grpc.RpcError as exc:
                            code = exc.code().name
                        with lock:
                            codes[code] = codes.get(code, 0) + 1

            threads = [threading.Thread(target=client_loop) for _ in range(24)]
            for thread in threads:
                thread.start()
            while time.monotonic() < stop:
                health = {a: s["healthy"] for a, s in running.host_stats().items()}
                if not all(health.values()):
                    unhealthy.append(health)
                time.sleep(0.25)
            for thread in threads:
                thread.join(60)
        finally:
            running.stop()
    print(f"\noverload: outcomes {codes}")
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert not unhealthy, unhealthy[:3]


# --- TLS at the cluster's address -------------------------------------------------------------
def test_rendered_tls_listener_is_valid_envoy(pki, tmp_path, capsys):
    argv = [*EXAMPLE_REPLICAS, "--tls-cert", str(pki["server_cert"]), "--tls-key",
            str(pki["server_key"]), "--tls-client-ca", str(pki["ca"])]
    assert envoy.main(argv) == 0
    rendered = capsys.readouterr().out
    socket_ = json.loads(rendered)["static_resources"]["listeners"][0]["filter_chains"][0][
        "transport_socket"]
    assert socket_["typed_config"]["require_client_certificate"] is True
    path = tmp_path / "tls.json"
    path.write_text(rendered)
    result = _validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert envoy.main([*EXAMPLE_REPLICAS, "--tls-key", str(pki["server_key"])]) == 2
    assert "TLS needs both" in capsys.readouterr().err


def _list_models(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with (grpc.secure_channel(address, credentials) if credentials
          else grpc.insecure_channel(address)) as channel:
        try:
            channel.unary_unary("/camserve.v1.Explainer/ListModels")(b"", timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def test_cluster_serves_mutual_tls_only(models_dir, pki, tmp_path):
    """--tls-cert/--tls-key/--tls-client-ca: Envoy's listener speaks mutual TLS only; the
    replicas behind it stay on loopback."""
    with (tmp_path / "children.log").open("w") as output:
        running = start_cluster(ClusterConfig(
            _replica(models_dir), replicas=1, port=0, output=output,
            tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]))
        try:
            ca = pki["ca"].read_bytes()
            client_cert = grpc.ssl_channel_credentials(
                ca, pki["client_key"].read_bytes(), pki["client_cert"].read_bytes())
            with Client(running.address, credentials=client_cert, timeout=30) as client:
                assert client.explain(PHOTOS[0], targets=[3])[0].class_index == 3
            assert _list_models(running.address, client_cert) == grpc.StatusCode.OK
            no_cert = grpc.ssl_channel_credentials(ca)
            assert _list_models(running.address, no_cert) == grpc.StatusCode.UNAVAILABLE
            assert _list_models(running.address, None) == grpc.StatusCode.UNAVAILABLE
        finally:
            running.stop()


# --- the command ----------------------------------------------------------------------------
def test_cluster_command_prints_its_address_and_exits_0_on_sigterm(models_dir, tmp_path):
    log = tmp_path / "cluster.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "camserve", "cluster", "--replicas", "2", "--models",
             str(models_dir), "--port", "0", "--device", "cpu", "--intra-op-threads", "1",
             "--grace-seconds", "2"],
            stdout=subprocess.PIPE, stderr=err, text=True)
    children: list[psutil.Process] = []
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        line = process.stdout.readline() if ready else ""
        found = re.fullmatch(r"camserve cluster: serving on 127\.0\.0\.1:(\d+) \(2 replicas\)\n",
                             line)
        assert found, (line, log.read_text()[-3000:])
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) == 3  # two replicas and Envoy
        with Client(f"127.0.0.1:{found.group(1)}", timeout=30) as client:
            assert client.health() == "SERVING"
            assert client.explain(PHOTOS[1], targets=[7])[0].class_index == 7

        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
        assert process.stdout.read() == ""  # the address was the only line
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
        text = log.read_text()
        assert "SIGTERM: stopping the cluster" in text and "cluster stopped" in text
        assert "Traceback" not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        for child in children:
            if child.is_running():
                child.kill()
        process.stdout.close()


@pytest.fixture
def busy_port():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--models", "{empty}"], "no explainer graph (*.onnx) in"),
    (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy} for Envoy"),
    (["--envoy", "{empty}/envoy"], "no executable Envoy binary at"),
    (["--host", "example.com"], "is not an IP address"),
    (["--tls-cert", "{empty}"], "TLS needs both --tls-cert and --tls-key"),
    (["--tls-cert", "{empty}/none.crt", "--tls-key", "{empty}/none.key"],
     "--tls-cert '{empty}/none.crt' is not a readable file"),
])
def test_cluster_errors_are_one_readable_line(flags, message, models_dir, tmp_path, busy_port,
                                              capsys):
    fill = {"empty": str(tmp_path), "busy": str(busy_port)}
    argv = ["cluster", "--models", str(models_dir), "--port", "0",
            *[flag.format(**fill) for flag in flags]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("camserve cluster: error: ") and "\n" not in err, err
    assert message.format(**fill) in err


def test_a_replica_that_cannot_start_is_a_readable_error(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    started = time.monotonic()
    with pytest.raises(CamserveError, match=r"replica 0 did not start: .*no explainer graph"):
        start_cluster(ClusterConfig(ServerConfig(models=tmp_path, device="cpu"), replicas=1,
                                    port=0, output=(tmp_path / "out.log").open("w")))
    assert time.monotonic() - started < 60


def test_replica_command_lines_are_the_serve_config_rendered(models_dir):
    """camserve cluster's replica flags fill a ServerConfig template; each replica's command
    line is that config with the ports the supervisor chose (config.to_argv), and camserve
    serve reads it back as the same config."""
    from camserve.cli import build_parser
    from camserve.server import config as serve_config
    from camserve.server.cluster.children import Replica
    from camserve.server.cluster.cli import config_from
    from camserve.server.cluster.options import replica_configs
    from camserve.server.lifecycle import physical_memory

    args = build_parser().parse_args([
        "cluster", "--models", str(models_dir), "--replicas", "2", "--device", "cpu",
        "--no-batching", "--workers", "3", "--grace-seconds", "4", "--metrics-port-base",
        "19100", "--port", "0", "--tls-cert", "c.pem", "--tls-key", "k.pem"])
    config = config_from(args)
    assert config.replica == ServerConfig(models=models_dir, device="cpu", batching=False,
                                          workers=3, grace_seconds=4.0)
    assert config.tls_cert == Path("c.pem") and config.replica.tls_cert is None
    replicas = [Replica(i, c, None) for i, c in enumerate(replica_configs(config))]
    ports = [p for r in replicas for p in (r.port, r.health_port)]
    assert len(set(ports)) == 4 and 0 not in ports
    assert [r.metrics_port for r in replicas] == [19100, 19101]
    for replica in replicas:
        argv = replica.argv()
        assert argv[1:4] == ["-m", "camserve", "serve"]
        served = serve_config.from_args(build_parser().parse_args(argv[3:]))
        # without --max-inflight-mb, each replica's memory budget is its share of a quarter
        # of the host's memory
        share = replica.config.max_inflight_mb
        assert share and abs(share - physical_memory() / 4 / 2 / 2**20) < 1
        assert served == replica.config == config.replica.with_(
            host="127.0.0.1", port=replica.port, health_port=replica.health_port,
            metrics_port=replica.metrics_port, max_inflight_mb=share,
            drain_seconds=REPLICA_DRAIN_S)  # Envoy takes a stopping replica out first


def test_restart_delay_doubles_while_a_child_keeps_failing():
    child = Child("x", sink=None)
    delays = [child.schedule_restart(now=float(t)) for t in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    child._started = 100.0  # ran long enough before its next exit: a new series starts
    assert child.schedule_restart(now=100.0 + 60) == 0.5


def test_host_stats_come_from_envoys_clusters_json():
    from camserve.server.cluster.probes import parse_host_stats

    sample = {"cluster_statuses": [{"name": "camserve", "host_statuses": [
        {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
         "stats": [{"name": "rq_total", "value": "7"}, {"name": "rq_error"}],
         "health_status": {"eds_health_status": "HEALTHY"}},
        {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 2}},
         "stats": [{"name": "rq_total"}],
         "health_status": {"eds_health_status": "HEALTHY", "failed_active_health_check": True}},
    ]}]}
    stats = parse_host_stats(json.loads(json.dumps(sample)))
    assert stats == {"127.0.0.1:1": {"rq_total": 7, "rq_error": 0, "healthy": True},
                     "127.0.0.1:2": {"rq_total": 0, "healthy": False}}
