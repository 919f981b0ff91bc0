"""The one interface a model family implements. The training loop knows nothing else.

A family is a small adapter around one diffusers pipeline: it loads the frozen transformer,
computes the student and teacher conditions at precompute time (encoders are loaded there and
released), and gives the few-step schedule and a velocity in ONE convention:

    x_next = x + (sigma_next - sigma) * v        (diffusers' FlowMatchEulerDiscreteScheduler.step)
    x0     = x - sigma * v                       (sigma = 1 is pure noise, 0 is the image)

Adding a family = one module here implementing `Family`, registered in `families/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError

Cond = dict[str, torch.Tensor]  # one item's precomputed condition; stored as safetensors in the cache


@dataclass
class Item:
    """One training pair as the families see it at precompute time."""

    image_path: Path
    caption: str
    image_sha256: str
    width: int            # training size of this item (bucketed), multiple of 16
    height: int


class Family:
    name: ClassVar[str]
    pipeline_class: ClassVar[str]        # diffusers pipeline that loads our LoRA (parity tests, `sample`)
    teachers: ClassVar[tuple[str, ...]]  # teacher kinds this family supports; first = default
    default_rollout_steps: ClassVar[int]
    default_lr: ClassVar[float]
    lora_targets: ClassVar[tuple[str, ...]]  # module-name suffixes in the transformer that get LoRA
    hf_repo_ids: ClassVar[tuple[str, ...]] = ()  # public ids that resolve to this family

    def __init__(self, model_dir: Path, model_id: str):
        self.model_dir = Path(model_dir)
        self.model_id = model_id  # what the user passed; recorded in outputs

    required_components: ClassVar[tuple[str, ...]] = ("transformer", "text_encoder", "tokenizer", "scheduler")

    # ----- detection
    @classmethod
    def matches(cls, model_index: dict[str, Any]) -> bool:
        return model_index.get("_class_name") == cls.pipeline_class

    def check_components(self, model_index: dict[str, Any]) -> None:
        missing = [c for c in self.required_components if not (self.model_dir / c).is_dir()]
        if missing:
            raise UserError(
                f"The {self.name} checkpoint at '{self.model_dir}' is missing {', '.join(missing)}/ "
                f"(a {self.pipeline_class} folder has {', '.join(self.required_components)}). "
                "The download is probably incomplete: download the model again."
            )

    # ----- precompute (encoders live only inside these calls)
    def encoder_identity(self, teacher: str, cfg) -> dict[str, Any]:
        """Everything that changes the cached features: goes into the cache key."""
        raise NotImplementedError

    def encode_student(self, captions: list[str], cfg, device: torch.device) -> list[Cond]:
        raise NotImplementedError

    def encode_teacher(self, items: list[Item], teacher: str, cfg, device: torch.device) -> list[Cond]:
        raise NotImplementedError

    # ----- training
    def load_transformer(self, cfg, device: torch.device, dtype: torch.dtype) -> nn.Module:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one item's initial noise (no batch dim), exactly as the pipeline draws it."""
        raise NotImplementedError

    def sigmas(self, height: int, width: int, steps: int) -> torch.Tensor:
        """The pipeline's few-step schedule: `steps + 1` sigmas from 1 down to 0, float32, CPU."""
        raise NotImplementedError

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: float, conds: list[Cond]) -> torch.Tensor:
        """v at state x (batch first) and noise level sigma, in the convention of the module docstring."""
        raise NotImplementedError

    # ----- reporting
    def run_notes(self, teacher: str, cfg) -> dict[str, str]:
        """Family-specific settings of this run (setting name -> value): shown in the run summary and
        recorded in the LoRA's metadata, e.g. klein's `edit_instruction` for its edit teacher."""
        return {}

    # ----- output
    def lora_key_prefix(self) -> str:
        return "transformer"
