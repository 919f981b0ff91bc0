"""What a training run tells its user: the box before it starts, notes, advice when it fails, the
closing summary and the commands to copy. No training math here (train.py); the checks that refuse
a run before anything loads are in preflight.py.
"""
from __future__ import annotations

import dataclasses
import math
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import distributed, tracking
from .config import TrainConfig
from .errors import UserError
from .guard import resume_command  # noqa: F401  (advice a run prints: the command that continues it)
from .optim import lr_shape
from .output import TEACHER_FILE, model_for_metadata
from .progress import program, styled

if TYPE_CHECKING:
    from . import checkpoint, data
    from .families.base import Family
    from .lora import DualLoRA


# ---------------------------------------------------------------------------------------------
# Before the run
# ---------------------------------------------------------------------------------------------
def run_header(cfg: TrainConfig, preset: str, family: Family, ds: data.Dataset, teacher: str,
               states: tuple[int, int], lr: float, device: torch.device, notes: dict[str, str], out_dir: Path,
               ckpt: checkpoint.Checkpoint | None) -> dict[str, str]:
    """What the run is about to do, as the box printed before anything is loaded. `states`: the
    roll-out steps and how many of them learn."""
    rollout_steps, train_states = states
    prior_weight = f"weight {cfg.prior_weight:g}" if cfg.prior_weight else "measured only (weight 0)"
    schedule = f" ({shape})" if (shape := lr_shape(cfg)) else ""
    trains, what = (("LoRA", f"rank {cfg.rank}, alpha {cfg.alpha:g}, "
                     + (f"from {cfg.init_lora}" if cfg.init_lora else f"{cfg.lora_init} init"))
                    if cfg.train_mode == "lora" else ("full", f"every weight, EMA teacher {cfg.ema_dtype}"))
    return {
        "model": f"{cfg.model} ({family.name})"
                 + (f", transformer {family.transformer_file.name}" if family.transformer_file else ""),
        "preset": preset or "(none)",
        "dataset": f"{len(ds)} images from {ds.source}" + (f", {len(ds.skipped)} skipped" if ds.skipped else ""),
        "captions": ds.caption_rule,
        "method": f"teacher {teacher}, loss {cfg.loss}, {rollout_steps}-step roll-outs, "
                  f"{'all' if train_states == rollout_steps else train_states} states trained, EMA {cfg.ema_decay}"
                  + (f"; prior: {len(cfg.prior_prompts)} prompts, {prior_weight}" if cfg.prior_prompts else ""),
        **notes,
        trains: what + f", lr {lr:g}{schedule}, batch {cfg.batch_size} "
                f"({cfg.micro_batch} x {cfg.grad_accum} accumulation), {cfg.steps} steps",
        "compute": f"{device} {cfg.dtype}, base quant {cfg.quant}"
                   + (" with int8 activations" if cfg.act_quant == "int8" else "")
                   + f", gradient checkpointing {'on' if cfg.grad_checkpointing else 'off'}"
                   + (", EMA teacher in host RAM" if cfg.teacher_ema_on == "cpu" and device.type != "cpu" else "")
                   + (f"; {n} processes, each rolling out its share of every batch"
                      if (n := distributed.current().size) > 1 else ""),
        "output": str(out_dir) + (f" (resuming {ckpt.path.name})" if ckpt else ""),
    }


