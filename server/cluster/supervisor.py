"""Start, supervise and stop a cluster: ``start_cluster`` -> ``RunningCluster``.

``start_cluster`` chooses each replica's loopback ports, starts the replicas
(``python -m camserve serve``, all at once), waits until each one's health port answers
SERVING, writes Envoy's configuration (``camserve.server.cluster.envoy``) into a temporary
folder, starts Envoy on the cluster's port and waits until a health call through Envoy is
answered SERVING. From then on a supervisor thread restarts a replica, or Envoy, that exits:
on the same ports, after a delay that doubles while it keeps failing.
``RunningCluster.rolling_restart`` (SIGHUP to ``camserve cluster``) replaces the replicas one
at a time, so that new processes read the models folder (a new model version) while the
others serve.
``RunningCluster.stop`` closes Envoy's listener to new connections, sends SIGTERM to the
replicas (they finish the calls in flight within their grace period and exit) and then
stops Envoy.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camserve.errors import OperatorError
from camserve.server.cluster import envoy as envoy_config
from camserve.server.cluster import leftovers, probes
from camserve.server.cluster.children import (
    Child,
    EnvoyProcess,
    Replica,
    Sink,
    describe_exit,
)
from camserve.server.cluster.options import ClusterConfig, check, replica_configs

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("camserve.cluster")

EXIT_MARGIN_S = 15.0  # after its grace period, how long a replica may take to exit
ENVOY_STOP_S = 10.0
RESTARTED_CHECK_S = 0.2  # the supervisor's health check of a restarted replica


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
        self._rolling = threading.Lock()  # one rolling restart at a time
        # held while a child is spawned or handed to a rolling restart: once ``stop`` has set
        # ``_stopping`` under it, nothing starts a child any more
        self._children = threading.Lock()
        # the children's pids, for the next cluster on these ports (``leftovers``)
        self.record = leftovers.record_path(config.host, config.port, config.metrics_port_base)
        self.record_children()

    def record_children(self) -> None:
        leftovers.write(self.record, [child.pid for child in [*self.replicas, self.envoy]])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def admin_address(self) -> str:
        return self.envoy.admin_address() or ""

    # --- Envoy's admin interface ------------------------------------------------------------
    def admin(self, path: str, post: bool = False, timeout: float = 5.0) -> str:
        """GET (or POST) ``path`` on Envoy's admin interface; OSError when it is not up."""
        return probes.admin_request(self.admin_address, path, post, timeout)

    def host_stats(self) -> dict[str, dict[str, Any]]:
        """Envoy's view of each replica by address: its counters (rq_total, rq_success,
        rq_error, cx_active...) and ``healthy``."""
        return probes.host_stats(self.admin_address)

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
                    with self._children:
                        self._look_after(child)
                except OSError as exc:  # e.g. out of processes: try again on the next round
                    log.error("could not restart %s: %s", child.name, exc)
                except Exception:  # the supervisor must outlive any one failure
                    log.exception("supervising %s failed", child.name)

    def _look_after(self, child: Child) -> None:
        if isinstance(child, Replica) and child.replacing:
            return  # ``rolling_restart`` stops and starts it
        code = child.process.poll() if child.process is not None else None
        if code is None:
            if isinstance(child, Replica) and child.restarts and not child.ready.is_set():
                _note_serving_again(child)
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
            self.record_children()
            log.warning("%s restarted (pid %d, restart %d)", child.name, child.pid,
                        child.restarts)

    # --- rolling restart --------------------------------------------------------------------
    def rolling_restart(self) -> bool:
        """Replace the replicas one at a time, in index order, so that new processes read the
        models folder (a new model version) while the others serve. For each: wait until
        Envoy counts every other replica healthy (never fewer than N-1 serving); SIGTERM it
        (health NOT_SERVING, Envoy retries the calls it refuses on another replica, the calls
        in flight finish within its grace period); start a new process on its ports; wait
        until it answers SERVING and Envoy counts it healthy.

        A new process that exits while starting is started again with the supervisor's
        backoff; the restart stops at a replica that is not back SERVING within the start
        timeout (a broken models folder, say), leaving the others serving the old version and
        that one to the supervisor's restarts. Returns False when one is already under way,
        the cluster is stopping, or a step did not happen within the start timeout; True
        when every replica was replaced."""
        if not self._rolling.acquire(blocking=False):
            log.warning("a rolling restart is already under way")
            return False
        try:
            log.info("rolling restart of %d replica(s)", len(self.replicas))
            for replica in self.replicas:
                if not self._replace(replica):
                    return False
            log.info("rolling restart done: %d replica(s) replaced", len(self.replicas))
            return True
        finally:
            self._rolling.release()

    def _replace(self, replica: Replica) -> bool:
        """Stop ``replica`` gracefully and start it again; True once Envoy counts the new
        process healthy."""
        deadline = time.monotonic() + self.config.start_timeout_s
        others = [r for r in self.replicas if r is not replica]
        if not self._until(lambda: all(self._envoy_counts_healthy(r) for r in others),
                           deadline):
            log.error("rolling restart stopped before replica %d: Envoy does not count the "
                      "other replicas healthy", replica.index)
            return False
        with self._children:
            if self._stopping.is_set():
                return False
            replica.replacing = True  # the supervisor leaves it to us from now on
        try:
            grace = self.config.replica.grace_seconds
            old_pid = replica.pid
            log.info("rolling restart: replica %d (pid %s) finishes its calls (up to %g s)",
                     replica.index, old_pid, grace)
            replica.send(signal.SIGTERM)
            if not replica.wait(grace + EXIT_MARGIN_S):
                log.warning("replica %d (pid %s) did not exit in time; killing it",
                            replica.index, old_pid)
                replica.kill()
            replica.join_output()
            deadline = time.monotonic() + self.config.start_timeout_s
            if not self._start_again(replica, deadline):
                log.error("rolling restart stopped: replica %d did not come back (%s); the "
                          "others keep serving", replica.index, replica.last_words())
                return False
            replica.ready.set()
            if not self._until(lambda: self._envoy_counts_healthy(replica), deadline):
                log.error("rolling restart stopped: Envoy does not count replica %d healthy",
                          replica.index)
                return False
            log.info("rolling restart: replica %d serving again (pid %d)", replica.index,
                     replica.pid)
            return True
        finally:
            replica.replacing = False

    def _start_again(self, replica: Replica, deadline: float) -> bool:
        """Start ``replica``'s new process and wait until it answers SERVING; one that exits
        while starting is started again after the supervisor's backoff, until the monotonic
        ``deadline``. False when it passed, or the cluster stops, first."""
        while True:
            with self._children:
                if self._stopping.is_set():
                    return False
                replica.restart_at = None
                replica.restarts += 1
                replica.spawn()
                self.record_children()
            if probes.wait_serving(replica.health_address, deadline, replica.alive):
                return True
            if replica.alive() or self._stopping.is_set():
                return False  # the deadline passed
            replica.join_output()
            delay = replica.schedule_restart(time.monotonic())
            log.warning("replica %d %s while starting (last output: %s); starting it again "
                        "in %.1f s", replica.index, describe_exit(replica.process.returncode),
                        replica.last_words(), delay)
            if time.monotonic() + delay > deadline or self._stopping.wait(delay):
                return False

    def _until(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Poll ``condition`` until it holds (True), or the monotonic ``deadline`` passes or
        the cluster stops first (False)."""
        while not condition():
            if time.monotonic() > deadline or self._stopping.is_set():
                return False
            time.sleep(probes.POLL_S)
        return True

    def _envoy_counts_healthy(self, replica: Replica) -> bool:
        """Envoy routes calls to ``replica``: its health checks pass and outlier detection
        has not ejected it."""
        try:
            return bool(self.host_stats().get(replica.address, {}).get("healthy"))
        except (OSError, ValueError):  # Envoy restarting: ask again
            return False

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
        with self._children:  # a rolling restart starts no replica from now on
            self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        grace = self.config.replica.grace_seconds
        log.info("stopping %d replica(s); calls in flight get up to %g s to finish",
                 len(self.replicas), grace)
        try:
            self.admin("/drain_listeners", post=True)  # no new connections
        except (OSError, ValueError):  # Envoy is down or restarting: nothing to drain
            pass
        for replica in self.replicas:
            replica.send(signal.SIGTERM)
        deadline = time.monotonic() + grace + EXIT_MARGIN_S
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
        leftovers.remove(self.record)
        log.info("cluster stopped")


def _note_serving_again(replica: Replica) -> None:
    """A restarted replica that answers health SERVING now is ``ready`` again (logged)."""
    if probes.health_status(replica.health_address, RESTARTED_CHECK_S) == "SERVING":
        replica.ready.set()
        log.info("replica %d is serving again on port %d (pid %d, restart %d)",
                 replica.index, replica.port, replica.pid, replica.restarts)


# --- start ---------------------------------------------------------------------------------------
def _await_replica(replica: Replica, deadline: float) -> None:
    """Wait until the replica's health port answers SERVING; OperatorError with its last
    output line when it exits or the deadline passes first."""
    if probes.wait_serving(replica.health_address, deadline, replica.alive):
        replica.ready.set()
        return
    if not replica.alive():
        replica.join_output()
        raise OperatorError(f"replica {replica.index} did not start: {replica.last_words()}")
    raise OperatorError(f"replica {replica.index} did not start within the start timeout; "
                        f"last output: {replica.last_words()}")


def _await_envoy(envoy: EnvoyProcess, deadline: float) -> str:
    """Wait until Envoy is initialised (its admin /ready says LIVE); returns its admin
    address."""
    while True:
        if not envoy.alive():
            envoy.join_output()
            raise OperatorError(f"Envoy did not start: {envoy.last_words()}")
        if time.monotonic() > deadline:
            raise OperatorError(f"Envoy did not become ready in time: {envoy.last_words()}")
        admin = envoy.admin_address()
        if admin and probes.envoy_ready(admin):
            return admin
        time.sleep(probes.POLL_S)


def _await_serving_through(envoy: EnvoyProcess, admin: str, address: str,
                           config: ClusterConfig, deadline: float) -> None:
    """Wait until a health call through Envoy's listener is answered SERVING. With TLS on
    the listener (whose CA this process may not have) Envoy's own view stands in: a replica
    it has found healthy, which is what answers such a call."""
    if config.tls_cert is None:
        if probes.wait_serving(address, deadline, envoy.alive):
            return
        raise OperatorError(f"no health SERVING through Envoy on {address}: "
                            f"{envoy.last_words()}")
    while envoy.alive() and time.monotonic() < deadline:
        try:
            if any(stats["healthy"] for stats in probes.host_stats(admin, 2).values()):
                return
        except (OSError, ValueError):
            pass
        time.sleep(probes.POLL_S)
    raise OperatorError(f"Envoy on {address} found no healthy replica: {envoy.last_words()}")


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
    bootstrap = envoy_config.bootstrap(
        [r.address for r in replicas], listen_host=host, listen_port=port,
        admin_port=admin_port, num_retries=config.num_retries,
        health_ports=[r.health_port for r in replicas], tls=config.listener_tls(),
        max_message_bytes=config.replica.max_message_bytes)
    path.write_text(envoy_config.render(bootstrap))


def _start_children(config: ClusterConfig, host: str, replicas: list[Replica],
                    envoy: EnvoyProcess) -> tuple[str, int, int]:
    """Start the replicas, then Envoy, each once ready; returns the cluster's address and
    Envoy's listener and admin ports."""
    deadline = time.monotonic() + config.start_timeout_s
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
    port = config.port or probes.listener_port(admin)
    if not port:
        raise OperatorError("Envoy reports no bound listener")
    admin_port = int(admin.rsplit(":", 1)[1])
    # a restarted Envoy comes back on the ports this one got
    _write_envoy_config(envoy.config_path, replicas, host, port, admin_port, config)
    address = f"{_client_host(host)}:{port}"
    _await_serving_through(envoy, admin, address, config, deadline)
    log.info("Envoy on %s (pid %d), admin on http://%s/ (loopback only); config %s", address,
             envoy.pid, admin, envoy.config_path)
    return address, port, admin_port


def start_cluster(config: ClusterConfig) -> RunningCluster:
    """Start the replicas and Envoy in front of them; returns once a health call through Envoy
    is answered SERVING. OperatorError (nothing left running) when something cannot start.
    Children a killed cluster left on the same fixed ports are killed first (``leftovers``)."""
    leftovers.reap(leftovers.record_path(config.host, config.port, config.metrics_port_base))
    host, binary = check(config)
    workdir = Path(tempfile.mkdtemp(prefix="camserve-cluster-"))
    sink = Sink(config.output)
    replicas = [Replica(i, replica, sink) for i, replica in enumerate(replica_configs(config))]
    envoy = EnvoyProcess(binary, workdir / "envoy.json", sink)
    try:
        address, port, admin_port = _start_children(config, host, replicas, envoy)
    except BaseException:
        for child in [*replicas, envoy]:
            child.kill()
            child.join_output()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if not ipaddress.ip_address(host).is_loopback and config.tls_cert is None:
        log.warning("Envoy serves plaintext gRPC on %s: anyone on the network can call it; "
                    "consider --tls-cert/--tls-key%s", host,
                    "" if config.replica.auth_token_file else " and --auth-token-file")
    running = RunningCluster(replace(config, port=port, admin_port=admin_port), replicas, envoy,
                             address, workdir)
    running.supervise()
    return running
