"""LoRA linear over a frozen 8-bit base weight, fused in Triton.

    y = x · dequant(Wq)ᵀ (+ bias) + s · (x · Aᵀ) · Bᵀ          dequant(Wq)[n, :] = Wq[n, :] · w_scale[n]

``Wq`` is int8 (symmetric, ±127) or FP8 e4m3 (``torch.float8_e4m3fn``, ±448), one float32 scale per
output channel. In the forward the full-precision weight is never materialised: each GEMM tile
loads 8-bit values and converts them to the compute dtype in registers.

Forward::

    t  = x · Aᵀ                                      [M, r]   cuBLAS (a plain 16/32-bit GEMM)
    yᵀ = scale_n ⊙ (Wq · xᵀ) + bias + s · B · tᵀ     [N, M]   our main GEMM; scale, bias and the
                                                              LoRA term are the tile's epilogue
Backward::

    u  = dy · B                                      [M, r]   cuBLAS
    dx = dy · dequant(Wq) + s · u · A                [M, K]   cuBLAS on a transient dequantised Wq
    dA = s · uᵀ · x                                  [r, K]   ours: reduction over M (split, fp32)
    dB = s · dyᵀ · t                                 [N, r]   ours: reduction over M (split, fp32)

Only ``x`` and ``t`` are kept for backward (plus references to the frozen inputs). No gradient
flows to ``Wq``, ``w_scale`` or ``bias``.

Why these choices (each measured against its alternatives on an H100; the variants that lost were
removed, their numbers are in docs/kernels.md, "How the LoRA linear works"):

* The main GEMM computes yᵀ = Wq · xᵀ, the 8-bit weight as the *left* dot operand: its in-register
  conversion then feeds the tensor cores directly (Hopper's wgmma takes its left operand from
  registers; a converted right operand goes back through shared memory).
* dx reduces over N, the index the per-channel scale runs along, and reads Wq against its stored
  order: in our tile that was much slower than the forward. So the backward dequantises the one
  layer's weight into a transient buffer in one Triton pass (Wq -> dtype(Wq · scale), the
  reference's exact rounding) and gives dx to cuBLAS; the buffer (N·K·2 bytes, at most 170 MB for
  klein's 3072 -> 27648) lives only during this call. The forward, run twice as often in D-OPSD
  (teacher + student), never materialises it.
* t and u are plain GEMMs with nothing to dequantise: cuBLAS runs them as fast as our kernel did,
  with less host time per launch.

int8 activations (``act_quant="int8"``, int8 ``Wq`` only; off by default). Both base GEMMs then
multiply int8 by int8 into exact int32 sums, on tensor cores that run 2x (H100) to 4x (GeForce
Ampere / Ada, whose 16-bit MMA accumulates in fp32 at half rate) the bf16 rate:

    q_x, s_x = per-token int8 of x                        one Triton pass (quantize_rows)
    y  = s_x[m] · scale_n · (q_x · Wqᵀ) + bias + s · t · Bᵀ
    q_g, s_g = per-token int8 of dy ⊙ scale               the channel scale runs along dx's reduction
    dx = s_g[m] · (q_g · Wq) + s · u · A                  on a transient Wqᵀ copy (below)

The LoRA term, dA and dB keep the exact x and dy (int8 forward and input-gradient GEMMs, 16-bit
weight gradients: SwitchBack, Wortsman et al. 2023, "Stable and low-precision training for
large-scale vision-language models"). The per-token rounding adds a small relative error to the base
GEMMs' outputs, larger for a token with an outlier channel (benchmarks/results/act8-numerics-cpu.md).
Int8 MMAs take both operands contiguous along the reduction, and dx reduces over Wq's rows: it reads
a transient transposed copy (N·K bytes, one tiled pass, as SwitchBack's backward does), so dx
compiles to the forward's K loop (read in stored order, the tile was transposed inside the loop).

Switching LoRA sets (student / teacher) without copying weights: ``lora_linear`` takes ``A`` and
``B`` as plain arguments. The caller passes whichever adapter is active for this forward; the
8-bit base is shared and nothing is copied or merged.

File anatomy: Triton kernels -> host wrappers (shapes, strides, grid, autotune configs) -> one
``torch.autograd.Function`` -> thin ``lora_linear`` used by the trainer; the plain-torch
``lora_linear_reference`` sits beside it.
"""

from __future__ import annotations

import inspect
import os
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from . import utils as _utils
from .utils import (
    FP_FUSION,
    HAS_TRITON,
    cdiv,
    empty,
    gpu_capability,
    is_interpret,
    kernels_available,
    launch,
    next_pow2,
    num_sms,
    tl,
    to_storage,
    torch_to_tl_dtype,
    triton,
    use_triton,
)

__all__ = [
    "lora_linear",
    "lora_linear_reference",
    "quantize_weight",
    "LoRALinearFunction",
    "lora_linear_forward",
    "lora_linear_backward",
    "dequantize",
    "transpose_8bit",
    "quantize_rows",
    "quantize_rows_reference",
    "ACT_QUANT",
    "kernels_available",
]

_FP8 = getattr(torch, "float8_e4m3fn", None)
_QUANT_DTYPES = tuple(d for d in (torch.int8, _FP8) if d is not None)
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 128
ACT_QUANT = ("off", "int8")  # activations of the base GEMMs: as given, or per-token int8