def print_run_notes(console, display, cfg: TrainConfig, family: Family, ds: data.Dataset, teacher: str,
                    remarks: list[str], device: torch.device, out_dir: Path) -> None:
    """What the user should know before the run starts: skipped images, warnings, resume remarks."""
    if cfg.log_with == "tensorboard":
        display.commands({"watch it": f"tensorboard --logdir {shlex.quote(str(out_dir))}"})
    for path, why in ds.skipped:
        console.print(styled("skipped:", f"{ds.name(path)}: {why}"))
    for path, why in ds.warnings:
        console.print(styled("warning:", f"{ds.name(path)}: {why}"))
    for remark in remarks:
        console.print(styled("note:", remark))
    if note := distributed.current().division_note(cfg.grad_accum):
        console.print(styled("note:", note))
    captions = [(c, ds.name(it.image_path)) for it in ds.items for c in it.captions]  # every variant is trained
    for warning in family.prompt_warnings([c for c, _ in captions], [name for _, name in captions], teacher, cfg):
        console.print(styled("warning:", warning))
    if device.type == "cuda":
        warn_if_it_will_not_fit(cfg, device, console)
        if note := emulated_bf16_note(cfg, device):
            console.print(styled("note:", note))


def warn_if_it_will_not_fit(cfg: TrainConfig, device: torch.device, console) -> None:
    """Before anything loads: the planner's prediction (plan.py: within 1% of the H100 measurements at
    micro_batch 1, scaled linearly above it; a full fine-tune's per GPU, plan_full.py) against this card's memory."""
    from . import plan, plan_full
    from .quant import use_fused_linear

    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    # plan the path route_fused_linears will route the 8-bit layers to on this GPU, not the one the
    # config alone suggests (Triton may not compile for it: kernels.utils.NO_MMA)
    cfg = dataclasses.replace(cfg, kernels="on" if use_fused_linear(device, cfg.kernels) else "off")
    try:
        p = plan_full.make(cfg, distributed.current().size, plan.budget_for(total)) if cfg.train_mode == "full" \
            else plan.plan_from_config(cfg, budget_gib=plan.budget_for(total))
    except UserError:
        return  # a checkpoint the planner does not know: nothing to predict
    if not p.fits():
        console.print(styled("warning:", f"the planner predicts a peak of {p.peak_gib:.1f} GiB on this {total:.0f} "
                                         "GiB card; this run will probably run out of memory. `lowvram-dopsd plan` "
                                         "with the same settings suggests what to lower."))


def time_note(cfg: TrainConfig, device: torch.device, kept: dict[str, int]) -> str:
    """How long the run will take on this GPU (timeplan.py): measured where this GPU, model and path were,
    else predicted and said so; '' for a GPU or model the planners do not know."""
    from . import plan, timeplan
    from .quant import use_fused_linear

    gpu, world = timeplan.this_gpu(device), distributed.current()
    if gpu is None or not world.main:
        return ""
    cfg = dataclasses.replace(cfg, kernels="on" if use_fused_linear(device, cfg.kernels) else "off")  # as it runs
    try:
        tp = timeplan.predict(plan.resolve_model(cfg.model), plan.run_settings(cfg), gpu, kept)
    except UserError:  # a model the planners do not know: nothing to say (any other error is a bug: raised)
        return ""
    return timeplan.describe(tp, world.size)


def print_speed(console, cfg: TrainConfig, device: torch.device, facts: dict) -> None:
    """Before the first step: what the speed settings did (accel.apply: which attention each pass runs, the
    kept and compiled blocks) and how long the run will take."""
    from .accel import describe_attention

    if "attention" in facts:
        console.print(f"attention: {describe_attention(facts['attention'])}")
    if kept := facts.get("kept_blocks"):
        console.print(f"keep_blocks: {', '.join(f'{n} of {name}' for name, n in kept.items())} keep their "
                      "activations (not recomputed in the backward)")
    if facts.get("compiled_blocks"):
        console.print(f"torch_compile: {facts['compiled_blocks']} blocks compile in the first steps (the first "
                      "step of each bucket is slower)")
    if note := time_note(cfg, device, kept or {}):
        console.print(note)


def note_archived(console, out_dir: Path, archived: Path, init_file: Path | None) -> Path | None:
    """Say that an earlier run in `out_dir` was moved aside; returns where the init LoRA is now (it may
    have been part of it)."""
    from .checkpoint import moved_by_archive

    console.print(styled("note:", f"'{out_dir}' held an earlier run: moved to {archived} (use --resume to "
                                 "continue a run)"))
    if init_file is not None and (moved := moved_by_archive(init_file, out_dir, archived)) != init_file:
        console.print(styled("note:", f"the init LoRA was part of it: it is now {moved}"))
        return moved
    return init_file


