"""Parity of the fused LoRA linear (Triton) with a float64 reference: output and every gradient."""

import pytest
import torch

import lowvram_dopsd.kernels.lora_linear as ll
from lowvram_dopsd.kernels import utils
from lowvram_dopsd.kernels.lora_linear import lora_linear, lora_linear_reference, quantize_weight

from kernels_testlib import DEVICE, TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FMTS = ["int8", "fp8"]
# (leading shape of x, K, N, rank, bias). M = prod(leading); none of M, K, N is a multiple of the
# interpreter's 64-wide GEMM tiles except the second case's K (covers the unmasked EVEN_R path);
# K = 71 and N = 96 loop twice over their reduction, and N = 140 is three row tiles, so the grouped
# launch order ends on a partial group.
CASES = [
    ((74,), 71, 53, 7, True),
    ((2, 37), 64, 96, 1, False),
    ((3, 11), 45, 33, 64, True),
    ((1, 5), 40, 140, 128, False),
]


def _make(case, dtype, fmt, seed=0, device=DEVICE):
    lead, K, N, r, has_bias = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w_q, w_scale = quantize_weight(w, fmt)
    bias = (torch.randn(N, generator=g) * 0.1) if has_bias else None
    x = torch.randn(*lead, K, generator=g).to(dtype)
    A = torch.randn(r, K, generator=g) * 0.1
    B = torch.randn(N, r, generator=g) * 0.1
    dy = torch.randn(*lead, N, generator=g).to(dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(x=to(x), w_q=to(w_q), w_scale=to(w_scale), bias=to(bias), A=to(A), B=to(B), dy=to(dy))


def _run_kernel(d, s, act_quant="off"):
    x = d["x"].clone().requires_grad_()
    A = d["A"].clone().requires_grad_()
    B = d["B"].clone().requires_grad_()
    y = lora_linear(x, d["w_q"], d["w_scale"], d["bias"], A, B, s, act_quant=act_quant, kernels="on")
    y.backward(d["dy"])
    return y, x.grad, A.grad, B.grad


def _run_reference64(d, s, w_scale_mult=1.0, s_mult=1.0, act_quant="off"):
    """float64 reference. With act_quant="int8" the activations are quantised exactly as the
    kernel does (float32 math from the same inputs: the same int8 codes), then summed in float64."""
    c = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    x = c(d["x"]).requires_grad_()
    A = c(d["A"]).requires_grad_()
    B = c(d["B"]).requires_grad_()
    y = lora_linear_reference(x, d["w_q"].cpu(), c(d["w_scale"]) * w_scale_mult, c(d["bias"]), A, B, s * s_mult,
                              act_quant=act_quant)
    y.backward(c(d["dy"]))
    return y, x.grad, A.grad, B.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0]}-K{c[1]}-N{c[2]}-r{c[3]}-{'bias' if c[4] else 'nobias'}")
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear_matches_reference(kernels_on, dtype, fmt, case):
    d = _make(case, dtype, fmt)
    s = 0.75
    outs = _run_kernel(d, s)
    refs = _run_reference64(d, s)
    assert utils.DISPATCH_COUNTS["lora_linear.triton"] == 1
    assert outs[0].dtype == dtype and outs[0].shape == d["x"].shape[:-1] + (d["w_q"].shape[0],)
    assert outs[1].dtype == dtype and outs[2].dtype == d["A"].dtype and outs[3].dtype == d["B"].dtype
    for name, o, r in zip(("y", "dx", "dA", "dB"), outs, refs):
        assert torch.isfinite(o).all(), f"{name}: non-finite (unwritten) elements"
        err = rel_err(o, r)
        assert err <= TOL[dtype], f"{name}: rel err {err:.3e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0]}-K{c[1]}-N{c[2]}-r{c[3]}-{'bias' if c[4] else 'nobias'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_activations_match_reference(kernels_on, dtype, case):
    """act_quant="int8": int8 x int8 -> int32 base GEMMs (forward, and dx on the transposed weight
    copy) against the float64 reference of the same numerics, at the same tolerances as the exact
    path."""
    d = _make(case, dtype, "int8", seed=7)
    outs = _run_kernel(d, 0.75, act_quant="int8")
    refs = _run_reference64(d, 0.75, act_quant="int8")
    assert utils.DISPATCH_COUNTS["lora_linear.triton"] == 1
    assert outs[0].dtype == dtype and outs[1].dtype == dtype
    for name, o, r in zip(("y", "dx", "dA", "dB"), outs, refs):
        assert torch.isfinite(o).all(), f"{name}: non-finite (unwritten) elements"
        err = rel_err(o, r)
        assert err <= TOL[dtype], f"{name}: rel err {err:.3e} > {TOL[dtype]:.0e}"