# =============================================================================================
# Triton kernels
# =============================================================================================
@triton.jit
def _fp8e4m3_to_f32(bits):
    """FP8 e4m3fn bytes (loaded as uint8) -> float32, for GPUs without native FP8 converts (<sm_89).

    e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal (m · 2^-9).
    The NaN pattern (0x7F/0xFF) is not special-cased: quantize_weight never produces it.
    """
    b = bits.to(tl.uint32)
    sign = (b >> 7) & 1
    e = (b >> 3) & 15
    m = b & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(sign == 1, -sub, sub)
    return tl.where(e == 0, sub, normal)


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, out_ptr, numel, cols,
                  SOFT_FP8: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    """out[n, k] = x[n, k] · scale[n] (float32 math, one rounding to out's dtype) for a contiguous
    [rows, cols] 8-bit x: the dequantised weight the backward's dx reads."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask)  # masked lanes are never stored
    if SOFT_FP8:
        x = _fp8e4m3_to_f32(x)
    row = offs // cols
    v = x.to(tl.float32) * tl.load(scale_ptr + row, mask=mask, other=0.0)
    tl.store(out_ptr + offs, to_storage(v, out_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)


@triton.jit
def _quant_rows_kernel(x_ptr, col_scale_ptr, q_ptr, s_ptr, M, K, stride_xm,
                       HAS_COL_SCALE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS rows per program (1 on a GPU): v = x[m, :] (· col_scale), amax = max|v|, q = rne(v · 127/amax)
    int8, s[m] = amax/127. Two sweeps over each row (the second one hits L2). Launched with
    enable_fp_fusion=False so ``v·inv + 1.5·2^23`` is not contracted into an FMA: the rounding is
    then exactly torch.round of the float32 product, as in ``quantize_rows_reference``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_m = rows < M
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    nans = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + offs) < K
        m = in_m[:, None] & in_k[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs)[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            v = v * tl.load(col_scale_ptr + k0 + offs, mask=in_k, other=0.0)[None, :]
        amax = tl.maximum(amax, tl.abs(v))  # max ignores NaN (maxnum), hence the count
        nans += (v != v).to(tl.int32)
    # an all-zero row quantises to zeros, not NaN; the cast keeps the interpreter in float32 (numpy
    # promotes the Python constant to float64, and the rounding trick below needs float32)
    a = tl.maximum(tl.max(amax, 1), 1e-30).to(tl.float32)
    # a NaN in the row makes its scale NaN, as in the reference, so the GEMM's output row is NaN
    # and the trainer's finiteness check sees it (else NaN would quantise to -127 and vanish)
    a = tl.where(tl.sum(nans, 1) > 0, float("nan"), a)
    inv = tl.math.div_rn(127.0, a)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + offs) < K
        m = in_m[:, None] & in_k[None, :]
        v = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs)[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_COL_SCALE:
            v = v * tl.load(col_scale_ptr + k0 + offs, mask=in_k, other=0.0)[None, :]
        r = v * inv[:, None]
        r = (r + 12582912.0) - 12582912.0  # round half to even (|r| <= 127 << 2^22)
        r = tl.minimum(tl.maximum(tl.where(r != r, 0.0, r), -127.0), 127.0)  # NaN rows: q = 0, s = NaN
        tl.store(q_ptr + rows[:, None] * K + (k0 + offs)[None, :], r.to(tl.int8), mask=m)
    tl.store(s_ptr + rows, tl.math.div_rn(a, 127.0), mask=in_m)


@triton.jit
def _transpose_kernel(x_ptr, out_ptr, R, C, BLOCK: tl.constexpr):
    """out[c, r] = x[r, c] for a contiguous [R, C] x: one BLOCK x BLOCK tile per program, read and
    written along rows (coalesced both ways; Triton moves the tile through shared memory)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (r[:, None] < R) & (c[None, :] < C)
    tile = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=mask)
    tl.store(out_ptr + c[:, None] * R + r[None, :], tl.trans(tile), mask=tl.trans(mask))