def shorter_run_advice(cfg: TrainConfig, rollout_steps: int, trained: int = 0) -> str:
    """What shortens a run, for the note a long one gets after its first steps (progress.LONG_RUN_S).
    `trained`: the states of each roll-out that learn (0: as the config says, every one if it says 0)."""
    trained = trained or cfg.train_states or rollout_steps
    levers = ["fewer --steps (the previews show when your subject has come through; Ctrl-C saves)"]
    if trained > 2:  # an untrained state is one forward pass, about a quarter of a trained one
        levers.append(f"--train-states 2 (learn at 2 random states of each {rollout_steps}-step roll-out, "
                      f"not {trained})")
    half = cfg.batch_size // 2
    if half >= cfg.micro_batch and half % cfg.micro_batch == 0:
        levers.append(f"--batch-size {half}")
    if cfg.resolution > 768:
        levers.append("--resolution 768")
    if cfg.prior_prompts:
        levers.append("no prior_prompts (each step also rolls them out)")
    return ", ".join(levers)


def print_lora(console, cfg: TrainConfig, lora: DualLoRA, fused: int, device: torch.device) -> None:
    """The LoRA sets as built, and why their 8-bit layers are not on the fused kernel where that is so."""
    console.print(f"LoRA: {len(lora.layers)} layers ({fused} on the fused 8-bit kernel"
                  f"{', int8 activations' if cfg.act_quant == 'int8' else ''}), "
                  f"{lora.num_parameters() / 1e6:.2f}M trainable parameters")
    if note := no_kernel_note(cfg, device, fused):
        console.print(styled("note:", note))


def emulated_bf16_note(cfg: TrainConfig, device: torch.device) -> str:
    """A bf16 run on a GPU older than Ampere (T4, RTX 20xx): it has no bf16 arithmetic, so PyTorch
    computes bf16 in fp32 without tensor cores, and its flash and memory-efficient attention take bf16
    only from sm_80 on (aten sdp_utils.cpp), so attention falls back to the kernel that holds the whole
    score matrix, which the planner (H100-calibrated) does not count. Said before anything is encoded;
    "" elsewhere."""
    from .kernels.utils import MIN_CAPABILITY, gpu_capability

    cap = gpu_capability(device)
    if cfg.dtype != "bf16" or cap is None or cap >= MIN_CAPABILITY:
        return ""
    major, minor = cap
    return (f"this GPU (compute capability {major}.{minor}) has no bf16 arithmetic (Ampere, 8.0, brought it): "
            "PyTorch emulates dtype = 'bf16' in fp32 without tensor cores, far slower than on an RTX 30xx or "
            "newer, and its attention then holds whole score matrices (more memory than `plan` predicts). "
            "dtype = 'fp16' would use its tensor cores, but fp16 training of these models is untested here "
            "(its range is much narrower than bf16's).")


def no_kernel_note(cfg: TrainConfig, device: torch.device, fused: int) -> str:
    """Why the 8-bit layers of a GPU run are not on the fused kernel when the user did not turn it
    off: Triton missing, too old (kernels.utils.MIN_TRITON) or unable to compile for this GPU
    (kernels.utils.NO_MMA), or older than it runs on (kernels.utils.MIN_CAPABILITY). "" when there is
    nothing to say."""
    from .kernels.utils import MIN_TRITON_TEXT, TRITON_MISSING, too_old, why_not
    from .quant import QUANTO

    why = why_not(device)
    if fused or device.type != "cuda" or cfg.quant not in QUANTO or not why:
        return ""
    if too_old(device):  # nothing to install, and the H100's 1.2x says nothing about this GPU
        return f"the 8-bit layers run on quanto's dequantise + matmul: the fused kernel does not run here ({why})."
    fix = f" {MIN_TRITON_TEXT} enables it." if TRITON_MISSING else ""  # else `why` names the fix
    return (f"the 8-bit layers run on quanto's dequantise + matmul, not the fused kernel ({why}): "
            f"~1.2x slower per layer (benchmarks/results/kernels-h100.md), same results.{fix}")


