"""The tiny-model factory: folders load in the stock pipelines and behave like the real layouts."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lowvram_dopsd import tiny


def _folder_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_has_qwen_special_tokens_in_order_and_pad():
    tok = tiny.build_tiny_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t, _ in tiny.QWEN_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # contiguous, real order, after the BPE vocab
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert 300 < len(tok) < 2048
    text = "a photo of sks ball on grass"
    assert tok.decode(tok(text).input_ids) == text
    # Special tokens are single ids, not split by BPE.
    vision_start, vision_end, image_pad = ids[9], ids[10], ids[12]
    assert tok("<|vision_start|><|image_pad|><|vision_end|>").input_ids == [vision_start, image_pad, vision_end]


def test_chat_template_honours_enable_thinking():
    tok = tiny.build_tiny_tokenizer()
    msgs = [{"role": "user", "content": "a dog"}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    mm = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a dog"}]}]
    assert tok.apply_chat_template(mm, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a dog<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------
# Z-Image-Turbo

def test_zimage_folder_is_the_real_layout(tiny_zimage_dir):
    index = json.loads((tiny_zimage_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    for sub in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (tiny_zimage_dir / sub).is_dir()
    sched = json.loads((tiny_zimage_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["shift"], sched["use_dynamic_shifting"], sched["num_train_timesteps"]) == (3.0, False, 1000)
    vae = json.loads((tiny_zimage_dir / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    # The text encoder checkpoint is a Qwen3ForCausalLM one (keys `model.*`), like the real folder.
    te = json.loads((tiny_zimage_dir / "text_encoder" / "config.json").read_text())
    assert te["architectures"] == ["Qwen3ForCausalLM"] and te["num_hidden_layers"] == 36
    assert _folder_bytes(tiny_zimage_dir) < 5e6


def test_zimage_pipeline_generates(tiny_zimage_dir):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_zimage_dir)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.cap_feat_dim == pipe.text_encoder.config.hidden_size

    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a photo of sks ball", height=64, width=64, num_inference_steps=8, guidance_scale=0.0)
    latents = pipe(**kw, latents=noise.clone(), output_type="latent").images
    assert latents.shape == (1, 16, 8, 8) and torch.isfinite(latents).all()
    # The transformer is not a zero map: 8 Euler steps moved the state away from the noise.
    assert (latents - noise).abs().mean() > 1e-2

    image = pipe(**kw, latents=noise.clone(), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0
    again = pipe(**kw, latents=noise.clone(), output_type="np").images
    np.testing.assert_array_equal(image, again)


# ----------------------------------------------------------------------------------------------
# FLUX.2-klein

def test_klein_folder_is_the_real_layout(tiny_klein_dir):
    index = json.loads((tiny_klein_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert index["tokenizer"] == ["transformers", "Qwen2TokenizerFast"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    sched = json.loads((tiny_klein_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["use_dynamic_shifting"] is True and sched["time_shift_type"] == "exponential"
    assert _folder_bytes(tiny_klein_dir) < 5e6


def test_klein_pipeline_generates_text_only_and_with_reference_image(tiny_klein_dir):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein_dir)
    pipe.set_progress_bar_config(disable=True)
    te = pipe.text_encoder.config
    # Default text_encoder_out_layers (9, 18, 27) exist, and the stacked width is what the DiT takes.
    embeds, _ = pipe.encode_prompt("a photo of sks ball", device="cpu")
    assert embeds.shape == (1, 512, 3 * te.hidden_size) == (1, 512, pipe.transformer.config.joint_attention_dim)

    kw = dict(prompt="a photo of sks ball", height=64, width=64, num_inference_steps=4, output_type="np")
    plain = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert plain.shape == (1, 64, 64, 3) and np.isfinite(plain).all() and plain.std() > 0

    reference = Image.open(sorted(tiny.DEMO_DIR.glob("*.png"))[0]).convert("RGB")
    edited = pipe(**kw, image=reference, generator=torch.Generator().manual_seed(0)).images
    assert edited.shape == (1, 64, 64, 3) and np.isfinite(edited).all()
    assert not np.array_equal(edited, plain)  # the reference tokens took part in attention


def test_factory_is_deterministic_in_seed(tmp_path):
    from safetensors.torch import load_file

    a = tiny.make_tiny_klein(tmp_path / "a", seed=3)
    b = tiny.make_tiny_klein(tmp_path / "b", seed=3)
    c = tiny.make_tiny_klein(tmp_path / "c", seed=4)
    for sub, name in [("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]:
        wa, wb, wc = (load_file(d / sub / name) for d in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    with pytest.raises(FileExistsError):
        tiny.make_tiny_klein(a)


# ----------------------------------------------------------------------------------------------
# Qwen3-VL folder and demo data

def test_vlm_folder_matches_text_encoder_and_tokenizer(tiny_vlm_dir, tiny_zimage_dir):
    from transformers import AutoConfig, AutoTokenizer

    vlm = AutoConfig.from_pretrained(tiny_vlm_dir)
    te = AutoConfig.from_pretrained(tiny_zimage_dir / "text_encoder")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size"):
        assert getattr(vlm.text_config, field) == getattr(te, field), field
    assert vlm.vision_config.out_hidden_size == te.hidden_size and vlm.vision_config.patch_size == 16
    tok = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    assert vlm.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert vlm.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert vlm.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    pre = json.loads((tiny_vlm_dir / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (16, 2, 2)
    assert (tiny_vlm_dir / "chat_template.json").is_file()


def test_bundled_demo_assets_are_reproducible():
    pngs = sorted(tiny.DEMO_DIR.glob("*.png"))
    assert len(pngs) == len(tiny.DEMO_SCENES) >= 6
    for i, (png, (kind, caption)) in enumerate(zip(pngs, tiny.DEMO_SCENES)):
        assert png.stem == f"{i:02d}_{kind}"
        assert png.with_suffix(".txt").read_text().strip() == caption and "sks ball" in caption
        stored = np.asarray(Image.open(png).convert("RGB"))
        assert stored.shape == (64, 64, 3)
        np.testing.assert_array_equal(stored, np.asarray(tiny.draw_demo_image(kind, i)))
