"""Ports are exclusive: a second server on a busy gRPC, health or metrics port fails with one
``PortError`` line naming the port (gRPC's default SO_REUSEPORT would let it share the port
silently), and ``camserve serve`` says so in one line with exit status 2. Also: reflection
answers under grpc.reflection.v1 as well as v1alpha."""

from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import pytest
from conftest import ROOT
from grpc_reflection.v1alpha import reflection_pb2

from camserve.server.app import PortError, start
from camserve.server.config import ServerConfig


def _config(models_dir, **overrides) -> ServerConfig:
    return ServerConfig(models=models_dir, device="cpu", intra_op_threads=1,
                        default_model="tiny", **{"port": 0, **overrides})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line(message: str, port: int) -> None:
    assert "\n" not in message
    assert str(port) in message


def test_second_server_on_the_main_port_fails(models_dir, server):
    with pytest.raises(PortError) as err:
        start(_config(models_dir, port=server.port))
    _one_line(str(err.value), server.port)


def test_second_server_on_the_health_port_fails(models_dir):
    first = start(_config(models_dir, health_port=0))
    try:
        with pytest.raises(PortError) as err:
            start(_config(models_dir, health_port=first.health_port))
        _one_line(str(err.value), first.health_port)
        assert "health" in str(err.value)
    finally:
        first.stop(grace=0)


def test_second_server_on_the_metrics_port_fails(models_dir):
    first = start(_config(models_dir, metrics_port=0))
    try:
        with pytest.raises(PortError) as err:
            start(_config(models_dir, metrics_port=first.metrics_port))
        _one_line(str(err.value), first.metrics_port)
        assert "metrics" in str(err.value)
    finally:
        first.stop(grace=0)


def test_a_failed_start_releases_its_ports(models_dir):
    """The main port binds, then the busy metrics port fails: the main and health ports
    are free again for the next try."""
    port, health_port = _free_port(), _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(PortError):
            start(_config(models_dir, port=port, health_port=health_port,
                          metrics_port=busy.getsockname()[1]))
    again = start(_config(models_dir, port=port, health_port=health_port))
    again.stop(grace=0)


@pytest.mark.parametrize("flag", ["--port", "--health-port", "--metrics-port"])
def test_serve_cli_refuses_a_busy_port_in_one_line(models_dir, flag):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--models", str(models_dir), "--device", "cpu",
                "--default-model", "tiny"]
        argv += ["--port", "0", flag, str(port)] if flag != "--port" else [flag, str(port)]
        done = subprocess.run([sys.executable, "-m", "camserve", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    # gRPC's own log line ("add_port.cc ... Address already in use") may precede ours
    errors = [line for line in done.stderr.splitlines() if "camserve serve: error" in line]
    assert len(errors) == 1 and done.stderr.splitlines()[-1] == errors[0], done.stderr
    assert errors[0].startswith("camserve serve: error: ") and str(port) in errors[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection",
                                     "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha_list_services(server, service):
    # grpcio-reflection ships v1alpha stubs only; v1 has the same messages and field
    # numbers, so v1alpha's classes speak it
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        answers = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                            timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"camserve.v1.Explainer", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
