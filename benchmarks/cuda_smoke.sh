#!/usr/bin/env bash
# The CUDA code path of `lowvram-dopsd train` end to end on the tiny models: the real 16gb preset
# (bf16 compute, qint8 base, 8-bit AdamW, gradient checkpointing, planner check) at 256², once on
# quanto's matmul (kernels off) and once on the fused Triton kernel (on: what auto does on CUDA);
# then the tiny FLUX.2-klein with its edit teacher on the fused kernel; then each LoRA loaded in
# its stock pipeline on the GPU. Needs a CUDA GPU; the CPU test suite cannot reach these branches.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${WORK:-/tmp/cuda-smoke}
rm -rf "$W" && mkdir -p "$W"
python3 -c "
from lowvram_dopsd.tiny import make_tiny_klein, make_tiny_qwen3vl, make_tiny_zimage
make_tiny_zimage('$W/tiny-zimage'); make_tiny_qwen3vl('$W/tiny-qwen3vl', text_encoder_dir='$W/tiny-zimage/text_encoder')
make_tiny_klein('$W/tiny-klein')"
for kernels in off on; do
  python3 -m lowvram_dopsd train --preset 16gb --model "$W/tiny-zimage" --teacher-encoder "$W/tiny-qwen3vl" \
    --images lowvram_dopsd/assets/demo --trigger "sks ball" --output "$W/out-$kernels" --cache-dir "$W/cache" \
    --steps 3 --resolution 256 --kernels "$kernels" --set max_sequence_length=64 \
    --set teacher_max_sequence_length=256 --set vlm_min_pixels=3136 --set vlm_max_pixels=12544
done
python3 -m lowvram_dopsd train --preset 16gb --model "$W/tiny-klein" --images lowvram_dopsd/assets/demo \
  --trigger "sks ball" --output "$W/out-klein" --cache-dir "$W/cache" --steps 3 --resolution 256 --kernels on
W="$W" DEVICE="${DEVICE:-cuda}" python3 - <<'PY'
import json, os, torch
from diffusers import Flux2KleinPipeline, ZImagePipeline
W, device = os.environ["W"], os.environ["DEVICE"]
runs = [("zimage kernels=off", ZImagePipeline, "tiny-zimage", "out-off", 8, 0.0),
        ("zimage kernels=on", ZImagePipeline, "tiny-zimage", "out-on", 8, 0.0),
        ("klein edit, kernels=on", Flux2KleinPipeline, "tiny-klein", "out-klein", 4, 1.0)]
for name, cls, model, out, steps, guidance in runs:
    if not os.path.isdir(f"{W}/{out}"):
        continue
    pipe = cls.from_pretrained(f"{W}/{model}", dtype=torch.bfloat16).to(device)
    pipe.load_lora_weights(f"{W}/{out}")
    lat = pipe(prompt="sks ball on the moon", height=256, width=256, num_inference_steps=steps, guidance_scale=guidance,
               output_type="latent", generator=torch.Generator(device).manual_seed(0)).images
    rows = [json.loads(line) for line in open(f"{W}/{out}/metrics.jsonl")]
    losses, peak = [r["loss"] for r in rows], rows[-1].get("vram_gb", 0.0)
    print(f"{name}: LoRA loads on {device}, latents finite={bool(torch.isfinite(lat).all())}, "
          f"losses={['%.4g' % v for v in losses]}, peak={peak:.3f} GiB")
PY
# `sample` on the GPU with the two Z-Image LoRAs (offload on and off, two LoRAs in one call)
[ -d "$W/out-off" ] && [ -d "$W/out-on" ] && WORK="$W" bash benchmarks/cuda_sample.sh
