"""C++ client vs Python SDK: end-to-end latency of the same Explain requests on one server.

One `camserve serve` process (no batching, so each call runs alone) serves the models folder;
rounds alternate between the C++ client (client/cpp/tests/driver.cpp's `bench` command: a
warm channel, `calls` timed calls) and the Python SDK (a warm ``Client``, the same calls), so
both see the same machine state. Reported: the median over all calls of each client, per
image. Both send the photo's encoded bytes and decode the answer into float32 maps at the
model's input size (neither maps them onto the photo).

    .venv/bin/python bench/cpp_client.py --models models            # make export first
    .venv/bin/python bench/cpp_client.py --tiny                     # a 10-class test CNN

Builds the driver into build/cpp (Release, beside `make cpp`) first. Not part of `make bench`
(the build alone takes ~2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp"
CAT = ROOT / "samples" / "cat.jpg"

TINY_EXPORT = """
import sys, torch
from camserve.export import export_explainer
class TinyNet(torch.nn.Module):  # tests/integration/conftest.py's
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)
    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
torch.manual_seed(0)
export_explainer(TinyNet().eval(), sys.argv[1] + "/tiny.onnx", input_size=64,
                 labels=[f"thing {i}" for i in range(10)], architecture="tinynet")
"""


def build_driver() -> Path:
    for command in (["cmake", "-S", str(ROOT / "client" / "cpp"), "-B", str(BUILD),
                     "-DCMAKE_BUILD_TYPE=Release", "-DCAMSERVE_BUILD_TESTS=ON"],
                    ["cmake", "--build", str(BUILD), "--target", "camserve-cpp-driver",
                     "-j", str(os.cpu_count() or 2)]):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return BUILD / "camserve-cpp-driver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(models: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "camserve", "serve", "--models",
                               str(models), "--port", str(port), "--device", "cpu",
                               "--no-batching", "--intra-op-threads", str(threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from camserve.client import Client

    with Client(f"127.0.0.1:{port}") as client:
        if not client.wait_until_serving(120, lambda: server.poll() is None):
            server.kill()
            raise SystemExit("the server did not start")
    return server, f"127.0.0.1:{port}"


def python_round(client, data: bytes, model: str, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        found = client.explain(data, model=model)
        out.append((time.perf_counter() - start) * 1000)
        assert found
    return out


def cpp_round(driver: Path, target: str, image: Path, model: str, calls: int) -> list[float]:
    done = subprocess.run([str(driver), "bench", "--server", target, "--image", str(image),
                           "--calls", str(calls), "--model", model],
                          capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout)
    if not answer["ok"]:
        raise SystemExit(f"C++ client: {answer}")
    return answer["latencies_ms"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="models folder (e.g. make export's)")
    parser.add_argument("--tiny", action="store_true", help="export and use a tiny test CNN")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20, help="calls per round and client")
    parser.add_argument("--threads", type=int, default=2, help="server's onnxruntime threads")
    args = parser.parse_args()
    if not args.models and not args.tiny:
        parser.error("give --models DIR or --tiny")

    from camserve.client import Client

    driver = build_driver()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models = args.models
        if args.tiny:  # torch in its own process, not beside the timed client
            models = folder / "models"
            models.mkdir()
            subprocess.run([sys.executable, "-c", TINY_EXPORT, str(models)], check=True)
        photo = cv2.imread(str(CAT))
        images = {"cat.jpg 451x300": CAT, "224x224 JPEG": folder / "cat224.jpg"}
        cv2.imwrite(str(images["224x224 JPEG"]), cv2.resize(photo, (224, 224),
                                                             interpolation=cv2.INTER_AREA))
        server, target = serve(models, args.threads)
        try:
            with Client(target) as client:
                model_names = [m.name for m in client.list_models()]
                rows = []
                for model in model_names:
                    for name, path in images.items():
                        data = path.read_bytes()
                        python_round(client, data, model, 3)  # warm up
                        timings: dict[str, list[float]] = {"C++": [], "Python": []}
                        for _ in range(args.rounds):
                            timings["C++"] += cpp_round(driver, target, path, model, args.calls)
                            timings["Python"] += python_round(client, data, model, args.calls)
                        rows.append((model, name, statistics.median(timings["C++"]),
                                     statistics.median(timings["Python"])))
        finally:
            server.terminate()
            server.wait(30)
    print(f"e2e Explain latency, median of {args.rounds} interleaved rounds x {args.calls} "
          f"calls per client ({args.threads} server threads, no batching)")
    print(f"{'model':<22}{'image':<18}{'C++ ms':>9}{'Python ms':>11}{'Python - C++':>14}")
    for model, name, cpp, python in rows:
        print(f"{model:<22}{name:<18}{cpp:>9.2f}{python:>11.2f}{python - cpp:>14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
