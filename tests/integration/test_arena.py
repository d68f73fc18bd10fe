"""onnxruntime's CPU arena is one per process: the sessions of every model the server opens
share it, so what the arena holds is the most the runs of any mix of models took at once
(what the memory budget counts as held), not one high-water mark per model and version.

Measured in a process of its own (nothing else has grown an arena there): two sessions of
two model files run the same large batch one after the other; the second run must find the
memory the first one left in the arena."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BATCH = 256  # tiny's 64x64 inputs: ~100 MiB of graph memory in one run

MEASURE = """
import json, sys
import numpy as np
import onnxruntime as ort
from camserve.server.runtime import session_options

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

sessions = [ort.InferenceSession(path, session_options(1),
                                 providers=["CPUExecutionProvider"]) for path in sys.argv[1:3]]
batch = {BATCH}
feeds = {{"image": np.random.default_rng(0).standard_normal((batch, 3, 64, 64), np.float32),
          "targets": np.full((batch, 1), -1, np.int64)}}
for session in sessions:  # every session run once, small
    session.run(None, {{k: v[:1] for k, v in feeds.items()}})
growth, before = [], rss()
for session in sessions:
    session.run(None, feeds)
    growth.append(rss() - before)
    before = rss()
print(json.dumps(growth))
"""  # its braces doubled for str.format


def _growth(models_dir: Path) -> list[int]:
    """RSS growth in bytes of the first model's large run, then of the second's."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE.format(BATCH=BATCH), str(models_dir / "tiny.onnx"),
         str(models_dir / "tiny2.onnx")],
        check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_every_session_shares_one_cpu_arena(models_dir):
    first, second = _growth(models_dir)
    print(f"\nRSS growth, model A's batch then model B's: {first / 2**20:.0f} then "
          f"{second / 2**20:.0f} MiB")
    assert first > 50 * 2**20  # the first large run grew the arena
    assert second < first / 4  # the second model's run reused it
