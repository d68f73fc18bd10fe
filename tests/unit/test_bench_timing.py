"""The benchmarks' round timer: which calls land in the reported samples.

``bench/compare.py`` reports the server's stage times of exactly the calls whose times it
reports (``steady`` picks them from what each call recorded); a misaligned pick would mix
a burst's first call, which meets caches the other sides refilled, into the steady figures.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from frames import steady, time_rounds  # bench/ holds scripts, not a package


@pytest.mark.parametrize("burst", [1, 3])
def test_steady_picks_the_calls_whose_times_are_reported(burst):
    records: dict[str, list[float]] = {"a": [], "b": []}

    def counting(name):
        def call():
            value = float(len(records[name]))  # each call returns its own index
            records[name].append(value)
            return value
        return call

    times = time_rounds({name: counting(name) for name in records}, rounds=4, warmup=2,
                        pause_s=0.0, burst=burst)
    for name, made in records.items():
        assert len(made) == 2 + 4 * burst
        assert steady(made, 2, burst) == times[name]
        if burst > 1:
            assert times[f"{name} first"] == [2.0 + burst * r for r in range(4)]
            assert len(times[name]) == 4 * (burst - 1)
        else:
            assert f"{name} first" not in times
