"""Dynamic batching or not, on the CPU: explanations/s at 1, 4 and 16 clients.

``make bench-batching`` (or ``.venv/bin/python bench/batching.py [--models ...] [--rounds 4]``).

For each model (EfficientNet-Lite0 from models/, resnet50 with compare.py's seeded random
weights), ``camserve serve`` on the CPU with 2 intra-op threads runs once per setting and
round, the settings in a fresh random order each round:

  batching   the default: concurrent calls share batched graph runs
  direct     ``--no-batching``: each call runs its own graph (concurrent calls side by side
             on onnxruntime's threads)

For each, the SDK's ``Client.explain`` of samples/cat.jpg from 1, 4 and 16 client threads (each
with its own channel) for ``--seconds``, after a warm-up second at 16 clients. The table gives
each round's explanations/s, and the ratio direct / batching of each round, side by side, so
that a slower or faster spell of the machine shows in both settings of a round alike.

Writes bench/results/batching.md (also printed) and bench/results/batching.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import SAMPLE, Server, clients_rate, export_model, served_folder  # bench/
from frames import cpu_name, settings, write_report  # bench/frames.py

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"batching": [], "direct": ["--no-batching"]}
CLIENTS = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    jpeg, order = SAMPLE.read_bytes(), random.Random(0)
    rates: dict[str, list[dict[str, dict[int, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="camserve-batching-") as scratch:
        for arch in args.models:
            explainer = export_model(arch, "float32", Path(scratch))[0]
            folder = served_folder(explainer, Path(scratch), arch)
            rates[arch] = []
            for index in range(args.rounds):
                row: dict[str, dict[int, float]] = {}
                for setting in order.sample(list(SETTINGS), len(SETTINGS)):
                    server = Server(folder, args.threads, SETTINGS[setting],
                                    Path(scratch) / f"{arch}-{setting}.log", "cpu")
                    try:
                        clients_rate(server.address, jpeg, explainer.stem, 16, 1.0)  # warm
                        row[setting] = {n: clients_rate(server.address, jpeg, explainer.stem,
                                                        n, args.seconds) for n in CLIENTS}
                    finally:
                        server.stop()
                rates[arch].append(row)
                print(f"{arch} round {index + 1}/{args.rounds}: {row}", flush=True)

    lines = ["# Dynamic batching or not, on the CPU: explanations/s", "",
             (f"{cpu_name()}; `camserve serve --device cpu --intra-op-threads {args.threads}`, "
              "batching (the default) vs direct runs (`--no-batching`); samples/cat.jpg, the "
              "SDK default; "
              f"{args.seconds:g} s per client count; each round runs both settings in random "
              "order. Direct / batching is the ratio within a round."), "",
             "| model | round | " + " | ".join(f"{n} client{'s' * (n > 1)}: direct, batching, "
                                             "ratio" for n in CLIENTS) + " |",
             "|---|---|" + "---|" * len(CLIENTS)]
    for arch, rows in rates.items():
        for index, row in enumerate(rows):
            lines.append(f"| {arch} | {index + 1} | " + " | ".join(
                f"{row['direct'][n]:.1f}, {row['batching'][n]:.1f}, "
                f"{row['direct'][n] / row['batching'][n]:.2f}" for n in CLIENTS) + " |")
    write_report(args.out, "batching", "\n".join(lines) + "\n",
                 {"cpu": cpu_name(), "settings": settings(args), "rates": rates})


if __name__ == "__main__":
    main()
