"""FLUX.2-klein (4B, `Flux2KleinPipeline`): the adapter.

Everything that must match the stock pipeline is taken FROM the pipeline module or class
(`encode_prompt` / `_get_qwen3_prompt_embeds`, `prepare_image_latents` with `_encode_vae_image`,
`_prepare_image_ids`, `_pack_latents`, `_prepare_latent_ids`, `_prepare_text_ids`,
`compute_empirical_mu`, `retrieve_timesteps`, the image processor, the default
`text_encoder_out_layers`), so a diffusers change that alters inference is inherited here.

Conventions in `Flux2KleinPipeline.__call__` (diffusers 0.42):
  * the state is the patchified latent [B, 128, H/16, W/16] that `prepare_latents` draws (and
    accepts as `latents=`); the transformer sees it packed to a sequence [B, H/16·W/16, 128];
    we keep the 4-D form as our state (same numbers, the pipeline's noise layout), and pack /
    unpack at every transformer call;
  * sigmas = linspace(1, 1/N, N) shifted with mu = compute_empirical_mu(seq len, N) (dynamic
    shifting); timestep t = 1000·sigma, the transformer gets t/1000 (it multiplies by 1000);
  * the transformer predicts the velocity of `scheduler.step` directly (no sign flip);
  * the distilled model runs without guidance (is_distilled: no CFG).

Teachers:
  * `edit` (default; the authors' klein recipe): klein's own reference-image branch. The target
    image goes through the pipeline's reference-image preprocessing and `prepare_image_latents`
    (VAE mode, 2x2 patchify, batch-norm normalisation, T=10 position ids, packing); those tokens
    are appended to the noisy-latent sequence exactly as the pipeline does for `image=`, the
    caption gets `cfg.edit_instruction` appended, and the prediction is read off the noisy part.
    Where the reference goes, checked on the 9B (tests/test_klein9b.py) after users of the authors'
    code reported their 9B edit teacher drifting into a zoom after ~10 steps (vvvvvjdy/D-OPSD issue
    #10; the thread itself could not be read from here): position ids T = 10, H/W on the generated
    image's own grid, L = 0; ONE timestep for the noisy and the reference tokens (klein's transformer
    modulates every token with the step's t); the reference at the training size. Nothing in this
    differs between the 4B and the 9B (one pipeline class, no size-dependent constant), so placement
    does not explain a 9B-only drift here. The one way we found to make the teacher zoom is scale: a
    reference given at its own size (the pipeline keeps an `image=` up to 1024² as it is) while the
    image is generated smaller puts the reference's content at a larger scale on the same position
    grid; `reference_pixels` prevents that by resizing to the training size, and the test pins it.
  * `vlm` (paper): the grafted Qwen3-VL (`teacher_vlm.py`) read at the layers the pipeline stacks,
    padded to max_sequence_length as the pipeline pads a caption (the transformer sees the pad
    tokens' states too: it always had 512 text tokens in training).
"""
from __future__ import annotations

import inspect
import json
from functools import cached_property

import torch
from torch import nn

from ..data import Item, load_rgb
from ..errors import UserError
from ..files import folder_identity
from ..runtime import DTYPES, release
from . import comfy
from .base import BlockProbe, Cond, Tokens, image_tokens, register
from .reference import ReferenceImageFamily, edit_prompt


def _pipeline_class():
    from diffusers import Flux2KleinPipeline
    return Flux2KleinPipeline


def text_layers() -> tuple[int, ...]:
    """The hidden layers the pipeline stacks by default (its `text_encoder_out_layers`): (9, 18, 27)."""
    sig = inspect.signature(_pipeline_class().__call__)
    return tuple(sig.parameters["text_encoder_out_layers"].default)


