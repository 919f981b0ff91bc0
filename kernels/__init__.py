"""Triton kernels for lowvram-dopsd (shipped as ``lowvram_dopsd.kernels``).

* ``lowvram_dopsd.kernels.lora_linear``: ``lora_linear`` — LoRA linear over a frozen int8 /
  FP8-e4m3 base, dequantisation fused into the GEMM tiles, LoRA term in the epilogue, matching
  fused backward (dx, dA, dB), optionally on per-token int8 activations (``act_quant="int8"``);
  ``lora_linear_reference``; ``quantize_weight``; ``quantize_rows``.
* ``lowvram_dopsd.kernels.dopsd_loss``: ``dopsd_loss`` — D-OPSD velocity / x0 loss and its
  gradient in one pass; ``dopsd_loss_reference``; ``x0_weight``.

Import the functions from their modules (``from lowvram_dopsd.kernels.lora_linear import
lora_linear``); this package does not re-export them, so the submodule names stay modules.
Each public function dispatches by its ``kernels`` argument, ``auto|on|off`` (see ``utils``).
Docs: docs/kernels.md.
"""

if __name__ == "kernels":  # pragma: no cover - see tests/test_packaging.py, which runs it in a subprocess
    # Imported as the top-level `kernels`: Python was started with this repository's root first on
    # sys.path (`python` or `python -m ...` run in a clone, a notebook opened there), and the name
    # belongs to Hugging Face's `kernels` package, which transformers 5.25+ requires and imports at
    # start-up (`from kernels import CUDAProperties, ...`). Hand the name to that package: load it
    # from the rest of sys.path and leave it in sys.modules, which is what the import statement returns.
    # Where it is not installed, leave an empty namespace package there instead (no file, no version,
    # nothing inside): what transformers' and diffusers' availability checks read as "not installed".
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _rest = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _root]  # however it is spelled
    _spec = _machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None:
        _spec = _machinery.ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []  # module_from_spec gives it a namespace loader
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)  # a namespace package's: nothing to run
else:
    from . import dopsd_loss, lora_linear, utils  # noqa: F401  (modules, not the functions)
    from .utils import DISPATCH_COUNTS, HAS_TRITON, MODES, kernels_available, reset_dispatch_counts

__all__ = [
    "dopsd_loss",
    "lora_linear",
    "utils",
    "kernels_available",
    "MODES",
    "DISPATCH_COUNTS",
    "reset_dispatch_counts",
    "HAS_TRITON",
]
