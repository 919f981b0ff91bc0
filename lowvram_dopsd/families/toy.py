"""The toy world (issue #7, `lowvram_dopsd/toy/`): a 32x32 pixel-space DiT distilled to 4 steps.

Checkpoint folder (`model_index.json` `_class_name` = "ToyDiTPipeline"): transformer/ (the
4-step distilled DiT), text_encoder/ (ToyEncoder: text-only, or reference-image patches + text
in context), tokenizer/vocab.json, scheduler/scheduler_config.json (the 4 sigmas).

Conventions: pixel space, x in [-1, 1], latent = image [3, 32, 32]; the DiT predicts
v = noise - x0 at sigma directly, i.e. exactly the trainer's convention (x_next = x + (s' - s)·v).
Teacher `vlm`: the same encoder reads [image patches + caption] (the student reads [caption]).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from ..data import Item, load_rgb, training_crop
from ..errors import UserError
from ..files import folder_identity
from .base import Cond, Family, register


@register
class Toy(Family):
    name = "toy"
    pipeline_class = "ToyDiTPipeline"
    pipeline_module = "lowvram_dopsd.toy.pipeline"
    teachers = ("vlm",)
    default_rollout_steps = 4
    default_lr = 1e-3
    lora_targets = ("attn_qkv", "attn_out", "mlp_in", "mlp_out")
    required_components = ("transformer", "text_encoder", "tokenizer", "scheduler")
    takes_transformer_file = False  # our own module format, not a diffusers transformer
    # as Z-Image: embedders and the final layer stay in the compute dtype, the blocks go 8-bit
    quant_skip = ("ref_in", "x_embed", "cond_embed", "t_embed", "final_ada", "final")

    def _encoder(self, device):
        from ..toy.models import load_module
        from ..toy.world import Tokenizer

        vocab = json.loads((self.model_dir / "tokenizer" / "vocab.json").read_text())
        return load_module(self.model_dir / "text_encoder").to(device), Tokenizer(vocab["vocab"], vocab["max_tokens"])

    def encoder_identity(self, teacher: str, cfg) -> dict:
        ident = {"family": self.name, "text_encoder": folder_identity(self.model_dir / "text_encoder"),
                 "tokenizer": folder_identity(self.model_dir / "tokenizer"), "teacher": teacher}
        return ident if teacher == "student" else {**ident, **self.vlm_image_identity(cfg)}

    @torch.no_grad()
    def encode_student(self, captions: list[str], cfg, device: torch.device) -> list[Cond]:
        enc, tok = self._encoder(device)
        ids, mask = tok(list(captions))
        h, m = enc(ids.to(device), mask.to(device))
        return [{"cap": h[i].float().cpu(), "mask": m[i].cpu()} for i in range(len(captions))]

    @torch.no_grad()
    def encode_teacher(self, items: list[Item], teacher: str, cfg, device: torch.device) -> list[Cond]:
        if teacher != "vlm":
            raise UserError(f"The toy family supports the teacher kinds {self.teachers}, not '{teacher}'.")
        from ..toy import world

        enc, tok = self._encoder(device)
        imgs = [np.asarray(training_crop(load_rgb(it.image_path), it.width, it.height)) for it in items]
        ids, mask = tok([it.caption for it in items])
        h, m = enc(ids.to(device), mask.to(device), world.to_tensor(imgs).to(device))
        return [{"cap": h[i].float().cpu(), "mask": m[i].cpu()} for i in range(len(items))]

    def load_transformer(self, cfg, device: torch.device, dtype: torch.dtype, on_unit=None) -> nn.Module:
        """The toy's transformer (1 MB): loaded whole; `on_unit` is not called (full mode shards it at the root)."""
        from ..quant import quantize_frozen
        from ..toy.models import load_module

        model = load_module(self.model_dir / "transformer").to(device=device, dtype=dtype)
        model.requires_grad_(False).eval()
        # the toy needs no 8-bit base (1 MB), but it is the one trained model here on which the
        # 8-bit paths' effect on training can be measured (docs/kernels.md: int8 activations)
        quantize_frozen(model, cfg.quant, skip=self.quant_skip)
        model._dopsd_dtype = dtype
        return model

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        from ..toy import world

        if (height, width) != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            raise UserError(f"The toy model draws {world.IMAGE_SIZE}x{world.IMAGE_SIZE} images; "
                            f"got a {width}x{height} training size. Use --resolution {world.IMAGE_SIZE} "
                            "(the `toy` preset does) and square images.")
        return (3, height, width)

    def sigmas(self, height: int, width: int, steps: int) -> torch.Tensor:
        sched = json.loads((self.model_dir / "scheduler" / "scheduler_config.json").read_text())
        if steps == len(sched["sigmas"]) - 1:
            return torch.tensor(sched["sigmas"], dtype=torch.float32)
        return torch.linspace(1.0, 0.0, steps + 1)  # not the distilled schedule: only for experiments

    def decode_latents(self, latents: torch.Tensor) -> list:
        """Pixel space: the state is the image in [-1, 1] (no VAE)."""
        from PIL import Image

        from ..toy import world

        return [Image.fromarray(a) for a in world.to_uint8(latents.float())]

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma, conds: list[Cond],
                 sigma_next=None) -> torch.Tensor:
        dtype = getattr(transformer, "_dopsd_dtype", None) or transformer.dtype
        cap = torch.stack([c["cap"] for c in conds]).to(x.device, dtype)
        mask = torch.stack([c["mask"] for c in conds]).to(x.device).bool()
        s = torch.as_tensor(sigma, dtype=torch.float32).to(x.device).expand(x.shape[0])
        return transformer(x.to(dtype), s, cap, mask).float()
