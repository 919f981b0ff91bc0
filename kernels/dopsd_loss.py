"""D-OPSD distillation loss, forward and gradient in one pass.

    loss = mean_{b,i}( w_b · (v_s[b, i] − v_t[b, i])² )        (w_b = 1 when no weight is given)
    d loss / d v_s = 2 · w_b · (v_s − v_t) / (B · n)               (n = elements per sample)

``v_t`` (the teacher's prediction) is a target: it gets no gradient. The gradient is written in
the same pass that reads ``v_s`` and ``v_t`` for the loss, saved, and scaled by ``grad_output``
in backward, so the loss costs one read of each prediction and one write of the gradient.

x0 form: with x0 = x − σ·v and both predictions made at the same state x,
``mean((x0_s − x0_t)²) = mean(σ_b² · (v_s − v_t)²)``, i.e. pass ``weight = σ²`` (``x0_weight``),
which is ``(1 − t)²`` in the paper's t convention (t = 1 clean).

File anatomy: Triton kernel -> host wrapper (grid, chunking) -> ``torch.autograd.Function`` ->
thin ``dopsd_loss``; the plain-torch ``dopsd_loss_reference`` sits beside it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .utils import (
    FP_FUSION,
    cdiv,
    empty,
    is_interpret,
    next_pow2,
    num_sms,
    tl,
    to_storage,
    triton,
    use_triton,
)

__all__ = ["dopsd_loss", "dopsd_loss_reference", "x0_weight", "DOPSDLossFunction", "dopsd_loss_forward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# =============================================================================================
# Triton kernel
# =============================================================================================
@triton.jit
def _dopsd_loss_kernel(
    vs_ptr, vt_ptr, w_ptr, grad_ptr, partial_ptr,
    n_per_sample, chunk, num_chunks, grad_coef,
    HAS_WEIGHT: tl.constexpr,
    STORE_GRAD: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (b, c): elements [c·chunk, (c+1)·chunk) of sample b.

    Writes partial[b, c] = w_b · Σ (v_s − v_t)² (fp32) and grad = grad_coef · w_b · (v_s − v_t).
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    base = pid_b.to(tl.int64) * n_per_sample
    if HAS_WEIGHT:
        w = tl.load(w_ptr + pid_b).to(tl.float32)
    else:
        w = 1.0
    g = w * grad_coef
    start = pid_c * chunk
    end = tl.minimum(start + chunk, n_per_sample)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + offs
        mask = idx < end
        s = tl.load(vs_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(vt_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        d = s - t
        acc += d * d
        if STORE_GRAD:
            gv = to_storage(d * g, grad_ptr.dtype.element_ty, EMULATE_RNE)
            tl.store(grad_ptr + base + idx, gv, mask=mask)
    tl.store(partial_ptr + pid_b * num_chunks + pid_c, tl.sum(acc, axis=0) * w)


@triton.jit
def _scale_grad_kernel(grad_ptr, go_ptr, out_ptr, n, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    """out = grad · grad_output in fp32, one rounding; grad_output read on device (no host sync)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    go = tl.load(go_ptr).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_storage(g * go, out_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)


