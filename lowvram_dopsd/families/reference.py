"""What the families whose `edit` teacher is their own pipeline's reference-image path share (klein,
FLUX.3): the teacher's prompt (the caption, then `edit_instruction`), the run notes, the dispatch of
the conditions to the family's prompt, reference and VLM encodings, and the compute dtype the previews
decode in."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data import Item
from ..errors import UserError
from ..runtime import DTYPES
from .base import Cond, DiffusersFamily


def edit_prompt(caption: str, instruction: str) -> str:
    """The teacher's prompt for the edit branch: caption, then the edit instruction (authors' recipe)."""
    return f"{caption} {instruction}".strip()


class ReferenceImageFamily(DiffusersFamily):
    """A diffusers family with the teachers `edit` (default) and `vlm`. Implements `_encode_prompts`
    (the pipeline's prompt encoding, [L, D'] per prompt), `_encode_edit` and `_encode_vlm`."""

    teachers = ("edit", "vlm")

    def __init__(self, model_dir: Path, model_id: str):
        super().__init__(model_dir, model_id)
        self._dtype = torch.float32  # compute dtype, set by load_transformer (used by decode_latents)

    def encoded_prompts(self, captions: list[str], teacher: str, cfg) -> dict[str, list[str]]:
        out = {"caption": list(captions)}
        if teacher == "edit":  # the edit teacher's prompt goes through the same encoder and limit
            out["edit-teacher"] = [edit_prompt(c, cfg.edit_instruction) for c in captions]
        return out

    def run_notes(self, teacher: str, cfg) -> dict[str, str]:
        return {"edit_instruction": cfg.edit_instruction} if teacher == "edit" else {}

    def _encode_prompts(self, prompts: list[str], cfg, device: torch.device) -> list[torch.Tensor]:
        raise NotImplementedError

    def _encode_edit(self, items: list[Item], cfg, device: torch.device) -> list[Cond]:
        raise NotImplementedError

    def _encode_vlm(self, items: list[Item], cfg, device: torch.device) -> list[Cond]:
        raise NotImplementedError

    @torch.no_grad()
    def encode_student(self, captions: list[str], cfg, device: torch.device) -> list[Cond]:
        return [{"cap": e} for e in self._encode_prompts(list(captions), cfg, device)]

    @torch.no_grad()
    def encode_teacher(self, items: list[Item], teacher: str, cfg, device: torch.device) -> list[Cond]:
        if teacher == "edit":
            return self._encode_edit(items, cfg, device)
        if teacher == "vlm":
            return self._encode_vlm(items, cfg, device)
        raise UserError(f"The {self.name} family supports the teacher kinds {', '.join(self.teachers)}, "
                        f"not '{teacher}'.")

    def load_transformer(self, cfg, device: torch.device, dtype: torch.dtype, on_unit=None) -> nn.Module:
        # decode_latents decodes in the run's compute dtype, not in `dtype`: a full fine-tune stores its
        # weights in fp32 (and its EMA teacher in ema_dtype) and computes in cfg.dtype
        self._dtype = DTYPES[cfg.dtype]
        return super().load_transformer(cfg, device, dtype, on_unit)
