"""Dispatch: kernels="off"|"on"|"auto", checked through the dispatch counters."""

import pytest
import torch

from lowvram_dopsd.kernels import utils
from lowvram_dopsd.kernels.dopsd_loss import dopsd_loss
from lowvram_dopsd.kernels.lora_linear import lora_linear, quantize_weight

from kernels_testlib import DEVICE


def _args():
    g = torch.Generator().manual_seed(0)
    w_q, w_s = quantize_weight(torch.randn(24, 20, generator=g), "int8")
    x = torch.randn(3, 20, generator=g)
    A, B = torch.randn(4, 20, generator=g), torch.randn(24, 4, generator=g)
    return [t.to(DEVICE) for t in (x, w_q, w_s)] + [None] + [A.to(DEVICE), B.to(DEVICE), 0.5]


def test_off_uses_reference():
    utils.reset_dispatch_counts()
    lora_linear(*_args(), kernels="off")
    dopsd_loss(torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE), kernels="off")
    assert utils.DISPATCH_COUNTS == {"lora_linear.reference": 1, "dopsd_loss.reference": 1}


def test_on_uses_triton():
    pytest.importorskip("triton")
    utils.reset_dispatch_counts()
    lora_linear(*_args(), kernels="on")
    dopsd_loss(torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE), kernels="on")
    assert utils.DISPATCH_COUNTS == {"lora_linear.triton": 1, "dopsd_loss.triton": 1}


def test_auto_follows_availability():
    utils.reset_dispatch_counts()
    lora_linear(*_args())  # "auto", the default
    path = "triton" if utils.kernels_available(DEVICE) else "reference"
    assert utils.DISPATCH_COUNTS == {f"lora_linear.{path}": 1}


def test_kernels_available_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not utils.kernels_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.kernels_available("cpu") == utils.HAS_TRITON


def test_on_with_unsupported_input_raises():
    args = _args()
    args[0] = args[0].double()  # float64 activations: reference only
    with pytest.raises(RuntimeError, match="float64"):
        lora_linear(*args, kernels="on")
    utils.reset_dispatch_counts()
    assert lora_linear(*args, kernels="auto").dtype == torch.float64
    assert utils.DISPATCH_COUNTS == {"lora_linear.reference": 1}


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="auto|on|off"):
        lora_linear(*_args(), kernels="sometimes")
    with pytest.raises(ValueError, match="auto|on|off"):
        dopsd_loss(torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE), kernels="sometimes")


def test_a_triton_older_than_the_kernels_need_leaves_them_on_the_references(tmp_path):
    """Triton 3.2 (torch 2.6's) decorates our kernels only with a GPU driver and its interpreter
    cannot run them (utils.MIN_TRITON): with it installed the package must still import, run the
    references under "auto", and say why under "on". A stand-in `triton` 3.2.0 package shows it."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '3.2.0'\n"
                                      "def autotune(*a, **k):\n    raise RuntimeError('0 active drivers')\n")
    (fake / "language.py").write_text("")
    code = """
import torch
from lowvram_dopsd.kernels import utils
from lowvram_dopsd.kernels.lora_linear import lora_linear, quantize_weight
w_q, w_s = quantize_weight(torch.randn(8, 4), "int8")
args = (torch.randn(3, 4), w_q, w_s, None, torch.randn(2, 4), torch.randn(8, 2), 0.5)
y = lora_linear(*args)
assert not utils.HAS_TRITON and utils.TRITON_VERSION == (3, 2, 0), utils.TRITON_VERSION
assert dict(utils.DISPATCH_COUNTS) == {"lora_linear.reference": 1}, utils.DISPATCH_COUNTS
try:
    lora_linear(*args, kernels="on")
except RuntimeError as exc:
    print(exc)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Triton 3.2.0 is older than the 3.3 the kernels need" in run.stdout


def test_triton_version_parsing():
    assert utils._version("3.3.1") == (3, 3, 1)
    assert utils._version("3.10.0+git1a2b3c") == (3, 10, 0)
    assert utils._version("3.5.0rc1") == (3, 5, 0)
    assert utils._version("4.0") == (4, 0, 0)
    assert (3, 10, 0) >= utils.MIN_TRITON > (3, 2, 0)


@pytest.mark.skipif(not utils.HAS_TRITON, reason="the gate applies only where Triton imports")
@pytest.mark.parametrize("version, capability, problem", [
    # torch 2.7.0's Triton on an RTX 50xx: no tl.dot compiles (compile-triton-versions.md)
    ((3, 3, 0), (12, 0), "Triton 3.3.0 cannot compile matrix multiplies for this GPU (compute capability 12.0)"),
    ((3, 3, 1), (12, 0), ""),   # torch 2.7.1's compiles them
    ((3, 3, 0), (9, 0), ""),    # and 3.3.0 compiles them for an H100
    # a T4 / RTX 20xx: no tensor-core path in Triton, the act8 GEMM does not compile (compile-report-sm75.md)
    ((3, 9, 0), (7, 5), "this GPU (compute capability 7.5) is older than Ampere (8.0)"),
    ((3, 9, 0), (8, 0), ""),    # an A100, the oldest the kernels run on
])
def test_a_gpu_the_installed_triton_cannot_compile_for_takes_the_reference(monkeypatch, fake_gpu, version, capability,
                                                                          problem):
    """Without the gate, 3.3.0 on sm_120 (or an act8 run on a T4) would crash the first step: the
    autotuner does not skip a compiler error. With it, the GPU counts as one the kernels do not run on,
    and the reason is given."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(utils, "TRITON_VERSION", version)
    fake_gpu(capability)
    assert utils.kernels_available("cuda") is not bool(problem)
    assert utils.kernels_available("cuda:0") is not bool(problem)
    assert utils.too_old("cuda") is (capability < (8, 0))
    assert (problem in utils.gpu_problem("cuda")) if problem else utils.gpu_problem("cuda") == ""
    if problem:
        assert problem in utils.why_not("cuda")
        with pytest.raises(RuntimeError, match=f"compute capability {capability[0]}.{capability[1]}"):
            utils.use_triton("lora_linear", torch.device("cuda"), kernels="on")
        assert not utils.use_triton("lora_linear", torch.device("cuda"), kernels="auto")


@pytest.mark.skipif(not utils.HAS_TRITON, reason="records real launches")
def test_every_launch_asks_for_its_fp_fusion(monkeypatch):
    """Every kernel launch names enable_fp_fusion (utils.FP_FUSION; False for the quantiser), so the
    numerics do not move with Triton's default (3.10 turns contraction off) and Triton 3.9 prints no
    warning into the training log. The launches of a LoRA linear's forward and backward in every
    mode and of the loss are recorded, not run (kernels.aot.record)."""
    from lowvram_dopsd.kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # aot.record refuses interpreted mode; nothing is compiled
    target, launches = aot.TARGETS["sm_90"], []
    for weight, act8 in (("int8", False), ("fp8", False), ("int8", True)):
        launches += aot.record(aot.lora_linear_step(272, 384, 640, 16, weight, act8), target)
    launches += aot.record(aot.loss_step(), target)
    assert {launch.name for launch in launches} == {
        "_mm_main", "_mm_skinny_p", "_mm_skinny_q", "_scale_kernel", "_quant_rows_kernel", "_transpose_kernel",
        "_dopsd_loss_kernel", "_scale_grad_kernel"}
    for launch in launches:
        assert launch.kwargs.get("enable_fp_fusion") is (launch.name != "_quant_rows_kernel"), launch.name
