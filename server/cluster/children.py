"""The cluster's children: ``camserve serve`` replicas and Envoy, as supervised subprocesses.

A ``Child`` runs in a session of its own (a Ctrl-C in a terminal reaches only the cluster
process, which stops the children in order), forwards its output line by line prefixed with
its name, keeps its last lines (a failed start says why there) and computes its restart
delay, which doubles while it keeps failing.

No orphans: on Linux every child is started with the parent-death signal (``prctl
PR_SET_PDEATHSIG``, SIGTERM), so replicas and Envoy end with the cluster process however it
ends, SIGKILL included. The kernel sends that signal when the *thread* that forked the child
exits, so every child is forked by one daemon thread (``_Spawner``) that lives as long as the
process. ``orphan_guard`` is that preexec function: after prctl it checks that its parent
is still the process that spawned it (the parent may have died before prctl ran) and
exits at once otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TextIO

from camserve.server.config import ServerConfig, to_argv

BACKOFF_FIRST_S = 0.5  # first restart delay; doubles per failure in a row, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a child that ran this long before exiting starts a new series of delays


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
DEATH_SIGNAL = signal.SIGTERM  # what a child gets when the cluster process dies
ORPHAN_EXIT_CODE = 70  # a child whose parent died before it could ask for DEATH_SIGNAL


def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up once here: the preexec function runs between fork and exec


def orphan_guard(parent: int) -> Callable[[], None] | None:
    """The preexec function of a child of process ``parent``: DEATH_SIGNAL when the parent
    dies, and exit at once when it already has (None where prctl does not exist)."""
    if _PRCTL is None:
        return None
    prctl = _PRCTL

    def guard() -> None:
        prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os._exit(ORPHAN_EXIT_CODE)
    return guard


class _Spawner:
    """One daemon thread that forks every child: the parent-death signal fires when the
    thread that forked a child exits, and this one lives as long as the process."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while True:
            job, result = self._jobs.get()
            try:
                result.set_result(job())
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller
                result.set_exception(exc)

    def call(self, job: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="cluster-spawner")
                self._thread.start()
        result: Future = Future()
        self._jobs.put((job, result))
        return result.result()


_SPAWNER = _Spawner()


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` of a child that dies with this process (Linux: see the module
    docstring), forked by the spawner thread."""
    guard = orphan_guard(os.getpid())
    if guard is None:
        return subprocess.Popen(argv, **kwargs)
    # the guard only calls prctl, getppid and _exit (async-signal-safe in the forked child)
    return _SPAWNER.call(lambda: subprocess.Popen(argv, preexec_fn=guard,  # noqa: PLW1509
                                                  **kwargs))


class Sink:
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

    def __init__(self, name: str, sink: Sink | None) -> None:
        self.name = name
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.restart_at: float | None = None  # set while an exit waits for its restart
        self.tail: deque[str] = deque(maxlen=20)
        self._sink = sink or Sink(None)
        self._failures = 0
        self._started = 0.0
        self._reader: threading.Thread | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        """Start (again) and forward the output."""
        self.process = popen(
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
        process.stdout.close()

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
    """``camserve serve`` as ``config`` says, on the loopback ports the supervisor chose
    (the same ones on every restart). ``ready`` is set once its health port answered
    SERVING, and cleared when it starts again."""

    def __init__(self, index: int, config: ServerConfig, sink: Sink | None) -> None:
        super().__init__(f"replica {index}", sink)
        self.index = index
        self.config = config
        self.ready = threading.Event()
        self.replacing = False  # a rolling restart stops and starts it, not the supervisor

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def health_port(self) -> int:
        """Its health-only port (``serve --health-port``), which it answers even when
        saturated: Envoy and the supervisor check health there."""
        return self.config.health_port

    @property
    def metrics_port(self) -> int | None:
        return self.config.metrics_port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def health_address(self) -> str:
        return f"{self.config.host}:{self.health_port}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "camserve", "serve", *to_argv(self.config)]

    def spawn(self) -> None:
        self.ready.clear()
        super().spawn()


class EnvoyProcess(Child):
    """Envoy with the cluster's configuration file; it writes its admin address to a file."""

    def __init__(self, binary: Path, config_path: Path, sink: Sink | None) -> None:
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
