"""FLUX.3 Image Klein, step-distilled (`Flux3DistilledModularPipeline`, a diffusers modular pipeline).

Everything that must match the stock pipeline runs THROUGH the pipeline's own blocks, each as a small
pipeline of its own (`Block().init_pipeline()` with our components): the prompt encoding
(`Flux3DistilledTextEncoderStep`), the reference image (`Flux3VaeEncoderSequentialStep`: the image
processor's padding to the token grid, VAE mode, 2x2 patchify, batch-norm normalisation, then
`Flux3PrepareImageCondLatentsStep`: tokens and position ids), the decoding (`Flux3DecodeStep`), the
scheduler as `Flux3SetTimestepsStep` makes it, and the position ids of image and text tokens
(`_prepare_image_ids`, `_prepare_text_ids`).

Conventions of the distilled pipeline (diffusers 0.42.1, modular_pipelines/flux3):
  * the state is the packed latent [B, 128, H/16, W/16] that `Flux3PrepareLatentsStep` draws (and
    accepts as `latents=`); the transformer sees it flattened to tokens [B, H/16·W/16, 128];
  * sigmas = linspace(1, 1/N, N) with the scheduler's constant shift 6.93 (no dynamic shifting, so the
    schedule does not depend on the size); N = 16 by default;
  * the transformer is a FLOW MAP: besides the timestep t = sigma it takes the timestep the step
    jumps to (`target_timestep` = the next sigma, 0 after the last), so `velocity` needs `sigma_next`;
    its output is the velocity of `scheduler.step` (x_next = x + (sigma_next - sigma)·v);
  * the prompt goes through Qwen3-VL-4B's chat template, is right-padded to a multiple of 80 tokens
    (the transformer attends to the padding, whose position ids are 1), and hidden states 4, 8, ..., 32
    are stacked per token: [L, 8·2560];
  * image H/W position ids are scaled by 0.5; a reference image's tokens sit at l = -1 and at
    timestep 0 (the transformer modulates them with t = 0 whatever the step).

Teachers:
  * `edit` (default): the pipeline's own reference-image path. Your photo at the training size goes
    through exactly what the pipeline does with `image=` (one reference), the caption gets
    `cfg.edit_instruction` appended, and the prediction is read off the generated image's tokens. It
    is the default because it is a path the model was trained on, with nothing outside the pipeline.
  * `vlm` (the paper's premise, no graft needed): FLUX.3's text encoder IS Qwen3-VL, so it reads the
    caption and your photo in one user message, [image, caption], with the text path's template,
    80-token windows, pad positions and layers. The pipeline itself never gives its encoder an image
    (a reference goes through the VAE; only the optional prompt upsampler, a separate Qwen3.5 model,
    looks at pictures), so this condition is one the transformer was not trained on: offered, not
    the default.
"""
from __future__ import annotations

import json
import math
from functools import cached_property

import torch
from torch import nn

from ..data import Item, load_rgb, training_crop
from ..errors import UserError
from ..files import folder_identity
from ..runtime import DTYPES, release
from .base import BlockProbe, Cond, Tokens, image_tokens, register
from .reference import ReferenceImageFamily, edit_prompt

PIPELINE = "Flux3DistilledModularPipeline"


def _blocks():
    """The pipeline's block modules (imported when first needed: they import transformers' Qwen3-VL)."""
    from diffusers.modular_pipelines.flux3 import before_denoise, decoders, encoders
    return before_denoise, encoders, decoders


def text_layers() -> tuple[int, ...]:
    """The hidden layers the distilled text encoder step stacks by default: (4, 8, ..., 32)."""
    _, encoders, _ = _blocks()
    step = encoders.Flux3DistilledTextEncoderStep()
    return tuple(next(p.default for p in step.inputs if p.name == "text_encoder_out_layers"))


class PromptProcessor:
    """What the pipeline's prompt encoder uses of its `tokenizer` component (an AutoProcessor) for a
    text prompt: `apply_chat_template` with the processor's chat template, and `.tokenizer`.

    Qwen3VLProcessor cannot be loaded without torchvision (its video processor needs it); the prompt
    encoder never touches images or video, so then this stand-in, built from the same folder, gives
    it the same template and tokenizer."""

    def __init__(self, tokenizer, chat_template: str):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


