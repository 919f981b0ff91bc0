"""Time of summing the LoRA gradients over the processes of a job, at the true LoRA size of the real models.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_allreduce.py --device cpu --out benchmarks/results
    torchrun --standalone --nproc-per-node 1 benchmarks/bench_allreduce.py --out /tmp/r       # one GPU
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_allreduce.py --tiny --out /tmp/r  # smoke test

Once per optimizer step every rank's student-LoRA gradient is summed over the job
(`distributed.World.sum_grads`, docs/multi-gpu.md). Three ways of doing it, on the same fp32 tensors
(the LoRA'd linears' shapes from the published config, as bench_ema.py builds them):

  buckets      ours: consecutive gradients flattened into 32 MB buckets, one all-reduce per bucket
  per tensor   one all-reduce per gradient tensor (two per LoRA'd linear)
  one flat     everything flattened into one buffer, one all-reduce (a copy of the whole gradient)

With one process the collective moves nothing: what is timed is what the trainer adds to a step on one
GPU under torchrun (the flattening copies and the collective's launch), against the step it belongs to
(four roll-outs at the H100's measured time, the family's rollout_s_h100). With several GPUs it is the sum
itself; no machine with several GPUs has run it yet.

Results: <out>/allreduce-<device>-<N>proc.md and .json (device, versions, command), written by rank 0.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_ema import MODELS, lora_shapes, timed  # noqa: E402  (timed: median ms; the collectives keep ranks in step)
from lowvram_dopsd import distributed  # noqa: E402
from lowvram_dopsd.plan import resolve_model  # noqa: E402


def grads(shapes, rank: int, device: torch.device) -> list[torch.Tensor]:
    """The student LoRA's gradients: A [rank, in] and B [out, rank] of every LoRA'd linear, fp32."""
    return [t for _, i, o in shapes for t in (torch.randn(rank, i, device=device), torch.randn(o, rank, device=device))]


def per_tensor(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        dist.all_reduce(t)


def one_flat(tensors: list[torch.Tensor]) -> None:
    distributed.sum_in_buckets(tensors, bucket_bytes=2**62)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="zimage,klein")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="smoke test: 8 layers of each model, rank 4")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    with distributed.launched() as world:
        if not dist.is_initialized():
            raise SystemExit("run it under torchrun (see the docstring)")
        device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        rows = []
        for model in a.models.split(","):
            shapes, rank = lora_shapes(model), a.rank
            if a.tiny:
                shapes, rank = shapes[:8], 4
            tensors = grads(shapes, rank, device)
            mb = sum(t.nbytes for t in tensors) / 1e6
            step_ms = 4 * resolve_model(MODELS.get(model, model)).family.rollout_s_h100 * 1e3
            for what, fn in (("buckets (ours)", lambda: distributed.sum_in_buckets(tensors)),
                             ("per tensor", lambda: per_tensor(tensors)), ("one flat", lambda: one_flat(tensors))):
                ms = timed(fn, device, a.repeat)
                rows.append({"model": model, "what": what, "tensors": len(tensors), "MB": round(mb, 1),
                             "ms": round(ms, 2), "GB_per_s": round(mb / ms, 2),
                             "of_h100_step_pct": None if a.tiny else round(100 * ms / step_ms, 3)})
                if world.main:
                    print(f"{model:7s} {what:15s} {mb:8.1f} MB {ms:9.2f} ms", flush=True)
        if world.main:
            write(a, argv, rows, device, world.size)
    return 0


def write(a, argv, rows: list[dict], device: torch.device, size: int) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    slug = f"{name.lower().replace(' ', '-')}-{size}proc" + ("-tiny" if a.tiny else "")
    meta = {"device": name, "processes": size, "backend": dist.get_backend(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "rank": 4 if a.tiny else a.rank,
            "command": "torchrun ... benchmarks/bench_allreduce.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"allreduce-{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Summing the LoRA gradients over {size} process{'es' * (size > 1)}: {name}", "",
             ", ".join(f"{k} {v}" for k, v in meta.items()), "",
             "| model | how | tensors | MB | ms | GB/s | % of an H100 step (4 roll-outs) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['what']} | {r['tensors']} | {r['MB']} | {r['ms']} | {r['GB_per_s']} | "
              f"{r['of_h100_step_pct']} |" for r in rows]
    (out / f"allreduce-{slug}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