@register
class Klein(ReferenceImageFamily):
    name = "klein"
    one_pass_per_micro_batch = False  # conditions of different lengths run one at a time (velocity)
    pipeline_class = "Flux2KleinPipeline"
    default_rollout_steps = 4     # the distilled model's 4 steps
    default_lr = 1e-5             # paper App. D
    default_full_lr = 8e-6        # paper App. D, full fine-tuning (batch 256)
    # Every linear of every transformer block: attention q/k/v/out of both streams of the
    # double-stream blocks, their FFNs (image and text), and the single-stream blocks' fused
    # projections (`to_qkv_mlp_proj` = q/k/v + FFN-in, `to_out` = attention-out + FFN-out).
    # For reference: diffusers' train_dreambooth_lora_flux2_klein.py defaults to the image-stream
    # q/k/v/out plus the two single-stream projections; the authors' klein code names both streams'
    # attention and Flux-1 FFN names that match nothing in Flux2 (so: double-stream attention only).
    # We take the union with the FFNs, as the Z-Image family does (attention + FFN of every block):
    # ~96M LoRA parameters at rank 64 on the 4B. Embedders, modulation and the final layer stay frozen.
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                    "attn.to_qkv_mlp_proj", "attn.to_out")
    # The 9B is the same pipeline class with a larger transformer (8 + 24 blocks, width 4096) and a Qwen3-8B
    # text encoder; nothing here depends on the size (published/README.md has both configs and sources).
    hf_repo_ids = ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B")
    near_misses = {"Flux2KleinKVPipeline": (
        "klein-9b-kv is not trained here: its text-to-image path is klein 9B's, but its reference-image path "
        "is another model's. It puts the reference tokens first, modulates them at timestep 0 and lets them "
        "attend only to themselves (diffusers' Flux2KleinKVPipeline, kv_cache_mode='extract'), where klein "
        "appends them after the generated image's tokens at the step's timestep with full attention, so "
        "klein's edit teacher would ask the KV model for a layout it was not distilled on. Train "
        "black-forest-labs/FLUX.2-klein-9B instead.")}
    transformer_class = "Flux2Transformer2DModel"
    quant_skip = ("time_guidance_embed", "x_embedder", "context_embedder", "norm_out", "proj_out")

    @property
    def vlm_hidden_layers(self) -> tuple[int, ...]:  # the layers the pipeline stacks (9, 18, 27)
        return text_layers()
    vlm_padded = True  # _get_qwen3_prompt_embeds: padding="max_length", every state to the transformer
    required_components = ("transformer", "text_encoder", "tokenizer", "scheduler", "vae")

    comfy_layout = comfy.KLEIN

    # ------------------------------------------------------------------ the memory planner
    k_block = {"transformer_blocks": 46.2, "single_transformer_blocks": 48.1}
    c_fwd, c_fwd_fused = 38.5, 21.6
    # the 4B (hf_repo_ids[0]); the 9B is predicted from it
    measured_rollout_s = {"H100 SXM": {"fused": 2.27, "act8": 1.92, "quanto": 2.49}}
    measured_in = "benchmarks/results/train-step-klein-h100.md, code of 44476b3"
    rollout_s_h100 = measured_rollout_s["H100 SXM"]["fused"]  # edit teacher (scaling.py)

    @classmethod
    def plan_tokens(cls, height: int, width: int, text_student: int, text_teacher: int, teacher: str) -> Tokens:
        img = image_tokens(height, width)  # no padding; the edit teacher's reference latents double the image
        if teacher == "edit":  # its caption (+ edit instruction) is encoded as the student's: max_sequence_length
            return Tokens(img, text_student, text_student, 2 * img)
        return Tokens(img, text_student, text_teacher, img)

    @classmethod
    def block_streams(cls, blocks: dict[str, int], tok: Tokens) -> list[tuple[str, int, int]]:
        # both kinds of block see the image and the caption joined
        return [("transformer_blocks", blocks.get("transformer_blocks", 0), tok.student),
                ("single_transformer_blocks", blocks.get("single_transformer_blocks", 0), tok.student)]

    @classmethod
    def tiny_transformer(cls, dim_heads: int) -> nn.Module:
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=dim_heads, joint_attention_dim=64,
                                       mlp_ratio=3.0, guidance_embeds=False).to(torch.bfloat16)

    @classmethod
    def block_probes(cls, model: nn.Module, tokens: int, text: int, batch: int) -> dict[str, BlockProbe]:
        dim = model.inner_dim
        hs = torch.randn(batch, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
        enc = torch.randn(batch, text, dim, dtype=torch.bfloat16, requires_grad=True)
        joined = torch.randn(batch, tokens + text, dim, dtype=torch.bfloat16, requires_grad=True)
        temb = torch.randn(batch, dim, dtype=torch.bfloat16)
        with torch.no_grad():
            mod_img, mod_txt = model.double_stream_modulation_img(temb), model.double_stream_modulation_txt(temb)
            mod_single = model.single_stream_modulation(temb)
            rot = model.pos_embed(torch.zeros(tokens + text, 4))
        double, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
        return {
            "transformer_blocks": BlockProbe(
                double, [hs, enc, *rot],
                lambda: double(hidden_states=hs, encoder_hidden_states=enc, temb_mod_img=mod_img,
                               temb_mod_txt=mod_txt, image_rotary_emb=rot, joint_attention_kwargs=None),
                tokens + text),
            "single_transformer_blocks": BlockProbe(single, [joined, *rot],
                                                    lambda: single(joined, None, mod_single, rot, None), tokens + text),
        }

    def check_components(self, model_index) -> None:
        super().check_components(model_index)
        if not model_index.get("is_distilled", False):
            raise UserError(
                f"'{self.model_id}' is a FLUX.2-klein base (not step-distilled) checkpoint: it samples in ~50 "
                "steps with guidance, and D-OPSD keeps a few-step model's few-step ability. Use a distilled "
                "klein such as black-forest-labs/FLUX.2-klein-4B.")

    chat_enable_thinking = False  # Flux2KleinPipeline._get_qwen3_prompt_embeds

    def run_notes(self, teacher: str, cfg) -> dict[str, str]:
        if teacher == "vlm":  # the 9B's default teacher encoder is not the shipped default: say which
            return {"teacher_encoder": self.teacher_encoder(cfg)}
        return super().run_notes(teacher, cfg)

    # ------------------------------------------------------------------ precompute
    def encoder_identity(self, teacher: str, cfg) -> dict:
        ident = {"family": self.name, "dtype": cfg.dtype,
                 "text_encoder": folder_identity(self.model_dir / "text_encoder"),
                 "tokenizer": folder_identity(self.model_dir / "tokenizer"), "hidden_layers": list(text_layers())}
        if teacher == "student":
            ident["max_sequence_length"] = cfg.max_sequence_length
        elif teacher == "edit":
            # The reference image is the item's image at its training size (set by `resolution`).
            ident.update(teacher=teacher, vae=folder_identity(self.model_dir / "vae"),
                         edit_instruction=cfg.edit_instruction, max_sequence_length=cfg.max_sequence_length,
                         resolution=cfg.resolution, reference="pipeline image_processor, resize_mode=crop")
        else:
            import importlib.util
            ident.update(teacher=teacher, vlm=folder_identity(self.vlm_dir(cfg)),
                         image_resize="torchvision" if importlib.util.find_spec("torchvision") else "pil",
                         max_sequence_length=cfg.teacher_max_sequence_length,
                         pixels=[cfg.vlm_min_pixels, cfg.vlm_max_pixels],
                         padded_to=self.vlm_pad_to(cfg), reply_prefix=self.vlm_reply_prefix(),
                         **self.vlm_image_identity(cfg))
        return ident

    def _encode_prompts(self, prompts: list[str], cfg, device: torch.device) -> list[torch.Tensor]:
        """The pipeline's own prompt encoding ([max_sequence_length, 3·D] each, padding included,
        as the transformer sees it), with no transformer/VAE loaded."""
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        dtype = DTYPES[cfg.dtype]
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir / "tokenizer")
        text_encoder = Qwen3ForCausalLM.from_pretrained(self.model_dir / "text_encoder", dtype=dtype,
                                                        use_safetensors=True)
        text_encoder.to(device).eval()
        pipe = _pipeline_class()(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                                 transformer=None, is_distilled=True)
        out = []
        for start in range(0, len(prompts), 8):
            embeds, _ = pipe.encode_prompt(prompt=list(prompts[start:start + 8]), device=device,
                                           max_sequence_length=cfg.max_sequence_length,
                                           text_encoder_out_layers=text_layers())
            out += [e.to(dtype).cpu() for e in embeds]
        del pipe
        release(text_encoder)
        return out

    def _encode_vlm(self, items: list[Item], cfg, device: torch.device) -> list[Cond]:
        return self.encode_vlm_teacher(items, cfg, device)  # the grafted Qwen3-VL (teacher_vlm.py)

    def _encode_edit(self, items: list[Item], cfg, device: torch.device) -> list[Cond]:
        from diffusers import AutoencoderKLFlux2

        dtype = DTYPES[cfg.dtype]
        caps = self._encode_prompts([edit_prompt(it.caption, cfg.edit_instruction) for it in items], cfg, device)
        # Text encoder released; now the VAE (the pipeline loads it in the same dtype as the rest).
        vae = AutoencoderKLFlux2.from_pretrained(self.model_dir / "vae", dtype=dtype, use_safetensors=True)
        vae = vae.to(device).eval()
        pipe = _pipeline_class()(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None,
                                 is_distilled=True)
        out = []
        for item, cap in zip(items, caps):
            image = load_rgb(item.image_path)
            try:
                pipe.image_processor.check_image_input(image)  # the pipeline's limits for `image=`
            except ValueError as exc:
                raise UserError(f"{item.image_path.name} cannot be klein's reference image: {exc}. Use a larger "
                                "image, or the vlm teacher (--teacher vlm).") from exc
            pixels = self.reference_pixels(pipe, image, item.width, item.height)
            ref, ref_ids = pipe.prepare_image_latents(images=[pixels], batch_size=1, generator=None, device=device,
                                                      dtype=vae.dtype)
            out.append({"cap": cap, "ref": ref[0].to(dtype).cpu(), "ref_ids": ref_ids[0].cpu()})
        del pipe
        release(vae)
        return out

    @staticmethod
    def reference_pixels(pipe, image, width: int, height: int) -> torch.Tensor:
        """The target image as the pipeline preprocesses a reference image (`image=`), at the training size.

        The pipeline keeps a reference at its own size (capped at 1024² area, floored to multiples of
        16); here it is the item's training size (its aspect, about `resolution`²), so the teacher's
        reference tokens match the student's latent grid, as in the authors' code.
        """
        return pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")

    # ------------------------------------------------------------------ training
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        s = self.vae_scale_factor * 2  # Flux2KleinPipeline.prepare_latents: (C·4, H/16, W/16)
        return (self.in_channels, height // s, width // s)

    def sigmas(self, height: int, width: int, steps: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        sched = self.scheduler()
        sigmas = np.linspace(1.0, 1 / steps, steps)  # as Flux2KleinPipeline.__call__, step 6
        if hasattr(sched.config, "use_flow_sigmas") and sched.config.use_flow_sigmas:
            sigmas = None
        _, h, w = self.latent_shape(height, width)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=steps)
        retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
        return sched.sigmas.detach().clone().float()

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, conds: list[Cond],
                 sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        """Pack x, run the transformer as the pipeline's denoising loop does, read off the noisy tokens.

        The transformer takes one set of position ids for the whole batch, so items whose conditions
        differ in shape (VLM features of different lengths) are run one at a time.
        """
        shapes = {tuple((k, tuple(v.shape)) for k, v in sorted(c.items())) for c in conds}
        if len(shapes) > 1:
            return torch.cat([self.velocity(transformer, x[i:i + 1], sigma, [c], sigma_next)
                              for i, c in enumerate(conds)])
        pipe = _pipeline_class()
        dtype = getattr(transformer, "_dopsd_dtype", None) or transformer.dtype
        b, c, h, w = x.shape
        latents = pipe._pack_latents(x)                       # [B, h·w, C]
        img_ids = self._ids(pipe._prepare_latent_ids, x)     # [B, h·w, 4]
        hidden = latents.to(dtype)
        cap = torch.stack([cond["cap"] for cond in conds]).to(x.device, dtype)
        txt_ids = self._ids(pipe._prepare_text_ids, cap)
        if "ref" in conds[0]:  # edit teacher: reference tokens after the noisy ones, as for `image=`
            ref = torch.stack([cond["ref"] for cond in conds]).to(x.device, dtype)
            ref_ids = torch.stack([cond["ref_ids"] for cond in conds]).to(x.device)
            hidden = torch.cat([hidden, ref], dim=1)
            img_ids = torch.cat([img_ids, ref_ids], dim=1)
        t = (torch.as_tensor(sigma, dtype=torch.float32) * 1000.0).to(x.device)    # scheduler.timesteps = sigmas * 1000
        timestep = t.expand(b).to(dtype) / 1000               # the pipeline passes timestep / 1000
        out = transformer(hidden_states=hidden, timestep=timestep, guidance=None, encoder_hidden_states=cap,
                          txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        out = out[:, : h * w].float()                          # the noisy-latent part of the sequence
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    def random_conditions(self, teacher: str, cfg, device: torch.device, dtype: torch.dtype) -> tuple[Cond, Cond]:
        # captions padded to max_sequence_length ([L, joint_attention_dim]: 3 stacked text-encoder layers), the
        # VLM teacher's to the shorter limit; the edit teacher's reference latent packed to tokens with its T=10
        # position ids, as prepare_image_latents does
        width = json.loads((self.model_dir / "transformer" / "config.json").read_text())["joint_attention_dim"]
        if teacher == "vlm":
            return ({"cap": torch.randn(cfg.max_sequence_length, width, dtype=dtype, device=device)},
                    {"cap": torch.randn(self.vlm_pad_to(cfg), width, dtype=dtype, device=device)})
        caps = torch.randn(2, cfg.max_sequence_length, width, dtype=dtype, device=device)
        ref = torch.randn((1, *self.latent_shape(cfg.resolution, cfg.resolution)), dtype=dtype, device=device)
        pipe = _pipeline_class()
        return {"cap": caps[0]}, {"cap": caps[1], "ref": pipe._pack_latents(ref)[0],
                                  "ref_ids": pipe._prepare_image_ids([ref])[0].to(device)}

    def _ids(self, make, like: torch.Tensor) -> torch.Tensor:
        """`make(like)` on `like`'s device, made once per shape: the pipeline builds position ids from
        the shape alone, on the CPU, and copying them to the GPU in every pass would make the host
        wait for the GPU there (a synchronous copy) several times per pass."""
        key = (make.__name__, tuple(like.shape), like.device)
        if key not in self._id_cache:
            self._id_cache[key] = make(like).to(like.device)
        return self._id_cache[key]

    @cached_property
    def _id_cache(self) -> dict:
        return {}

    # ------------------------------------------------------------------ output
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list:
        """States (as `latent_shape`, batch first) -> PIL images, decoded as the pipeline decodes.

        The VAE is loaded for this call and released after it (previews are rare).
        """
        from diffusers import AutoencoderKLFlux2

        pipe_cls = _pipeline_class()
        device = latents.device
        dtype = self._dtype if device.type != "cpu" else torch.float32
        vae = AutoencoderKLFlux2.from_pretrained(self.model_dir / "vae", dtype=dtype, use_safetensors=True)
        vae = vae.to(device).eval()
        pipe = pipe_cls(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, transformer=None,
                        is_distilled=True)
        x = latents.to(device, dtype)
        # The pipeline unpacks its sequence with the latent ids: that is our 4-D state itself.
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        x = pipe._unpatchify_latents(x * std + mean)
        image = vae.decode(x, return_dict=False)[0]
        images = pipe.image_processor.postprocess(image, output_type="pil")
        del pipe
        release(vae)
        return images