# ---------------------------------------------------------------------------------------------
# When a step fails
# ---------------------------------------------------------------------------------------------
def oom_advice(cfg: TrainConfig, preset: str) -> str:
    """The memory levers this config has not pulled yet, most effective first."""
    levers = _full_levers(cfg) if cfg.train_mode == "full" else []
    if preset != "16gb" and cfg.quant == "none" and cfg.train_mode == "lora":
        levers.append("--preset 16gb (8-bit base, 8-bit AdamW)")
    if cfg.quant == "none" and cfg.train_mode == "lora":
        levers.append("--quant qint8 (halves the frozen base)")
    if not cfg.grad_checkpointing:
        levers.append("--set grad_checkpointing=true")
    if cfg.optimizer == "adamw":
        levers.append("--optimizer adamw8bit")
    if cfg.micro_batch > 1:
        levers.append("--micro-batch 1 (batch_size is kept through accumulation)")
    if cfg.resolution > 512:
        levers.append(f"--resolution {max(512, cfg.resolution - 256)}")
    if cfg.rank > 16 and cfg.train_mode == "lora":
        levers.append(f"--rank {cfg.rank // 2} (and --alpha {cfg.alpha / 2:g} to keep the scale)")
    if cfg.preview_every:
        levers.append("--preview-every 0")
    return ", ".join(levers) if levers else "a smaller resolution or rank; close other programs using the GPU"


def _full_levers(cfg: TrainConfig) -> list[str]:
    """A full fine-tune's own levers (it has no frozen base to make 8-bit, no LoRA rank): more GPUs shard the
    model thinner, and the EMA teacher and the optimizer state can shrink."""
    levers = ["more GPUs (each holds 1/N of the weights, gradients, optimizer state and EMA teacher; "
              "`lowvram-dopsd plan --train-mode full --gpus N` shows each GPU's share)"]
    if cfg.teacher_ema_on != "cpu":
        levers.append("--set teacher_ema_on=cpu (the EMA teacher's shards in host RAM)")
    if cfg.ema_dtype == "fp32":
        levers.append("--set ema_dtype=bf16 (half the EMA teacher)")
    return levers


