#!/usr/bin/env bash
# The demo: serve the pretrained EfficientNet-Lite0 explainer on loopback, explain the
# sample photos, write the pictures under out/, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${CAMSERVE_DEMO_PORT:-50151}
MODELS=${CAMSERVE_MODELS:-models}
OUT=${CAMSERVE_OUT:-out}

mkdir -p "$OUT"
$PY -m camserve serve --models "$MODELS" --port "$PORT" --device auto > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
$PY - "$PORT" "$SERVER" "$OUT/server.log" <<'PYEOF'
import os, sys
from camserve.client import Client

def running():
    try:
        os.kill(int(sys.argv[2]), 0)
        return True
    except OSError:
        return False

with Client(f"127.0.0.1:{sys.argv[1]}", timeout=2) as client:
    if not client.wait_until_serving(180, running):
        log = open(sys.argv[3]).read().strip().splitlines()
        sys.exit("the server did not come up: " + (log[-1] if log else "see its log"))
    info = client.get_model()
    print(f"server up: model {info.name} ({info.architecture}, layer "
          f"{info.layers[0].name}) on {info.execution_provider}")
PYEOF
$PY -m camserve explain samples/cat.jpg --server "127.0.0.1:$PORT" --target 285 --target 281 \
    --fuse max --out "$OUT"
$PY -m camserve explain samples/coffee.jpg --server "127.0.0.1:$PORT" --top-k 1 --out "$OUT"
# video: a few seconds of a camera panning and zooming over the cat, explained frame by
# frame (smoothed over time) -> pan_overlay.mp4, pan.jsonl and a strip of 4 frames
$PY - "$OUT" <<'PYEOF'
import sys
from camserve.client import load_image
from camserve.client.video import pan_zoom_clip, write_clip
write_clip(pan_zoom_clip(load_image("samples/cat.jpg")), f"{sys.argv[1]}/pan.mp4", fps=24)
PYEOF
$PY -m camserve explain "$OUT/pan.mp4" --server "127.0.0.1:$PORT" --smooth 0.5 --out "$OUT"
$PY - "$OUT" <<'PYEOF'
import sys, cv2
from camserve.client.video import strip
cv2.imwrite(f"{sys.argv[1]}/pan_strip.png", cv2.cvtColor(strip(f"{sys.argv[1]}/pan_overlay.mp4"), cv2.COLOR_RGB2BGR))
PYEOF
echo "done: pictures and JSON in $OUT/ (server log: $OUT/server.log)"
