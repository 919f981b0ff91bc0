"""Weight-only 8-bit quantization of the frozen base, shared by student and teacher.

optimum-quanto `qint8` (per-output-channel int8) or `qfloat8` (FP8 e4m3, per-channel scales):
a 6B bf16 base drops from ~12 GB to ~6.2 GB. LoRA weights stay in fp32 beside it (lora.py).
Layers listed in `skip` stay in the compute dtype: the tiny embedders and the final projection
are precision-sensitive and hold well under 1% of the parameters.
"""
from __future__ import annotations

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
