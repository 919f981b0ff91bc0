"""Checks that refuse a training run before it loads, encodes or moves anything: each says what is
wrong and what to do (a UserError), so a bad setting costs seconds, not a model load.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import data, distributed
from .config import TrainConfig
from .errors import UserError, quote
from .lora import names_target
from .quant import use_fused_linear

if TYPE_CHECKING:
    from .families.base import Family


def check_device(cfg: TrainConfig, device: torch.device) -> None:
    """What this device cannot run, said before anything is read, encoded or moved aside."""
    world = distributed.current()
    world.check_job(cfg.device, cfg.grad_accum, cfg.micro_batch)
    if cfg.train_mode == "full" and cfg.grad_accum % world.size:  # an uneven split would deadlock, not idle
        raise UserError(
            f"train_mode = 'full' needs every process to roll out as many micro-batches as the others (each pass "
            f"gathers the sharded weights from all of them), but batch_size / micro_batch = {cfg.grad_accum} does "
            f"not divide among {world.size} processes. Set --batch-size to a multiple of "
            f"{world.size * cfg.micro_batch} ({world.size} processes x micro_batch {cfg.micro_batch}).")
    if device.type == "cuda":
        return
    if cfg.device == "auto":  # a GPU preset (or none) on a machine whose torch sees no GPU
        raise UserError(
            f"PyTorch sees no CUDA GPU (torch {torch.__version__}), so device = 'auto' would train on the CPU: "
            f"hours per step at {cfg.resolution}² on the real models. Usually torch is a CPU-only build or the "
            "driver is missing: install a CUDA build (https://pytorch.org/get-started/locally/) and check "
            "`python -c \"import torch; print(torch.cuda.is_available())\"`. To train on the CPU anyway (the tiny "
            "demo models), pass --device cpu.")
    if cfg.optimizer == "adamw8bit" and cfg.train_mode == "lora":  # full mode's runs on bitsandbytes' CPU backend too
        raise UserError("optimizer = 'adamw8bit' (bitsandbytes) needs a CUDA GPU; use --optimizer adamw on the CPU.")
    if cfg.kernels == "on":
        from .kernels.utils import kernels_available
        if not kernels_available(device):
            raise UserError("kernels = 'on' forces the Triton kernels, which run on a CUDA GPU (or, for tests, on "
                            "the CPU under TRITON_INTERPRET=1, very slowly). Use --kernels auto or off on the CPU.")


def learning_rate(cfg: TrainConfig, family: Family) -> float:
    """`lr`, or the paper's for the model and the mode (LoRA, or full fine-tuning)."""
    default = family.default_full_lr if cfg.train_mode == "full" else family.default_lr
    if not cfg.lr and default is None:  # a family newer than the paper
        from .families import registered

        def short(lr: float) -> str:
            return f"{lr:g}".replace("e-0", "e-")

        given = {cls.name: cls.default_full_lr for cls in registered() if cls.default_full_lr}
        paper = ", ".join(f"{short(lr)} for {name}" for name, lr in given.items())
        low = short(min(given.values()))
        raise UserError(f"train_mode = 'full' needs a learning rate, and the paper gives none for full fine-tuning of "
                        f"the {family.name} family (it gives {paper}, at batch 256). Set one: add --lr {low} to the "
                        f"command (or lr = {low} in a --preset .toml file; the paper's lowest), or a value you have "
                        "reason for.")
    return cfg.resolved_lr(default or 0.0)


def check_method(cfg: TrainConfig, family: Family) -> tuple[str, int, int]:
    """The teacher kind, the roll-out length and the states of each roll-out that learn, checked
    against what the family offers (a setting left at 0 takes the family's default)."""
    teacher = cfg.teacher or family.teachers[0]
    if teacher not in family.teachers:
        raise UserError(f"The {family.name} family supports the teacher kinds {', '.join(family.teachers)}; "
                        f"'{teacher}' is not one of them.")
    rollout_steps = cfg.rollout_steps or family.default_rollout_steps
    if cfg.train_states > rollout_steps:
        raise UserError(f"train_states ({cfg.train_states}) cannot exceed the {rollout_steps} roll-out steps.")
    train_states = min(cfg.train_states or family.default_train_states or rollout_steps, rollout_steps)
    processes = distributed.current().size
    if cfg.train_mode == "full" and cfg.micro_batch > 1 and processes > 1 and not family.one_pass_per_micro_batch:
        raise UserError(
            f"train_mode = 'full' on {processes} processes needs micro_batch = 1 for the {family.name} family: its "
            "transformer runs the prompts of a micro-batch one at a time when their lengths differ, so the "
            "processes would make different numbers of sharded passes (each gathers weights from all of them) "
            f"and wait on each other for ever. Set --micro-batch 1 (batch_size {cfg.batch_size} stays the batch; "
            "the full presets use 1).")
    return teacher, rollout_steps, train_states