def test_int8_activations_are_quantised_and_close_to_exact(kernels_on):
    """The int8 path really quantises the base GEMMs' activations (y and dx differ from the exact
    layer by the per-token rounding, ~0.5 % for Gaussian rows: a silently exact path fails), stays
    within 2 % of it, and leaves dA / dB exact (they read the exact x and dy)."""
    d = _make(CASES[0], torch.float32, "int8", seed=8)
    q = _run_kernel(d, 0.75, act_quant="int8")
    exact = _run_reference64(d, 0.75)
    for name, o, r in zip(("y", "dx"), q[:2], exact[:2]):
        assert 1e-3 < rel_err(o, r) < 2e-2, (name, rel_err(o, r))
    for name, o, r in zip(("dA", "dB"), q[2:], exact[2:]):
        assert rel_err(o, r) <= TOL[torch.float32], name


def test_int8_activations_refuse_fp8_weights(kernels_on):
    d = _make(CASES[0], torch.float32, "fp8")
    with pytest.raises(ValueError, match="needs an int8 base weight"):
        _run_kernel(d, 1.0, act_quant="int8")
    with pytest.raises(ValueError, match="act_quant must be one of"):
        _run_kernel(_make(CASES[0], torch.float32, "int8"), 1.0, act_quant="fp4")


@pytest.mark.parametrize("rows", [16, 1], ids=["interpreted-rows", "gpu-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_rows_is_bitwise_the_reference(kernels_on, monkeypatch, dtype, rows):
    """Per-token int8 codes and scales equal the plain-torch definition exactly, with and without
    the column pre-scale (the backward's dy ⊙ w_scale); rows of zeros, one large outlier, exact
    ties (x.5 after scaling round half to even) and K = 2053 (not a multiple of the block). Under the
    interpreter both launches run: a tile of 16 rows (7 of them here: masked rows) and the GPU's one
    row per program."""
    monkeypatch.setattr(ll, "_INTERPRETED_ROWS", rows)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 2053, generator=g) * 3
    x[1] = 0.0
    x[2, 5] = 1e4
    x[3, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5])
    x[3, 6:] = 0.0
    x = x.to(dtype)
    col = torch.rand(2053, generator=g) + 0.5
    for c in (None, col):
        q, s = ll.quantize_rows(x.to(DEVICE), None if c is None else c.to(DEVICE))
        q_ref, s_ref = ll.quantize_rows_reference(x, c)
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
    q_ref, s_ref = ll.quantize_rows_reference(x)
    assert (q_ref[1] == 0).all() and (q_ref.abs().amax(1)[[0, 2, 3]] == 127).all()
    assert q_ref[3, :6].tolist() == [127, 0, 2, 2, 0, -2]  # half to even
    back = q_ref.float() * s_ref[:, None]
    assert ((back - x.float()).abs() <= s_ref[:, None] * (0.5 + 1e-4)).all()  # half a step (+ fp32 rounding)


