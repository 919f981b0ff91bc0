#!/usr/bin/env bash
# `lowvram-dopsd eval` on a CUDA GPU, on the tiny Z-Image in $WORK/tiny-zimage and two LoRAs trained on it
# ($WORK/out-off, $WORK/out-on; cuda_smoke.sh makes them, or carry them), with tiny DINOv3 / CLIP folders it
# builds in $WORK, then the same eval on the CPU (fp32). Prints where each metric model ran, its planned and
# measured peak, and every metric on both devices (bf16 sampling and scoring on the GPU: close, not equal).
# Fails if the GPU run did not put the metric models on the GPU or recorded no peak.
# Dry run of the script on the CPU: DEVICE=cpu SIZE=64 WORK=... bash benchmarks/cuda_eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:?set WORK to the folder with tiny-zimage, out-off and out-on}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-256}
python3 - "$W" <<'PY'
import sys
from pathlib import Path
from lowvram_dopsd.tiny import make_tiny_clip, make_tiny_dino
w = Path(sys.argv[1])
if not (w / "tiny-dino" / "config.json").is_file():
    make_tiny_dino(w / "tiny-dino")
if not (w / "tiny-clip" / "config.json").is_file():
    make_tiny_clip(w / "tiny-clip")
PY
for device in $(printf "%s\n" "$DEVICE" cpu | uniq); do
  rm -rf "$W/eval-$device"
  python3 -m lowvram_dopsd eval --lora "$W/out-off" --lora "$W/out-on" --model "$W/tiny-zimage" \
    --images lowvram_dopsd/assets/demo --trigger "sks ball" --width "$SIZE" --height "$SIZE" --device "$device" \
    --dino-model "$W/tiny-dino" --clip-model "$W/tiny-clip" --output "$W/eval-$device"
done
W="$W" DEVICE="$DEVICE" python3 - <<'PY'
import json, os
W, device = os.environ["W"], os.environ["DEVICE"]
gpu, cpu = (json.load(open(f"{W}/eval-{d}/eval.json")) for d in (device, "cpu"))
for name, run in gpu["metric_models"].items():
    peak = f", measured peak {run['peak_bytes'] / 2**20:.1f} MiB" if run["peak_bytes"] else ""
    print(f"{name}: {run['device']} {run['dtype']}, planned {run['planned_bytes'] / 2**20:.1f} MiB{peak}")
worst = 0.0
for a, b in zip(gpu["rows"], cpu["rows"]):
    for m in gpu["metrics"]:
        worst = max(worst, abs(a["metrics"][m] - b["metrics"][m]))
        print(f"{a['label']:>10} {m:>8}: {device} {a['metrics'][m]:.4f}  cpu {b['metrics'][m]:.4f}")
print(f"largest metric difference {device} vs cpu: {worst:.4f}")
if device == "cuda":
    bad = [n for n, r in gpu["metric_models"].items() if r["device"] != "cuda" or not r["peak_bytes"]]
    raise SystemExit(f"metric models not on the GPU or without a peak: {bad}" if bad else 0)
PY
