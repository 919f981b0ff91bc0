"""Time of the EMA teacher's update, at the true LoRA size of the real models.

    python benchmarks/bench_ema.py --out benchmarks/results                 # this machine's device
    python benchmarks/bench_ema.py --tiny --out /tmp/r                      # smoke test (tests/)

After every optimizer step `DualLoRA.ema_update` moves the teacher LoRA toward the student:
teacher <- decay * teacher + (1 - decay) * student, over every A and B (their counts per model are
in the report, benchmarks/results/ema-*.md). Two layouts are timed, as `train.train` builds them:

  device  teacher_ema_on = "device" (16gb / 24gb presets): the fp32 EMA state is the layers' own
          buffers, updated where they live.
  cpu     teacher_ema_on = "cpu" (12gb preset): the fp32 state is in host RAM (pinned on a GPU
          machine); each update brings the student down, updates on the CPU and copies the new
          state up into the layers' compute-dtype copies. On a GPU this is the per-step cost the
          12gb preset pays for its 0.30 GiB.

and, for the record, the update as it was before 329666e (`_foreach_mul_` then `_foreach_add_`)
next to the current one (`_foreach_lerp_`), on the same tensors. The LoRA'd linears and their
shapes come from the published config, picked by `lora.is_target` as `DualLoRA.attach` does; the frozen
base weights are not built (the update never reads them).

Results: <out>/ema-<device>.md and .json (device, versions, command).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowvram_dopsd.lora import DualLoRA, DualLoRALinear, _Switch  # noqa: E402

MODELS = {"zimage": "Tongyi-MAI/Z-Image-Turbo", "klein": "black-forest-labs/FLUX.2-klein-4B"}


class _ShapeOnly(nn.Module):
    """A frozen linear's shape and device, without its weight: all the EMA update needs."""

    def __init__(self, in_features: int, out_features: int, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)


def lora_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear the trainer puts a LoRA on, from the model's published config."""
    from lowvram_dopsd.lora import is_target
    from lowvram_dopsd.plan import build_meta, resolve_model

    mc = resolve_model(MODELS.get(model, model))
    meta = build_meta(mc.family, mc.transformer)
    return [(n, m.in_features, m.out_features) for n, m in meta.named_modules()
            if is_target(n, m, mc.family.lora_targets)]


def build(shapes, rank: int, device: torch.device) -> DualLoRA:
    switch = _Switch()
    layers = {n: DualLoRALinear(_ShapeOnly(i, o, device), rank, 2.0 * rank, switch) for n, i, o in shapes}
    lora = DualLoRA(nn.Module(), layers, switch)
    with torch.no_grad():
        for p in lora.student_parameters():
            p.normal_()
    return lora


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median ms of `fn` over `repeat` calls after one warm-up, the device synchronised around each."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def mul_add(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float) -> None:
    """The update before 329666e, for the comparison: two passes over the teacher."""
    torch._foreach_mul_(teacher, decay)
    torch._foreach_add_(teacher, student, alpha=1.0 - decay)


def run(model: str, shapes, rank: int, device: torch.device, repeat: int, decay: float = 0.9999) -> list[dict]:
    n = sum(rank * (i + o) for _, i, o in shapes)
    rows = []
    for layout in ("device", "cpu"):
        lora = build(shapes, rank, device)
        if layout == "cpu":
            lora.keep_teacher_ema_on_cpu(torch.bfloat16)
        # the whole update, then the two formulas on the state alone (host for "cpu", the device for
        # "device"): what the change saved
        state = lora.teacher_master if layout == "cpu" else lora._teacher_buffers()
        student = [p.detach().to(state[0].device) for p in lora.student_parameters()]
        for what, fn in (("ema_update (lerp)", lambda: lora.ema_update(decay)),
                         ("state update, mul_ + add_ (before)", lambda: mul_add(state, student, decay)),
                         ("state update, lerp_ (now)", lambda: torch._foreach_lerp_(state, student, 1 - decay))):
            rows.append({"model": model, "layout": layout, "what": what, "tensors": 2 * len(shapes),
                         "elements_M": round(n / 1e6, 2), "ms": round(timed(fn, device, repeat), 2)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="zimage,klein")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--tiny", action="store_true", help="smoke test: 4 layers of each model, rank 4")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for model in a.models.split(","):
        shapes = lora_shapes(model)
        rank = a.rank
        if a.tiny:
            shapes, rank = shapes[:4], 4
        rows += run(model, shapes, rank, device, a.repeat)
        for r in rows[-6:]:
            print(f"{r['model']:7s} {r['layout']:6s} {r['what']:38s} {r['ms']:9.2f} ms", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    slug = name.lower().replace(" ", "-") + ("-tiny" if a.tiny else "")
    meta = {"device": name, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "rank": a.rank if not a.tiny else 4,
            "command": "python benchmarks/bench_ema.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ema-{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# EMA teacher update ({name})", "",
             f"Command: `{meta['command']}`  ", f"torch {meta['torch']}, {meta['cpu_threads']} CPU thread(s), "
             f"LoRA rank {meta['rank']}; median of {a.repeat} after one warm-up.", "",
             "| model | layout | what | tensors | elements (M) | ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['layout']} | {r['what']} | {r['tensors']} | {r['elements_M']} | {r['ms']} |"
              for r in rows]
    (out / f"ema-{slug}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
