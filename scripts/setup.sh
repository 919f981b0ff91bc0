#!/usr/bin/env bash
# Create .venv and install lowvram-dopsd into it (editable) with the test and quantization extras.
# torch is pinned so a fresh CPU-only machine gets a known build; on a GPU box, install your CUDA
# torch into .venv first (or export LOWVRAM_DOPSD_TORCH="torch==<your version>") and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check "${LOWVRAM_DOPSD_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install -q --disable-pip-version-check -e ".[quant,kernels,tensorboard,wandb,test]"
