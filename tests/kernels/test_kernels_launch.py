"""`utils.launch`: the kernels' launch path that skips Triton's per-call dispatch once compiled.

It keeps the compiled kernel Triton returned for one ``specialization`` of the runtime arguments and
calls it directly next time; that is right only if equal specialisations never hide two of Triton's
compiled kernels. That is checked against Triton's own argument binder (built for an sm_90 target,
no GPU needed), the caching logic with a recording stand-in for Triton, and, on a GPU
(``LOWVRAM_DOPSD_TEST_GPU=1``), the real launches against Triton's dispatch, bit for bit.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from kernels_testlib import DEVICE
from lowvram_dopsd.kernels import lora_linear as ll
from lowvram_dopsd.kernels import utils

pytest.importorskip("triton")

_BINDER = r"""
import json
import torch
from lowvram_dopsd.kernels import aot, lora_linear as ll, utils
import triton

driver = triton.runtime.driver
driver.set_active(aot._TargetDriver(aot.TARGETS["sm_90"]))
out = {}
for name in ("_qlora_mm_kernel", "_scale_kernel"):
    fn = getattr(ll, name)
    binder = fn.create_binder()[-1]
    n_rt = sum(not p.is_constexpr for p in fn.params)
    base = {"_qlora_mm_kernel": 26, "_scale_kernel": 5}[name]
    assert n_rt == base, (name, n_rt)
    buf = {dt: torch.zeros(64, dtype=dt) for dt in (torch.int8, torch.bfloat16, torch.float32)}
    tensors = [buf[dt][off:] for dt in buf for off in (0, 1, 8, 16)]  # 16-byte aligned or not
    ints = [1, 2, 15, 16, 17, 48, 2**31 - 16, 2**31, 2**32 + 1]
    floats = [0.0, 1.0, 2.5]
    seen = {}
    for i in range(600):  # argument lists drawn from the pools above, every position varied
        args = []
        for j, p in enumerate(p for p in fn.params if not p.is_constexpr):
            pool = tensors if p.name.endswith("_ptr") else (floats if p.name in ("alpha", "lora_alpha") else ints)
            args.append(pool[(i * 7 + j * 13 + (i // len(pool)) * j) % len(pool)])
        consts = {p.name: 1 for p in fn.params if p.is_constexpr}
        _, spec, _ = binder(*args, **consts)
        ours = repr(utils.specialization(args))
        theirs = repr([s for s, p in zip(spec, fn.params) if not p.is_constexpr])
        seen.setdefault(ours, set()).add(theirs)
    out[name] = {"keys": len(seen), "clashes": [k for k, v in seen.items() if len(v) > 1],
                 "triton_kinds": len({t for v in seen.values() for t in v})}
print("OUT " + json.dumps(out))
"""


def test_specialization_is_at_least_as_fine_as_tritons():
    """Argument lists with one ``specialization`` key always get one specialisation from Triton's binder
    (what its compile cache is keyed on): a cached kernel is never launched with arguments Triton would
    have compiled differently (a misaligned pointer, an int that is 1 or beyond int32)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    p = subprocess.run([sys.executable, "-c", _BINDER], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("OUT "))[4:])
    for name, r in out.items():
        assert r["clashes"] == [], (name, r["clashes"][:3])
        assert r["triton_kinds"] > 10, (name, r)  # the draw did vary what Triton specialises on


class _FakeCompiled:
    """What `launch` reads off a compiled kernel: its launcher, function handle and packed metadata."""

    def __init__(self, log):
        self.function, self.packed_metadata = "fn-handle", "meta"
        self.run = lambda g0, g1, g2, stream, fn, meta, lmeta, enter, exit_, *args: log.append(
            ("direct", (g0, g1, g2), (stream, fn, meta, lmeta, enter, exit_), args))


def test_launch_caches_per_kwargs_and_specialization(monkeypatch):
    """The first launch for a (kwargs, specialisation) goes through Triton and its compiled kernel is kept;
    the next one calls that kernel with every parameter in signature order (constexprs and their defaults
    after the runtime arguments) on a 3-D grid; other kwargs or another alignment go through Triton again."""
    import triton

    log = []

    def kernel(a_ptr, n, BLOCK: "triton.language.constexpr", FLAG: "triton.language.constexpr" = 7):
        pass

    class FakeJIT(triton.runtime.JITFunction):
        def __init__(self):
            self.fn = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                log.append(("jit", grid, args, kwargs))
                return _FakeCompiled(log)
            return run

    monkeypatch.setattr(triton.compiler, "CompiledKernel", _FakeCompiled)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # (a CPU-only torch has no CUDA)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    monkeypatch.setattr(utils, "FAST_LAUNCH", True)
    monkeypatch.setattr(utils, "_COMPILED", {})
    fn = FakeJIT()
    x = torch.zeros(64, dtype=torch.float32)
    utils.launch(fn, (4,), (x, 32), {"BLOCK": 16, "num_warps": 4})
    utils.launch(fn, (5, 2), (x, 48), {"BLOCK": 16, "num_warps": 4})  # same specialisation: direct
    utils.launch(fn, (4,), (x, 32), {"BLOCK": 32, "num_warps": 4})   # other constexpr: Triton
    utils.launch(fn, (4,), (x[1:], 32), {"BLOCK": 16, "num_warps": 4})  # misaligned pointer: Triton
    utils.launch(fn, (4,), (x, 1), {"BLOCK": 16, "num_warps": 4})  # n == 1 (Triton specialises): Triton
    assert [e[0] for e in log] == ["jit", "direct", "jit", "jit", "jit"]
    assert log[1] == ("direct", (5, 2, 1), (1234, "fn-handle", "meta", None, None, None), (x, 48, 16, 7))
    monkeypatch.setattr(utils, "FAST_LAUNCH", False)
    utils.launch(fn, (4,), (x, 32), {"BLOCK": 16, "num_warps": 4})
    assert log[-1][0] == "jit"


@pytest.mark.skipif(DEVICE != "cuda", reason="compiled launches need a GPU (LOWVRAM_DOPSD_TEST_GPU=1); the "
                    "interpreter takes Triton's own path, and the CPU tests above check the caching logic")
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_direct_launches_match_tritons_dispatch_on_gpu(kernels_on, monkeypatch, offset):
    """Forward and backward of a LoRA linear, twice through the cached compiled kernels (after a first
    call that fills the cache), equal the same calls through Triton's dispatch bit for bit; ``offset``
    elements into a buffer makes x's pointer misaligned, which must not reuse an aligned kernel."""
    g = torch.Generator(device="cuda").manual_seed(0)
    M, K, N, r = 200, 96, 160, 16
    buf = torch.randn(M * K + 8, device="cuda", generator=g, dtype=torch.bfloat16)
    x0 = buf[offset: offset + M * K].view(M, K)
    w_q, w_s = ll.quantize_weight(torch.randn(N, K, device="cuda", generator=g))
    A = torch.randn(r, K, device="cuda", generator=g) * 0.1
    B = torch.randn(N, r, device="cuda", generator=g) * 0.1
    dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)

    def run():
        x = x0.detach().requires_grad_()  # a view of buf: misaligned when offset > 0
        a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
        y = ll.lora_linear(x, w_q, w_s, None, a, b, 2.0)
        y.backward(dy)
        return [y, x.grad, a.grad, b.grad]

    monkeypatch.setattr(utils, "FAST_LAUNCH", False)
    want = run()
    monkeypatch.setattr(utils, "FAST_LAUNCH", True)
    monkeypatch.setattr(utils, "_COMPILED", {})
    run()
    got = run()
    assert utils._COMPILED, "nothing was launched directly"
    for w, o in zip(want, got):
        assert torch.equal(w, o)
