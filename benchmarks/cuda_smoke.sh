#!/usr/bin/env bash
# The CUDA code path of `lowvram-dopsd train` end to end on the tiny models: the real 16gb preset
# (bf16 compute, qint8 base, 8-bit AdamW, gradient checkpointing, planner check) at 256², once on
# quanto's matmul (kernels off) and once on the fused Triton kernel (on: what auto does on CUDA);
# then each LoRA loaded in the stock ZImagePipeline on the GPU. Needs a CUDA GPU; the CPU test suite cannot reach these branches.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${WORK:-/tmp/cuda-smoke}
rm -rf "$W" && mkdir -p "$W"
python3 -c "
from lowvram_dopsd.tiny import make_tiny_qwen3vl, make_tiny_zimage
make_tiny_zimage('$W/tiny-zimage'); make_tiny_qwen3vl('$W/tiny-qwen3vl', text_encoder_dir='$W/tiny-zimage/text_encoder')"
for kernels in off on; do
  python3 -m lowvram_dopsd train --preset 16gb --model "$W/tiny-zimage" --teacher-encoder "$W/tiny-qwen3vl" \
    --images lowvram_dopsd/assets/demo --trigger "sks ball" --output "$W/out-$kernels" --cache-dir "$W/cache" \
    --steps 3 --resolution 256 --kernels "$kernels" --set max_sequence_length=64 \
    --set teacher_max_sequence_length=256 --set vlm_min_pixels=3136 --set vlm_max_pixels=12544
done
W="$W" python3 - <<'PY'
import json, os, torch
from diffusers import ZImagePipeline
W = os.environ["W"]
for k in ("off", "on"):
    pipe = ZImagePipeline.from_pretrained(f"{W}/tiny-zimage", dtype=torch.bfloat16).to("cuda")
    pipe.load_lora_weights(f"{W}/out-{k}")
    lat = pipe("sks ball on the moon", height=256, width=256, num_inference_steps=8, guidance_scale=0.0,
               output_type="latent", generator=torch.Generator("cuda").manual_seed(0)).images
    rows = [json.loads(line) for line in open(f"{W}/out-{k}/metrics.jsonl")]
    losses, peak = [r["loss"] for r in rows], rows[-1].get("vram_gb", 0.0)
    print(f"kernels={k}: LoRA loads on cuda, latents finite={bool(torch.isfinite(lat).all())}, "
          f"losses={['%.4g' % v for v in losses]}, peak={peak:.3f} GiB")
PY
