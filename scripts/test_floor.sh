#!/usr/bin/env bash
# The test suite on the OLDEST versions pyproject.toml allows: every ">=" floor of the
# dependencies and of the quant/kernels/tensorboard/wandb extras is installed as "==" into .venv-floor, so the floors
# are checked, not guessed (they were raised to what passes: docs/compat.md). Not part of CI, which
# tests the newest versions; run it after changing a floor or using a newer library feature.
#   bash scripts/test_floor.sh [pytest args]
# torch stays at the CPU build CI uses (older CPU wheels are not on PyPI, and its floor comes from
# diffusers/transformers/quanto); numpy < 2.3 because Triton 3.3's interpreter needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWVRAM_DOPSD_FLOOR_VENV:-.venv-floor}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || pip_install "${LOWVRAM_DOPSD_TORCH:-torch==2.13.0}"
mapfile -t pins < <("$PY" - <<'EOF'
import re
text = open("pyproject.toml", encoding="utf-8").read()
deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
extras = "".join(re.findall(r"^(?:quant|kernels|tensorboard|wandb) = \[(.*?)\]", text, re.M))
for req in re.findall(r'"([A-Za-z0-9_.-]+)>=([^"]+)"', deps + extras):
    if req[0] != "torch":
        print("==".join(req))
EOF
)
pip_install "${pins[@]}" "numpy<2.3" pytest torchmetrics
pip_install --no-deps -e .
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE "^(torch|diffusers|transformers|peft|accelerate|safetensors|huggingface.hub|rich|pillow|bitsandbytes|optimum-quanto|triton|tensorboard|wandb|numpy) "
# This includes the kernels' real compiles (tests/kernels/test_kernels_aot.py) on the oldest Triton:
# 3.3.0 cannot compile matrix multiplies for sm_120, so those tests are skipped there and
# test_the_no_mma_gate_matches_the_compiler checks that the kernels are gated off (kernels.utils.NO_MMA).
OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider tests "$@"
