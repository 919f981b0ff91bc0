"""A full fine-tune's per-GPU memory, term by term, at world size 1, beside the planner's (docs/full.md,
"Checking the planner on one GPU").

    python benchmarks/bench_full.py --out DIR                         # on a GPU: Z-Image, the full-1x80gb preset
    python benchmarks/bench_full.py --runs klein-1x80gb,zimage-8l-adamw --out DIR
    python benchmarks/bench_full.py --tiny --device cpu --out DIR     # the plumbing, on the CPU, tiny models

Each config writes a model folder with the published configs and random bf16 weights (bench_memory.py's;
no download; `-8l`: Z-Image with 8 of its 30 main blocks, so that fp32 AdamW's state fits one card), then
runs train_mode = "full" as train.py does, in a process group of one: the student sharded as it loads,
the EMA teacher, the optimizer, one trained roll-out state (teacher pass, student pass and its backward),
the optimizer step and the EMA update. It records the GPU memory allocated after each piece, and the peak
of the step. At world size 1 every term the planner divides by N is whole, and the others (gathered
blocks, a block's gradients, activations) are what they are on N GPUs: each row of plan_full at N = 1 is
measured here. On the CPU there is no allocator to ask: the static terms are the bytes of the tensors
themselves, and the peak is not measured.

Writes <out>/full-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GiB = 2**30
# name -> (family, preset, settings over the preset, main blocks kept (0: all))
CONFIGS = {
    "zimage-1x80gb": ("zimage", "full-1x80gb", {}, 0),
    "klein-1x80gb": ("klein", "full-1x80gb", {}, 0),
    "zimage-8l-adamw": ("zimage", "full-4x80gb", {}, 8),  # AdamW fp32 and an fp32 EMA teacher on the GPU
    "zimage-8l-bf16ema": ("zimage", "full-4x80gb", {"ema_dtype": "bf16"}, 8),
}


def allocated(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return float("nan")


def tensor_bytes(tensors) -> int:
    """Bytes of these tensors' local data (DTensor shards: this rank's), each storage once."""
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage().data_ptr(), local.device)
        if key not in seen:
            seen.add(key)
            total += local.untyped_storage().nbytes()
    return total


def measure(name: str, args) -> dict:
    import torch
    import torch.distributed as dist

    from bench_memory import family_of, write_model_folder, write_random_checkpoint
    from lowvram_dopsd import full, optim, plan, plan_full
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.families import load_family
    from lowvram_dopsd.runtime import DTYPES
    from lowvram_dopsd.train import rollout_and_learn

    family_name, preset, over, layers = CONFIGS[name]
    nan = float("nan")
    device = torch.device(args.device)
    folder = Path(args.work) / (f"{family_name}-{layers}l" if layers else family_name)
    mesh = full.device_mesh(device)
    # one rank writes the model folder while the others wait: two writing it at once read half-written files
    if mesh.get_rank() == 0 and not list((folder / "transformer").glob("*.safetensors")):
        write_model_folder(family_name, family_of(family_name).hf_repo_ids[0], folder, args.tiny)
        if layers and not args.tiny:
            cfg_path = folder / "transformer" / "config.json"
            config = json.loads(cfg_path.read_text())
            config["n_layers" if "n_layers" in config else "num_single_layers"] = layers
            cfg_path.write_text(json.dumps(config))
        write_random_checkpoint(folder, str(device))
    if mesh.size() > 1:
        dist.barrier()
    settings = {"model": str(folder), "device": args.device, "train_mode": "full", **over}
    if args.tiny:
        settings.update(resolution=64, max_sequence_length=32, teacher_max_sequence_length=64)
        if device.type == "cpu" and settings.get("teacher_ema_on") is None:
            settings["teacher_ema_on"] = "device"
    cfg = load_config(preset, settings)
    family = load_family(str(folder), check_files=False)
    res: dict = {"config": name, "preset": preset, "device": str(device), "settings": settings}
    mem: dict[str, float] = {"start": allocated(device)}
    student = full.load_sharded(family, cfg, device, mesh, torch.float32, trains=True)
    mem["student"] = allocated(device)
    teacher = full.load_sharded(family, cfg, device, mesh, DTYPES[cfg.ema_dtype], trains=False)
    mem["teacher"] = allocated(device)
    weights = full.FullWeights(student, teacher, DTYPES[cfg.dtype], cfg.seed)
    optimizer = full.make_optimizer(weights, cfg, 3e-5)
    scheduler = optim.make_scheduler(optimizer, cfg)
    torch.manual_seed(0)
    c_s, c_t = family.random_conditions(family.teachers[0], cfg, device, DTYPES[cfg.dtype])
    steps = cfg.rollout_steps or family.default_rollout_steps
    sigmas = family.sigmas(cfg.resolution, cfg.resolution, steps)
    x = torch.randn((1, *family.latent_shape(cfg.resolution, cfg.resolution))).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses, _ = rollout_and_learn(family, weights.model, weights, x, sigmas[:2], [c_s], [c_t], {0}, cfg.loss, 1.0)
    mem["after backward"] = allocated(device)
    mem["peak of the trained state"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else nan
    updated, grad_norm = optim.optimizer_step(weights.student_parameters(), optimizer, scheduler, cfg.max_grad_norm,
                                              sum(losses))
    weights.ema_update(cfg.ema_decay)
    mem["after the optimizer step"] = allocated(device)
    mem["peak of the step"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else nan
    res["seconds"] = time.perf_counter() - t0
    res["loss_finite"] = all(map(lambda v: v == v, losses)) and updated
    weights.sharded()
    res["bytes"] = {"student": tensor_bytes(student.parameters()), "teacher": tensor_bytes(teacher.parameters()),
                    "optimizer": tensor_bytes(t for s in optimizer.state.values() for t in s.values()
                                              if isinstance(t, torch.Tensor))}
    res["allocated"] = mem
    fp = plan_full.make(cfg, mesh.size(), None, plan.resolve_model(str(folder)))  # this job's GPUs: 1 on a GPU
    res["planned"] = {r.what: r.bytes for r in fp.rows}
    res["planned_peak"] = fp.peak_gib * GiB
    res["params"], res["world_size"] = fp.params, mesh.size()
    return res


def report(results: list[dict]) -> str:
    lines = ["# Full fine-tuning: each term measured at world size 1, beside the planner's (N = 1)", "",
             "Written by benchmarks/bench_full.py. GiB; `allocated` = torch.cuda.memory_allocated deltas, "
             "`tensors` = the bytes of the tensors themselves.", ""]
    for r in results:
        if "error" in r:
            lines += [f"## {r['config']}: error", "", "    " + r["error"], ""]
            continue
        m, b, p = r["allocated"], r["bytes"], r["planned"]
        gib = lambda v: f"{v / GiB:.3f}"  # noqa: E731
        rows = [("student weights (fp32)", m["student"] - m["start"], b["student"], p["student weights (fp32 master)"]),
                ("EMA teacher", m["teacher"] - m["student"], b["teacher"],
                 next(v for k, v in p.items() if k.startswith("EMA teacher"))),
                ("gradients (after the backward)", m["after backward"] - m["teacher"], float("nan"),
                 p["student gradients (fp32)"]),
                ("optimizer state (after its step)", m["after the optimizer step"] - m["teacher"], b["optimizer"],
                 p["optimizer state"]),
                ("peak of the step", m["peak of the step"], float("nan"), r["planned_peak"])]
        lines += [f"## {r['config']} ({r['params'] / 1e9:.3f}B params, {r['device']}, preset {r['preset']})", "",
                  "| term | allocated | tensors | planned |", "|---|---|---|---|"]
        lines += [f"| {what} | {gib(a)} | {gib(t)} | {gib(pl)} |" for what, a, t, pl in rows]
        lines += ["", f"step {r['seconds']:.1f} s, losses finite: {r['loss_finite']}", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/lowvram-dopsd-bench-full")
    ap.add_argument("--runs", default="zimage-1x80gb", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke test of this script)")
    args = ap.parse_args()
    if args.tiny:
        args.work += "-tiny"
    results = []
    for name in args.runs.split(","):
        try:  # each config in its own group of one; a failure is reported, the next still runs
            results.append(measure(name, args))
        except Exception as exc:
            import traceback
            traceback.print_exc()
            results.append({"config": name, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"full-{args.device}" + ("-tiny" if args.tiny else "")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{stem}.md").write_text(report(results))
    print(report(results))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