def test_a_nan_token_stays_nan_with_int8_activations(kernels_on):
    """A NaN in a token makes its scale NaN (q = 0 there, as the reference), so the base GEMM's
    output row is NaN even with no LoRA term (the bare-base roll-out): the trainer's finiteness
    check must see it. maxnum-style max would drop it and quantise NaN to -127, a finite row."""
    d = _make(CASES[2], torch.float32, "int8", seed=13)
    x = d["x"].clone().reshape(-1, d["x"].shape[-1])
    x[4, 3] = float("nan")
    q, s_ = ll.quantize_rows(x)
    q_ref, s_ref = ll.quantize_rows_reference(x.cpu())
    assert s_[4].isnan() and (q[4] == 0).all() and torch.equal(q.cpu(), q_ref)
    assert torch.equal(s_.cpu()[torch.arange(len(s_)) != 4], s_ref[torch.arange(len(s_)) != 4])
    y = lora_linear(x, d["w_q"], d["w_scale"], d["bias"], d["A"], d["B"], 0.0, act_quant="int8", kernels="on")
    assert y[4].isnan().all() and torch.isfinite(y[torch.arange(len(y)) != 4]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrong_reference_fails_at_tolerance(kernels_on, dtype):
    """The tolerances are tight: a 1 % error in the base weight scale or the LoRA scale fails."""
    d = _make(CASES[0], dtype, "int8", seed=1)
    s = 0.75
    y, dx, dA, dB = _run_kernel(d, s)
    ok = _run_reference64(d, s)
    assert all(rel_err(o, r) <= TOL[dtype] for o, r in zip((y, dx, dA, dB), ok))
    bad_w = _run_reference64(d, s, w_scale_mult=1.01)  # dequant scale off by 1 %
    assert rel_err(y, bad_w[0]) > TOL[dtype]
    assert rel_err(dx, bad_w[1]) > TOL[dtype]
    bad_s = _run_reference64(d, s, s_mult=1.01)  # LoRA scale off by 1 %
    assert rel_err(dA, bad_s[2]) > TOL[dtype]
    assert rel_err(dB, bad_s[3]) > TOL[dtype]


def test_lora_params_in_other_dtype(kernels_on):
    """fp32 LoRA params with bf16 activations: grads come back in fp32, values match."""
    d = _make(CASES[2], torch.bfloat16, "fp8", seed=2)
    outs = _run_kernel(d, 0.5)
    refs = _run_reference64(d, 0.5)
    assert outs[2].dtype == torch.float32 and outs[3].dtype == torch.float32
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= TOL[torch.bfloat16]


def test_switch_lora_sets_without_copies(kernels_on):
    """Student / teacher: same 8-bit base, a different (A, B) per call; the base is not touched."""
    d = _make(CASES[0], torch.float32, "int8", seed=3)
    wq_ptr, wq_before = d["w_q"].data_ptr(), d["w_q"].clone()
    for seed in (10, 11):
        g = torch.Generator().manual_seed(seed)
        A = (torch.randn(d["A"].shape, generator=g) * 0.1).to(DEVICE)
        B = (torch.randn(d["B"].shape, generator=g) * 0.1).to(DEVICE)
        y = lora_linear(d["x"], d["w_q"], d["w_scale"], d["bias"], A, B, 1.0, kernels="on")
        ref = lora_linear_reference(d["x"].double().cpu(), d["w_q"].cpu(), d["w_scale"].double().cpu(),
                                    d["bias"].double().cpu(), A.double().cpu(), B.double().cpu(), 1.0)
        assert rel_err(y, ref) <= TOL[torch.float32]
    assert d["w_q"].data_ptr() == wq_ptr and torch.equal(d["w_q"], wq_before)


@pytest.mark.parametrize("act_quant", ["off", "int8"])
def test_zero_lora_scale(kernels_on, act_quant):
    """scale = 0 (lora_alpha 0): the base layer alone, no NaN. The GEMM epilogue folds the LoRA
    scale into its accumulator (it divides by it), so the host must drop a zero LoRA term."""
    d = _make(CASES[2], torch.float32, "int8", seed=12)
    outs = _run_kernel(d, 0.0, act_quant=act_quant)
    refs = _run_reference64(d, 0.0, act_quant=act_quant)
    for name, o, r in zip(("y", "dx"), outs[:2], refs[:2]):
        assert torch.isfinite(o).all() and rel_err(o, r) <= TOL[torch.float32], name
    assert (outs[2] == 0).all() and (outs[3] == 0).all()


def test_no_grad_for_frozen_inputs_and_partial_grads(kernels_on):
    d = _make(CASES[0], torch.float32, "int8", seed=4)
    A = d["A"].clone().requires_grad_()
    y = lora_linear(d["x"], d["w_q"], d["w_scale"], d["bias"], A, d["B"], 0.5, kernels="on")  # x and B need no grad
    y.backward(d["dy"])
    assert utils.DISPATCH_COUNTS["lora_linear.triton"] == 1
    ref = _run_reference64(d, 0.5)
    assert rel_err(A.grad, ref[2]) <= TOL[torch.float32]


@pytest.mark.parametrize("trainable", ["bias", "w_scale"])
def test_a_trainable_base_goes_to_the_reference(trainable):
    """The kernel treats bias and scales as frozen (no gradient for them): one that requires grad
    takes the reference, which gives it one, instead of silently getting None; forced on, it is an
    error that says why."""
    d = _make(CASES[0], torch.float32, "int8", seed=4)
    base = {"bias": d["bias"].clone(), "w_scale": d["w_scale"].clone()}
    base[trainable].requires_grad_()
    utils.reset_dispatch_counts()
    y = lora_linear(d["x"], d["w_q"], base["w_scale"], base["bias"], d["A"], d["B"], 0.5, kernels="auto")
    y.backward(d["dy"])
    assert utils.DISPATCH_COUNTS["lora_linear.reference"] == 1 and base[trainable].grad is not None
    with torch.no_grad():  # no graph, nothing to differentiate: the kernel runs
        lora_linear(d["x"], d["w_q"], base["w_scale"], base["bias"], d["A"], d["B"], 0.5, kernels="auto")
    assert utils.DISPATCH_COUNTS["lora_linear.triton"] == 1
    with pytest.raises(RuntimeError, match="requires grad"):
        lora_linear(d["x"], d["w_q"], base["w_scale"], base["bias"], d["A"], d["B"], 0.5, kernels="on")


def test_autocast_goes_to_the_reference():
    """The kernel computes in x's dtype; under autocast the reference does what autocast asks
    (here: bf16 output for fp32 x), where the kernel returned fp32 and its backward crashed."""
    d = _make(CASES[2], torch.float32, "int8", seed=6)
    utils.reset_dispatch_counts()
    x = d["x"].clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = lora_linear(x, d["w_q"], d["w_scale"], d["bias"], d["A"], d["B"], 0.5, kernels="auto")
        y.float().sum().backward()
    assert utils.DISPATCH_COUNTS["lora_linear.reference"] == 1 and y.dtype == torch.bfloat16
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_output_can_be_modified_in_place(kernels_on):
    """As on the reference path: `y += r` on the kernel's output (a model's in-place residual) works
    and the gradients are those of the out-of-place sum."""
    d = _make(CASES[1], torch.float32, "int8", seed=7)  # 3-D x
    x = d["x"].clone().requires_grad_()
    A = d["A"].clone().requires_grad_()
    y = lora_linear(x, d["w_q"], d["w_scale"], d["bias"], A, d["B"], 0.5, kernels="on")
    assert y.shape == (*d["x"].shape[:-1], d["w_q"].shape[0]) and y._base is None
    y.mul_(2.0).add_(1.0)
    y.backward(d["dy"])
    ref = _run_reference64({**d, "dy": 2.0 * d["dy"]}, 0.5)
    assert rel_err(x.grad, ref[1]) <= TOL[torch.float32] and rel_err(A.grad, ref[2]) <= TOL[torch.float32]


def test_strided_bias_and_scales_are_read_by_their_strides(kernels_on):
    """A bias or scale vector that is a strided view (every other element of a larger tensor)
    gives the reference's values, in the GEMM epilogue, the dequantiser and the row quantiser."""
    d = _make(CASES[0], torch.float32, "int8", seed=8)
    N = d["w_q"].shape[0]
    strided = lambda v: torch.stack([v, torch.full_like(v, 7.0)], 1).reshape(-1)[::2]  # noqa: E731
    bias, w_scale = strided(d["bias"]), strided(d["w_scale"])
    assert bias.stride(0) == 2 and torch.equal(bias, d["bias"])
    y = lora_linear(d["x"], d["w_q"], w_scale, bias, d["A"], d["B"], 0.5, kernels="on")
    assert rel_err(y, _run_reference64(d, 0.5)[0]) <= TOL[torch.float32]
    assert torch.equal(ll.dequantize(d["w_q"], w_scale, torch.float32), ll.dequantize(d["w_q"], d["w_scale"],
                                                                                       torch.float32))
    x2d = d["x"].reshape(-1, d["x"].shape[-1])
    col = torch.rand(x2d.shape[1], device=x2d.device) + 0.5
    q, s_ = ll.quantize_rows(x2d, strided(col))
    q_ref, s_ref = ll.quantize_rows_reference(x2d, col)
    assert torch.equal(q.cpu(), q_ref.cpu()) and torch.equal(s_.cpu(), s_ref.cpu()) and N == d["bias"].numel()


def test_a_view_reaching_past_int32_offsets_is_copied():
    """The GEMM's offsets are int32: a sliced x whose rows are 2^31 elements apart is copied to a
    dense one (the size check alone would let it through); anything smaller is passed as it is."""
    wide = torch.empty((2, 2**31), dtype=torch.int8, device="meta")[:, :4]
    dense = ll._int32_addressable(wide)
    assert dense.stride() == (4, 1) and dense.shape == (2, 4)
    small = torch.empty((3, 8))[:, :4]
    assert ll._int32_addressable(small) is small


def test_soft_fp8_conversion_path(kernels_on, monkeypatch):
    """The integer e4m3 decoder used on GPUs without native FP8 converts (< sm_89)."""
    monkeypatch.setattr(ll, "FORCE_SOFT_FP8", True)
    d = _make(CASES[0], torch.float32, "fp8", seed=5)
    outs = _run_kernel(d, 0.75)
    refs = _run_reference64(d, 0.75)
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= TOL[torch.float32]


def test_fp8_decoder_all_codes():
    triton = pytest.importorskip("triton")
    tl = triton.language

    @triton.jit
    def _decode(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, ll._fp8e4m3_to_f32(tl.load(src + offs, mask=m, other=0)), mask=m)

    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)  # no NaN
    out = torch.empty(codes.numel(), dtype=torch.float32)
    codes_d, out_d = codes.to(DEVICE), out.to(DEVICE)
    _decode[(1,)](codes_d, out_d, codes.numel(), BLOCK=256)
    expect = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(out_d.cpu(), expect)


