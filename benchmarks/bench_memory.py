"""Measured proof of the memory plan: real architectures at true size, random weights, real training steps.

    python benchmarks/bench_memory.py --out benchmarks/results            # on a CUDA GPU
    python benchmarks/bench_memory.py --out /tmp/r --tiny --device cpu    # the same code on a tiny model
    python benchmarks/bench_memory.py --trees before=/tmp/ab/ea7bf9f,after=. --rounds 2 --steps 2 \
        --configs zimage-16gb-fused                                        # two versions of the code, one machine

Each configuration runs in a fresh process (--tiny: in this one, a CPU smoke test with no GPU memory to
keep apart). With --trees, each configuration runs once per tree and round, alternating (A B, then B A,
...), each in a fresh process that imports that tree's code (its own benchmarks/bench_memory.py, which
puts its root first on sys.path; `benchmarks/tree_at.sh REV DIR` unpacks a commit there): a before/after
on one machine, where step times otherwise move with the host CPU from machine to machine. The report
ends with the step times side by side.

For each configuration it
  1. writes a model folder with the PUBLISHED configs (lowvram_dopsd/published/: model_index.json,
     transformer/, scheduler/, vae/) and, once, a random bf16 checkpoint of the full transformer
     (built on the GPU, never on the CPU; no download);
  2. in a fresh process, loads it through the trainer's own family adapter
     (`families.load_family(folder).load_transformer`: meta model, filled and quantized block by
     block), recording load time, peak GPU memory and peak host RSS;
  3. attaches `DualLoRA` (rank 64, alpha 128, the family's targets), routes the 8-bit linears and
     places the EMA teacher as `train.train` does, builds the preset's optimizer and runs REAL
     training steps with `train.rollout_and_learn` and the family's own schedule and velocity (the
     model's own roll-out steps, every state trained, batch 1, random conditions of the real
     shapes: Z-Image caption features [512, 2560] for the student, [1024, 2560] for the VLM
     teacher; klein [512, 7680] for both, plus the edit teacher's reference-image tokens and
     position ids as the pipeline builds them for `image=`), then clips, steps the optimizer and
     updates the EMA teacher with `optim.optimizer_step` and `lora.ema_update`, as `train.train_step` does;
  4. records `torch.cuda.max_memory_allocated` over the second (steady-state) step, its time, the
     phase probes (one teacher pass without grad, one student forward+backward) and the planner's
     prediction for the same settings, side by side.
klein's scheduler config is not among the published files kept here; its folder gets the tiny
klein's (`tiny.KLEIN_SCHEDULER`: dynamic shifting, as the pipeline needs), which sets the sigma
values only, not memory or time.

Results: <out>/memory-<device>.md and .json (device, versions, command).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30

# name -> settings. `preset` is read from presets/<preset>.toml; the rest overrides it.
CONFIGS = {
    "zimage-16gb": dict(family="zimage", preset="16gb", target_gib=14.0),
    "zimage-24gb": dict(family="zimage", preset="24gb", target_gib=22.0),
    "zimage-12gb": dict(family="zimage", preset="12gb", target_gib=10.5),
    "zimage-12gb-768": dict(family="zimage", preset="12gb", resolution=768, target_gib=10.5),
    "zimage-16gb-bnb": dict(family="zimage", preset="16gb", quant="bnb-int8", target_gib=14.0),
    # the 8-bit LoRA linear forced onto the fused Triton kernel ("on"; what "auto" does on CUDA), or
    # left to quanto's dequantise + matmul ("off": plain torch everywhere, the D-OPSD loss too)
    "zimage-16gb-fused": dict(family="zimage", preset="16gb", kernels="on", target_gib=14.0),
    "zimage-16gb-quanto": dict(family="zimage", preset="16gb", kernels="off", target_gib=14.0),
    "klein-16gb-edit": dict(family="klein", preset="16gb", target_gib=12.0),
    "klein-16gb-edit-fused": dict(family="klein", preset="16gb", kernels="on", target_gib=12.0),
    "klein-16gb-edit-quanto": dict(family="klein", preset="16gb", kernels="off", target_gib=12.0),
    # the base GEMMs on per-token int8 activations (act_quant = "int8"; not measured yet)
    "zimage-16gb-act8": dict(family="zimage", preset="16gb", act_quant="int8", target_gib=14.0),
    "klein-16gb-edit-act8": dict(family="klein", preset="16gb", act_quant="int8", target_gib=12.0),
    # prior_prompts: each step also rolls out a prior micro-batch toward the bare base (train.py); one
    # roll-out's activations are alive at a time, so the peak should not move (not measured yet)
    "zimage-16gb-prior": dict(family="zimage", preset="16gb", prior=True, target_gib=14.0),
    # train_states = k: learn at k of the roll-out's states, the others one forward pass without grad; the
    # README's "How long will it take?" expects ~0.45 of the step time for 2 of Z-Image's 8 (not measured yet)
    "zimage-16gb-ts2": dict(family="zimage", preset="16gb", train_states=2, target_gib=14.0),
    "klein-16gb-edit-ts1": dict(family="klein", preset="16gb", train_states=1, target_gib=12.0),
    # the baseline (d) as a whole step: the 16gb settings on an unquantized bf16 base (12 GB)
    "zimage-16gb-bf16": dict(family="zimage", preset="16gb", quant="none", target_gib=22.0),
    # the speed levers of issue #34, each against the fused default on one machine (gpu_next.sh 13, 14; not
    # measured yet): regional compilation, selective checkpointing within the preset's budget, SDPA forced to
    # cuDNN (on the CPU, --tiny, its stand-in is the math kernel) or to flash attention
    **{f"{name}-{lever}": dict(family=family, preset="16gb", kernels="on", target_gib=target, **setting)
       for name, family, target in (("zimage-16gb", "zimage", 14.0), ("klein-16gb-edit", "klein", 12.0))
       for lever, setting in (("compile", {"torch_compile": "blocks"}), ("keep", {"keep_blocks": "auto"}),
                              ("cudnn", {"attention_backend": "_native_cudnn"}),
                              ("flash", {"attention_backend": "_native_flash"}))},
    # --transformer-file: the same random weights as one ORIGINAL-layout file (fused qkv, ComfyUI keys),
    # written once by `write_single_file`; load time and host RSS of the row-slicing single-file loader
    "zimage-16gb-file": dict(family="zimage", preset="16gb", single_file=True, target_gib=14.0),
    # FLUX.2-klein 9B (`model`: a public id other than the family's first) and FLUX.3 Image Klein, each
    # at its planned presets (not measured yet): the 9B fits 16gb by the plan, not 12gb; FLUX.3 fits all
    # three. flux3-16gb-edit-all trains every one of its 16 states (its default trains 4): the time ratio
    "klein9b-16gb-edit": dict(family="klein", model="black-forest-labs/FLUX.2-klein-9B", preset="16gb",
                              target_gib=14.0),
    "klein9b-16gb-edit-fused": dict(family="klein", model="black-forest-labs/FLUX.2-klein-9B", preset="16gb",
                                    kernels="on", target_gib=14.0),
    "flux3-12gb-edit": dict(family="flux3", preset="12gb", target_gib=10.5),
    "flux3-16gb-edit": dict(family="flux3", preset="16gb", target_gib=14.0),
    "flux3-16gb-vlm": dict(family="flux3", preset="16gb", teacher="vlm", target_gib=14.0),
    "flux3-24gb-edit": dict(family="flux3", preset="24gb", target_gib=22.0),
    "flux3-16gb-edit-all": dict(family="flux3", preset="16gb", train_states=16, target_gib=14.0),
}
# Per family (a config's `family`): the transformer config of --tiny, and the report's name for the model
TINY = {
    "zimage": {"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
               "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 64, "dim": 256,
               "in_channels": 16, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 1,
               "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0},
    "klein": {"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32],
              "eps": 1e-06, "guidance_embeds": False, "in_channels": 128, "joint_attention_dim": 64,
              "mlp_ratio": 3.0, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1,
              "out_channels": None, "patch_size": 1, "rope_theta": 2000, "timestep_guidance_channels": 256},
    "flux3": {"_class_name": "Flux3Transformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32],
              "cond_in_channels": 128, "eps": 1e-06, "flow_map": True, "in_channels": 128, "joint_attention_dim": 64,
              "mlp_ratio": 3.0, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1,
              "rope_theta": 10000, "timestep_channels": 256},
}
# The report's name for each model (its public id)
MODEL_LABELS = {"Tongyi-MAI/Z-Image-Turbo": "Z-Image-Turbo 6B",
                "black-forest-labs/FLUX.2-klein-4B": "FLUX.2-klein 4B (edit teacher)",
                "black-forest-labs/FLUX.2-klein-9B": "FLUX.2-klein 9B (edit teacher)",
                "black-forest-labs/flux-3-image-klein": "FLUX.3 Image Klein 5.5B"}


def family_of(name: str):
    """The family adapter class a config names."""
    from lowvram_dopsd.families import family_named

    family = family_named(name)
    if family is None:
        raise SystemExit(f"bench_memory: no model family is named {name!r}")
    return family


def model_of(spec: dict) -> str:
    """The public id a config trains: its `model`, else its family's first."""
    return spec.get("model") or family_of(spec["family"]).hf_repo_ids[0]


