"""The LoRA file users get: diffusers/peft layout, loadable with `pipe.load_lora_weights(out_dir)`.

Keys are `transformer.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. The LoRA
config (r, lora_alpha, target_modules) goes into the safetensors metadata under
`lora_adapter_metadata`, which diffusers turns into the peft `LoraConfig` on load, so alpha ≠ r
(the paper's r64/a128) loads with the right scale. Our own facts (base model, steps, caption rule,
teacher, tool version) go in a second metadata entry, `lowvram_dopsd`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import __version__
from .cache import atomic_save_safetensors
from .files import LORA_FILE
from .lora import DualLoRA


def lora_state_dict(lora: DualLoRA, role: str, prefix: str = "transformer", dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to(dtype) for k, v in lora.tensors(role).items()}


def save_lora(path: Path, lora: DualLoRA, role: str, info: dict[str, Any], prefix: str = "transformer",
              dtype=torch.bfloat16) -> Path:
    config = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.layers),
              "init_lora_weights": True}
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
        "lowvram_dopsd": json.dumps({**info, "rank": lora.rank, "alpha": lora.alpha, "role": role,
                                     "tool_version": __version__}, sort_keys=True, default=str),
    }
    atomic_save_safetensors(lora_state_dict(lora, role, prefix, dtype), path, metadata=metadata)
    return path


def read_info(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return json.loads(meta.get("lowvram_dopsd", "{}"))
