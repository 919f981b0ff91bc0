#!/usr/bin/env bash
# The GPU measurements still owed (docs/kernels.md "Not measured", README "Results"), in stages of
# under 10 minutes each so that each fits one `device` call, run back to back on one machine:
#
#   bash benchmarks/gpu_wheels.sh        # once, here: the packages the GPU image lacks -> .whl/
#   bash benchmarks/gpu_next.sh 1        # on the GPU (carry .whl), writes to $OUT or /tmp/gpu-next
#   bash benchmarks/gpu_next.sh 2
#   bash benchmarks/gpu_next.sh 3
#
#   1  kernels: int8 activations (ours-int8-act8) against ours-int8, quanto qint8 and bf16 at the
#      real shapes, since the epilogue fix (spill-free H100 tiles) and the transposed-copy dx
#   2  memory: the 12gb preset (EMA teacher in host RAM; plan 10.13 GiB), 16gb and klein with act8,
#      prior_prompts; then the EMA update's time on the GPU (bench_ema.py)
#   3  the compiled kernel tests, then cuda_smoke.sh (train on CUDA on the tiny models, LoRAs loaded
#      in the stock pipelines; the klein part has not run on a GPU yet)
#
# Each stage leaves its logs and result files in $OUT (copy them into benchmarks/results/ and
# write up what they say, with the device and versions the files record).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_next.sh 1|2|3}
OUT=${OUT:-/tmp/gpu-next}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# kernels/ and presets/ ship inside the package (pyproject's package-dir); from the bare checkout
# with PYTHONPATH, links put them where `lowvram_dopsd.kernels` / `.presets` are looked for
for d in kernels presets; do [ -e "lowvram_dopsd/$d" ] || ln -s "../$d" "lowvram_dopsd/$d"; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

case "$stage" in
  1)
    timeout 560 python3 benchmarks/bench_kernels.py --breakdown --variants WxD,WxDd --no-loss \
      --methods ours-int8,ours-int8-act8,quanto-qint8,bf16 --out "$OUT" 2>&1 | tee "$OUT/kernels-act8.log"
    ;;
  2)
    timeout 420 python3 benchmarks/bench_memory.py --steps 2 --budget-s 400 --out "$OUT" \
      --configs zimage-12gb,zimage-16gb-act8,klein-16gb-edit-act8,zimage-16gb-prior 2>&1 | tee "$OUT/memory.log"
    timeout 120 python3 benchmarks/bench_ema.py --out "$OUT" 2>&1 | tee "$OUT/ema.log"
    ;;
  3)
    LOWVRAM_DOPSD_TEST_GPU=1 TRITON_INTERPRET=0 LOWVRAM_DOPSD_KERNELS_AUTOTUNE=0 timeout 300 \
      python3 -m pytest tests/kernels -q -x -n 8 -p no:cacheprovider 2>&1 | tee "$OUT/kernel-tests.log"
    WORK=/tmp/cuda-smoke timeout 240 bash benchmarks/cuda_smoke.sh 2>&1 | tee "$OUT/cuda-smoke.log"
    ;;
  *)
    echo "unknown stage '$stage' (1, 2 or 3)" >&2; exit 2 ;;
esac