@contextmanager
def explain_oom(cfg: TrainConfig, preset: str, doing: str, on_oom: Callable[[], str] = lambda: ""):
    """Turn a CUDA out-of-memory error into a UserError that names the settings to lower.
    `on_oom` saves what it can and says so (its text goes into the message)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kept = on_oom()
        raise UserError(f"The GPU ran out of memory while {doing}. {kept}Lower the memory use and run again: "
                        f"{oom_advice(cfg, preset)}. `lowvram-dopsd plan` with the same settings shows where "
                        "the memory goes.") from exc


def nonfinite_advice(cfg: TrainConfig, lr: float) -> str:
    """The settings that most often make a loss or a gradient overflow, in the order to try them."""
    levers = []
    if cfg.dtype == "fp16":
        levers.append("--dtype bf16 (fp16's range overflows in these models; bf16 runs on RTX 30xx and newer)")
    if cfg.act_quant != "off":
        levers.append("--act-quant off")
    levers.append(f"a lower --lr (now {lr:g})")
    if cfg.max_grad_norm <= 0:
        levers.append("--set max_grad_norm=1.0 (gradient clipping is off)")
    return ", ".join(levers)


def diverged_error(cfg: TrainConfig, lr: float, step: int, in_a_row: int, lora_path: Path,
                   last_ckpt: Path | None) -> UserError:
    """The run stopped because its last `in_a_row` steps were all non-finite."""
    return UserError(
        f"Steps {step - in_a_row + 1}-{step} all gave a non-finite loss or gradient (NaN or inf; "
        f"metrics.jsonl marks them \"skipped\"). None of them changed the LoRA: the LoRA so far ({lora_path}) and "
        f"the checkpoint {last_ckpt} hold it as trained up to step {step - in_a_row}, and are finite. "
        f"Change what overflows and run again: {nonfinite_advice(cfg, lr)}.")


# ---------------------------------------------------------------------------------------------
# After the run
# ---------------------------------------------------------------------------------------------
def done_summary(out_dir: Path, path: Path, skipped: int, previews: bool) -> dict[str, str]:
    """The closing box of a finished run: where everything is."""
    return {
        "LoRA": str(path),
        **({"skipped updates": f"{skipped} (a non-finite loss or gradient; \"skipped\" in metrics.jsonl)"}
           if skipped else {}),
        "EMA teacher": str(out_dir / TEACHER_FILE),
        "metrics": str(out_dir / "metrics.jsonl"),
        **({"TensorBoard": str(out_dir / tracking.TB_DIR)} if (out_dir / tracking.TB_DIR).is_dir() else {}),
        **({"previews": str(out_dir / "previews")} if previews else {}),
    }


def full_done_summary(out_dir: Path, folder: Path, single: Path | None, last_ckpt: Path | None, skipped: int,
                      previews: bool) -> dict[str, str]:
    """The closing box of a finished full fine-tune: the transformer, its single file, the EMA teacher's place."""
    box = done_summary(out_dir, folder, skipped, previews)
    del box["LoRA"], box["EMA teacher"]
    return {"transformer": str(folder), **({"single file": str(single)} if single else {}),
            "EMA teacher": f"{last_ckpt} (weights/, torch.distributed.checkpoint)", **box}


def full_use_commands(cfg: TrainConfig, family: Family, folder: Path, single: Path | None) -> dict[str, str]:
    """How to use a full fine-tune's transformer, printed under the closing box to be copied."""
    model = model_for_metadata(cfg.model)
    load = (f"from diffusers import {family.transformer_class}; t = {family.transformer_class}.from_pretrained("
            f"{str(folder)!r}); {family.load_code(model, transformer='t')}").rstrip("; ")
    if single is None:
        return {"load it": load}
    if family.comfy_layout:
        return {"load it": load, "ComfyUI": f"copy {shlex.quote(str(single))} into ComfyUI/models/diffusion_models"}
    return {"load it": load, "or from the single file": f"from diffusers import {family.transformer_class}; t = "
            f"{family.transformer_class}.from_single_file({str(single)!r}, config={model!r}, subfolder='transformer')"}


def use_commands(cfg: TrainConfig, family: Family, out_dir: Path) -> dict[str, str]:
    """How to use the LoRA, printed under the closing box to be copied."""
    q, model = shlex.quote, model_for_metadata(cfg.model)
    if family.transformer_file:  # trained on a fine-tune's single file: the pipeline gets that transformer
        load = (f"from diffusers import {family.pipeline_class}, {family.transformer_class}; "
                f"t = {family.transformer_class}.from_single_file({str(family.transformer_file)!r}, config={model!r}, "
                f"subfolder='transformer'); pipe = {family.pipeline_class}.from_pretrained({model!r}, transformer=t); ")
    else:
        load = family.load_code(model)
    return {
        "load it": load + f"pipe.load_lora_weights({str(out_dir)!r})",
        **({"try it": f"{shlex.join(program())} sample --lora {q(str(out_dir))} --prompt \"...\""}
           if family.in_diffusers else {}),
        **({"ComfyUI": f"{shlex.join(program())} export --format comfyui {q(str(out_dir))}"}
           if family.comfy_layout else {}),
    }


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN: metrics.jsonl stays readable by any tool
