"""Where a CUDA step's host time goes: helpers shared by profile_host.py and bench_memory.py --profile.

`gpu_timeline` reads a torch.profiler trace without building its event tree (a roll-out state has
~10^5 events; FunctionEvent trees of that size take minutes in Python): the GPU's busy time (union
of kernel / memcpy / memset intervals), the kernel count, and the CUDA runtime calls that launch or
wait. `python_hot_spots` runs a callable under cProfile and returns its costliest functions.
"""
from __future__ import annotations

import cProfile
import pstats
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
    spans, calls = [], {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            spans.append((e.start_ns(), e.start_ns() + e.duration_ns()))
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
            "calls": {k: {"n": n, "ms": t / 1e6} for k, (n, t) in sorted(calls.items())}}


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
