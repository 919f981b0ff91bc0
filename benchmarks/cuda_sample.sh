#!/usr/bin/env bash
# `lowvram-dopsd sample` on a CUDA GPU, on the tiny Z-Image in $WORK/tiny-zimage and two LoRAs trained on
# it ($WORK/out-off, $WORK/out-on; cuda_smoke.sh makes them, or carry them): two LoRAs in one call (the
# second replaces the first in the loaded pipeline) and two seeds, once with model CPU offload (diffusers
# re-applies the offload hooks when the LoRA is loaded) and once without. The same images are expected
# from both, and the second LoRA's from a call that samples it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WORK:?set WORK to the folder with tiny-zimage, out-off and out-on}
rm -rf "$W"/sample-*
for mode in offload no-offload; do
  python3 -m lowvram_dopsd sample --lora "$W/out-off" --lora "$W/out-on" --model "$W/tiny-zimage" \
    --prompt "sks ball on the moon" --count 2 --width 256 --height 256 --device cuda --"$mode" --output "$W/sample-$mode/"
done
python3 -m lowvram_dopsd sample --lora "$W/out-on" --model "$W/tiny-zimage" --prompt "sks ball on the moon" \
  --seed 1 --width 256 --height 256 --device cuda --no-offload --output "$W/sample-alone.png"
W="$W" python3 - <<'PY'
import os, numpy as np
from PIL import Image
W = os.environ["W"]
a, b = sorted(os.listdir(f"{W}/sample-offload")), sorted(os.listdir(f"{W}/sample-no-offload"))
assert a == b and len(a) == 4, (a, b)
img = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
diffs = {}
for name in a:
    diffs[name] = int(np.abs(img(f"{W}/sample-offload/{name}") - img(f"{W}/sample-no-offload/{name}")).max())
    print(f"sample {name}: offload vs not, max pixel difference {diffs[name]}")
on = [n for n in a if "out-on" in n and n.endswith("-1.png")]
assert len(on) == 1, a
diffs["alone"] = int(np.abs(img(f"{W}/sample-no-offload/{on[0]}") - img(f"{W}/sample-alone.png")).max())
print(f"sample: second LoRA of a two-LoRA call vs sampled alone ({on[0]}), max pixel difference {diffs['alone']}")
raise SystemExit(0 if max(diffs.values()) == 0 else "sample: images differ (see above)")
PY
