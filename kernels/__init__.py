"""Triton kernels for lowvram-dopsd (shipped as ``lowvram_dopsd.kernels``).

* ``lowvram_dopsd.kernels.lora_linear``: ``lora_linear`` — LoRA linear over a frozen int8 /
  FP8-e4m3 base, dequantisation fused into the GEMM tiles, LoRA term in the epilogue, matching
  fused backward (dx, dA, dB), optionally on per-token int8 activations (``act_quant="int8"``);
  ``lora_linear_reference``; ``quantize_weight``; ``quantize_rows``.
* ``lowvram_dopsd.kernels.dopsd_loss``: ``dopsd_loss`` — D-OPSD velocity / x0 loss and its
  gradient in one pass; ``dopsd_loss_reference``; ``x0_weight``.

Import the functions from their modules (``from lowvram_dopsd.kernels.lora_linear import
lora_linear``); this package does not re-export them, so the submodule names stay modules.
Each public function dispatches with ``LOWVRAM_DOPSD_KERNELS=off|on|auto`` (see ``utils``).
Docs: docs/kernels.md.
"""

from . import dopsd_loss, lora_linear, utils  # noqa: F401  (modules, not the functions)
from .utils import DISPATCH_COUNTS, HAS_TRITON, kernels_available, kernels_mode, reset_dispatch_counts

__all__ = [
    "dopsd_loss",
    "lora_linear",
    "utils",
    "kernels_available",
    "kernels_mode",
    "DISPATCH_COUNTS",
    "reset_dispatch_counts",
    "HAS_TRITON",
]
