#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine's image lacks, into .whl/ (git-ignored), for a
# `device` call that carries .whl and runs benchmarks/gpu_next.sh. That image has torch 2.11 + Triton
# 3.6, transformers 5.17 and torchvision (5.17 is below our floor only for want of torchvision), and
# no diffusers, peft, bitsandbytes or optimum-quanto. These five are 50 MB; with the checkout (~10 MB)
# that is under the 64 MiB a call may carry (transformers 5.23 would add 13 MB and not fit).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in diffusers==0.42.1 peft==0.21.2 bitsandbytes==0.50.2 optimum-quanto==0.2.7; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
du -sh .whl