@triton.jit
def _qlora_mm_kernel(
    a_ptr, b_ptr, c_ptr, scale_ptr, act_scale_ptr, bias_ptr, l1_ptr, l2_ptr,
    P, Q, R, R_PER_SPLIT, RANK,
    stride_ap, stride_ar, stride_br, stride_bq,
    stride_cs, stride_cp, stride_cq,
    stride_l1p, stride_l1k, stride_l2k, stride_l2q,
    alpha, lora_alpha,
    ROW_SCALE: tl.constexpr,  # the weight's per-channel scale, per row P of C (A is the 8-bit weight)
    COL_ACT_SCALE: tl.constexpr,  # int8 activations' per-token scale, per column Q of C
    ROW_BIAS: tl.constexpr,  # a bias per row P of C
    HAS_LORA: tl.constexpr,
    BLOCK_RANK: tl.constexpr,
    SOFT_FP8: tl.constexpr,  # A is FP8 e4m3 read as bytes, decoded in integer arithmetic (< sm_89)
    COMPUTE: tl.constexpr,  # dot operand dtype (of the LoRA term only when INT8_DOT)
    INT8_DOT: tl.constexpr,  # both operands int8 (weight, per-token quantised activations): int32 sums
    DOT_PRECISION: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_P: tl.constexpr,
    EVEN_R: tl.constexpr,
):
    """C[s] = epilogue(alpha · Σ_{r in split s} A[p, r] · B[r, q]) for one [BLOCK_P, BLOCK_Q] tile.

    The LoRA linear's forward (yᵀ = Wq · xᵀ), act_quant's dx (dxᵀ = Wqᵀ · dyᵀ) and the dA / dB
    reductions are this kernel with different strides: A may be the 8-bit weight (converted in
    registers, its per-channel scale applied per output row in the epilogue), and the epilogue adds
    ``lora_alpha · L1[p, :] · L2[:, q]`` (the rank-r LoRA term) and a bias.
    Grid: (tiles of C, splits of R). Split s writes its partial result to C + s·stride_cs.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    num_pid_q = tl.cdiv(Q, BLOCK_Q)
    # grouped launch order: GROUP_P row-tiles share the B panel in L2
    num_pid_in_group = GROUP_P * num_pid_q
    group_id = pid // num_pid_in_group
    first_pid_p = group_id * GROUP_P
    group_size_p = tl.minimum(num_pid_p - first_pid_p, GROUP_P)
    pid_p = first_pid_p + ((pid % num_pid_in_group) % group_size_p)
    pid_q = (pid % num_pid_in_group) // group_size_p

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    # out-of-range rows/cols read a valid row instead (loads stay unmasked); stores are masked
    offs_pw = offs_p % P
    offs_qw = offs_q % Q

    r_start = pid_s * R_PER_SPLIT
    r_end = tl.minimum(r_start + R_PER_SPLIT, R)
    offs_r = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + offs_pw[:, None] * stride_ap + (r_start + offs_r)[None, :] * stride_ar
    b_ptrs = b_ptr + (r_start + offs_r)[:, None] * stride_br + offs_qw[None, :] * stride_bq

    if INT8_DOT:
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.int32)  # exact: |sum| <= 127² · K < 2^31 for K < 133k
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        if EVEN_R:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            r_mask = (r0 + offs_r) < r_end
            a = tl.load(a_ptrs, mask=r_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=r_mask[:, None], other=0.0)
        if SOFT_FP8:
            a = _fp8e4m3_to_f32(a)
        if INT8_DOT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_R * stride_ar
        b_ptrs += BLOCK_R * stride_br

    # ---- epilogue: per-channel dequant scale, per-token activation scale, alpha, LoRA term, bias ----
    acc = acc.to(tl.float32)
    if ROW_SCALE:
        acc = acc * tl.load(scale_ptr + offs_pw)[:, None]
    if COL_ACT_SCALE:
        acc = acc * tl.load(act_scale_ptr + offs_qw)[None, :]
    if HAS_LORA:
        # the rank-r term accumulates into acc's own registers: a separate [BLOCK_P, BLOCK_Q] result
        # doubled the live accumulator, and the H100's large tiles spilled (compile-report-9335e2f.md).
        # lora_alpha != 0: the host drops a zero term.
        offs_k = tl.arange(0, BLOCK_RANK)
        k_mask = offs_k < RANK
        l1 = tl.load(
            l1_ptr + offs_pw[:, None] * stride_l1p + offs_k[None, :] * stride_l1k,
            mask=k_mask[None, :], other=0.0,
        )
        l2 = tl.load(
            l2_ptr + offs_k[:, None] * stride_l2k + offs_qw[None, :] * stride_l2q,
            mask=k_mask[:, None], other=0.0,
        )
        acc = acc * (alpha / lora_alpha)
        acc = tl.dot(l1.to(COMPUTE), l2.to(COMPUTE), acc, input_precision=DOT_PRECISION)
        acc = acc * lora_alpha
    else:
        acc = acc * alpha
    if ROW_BIAS:
        acc += tl.load(bias_ptr + offs_pw).to(tl.float32)[:, None]

    c_ptrs = c_ptr + pid_s * stride_cs + offs_p[:, None] * stride_cp + offs_q[None, :] * stride_cq
    c_mask = (offs_p[:, None] < P) & (offs_q[None, :] < Q)
    tl.store(c_ptrs, to_storage(acc, c_ptr.dtype.element_ty, EMULATE_RNE), mask=c_mask)


# =============================================================================================
# Host wrappers: autotune configs, shapes, strides, grid
# =============================================================================================
_KEY = [
    "P", "Q", "R", "ROW_SCALE", "COL_ACT_SCALE", "INT8_DOT", "ROW_BIAS", "HAS_LORA", "BLOCK_RANK", "SOFT_FP8",
    "stride_ar", "stride_bq",
]


def _cfg(bp, bq, br, group, warps, stages, drop=()):
    kw = {"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_R": br, "GROUP_P": group}
    for k in drop:  # the host fixes this block size (skinny side = LoRA rank)
        kw.pop(k)
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _autotune_enabled() -> bool:
    """False with LOWVRAM_DOPSD_KERNELS_AUTOTUNE=0, a test and benchmark switch (docs/environment.md):
    each GEMM then has its fallback candidate only, which compiles in a fraction of the time."""
    return os.environ.get("LOWVRAM_DOPSD_KERNELS_AUTOTUNE", "1") != "0"


# GPU candidates. The first ones are sized for Hopper (228 KB shared memory); the last ones fit
# the ~100 KB of consumer GPUs (sm_86 / sm_89) and fp32 operands, so every device has at least one
# config that launches (the autotuner gives out-of-resource candidates an infinite time). What each
# needs per architecture (shared memory, registers, spills) is in benchmarks/results/compile-report.md.
def _main_configs():
    if is_interpret():  # one program runs in Python op by op, about as long at 64 as at 32 wide
        return [_cfg(64, 64, 64, 2, 4, 1)]
    cfgs = [
        _cfg(128, 256, 64, 8, 8, 3),
        _cfg(256, 128, 64, 8, 8, 3),
        _cfg(128, 128, 64, 8, 8, 4),
        _cfg(128, 256, 64, 8, 8, 4),
        # int8 x int8 (act_quant) only, see _prune_main: 128-deep K tiles move as many bytes as bf16's
        # 64; 8 warps, as 4 spilled where int8 runs on mma.sync (compile-fallback-candidates.md)
        _cfg(128, 256, 128, 8, 8, 3),
        _cfg(128, 128, 128, 8, 8, 3),
        _cfg(128, 128, 32, 8, 4, 3),
        # The fallback (the only candidate with LOWVRAM_DOPSD_KERNELS_AUTOTUNE=0) must launch without
        # spilling on every GPU and in every mode: 8 warps halve the accumulators per thread (with 4,
        # act_quant's dx spilled on sm_120), and the 3rd stage keeps act_quant's dx the forward's K
        # loop (test_kernels_aot). What each choice cost, per Triton release, and the known exceptions
        # (rank 128 act8 on Triton 3.5-3.7, fp32 activations at rank >= 64):
        # benchmarks/results/compile-fallback-candidates.md
        _cfg(64, 64, 32, 8, 8, 3),
    ]
    return cfgs if _autotune_enabled() else cfgs[-1:]


def _prune_main(configs, named_args, **meta):
    """16-bit problems skip the 128-deep candidates: with 16-bit operands those need 128-224 KB of
    shared memory (more than consumer GPUs have; the H100 runs were measured without them), so
    each would only add compile and tuning time to the first step."""
    if meta.get("INT8_DOT"):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_R"] < 128] or configs


def _skinny_q_configs():  # Q (= LoRA rank) is fixed by the host
    if is_interpret():
        return [_cfg(64, 0, 32, 1, 4, 1, drop=("BLOCK_Q",))]
    cfgs = [
        _cfg(64, 0, 128, 1, 4, 3, drop=("BLOCK_Q",)),
        _cfg(128, 0, 64, 1, 4, 4, drop=("BLOCK_Q",)),
        _cfg(128, 0, 128, 1, 8, 3, drop=("BLOCK_Q",)),
        _cfg(64, 0, 64, 1, 4, 4, drop=("BLOCK_Q",)),
        _cfg(32, 0, 32, 1, 4, 2, drop=("BLOCK_Q",)),
    ]
    return cfgs if _autotune_enabled() else cfgs[-1:]


def _skinny_p_configs():  # P (= LoRA rank) is fixed by the host
    if is_interpret():
        return [_cfg(0, 64, 32, 1, 4, 1, drop=("BLOCK_P",))]
    cfgs = [
        _cfg(0, 128, 64, 1, 4, 4, drop=("BLOCK_P",)),
        _cfg(0, 64, 128, 1, 4, 3, drop=("BLOCK_P",)),
        _cfg(0, 256, 64, 1, 8, 3, drop=("BLOCK_P",)),
        _cfg(0, 128, 128, 1, 8, 3, drop=("BLOCK_P",)),
        # fallback: 8 warps, as with 4 ptxas spilled in some modes and ranks on sm_86-sm_120
        # (benchmarks/results/compile-fallback-candidates.md)
        _cfg(0, 64, 32, 1, 8, 2, drop=("BLOCK_P",)),
    ]
    return cfgs if _autotune_enabled() else cfgs[-1:]


def _even_r(args) -> bool:
    return args["R"] % args["BLOCK_R"] == 0 and args["R_PER_SPLIT"] % args["BLOCK_R"] == 0


def _tune_bench(fn, quantiles=None):
    """Autotuning timer: shorter than Triton's default (25 ms warm-up, 100 ms): a candidate at these
    shapes runs for about a millisecond, so 20 ms of repeats separate them, and first-call tuning
    stays short."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _autotune_options() -> dict:
    """Keep the autotuner's timings on disk where Triton can (`cache_results`; Triton 3.3 cannot):
    a later run on the same GPU architecture, Triton version and kernel source skips the
    benchmarking part of the first step (compiled kernels are cached anyway; the first step's cost:
    benchmarks/results/train-step-h100.md)."""
    return {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _autotuned(configs, prune=None):
    return triton.autotune(configs=configs, key=_KEY, do_bench=_tune_bench, prune_configs_by=prune,
                           **_autotune_options())(
        triton.heuristics({"EVEN_R": _even_r})(_qlora_mm_kernel)
    )


if HAS_TRITON:
    _mm_main = _autotuned(_main_configs(), {"early_config_prune": _prune_main})
    _mm_skinny_q = _autotuned(_skinny_q_configs())
    _mm_skinny_p = _autotuned(_skinny_p_configs())


#: tuned config per problem key, filled by the first (autotuned) launch; see `_mm`
_BEST_CONFIG: dict = {}


def _compute(dtype: torch.dtype):
    """(dot operand dtype, dot precision) for activations of ``dtype``.

    fp32 runs as 3xTF32 on GPU (close to fp32). Under the CPU interpreter bf16 arithmetic is not
    emulated correctly (triton 3.9), so bf16 operands are upcast to fp32 there; bf16 storage
    (inputs, t/u, outputs) is unchanged.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and is_interpret()):
        return tl.float32, ("ieee" if is_interpret() else "tf32x3")
    return torch_to_tl_dtype(dtype), "tf32"


#: Decode FP8 weights in integer arithmetic on any device: the tests' hook for the path GPUs without
#: native FP8 converts take, and what ``kernels.aot`` sets while it records launches for such a GPU.
FORCE_SOFT_FP8 = False


def _soft_fp8(w_q: torch.Tensor) -> bool:
    if _FP8 is None or w_q.dtype != _FP8:
        return False
    if FORCE_SOFT_FP8:
        return True
    if w_q.device.type == "cuda":
        return gpu_capability(w_q.device) < (8, 9)  # no FP8 conversion instructions before Ada
    return False


def _split_plan(tiles: int, R: int, device: torch.device) -> Tuple[int, int]:
    """Split a long reduction (over the M = batch·tokens rows) so the grid fills the GPU."""
    align = 32 if is_interpret() else 256
    target = 2 * num_sms(device)
    if tiles >= target or R <= 2 * align:
        return 1, R
    splits = min(cdiv(target, tiles), cdiv(R, align))
    r_per_split = cdiv(cdiv(R, splits), align) * align
    return cdiv(R, r_per_split), r_per_split


def _mm(
    kind: str,
    a: torch.Tensor, a_st: Tuple[int, int],
    b: torch.Tensor, b_st: Tuple[int, int],
    out: torch.Tensor, out_st: Tuple[int, int, int],
    P: int, Q: int, R: int,
    *,
    compute,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    lora=None,
    alpha: float = 1.0,
    splits: int = 1,
    r_per_split: Optional[int] = None,
    soft: bool = False,
    act_scale: Optional[torch.Tensor] = None,
    int8_dot: bool = False,
) -> None:
    """Launch ``_qlora_mm_kernel`` as ``kind`` = main | skinny_q | skinny_p. ``scale`` and ``bias``:
    per row of C (A is the 8-bit weight; ``soft``: FP8 decoded in integer arithmetic);
    ``act_scale``: per column of C. ``int8_dot``: both operands are int8 (weight and per-token
    quantised activations), summed exactly in int32."""
    cdt, prec = compute
    rps = R if splits == 1 else r_per_split
    if lora is not None and lora[5] == 0.0:  # a zero LoRA scale adds nothing (the epilogue divides by it)
        lora = None
    if lora is None:
        l1, l1_st, l2, l2_st, rank, lora_alpha = out, (0, 0), out, (0, 0), 1, 0.0
    else:
        l1, l1_st, l2, l2_st, rank, lora_alpha = lora
    extra = {}
    if kind == "main":
        fn = _mm_main
    elif kind == "skinny_q":
        fn, extra["BLOCK_Q"] = _mm_skinny_q, max(16, next_pow2(Q))
    else:
        fn, extra["BLOCK_P"] = _mm_skinny_p, max(16, next_pow2(P))

    args = (
        a, b, out,
        scale if scale is not None else out,
        act_scale if act_scale is not None else out,
        bias if bias is not None else out,
        l1, l2,
        P, Q, R, rps, rank,
        a_st[0], a_st[1], b_st[0], b_st[1],
        out_st[0], out_st[1], out_st[2],
        l1_st[0], l1_st[1], l2_st[0], l2_st[1],
        float(alpha), float(lora_alpha),
    )
    meta = dict(
        ROW_SCALE=scale is not None,
        COL_ACT_SCALE=act_scale is not None,
        ROW_BIAS=bias is not None,
        HAS_LORA=lora is not None,
        BLOCK_RANK=max(16, next_pow2(rank)),
        SOFT_FP8=soft,
        COMPUTE=cdt,
        INT8_DOT=int8_dot,
        DOT_PRECISION=prec,
        EMULATE_RNE=is_interpret() and out.dtype == torch.bfloat16,
        **extra,
        **FP_FUSION,
    )
    # Host overhead matters (a launch through Triton's dispatch costs about as much host time as the
    # smaller GEMMs take on the GPU: utils.launch): after the first call for a problem key, launch the
    # JIT kernel with the tuned config, skipping the autotuner and heuristics layers, and from the next
    # call on its compiled form (`launch`). The key holds everything the autotuner keys on (_KEY, dtypes).
    key = (kind, P, Q, R, scale is not None, act_scale is not None, int8_dot, bias is not None, lora is not None,
           meta["BLOCK_RANK"], soft, a_st[1], b_st[1], a.dtype, b.dtype, out.dtype, l1.dtype, l2.dtype, cdt, splits > 1)
    best = _BEST_CONFIG.get(key) if _utils.FAST_LAUNCH else None
    if best is None:
        def grid(m):
            return (cdiv(P, m["BLOCK_P"]) * cdiv(Q, m["BLOCK_Q"]), splits)

        fn[grid](*args, **meta)
        cfg = getattr(fn, "best_config", None)
        if cfg is not None:
            _BEST_CONFIG[key] = cfg.all_kwargs()
        return
    bp = best.get("BLOCK_P", extra.get("BLOCK_P"))
    bq = best.get("BLOCK_Q", extra.get("BLOCK_Q"))
    br = best["BLOCK_R"]
    even = R % br == 0 and rps % br == 0
    launch(_qlora_mm_kernel, (cdiv(P, bp) * cdiv(Q, bq), splits), args, {**meta, **best, "EVEN_R": even})


def _reduce_over_m(kind, a, a_st, b, b_st, P, Q, R, out_dtype, device, compute, alpha):
    """[P, Q] = alpha · A[P, R] · B[R, Q] with R = M long: split R, fp32 partials, summed in order."""
    tile = 64 if is_interpret() else 128
    tiles = cdiv(Q if kind == "skinny_p" else P, tile)
    splits, rps = _split_plan(tiles, R, device)
    if splits == 1:
        out = empty((P, Q), out_dtype, device)
        _mm(kind, a, a_st, b, b_st, out, (0, out.stride(0), out.stride(1)), P, Q, R,
            compute=compute, alpha=alpha)
        return out
    part = empty((splits, P, Q), torch.float32, device)
    _mm(kind, a, a_st, b, b_st, part, (part.stride(0), part.stride(1), part.stride(2)), P, Q, R,
        compute=compute, alpha=alpha, splits=splits, r_per_split=rps)
    return part.sum(0).to(out_dtype)  # deterministic (no atomics)


#: rows per program of ``_quant_rows_kernel`` under the interpreter (a test sets 1, the GPU's launch)
_INTERPRETED_ROWS = 16


def quantize_rows(x: torch.Tensor, col_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8 quantisation of a 2-D ``x`` [M, K], optionally of
    ``x ⊙ col_scale`` first: returns (q int8 [M, K], s float32 [M]) with ``x ≈ q · s[:, None]``.
    Bitwise equal to ``quantize_rows_reference``."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if col_scale is not None:
        col_scale = col_scale.contiguous()  # read as a dense vector
    q = empty((M, K), torch.int8, x.device)
    s = empty((M,), torch.float32, x.device)
    # One row per program on a GPU. The interpreter runs each program in Python, op by op, whatever its
    # tile's size: a tile of rows divides that cost, and about four blocks per row at any K keep the
    # loop and its masked tail under test (K = 71: three blocks of 32) without the 65 of a fixed 32 at
    # K = 2053.
    rows = _INTERPRETED_ROWS if is_interpret() else 1
    block = max(32, next_pow2(K) // 4) if is_interpret() else min(4096, max(128, next_pow2(K)))
    launch(_quant_rows_kernel, (cdiv(M, rows),),
           (x, col_scale if col_scale is not None else s, q, s, M, K, x.stride(0)),
           dict(HAS_COL_SCALE=col_scale is not None, ROWS=rows, BLOCK_K=block, num_warps=4 if block <= 1024 else 8,
                enable_fp_fusion=False))
    return q, s


def quantize_rows_reference(x: torch.Tensor, col_scale: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: the numerics ``quantize_rows`` implements (float32 math, round half to even)."""
    v = x.float() if col_scale is None else x.float() * col_scale.float()[None, :]
    amax = v.abs().amax(dim=1).clamp_min(1e-30)
    qmax = torch.full_like(amax, 127.0)  # tensor / tensor: `127.0 / amax` runs as reciprocal · 127 (an ulp off)
    r = torch.round(v * (qmax / amax)[:, None])
    q = r.masked_fill_(r.isnan(), 0.0).clamp_(-127, 127).to(torch.int8)  # a NaN row: s = NaN, q = 0
    return q, amax / qmax


def transpose_8bit(w: torch.Tensor) -> torch.Tensor:
    """``w.t().contiguous()`` for a contiguous 2-D 8-bit ``w``, in one tiled pass."""
    R, C = w.shape
    out = empty((C, R), w.dtype, w.device)
    block = 16 if is_interpret() else 64
    launch(_transpose_kernel, (cdiv(R, block), cdiv(C, block)),
           (w.contiguous().view(torch.uint8), out.view(torch.uint8), R, C), dict(BLOCK=block, num_warps=4, **FP_FUSION))
    return out


def dequantize(w_q: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(w_q.float() * w_scale[:, None]).to(dtype)`` in one pass, no float32 temporary."""
    x, soft = _wq_operand(w_q.contiguous())
    out = empty(tuple(x.shape), dtype, x.device)
    block = 1024 if is_interpret() else 4096
    launch(_scale_kernel, (cdiv(x.numel(), block),), (x, w_scale.contiguous(), out, x.numel(), x.shape[1]),
           dict(SOFT_FP8=soft, EMULATE_RNE=is_interpret() and dtype == torch.bfloat16, BLOCK=block, num_warps=8,
                **FP_FUSION))
    return out


def _skinny(a: torch.Tensor, lora: torch.Tensor, transpose_b: bool) -> torch.Tensor:
    """[M, r] = a · loraᵀ (t = x·Aᵀ) or a · lora (u = dy·B), stored in a's dtype as PEFT does: cuBLAS
    (nothing to dequantise; a torch op costs less host time than a Triton launch)."""
    b = lora.to(a.dtype)
    return torch.mm(a, b.t() if transpose_b else b)


def _wq_operand(w_q: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    soft = _soft_fp8(w_q)
    return (w_q.view(torch.uint8) if soft else w_q), soft


def lora_linear_forward(
    x2d: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    act8: bool = False,
    lead_shape: Optional[Tuple[int, ...]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton forward on 2-D ``x2d`` [M, K]. Returns (y [M, N] in x's dtype, t = x·Aᵀ [M, r]).
    ``act8``: the base GEMM runs on per-token int8 activations (int8 ``w_q`` only).
    ``lead_shape``: y is allocated as [*lead_shape, N] (prod = M) and returned so, not as a view."""
    M, K = x2d.shape
    N, r = w_q.shape[0], lora_A.shape[0]
    if bias is not None:
        bias = bias.contiguous()  # the epilogue reads it as a dense vector
    comp = _compute(x2d.dtype)
    wq, soft = _wq_operand(w_q)

    t = _skinny(x2d, lora_A, transpose_b=True)  # t = x · Aᵀ  [M, r], from the exact x

    # act8: y = s_x[m] · s_w[n] · (q_x · Wqᵀ) + bias + s·t·Bᵀ, the GEMM on q_x instead of x
    xg, s_x = quantize_rows(x2d) if act8 else (x2d, None)
    y_out = empty((*lead_shape, N) if lead_shape is not None else (M, N), x2d.dtype, x2d.device)
    y = y_out.view(M, N)
    # C[n, m] = yᵀ: A = Wq (scale and bias per row n), B = xᵀ, LoRA term B · tᵀ
    _mm("main", wq, (wq.stride(0), wq.stride(1)), xg, (xg.stride(1), xg.stride(0)),
        y, (0, y.stride(1), y.stride(0)), N, M, K, compute=comp, scale=w_scale, bias=bias,
        lora=(lora_B, (lora_B.stride(0), lora_B.stride(1)), t, (t.stride(1), t.stride(0)), r, scale),
        soft=soft, act_scale=s_x, int8_dot=act8)
    return y_out, t


def lora_linear_backward(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    t: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    need_dx: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
    act8: bool = False,
    dA_dtype: Optional[torch.dtype] = None,
):
    """Triton backward on 2-D tensors. Returns (dx [M, K] | None, dA [r, K] | None, dB [N, r] | None).
    ``act8``: dx's base GEMM runs on per-token int8 ``dy ⊙ w_scale`` (dA and dB stay exact).
    ``dA_dtype``: dA's dtype when ``lora_A`` is a compute-dtype copy of the trained factor (default:
    ``lora_A``'s)."""
    M, K = x2d.shape
    N, r = w_q.shape[0], lora_A.shape[0]
    dev = dy.device
    comp = _compute(x2d.dtype)
    dx = dA = dB = None

    if need_dx or need_dA:
        u = _skinny(dy, lora_B, transpose_b=False)  # u = dy · B  [M, r]
    if need_dx and not act8:
        # dx = dy · dequant(Wq) + s·u·A: cuBLAS, the LoRA term accumulated in the second GEMM's epilogue
        # (beta = 1, alpha = s: one read of dx, no separate pass, no scaled copy of A)
        dx = torch.mm(dy, dequantize(w_q, w_scale, x2d.dtype))
        dx.addmm_(u, lora_A.to(x2d.dtype), alpha=scale)
    elif need_dx:
        # dx[m, k] = Σ_n dy[m, n]·s_w[n]·Wq[n, k]: the channel scale runs along the reduction, so it goes
        # into dy before the per-token quantisation; the int32 sum then needs one scale, s_g[m]
        dy_q, s_g = quantize_rows(dy, w_scale)
        wq_t = transpose_8bit(w_q)  # [K, N]: contiguous along the reduction, as int8 MMAs want it
        dx = empty((M, K), x2d.dtype, dev)
        # C[k, m] = dxᵀ: A = Wqᵀ, B = q_gᵀ (per-token scale per column m), LoRA term Aᵀ · uᵀ
        _mm("main", wq_t, (wq_t.stride(0), wq_t.stride(1)), dy_q, (dy_q.stride(1), dy_q.stride(0)),
            dx, (0, dx.stride(1), dx.stride(0)), K, M, N, compute=comp,
            lora=(lora_A, (lora_A.stride(1), lora_A.stride(0)), u, (u.stride(1), u.stride(0)), r, scale),
            act_scale=s_g, int8_dot=True)
    if need_dA:  # dA = s · uᵀ · x   [r, K], reduce over M
        dA = _reduce_over_m("skinny_p", u, (u.stride(1), u.stride(0)), x2d, (x2d.stride(0), x2d.stride(1)),
                            r, K, M, dA_dtype or lora_A.dtype, dev, comp, scale)
    if need_dB:  # dB = s · dyᵀ · t   [N, r], reduce over M
        dB = _reduce_over_m("skinny_q", dy, (dy.stride(1), dy.stride(0)), t, (t.stride(0), t.stride(1)),
                            N, r, M, lora_B.dtype, dev, comp, scale)
    return dx, dA, dB


# =============================================================================================
# autograd
# =============================================================================================
def _int32_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when its strides reach past 2^31 elements: the GEMM's tile
    offsets are int32, and ``_triton_supported`` bounds the sizes, not a sliced view's strides."""
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return t.contiguous() if extent >= 2**31 else t


class LoRALinearFunction(torch.autograd.Function):
    """y = x·dequant(Wq)ᵀ + bias + s·(x·Aᵀ)·Bᵀ; grads for x, A, B only. Saves x and t."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, bias, lora_A, lora_B, scale, act8=False):
        K = x.shape[-1]
        x2d = _int32_addressable(x.reshape(-1, K))
        # A in the compute dtype, cast once here and kept for the backward's dx (the trainer's A is
        # fp32: one cast per layer per pass instead of one in each direction)
        a_c = lora_A.to(x.dtype)
        # y in its final shape, not a view of a 2-D buffer: autograd refuses in-place ops on a view
        # made inside a Function, and model code may do `y += ...` (the reference path allows it)
        y, t = lora_linear_forward(x2d, w_q, w_scale, bias, a_c, lora_B, scale, act8=act8,
                                   lead_shape=tuple(x.shape[:-1]))
        ctx.save_for_backward(x2d, t, w_q, w_scale, a_c, lora_B)
        ctx.scale, ctx.act8, ctx.a_dtype = scale, act8, lora_A.dtype
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, t, w_q, w_scale, lora_A, lora_B = ctx.saved_tensors
        need_dx, _, _, _, need_dA, need_dB = ctx.needs_input_grad[:6]
        dy2d = _int32_addressable(dy.reshape(-1, dy.shape[-1]))
        if dy2d.dtype != x2d.dtype:
            dy2d = dy2d.to(x2d.dtype)
        dx, dA, dB = lora_linear_backward(
            dy2d, x2d, t, w_q, w_scale, lora_A, lora_B, ctx.scale, need_dx, need_dA, need_dB, act8=ctx.act8,
            dA_dtype=ctx.a_dtype,
        )
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return dx, None, None, None, dA, dB, None, None


# =============================================================================================
# Plain-torch reference and public functions
# =============================================================================================
def quantize_weight(w: torch.Tensor, fmt: Literal["int8", "fp8"] = "int8") -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel absmax quantisation of ``w`` [N, K].

    Returns ``(w_q, w_scale)`` with ``w ≈ w_q.float() * w_scale[:, None]``; ``w_q`` is int8 in
    [-127, 127] (``fmt="int8"``) or float8_e4m3fn in [-448, 448] (``fmt="fp8"``); ``w_scale`` is
    float32 [N].
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got {tuple(w.shape)}")
    w32 = w.detach().float()
    if fmt == "int8":
        qmax = 127.0
    elif fmt == "fp8":
        if _FP8 is None:
            raise RuntimeError("this torch build has no float8_e4m3fn")
        qmax = 448.0
    else:
        raise ValueError(f"fmt must be 'int8' or 'fp8', got {fmt!r}")
    w_scale = (w32.abs().amax(dim=1) / qmax).clamp_min(1e-12)
    q = w32 / w_scale[:, None]
    if fmt == "int8":
        w_q = q.round().clamp_(-127, 127).to(torch.int8)
    else:
        w_q = q.clamp_(-448.0, 448.0).to(_FP8)
    return w_q.contiguous(), w_scale.contiguous()


class _Int8ActBaseReference(torch.autograd.Function):
    """x·dequant(Wq)ᵀ with per-token int8 activations in the forward and int8 ``dy ⊙ w_scale`` in
    the backward: the numerics of the kernel's ``act_quant="int8"`` path, in plain torch."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # int products: exact
        q, s = quantize_rows_reference(x.reshape(-1, x.shape[-1]))
        y = (q.to(acc) @ w_q.to(acc).t()) * w_scale.to(acc)[None, :] * s.to(acc)[:, None]
        ctx.save_for_backward(w_q, w_scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.to(x.dtype).view(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, dy):
        w_q, w_scale = ctx.saved_tensors
        acc = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
        q, s = quantize_rows_reference(dy.reshape(-1, dy.shape[-1]).to(ctx.x_dtype), w_scale)
        dx = (q.to(acc) @ w_q.to(acc)) * s.to(acc)[:, None]
        return dx.to(ctx.x_dtype).view(ctx.x_shape), None, None


def lora_linear_reference(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    act_quant: str = "off",
) -> torch.Tensor:
    """Plain torch. Materialises the dequantised weight (in x's dtype); autograd gives dx, dA, dB.
    ``act_quant="int8"``: the base term in the int8-activation numerics (``_Int8ActBaseReference``);
    the LoRA term always sees the exact ``x``."""
    if act_quant == "int8":
        y = _Int8ActBaseReference.apply(x, w_q, w_scale)
        if bias is not None:
            y = y + bias.to(x.dtype)
    else:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = (w_q.to(acc) * w_scale.to(acc)[:, None]).to(x.dtype)
        y = F.linear(x, w, None if bias is None else bias.to(x.dtype))
    return y + scale * F.linear(F.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype))


def _triton_supported(x, w_q, w_scale, bias, lora_A, lora_B) -> Optional[str]:
    """None if the Triton path handles these inputs, else the reason it does not."""
    if x.dtype not in _ACT_DTYPES:
        return f"x dtype {x.dtype}"
    if w_q.dtype not in _QUANT_DTYPES:
        return f"w_q dtype {w_q.dtype}"
    if lora_A.shape[0] > MAX_RANK or lora_A.shape[0] < 1:
        return f"rank {lora_A.shape[0]} (1..{MAX_RANK})"
    devs = {t.device for t in (x, w_q, w_scale, lora_A, lora_B) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        return f"tensors on several devices {devs}"
    if torch.is_autocast_enabled(x.device.type):  # the kernel computes in x's dtype; the reference follows autocast
        return "autocast is on"
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (bias, w_scale)):
        return "bias or w_scale requires grad (the kernel treats the base as frozen)"
    big = max(x.numel() // x.shape[-1] * max(w_q.shape), w_q.numel())
    if big >= 2**31:
        return "more than 2^31 elements in one operand (32-bit indexing)"
    return None


def _check_shapes(x, w_q, w_scale, bias, lora_A, lora_B):
    N, K = w_q.shape
    r = lora_A.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match w_q [{N}, {K}]")
    if tuple(w_scale.shape) != (N,):
        raise ValueError(f"w_scale must be [{N}], got {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if tuple(lora_A.shape) != (r, K) or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_A must be [r, {K}] and lora_B [{N}, r]; got {tuple(lora_A.shape)}, "
                         f"{tuple(lora_B.shape)}")


def lora_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    act_quant: str = "off",
    kernels: str = "auto",
) -> torch.Tensor:
    """``x·dequant(w_q)ᵀ + bias + scale·(x·lora_Aᵀ)·lora_Bᵀ``, fused; output dtype = ``x.dtype``.

    Args:
        x: [..., K] float32 / float16 / bfloat16.
        w_q: [N, K] int8 or float8_e4m3fn (frozen, no grad).
        w_scale: [N] float32, ``W ≈ w_q.float() * w_scale[:, None]`` (frozen).
        bias: [N] or None (frozen).
        lora_A: [r, K], lora_B: [N, r], 1 <= r <= 128; any float dtype (cast to x's dtype in tile,
            grads returned in their own dtype). Pass the active adapter's tensors: switching the
            student/teacher LoRA set is just passing a different (A, B) pair, nothing is copied.
        scale: LoRA scaling s (alpha / r).
        act_quant: "off" (the base GEMM multiplies the exact activations) or "int8" (int8 ``w_q``
            only): the base GEMMs run int8 x int8 -> int32 on per-token quantised activations,
            the forward on ``x`` and the backward's dx on ``dy ⊙ w_scale`` (SwitchBack, Wortsman
            et al. 2023); the LoRA term, dA and dB use the exact ``x`` and ``dy``.
        kernels: "auto" (Triton when it runs for x's device, else ``lora_linear_reference``), "on"
            (Triton or an error) or "off" (the reference): the dispatch rule of ``kernels.utils``.
    """
    _check_shapes(x, w_q, w_scale, bias, lora_A, lora_B)
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    if act_quant == "int8" and w_q.dtype != torch.int8:
        raise ValueError(f"act_quant='int8' needs an int8 base weight, got {w_q.dtype}")
    if use_triton("lora_linear", x.device, _triton_supported(x, w_q, w_scale, bias, lora_A, lora_B), kernels):
        w_scale = w_scale.to(torch.float32).contiguous()
        return LoRALinearFunction.apply(x, w_q, w_scale, bias, lora_A, lora_B, float(scale), act_quant == "int8")
    return lora_linear_reference(x, w_q, w_scale, bias, lora_A, lora_B, scale, act_quant)
