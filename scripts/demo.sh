#!/usr/bin/env bash
# The embedded default: D-OPSD on a tiny Z-Image model and bundled images, on the CPU (~1 minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/lowvram-dopsd demo "$@"