@pytest.mark.parametrize("soft", [False, True], ids=["native", "soft-fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_is_bitwise_the_reference(kernels_on, monkeypatch, dtype, soft):
    """The backward's transient weight rounds exactly like lora_linear_reference's (fp32 product,
    one rounding), for both formats; 3 × 2053 elements is not a multiple of the block."""
    monkeypatch.setattr(ll, "FORCE_SOFT_FP8", soft)
    w = torch.randn(3, 2053, generator=torch.Generator().manual_seed(6)) * 0.05
    for fmt in FMTS:
        w_q, w_scale = quantize_weight(w, fmt)
        out = ll.dequantize(w_q.to(DEVICE), w_scale.to(DEVICE), dtype)
        assert out.dtype == dtype
        assert torch.equal(out.cpu(), (w_q.float() * w_scale[:, None]).to(dtype)), fmt


@pytest.mark.parametrize("shape", [(37, 70), (16, 16), (1, 5), (70, 33)], ids=str)
def test_transpose_8bit_is_exact(kernels_on, shape):
    """act_quant's dx reads this transposed copy of Wq: every byte in place, for int8 and FP8,
    on shapes that are not multiples of the tile."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(9)) * 0.05
    for fmt in FMTS:
        w_q = quantize_weight(w, fmt)[0].to(DEVICE)
        out = ll.transpose_8bit(w_q)
        assert out.dtype == w_q.dtype and out.shape == shape[::-1] and out.is_contiguous()
        assert torch.equal(out.cpu().view(torch.uint8), w_q.cpu().t().contiguous().view(torch.uint8)), fmt


def test_quantize_weight_roundtrip():
    w = torch.randn(33, 70) * 0.02
    w[3] = 0.0  # an all-zero row must not divide by zero
    for fmt, qmax, tol in (("int8", 127, 0.5 / 127), ("fp8", 448, 0.07)):
        w_q, s = quantize_weight(w, fmt)
        assert s.dtype == torch.float32 and s.shape == (33,)
        assert w_q.float().abs().max() <= qmax
        deq = w_q.float() * s[:, None]
        assert torch.isfinite(deq).all() and (deq[3] == 0).all()
        err = ((deq - w).abs() / w.abs().amax(1, keepdim=True).clamp_min(1e-12)).max().item()
        assert err <= tol, (fmt, err)


def test_split_reduction_is_exercised():
    """The test shapes do take the split-over-M path for dA / dB (partials summed on the host)."""
    if DEVICE != "cpu" or not utils.is_interpret():
        pytest.skip("split plan sizes are for the interpreter")
    splits, _ = ll._split_plan(tiles=2, R=74, device=torch.device("cpu"))
    assert splits > 1


def test_autotuner_keeps_its_timings_on_disk():
    """Triton can (since after 3.3) cache autotuning results across processes; ours asks for it (the
    interpreter never benchmarks, so only the request is checked here)."""
    triton = pytest.importorskip("triton")
    import inspect

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        assert ll._autotune_options() == {"cache_results": True}
        assert ll._mm_main.cache_results or utils.is_interpret()
    else:
        assert ll._autotune_options() == {}


def test_prune_main_keeps_deep_tiles_for_int8_only():
    """The 128-deep K tiles are timed for int8 x int8 problems only: with 16-bit operands they need
    128-224 KB of shared memory (compile-report.md). A list of only deep tiles is kept as it is."""
    pytest.importorskip("triton")
    shallow, deep = ll._cfg(128, 256, 64, 8, 8, 3), ll._cfg(128, 128, 128, 8, 8, 3)
    assert ll._prune_main([shallow, deep], {}, INT8_DOT=True) == [shallow, deep]
    assert ll._prune_main([shallow, deep], {}, INT8_DOT=False) == [shallow]
    assert ll._prune_main([deep], {}, INT8_DOT=False) == [deep]
