"""Shared helpers for the Triton kernels: optional Triton import, dispatch, debug allocation.

Dispatch rule (every public kernel function follows it, by its ``kernels`` argument: the run's
``kernels`` setting, which the trainer hands to the LoRA layers and the loss):

* ``kernels="off"``  -> always the plain-torch reference.
* ``kernels="on"``   -> always Triton (error if Triton cannot run on that device).
* ``kernels="auto"`` (default) -> Triton when it is importable and the tensors are on CUDA, or when
  Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``, used by the CPU tests); the
  reference otherwise.

``DISPATCH_COUNTS`` records which path each call took, so tests can check dispatch without
timing anything.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections import Counter
from typing import Iterator

import torch

#: The oldest Triton the kernels run on: every parity test passes on 3.3.1's interpreter (torch 2.7's
#: Triton; with numpy < 2.3, which its interpreter needs). Triton 3.2 (torch 2.6's) is left on the
#: references: its autotuner ignores a custom timer and asks for a GPU driver when a kernel is
#: decorated (at import: the CPU interpreter has none) and its interpreter passes the autotune
#: configs' internal fields to the kernel, so our kernels could not be checked on it.
MIN_TRITON = (3, 3, 0)
MIN_TRITON_TEXT = f"Triton {MIN_TRITON[0]}.{MIN_TRITON[1]}+ (torch 2.7+ ships it)"  # for advice to the user

#: GPU generations (compute capability major) whose matrix multiplies a Triton release cannot compile.
#: benchmarks/compile_versions.py compiles every kernel launch for sm_80-sm_120 with each Triton a
#: torch release pins (results/compile-triton-versions.md): 3.3.0 (torch 2.7.0) stops every tl.dot for
#: sm_120 (RTX 50xx) at "computeCapability not supported", which the autotuner does not skip, so the
#: first step would crash; 3.3.1 (torch 2.7.1) compiles them all.
NO_MMA = {(3, 3, 0): (12,)}

#: The oldest GPUs the kernels run on: Ampere, compute capability 8.0. Below it Triton emits no tensor-core
#: instruction for a tl.dot in any dtype. Compiled for sm_75 (Turing: T4, RTX 20xx) with Triton 3.9
#: (results/compile-report-sm75.md), every main-GEMM candidate is plain FMAs and spills, and the
#: int8-activation GEMM does not compile, which would crash the first step.
#: Those GPUs take the torch reference: quanto's dequantise + cuBLAS for the 8-bit layers.
MIN_CAPABILITY = (8, 0)


#: Launch option of every kernel but the quantiser (which asks for False: its rounding trick needs the
#: product rounded before the add). Triton up to 3.9 contracts a*b+c into FMAs by default, and 3.9
#: warns at the first compile that 3.10 will not (TRITON_DEFAULT_FP_FUSION). Asked for explicitly, the
#: numerics of the parity tests and GPU measurements stay as they were, on every version, and no
#: warning lands in the training log.
FP_FUSION = {"enable_fp_fusion": True}


def _version(text: str) -> tuple[int, int, int]:
    """'3.3.1' -> (3, 3, 1); '3.10.0+git1234' -> (3, 10, 0); '4.0' -> (4, 0, 0)."""
    parts = (text.split(".") + ["0", "0"])[:3]
    return tuple(int(re.match(r"\d*", p).group() or 0) for p in parts)  # type: ignore[return-value]


try:  # Triton is an optional extra ("kernels"); CPU-only installs run the references.
    import triton
    import triton.language as tl

    TRITON_VERSION: tuple[int, int, int] | None = _version(triton.__version__)
    HAS_TRITON = TRITON_VERSION >= MIN_TRITON
    #: why the kernels cannot run, for error messages ("" when they can)
    TRITON_MISSING = "" if HAS_TRITON else (
        f"Triton {triton.__version__} is older than the {MIN_TRITON[0]}.{MIN_TRITON[1]} the kernels need")
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    TRITON_VERSION, HAS_TRITON, TRITON_MISSING = None, False, "Triton is not installed"

if not HAS_TRITON:  # absent or too old: the kernel modules import against a stub and never launch

    class _Stub:
        """Stands in for ``triton`` / ``triton.language`` so the kernel modules still import.

        Decorators return the function unchanged; everything else returns another stub. No
        kernel is ever launched without Triton (dispatch picks the reference).
        """

        def __getattr__(self, name: str) -> "_Stub":
            return _Stub()

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _Stub):
                return args[0]
            return _Stub()

    triton = _Stub()  # type: ignore[assignment]
    tl = _Stub()  # type: ignore[assignment]


__all__ = [
    "HAS_TRITON",
    "MIN_TRITON",
    "MIN_TRITON_TEXT",
    "TRITON_MISSING",
    "TRITON_VERSION",
    "NO_MMA",
    "MIN_CAPABILITY",
    "FP_FUSION",
    "no_mma",
    "capability",
    "gpu_capability",
    "too_old",
    "gpu_problem",
    "why_not",
    "triton",
    "tl",
    "DISPATCH_COUNTS",
    "reset_dispatch_counts",
    "MODES",
    "kernels_available",
    "use_triton",
    "is_interpret",
    "poison_outputs",
    "empty",
    "num_sms",
    "to_storage",
    "launch",
    "cdiv",
    "next_pow2",
    "specialization",
    "FAST_LAUNCH",
]

_TRUE = ("1", "true", "yes", "on")

#: ``{"<kernel>.triton": n, "<kernel>.reference": n}``; incremented by every public call.
DISPATCH_COUNTS: Counter = Counter()


def reset_dispatch_counts() -> None:
    DISPATCH_COUNTS.clear()


def is_interpret() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


#: the values of every public function's ``kernels`` argument (and of the config key ``kernels``)
MODES = ("auto", "on", "off")


def no_mma(major: int) -> bool:
    """Whether the installed Triton cannot compile matrix multiplies for compute capability ``major``.x
    (``NO_MMA``); also what the compile tests skip (tests/kernels/test_kernels_aot.py)."""
    return major in NO_MMA.get(TRITON_VERSION, ())


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """CUDA device ``index``'s compute capability, looked up once (gpu_problem runs on every kernel call)."""
    return torch.cuda.get_device_capability(index)


