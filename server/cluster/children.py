"""The cluster's children: ``camserve serve`` replicas and Envoy, as supervised subprocesses.

A ``Child`` runs in a session of its own (a Ctrl-C in a terminal reaches only the cluster
process, which stops the children in order), forwards its output line by line prefixed with
its name, keeps its last lines (a failed start says why there) and computes its restart
delay, which doubles while it keeps failing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TextIO

from camserve.server.config import ServerConfig, to_argv

BACKOFF_FIRST_S = 0.5  # first restart delay; doubles per failure in a row, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a child that ran this long before exiting starts a new series of delays


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
