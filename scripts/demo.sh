#!/usr/bin/env bash
# The embedded demo: D-OPSD on the toy world (a trained 4-step model learns a new shape; previews show it)
# on the CPU. `--world tiny`: a random tiny Z-Image through the real diffusers classes. Any demo flag works.
# It runs where you stand: the output folder (dopsd-demo-out) and the paths it prints are relative to it.
set -euo pipefail
here=$(pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
(cd "$repo" && bash scripts/setup.sh)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$here"
exec "$repo/.venv/bin/lowvram-dopsd" demo "$@"