def gpu_capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """The compute capability of ``device`` (default: the current CUDA device); None off CUDA."""
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return capability(torch.cuda.current_device() if device.index is None else device.index)


def too_old(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` is a CUDA GPU older than ``MIN_CAPABILITY``."""
    cap = gpu_capability(device)
    return cap is not None and cap < MIN_CAPABILITY


def gpu_problem(device: torch.device | str | None = None) -> str:
    """Why the kernels cannot run on this CUDA GPU: older than ``MIN_CAPABILITY``, or one the installed
    Triton cannot compile matrix multiplies for (``NO_MMA``); "" when they can (and off CUDA)."""
    if not HAS_TRITON or (cap := gpu_capability(device)) is None:
        return ""
    major, minor = cap
    if cap < MIN_CAPABILITY:
        return (f"this GPU (compute capability {major}.{minor}) is older than Ampere (8.0), the oldest the kernels "
                "run on: Triton has no tensor-core path for it")
    if not no_mma(major):
        return ""
    version = ".".join(map(str, TRITON_VERSION))
    return (f"Triton {version} cannot compile matrix multiplies for this GPU (compute capability {major}.{minor}); "
            "a newer Triton can (torch 2.7.1+ ships 3.3.1)")


def why_not(device: torch.device | str | None = None) -> str:
    """Why the kernels cannot run on ``device``'s GPU: Triton missing, too old, or unable to compile for
    it; "" when they can. For messages to the user."""
    return TRITON_MISSING or gpu_problem(device)


def kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``.

    True when Triton imports and either ``device`` is a CUDA device it compiles for (``gpu_problem``)
    or the Triton CPU interpreter is switched on (then any device qualifies: the interpreter runs on
    CPU tensors).
    """
    if not HAS_TRITON:
        return False
    if is_interpret():
        return True
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available() and not gpu_problem(device)


def use_triton(name: str, device: torch.device, unsupported: str | None = None, kernels: str = "auto") -> bool:
    """Decide (and count) which path the public function ``name`` takes for tensors on ``device``
    under the dispatch rule ``kernels`` (``MODES``).

    ``unsupported``: why these inputs are reference-only (e.g. float64), or None. With
    ``kernels="on"`` that, or Triton not running on ``device``, is an error."""
    if kernels not in MODES:
        raise ValueError(f"kernels must be one of {'|'.join(MODES)}, got {kernels!r}")
    ok = kernels != "off" and unsupported is None and kernels_available(device)
    if kernels == "on" and not ok:
        why = unsupported or why_not(device) or (
            f"Triton does not run on {device} (set TRITON_INTERPRET=1 for the CPU interpreter)")
        raise RuntimeError(f"kernels='on' but the Triton {name} cannot run: {why}")
    DISPATCH_COUNTS[f"{name}.{'triton' if ok else 'reference'}"] += 1
    return ok


# ---------------------------------------------------------------------------------------------
# Launching: skip Triton's per-call dispatch once a kernel is compiled
# ---------------------------------------------------------------------------------------------
#: Launch a kernel through its cached compiled form after its first launch for the same arguments'
#: specialisation (`launch`). LOWVRAM_DOPSD_KERNELS_FAST_LAUNCH=0, a profiling switch
#: (docs/environment.md), sends every launch through Triton's JIT dispatch.
FAST_LAUNCH = os.environ.get("LOWVRAM_DOPSD_KERNELS_FAST_LAUNCH", "1") == "1"
_COMPILED: dict = {}


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b): ``triton.cdiv`` is a constexpr_function, slow to call from Python."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def specialization(args) -> tuple:
    """What a compiled kernel depends on in its runtime arguments, finer than what Triton keys its own
    cache on (so one key never stands for two of Triton's kernels): a tensor's dtype and 16-byte
    alignment; an int's being 1, a multiple of 16, beyond int32 (i64) or beyond int64 (u64) (ints
    below 2 and negative ones are kept as they are); a float's nothing. Triton 3.3-3.9 specialise on
    exactly these, plus a type per value."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a if a <= 1 else 10 + (a % 16 == 0) + 2 * (a >= 2**31) + 4 * (a >= 2**63))
                 if type(a) is int else type(a) for a in args)


def launch(fn, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``fn[grid](*args, **kwargs)`` for a ``triton.jit`` function ``fn``, its runtime arguments
    ``args`` (positional) and its constexpr parameters and launch options ``kwargs`` (hashable).

    Triton's JIT dispatch binds and specialises every argument (26 for the GEMM), hashes the cache key
    and reads its knobs from the environment on every launch: about as much host time as the smaller
    GEMMs take on the GPU (benchmarks/results/profile-host-h100-before.md). The
    first launch for a given ``kwargs`` and ``specialization(args)`` goes through it and keeps the
    compiled kernel it returns; later ones call that kernel's launcher as Triton 3.3-3.9 do (grid,
    stream, function, metadata, then every parameter in signature order: the launcher skips the
    constexprs), without launch hooks: a profiler hooked into Triton (proton) sees the first launch
    of each configuration only (``LOWVRAM_DOPSD_KERNELS_FAST_LAUNCH=0`` shows it every launch).
    Anything but a plain JIT function (the interpreter's, or ``kernels.aot``'s recorder) is launched
    as given."""
    if not (FAST_LAUNCH and isinstance(fn, triton.runtime.JITFunction)):
        fn[grid](*args, **kwargs)
        return
    # id(fn): a JITFunction hashes its source key. The device: Triton keeps a kernel per current device.
    device = torch.cuda.current_device()
    key = (id(fn), device, tuple(kwargs.items()), specialization(args))
    hit = _COMPILED.get(key)
    if hit is not None:
        run, function, packed, consts, _ = hit
        g = grid + (1,) * (3 - len(grid))
        run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), function, packed, None, None, None,
            *args, *consts)
        return
    kernel = fn[grid](*args, **kwargs)
    if isinstance(kernel, triton.compiler.CompiledKernel) and kernel.function is not None:
        params = inspect.signature(fn.fn).parameters
        rest = list(params)[len(args):]
        consts = tuple(kwargs[n] if n in kwargs else params[n].default for n in rest)
        # the kernel object stays referenced: from Triton 3.8 on, dropping it unloads its module
        _COMPILED[key] = (kernel.run, kernel.function, kernel.packed_metadata, consts, kernel)


# ---------------------------------------------------------------------------------------------
# Debug allocation: poisoned outputs catch elements a kernel forgot to write.
# ---------------------------------------------------------------------------------------------
_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Inside this context every kernel output buffer starts as NaN (floats) or -1 (ints)."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` that fills with NaN when poisoning is on (tests, debugging)."""
    if not _POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


_SM_CACHE: dict = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessor count (a small stand-in under the interpreter, to exercise split paths)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]


@triton.jit
def to_storage(v, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 -> storage ``dtype``. ``EMULATE_RNE`` is set only under the CPU interpreter, whose
    fp32->bf16 cast truncates (triton 3.9): round to nearest-even in integer arithmetic first so the
    interpreter's numerics match the GPU's. Compiled out on GPU."""
    if EMULATE_RNE:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


def torch_to_tl_dtype(dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }[dtype]
