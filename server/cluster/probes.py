"""What the supervisor asks its children: grpc.health.v1 ``Check`` (a replica's health-only
port, or Envoy's listener) and Envoy's admin interface (``/ready``, ``/listeners``,
``/clusters``). Plain gRPC and urllib: the server imports no client code.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from camserve.server.cluster import envoy as envoy_config

POLL_S = 0.1  # between two attempts while waiting


def health_status(address: str, timeout: float = 2.0) -> str | None:
    """The grpc.health.v1 status of the whole server (service "") at ``address``, plaintext:
    "SERVING", "NOT_SERVING"...; None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def wait_serving(address: str, deadline: float, alive: Callable[[], bool]) -> bool:
    """Check ``address`` until it answers SERVING (True), or the monotonic ``deadline``
    passes or ``alive()`` turns False first (False)."""
    while alive():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if health_status(address, timeout=min(2.0, remaining)) == "SERVING":
            return True
        time.sleep(POLL_S)
    return False


def admin_request(admin: str, path: str, post: bool = False, timeout: float = 5.0) -> str:
    """GET (or POST) ``path`` on Envoy's admin interface at ``admin`` ("127.0.0.1:PORT");
    OSError when it is not up (urllib's HTTPError for an error status)."""
    request = urllib.request.Request(f"http://{admin}{path}", method="POST" if post else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def envoy_ready(admin: str) -> bool:
    """Envoy is initialised: its admin ``/ready`` says LIVE (503 while initialising)."""
    try:
        return admin_request(admin, "/ready", timeout=2).strip() == "LIVE"
    except (OSError, urllib.error.HTTPError):
        return False


def listener_port(admin: str) -> int | None:
    """The port Envoy's gRPC listener is bound to (None when it reports none)."""
    listeners = json.loads(admin_request(admin, "/listeners?format=json"))
    for status in listeners.get("listener_statuses", []):
        port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
        if port:
            return int(port)
    return None


def host_stats(admin: str, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """Envoy's view of each replica by address (``parse_host_stats``)."""
    return parse_host_stats(json.loads(admin_request(admin, "/clusters?format=json",
                                                     timeout=timeout)))


def parse_host_stats(clusters: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-host counters (rq_total, rq_success, rq_error, cx_active...) and ``healthy`` of the
    camserve cluster in Envoy's /clusters JSON."""
    out: dict[str, dict[str, Any]] = {}
    for status in clusters.get("cluster_statuses", []):
        if status.get("name") != envoy_config.CLUSTER:
            continue
        for host in status.get("host_statuses", []):
            where = host["address"]["socket_address"]
            stats: dict[str, Any] = {s["name"]: int(s.get("value", 0))
                                     for s in host.get("stats", [])}
            health = host.get("health_status", {})
            failed = [k for k, v in health.items() if k.startswith("failed") and v is True]
            stats["healthy"] = health.get("eds_health_status") == "HEALTHY" and not failed
            out[f"{where['address']}:{where['port_value']}"] = stats
    return out
