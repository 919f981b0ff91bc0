"""Shared constants for the kernel tests (a plain module: tests/kernels has no __init__.py, so
no top-level package named ``kernels`` ever becomes importable)."""

import torch

from lowvram_dopsd.kernels import utils


def _device() -> str:
    if not utils.is_interpret() and torch.cuda.is_available():
        return "cuda"
    return "cpu"


DEVICE = _device()

# Relative error ‖out − ref‖ / ‖ref‖ against a float64 reference on the same inputs, per dtype.
# Measured (interpreter and H100): fp32 ~1e-7, fp16 ~3e-4, bf16 ~2e-3; each tolerance is a few
# times that and below 1 %, so a 1 % error in any output or gradient fails (test_wrong_reference_*).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


