"""No orphans: a cluster's replicas and Envoy die with it however it dies (SIGKILL included),
and a cluster started again at once on the same ports finds them free."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from camserve.client import Client
from camserve.errors import CamserveError
from camserve.server.cluster import leftovers
from camserve.server.cluster.children import ORPHAN_EXIT_CODE, orphan_guard, popen
from camserve.server.cluster.options import find_envoy, free_ports

try:
    ENVOY = find_envoy()
except CamserveError:
    ENVOY = None

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="prctl(PR_SET_PDEATHSIG) is Linux's")]



def _photo() -> bytes:
    import cv2
    import numpy as np
    image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(process: psutil.Process) -> set[int]:
    return {c.laddr.port for c in process.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def _start(models_dir, port: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "camserve", "cluster", "--replicas", "2", "--models",
         str(models_dir), "--port", str(port), "--device", "cpu", "--intra-op-threads", "1",
         "--grace-seconds", "30"],
        stdout=subprocess.PIPE, stderr=log, text=True)


def _address(process: subprocess.Popen, log_path) -> str:
    ready, _, _ = select.select([process.stdout], [], [], 120)
    line = process.stdout.readline() if ready else ""
    found = re.fullmatch(r"camserve cluster: serving on (127\.0\.0\.1:\d+) \(2 replicas\)\n",
                         line)
    assert found, (line, log_path.read_text()[-3000:])
    return found.group(1)


@pytest.mark.skipif(ENVOY is None, reason="no Envoy binary (camserve[cluster])")
def test_sigkilled_cluster_leaves_no_child_and_no_port_and_restarts_at_once(models_dir,
                                                                            tmp_path):
    port = free_ports(1)[0]
    log_path = tmp_path / "cluster.log"
    photo = _photo()
    processes: list[subprocess.Popen] = []
    children: list[psutil.Process] = []
    try:
        with log_path.open("w") as log:
            first = _start(models_dir, port, log)
        processes.append(first)
        address = _address(first, log_path)
        children = psutil.Process(first.pid).children(recursive=True)
        assert len(children) == 3  # two replicas and Envoy
        ports = set().union(*(_listening(child) for child in children))
        assert port in ports and len(ports) >= 6  # Envoy + admin, 2 x (gRPC + health)
        with Client(address, timeout=30) as client:
            for i in range(4):
                assert client.explain(photo, targets=[i])[0].class_index == i

        killed = time.monotonic()
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        while time.monotonic() - killed < 5.0 and not all(_gone(c) for c in children):
            time.sleep(0.02)
        took = time.monotonic() - killed
        assert all(_gone(c) for c in children), \
            [c.pid for c in children if not _gone(c)]
        print(f"children gone {took:.2f} s after the supervisor's SIGKILL")
        busy = [p for p in sorted(ports) if not _bindable(p)]
        assert not busy, f"ports still taken after {took:.2f} s: {busy}"

        # a cluster started again at once on the same port comes up
        with log_path.open("a") as log:
            second = _start(models_dir, port, log)
        processes.append(second)
        assert _address(second, log_path) == address
        with Client(address, timeout=30) as client:
            assert client.explain(photo, targets=[5])[0].class_index == 5
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log_path.read_text()[-3000:]
        assert not leftovers.record_path("127.0.0.1", port, None).exists()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            process.stdout.close()
        for child in children:
            if not _gone(child):
                child.kill()


def test_a_child_whose_parent_died_before_prctl_exits_at_once():
    guard = orphan_guard(os.getpid() + 999_999)  # "the parent" is some other process
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             preexec_fn=guard)  # noqa: PLW1509
    assert child.wait(10) == ORPHAN_EXIT_CODE


def test_children_outlive_the_thread_that_asked_for_them():
    """The parent-death signal follows the forking thread: children are forked by a thread
    that lives as long as the process, so one started from a short-lived thread lives on."""
    started: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: started.append(
        popen([sys.executable, "-c", "import time; time.sleep(30)"])))
    thread.start()
    thread.join()
    try:
        time.sleep(0.5)
        assert started[0].poll() is None
    finally:
        started[0].kill()
        started[0].wait(10)


def test_leftovers_of_a_dead_cluster_are_killed_and_a_live_clusters_are_not(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(leftovers.tempfile, "gettempdir", lambda: str(tmp_path))
    record = leftovers.record_path("127.0.0.1", 1, None)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor = subprocess.Popen(sleeper)
    orphan = subprocess.Popen(sleeper)
    try:
        # as written by `supervisor`: its pid first, then its children's
        stamp = {p.pid: leftovers._start_time(p.pid) for p in (supervisor, orphan)}
        record.write_text("".join(f"{pid} {t}\n" for pid, t in stamp.items()))
        assert leftovers.reap(record) == []  # its supervisor still runs
        assert orphan.poll() is None and record.exists()
        supervisor.kill()
        supervisor.wait(10)
        assert leftovers.reap(record) == [orphan.pid]
        assert orphan.wait(10) == -signal.SIGKILL
        assert not record.exists()
    finally:
        for process in (supervisor, orphan):
            if process.poll() is None:
                process.kill()
                process.wait(10)
