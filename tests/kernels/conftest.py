"""Kernel tests run everywhere: on CPU through Triton's interpreter, on a GPU compiled.

``triton.jit`` decides at decoration time whether a kernel is interpreted, so the session-wide
``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports
``lowvram_dopsd.kernels`` (``LOWVRAM_DOPSD_TEST_GPU=1`` runs the same tests compiled instead).
"""

import pytest

import kernels_testlib  # (tests/kernels is on sys.path: pytest prepend mode)
from lowvram_dopsd.kernels import utils

DEVICE = kernels_testlib.DEVICE


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every kernel output buffer starts as NaN: an element a kernel fails to write shows up."""
    with utils.poison_outputs(True):
        yield


@pytest.fixture
def kernels_on():
    """A test of the Triton path: needs Triton, starts with zeroed dispatch counts. Its calls pass
    ``kernels="on"``, so a kernel that cannot run fails loudly instead of testing the reference."""
    pytest.importorskip("triton")
    utils.reset_dispatch_counts()
    yield
