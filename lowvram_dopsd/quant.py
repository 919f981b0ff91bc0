"""Weight-only 8-bit quantization of the frozen base, shared by student and teacher.

optimum-quanto `qint8` (per-output-channel int8) or `qfloat8` (FP8 e4m3, per-channel scales):
a 6B bf16 base drops from ~12 GB to ~6.2 GB. LoRA weights stay in fp32 beside it (lora.py).
Layers listed in `skip` stay in the compute dtype: the tiny embedders and the final projection
are precision-sensitive and hold well under 1% of the parameters.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import UserError


def quantize_frozen(model: nn.Module, kind: str, skip: tuple[str, ...] = ()) -> nn.Module:
    if kind == "none":
        return model
    try:
        from optimum.quanto import freeze, qfloat8, qint8, quantize
    except ImportError as exc:
        raise UserError(
            f"quant = '{kind}' needs optimum-quanto: `pip install optimum-quanto` (or "
            "`pip install lowvram-dopsd[quant]`), or set quant = 'none' (needs ~2x the base's memory)."
        ) from exc
    weights = {"qint8": qint8, "qfloat8": qfloat8}[kind]
    quantize(model, weights=weights, exclude=[f"{s}*" for s in skip])
    freeze(model)  # replace float weights by their quantized form now; the float copies are freed
    return model


def int8_view(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(w_q [N, K] int8 or float8_e4m3fn, per-output-channel scale [N]) of a quanto-quantized
    linear, or None when the module's weight is not an 8-bit per-channel tensor."""
    w = getattr(module, "weight", None)
    data, scale = getattr(w, "_data", None), getattr(w, "_scale", None)
    if data is None or scale is None or data.dtype not in (torch.int8, torch.float8_e4m3fn):
        return None
    if data.dim() != 2 or scale.numel() != data.shape[0]:
        return None
    return data, scale.reshape(-1)


@contextmanager
def kernels_mode(mode: str) -> Iterator[None]:
    """Apply the config's `kernels` switch ("on"/"off") for the duration of a run; "auto" leaves
    the decision to the env var LOWVRAM_DOPSD_KERNELS (default auto: Triton where it can run)."""
    if mode == "auto":
        yield
        return
    old = os.environ.get("LOWVRAM_DOPSD_KERNELS")
    os.environ["LOWVRAM_DOPSD_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOWVRAM_DOPSD_KERNELS", None)
        else:
            os.environ["LOWVRAM_DOPSD_KERNELS"] = old
