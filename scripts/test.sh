#!/usr/bin/env bash
# The test suite, CPU only: tiny models built on the fly, Triton kernels through its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