def window(real_length: int, pad_multiple: int, max_length: int) -> int:
    """Tokens the prompt encoder hands the transformer: the prompt rounded up to the pad multiple,
    at most `max_length` (Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds)."""
    return min(math.ceil(real_length / pad_multiple) * pad_multiple, max_length)


@torch.inference_mode()
def encoder_states(model, inputs: dict[str, torch.Tensor], layers: tuple[int, ...], length: int,
                   pad_token_id: int) -> torch.Tensor:
    """The stacked hidden states [length, len(layers)·D] of one message (batch 1, no padding yet), as
    the pipeline's prompt encoder computes them: right-padded to `length` tokens (or cut to it, the
    model being causal), the padding masked as keys but computed, at position 1 (the position its
    training environment, transformers 4.57, gave padding). With an image in the message the real
    tokens' positions are Qwen3-VL's M-RoPE ones; a text-only message gets 0, 1, 2, ... on every axis,
    exactly the pipeline's explicit position ids."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs.get("mm_token_type_ids", torch.zeros_like(ids))
    n = length - ids.shape[1]
    if n > 0:
        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([t, t.new_full((t.shape[0], n), value)], dim=1)
        ids, mask, types = pad(ids, pad_token_id), pad(mask, 0), pad(types, 0)
    positions, _ = model.model.get_rope_index(input_ids=ids, mm_token_type_ids=types,
                                              image_grid_thw=inputs.get("image_grid_thw"), attention_mask=mask)
    positions = positions.masked_fill(mask[None] == 0, 1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    hidden = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, position_ids=positions,
                   output_hidden_states=True, use_cache=False, **extra).hidden_states
    stacked = torch.stack([hidden[k][0] for k in layers], dim=1)  # [S, K, D], as the pipeline's permute
    return stacked.reshape(stacked.shape[0], -1)[:length].cpu()


# A full fine-tune's single file in the original layout, as diffusers' own converter reads it
# (convert_flux3_transformer_checkpoint_to_diffusers, loaders/single_file_utils.py, diffusers 0.42.1): its renames
# run backwards. Not for ComfyUI, which has no FLUX.3 model (docs/flux3.md).
_ORIGINAL_NAMES = {"timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
                   "timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
                   "target_timestep_embedder.linear_1.weight": "ref_time_in.in_layer.weight",
                   "target_timestep_embedder.linear_2.weight": "ref_time_in.out_layer.weight",
                   "proj_out.weight": "final_layer.image.linear.weight",
                   "norm_out.linear.weight": "final_layer.image.adaLN_modulation.1.weight"}
_ORIGINAL_PREFIXES = {"x_embedders.": "emb_in.", "context_embedder.": "txt_in.", "mode_blocks.": "content_mode_blocks.",
                      "single_transformer_blocks.": "single_blocks."}
_ORIGINAL_SUFFIXES = {"attn.to_q.weight": "q_proj.weight", "attn.to_k.weight": "k_proj.weight",
                      "attn.to_v.weight": "v_proj.weight", "attn.to_out.0.weight": "attn_out.weight",
                      "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale",
                      "ff.linear_in.weight": "mlp_in.weight", "ff.linear_out.weight": "mlp_out.weight"}


def to_original(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' tensors of a FLUX.3 transformer -> the original names `from_single_file` converts back."""
    out = {}
    for key, t in tensors.items():
        if key in _ORIGINAL_NAMES:
            if key == "norm_out.linear.weight":  # diffusers' [scale, shift] rows are the original's [shift, scale]
                t = torch.cat(t.chunk(2)[::-1])
            out[_ORIGINAL_NAMES[key]] = t
            continue
        prefix = next((p for p in _ORIGINAL_PREFIXES if key.startswith(p)), "")
        if prefix:
            key = _ORIGINAL_PREFIXES[prefix] + key[len(prefix):]
        key = key.replace(".linear.weight", ".lin.weight")
        suffix = next((s for s in _ORIGINAL_SUFFIXES if key.endswith(s)), "")
        out[key[:len(key) - len(suffix)] + _ORIGINAL_SUFFIXES[suffix] if suffix else key] = t
    return out


