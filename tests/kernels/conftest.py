"""Kernel tests run everywhere: on CPU through Triton's interpreter, on a GPU compiled.

``TRITON_INTERPRET`` must be set before triton is imported (triton.jit decides at decoration
time), so it is set here, at collection, unless the caller set it (``TRITON_INTERPRET=0`` on a
GPU machine runs the same tests compiled).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("LOWVRAM_DOPSD_TEST_GPU") == "1" else "1")

import pytest  # noqa: E402

from kernels_testlib import DEVICE  # noqa: E402  (tests/kernels is on sys.path: pytest prepend mode)
from lowvram_dopsd.kernels import utils  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every kernel output buffer starts as NaN: an element a kernel fails to write shows up."""
    with utils.poison_outputs(True):
        yield


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def kernels_on(monkeypatch):
    """Force the Triton path (fails loudly instead of silently testing the reference)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("LOWVRAM_DOPSD_KERNELS", "on")
    utils.reset_dispatch_counts()
    yield
