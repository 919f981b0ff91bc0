"""Where a CUDA step's host time goes: helpers shared by profile_host.py and bench_memory.py --profile.

`gpu_timeline` reads a torch.profiler trace without building its event tree (a roll-out state has
~10^5 events; FunctionEvent trees of that size take minutes in Python): the GPU's busy time (union
of kernel / memcpy / memset intervals), the kernel count, the CUDA runtime calls that launch or
wait, and the GPU time per kernel and per kind of kernel (`kernel_table`: what a lever would have to
shorten). `python_hot_spots` runs a callable under cProfile and returns its costliest functions.
"""
from __future__ import annotations

import cProfile
import pstats
import re
import time
from typing import Callable

import torch

LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
WAIT = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
        "cudaMemcpy", "cudaStreamWaitEvent")


def gpu_timeline(fn: Callable[[], object], sync: Callable[[], None]) -> dict:
    """Run `fn` once under torch.profiler (CPU + CUDA); wall time, GPU busy time and launch/wait calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    spans, calls, kernels = [], {}, {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            spans.append((e.start_ns(), e.start_ns() + e.duration_ns()))
            n, t = kernels.get(e.name(), (0, 0))
            kernels[e.name()] = (n + 1, t + e.duration_ns())
        elif e.name() in LAUNCH or e.name() in WAIT:
            n, t = calls.get(e.name(), (0, 0))
            calls[e.name()] = (n + 1, t + e.duration_ns())
    spans.sort()
    busy, end = 0, None
    for s, f in spans:  # union of intervals (kernels of one stream do not overlap; copies may)
        if end is None or s > end:
            busy += f - s
            end = f
        elif f > end:
            busy += f - end
            end = f
    first = spans[0][0] if spans else 0
    return {"wall_s": wall, "gpu_busy_s": busy / 1e9, "gpu_busy_pct": 100 * busy / 1e9 / wall if wall else None,
            "gpu_span_s": ((end or 0) - first) / 1e9, "gpu_events": len(spans),
            "calls": {k: {"n": n, "ms": t / 1e6} for k, (n, t) in sorted(calls.items())},
            "kernels": kernel_table(kernels)}


# Kinds of GPU work by kernel name, first match wins (names as CUDA, cuBLAS, cuDNN, flash-attn, inductor and
# our kernels/ give them). "gemm (ours)" is the fused 8-bit LoRA linear and its helpers.
KINDS = [
    ("gemm (ours)", r"_qlora_mm|_quant_rows|_scale_kernel|_transpose_kernel"),
    ("loss (ours)", r"_dopsd_loss|_scale_grad"),
    ("attention", r"flash|fmha|attention|attn|sdpa"),
    ("gemm (cuBLAS/CUTLASS)", r"gemm|xmma|cutlass|cublas|nvjet|s1688|s16816|wgmma|splitk"),
    ("compiled (inductor)", r"^triton_"),
    ("norm", r"norm"),
    ("reduction", r"reduce|softmax|sum_|mean"),
    ("copy / cast", r"copy|cast|memcpy|memset|cat_|catarray|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def kernel_table(kernels: dict[str, tuple[int, int]], top: int = 20) -> dict:
    """{name: (launches, ns)} -> the `top` kernels by GPU time and the time per kind (`KINDS`), in ms."""
    total = sum(t for _, t in kernels.values()) or 1
    kinds: dict[str, list[float]] = {}
    for name, (n, t) in kernels.items():
        k = kinds.setdefault(kernel_kind(name), [0, 0.0])
        k[0] += n
        k[1] += t
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    return {"total_ms": total / 1e6 if kernels else 0.0,
            "kinds": {k: {"n": n, "ms": t / 1e6, "pct": 100 * t / total} for k, (n, t) in
                      sorted(kinds.items(), key=lambda kv: -kv[1][1])},
            "top": [{"name": name[:120], "kind": kernel_kind(name), "n": n, "ms": t / 1e6, "pct": 100 * t / total}
                    for name, (n, t) in rows]}


def python_hot_spots(fn: Callable[[], object], sync: Callable[[], None], top: int = 25) -> dict:
    """Run `fn` once under cProfile: its wall time and the `top` functions by own time (cProfile's
    own overhead slows Python ~1.5-2x, so read shares, not absolute times)."""
    sync()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    fn()
    sync()
    pr.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(pr)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{file.rsplit('site-packages/', 1)[-1].rsplit('/main/', 1)[-1]}:{line}({name})"
        rows.append({"fn": where, "calls": nc, "own_ms": tt * 1e3, "cum_ms": ct * 1e3})
    rows.sort(key=lambda r: -r["own_ms"])
    return {"wall_s": wall, "total_own_ms": sum(r["own_ms"] for r in rows), "top": rows[:top]}


def cuda_sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