# =============================================================================================
# Host wrappers
# =============================================================================================
def _launch_params(B: int, n: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK, chunk, num_chunks): enough programs to fill the GPU, several BLOCKs per program."""
    if is_interpret():  # 64 up to 2048 elements (the masked tails of small tests), then 1/32 of a sample
        block, min_iters, target = max(64, next_pow2(n) // 32), 1, 8
    else:
        block, min_iters, target = 2048, 4, 8 * num_sms(device)
    per_sample = max(1, cdiv(target, B))
    chunk = max(block * min_iters, cdiv(n, per_sample))
    chunk = cdiv(chunk, block) * block
    return block, chunk, cdiv(n, chunk)


def dopsd_loss_forward(
    v_s: torch.Tensor, v_t: torch.Tensor, weight: Optional[torch.Tensor], need_grad: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Triton pass. Returns (loss fp32 scalar, d loss / d v_s or None), the gradient in v_s's dtype,
    except fp32 for fp16 v_s: 2/(B·n) is ~7.6e-6 for one 1024² latent, so fp16 would store most of it
    as subnormals (or 0) before backward scales it; backward rounds once, to v_s's dtype."""
    vs = v_s.contiguous()
    vt = v_t.contiguous()
    B = vs.shape[0]
    n = vs.numel() // B
    block, chunk, num_chunks = _launch_params(B, n, vs.device)
    partial = empty((B, num_chunks), torch.float32, vs.device)
    grad_dtype = torch.float32 if vs.dtype == torch.float16 else vs.dtype
    grad = empty(vs.shape, grad_dtype, vs.device) if need_grad else None
    w = weight.to(device=vs.device, dtype=torch.float32).contiguous() if weight is not None else None
    _dopsd_loss_kernel[(B, num_chunks)](
        vs, vt, w if w is not None else partial, grad if grad is not None else partial, partial,
        n, chunk, num_chunks, 2.0 / (B * n),
        HAS_WEIGHT=w is not None,
        STORE_GRAD=need_grad,
        EMULATE_RNE=is_interpret() and grad_dtype == torch.bfloat16,
        BLOCK=block,
        num_warps=8 if block >= 1024 else 4,
        **FP_FUSION,
    )
    loss = partial.sum() / (B * n)
    return loss, grad


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """grad · grad_output (a 0-dim tensor) into a new tensor of ``dtype`` (default: grad's)."""
    out = empty(grad.shape, dtype or grad.dtype, grad.device)
    n = grad.numel()
    # the interpreter runs each program op by op in Python: 64 up to 2048 elements, then 1/32 of them
    block = max(64, next_pow2(n) // 32) if is_interpret() else 4096
    go = grad_output.to(device=grad.device, dtype=torch.float32).reshape(1)
    _scale_grad_kernel[(cdiv(n, block),)](
        grad, go, out, n,
        EMULATE_RNE=is_interpret() and out.dtype == torch.bfloat16,
        BLOCK=block, num_warps=4 if block < 1024 else 8, **FP_FUSION,
    )
    return out


# =============================================================================================
# autograd
# =============================================================================================
class DOPSDLossFunction(torch.autograd.Function):
    """Loss and d loss / d v_s in one pass; backward scales the saved gradient by grad_output."""

    @staticmethod
    def forward(ctx, v_s, v_t, weight):
        loss, grad = dopsd_loss_forward(v_s, v_t, weight, need_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.v_s_dtype = v_s.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        # fp32 product, one rounding (grad_output rounded to bf16 first would be off by up to 0.4%),
        # no host sync; a new tensor: a second backward (retain_graph) must see the same saved grad
        return scale_grad(grad, grad_output, ctx.v_s_dtype), None, None


# =============================================================================================
# Plain-torch reference and public functions
# =============================================================================================
def x0_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weight turning the velocity loss into the x0 loss: w_b = σ_b² ((1 − t)²)."""
    return sigma.detach().float().reshape(-1) ** 2


def dopsd_loss_reference(v_s: torch.Tensor, v_t: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch, fp32 (fp64 for fp64 inputs); no gradient to v_t."""
    acc = torch.float64 if torch.float64 in (v_s.dtype, v_t.dtype) else torch.float32
    d2 = (v_s.to(acc) - v_t.detach().to(acc)).pow(2)
    if weight is None:
        return d2.mean()
    w = weight.detach().to(device=d2.device, dtype=acc).reshape(-1, *([1] * (d2.dim() - 1)))
    return (w * d2).mean()


def dopsd_loss(v_s: torch.Tensor, v_t: torch.Tensor, weight: Optional[torch.Tensor] = None,
               kernels: str = "auto") -> torch.Tensor:
    """``mean(w_b · (v_s − v_t)²)`` as an fp32 scalar; gradient to ``v_s`` only.

    Args:
        v_s: student prediction [B, ...], bf16 / fp16 / fp32.
        v_t: teacher prediction, same shape (any of those dtypes); receives no gradient.
        weight: optional [B] per-sample weights (e.g. ``x0_weight(sigma)``); receives no gradient.
        kernels: "auto" | "on" | "off", the dispatch rule of ``kernels.utils`` (as ``lora_linear``).
    """
    if v_s.shape != v_t.shape:
        raise ValueError(f"v_s {tuple(v_s.shape)} and v_t {tuple(v_t.shape)} differ")
    if v_s.dim() < 1 or v_s.numel() == 0:
        raise ValueError("dopsd_loss needs a non-empty [B, ...] tensor")
    if weight is not None and weight.numel() != v_s.shape[0]:
        raise ValueError(f"weight must have B={v_s.shape[0]} elements, got {tuple(weight.shape)}")
    reason = None
    if v_s.dtype not in _DTYPES or v_t.dtype not in _DTYPES:
        reason = f"dtypes {v_s.dtype}/{v_t.dtype}"
    elif v_s.device != v_t.device:
        reason = "v_s and v_t on different devices"
    if use_triton("dopsd_loss", v_s.device, reason, kernels):
        w = None if weight is None else weight.detach()
        if not (torch.is_grad_enabled() and v_s.requires_grad):  # no graph: skip the gradient pass's write
            return dopsd_loss_forward(v_s, v_t.detach(), w, need_grad=False)[0]
        return DOPSDLossFunction.apply(v_s, v_t.detach(), w)
    return dopsd_loss_reference(v_s, v_t, weight)
