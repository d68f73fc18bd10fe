"""``camserve serve`` in a child process, for the tests that signal, kill or measure it."""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path
from typing import Self


class ServeProcess:
    """``camserve serve --models MODELS --port 0`` on the CPU with one intra-op thread, plus
    ``flags``; its log (stderr) goes to ``log``. Starting returns once it prints the port it
    bound (``port``, ``target``); ``close`` kills it if it still runs. A context manager."""

    def __init__(self, models: Path, log: Path, *flags: str, start_s: float = 60) -> None:
        self.log = log
        with log.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "camserve", "serve", "--models", str(models),
                 "--port", "0", "--device", "cpu", "--intra-op-threads", "1", *flags],
                stdout=subprocess.PIPE, stderr=err, text=True)
        ready, _, _ = select.select([self.process.stdout], [], [], start_s)
        line = self.process.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.close()
            raise RuntimeError(f"the server did not start: {line!r} {log.read_text()[-2000:]}")
        self.port = int(line.rsplit(":", 1)[1])
        self.target = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
