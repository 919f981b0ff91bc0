#!/usr/bin/env bash
# The test suite under another torch than CI's (the CPU build of 2.13.0), in its own venv
# .venv-torch<version>. Not part of CI: PyPI's Linux torch is a CUDA build of ~5 GB (it runs the
# suite on the CPU as well), and CI must stay fast and offline-safe.
#   bash scripts/test_torch.sh                          # torch 2.14.1 + torchvision 0.29.1
#   TORCH=2.15.0 TORCHVISION= bash scripts/test_torch.sh  # another torch, without torchvision
# With torchvision, the one test CI skips runs too: Qwen3-VL's AutoProcessor, whose video half needs
# torchvision, against the fallback built from the tokenizer and image processor (teacher_vlm.py).
# Triton comes in at the version that torch pins, so the interpreter tests run on it.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.14.1}
TORCHVISION=${TORCHVISION-0.29.1}
VENV=.venv-torch$TORCH
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
pip_install "torch==$TORCH" ${TORCHVISION:+"torchvision==$TORCHVISION"}
pip_install -e ".[quant,kernels,tensorboard,test]"
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE "^(torch|torchvision|triton|diffusers|transformers|peft|bitsandbytes|optimum-quanto|numpy) "
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider -ra tests "$@"
