"""Z-Image-Turbo (6B, `ZImagePipeline`): the adapter.

Everything that must match the stock pipeline is taken FROM the pipeline module itself
(`_encode_prompt`, `calculate_shift`, `get_default_z_image_sigmas`, `retrieve_timesteps`), so a
diffusers change that alters inference is inherited here instead of silently diverging.

Conventions in `ZImagePipeline.__call__` (diffusers 0.42):
  * scheduler timesteps t = 1000·sigma; the transformer gets (1000 - t) / 1000, i.e. 0 = noise;
  * the transformer predicts the negated velocity: the pipeline steps with `-model_out`;
  * latents are float32 and cast to the transformer dtype at its input; guidance_scale = 0 (Turbo).
"""
from __future__ import annotations

import importlib.util
import json

import torch
from torch import nn

from ..data import Item
from ..errors import UserError
from ..files import folder_identity
from ..runtime import DTYPES, release
from . import comfy
from .base import BlockProbe, Cond, DiffusersFamily, Tokens, image_tokens, register


@register
class ZImage(DiffusersFamily):
    name = "zimage"
    pipeline_class = "ZImagePipeline"
    teachers = ("vlm",)
    default_rollout_steps = 8     # the model card's 8 NFEs
    default_lr = 4e-5             # paper App. D
    default_full_lr = 3e-5        # paper App. D, full fine-tuning (batch 256)
    # The authors' targets: attention q/k/v/out and the SwiGLU FFN of every block (refiners too).
    lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    hf_repo_ids = ("Tongyi-MAI/Z-Image-Turbo",)
    transformer_class = "ZImageTransformer2DModel"
    quant_skip = ("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer")
    vlm_hidden_layers = (-2,)  # ZImagePipeline._encode_prompt: hidden_states[-2]
    required_components = ("transformer", "text_encoder", "tokenizer", "scheduler", "vae")
    pipeline_call_kwargs = {"guidance_scale": 0.0}  # Turbo: no CFG, as the model card samples

    comfy_layout = comfy.ZIMAGE

    # ------------------------------------------------------------------ the memory planner
    # Refiners and main layers are the same block class (diffusers 0.42): one measured value.
    k_block = {"noise_refiner": 67.5, "context_refiner": 67.5, "layers": 67.5}
    c_fwd, c_fwd_fused = 18.6, 15.8
    measured_rollout_s = {"H100 SXM": {"fused": 7.73, "act8": 7.25, "quanto": 8.61, "bf16": 7.72}}
    measured_in = "benchmarks/results/train-profile-h100.md, code of 44476b3"
    rollout_s_h100 = measured_rollout_s["H100 SXM"]["fused"]  # (scaling.py)

    @classmethod
    def plan_tokens(cls, height: int, width: int, text_student: int, text_teacher: int, teacher: str) -> Tokens:
        def padded(n: int) -> int:  # the transformer pads captions and images to multiples of 32 tokens
            return -(-n // 32) * 32

        img = padded(image_tokens(height, width))
        return Tokens(img, padded(text_student), padded(text_teacher), img)

    @classmethod
    def block_streams(cls, blocks: dict[str, int], tok: Tokens) -> list[tuple[str, int, int]]:
        # the refiners see the image and the caption apart, the main layers both joined
        return [("noise_refiner", blocks.get("noise_refiner", 0), tok.img),
                ("context_refiner", blocks.get("context_refiner", 0), tok.text_student),
                ("layers", blocks.get("layers", 0), tok.student)]

    @classmethod
    def tiny_transformer(cls, dim_heads: int) -> nn.Module:
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel(in_channels=16, dim=dim_heads * 128, n_layers=1, n_refiner_layers=1,
                                        n_heads=dim_heads, n_kv_heads=dim_heads, cap_feat_dim=64,
                                        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]).to(torch.bfloat16)

    @classmethod
    def block_probes(cls, model: nn.Module, tokens: int, text: int, batch: int) -> dict[str, BlockProbe]:
        dim = model.config.dim
        x = torch.randn(batch, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
        freqs = torch.randn(batch, tokens, 64, dtype=torch.complex64)
        adaln = torch.randn(batch, min(dim, 256), dtype=torch.bfloat16)  # the time embedding: min(dim, 256) wide
        block = model.layers[0]
        return {"layers": BlockProbe(block, [x, freqs], lambda: block(x, None, freqs, adaln), tokens)}

    # ------------------------------------------------------------------ precompute
    def encoder_identity(self, teacher: str, cfg) -> dict:
        ident = {"family": self.name, "dtype": cfg.dtype,
                 "text_encoder": folder_identity(self.model_dir / "text_encoder"),
                 "tokenizer": folder_identity(self.model_dir / "tokenizer")}
        if teacher == "student":
            ident["max_sequence_length"] = cfg.max_sequence_length
        else:
            # The processor (torchvision) and fallback (PIL) paths resize images slightly differently.
            ident.update(teacher=teacher, vlm=folder_identity(self.vlm_dir(cfg)),
                         image_resize="torchvision" if importlib.util.find_spec("torchvision") else "pil",
                         max_sequence_length=cfg.teacher_max_sequence_length,
                         pixels=[cfg.vlm_min_pixels, cfg.vlm_max_pixels], hidden_layers=[-2],
                         **self.vlm_image_identity(cfg))
        return ident

    @torch.no_grad()
    def encode_student(self, captions: list[str], cfg, device: torch.device) -> list[Cond]:
        from diffusers import ZImagePipeline
        from transformers import AutoModel, AutoTokenizer

        dtype = DTYPES[cfg.dtype]
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        text_encoder = AutoModel.from_pretrained(self.model_dir / "text_encoder", dtype=dtype,
                                                 use_safetensors=True).to(device).eval()
        # The pipeline's own prompt encoding, with no transformer/VAE loaded.
        pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=None)
        out = []
        for start in range(0, len(captions), 8):
            chunk = list(captions[start:start + 8])  # _encode_prompt edits its list in place
            embeds = pipe._encode_prompt(prompt=chunk, device=device, max_sequence_length=cfg.max_sequence_length)
            out += [{"cap": e.to(dtype).cpu()} for e in embeds]
        del pipe
        release(text_encoder)
        return out

    @torch.no_grad()
    def encode_teacher(self, items: list[Item], teacher: str, cfg, device: torch.device) -> list[Cond]:
        if teacher != "vlm":
            raise UserError(f"Z-Image-Turbo supports the teacher kinds {self.teachers}, not '{teacher}'.")
        return self.encode_vlm_teacher(items, cfg, device)

    # ------------------------------------------------------------------ training
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        s = self.vae_scale_factor * 2  # ZImagePipeline.prepare_latents
        return (self.in_channels, 2 * (height // s), 2 * (width // s))

    def sigmas(self, height: int, width: int, steps: int) -> torch.Tensor:
        from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                                  retrieve_timesteps)
        sched = self.scheduler()
        _, h, w = self.latent_shape(height, width)
        image_seq_len = (h // 2) * (w // 2)
        c = sched.config
        mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        retrieve_timesteps(sched, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
        return sched.sigmas.detach().clone().float()

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, conds: list[Cond],
                 sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        dtype = getattr(transformer, "_dopsd_dtype", None) or transformer.dtype  # pipeline: transformer.dtype
        t = sigma.to(torch.float32) * 1000.0   # scheduler.timesteps = sigmas * num_train_timesteps
        t = ((1000.0 - t) / 1000.0).to(x.device).expand(x.shape[0])
        caps = [c["cap"].to(x.device, dtype) for c in conds]
        out = transformer(list(x.to(dtype).unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        return -torch.stack([o.float() for o in out], dim=0).squeeze(2)

    def random_conditions(self, teacher: str, cfg, device: torch.device, dtype: torch.dtype) -> tuple[Cond, Cond]:
        # caption features [L, cap_feat_dim]; the VLM teacher's are longer (image tokens)
        feat = json.loads((self.model_dir / "transformer" / "config.json").read_text())["cap_feat_dim"]
        return ({"cap": torch.randn(cfg.max_sequence_length, feat, dtype=dtype, device=device)},
                {"cap": torch.randn(cfg.teacher_max_sequence_length, feat, dtype=dtype, device=device)})

    # ------------------------------------------------------------------ previews
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list:
        """As `ZImagePipeline.__call__` after the loop: unscale, unshift, VAE decode, postprocess to PIL.

        The VAE runs in bf16 on a GPU (as the pipeline loaded in bf16) and fp32 on the CPU, one image
        at a time (a 1024² decode is the peak), and is released before returning.
        """
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        device = latents.device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        vae = AutoencoderKL.from_pretrained(self.model_dir / "vae", dtype=dtype, use_safetensors=True).to(device).eval()
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        images = []
        try:
            for lat in latents.split(1):
                lat = lat.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
                images += processor.postprocess(vae.decode(lat, return_dict=False)[0], output_type="pil")
        finally:
            release(vae)
        return images
