"""A cluster's record of its children, so that a restarted cluster never finds its ports
taken by its own old children.

The children die with their supervisor (``children.orphan_guard``), but a replica that gets
the parent-death SIGTERM may still be finishing a call when a process manager starts the
cluster again at once on the same fixed ports. A cluster with a fixed Envoy port (or
metrics ports) writes its pid and its children's pids, each with its start time (so a
reused pid is never mistaken for one of them), to a file named after that port in the
temporary folder; the next cluster on that port kills the ones still alive, provided the
supervisor that started them is gone, before it checks its ports. Linux only (start times
from /proc); elsewhere nothing is recorded.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path

log = logging.getLogger("camserve.cluster")

REAP_WAIT_S = 5.0  # how long killed leftovers get to release their ports


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), None
    when it does not exist (or is a zombie, which holds no port)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return fields[19]


def record_path(host: str, port: int, metrics_port_base: int | None) -> Path | None:
    """Where a cluster with these fixed ports records its children (None: no fixed port,
    or not Linux)."""
    if not Path("/proc/self/stat").exists() or (not port and metrics_port_base is None):
        return None
    key = f"{host}-{port}" if port else f"metrics-{metrics_port_base}"
    return Path(tempfile.gettempdir()) / f"camserve-cluster-{os.getuid()}-{key}.pids"


def write(path: Path | None, children: list[int | None]) -> None:
    """Record this process and ``children`` (pids) in ``path``."""
    if path is None:
        return
    lines = []
    for pid in [os.getpid(), *children]:
        started = _start_time(pid) if pid else None
        if started is not None:
            lines.append(f"{pid} {started}")
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_text("\n".join(lines) + "\n")
        temporary.replace(path)
    except OSError as exc:
        log.warning("cannot record the cluster's children in %s: %s", path, exc)


def remove(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def reap(path: Path | None) -> list[int]:
    """Kill the children recorded in ``path`` that are still alive when the supervisor that
    recorded them is gone; returns their pids (waits up to REAP_WAIT_S for them to go)."""
    if path is None:
        return []
    try:
        entries = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []
    alive = [(int(pid), started) for pid, started in entries
             if _start_time(int(pid)) == started]
    if not entries or not alive:
        remove(path)
        return []
    supervisor = int(entries[0][0])
    if alive[0][0] == supervisor:  # that cluster still runs: its ports are its own
        return []
    pids = [pid for pid, _ in alive]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + REAP_WAIT_S
    while time.monotonic() < deadline and any(_start_time(pid) for pid in pids):
        time.sleep(0.05)
    log.warning("killed %d child(ren) left by a previous cluster on these ports: pid(s) %s",
                len(pids), ", ".join(map(str, pids)))
    remove(path)
    return pids
