"""Dispatch: LOWVRAM_DOPSD_KERNELS=off|on|auto, checked through the dispatch counters."""

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


def test_off_uses_reference(monkeypatch):
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "off")
    utils.reset_dispatch_counts()
    lora_linear(*_args())
    dopsd_loss(torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE))
    assert utils.DISPATCH_COUNTS == {"lora_linear.reference": 1, "dopsd_loss.reference": 1}


def test_on_uses_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "on")
    utils.reset_dispatch_counts()
    lora_linear(*_args())
    dopsd_loss(torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE))
    assert utils.DISPATCH_COUNTS == {"lora_linear.triton": 1, "dopsd_loss.triton": 1}


def test_auto_follows_availability(monkeypatch):
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "auto")
    utils.reset_dispatch_counts()
    lora_linear(*_args())
    path = "triton" if utils.kernels_available(DEVICE) else "reference"
    assert utils.DISPATCH_COUNTS == {f"lora_linear.{path}": 1}


def test_kernels_available_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not utils.kernels_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.kernels_available("cpu") == utils.HAS_TRITON


def test_on_with_unsupported_input_raises(monkeypatch):
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "on")
    args = _args()
    args[0] = args[0].double()  # float64 activations: reference only
    with pytest.raises(RuntimeError, match="float64"):
        lora_linear(*args)
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "auto")
    utils.reset_dispatch_counts()
    assert lora_linear(*args).dtype == torch.float64
    assert utils.DISPATCH_COUNTS == {"lora_linear.reference": 1}


def test_bad_mode_rejected(monkeypatch):
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "sometimes")
    with pytest.raises(ValueError):
        utils.kernels_mode()
