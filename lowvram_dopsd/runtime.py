"""Torch runtime helpers every stage shares: compute dtypes by name, the device to run on, a model's block
lists, and freeing a model's memory at once. Low level: imports nothing of ours but `errors`."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

# The `dtype` setting's names (config.py CHOICES) -> torch dtypes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when PyTorch sees one, else the CPU; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device = 'cuda' but PyTorch sees no CUDA GPU. Install a CUDA build of PyTorch "
                        "(https://pytorch.org/get-started/locally/) or pass --device cpu for the tiny demo.")
    return torch.device(name)


def peak_vram_gb(device: torch.device) -> float | None:
    """The most GPU memory this process's tensors held since the last reset, in GiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_vram(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def block_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """A transformer's lists of blocks by qualified name: its top-level ModuleLists and those of a top-level
    ModuleDict (FLUX.3's per-mode `mode_blocks`: "mode_blocks.image"), in the model's order."""
    out = {}
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out[name] = child
        elif isinstance(child, nn.ModuleDict):
            out.update((f"{name}.{key}", m) for key, m in child.items() if isinstance(m, nn.ModuleList))
    return out


def release(*modules: nn.Module) -> None:
    """Free an encoder's weights now, even if a reference lingers: its tensors become storage-less
    'meta' tensors, and the CUDA cache is emptied so the transformer can use that memory."""
    for m in modules:
        m.to("meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
