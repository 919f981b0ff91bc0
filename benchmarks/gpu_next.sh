#!/usr/bin/env bash
# The GPU measurements of docs/kernels.md and the README's Results, in stages of under 10 minutes each
# so that each fits one `device` call, run back to back on one machine (all five ran on an H100 on
# 2026-11-24 in ~25 minutes of device time; their outputs are in benchmarks/results/):
#
#   bash benchmarks/gpu_wheels.sh        # once, here: the packages the GPU image lacks -> .whl/
#   bash benchmarks/gpu_next.sh 1        # on the GPU (carry .whl), writes to $OUT or /tmp/gpu-next
#   ...
#   bash benchmarks/gpu_next.sh 5        # carry .whl (diffusers, peft, quanto: 7 MB) and .smoke
#
#   1  kernels: int8 activations (ours-int8-act8) against ours-int8, quanto qint8 and bf16 at the
#      real shapes (kernels-act8-h100.md; it also timed act8's dx on Wq as stored, a variant since removed)
#   2  memory: the 12gb preset (EMA teacher in host RAM), 16gb and klein with act8, prior_prompts;
#      then the EMA update's time on the GPU and the CPU (memory-h100-12gb-act8-prior.md, ema-*.md)
#   3  the kernel tests compiled on the GPU, beside cuda_smoke.sh (train on CUDA on the tiny models,
#      LoRAs loaded in the stock pipelines, then cuda_sample.sh)
#   4  a whole Z-Image step for each way of running the 8-bit linears, and a single-file load
#      (train-step-h100.md)
#   5  the compile-report tests under the GPU image's Triton; cuda_sample.sh on tiny LoRAs trained
#      here and carried in .smoke/ (tiny-zimage, out-off, out-on; git-ignored)
#   6  host time: one LoRA'd linear on each path (profile_host.py), one roll-out state of the 16gb
#      Z-Image step under torch.profiler and cProfile (bench_memory.py --profile)
#   7  the kernel tests compiled (the direct-launch tests among them), then profile_host.py again
#   8  the kernel tests compiled again; a whole Z-Image step for fused, bf16, act8 and quanto, each
#      with one state profiled; profile_host.py again
#   9  klein's step on the fused kernel, act8 and quanto (its first half timed Z-Image with the skinny
#      GEMMs on our kernel, a variant since removed: docs/kernels.md)
#  10  the host-time change's before/after on ONE machine (owed since 44476b3: its two step tables
#      came from two machines): Z-Image fused and act8 steps with the code of ea7bf9f (before) and of
#      this checkout, alternating (bench_memory.py --trees). Prepare here, then carry .whl and .ab:
#        bash benchmarks/tree_at.sh ea7bf9f .ab/before
#  11  the per-layer table again on the code after the host-time cuts (its eager column predates them):
#      ours exact and act8, quanto, bitsandbytes and bf16 in one run (kernels-<device>.md)
#  12  what --train-states saves (README "How long will it take?" expects ~0.45 of the step for 2 of
#      Z-Image's 8 states): each model's step with every state trained and with train_states = 2 / 1
#  13  the speed levers of issue #34 on Z-Image, each against the default on one machine: regional
#      compilation (torch_compile = blocks), selective checkpointing (keep_blocks = auto: the kept blocks
#      and the planner's peak for them), SDPA forced to cuDNN. Every config records which attention
#      kernel each pass ran (the default's too: forcing flash is only worth a run if SDPA did not pick
#      it), the compiled graphs, the kept blocks, its warm-up losses against the default's (the compiled
#      numerics), and one state's GPU time per kernel (--profile): what to do next
#  14  the same for klein
#  15  the distributed path on one GPU (issue #32, docs/multi-gpu.md): the LoRA gradient sum at the real
#      sizes as a torchrun job of one process (bench_allreduce.py), and the same tiny training plain and
#      under `torchrun --nproc-per-node 1` (bench_dist_overhead.py; criterion: at most 2 %); with --tiny
#      on the CPU, the sum over 2 gloo processes
#
#  16  full fine-tuning (issue #35, docs/full.md "Checking the planner on one GPU"): each per-GPU term of
#      `plan --train-mode full` measured at world size 1 (bench_full.py): Z-Image and klein on the full-1x80gb
#      preset (8-bit AdamW, EMA in host RAM), and Z-Image with 8 of its 30 blocks under AdamW with an fp32 and
#      a bf16 EMA teacher on the GPU (whole, fp32 AdamW's state would not fit one card)
#
# `bash benchmarks/gpu_next.sh N --tiny` runs stage N on the CPU with tiny models, one measured step and
# no profile (no GPU, no .whl): the same configs, to check the script before a GPU session
# (tests/test_gpu_next.py runs stage 13 so).
#
# Each stage leaves its logs and result files in $OUT (copy them into benchmarks/results/ and
# write up what they say, with the device and versions the files record).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_next.sh 1..16 [--tiny]}
BENCH=(--steps 2 --profile)  # --tiny: bench_memory on tiny models on the CPU, one step, no profile
TINY=()
[ "${2:-}" = "--tiny" ] && TINY=(--tiny --device cpu) && BENCH=(--steps 1)
OUT=${OUT:-/tmp/gpu-next}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ${#TINY[@]} -eq 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
# kernels/ and presets/ ship inside the package (pyproject's package-dir); from the bare checkout
# with PYTHONPATH, links put them where `lowvram_dopsd.kernels` / `.presets` are looked for
for d in kernels presets; do [ -e "lowvram_dopsd/$d" ] || ln -s "../$d" "lowvram_dopsd/$d"; done
if [ ${#TINY[@]} -eq 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi

case "$stage" in
  1)
    timeout 520 python3 benchmarks/bench_kernels.py --breakdown --no-loss \
      --methods ours-int8,ours-int8-act8,quanto-qint8,bf16 --out "$OUT" 2>&1 | tee "$OUT/kernels-act8.log"
    ;;
  2)
    timeout 400 python3 benchmarks/bench_memory.py --steps 2 --budget-s 330 --out "$OUT" \
      --configs zimage-12gb,zimage-16gb-act8,klein-16gb-edit-act8,zimage-16gb-prior 2>&1 | tee "$OUT/memory.log"
    timeout 100 python3 benchmarks/bench_ema.py --out "$OUT" 2>&1 | tee "$OUT/ema.log"
    ;;
  3)
    # side by side: both are correctness checks (no timings), the tests mostly compile on the CPU
    (WORK=/tmp/cuda-smoke timeout 280 bash benchmarks/cuda_smoke.sh > "$OUT/cuda-smoke.log" 2>&1
     echo "cuda_smoke.sh exit $?" >> "$OUT/cuda-smoke.log") &
    LOWVRAM_DOPSD_TEST_GPU=1 TRITON_INTERPRET=0 LOWVRAM_DOPSD_KERNELS_AUTOTUNE=0 timeout 280 \
      python3 -m pytest tests/kernels -q -n 10 -p no:cacheprovider 2>&1 | tee "$OUT/kernel-tests.log"
    wait
    grep -v "it/s\]" "$OUT/cuda-smoke.log" | tail -25
    ;;
  4)  # a whole Z-Image training step for each way of running the 8-bit LoRA linear, on one machine
    timeout 560 python3 benchmarks/bench_memory.py --steps 2 --budget-s 440 --out "$OUT" \
      --configs zimage-16gb-fused,zimage-16gb-act8,zimage-16gb-quanto,zimage-16gb-bnb,zimage-16gb-bf16,zimage-16gb-file \
      2>&1 | tee "$OUT/train-step.log"
    ;;
  5)  # the compile-report tests on the GPU's Triton; `sample` on LoRAs made here (carry .smoke)
    LOWVRAM_DOPSD_TEST_GPU=1 TRITON_INTERPRET=0 timeout 240 \
      python3 -m pytest tests/kernels/test_kernels_aot.py -q -n 12 -p no:cacheprovider 2>&1 | tee "$OUT/aot-tests.log"
    WORK="$PWD/.smoke" timeout 150 bash benchmarks/cuda_sample.sh 2>&1 | grep -v "it/s\]" | tee "$OUT/cuda-sample.log"
    ;;
  6)  # where the host time goes: one LoRA'd linear per path, then one roll-out state of the real model
    timeout 200 python3 benchmarks/profile_host.py --out "$OUT" 2>&1 | tee "$OUT/profile-host.log"
    timeout 330 python3 benchmarks/bench_memory.py --steps 2 --profile --budget-s 300 --out "$OUT" \
      --configs zimage-16gb-fused,zimage-16gb-bf16 2>&1 | tee "$OUT/train-profile.log"
    ;;
  7)  # the direct-launch path: the kernel tests compiled (launch tests included), then the host profile
    LOWVRAM_DOPSD_TEST_GPU=1 TRITON_INTERPRET=0 LOWVRAM_DOPSD_KERNELS_AUTOTUNE=0 timeout 300 \
      python3 -m pytest tests/kernels -q -n 10 -p no:cacheprovider --ignore tests/kernels/test_kernels_aot.py \
      2>&1 | tee "$OUT/kernel-tests.log"
    timeout 200 python3 benchmarks/profile_host.py --out "$OUT" 2>&1 | tee "$OUT/profile-host.log"
    ;;
  8)  # the kernel tests compiled, a whole Z-Image step per 8-bit path (one state profiled), profile_host
    LOWVRAM_DOPSD_TEST_GPU=1 TRITON_INTERPRET=0 LOWVRAM_DOPSD_KERNELS_AUTOTUNE=0 timeout 120 \
      python3 -m pytest tests/kernels -q -n 10 -p no:cacheprovider --ignore tests/kernels/test_kernels_aot.py \
      2>&1 | tail -3 | tee "$OUT/kernel-tests.log"
    timeout 400 python3 benchmarks/bench_memory.py --steps 2 --profile --budget-s 300 --out "$OUT" \
      --configs zimage-16gb-fused,zimage-16gb-bf16,zimage-16gb-act8,zimage-16gb-quanto 2>&1 | tee "$OUT/train-step.log"
    timeout 120 python3 benchmarks/profile_host.py --out "$OUT" 2>&1 | tee "$OUT/profile-host.log"
    ;;
  9)  # klein's step per 8-bit path
    timeout 280 python3 benchmarks/bench_memory.py --steps 2 --profile --budget-s 230 --out "$OUT" \
      --configs klein-16gb-edit-fused,klein-16gb-edit-act8,klein-16gb-edit-quanto 2>&1 | tee "$OUT/train-step-klein.log"
    ;;
  10)  # before/after on one machine: each config with each tree's code, A B then B A
    [ -d .ab/before ] || { echo "run 'bash benchmarks/tree_at.sh ea7bf9f .ab/before' here first and carry .ab" >&2; exit 2; }
    timeout 560 python3 benchmarks/bench_memory.py --steps 2 --rounds 2 --budget-s 470 --out "$OUT" \
      --trees "before=.ab/before,after=." --configs zimage-16gb-fused,zimage-16gb-act8 2>&1 | tee "$OUT/before-after.log"
    ;;
  11)  # every method of the issue's table in one run, eager and graph, on the current launch path
    timeout 540 python3 benchmarks/bench_kernels.py --no-loss --out "$OUT" \
      --methods ours-int8,ours-int8-act8,quanto-qint8,bnb-int8,bf16 2>&1 | tee "$OUT/kernels.log"
    ;;
  12)
    timeout 500 python3 benchmarks/bench_memory.py --steps 2 --budget-s 420 --out "$OUT" \
      --configs zimage-16gb,zimage-16gb-ts2,klein-16gb-edit,klein-16gb-edit-ts1 2>&1 | tee "$OUT/train-states.log"
    ;;
  13)  # each lever of issue #34 against the default (the first config), Z-Image
    timeout 560 python3 benchmarks/bench_memory.py "${TINY[@]}" "${BENCH[@]}" --budget-s 470 --out "$OUT" \
      --configs zimage-16gb-fused,zimage-16gb-compile,zimage-16gb-keep,zimage-16gb-cudnn \
      2>&1 | tee "$OUT/levers-zimage.log"
    ;;
  14)  # the same for klein
    timeout 400 python3 benchmarks/bench_memory.py "${TINY[@]}" "${BENCH[@]}" --budget-s 330 --out "$OUT" \
      --configs klein-16gb-edit-fused,klein-16gb-edit-compile,klein-16gb-edit-keep,klein-16gb-edit-cudnn \
      2>&1 | tee "$OUT/levers-klein.log"
    ;;
  15)  # the distributed path at world size 1 (--tiny: the sum over 2 CPU processes, the tiny step on the CPU)
    procs=1 && [ ${#TINY[@]} -gt 0 ] && procs=2
    timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node $procs benchmarks/bench_allreduce.py \
      "${TINY[@]}" --out "$OUT" 2>&1 | tee "$OUT/allreduce.log"
    timeout 360 python3 benchmarks/bench_dist_overhead.py ${TINY[@]:0:1} --steps 40 --repeat 3 --out "$OUT" 2>&1 \
      | tee "$OUT/dist-overhead.log"
    ;;
  16)  # full fine-tuning's memory terms at world size 1, beside the planner's
    timeout 560 python3 benchmarks/bench_full.py "${TINY[@]}" --out "$OUT" \
      --runs zimage-1x80gb,klein-1x80gb,zimage-8l-adamw,zimage-8l-bf16ema 2>&1 | tee "$OUT/full.log"
    ;;
  *)
    echo "unknown stage '$stage' (1 to 16)" >&2; exit 2 ;;
esac