def published(model_id: str) -> Path:
    """The published configs of a public id (lowvram_dopsd/published/)."""
    from lowvram_dopsd.families import published_dir

    return published_dir(model_id)


def model_folder(work: Path, spec: dict) -> Path:
    """Where a config's model folder is written: named after the family for its first id (as always),
    after the id for another one."""
    model = model_of(spec)
    return work / (spec["family"] if model == family_of(spec["family"]).hf_repo_ids[0] else slug(model))


def host_rss() -> dict[str, float]:
    """Current and peak resident set size of this process, GiB (Linux /proc)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024 / GiB
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------
def write_model_folder(family: str, model_id: str, folder: Path, tiny: bool) -> None:
    """A pipeline folder the family loads: its published configs, empty encoder folders. klein's configs
    have no VAE config (the family's default, 8x, is klein's) and no scheduler: the tiny klein's, with
    the dynamic shifting its pipeline needs."""
    from lowvram_dopsd.tiny import KLEIN_SCHEDULER

    if (scheduler := {"klein": KLEIN_SCHEDULER}.get(family)) is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler  # a slow import: only where it is needed

        FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(folder / "scheduler")
    src = published(model_id)
    for path in sorted(src.rglob("*.json")):
        rel = path.relative_to(src)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(path.read_text())
    if tiny:
        (folder / "transformer/config.json").write_text(json.dumps(TINY[family]))
    for empty in ("text_encoder", "tokenizer", "vae"):  # the family checks the folders exist; never loaded here
        (folder / empty).mkdir(exist_ok=True)
        (folder / empty / "README").write_text("benchmark folder: features are random, encoders are not loaded\n")


def write_random_checkpoint(folder: Path, device: str) -> dict:
    """Random bf16 weights of the full transformer, built directly on `device` (no CPU copy of the model)."""
    import diffusers
    import torch

    t0 = time.perf_counter()
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():  # keep activations finite through 30 blocks: small weights, as trained models have
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / "transformer", max_shard_size="5GB", safe_serialization=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in (folder / "transformer").glob("*.safetensors"))
    return {"params": n, "bytes": size, "seconds": time.perf_counter() - t0}


def single_file_path(work: Path, family: str) -> Path:
    return work / f"{family}-original-layout.safetensors"


def write_single_file(work: Path, family: str) -> dict:
    """The random checkpoint as one original-layout file, as fine-tunes are published, converted by the
    inverse of diffusers' converter that tests/test_single_file.py checks against `from_single_file`."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from test_single_file import _state, to_original_zimage

    to_original = {"zimage": to_original_zimage}.get(family)  # the test's converters: Z-Image only
    if to_original is None:
        raise ValueError(f"no single-file converter for the {family} family")
    t0 = time.perf_counter()
    out = to_original(_state(model_folder(work, {"family": family})))
    path = single_file_path(work, family)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    del out
    return {"file": str(path), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# One configuration, in its own process
# ---------------------------------------------------------------------------------------------
def run_child(name: str, args) -> dict:
    import torch

    from lowvram_dopsd import accel
    from lowvram_dopsd import plan as planner
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.families import load_family
    from lowvram_dopsd.lora import DualLoRA
    from lowvram_dopsd.optim import make_optimizer, optimizer_step
    from lowvram_dopsd import preflight
    from lowvram_dopsd.train import rollout_and_learn, route_fused_linears

    spec = dict(CONFIGS[name])
    folder = model_folder(Path(args.work), spec)
    model_id = model_of(spec)
    spec.pop("model", None)
    family_name = spec.pop("family")
    target = spec.pop("target_gib")
    preset = spec.pop("preset")
    prior = spec.pop("prior", False)
    single = single_file_path(Path(args.work), family_name) if spec.pop("single_file", False) else None
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    overrides = {"device": args.device, "batch_size": 1, "micro_batch": 1, **spec}
    if args.tiny:
        overrides.update(resolution=64, max_sequence_length=32, teacher_max_sequence_length=64, rank=4, alpha=8.0)
        if not cuda:
            overrides.update(optimizer="adamw", dtype="bf16")
            # CUDA only: the Triton kernels (interpreted they take minutes; their reference is checked in
            # tests/kernels) and cuDNN's attention (its stand-in: the math kernel)
            if overrides.get("kernels") == "on":
                overrides["kernels"] = "off"
            if overrides.get("attention_backend") == "_native_cudnn":
                overrides["attention_backend"] = "_native_math"
    overrides["model"] = str(folder)
    cfg = load_config(str(ROOT / "presets" / f"{preset}.toml"), overrides)
    dtype = torch.bfloat16
    import lowvram_dopsd.kernels.lora_linear as ll

    res = {"config": name, "family": family_name, "model": model_id, "preset": preset, "target_gib": target,
           "code": str(Path(ll.__file__).resolve().parents[1]),  # the tree whose code ran (see --trees)
           "transformer_file": str(single) if single else None,
           "settings": {k: getattr(cfg, k) for k in ("resolution", "rank", "alpha", "quant", "optimizer",
                                                      "grad_checkpointing", "train_states", "max_sequence_length",
                                                      "teacher_max_sequence_length", "keep_blocks")}}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = host_rss()
    t0 = time.perf_counter()
    # encoders and VAE are configs only; a single-file config reads its transformer from that file
    family = load_family(str(folder), check_files=False, transformer_file=str(single) if single else "")
    model = family.load_transformer(cfg, device, dtype)  # the trainer's own loading path
    targets = tuple(cfg.lora_targets) or family.lora_targets
    steps = cfg.rollout_steps or family.default_rollout_steps
    teacher = cfg.teacher or family.teachers[0]  # the config's, else the family's default (Z-Image vlm, klein edit)
    torch.manual_seed(0)  # the same random conditions in every config's process: their losses compare
    student_cond, teacher_cond = family.random_conditions(teacher, cfg, device, dtype)
    c_s, c_t = [student_cond], [teacher_cond]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    rss1 = host_rss()
    res["load"] = {"seconds": time.perf_counter() - t0,
                   "gpu_peak_gib": torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
                   "gpu_after_gib": torch.cuda.memory_allocated(device) / GiB if cuda else None,
                   "host_rss_before_gib": rss0.get("VmRSS"), "host_peak_rss_gib": rss1.get("VmHWM"),
                   "host_rss_after_gib": rss1.get("VmRSS"), "host_anon_after_gib": rss1.get("RssAnon")}

    lora = DualLoRA.attach(model, targets, cfg.rank, cfg.alpha, seed=cfg.seed)
    res["fused_layers"] = route_fused_linears(lora, cfg, device)  # as train.py
    if cfg.teacher_ema_on == "cpu":  # as train.py (the 12gb preset)
        lora.keep_teacher_ema_on_cpu(dtype)
    res["teacher_ema_on"] = cfg.teacher_ema_on
    res["prior"] = prior
    params = lora.student_parameters()
    optimizer = make_optimizer(params, cfg, cfg.resolved_lr(1e-5))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sigmas = family.sigmas(cfg.resolution, cfg.resolution, steps)
    gen = torch.Generator("cpu").manual_seed(0)
    x0 = torch.randn((1, *family.latent_shape(cfg.resolution, cfg.resolution)), generator=gen).to(device)
    # the speed settings as train.py applies them (accel.speed_up), on this config's own inputs; on the CPU the
    # compiled graphs run eagerly (inductor's CPU code generation takes minutes)
    backend = accel.COMPILE_BACKEND if cuda else "eager"
    graphs = accel.compiled_graphs()
    probe = (x0, sigmas[0].to(device), c_s, c_t, sigmas[1].to(device))
    res["levers"] = accel.apply(cfg, family, model, lora, probe, accel.kept_blocks(cfg, preset, device), backend)
    # which k states does not change the cost (each trained state is one teacher pass + student forward and
    # backward); train.py draws them at random, here they are the first k, so every step costs the same
    trained = set(range(preflight.check_method(cfg, family)[2]))  # train_states, else the family's default

    def step() -> list[float]:
        losses, _ = rollout_and_learn(family, model, lora, x0.clone(), sigmas, c_s, c_t, trained, cfg.loss,
                                      loss_scale=1.0 / len(trained), kernels=cfg.kernels)
        if prior:  # as train.py: the prior prompt's condition for student and target, the bare base as teacher
            losses += rollout_and_learn(family, model, lora, x0.clone(), sigmas, c_s, c_s, trained, cfg.loss,
                                        loss_scale=1.0 / len(trained), teacher=None, kernels=cfg.kernels)[0]
        if optimizer_step(params, optimizer, scheduler, cfg.max_grad_norm, sum(losses) / len(losses))[0]:  # clip, step
            lora.ema_update(cfg.ema_decay)  # as train.train_step
        return losses

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t1 = time.perf_counter()
    res["first_losses"] = step()  # warm-up: kernels, allocator, optimizer state; the LoRA is still the initial one
    sync()
    res["first_step_seconds"] = time.perf_counter() - t1
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device) / GiB if cuda else None
    times = []
    losses = []
    for _ in range(args.steps):
        t1 = time.perf_counter()
        losses = step()
        sync()
        times.append(time.perf_counter() - t1)
    res["step"] = {"seconds": sorted(times)[len(times) // 2], "all_seconds": times, "rollout_steps": steps,
                   "losses_finite": all(map(math.isfinite, losses)), "trained_passes": len(losses),
                   "static_gib": static,
                   "peak_gib": torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if cuda else None}
    res["compiled_graphs"] = accel.compiled_graphs() - graphs

    if args.profile:  # where one trained roll-out state's time goes (benchmarks/hostprof.py)
        from hostprof import gpu_timeline, python_hot_spots

        def one_state():  # as one trained k of rollout_and_learn: teacher pass, student pass + backward
            rollout_and_learn(family, model, lora, x0.clone(), sigmas[steps // 2: steps // 2 + 2], c_s, c_t, {0},
                              cfg.loss, loss_scale=1.0 / len(trained), kernels=cfg.kernels)

        res["profile"] = {"timeline": gpu_timeline(one_state, sync), "python": python_hot_spots(one_state, sync, top=40)}
        optimizer.zero_grad(set_to_none=True)

    # phase probes: one teacher pass without autograd state, one student forward + backward
    if cuda:
        sigma, sigma_next = sigmas[steps // 2], sigmas[steps // 2 + 1]
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad(), lora.use("teacher"):
            family.velocity(model, x0, sigma, c_t, sigma_next)
        res["probe_teacher_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GiB
        for i in range(2):  # the first allocates the LoRA grads; the second is measured
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            with lora.use("student"):
                v = family.velocity(model, x0, sigma, c_s, sigma_next)
                (v.float().pow(2).mean()).backward()
            del v
        res["probe_student_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GiB
        optimizer.zero_grad(set_to_none=True)

    # the planner's prediction for the same settings (config alone, on the CPU)
    settings = {**res["settings"], "teacher": teacher,
                "lora_targets": list(targets), "fused_linear": bool(res["fused_layers"]),
                "teacher_ema_on": cfg.teacher_ema_on,  # the 12gb preset's EMA in host RAM: 0.3 GiB less
                "keep_blocks": cfg.keep_blocks}
    # the teacher's text as its condition holds it (klein's edit teacher: the caption, max_sequence_length)
    settings["teacher_max_sequence_length"] = c_t[0]["cap"].shape[0]
    mc = planner.resolve_model(str(folder))
    p = planner.make_plan(str(folder), settings, mc, budget_gib=planner.vram_of_preset(preset))  # keep_blocks
    res["plan"] = p.to_dict()
    res["predicted_gib"] = p.peak_gib
    if cuda and res["step"]["peak_gib"]:
        res["error_pct"] = 100 * (p.peak_gib - res["step"]["peak_gib"]) / res["step"]["peak_gib"]
    res["tokens"] = {"student": p.tokens.student, "teacher": p.tokens.teacher}
    return res


# ---------------------------------------------------------------------------------------------
# Orchestration and the report
# ---------------------------------------------------------------------------------------------
def parse_trees(text: str) -> dict[str, Path]:
    """'before=/tmp/ab/x,after=.' -> {label: folder}; a bare folder is labelled by its name. Default: this tree."""
    trees = {}
    for item in filter(None, (text or "").split(",")):
        label, _, folder = item.rpartition("=")
        path = Path(folder).resolve()
        trees[label or path.name] = path
    return trees or {"this": ROOT}


def check_tree(label: str, tree: Path) -> None:
    """Fail unless a child started from `tree` imports `tree`'s own package and kernels (an unpacked commit
    has no install: without the links that the install's package-dir stands for, `lowvram_dopsd.kernels`
    would silently come from whatever is installed)."""
    for name in ("kernels", "presets"):
        link = tree / "lowvram_dopsd" / name
        if tree != ROOT and not link.exists() and (tree / name).is_dir():
            link.symlink_to(Path("..") / name)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import lowvram_dopsd, lowvram_dopsd.kernels.lora_linear as k, "
            "lowvram_dopsd.train, transformers.modeling_utils, diffusers.loaders.peft; "  # as the child will
            "print(lowvram_dopsd.__file__); print(k.__file__)")
    # -P: no working directory first on sys.path, as for the child, which runs the tree's own script
    proc = subprocess.run([sys.executable, "-P", "-c", code, str(tree)], capture_output=True, text=True)
    files = proc.stdout.split()
    if proc.returncode != 0 or len(files) != 2 or not all(Path(f).resolve().is_relative_to(tree) for f in files):
        raise SystemExit(f"tree {label} ({tree}) does not import its own code: {files or proc.stderr[-1500:]}")


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "optimum-quanto", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def report(results: list[dict], meta: dict) -> str:
    lines = [f"# Memory benchmark: {meta['device']}", "",
             f"Command: `{meta['command']}`  ",
             f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}  ",
             f"Random checkpoint: {meta.get('checkpoint', {})}",
             *([f"Single file (original layout): {meta['single_file']}"] if meta.get("single_file") else []), "",
             "Peak = `torch.cuda.max_memory_allocated` over one whole steady-state training step (batch 1, "
             "roll-out + per-step backward + clip + optimizer + EMA). Predicted = `lowvram-dopsd plan` for the "
             "same settings, from the config alone.", "",
             "| config | model | res | quant | optimizer | rank | tokens s/t | peak GiB | target GiB | predicted GiB "
             "| error | s/step | load s | load host peak RSS GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    if any("predicted_gib_at_run" in r for r in results):
        lines[-4] += (" The predictions were recomputed after calibrating the planner on these runs (`--report-only`); "
                      "the uncalibrated ones made during the run are in the last table.")
    for r in results:
        if "error" in r and "step" not in r:
            lines.append(f"| {r['config']} | failed: {r['error'][:120]} | | | | | | | | | | | | |")
            continue
        s, st = r["settings"], r["step"]
        label = r["config"] + (" (superseded)" if r.get("superseded") else "")
        model = MODEL_LABELS.get(r.get("model") or family_of(r["family"]).hf_repo_ids[0], r["family"])
        peak = st["peak_gib"]
        err = "" if r.get("error_pct") is None else f"{r['error_pct']:+.1f}%"
        ok = "" if peak is None else (" ✅" if peak <= r["target_gib"] else " ❌")
        lines.append(
            f"| {label} | {model} | {s['resolution']}² | {s['quant']}{' fused' if r.get('fused_layers') else ''} "
            f"| {s['optimizer']} | {s['rank']} "
            f"| {r['tokens']['student']}/{r['tokens']['teacher']} | {peak if peak is None else f'{peak:.2f}'}{ok} "
            f"| {r['target_gib']} | {r['predicted_gib']:.2f} | "
            f"{err} | {st['seconds']:.1f} "
            f"| {r['load']['seconds']:.1f} | {r['load']['host_peak_rss_gib'] or 0:.2f} |")
    lines += ["", "Per configuration (GiB): static = allocated at the start of a step (base + LoRA + EMA + "
              "optimizer state); probes = extra memory of one teacher pass without grad and of one student "
              "forward+backward with the LoRA grads already allocated.", "",
              "| config | static | peak | peak reserved | probe teacher | probe student | load GPU peak | "
              "first step s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "step" not in r:
            continue
        st = r["step"]

        def f(v):
            return "" if v is None else f"{v:.2f}"
        lines.append(f"| {r['config']}{' (superseded)' if r.get('superseded') else ''} | {f(st['static_gib'])} | {f(st['peak_gib'])} | {f(st['peak_reserved_gib'])} "
                     f"| {f(r.get('probe_teacher_gib'))} | {f(r.get('probe_student_gib'))} "
                     f"| {f(r['load']['gpu_peak_gib'])} | {r['first_step_seconds']:.1f} |")
    if any("predicted_gib_at_run" in r for r in results):
        lines += ["", "Planner before calibration (as printed during the run): "
                  + ", ".join(f"{r['config']} {r['predicted_gib_at_run']:.2f} GiB" for r in results
                              if "predicted_gib_at_run" in r) + "."]
    for r in results:
        if r.get("superseded"):
            lines += ["", f"{r['config']} (superseded): {r['superseded']}."]
    profiled = [r for r in results if "profile" in r]
    if profiled:
        lines += ["", "One trained roll-out state (teacher pass, student pass + backward) under torch.profiler "
                  "(`--profile`): GPU busy = union of kernel/copy intervals; launches = CUDA runtime/driver "
                  "launch calls; waits = calls that block the host (syncs, device-to-host copies).", "",
                  "| config | wall s | GPU busy s | busy % | launches | waits (n, ms) |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in profiled:
            t = r["profile"]["timeline"]
            launches = sum(v["n"] for k, v in t["calls"].items() if "Launch" in k)
            waits = ", ".join(f"{k} {v['n']} / {v['ms']:.0f}" for k, v in t["calls"].items() if "Launch" not in k)
            lines.append(f"| {r['config']} | {t['wall_s']:.2f} | {t['gpu_busy_s']:.2f} | {t['gpu_busy_pct']:.0f} | "
                         f"{launches} | {waits} |")
        for r in profiled:  # where the GPU time of the state goes, by kind of kernel and by kernel
            k = r["profile"]["timeline"].get("kernels")
            if not k or not k["top"]:
                continue
            kinds = ", ".join(f"{kind} {v['ms']:.0f} ms ({v['pct']:.0f} %)" for kind, v in k["kinds"].items())
            lines += ["", f"GPU time by kernel, {r['config']}, one state ({k['total_ms']:.0f} ms): {kinds}.", "",
                      "| kernel | kind | launches | ms | % |", "| --- | --- | ---: | ---: | ---: |"]
            lines += [f"| `{t['name']}` | {t['kind']} | {t['n']} | {t['ms']:.1f} | {t['pct']:.1f} |" for t in k["top"]]
        for r in profiled:
            p = r["profile"]["python"]
            lines += ["", f"cProfile, {r['config']}, one state: {p['wall_s']:.2f} s wall (profiled), own time by function:",
                      "", "| function | calls | own ms | cum ms |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| `{t['fn']}` | {t['calls']} | {t['own_ms']:.1f} | {t['cum_ms']:.1f} |" for t in p["top"][:25]]
    lines += levers_table(results)
    if meta.get("trees"):
        lines += ab_table(results, list(meta["trees"]))
    notes = meta.get("notes")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def levers_table(results: list[dict]) -> list[str]:
    """What each config's speed settings did (accel.apply) and its warm-up step's losses against the first
    config of its family in this report (the same inputs and initial LoRA: a compiled or another attention
    kernel's numerics show as the largest relative difference)."""
    runs = [r for r in results if "levers" in r and "step" in r]
    if not runs:
        return []
    lines = ["", "Speed settings (accel.apply): the attention kernel of each pass (SDPA's choice, calls per pass), "
             "kept and compiled blocks (graphs compiled by the end), and the warm-up step's losses against the "
             "first config of the same family here.", "",
             "| config | attention | kept blocks | compiled blocks (graphs) | losses vs | max rel. diff | s/step |",
             "| --- | --- | --- | --- | --- | ---: | ---: |"]
    first: dict[str, dict] = {}
    for r in runs:
        lev, base = r["levers"], first.setdefault(r["family"], r)
        att = lev.get("attention", {})
        passes = "; ".join(f"{name}: " + ", ".join(f"{k} x{n}" for k, n in kernels.items())
                           for name, kernels in att.items() if name != "backend")
        kept = ", ".join(f"{n} {name}" for name, n in lev.get("kept_blocks", {}).items()) or "none"
        comp = f"{lev['compiled_blocks']} ({r.get('compiled_graphs')})" if lev.get("compiled_blocks") else "no"
        diff = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["first_losses"], base["first_losses"])),
                   default=0.0)
        lines.append(f"| {r['config']} | {'/'.join(att.get('backend', []))}: {passes} | {kept} | {comp} "
                     f"| {base['config']} | {diff:.2e} | {r['step']['seconds']:.2f} |")
    return lines


def ab_table(results: list[dict], labels: list[str]) -> list[str]:
    """Per config, each tree's measured step times (every step of every round) and their median, and the
    ratio of each tree's median to the first tree's."""
    lines = ["", "Step seconds per tree (--trees; runs alternate A B, B A, ...): every measured step of every "
             f"round, then the median; ratio = median / {labels[0]}'s.", "",
             "| config | " + " | ".join(labels) + " | " + " | ".join(f"{b} / {labels[0]}" for b in labels[1:]) + " |",
             "| --- |" + " --- |" * (2 * len(labels) - 1)]
    for name in dict.fromkeys(r["base_config"] for r in results if "base_config" in r):
        med, cells = {}, []
        for label in labels:
            times = [t for r in results if r.get("base_config") == name and r.get("tree") == label and "step" in r
                     for t in r["step"]["all_seconds"]]
            med[label] = sorted(times)[len(times) // 2] if times else None
            cells.append(", ".join(f"{t:.2f}" for t in times) + (f" (**{med[label]:.2f}**)" if times else "failed"))
        ratios = [f"{med[b] / med[labels[0]]:.3f}" if med[b] and med[labels[0]] else "" for b in labels[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return lines


def repredict(results: list[dict]) -> None:
    """Recompute the planner's predictions for recorded results (after a calibration change)."""
    from lowvram_dopsd import plan as planner

    for r in results:
        if "plan" not in r:
            continue
        settings = {**r["settings"], "teacher": r["plan"]["settings"]["teacher"],
                    "teacher_max_sequence_length": r["plan"]["settings"]["teacher_max_sequence_length"],
                    "fused_linear": bool(r.get("fused_layers")), "teacher_ema_on": r.get("teacher_ema_on", "device")}
        p = planner.make_plan(r.get("model") or family_of(r["family"]).hf_repo_ids[0], settings)
        r.setdefault("predicted_gib_at_run", r["predicted_gib"])
        r["plan"], r["predicted_gib"] = p.to_dict(), p.peak_gib
        if r["step"].get("peak_gib"):
            r["error_pct"] = 100 * (p.peak_gib - r["step"]["peak_gib"]) / r["step"]["peak_gib"]


def host_rss_child(mode: str, folder: str, quant: str) -> dict:
    """Peak host RSS of loading `folder` the old way (from_pretrained on the CPU, then quantize) or frugally."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from lowvram_dopsd.quant import load_frugal, quantize_frozen

    skip = ("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer")
    before = host_rss()
    t0 = time.perf_counter()
    if mode == "old":
        model = ZImageTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
        quantize_frozen(model, quant, skip)
    else:
        model = load_frugal(ZImageTransformer2DModel, folder, torch.device("cpu"), torch.bfloat16, quant, skip)
    after = host_rss()
    return {"mode": mode, "seconds": time.perf_counter() - t0, "rss_before_gib": before.get("VmRSS"),
            "peak_rss_gib": after.get("VmHWM"), "rss_after_gib": after.get("VmRSS")}


def host_rss_compare(work: Path, layers: int, quant: str) -> list[dict]:
    """Write a Z-Image checkpoint with the published width and `layers` main blocks, load it both ways."""
    import torch
    from diffusers import ZImageTransformer2DModel

    folder = work / f"zimage-{layers}l" / "transformer"
    if not list(folder.glob("*.safetensors")):
        cfg = json.loads((published(family_of("zimage").hf_repo_ids[0]) / "transformer" / "config.json").read_text())
        cfg["n_layers"] = layers
        torch.set_default_dtype(torch.bfloat16)
        model = ZImageTransformer2DModel.from_config(cfg)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(folder, max_shard_size="2GB")
        del model
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / GiB
    out = []
    for mode in ("old", "frugal"):
        proc = subprocess.run([sys.executable, __file__, "--rss-child", mode, str(folder), quant],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"mode": mode, "error": proc.stderr[-400:]}
        res.update(checkpoint_gib=size, layers=layers, quant=quant)
        out.append(res)
        print(json.dumps(res), flush=True)
    return out


def child_result(name: str, args) -> dict:
    """One configuration's result, or its error: reported in the table, the other configs still run."""
    try:
        return run_child(name, args)
    except Exception as exc:
        import traceback
        traceback.print_exc()
        return {"config": name, "error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default="/tmp/lowvram-dopsd-bench")
    ap.add_argument("--configs", default="zimage-16gb,zimage-24gb,zimage-12gb,klein-16gb-edit")
    ap.add_argument("--steps", type=int, default=1, help="measured steps after one warm-up step")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test of this script)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip configs once this much time has passed")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one trained roll-out state: GPU busy time, launches, Python hot spots")
    ap.add_argument("--report-only", default=None, metavar="JSON",
                    help="re-predict a recorded results file with the current planner and rewrite its .md")
    ap.add_argument("--note", action="append", default=[], help="a note for the report (with --report-only)")
    ap.add_argument("--host-rss", type=int, default=0, metavar="LAYERS",
                    help="CPU only: compare peak host RSS of the old and the frugal loader on a Z-Image checkpoint "
                         "of the published width with LAYERS main blocks; writes <out>/host-rss.json")
    ap.add_argument("--trees", default="", metavar="LABEL=DIR,...",
                    help="run each config with the code of each tree (a checkout or unpacked commit), alternating")
    ap.add_argument("--rounds", type=int, default=1, help="with --trees: runs per config and tree")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.rss_child:
        print("RESULT " + json.dumps(host_rss_child(*args.rss_child)), flush=True)
        return 0
    if args.host_rss:
        res = host_rss_compare(Path(args.work), args.host_rss, "qint8")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "host-rss.json").write_text(json.dumps(
            {"machine": platform.processor() or platform.machine(), "versions": versions(),
             "command": "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]), "results": res}, indent=1))
        return 0

    if args.report_only:
        path = Path(args.report_only)
        data = json.loads(path.read_text())
        repredict(data["results"])
        if args.note:
            data["meta"]["notes"] = args.note
        path.write_text(json.dumps(data, indent=1))
        path.with_suffix(".md").write_text(report(data["results"], data["meta"]))
        print(report(data["results"], data["meta"]))
        return 0

    if args.child:
        print("RESULT " + json.dumps(child_result(args.child, args)), flush=True)
        return 0

    t_start = time.perf_counter()
    work = Path(args.work)
    names = [n for n in args.configs.split(",") if n]
    meta = {"device": device_name(args.device), "versions": versions(),
            "command": "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:])}
    for model in dict.fromkeys(model_of(CONFIGS[n]) for n in names):
        spec = next(CONFIGS[n] for n in names if model_of(CONFIGS[n]) == model)
        folder = model_folder(work, spec)
        write_model_folder(spec["family"], model, folder, args.tiny)
        if not list((folder / "transformer").glob("*.safetensors")):
            meta.setdefault("checkpoint", {})[model] = write_random_checkpoint(folder, args.device)
            print("checkpoint", model, meta["checkpoint"][model], flush=True)
    for family in dict.fromkeys(CONFIGS[n]["family"] for n in names if CONFIGS[n].get("single_file")):
        if not single_file_path(work, family).exists():
            meta.setdefault("single_file", {})[family] = write_single_file(work, family)
            print("single file", family, meta["single_file"][family], flush=True)

    trees = parse_trees(args.trees)
    if len(trees) > 1:  # one tree is this script's own: its root is first on sys.path already
        for label, tree in trees.items():
            check_tree(label, tree)
        meta["trees"] = {label: str(tree) for label, tree in trees.items()}
    runs = [(name, label, r) for r in range(args.rounds) for name in names
            for label in (list(trees) if r % 2 == 0 else list(trees)[::-1])]  # A B, B A: drift cancels

    results = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{slug(meta['device'])}" + ("-tiny" if args.tiny else "")
    for name, label, rnd in runs:
        shown = name if len(trees) == 1 else f"{name} @ {label}"
        if time.perf_counter() - t_start > args.budget_s:
            results.append({"config": shown, "error": "skipped: time budget"})
            continue
        if args.tiny and len(trees) == 1:  # a CPU smoke test: no GPU memory to keep apart, import everything once
            res = child_result(name, args)
        else:
            script = trees[label] / "benchmarks" / "bench_memory.py"  # that tree's code: its root first on sys.path
            cmd = [sys.executable, str(script), "--child", name, "--work", str(work), "--device", args.device,
                   "--steps", str(args.steps), *(["--tiny"] if args.tiny else []), *(["--profile"] if args.profile else [])]
            env = {**os.environ,
                   "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"config": name, "error": (proc.stderr or proc.stdout)[-400:]}
            if "error" in res:
                sys.stderr.write(proc.stderr[-3000:])
        if len(trees) > 1:
            res.update(config=shown, base_config=name, tree=label, round=rnd)
        results.append(res)
        print(json.dumps({k: res.get(k) for k in ("config", "predicted_gib", "error_pct", "error")}),
              json.dumps(res.get("step")), flush=True)
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        (out / f"{stem}.md").write_text(report(results, meta))
    print(report(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