def check_act_quant(cfg: TrainConfig, device: torch.device) -> None:
    """int8 activations exist only inside the fused LoRA linear: on the CPU it runs the kernel's
    torch reference (tests, the toy study); on a GPU that emulation would be slow and hold float32
    copies of the weights, so the kernel is required. Checked before anything is loaded."""
    if cfg.act_quant != "off" and device.type == "cuda" and not use_fused_linear(device, cfg.kernels):
        from .kernels.utils import MIN_TRITON_TEXT, too_old, why_not

        why = why_not(device) or "kernels = 'off'"
        if too_old(device):  # no Triton fixes that
            unused, fix = "does not run on this GPU", "Set act_quant = 'off'."
        else:
            unused, fix = "this run does not use", (
                f"Set kernels = 'auto' with a Triton that runs it (`pip install -U triton`; Windows: `pip install -U "
                f"triton-windows`; the kernels need {MIN_TRITON_TEXT}), or set act_quant = 'off'.")
        raise UserError(f"act_quant = 'int8' runs inside the fused Triton kernel, which {unused} ({why}). {fix}")


def check_prior_prompts(cfg: TrainConfig, triggers: list[str]) -> None:
    """A prior prompt that names a subject would pull that subject itself back to the base."""
    named = [(p, t) for p in cfg.prior_prompts for t in triggers if data.mentions_trigger(p, t)]
    if named:
        raise UserError(f"The prior prompt {quote(named[0][0])} contains the trigger {quote(named[0][1])}. Prior prompts are "
                        "the ones whose images must NOT change (e.g. 'a photo of a dog' when you train "
                        "'sks dog'): remove the trigger from them.")


def prepare_output(path: str) -> Path:
    """The output folder, made and checked writable before anything is encoded."""
    out = Path(path).expanduser()
    if blocking := next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None):
        what = "it is a file" if blocking == out else f"'{blocking}' on its way is a file"
        raise UserError(f"Cannot write to the output folder '{out}': {what}. Pass --output a folder (a new one, or a "
                        "run's to continue with --resume).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"Cannot write to the output folder '{out}' ({exc.strerror or exc}). "
                        "Pass --output with a folder you can write to.") from exc
    return out


def read_init_lora(cfg: TrainConfig, family: Family) -> tuple[dict[str, torch.Tensor], Path]:
    """The LoRA a new run starts from (`init_lora`) and its file, read and checked before anything is
    encoded: its rank, alpha and layers must be this run's (DualLoRA.load checks the layers again, exactly,
    once the transformer is loaded; by then the conditions have been encoded)."""
    from .export import read_lora
    from .files import find_lora_file

    lora_file = find_lora_file(cfg.init_lora).resolve()
    tensors, rank, alpha = read_lora(str(lora_file), family.name)
    if rank != cfg.rank or not math.isclose(alpha, cfg.alpha, rel_tol=1e-6):
        raise UserError(f"The init LoRA '{cfg.init_lora}' has rank {rank} and alpha {alpha:g}; this run has rank "
                        f"{cfg.rank} and alpha {cfg.alpha:g}. Pass --rank {rank} --alpha {alpha:g} to train it "
                        "further.")
    targets = tuple(cfg.lora_targets) or family.lora_targets
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    outside = [m for m in modules if not any(names_target(m, t) for t in targets)]
    unused = [t for t in targets if not any(names_target(m, t) for m in modules)]
    if outside or unused:
        theirs = sorted({_as_target(m) for m in modules})
        why = (f"its layers {', '.join(outside[:2])}{', ...' if len(outside) > 2 else ''} are not among this run's "
               "lora_targets" if outside else f"no layer of it matches the target(s) {', '.join(unused)}")
        raise UserError(f"The init LoRA '{cfg.init_lora}' was trained on other layers than this run's: {why}. Train "
                        f"the layers it has: --set lora_targets={','.join(theirs)}")
    return tensors, lora_file


def _as_target(module: str) -> str:
    """A module's name as a `lora_targets` suffix: what follows its block index ("layers.3.attention.to_q"
    -> "attention.to_q"; "layers.3.attention.to_out.0" -> "attention.to_out.0")."""
    parts = module.split(".")
    first_index = next((i for i, p in enumerate(parts) if p.isdigit()), -1)
    return ".".join(parts[first_index + 1:])
