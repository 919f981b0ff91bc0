"""Host (CPU) time of one LoRA'd linear as the trainer runs it, eager (needs a CUDA GPU; --tiny: CPU smoke).

The layer is the trainer's own `DualLoRALinear` (fp32 student A/B, as the optimizer keeps them) on
each base the trainer can run: the fused kernel (`fused`, `fused-act8`), quanto's dequantise + cuBLAS
(`quanto`, kernels off) and a bf16 nn.Linear (`bf16`). Per shape and path:

  host_fwd_ms / host_fwd_bwd_ms  CPU time to enqueue a teacher forward (no grad) / a student
                                 forward + backward (GPU not waited for)
  gpu_fwd_bwd_ms                 the same fwd+bwd's GPU time alone (CUDA graph), so host > GPU says
                                 an eager step waits on the host for this layer
  launches                       CUDA launches per fwd+bwd (torch.profiler), and cProfile's costliest
                                 Python functions for the fused path

Usage: python benchmarks/profile_host.py --out DIR       (writes profile-host-<device>.json/.md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostprof import cuda_sync, gpu_timeline, python_hot_spots  # noqa: E402

from lowvram_dopsd.lora import DualLoRA  # noqa: E402
from lowvram_dopsd.quant import quantize_frozen  # noqa: E402

SHAPES = [("attn 3840->3840", 3840, 3840), ("ffn w1 3840->10240", 3840, 10240), ("ffn w2 10240->3840", 10240, 3840)]
TINY = [("tiny 96->160", 96, 160)]
PATHS = ("fused", "fused-act8", "quanto", "bf16")


class _One(nn.Module):
    def __init__(self, k: int, n: int, device, dtype):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=True, device=device, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


def build(path: str, k: int, n: int, device, dtype) -> tuple[nn.Module, DualLoRA]:
    torch.manual_seed(0)
    m = _One(k, n, device, dtype)
    if path != "bf16":
        quantize_frozen(m, "qint8")
    lora = DualLoRA.attach(m, ["lin"], 64, 128.0, seed=0)
    with torch.no_grad():  # a trained-looking B (B = 0 at init would still run every launch)
        for layer in lora.layers.values():
            layer.student_B.normal_(std=1e-3)
    if path.startswith("fused"):
        lora.enable_fused_kernels("int8" if path == "fused-act8" else "off")
    return m, lora


def host_ms(fn, sync, n: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) * 1e3 / n


def graph_ms(fn) -> float | str:
    try:
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception as e:  # noqa: BLE001
        return f"n/a ({type(e).__name__})"


def run(shapes, tokens: int, device, reps: int) -> list[dict]:
    dtype = torch.bfloat16
    sync = cuda_sync(device)
    rows = []
    for name, k, n in shapes:
        x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, n, device=device, dtype=dtype)
        for path in PATHS:
            m, lora = build(path, k, n, device, dtype)

            def fwd():
                with torch.no_grad(), lora.use("teacher"):
                    m(x)

            def fwd_bwd():
                with lora.use("student"):
                    m(x).backward(dy)

            for _ in range(3):  # compile / autotune, allocator
                fwd()
                fwd_bwd()
            row = {"shape": name, "K": k, "N": n, "M": tokens, "path": path,
                   "host_fwd_ms": host_ms(fwd, sync, reps), "host_fwd_bwd_ms": host_ms(fwd_bwd, sync, reps)}
            if device.type == "cuda":
                row["gpu_fwd_bwd_ms"] = graph_ms(fwd_bwd)
            tl = gpu_timeline(lambda: [fwd_bwd() for _ in range(5)], sync)
            row["per_fwd_bwd_calls"] = {c: v["n"] / 5 for c, v in tl["calls"].items()}
            row["gpu_events_per_fwd_bwd"] = tl["gpu_events"] / 5
            if path.startswith("fused") and name == shapes[0][0]:
                row["python"] = python_hot_spots(lambda: [fwd_bwd() for _ in range(reps)], sync, top=30)
                row["python"]["reps"] = reps
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "python"}), flush=True)
            del m, lora
    return rows


def report(rows: list[dict], meta: dict) -> str:
    L = [f"# Host time per LoRA'd linear: {meta['device']}", "",
         f"- date: {meta['date']}; torch {meta['torch']}, triton {meta['triton']}",
         f"- command: `{meta['command']}`", f"- M = {rows[0]['M']} tokens, rank 64, fp32 student LoRA (as trained)", "",
         "| shape | path | host fwd ms | host fwd+bwd ms | GPU fwd+bwd ms (graph) | launches per fwd+bwd |",
         "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        g = r.get("gpu_fwd_bwd_ms")
        g = f"{g:.3f}" if isinstance(g, float) else (g or "-")
        launches = sum(v for c, v in r["per_fwd_bwd_calls"].items() if "Launch" in c)
        L.append(f"| {r['shape']} | {r['path']} | {r['host_fwd_ms']:.3f} | {r['host_fwd_bwd_ms']:.3f} | {g} | "
                 f"{launches:.0f} |")
    for r in rows:
        if "python" in r:
            p = r["python"]
            L += ["", f"## cProfile, {r['path']} on {r['shape']}: {p['reps']} fwd+bwd in {p['wall_s'] * 1e3:.1f} ms "
                  f"(profiled; own time summed {p['total_own_ms']:.1f} ms)", "",
                  "| function | calls per fwd+bwd | own µs per fwd+bwd |", "| --- | ---: | ---: |"]
            for t in p["top"]:
                L.append(f"| `{t['fn']}` | {t['calls'] / p['reps']:.1f} | {t['own_ms'] * 1e3 / p['reps']:.1f} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test at a tiny shape (no timing worth reading)")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    if args.tiny:
        device, shapes, tokens, reps = torch.device("cpu"), TINY, 40, 2
    elif torch.cuda.is_available():
        device, shapes, tokens, reps = torch.device("cuda"), SHAPES, 4096 + 512, args.reps
    else:
        sys.exit("profile_host.py needs a CUDA GPU (or --tiny for its CPU smoke test)")
    import triton

    rows = run(shapes, tokens, device, reps)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu-tiny",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:]))}
    os.makedirs(args.out, exist_ok=True)
    slug = meta["device"].lower().replace(" ", "-")
    with open(os.path.join(args.out, f"profile-host-{slug}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, f"profile-host-{slug}.md"), "w") as f:
        f.write(report(rows, meta))
    print(report(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
