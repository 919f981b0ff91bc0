"""Parity of the one-pass D-OPSD loss (Triton) with a float64 reference: loss and d loss / d v_s."""

import pytest
import torch

from lowvram_dopsd.kernels import utils
from lowvram_dopsd.kernels.dopsd_loss import dopsd_loss, dopsd_loss_reference, x0_weight

from kernels_testlib import DEVICE, TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 5, 13, 7), (1, 16), (4, 301)]  # 455 / 16 / 301 elements per sample: masked tails
LOSS_TOL = 1e-5  # the loss is an fp32 sum of exact products of the inputs


def _make(shape, dtype, weighted, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_s = torch.randn(shape, generator=g).to(dtype)
    v_t = torch.randn(shape, generator=g).to(dtype)
    w = (torch.rand(shape[0], generator=g) + 0.1) if weighted else None
    return v_s.to(DEVICE), v_t.to(DEVICE), None if w is None else w.to(DEVICE)


def _ref64(v_s, v_t, w, grad_out, w_mult=1.0):
    vs = v_s.detach().to("cpu", torch.float64).requires_grad_()
    wd = None if w is None else w.cpu().double() * w_mult
    loss = dopsd_loss_reference(vs, v_t.detach().cpu().double(), wd)
    (loss * grad_out).backward()
    return loss.detach(), vs.grad


@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dopsd_loss_matches_reference(kernels_on, dtype, shape, weighted):
    v_s, v_t, w = _make(shape, dtype, weighted)
    v_s.requires_grad_()
    v_t.requires_grad_()
    loss = dopsd_loss(v_s, v_t, w, kernels="on")
    (loss * 1.7).backward()  # grad_output != 1 exercises the backward scaling
    ref_loss, ref_grad = _ref64(v_s, v_t, w, 1.7)
    assert utils.DISPATCH_COUNTS["dopsd_loss.triton"] == 1
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert v_t.grad is None, "the teacher prediction must get no gradient"
    assert v_s.grad.dtype == dtype and torch.isfinite(v_s.grad).all()
    assert rel_err(loss, ref_loss) <= LOSS_TOL
    assert rel_err(v_s.grad, ref_grad) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrong_reference_fails_at_tolerance(kernels_on, dtype):
    v_s, v_t, w = _make(SHAPES[0], dtype, True, seed=1)
    v_s.requires_grad_()
    dopsd_loss(v_s, v_t, w, kernels="on").backward()
    ok_loss, ok_grad = _ref64(v_s, v_t, w, 1.0)
    assert rel_err(v_s.grad, ok_grad) <= TOL[dtype]
    bad_loss, bad_grad = _ref64(v_s, v_t, w, 1.0, w_mult=1.01)  # weights off by 1 %
    assert rel_err(dopsd_loss(v_s, v_t, w, kernels="on"), bad_loss) > LOSS_TOL
    assert rel_err(v_s.grad, bad_grad) > TOL[dtype]


def test_mixed_dtypes_and_no_grad(kernels_on):
    v_s, _, w = _make(SHAPES[2], torch.bfloat16, True, seed=2)
    _, v_t, _ = _make(SHAPES[2], torch.float32, True, seed=3)
    with torch.no_grad():
        loss = dopsd_loss(v_s, v_t, w, kernels="on")
    ref, _ = _ref64(v_s, v_t, w, 1.0)
    assert rel_err(loss, ref) <= LOSS_TOL


def test_x0_identity(kernels_on):
    """x0 = x − σ·v at the same x: mean((x0_s − x0_t)²) == dopsd_loss(v_s, v_t, weight=σ²)."""
    v_s, v_t, _ = _make((3, 4, 9), torch.float32, False, seed=4)
    x = torch.randn_like(v_s)
    sigma = torch.tensor([0.2, 0.5, 0.9], device=v_s.device)
    sig = sigma.view(-1, 1, 1)
    x0_loss = ((x - sig * v_s) - (x - sig * v_t)).double().pow(2).mean()
    assert rel_err(dopsd_loss(v_s, v_t, x0_weight(sigma), kernels="on"), x0_loss) <= LOSS_TOL


@pytest.mark.parametrize("grad_out", [1024.0, 0.25])
def test_fp16_gradient_is_rounded_once(kernels_on, grad_out):
    """One 64x64x16 latent (n = 65536): 2/n = 3e-5 sits in fp16's subnormals, so a gradient stored
    in fp16 before backward scales it lost its low bits (1.2e-2 off at grad_output 1024). It is
    kept in fp32 and rounded once, to fp16: equal to the exact gradient rounded to fp16."""
    g = torch.Generator().manual_seed(5)
    v_t = torch.randn(1, 16, 64, 64, generator=g)
    v_s = (v_t + 0.01 * torch.randn(v_t.shape, generator=g)).half().to(DEVICE).requires_grad_()
    v_t = v_t.half().to(DEVICE)
    (dopsd_loss(v_s, v_t, kernels="on") * grad_out).backward()
    _, exact = _ref64(v_s, v_t, None, grad_out)
    assert v_s.grad.dtype == torch.float16
    assert rel_err(v_s.grad, exact.half()) <= 1e-3


def test_no_gradient_pass_without_a_graph(kernels_on, monkeypatch):
    """Under no_grad (the measure-only prior pass) the kernel writes no gradient, even when v_s
    requires grad; with a graph it does."""
    import lowvram_dopsd.kernels.dopsd_loss as mod

    asked = []
    real = mod.dopsd_loss_forward
    monkeypatch.setattr(mod, "dopsd_loss_forward", lambda *a, need_grad: asked.append(need_grad) or real(*a, need_grad=need_grad))
    v_s, v_t, w = _make(SHAPES[2], torch.float32, True, seed=6)
    v_s.requires_grad_()
    with torch.no_grad():
        quiet = dopsd_loss(v_s, v_t, w, kernels="on")
    loud = dopsd_loss(v_s, v_t, w, kernels="on")
    assert asked == [False, True] and quiet.grad_fn is None and loud.grad_fn is not None
    assert torch.equal(quiet, loud.detach())