@register
class Flux3(ReferenceImageFamily):
    name = "flux3"
    one_pass_per_micro_batch = False  # conditions of different lengths run one at a time (velocity)
    pipeline_class = PIPELINE
    # The distilled blocks' Flux3SetTimestepsStep(num_inference_steps=16); a roll-out visits 16 states.
    default_rollout_steps = 16
    # Learn at 4 random states of each 16-step roll-out: the other 12 cost one forward each (no teacher,
    # no backward), so a step costs about 4·5 + 12 = 32 forward passes instead of 16·5 = 80 (0.4x);
    # peak memory is that of one trained state either way. Every state is still on-policy.
    default_train_states = 4
    # No published D-OPSD learning rate for FLUX.3; klein's (paper App. D), the same makers' distilled
    # flow transformer at LoRA rank 64.
    default_lr = 1e-5
    # Attention q/k/v/out and FFN of the text blocks, the generated image's blocks and the joint blocks.
    # Not the reference image's own blocks (mode_blocks.image_cond): only the edit teacher runs them and
    # the student never does, so a LoRA there would get no gradient (and cost ~12% more LoRA memory).
    lora_targets = tuple(f"{blocks}.*.{linear}"
                         for blocks in ("txt_mode_blocks", "mode_blocks.image", "single_transformer_blocks")
                         for linear in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                        "ff.linear_in", "ff.linear_out"))
    # The id diffusers' own single-file loader gives the distilled checkpoint (loaders/single_file_utils.py,
    # DIFFUSERS_DEFAULT_PIPELINE_PATHS["flux-3-image-distilled"]); its files could not be read from here.
    hf_repo_ids = ("black-forest-labs/flux-3-image-klein",)
    unpublished_configs = {hf_repo_ids[0]: "NOT its published config (unread here): diffusers' "
                                           "Flux3Transformer2DModel defaults + flow_map"}
    transformer_class = "Flux3Transformer2DModel"
    # Embedders and the output layer stay in the compute dtype (as klein's); the per-token modulations
    # are block-sized linears and go 8-bit with the blocks.
    quant_skip = ("timestep_embedder", "target_timestep_embedder", "x_embedders", "context_embedder", "norm_out",
                  "proj_out")
    required_components = ("transformer", "text_encoder", "tokenizer", "vae")  # scheduler: from the blocks

    @classmethod
    def single_file_layout(cls):
        return to_original

    def check_components(self, model_index) -> None:
        super().check_components(model_index)
        config = json.loads((self.model_dir / "transformer" / "config.json").read_text())
        if not config.get("flow_map", False):
            raise UserError(f"'{self.model_id}' is a FLUX.3 checkpoint without the flow-map (step-distilled) "
                            "transformer: it samples in ~50 steps with guidance, and D-OPSD keeps a few-step "
                            "model's few-step ability. Use the distilled FLUX.3 Image Klein.")

    # ------------------------------------------------------------------ the memory planner
    # k_block: measured with plan.measure_block_activations on the real blocks (diffusers 0.42.1, bf16,
    # LoRA on; the same at batch 1 and 2, and on qint8). The c_fwds are NOT calibrated on a GPU for
    # FLUX.3 (no GPU here): klein's, whose blocks are of the same kind (parallel attention + SwiGLU FFN,
    # mlp ratio 3), plus the per-token modulations that live through the pass (c_outside).
    k_block = {"txt_mode_blocks": 44.4, "mode_blocks.image": 44.3, "single_transformer_blocks": 44.3}
    c_outside = 7.0  # silu(timestep embedding) [N, D] + two modulations [T, 3D] per image token (text: 6)
    c_fwd, c_fwd_fused = 38.5 + c_outside, 21.6 + c_outside
    teacher_only_blocks = ("mode_blocks.image_cond",)

    @classmethod
    def plan_tokens(cls, height: int, width: int, text_student: int, text_teacher: int, teacher: str) -> Tokens:
        # captions are 80-token windows up to max_sequence_length: planned at that limit (the worst case);
        # the edit teacher's reference tokens double the image's, as for klein
        img = image_tokens(height, width)
        return Tokens(img, text_student, text_teacher if teacher == "vlm" else text_student,
                      2 * img if teacher == "edit" else img)

    @classmethod
    def block_streams(cls, blocks: dict[str, int], tok: Tokens) -> list[tuple[str, int, int]]:
        # each mode's own blocks see its tokens alone, the joint blocks both (mode_blocks.image has as
        # many blocks as txt_mode_blocks: one num_layers)
        return [("txt_mode_blocks", blocks.get("txt_mode_blocks", 0), tok.text_student),
                ("mode_blocks.image", blocks.get("mode_blocks.image", 0), tok.img),
                ("single_transformer_blocks", blocks.get("single_transformer_blocks", 0), tok.student)]

    @classmethod
    def tiny_transformer(cls, dim_heads: int) -> nn.Module:
        from diffusers import Flux3Transformer2DModel

        return Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=dim_heads, joint_attention_dim=64,
                                       mlp_ratio=3.0, flow_map=True).to(torch.bfloat16)

    @classmethod
    def block_probes(cls, model: nn.Module, tokens: int, text: int, batch: int) -> dict[str, BlockProbe]:
        # each block gets its states, a per-token modulation (made outside the blocks: c_outside) and the
        # rotary embedding of its tokens
        dim = model.inner_dim

        def states(n: int) -> torch.Tensor:
            return torch.randn(batch, n, dim, dtype=torch.bfloat16, requires_grad=True)

        with torch.no_grad():
            mod = torch.randn(batch, 1, 3 * dim, dtype=torch.bfloat16)
            rot_txt, rot_img = model.pos_embed(torch.zeros(text, 4)), model.pos_embed(torch.zeros(tokens, 4))
            rot_all = model.pos_embed(torch.zeros(text + tokens, 4))
        txt, img, joint_img, joint_txt = states(text), states(tokens), states(tokens), states(text)
        mod_txt, mod_img = mod.expand(batch, text, -1), mod.expand(batch, tokens, -1)
        txt_block, img_block = model.txt_mode_blocks[0], model.mode_blocks["image"][0]
        single = model.single_transformer_blocks[0]
        return {
            "txt_mode_blocks": BlockProbe(txt_block, [txt, *rot_txt], lambda: txt_block(txt, mod_txt, rot_txt), text),
            "mode_blocks.image": BlockProbe(img_block, [img, *rot_img], lambda: img_block(img, mod_img, rot_img),
                                            tokens),
            "single_transformer_blocks": BlockProbe(
                single, [joint_img, joint_txt, *rot_all],
                lambda: single(joint_img, joint_txt, mod_img, mod_txt, rot_all), tokens + text),
        }

    def random_conditions(self, teacher: str, cfg, device: torch.device, dtype: torch.dtype) -> tuple[Cond, Cond]:
        # prompts at their longest window (max_sequence_length), 8 stacked layers wide; the vlm teacher's
        # message (photo + caption) at its limit; the edit teacher's reference latent as tokens with the
        # l = -1 position ids Flux3PrepareImageCondLatentsStep gives them
        width = json.loads((self.model_dir / "transformer" / "config.json").read_text())["joint_attention_dim"]

        def cap(n: int) -> torch.Tensor:
            return torch.randn(n, width, dtype=dtype, device=device)

        if teacher == "vlm":
            return {"cap": cap(cfg.max_sequence_length)}, {"cap": cap(cfg.teacher_max_sequence_length)}
        before, _, _ = _blocks()
        c, h, w = self.latent_shape(cfg.resolution, cfg.resolution)
        ids = before._prepare_image_ids(h, w, before.Flux3PrepareImageCondLatentsStep().image_rope_scale, l_coord=-1)
        return {"cap": cap(cfg.max_sequence_length)}, {"cap": cap(cfg.max_sequence_length),
                                                       "ref": torch.randn(h * w, c, dtype=dtype, device=device),
                                                       "ref_ids": ids.to(device)}

    # ------------------------------------------------------------------ prompts
    @cached_property
    def _vlm_inputs(self):
        """The processor of tokenizer/ (or its fallback): the chat template, tokenizer, image processor."""
        from ..teacher_vlm import VlmInputBuilder
        return VlmInputBuilder(self.model_dir / "tokenizer", config_dir=self.model_dir / "text_encoder")

    def prompt_processor(self):
        """The `tokenizer` component the pipeline loads (AutoProcessor), or its text-only stand-in."""
        b = self._vlm_inputs
        return b.processor if b.processor is not None else PromptProcessor(b.tokenizer, b.chat_template)

    @cached_property
    def pad_multiple(self) -> int:
        _, encoders, _ = _blocks()
        return encoders.Flux3DistilledTextEncoderStep().pad_multiple

    def prompt_token_counts(self, prompts: list[str]) -> list[int]:
        processor = self.prompt_processor()
        return [len(processor.tokenizer(processor.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)).input_ids) for p in prompts]

    # ------------------------------------------------------------------ precompute
    def encoder_identity(self, teacher: str, cfg) -> dict:
        ident = {"family": self.name, "dtype": cfg.dtype,
                 "text_encoder": folder_identity(self.model_dir / "text_encoder"),
                 "tokenizer": folder_identity(self.model_dir / "tokenizer"), "hidden_layers": list(text_layers()),
                 "pad_multiple": self.pad_multiple, "pad_position": 1}
        if teacher == "student":
            ident["max_sequence_length"] = cfg.max_sequence_length
        elif teacher == "edit":
            ident.update(teacher=teacher, vae=folder_identity(self.model_dir / "vae"),
                         edit_instruction=cfg.edit_instruction, max_sequence_length=cfg.max_sequence_length,
                         resolution=cfg.resolution, reference="training crop, then the pipeline's fill preprocess")
        else:
            import importlib.util
            ident.update(teacher=teacher, max_sequence_length=cfg.teacher_max_sequence_length,
                         pixels=[cfg.vlm_min_pixels, cfg.vlm_max_pixels], inputs=self._vlm_inputs.path,
                         image_resize="torchvision" if importlib.util.find_spec("torchvision") else "pil",
                         **self.vlm_image_identity(cfg))
        return ident

    def _text_encoder(self, cfg, device: torch.device):
        from transformers import Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration.from_pretrained(self.model_dir / "text_encoder",
                                                                dtype=DTYPES[cfg.dtype], use_safetensors=True)
        return model.to(device).eval().requires_grad_(False)

    def _encode_prompts(self, prompts: list[str], cfg, device: torch.device) -> list[torch.Tensor]:
        """The pipeline's own prompt encoding, one prompt per call as its step requires ([L, 8·D] each,
        L a multiple of 80: the padding included, as the transformer sees it)."""
        _, encoders, _ = _blocks()
        text_encoder = self._text_encoder(cfg, device)
        step = encoders.Flux3DistilledTextEncoderStep().init_pipeline()
        step.update_components(text_encoder=text_encoder, tokenizer=self.prompt_processor())
        out = [step(prompt=p, max_sequence_length=cfg.max_sequence_length, text_encoder_out_layers=text_layers(),
                    output="prompt_embeds")[0].to(DTYPES[cfg.dtype]).cpu() for p in prompts]
        del step
        release(text_encoder)
        return out

    def _encode_edit(self, items: list[Item], cfg, device: torch.device) -> list[Cond]:
        from diffusers import AutoencoderKLFlux2

        before, encoders, _ = _blocks()
        dtype = DTYPES[cfg.dtype]
        caps = self._encode_prompts([edit_prompt(it.caption, cfg.edit_instruction) for it in items], cfg, device)
        vae = AutoencoderKLFlux2.from_pretrained(self.model_dir / "vae", dtype=dtype, use_safetensors=True)
        vae = vae.to(device).eval()
        from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3VaeEncoderSequentialStep
        encode = Flux3VaeEncoderSequentialStep().init_pipeline()  # preprocess (image processor) + VAE encode
        encode.update_components(vae=vae)
        pack = before.Flux3PrepareImageCondLatentsStep().init_pipeline()
        out = []
        for item, cap in zip(items, caps):
            image = self.reference_image(load_rgb(item.image_path), item.width, item.height)
            latents = encode(image=image, output="image_cond_latents")
            packed = pack(image_cond_latents=latents, dtype=dtype, output=["image_cond_hidden_states", "image_cond_ids"])
            out.append({"cap": cap, "ref": packed["image_cond_hidden_states"][0].cpu(),
                        "ref_ids": packed["image_cond_ids"].cpu()})
        del encode
        release(vae)
        return out

    @staticmethod
    def reference_image(image, width: int, height: int):
        """Your photo as the run trains on it (data.training_crop: the item's bucket, centre-cropped). The
        pipeline then keeps it whole: at a multiple of 16 under 4 megapixels its canvas is the image
        itself, so the reference tokens lie on the student's grid."""
        return training_crop(image, width, height)

    def _encode_vlm(self, items: list[Item], cfg, device: torch.device) -> list[Cond]:
        builder, text_encoder = self._vlm_inputs, self._text_encoder(cfg, device)
        pad_id = self.prompt_processor().tokenizer.pad_token_id
        out = []
        for item in items:
            image = training_crop(load_rgb(item.image_path), item.width, item.height)  # what the student draws
            inputs = builder(item.caption, image, cfg.vlm_min_pixels, cfg.vlm_max_pixels)
            length = window(inputs["input_ids"].shape[1], self.pad_multiple, cfg.teacher_max_sequence_length)
            out.append({"cap": encoder_states(text_encoder, inputs, text_layers(), length, pad_id).to(DTYPES[cfg.dtype])})
        release(text_encoder)
        return out

    # ------------------------------------------------------------------ training
    def scheduler(self):
        """The scheduler the pipeline makes (from its blocks' config: constant shift 6.93), not a file."""
        if self._scheduler is None:
            before, _, _ = _blocks()
            (spec,) = [s for s in before.Flux3SetTimestepsStep().expected_components if s.name == "scheduler"]
            self._scheduler = spec.create()
        return self._scheduler

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        s = self.vae_scale_factor * 2  # Flux3PrepareLatentsStep: (C·4, H/16, W/16)
        return (self.in_channels, height // s, width // s)

    def sigmas(self, height: int, width: int, steps: int) -> torch.Tensor:
        import numpy as np

        before, _, _ = _blocks()
        sched = self.scheduler()
        before.retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps))  # as the step
        return sched.sigmas.detach().clone().float()

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, conds: list[Cond],
                 sigma_next: torch.Tensor | None = None) -> torch.Tensor:
        """Flatten x to tokens, run the flow-map transformer as the distilled denoiser does for the step
        sigma -> sigma_next, return its prediction as [B, C, h, w]. Items whose conditions differ in shape
        (prompts of different 80-token windows) run one at a time: the transformer takes one set of
        position ids per call."""
        if sigma_next is None:
            raise ValueError("FLUX.3's distilled transformer is a flow map: velocity needs sigma_next, the "
                             "sigma the step goes to")
        shapes = {tuple((k, tuple(v.shape)) for k, v in sorted(c.items())) for c in conds}
        if len(shapes) > 1:
            return torch.cat([self.velocity(transformer, x[i:i + 1], sigma, [c], sigma_next)
                              for i, c in enumerate(conds)])
        before, _, _ = _blocks()
        dtype = getattr(transformer, "_dopsd_dtype", None) or transformer.dtype
        b, c, h, w = x.shape
        hidden = x.to(dtype).flatten(2).transpose(1, 2)                        # [B, h·w, C]
        cap = torch.stack([cond["cap"] for cond in conds]).to(x.device, dtype)
        # the denoiser: timestep = (t / 1000) with t = sigma·1000 the scheduler's timestep, in the model dtype
        t = (torch.as_tensor(sigma, dtype=torch.float32) * 1000.0).to(x.device)
        t_next = (torch.as_tensor(sigma_next, dtype=torch.float32) * 1000.0).to(x.device)
        kwargs = {}
        if "ref" in conds[0]:  # edit teacher: the reference tokens and their ids, as image_cond_*
            kwargs = {"image_cond_hidden_states": torch.stack([cond["ref"] for cond in conds]).to(x.device, dtype),
                      "image_cond_ids": conds[0]["ref_ids"].to(x.device)}
        out = transformer(hidden_states=hidden, encoder_hidden_states=cap,
                          timestep=(t / 1000).expand(b).to(dtype), target_timestep=(t_next / 1000).expand(b).to(dtype),
                          img_ids=self._ids("img", (h, w), x.device), txt_ids=self._ids("txt", cap.shape[1], x.device),
                          return_dict=False, **kwargs)[0]
        return out.float().transpose(1, 2).reshape(b, c, h, w)

    def _ids(self, kind: str, shape, device: torch.device) -> torch.Tensor:
        """The pipeline's position ids for an image grid (scaled by its image_rope_scale) or a text
        length, made once per shape on the device (a copy per pass would make the host wait)."""
        key = (kind, shape, device)
        if key not in self._id_cache:
            before, _, _ = _blocks()
            if kind == "img":
                ids = before._prepare_image_ids(*shape, before.Flux3PrepareLatentsStep().image_rope_scale)
            else:
                ids = before.Flux3TextRoPEInputsStep._prepare_text_ids(torch.empty(1, shape, 0))
            self._id_cache[key] = ids.to(device)
        return self._id_cache[key]

    @cached_property
    def _id_cache(self) -> dict:
        return {}

    # ------------------------------------------------------------------ the stock pipeline (sample, eval)
    def stock_pipeline(self, dtype: torch.dtype, transformer=None, **_):
        """Flux3DistilledModularPipeline as its docs use it without the prompt upsampler (a separate
        Qwen3.5 that rewrites prompts; its own download, and not what the LoRA was trained on): the
        distilled auto blocks, upsampler popped, components from this folder."""
        from diffusers import ComponentsManager, Flux3DistilledAutoBlocks

        blocks = Flux3DistilledAutoBlocks()
        blocks.sub_blocks.pop("prompt_upsampler")
        # the components manager is how a modular pipeline offloads (place), as diffusers' docs do it
        pipe = blocks.init_pipeline(str(self.model_dir), components_manager=ComponentsManager())
        pipe.load_components(names=["text_encoder", "transformer", "vae"], dtype=dtype)
        pipe.update_components(tokenizer=self.prompt_processor(),
                               **({"transformer": transformer} if transformer is not None else {}))
        return pipe

    def load_code(self, model: str, transformer: str = "") -> str:
        # from_pretrained alone loads no component of a modular pipeline: load_components does (all but the
        # transformer when one is given: update_components hands it over)
        load = (f"pipe.load_components(names=['text_encoder', 'tokenizer', 'vae']); "
                f"pipe.update_components(transformer={transformer}); " if transformer else "pipe.load_components(); ")
        return ("from diffusers import Flux3DistilledAutoBlocks; blocks = Flux3DistilledAutoBlocks(); "
                f"blocks.sub_blocks.pop('prompt_upsampler'); pipe = blocks.init_pipeline({model!r}); {load}")

    def place(self, pipe, device: torch.device, offload: bool) -> None:
        if offload:
            pipe._components_manager.enable_auto_cpu_offload(device=device)  # the manager stock_pipeline made
        else:
            pipe.to(device)

    def draw(self, pipe, prompt: str, steps: int, width: int, height: int, generator):
        return pipe(prompt=prompt, num_inference_steps=steps, width=width, height=height, generator=generator,
                    output="images")[0]

    # ------------------------------------------------------------------ output
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list:
        """States (as `latent_shape`, batch first) -> PIL images through the pipeline's decode step. The
        VAE is loaded for this call and released after it (previews are rare)."""
        from diffusers import AutoencoderKLFlux2

        _, _, decoders = _blocks()
        device = latents.device
        dtype = self._dtype if device.type != "cpu" else torch.float32
        vae = AutoencoderKLFlux2.from_pretrained(self.model_dir / "vae", dtype=dtype, use_safetensors=True)
        decode = decoders.Flux3DecodeStep().init_pipeline()
        decode.update_components(vae=vae.to(device).eval())
        images = decode(latents=latents.to(device, dtype), output_type="pil", output="images")
        del decode
        release(vae)
        return images

