"""Kernel tests run everywhere: on CPU through Triton's interpreter, on a GPU compiled.

``triton.jit`` decides at decoration time whether a kernel is interpreted, so
``TRITON_INTERPRET=1`` must be set before ``lowvram_dopsd.kernels`` is imported; it is set here, at
collection, unless the caller chose (``LOWVRAM_DOPSD_TEST_GPU=1`` or an explicit
``TRITON_INTERPRET``). The variable is then removed again and set only around each kernel test, so
that CPU tests elsewhere in the same pytest session (the trainer's, whose ``auto`` dispatch would
otherwise follow ``TRITON_INTERPRET=1``) keep using the plain-torch references.
"""

import importlib
import os
import sys

_SET_HERE = "TRITON_INTERPRET" not in os.environ and os.environ.get("LOWVRAM_DOPSD_TEST_GPU") != "1"
if _SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"
elif os.environ.get("LOWVRAM_DOPSD_TEST_GPU") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402

import lowvram_dopsd.kernels  # noqa: E402

if _SET_HERE and "lowvram_dopsd.kernels.lora_linear" in sys.modules:
    # imported earlier in this session without the interpreter: re-decorate the kernels
    from lowvram_dopsd.kernels import lora_linear as _ll

    if type(_ll._qlora_mm_kernel).__name__ != "InterpretedFunction":
        for _name in ("utils", "lora_linear", "dopsd_loss"):
            importlib.reload(sys.modules[f"lowvram_dopsd.kernels.{_name}"])
        importlib.reload(lowvram_dopsd.kernels)

import kernels_testlib  # noqa: E402  (tests/kernels is on sys.path: pytest prepend mode)
from lowvram_dopsd.kernels import utils  # noqa: E402

DEVICE = kernels_testlib.DEVICE  # decided while TRITON_INTERPRET is still set

if _SET_HERE:
    del os.environ["TRITON_INTERPRET"]


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """TRITON_INTERPRET=1 for the duration of each kernel test (see the module docstring)."""
    if _SET_HERE:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every kernel output buffer starts as NaN: an element a kernel fails to write shows up."""
    with utils.poison_outputs(True):
        yield


@pytest.fixture
def kernels_on(monkeypatch):
    """Force the Triton path (fails loudly instead of silently testing the reference)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "on")
    utils.reset_dispatch_counts()
    yield
