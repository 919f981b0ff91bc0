"""D-OPSD training, top to bottom (paper §2.2, Algorithm 1; DESIGN.md "The algorithm").

    python -m lowvram_dopsd train --preset 16gb --images ./my_dog

For each training pair (image, caption):
  1. c_s = the pipeline's own text encoding of the caption          (precomputed, cached)
     c_t = the teacher condition: caption + image through the grafted VLM (precomputed, cached)
  2. roll out the STUDENT (base + student LoRA, c_s) from noise with the model's own few-step
     sampler; every visited state x_k is on-policy;
  3. at a visited state: v_T = f(x_k; base + EMA LoRA, c_t) without grad,
                         v_S = f(x_k; base + student LoRA, c_s) with grad;
     loss = mean((v_S - v_T)²) (or the x0 form), back-propagated RIGHT AWAY: states are detached
     between steps, so only one step's activations are ever alive (the authors keep all K);
  4. optimizer step on the student LoRA, then EMA of the student LoRA into the teacher LoRA.
Student and teacher are two LoRA sets on one frozen (optionally 8-bit) base.

Around the loop: checkpoints every `save_every` steps (checkpoint.py; `--resume` continues a run
bit for bit), previews every `preview_every` steps (preview.py), Ctrl-C or SIGTERM = finish the step,
save, exit; a CUDA out-of-memory error says which setting to lower and keeps what was saved.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shlex
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, data, tracking
from .cache import FeatureCache, default_cache_dir, key_for
from .checkpoint import RNGState
from .config import TrainConfig
from .errors import UserError
from .families import load_family
from .families.base import Cond, Family
from .lora import DualLoRA, names_target
from .losses import dopsd_loss
from .output import LORA_FILE, save_lora
from .preview import Previewer, default_prompts
from .export import LAYOUTS, read_lora
from .files import find_lora_file
from .progress import Display, make_console
from .quant import QUANTO, use_fused_linear
from .runtime import DTYPES, resolve_device


# ---------------------------------------------------------------------------------------------
# 1. Precompute the conditions (encoders are loaded here and nowhere else, then released)
# ---------------------------------------------------------------------------------------------
def precompute(family: Family, ds: data.Dataset, teacher: str, cfg: TrainConfig, device: torch.device,
               cache: FeatureCache, prompts: list[str] = ()) -> tuple[list[Cond], list[Cond], list[Cond]]:
    """Student conditions of the captions, teacher conditions of the items, student conditions of
    the preview prompts (encoded together with the captions: the text encoder is loaded once)."""
    ident_s = family.encoder_identity("student", cfg)
    texts = [it.caption for it in ds.items] + list(prompts)
    keys_s = [key_for("student", ident_s, text, None) for text in texts]
    student = cache.get_or_compute(keys_s, lambda idx: family.encode_student([texts[i] for i in idx], cfg, device),
                                   check=lambda i, c: check_finite(c, f"the caption {texts[i]!r}", "text", cfg))
    ident_t = family.encoder_identity(teacher, cfg)
    keys_t = [key_for(teacher, ident_t, it.caption, it.image_sha256) for it in ds.items]
    teacher_conds = cache.get_or_compute(
        keys_t, lambda idx: family.encode_teacher([ds.items[i] for i in idx], teacher, cfg, device),
        check=lambda i, c: check_finite(c, ds.name(ds.items[i].image_path), f"{teacher} teacher's", cfg))
    return student[:len(ds)], teacher_conds, student[len(ds):]


def check_prior_prompts(cfg: TrainConfig, triggers: list[str]) -> None:
    """A prior prompt that names a subject would pull that subject itself back to the base."""
    named = [(p, t) for p in cfg.prior_prompts for t in triggers if data.mentions_trigger(p, t)]
    if named:
        raise UserError(f"The prior prompt {named[0][0]!r} contains the trigger {named[0][1]!r}. Prior prompts are "
                        "the ones whose images must NOT change (e.g. 'a photo of a dog' when you train "
                        "'sks dog'): remove the trigger from them.")


def check_finite(cond: Cond, what: str, encoder: str, cfg: TrainConfig) -> None:
    """A NaN/inf condition would make every step that draws it non-finite, and the cache would keep it."""
    bad = sorted(k for k, v in cond.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        hint = ("fp16 overflows in these encoders' activations: use --dtype bf16 (RTX 30xx and newer) or fp32"
                if cfg.dtype == "fp16" else "check that the model and encoder downloads are complete "
                "(download them again)")
        raise UserError(f"The {encoder} encoder gave non-finite values (NaN or inf, in {', '.join(bad)}) for {what}. "
                        f"Nothing from this batch was cached. Most likely {hint}.")


# ---------------------------------------------------------------------------------------------
# 2. One roll-out: sample with the student, learn at the visited states
# ---------------------------------------------------------------------------------------------
def rollout_and_learn(family: Family, model: torch.nn.Module, lora: DualLoRA, x: torch.Tensor,
                      sigmas: torch.Tensor, c_s: list[Cond], c_t: list[Cond], trained: set[int],
                      loss_kind: str, loss_scale: float, teacher: str | None = "teacher", kernels: str = "auto"
                      ) -> tuple[list[float], torch.Tensor]:
    """Roll out from noise `x`; at each step in `trained`, back-propagate `loss_scale * loss` at once.

    `teacher`: the LoRA set the target is computed with ("teacher" = the EMA teacher; None = the bare
    base model, for the prior roll-outs). `loss_scale = 0` measures only: no graph, no backward.
    `kernels`: the run's `kernels` setting, the loss kernel's dispatch rule (kernels.utils).

    Returns the per-trained-step losses and the final latents. Gradients accumulate in the student
    LoRA's .grad; the caller steps the optimizer.
    """
    # Nothing in the loop waits for the GPU: the schedule goes to the device once (a CPU sigma would be
    # copied to it, synchronously, by every pass and loss) and the losses are read after the last
    # state, so the host can queue the next pass while the GPU still runs this one.
    sigmas = sigmas.to(x.device, non_blocking=True)
    losses = []
    for k in range(len(sigmas) - 1):
        sigma = sigmas[k]
        if k in trained:
            with torch.no_grad(), lora.use(teacher):
                v_t = family.velocity(model, x, sigma, c_t)
            with lora.use("student"), torch.set_grad_enabled(loss_scale != 0):
                v_s = family.velocity(model, x, sigma, c_s)
                loss = dopsd_loss(loss_kind, v_s, v_t, sigma, kernels)
                # Backward inside the student context: gradient checkpointing re-runs the forward
                # during backward, and that re-run must see the same LoRA set.
                if loss_scale != 0:
                    (loss * loss_scale).backward()
            losses.append(loss.detach())
            v = v_s.detach()
        else:
            with torch.no_grad(), lora.use("student"):
                v = family.velocity(model, x, sigma, c_s)
        x = x + (sigmas[k + 1] - sigma) * v  # the pipeline's Euler step (FlowMatchEulerDiscreteScheduler)
    return (torch.stack(losses).tolist() if losses else []), x


def conds_on(conds: list[Cond], device: torch.device) -> list[Cond]:
    """A micro-batch's cached conditions (host RAM) on the device, copied once for its whole roll-out:
    each pass would copy them again otherwise, and a copy from pageable memory waits for the GPU."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in c.items()}
            for c in conds]


class BucketSampler:
    """Endless shuffled epochs; a micro-batch holds items of one training size (bucket)."""

    def __init__(self, items: list[data.Item], micro_batch: int, rng: random.Random):
        self.items, self.micro_batch, self.rng = items, micro_batch, rng
        self.order: list[int] = []

    def next(self) -> list[int]:
        if not self.order:  # an epoch holds each item `repeats` times (1 unless a dataset file says so)
            self.order = [i for i, it in enumerate(self.items) for _ in range(it.repeats)]
            self.rng.shuffle(self.order)
        first = self.order.pop()
        size = (self.items[first].width, self.items[first].height)
        # other images before another copy of this one (a repeated item's copies are alike)
        same = [i for i in dict.fromkeys(self.order)
                if i != first and (self.items[i].width, self.items[i].height) == size]
        batch = [first] + same[: self.micro_batch - 1]
        for i in batch[1:]:
            self.order.remove(i)
        while len(batch) < self.micro_batch:  # a small bucket repeats its items
            batch.append(self.rng.choice([i for i, it in enumerate(self.items)
                                          if (it.width, it.height) == size]))
        return batch


def lr_factor(updates: int, cfg: TrainConfig) -> float:
    """The learning rate of the next optimizer step, as a fraction of `lr`, after `updates` steps
    (LambdaLR's counter: skipped non-finite steps do not advance it). Linear warm-up to 1 over
    `warmup_steps`, then `lr_schedule`: constant, or a cosine / linear decay that reaches 0 where the
    step after the last one would be (the last step still learns; the usual convention, e.g.
    transformers' get_cosine_schedule_with_warmup)."""
    if updates < cfg.warmup_steps:
        return (updates + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    done = min((updates - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        if params[0].device.type != "cuda":
            raise UserError("optimizer = 'adamw8bit' (bitsandbytes) needs a CUDA GPU; use optimizer = 'adamw' on CPU.")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("optimizer = 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, "
                            "or set optimizer = 'adamw'.") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def warn_if_it_will_not_fit(cfg: TrainConfig, device: torch.device, console) -> None:
    """Before anything loads: the planner's prediction (plan.py: within 1% of the H100 measurements at
    micro_batch 1, scaled linearly above it) against this card's memory."""
    from . import plan

    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    # plan the path route_fused_linears will route the 8-bit layers to on this GPU, not the one the
    # config alone suggests (Triton may not compile for it: kernels.utils.NO_MMA)
    cfg = dataclasses.replace(cfg, kernels="on" if use_fused_linear(device, cfg.kernels) else "off")
    try:
        p = plan.plan_from_config(cfg, budget_gib=plan.budget_for(total))
    except UserError:
        return  # a checkpoint the planner does not know: nothing to predict
    if not p.fits():
        console.print(f"[yellow]warning:[/] the planner predicts a peak of {p.peak_gib:.1f} GiB on this "
                      f"{total:.0f} GiB card; this run will probably run out of memory. "
                      f"`lowvram-dopsd plan` with the same settings suggests what to lower.")


def prepare_output(path: str) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"Cannot write to the output folder '{out}' ({exc.strerror or exc}). "
                        "Pass --output with a folder you can write to.") from exc
    return out


def run_identity(family: Family, ds: data.Dataset, teacher: str, cfg: TrainConfig) -> dict[str, str]:
    """What a checkpoint must find again to be resumed (checkpoint.check_compatible)."""
    return {"model": checkpoint.model_identity(family.model_dir, family.name, family.transformer_file),
            "dataset": checkpoint.digest(ds.identity()),
            "conditions": checkpoint.digest([family.encoder_identity("student", cfg),
                                             family.encoder_identity(teacher, cfg)])}


class GracefulStop:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current step, save, stop. A second one: stop at once.

    SIGTERM is what `kill PID`, `docker stop`, systemd and a cluster scheduler's preemption or time
    limit send before they kill: the run then leaves a checkpoint of the step it was in instead of
    losing the steps since the last periodic one (`save_every` = 250: 35 min at the H100's 8.3 s/step)."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, note: Callable[[str], None]):
        self.note, self.requested, self.previous = note, False, {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        name = self.SIGNALS[signum]
        self.note(f"[yellow]{name}:[/] finishing this step, then saving a checkpoint ({name} again quits at once).")

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, self.DEFAULTS[signum] if handler is None else handler)  # None: set outside Python
        self.previous = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def oom_advice(cfg: TrainConfig, preset: str) -> str:
    """The memory levers this config has not pulled yet, most effective first."""
    levers = []
    if preset != "16gb" and cfg.quant == "none":
        levers.append("--preset 16gb (8-bit base, 8-bit AdamW)")
    if cfg.quant == "none":
        levers.append("--quant qint8 (halves the frozen base)")
    if not cfg.grad_checkpointing:
        levers.append("--set grad_checkpointing=true")
    if cfg.optimizer == "adamw":
        levers.append("--optimizer adamw8bit")
    if cfg.micro_batch > 1:
        levers.append("--micro-batch 1 (batch_size is kept through accumulation)")
    if cfg.resolution > 512:
        levers.append(f"--resolution {max(512, cfg.resolution - 256)}")
    if cfg.rank > 16:
        levers.append(f"--rank {cfg.rank // 2} (and --alpha {cfg.alpha / 2:g} to keep the scale)")
    if cfg.preview_every:
        levers.append("--preview-every 0")
    return ", ".join(levers) if levers else "a smaller resolution or rank; close other programs using the GPU"


def shorter_run_advice(cfg: TrainConfig, rollout_steps: int) -> str:
    """What shortens a run, for the note a long one gets after its first steps (progress.LONG_RUN_S)."""
    levers = ["fewer --steps (the previews show when your subject has come through; Ctrl-C saves)"]
    trained = cfg.train_states or rollout_steps
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


# Consecutive non-finite steps before the run stops: one bad roll-out can be bad luck (an fp16
# overflow at one state); five in a row means the settings diverge, and each costs a full step.
MAX_SKIPPED_IN_A_ROW = 5


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN: metrics.jsonl stays readable by any tool


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


@contextmanager
def explain_oom(cfg: TrainConfig, preset: str, doing: str, on_oom: Callable[[], str] = lambda: ""):
    """Turn a CUDA out-of-memory error into a UserError that names the settings to lower."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kept = on_oom()
        raise UserError(f"The GPU ran out of memory while {doing}. {kept}Lower the memory use and run again: "
                        f"{oom_advice(cfg, preset)}. `lowvram-dopsd plan` with the same settings shows where "
                        "the memory goes.") from exc


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler, lora: DualLoRA,
                   cfg: TrainConfig, loss: float) -> tuple[bool, float]:
    """Clip, step the student LoRA, then its EMA into the teacher; returns (updated, gradient norm).

    One NaN/inf update would make the LoRA, its EMA teacher and every later checkpoint NaN for good:
    such a step changes nothing (optimizer, schedule, EMA); the loop stops a run that keeps making them.
    """
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf))
    update = math.isfinite(loss) and math.isfinite(grad_norm)
    if update:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if update:
        lora.ema_update(cfg.ema_decay)
    return update, grad_norm


# ---------------------------------------------------------------------------------------------
# 3. The run
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a run leaves in memory (tests compare it with the saved file through diffusers)."""

    lora_path: Path
    family: Family
    model: torch.nn.Module
    lora: DualLoRA
    cache: FeatureCache
    step: int = 0                     # the last step trained
    stopped: bool = False             # Ctrl-C / SIGTERM: stopped before cfg.steps, resumable
    checkpoint: Path | None = None    # the last checkpoint written


def train(cfg: TrainConfig, preset: str = "", console=None, resume: str | None = None,
          command: list[str] | None = None) -> TrainResult:
    """Train (or, with `resume` = "latest" or a path, continue) a run.

    `command`: the command line that started it, without --resume (printed as the way to resume).
    """
    return _train(cfg, preset, console, resume, command)


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

    why = why_not(device)
    if fused or device.type != "cuda" or cfg.quant not in QUANTO or not why:
        return ""
    if too_old(device):  # nothing to install, and the H100's 1.2x says nothing about this GPU
        return f"the 8-bit layers run on quanto's dequantise + matmul: the fused kernel does not run here ({why})."
    fix = f" {MIN_TRITON_TEXT} enables it." if TRITON_MISSING else ""  # else `why` names the fix
    return (f"the 8-bit layers run on quanto's dequantise + matmul, not the fused kernel ({why}): "
            f"~1.2x slower per layer (benchmarks/results/kernels-h100.md), same results.{fix}")


def route_fused_linears(lora: DualLoRA, cfg: TrainConfig, device: torch.device) -> int:
    """Put the 8-bit LoRA layers on the fused Triton LoRA linear (on CUDA unless kernels = "off";
    quant.py says why), with int8 activations if asked for; returns how many."""
    check_act_quant(cfg, device)
    on_route = use_fused_linear(device, cfg.kernels) or cfg.act_quant != "off"
    return lora.enable_fused_kernels(cfg.act_quant, cfg.kernels) if on_route else 0


# What the run prints and writes around the loop
def run_header(cfg: TrainConfig, preset: str, family: Family, ds: data.Dataset, teacher: str, rollout_steps: int,
               lr: float, device: torch.device, notes: dict[str, str], out_dir: Path,
               ckpt: checkpoint.Checkpoint | None) -> dict[str, str]:
    """What the run is about to do, as the box printed before anything is loaded."""
    prior_weight = f"weight {cfg.prior_weight:g}" if cfg.prior_weight else "measured only (weight 0)"
    schedule = f" ({shape})" if (shape := lr_shape(cfg)) else ""
    return {
        "model": f"{cfg.model} ({family.name})"
                 + (f", transformer {family.transformer_file.name}" if family.transformer_file else ""),
        "preset": preset or "(none)",
        "dataset": f"{len(ds)} images from {ds.source}" + (f", {len(ds.skipped)} skipped" if ds.skipped else ""),
        "captions": ds.caption_rule,
        "method": f"teacher {teacher}, loss {cfg.loss}, {rollout_steps}-step roll-outs, "
                  f"{'all' if not cfg.train_states else cfg.train_states} states trained, EMA {cfg.ema_decay}"
                  + (f"; prior: {len(cfg.prior_prompts)} prompts, {prior_weight}" if cfg.prior_prompts else ""),
        **notes,
        "LoRA": f"rank {cfg.rank}, alpha {cfg.alpha:g}, "
                + (f"from {cfg.init_lora}" if cfg.init_lora else f"{cfg.lora_init} init")
                + f", lr {lr:g}{schedule}, batch {cfg.batch_size} "
                f"({cfg.micro_batch} x {cfg.grad_accum} accumulation), {cfg.steps} steps",
        "compute": f"{device} {cfg.dtype}, base quant {cfg.quant}"
                   + (" with int8 activations" if cfg.act_quant == "int8" else "")
                   + f", gradient checkpointing {'on' if cfg.grad_checkpointing else 'off'}"
                   + (", EMA teacher in host RAM" if cfg.teacher_ema_on == "cpu" else ""),
        "output": str(out_dir) + (f" (resuming {ckpt.path.name})" if ckpt else ""),
    }


def lr_shape(cfg: TrainConfig) -> str:
    """The schedule around the learning rate, e.g. "2-step warm-up, cosine decay"; '' when it is
    constant from step 1 (the run header and the LoRA's metadata)."""
    parts = ([f"{cfg.warmup_steps}-step warm-up"] if cfg.warmup_steps else []) + \
        ([f"{cfg.lr_schedule} decay"] if cfg.lr_schedule != "constant" else [])
    return ", ".join(parts)


def append_metrics(log, metrics: dict, last_ckpt: Path | None) -> None:
    """One line of metrics.jsonl, flushed: a reader (or a crash) sees every finished step."""
    try:
        log.write(json.dumps(metrics) + "\n")
        log.flush()
    except OSError as exc:  # a full disk, most likely: the next checkpoint would fail as well
        kept = (f"The last checkpoint ({last_ckpt}) is intact: free some space and run the same command "
                "with --resume." if last_ckpt else "No checkpoint was written yet: free some space and run again.")
        raise UserError(f"Could not append step {metrics['step']} to {log.name} ({exc.strerror or exc}). "
                        f"{kept}") from exc


def write_loras(out_dir: Path, lora: DualLoRA, meta: dict, dtype: torch.dtype, last_ckpt: Path | None) -> Path:
    """The student LoRA (the product) and the EMA teacher's, in the compute dtype; returns the student's path."""
    try:
        path = save_lora(out_dir / LORA_FILE, lora, "student", meta, dtype=dtype)
        save_lora(out_dir / checkpoint.TEACHER_FILE, lora, "teacher", meta, dtype=dtype)
    except OSError as exc:
        raise UserError(f"Could not write the LoRA to '{out_dir}' ({exc.strerror or exc}). The checkpoint "
                        f"{last_ckpt} holds it (fp32, loadable as is); free some space and run again with "
                        "--resume to write it.") from exc
    return path


def done_summary(out_dir: Path, path: Path, skipped: int, previews: bool) -> dict[str, str]:
    """The closing box of a finished run: where everything is."""
    return {
        "LoRA": str(path),
        **({"skipped updates": f"{skipped} (a non-finite loss or gradient; \"skipped\" in metrics.jsonl)"}
           if skipped else {}),
        "EMA teacher": str(out_dir / checkpoint.TEACHER_FILE),
        "metrics": str(out_dir / "metrics.jsonl"),
        **({"TensorBoard": str(out_dir / tracking.TB_DIR)} if (out_dir / tracking.TB_DIR).is_dir() else {}),
        **({"previews": str(out_dir / "previews")} if previews else {}),
    }


def model_for_metadata(model: str) -> str:
    """The base model as the LoRA records it: a local folder as its absolute path (`sample` reads it
    from any working directory), a Hugging Face id as typed."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def use_commands(cfg: TrainConfig, family: Family, out_dir: Path) -> dict[str, str]:
    """How to use the LoRA, printed under the closing box to be copied."""
    q, model = shlex.quote, model_for_metadata(cfg.model)
    if family.transformer_file:  # trained on a fine-tune's single file: the pipeline gets that transformer
        load = (f"from diffusers import {family.pipeline_class}, {family.transformer_class}; "
                f"t = {family.transformer_class}.from_single_file({str(family.transformer_file)!r}, config={model!r}, "
                f"subfolder='transformer'); pipe = {family.pipeline_class}.from_pretrained({model!r}, transformer=t); ")
    else:
        load = (f"from {family.pipeline_module} import {family.pipeline_class}; "
                f"pipe = {family.pipeline_class}.from_pretrained({model!r}); ")
    return {
        "load it": load + f"pipe.load_lora_weights({str(out_dir)!r})",
        **({"try it": f"lowvram-dopsd sample --lora {q(str(out_dir))} --prompt \"...\""}
           if family.in_diffusers else {}),
        **({"ComfyUI": f"lowvram-dopsd export --format comfyui {q(str(out_dir))}"} if family.name in LAYOUTS else {}),
    }


def read_init_lora(cfg: TrainConfig, family: Family) -> tuple[dict[str, torch.Tensor], Path]:
    """The LoRA a new run starts from (`init_lora`) and its file, read and checked before anything is
    encoded: its rank, alpha and layers must be this run's (DualLoRA.load checks the layers again, exactly,
    once the transformer is loaded; by then the conditions have been encoded)."""
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


def moved_by_archive(path: Path, out_dir: Path, archived: Path | None) -> Path:
    """Where a file of the earlier run in --output is after archive_previous_run moved it (an --init-lora
    from the same folder: the LoRA's metadata must name where it is now)."""
    try:
        inside = path.relative_to(out_dir.resolve())
    except ValueError:
        return path
    return archived / inside if archived is not None and (archived / inside).exists() else path


def check_device(cfg: TrainConfig, device: torch.device) -> None:
    """What this device cannot run, said before anything is read, encoded or moved aside."""
    if device.type == "cuda":
        return
    if cfg.device == "auto":  # a GPU preset (or none) on a machine whose torch sees no GPU
        raise UserError(
            f"PyTorch sees no CUDA GPU (torch {torch.__version__}), so device = 'auto' would train on the CPU: "
            f"hours per step at {cfg.resolution}² on the real models. Usually torch is a CPU-only build or the "
            "driver is missing: install a CUDA build (https://pytorch.org/get-started/locally/) and check "
            "`python -c \"import torch; print(torch.cuda.is_available())\"`. To train on the CPU anyway (the tiny "
            "demo models), pass --device cpu.")
    if cfg.optimizer == "adamw8bit":
        raise UserError("optimizer = 'adamw8bit' (bitsandbytes) needs a CUDA GPU; use --optimizer adamw on the CPU.")
    if cfg.kernels == "on":
        from .kernels.utils import kernels_available
        if not kernels_available(device):
            raise UserError("kernels = 'on' forces the Triton kernels, which run on a CUDA GPU (or, for tests, on "
                            "the CPU under TRITON_INTERPRET=1, very slowly). Use --kernels auto or off on the CPU.")


def _train(cfg: TrainConfig, preset: str, console, resume: str | None, command: list[str] | None) -> TrainResult:
    console = console or make_console()
    device = resolve_device(cfg.device)
    check_device(cfg, device)
    tracking.check(cfg.log_with)
    enc_device = device if cfg.encoders_on == "auto" else resolve_device(cfg.encoders_on)
    dtype = DTYPES[cfg.dtype]
    family = load_family(cfg.model, transformer_file=cfg.transformer_file)
    teacher = cfg.teacher or family.teachers[0]
    if teacher not in family.teachers:
        raise UserError(f"The {family.name} family supports the teacher kinds {', '.join(family.teachers)}; "
                        f"'{teacher}' is not one of them.")
    rollout_steps = cfg.rollout_steps or family.default_rollout_steps
    if cfg.train_states > rollout_steps:
        raise UserError(f"train_states ({cfg.train_states}) cannot exceed the {rollout_steps} roll-out steps.")
    lr = cfg.resolved_lr(family.default_lr)
    init, init_file = read_init_lora(cfg, family) if cfg.init_lora and resume is None else (None, None)
    ds = data.load(cfg.images, cfg.caption, cfg.trigger, cfg.resolution, cfg.on_bad_image)
    out_dir = prepare_output(cfg.output)
    identity = run_identity(family, ds, teacher, cfg)

    # A run continues from a checkpoint only if nothing that changes its math has changed.
    ckpt, remarks = None, []
    if resume is not None:
        ckpt = checkpoint.load(checkpoint.resolve(resume, out_dir))
        remarks = checkpoint.check_compatible(ckpt, cfg, identity)
    torch.manual_seed(cfg.seed)

    notes = family.run_notes(teacher, cfg)
    display = Display(console, cfg.steps, start_step=ckpt.step if ckpt else 0,
                      shorten=shorter_run_advice(cfg, rollout_steps))
    display.header(run_header(cfg, preset, family, ds, teacher, rollout_steps, lr, device, notes, out_dir, ckpt))
    if cfg.log_with == "tensorboard":
        display.commands({"watch it": f"tensorboard --logdir {shlex.quote(str(out_dir))}"})
    for path, why in ds.skipped:
        console.print(f"[yellow]skipped[/] {ds.name(path)}: {why}")
    for path, why in ds.warnings:
        console.print(f"[yellow]warning[/] {ds.name(path)}: {why}")
    for remark in remarks:
        console.print(f"[yellow]note[/] {remark}")
    for warning in family.prompt_warnings([it.caption for it in ds.items],
                                          [ds.name(it.image_path) for it in ds.items], teacher, cfg):
        console.print(f"[yellow]warning[/] {warning}")
    if device.type == "cuda":
        warn_if_it_will_not_fit(cfg, device, console)
        if note := emulated_bf16_note(cfg, device):
            console.print(f"[yellow]note[/] {note}")
    check_act_quant(cfg, device)

    # 1. conditions, then free the encoders before the transformer is loaded
    prompts = (cfg.preview_prompts or default_prompts([it.caption for it in ds.items], ds.triggers)) \
        if cfg.preview_every else []
    check_prior_prompts(cfg, ds.triggers)
    cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    t0 = time.perf_counter()
    with explain_oom(cfg, preset, "encoding the captions and images"):
        conds_s, conds_t, extra = precompute(family, ds, teacher, cfg, enc_device, cache,
                                             prompts + cfg.prior_prompts)
    conds_preview, conds_prior = extra[:len(prompts)], extra[len(prompts):]
    console.print(f"conditions: {cache.hits} cached, {cache.misses} encoded ({time.perf_counter() - t0:.1f}s)")

    # 2. one frozen base, two LoRA sets
    with explain_oom(cfg, preset, "loading the transformer"):
        model = family.load_transformer(cfg, device, dtype)
        lora = DualLoRA.attach(model, tuple(cfg.lora_targets) or family.lora_targets, cfg.rank, cfg.alpha,
                               seed=cfg.seed, init=cfg.lora_init)
        if init is not None:  # both sets start as it, as a fresh run's EMA teacher starts as its student
            lora.load("student", init)
            lora.load("teacher", init)
    fused = route_fused_linears(lora, cfg, device)
    if cfg.teacher_ema_on == "cpu":
        lora.keep_teacher_ema_on_cpu(dtype)
    params = lora.student_parameters()
    optimizer = make_optimizer(params, cfg, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda updates: lr_factor(updates, cfg))
    act = ", int8 activations" if cfg.act_quant == "int8" else ""
    console.print(f"LoRA: {len(lora.layers)} layers ({fused} on the fused 8-bit kernel{act}), "
                  f"{lora.num_parameters() / 1e6:.2f}M trainable parameters")
    if note := no_kernel_note(cfg, device, fused):
        console.print(f"[yellow]note[/] {note}")
    # A new run in a folder holding an earlier one moves that one aside, only now that everything
    # that can refuse this run has run: a bad setting or a broken download leaves the folder as it was.
    if ckpt is None and (archived := checkpoint.archive_previous_run(out_dir)):
        console.print(f"[yellow]note[/] '{out_dir}' held an earlier run: moved to {archived} "
                      "(use --resume to continue a run)")
        if init_file is not None and (moved := moved_by_archive(init_file, out_dir, archived)) != init_file:
            console.print(f"[yellow]note[/] the init LoRA was part of it: it is now {moved}")
            init_file = moved

    noise_gen = torch.Generator("cpu").manual_seed(cfg.seed)  # CPU noise: identical on every device
    rng = random.Random(cfg.seed)
    sampler = BucketSampler(ds.items, cfg.micro_batch, rng)
    start = 0
    if ckpt is not None:  # every piece of state the loop reads, exactly as it was after step ckpt.step
        lora.load("student", ckpt.student)
        lora.load("teacher", ckpt.teacher)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        sampler.order = ckpt.rng.restore(noise_gen, rng)
        start = ckpt.step
        checkpoint.trim_metrics(out_dir / "metrics.jsonl", start)
        console.print(f"resumed from {ckpt.path} at step {start}")
    info = {"base_model": model_for_metadata(cfg.model), "family": family.name, "teacher": teacher, "loss": cfg.loss,
            **({"transformer_file": str(family.transformer_file)} if family.transformer_file else {}),
            "caption_rule": ds.caption_rule, "trigger": ", ".join(ds.triggers), "rollout_steps": rollout_steps,
            "preset": preset, "lr": lr, "lora_init": cfg.lora_init, "ema_decay": cfg.ema_decay,
            **({"init_lora": str(init_file)} if init_file else
               {"init_lora": ckpt.info["init_lora"]} if ckpt and "init_lora" in ckpt.info else {}),  # resumed
            "resolution": cfg.resolution,
            **({"lr_schedule": schedule} if (schedule := lr_shape(cfg)) else {}),
            **({"prior_prompts": " | ".join(cfg.prior_prompts), "prior_weight": cfg.prior_weight}
               if cfg.prior_prompts else {}),
            **notes}

    previews = None
    if cfg.preview_every:
        by_caption = {it.caption: i for i, it in enumerate(ds.items)}
        previews = Previewer(family, model, lora, out_dir, prompts, conds_preview,
                             [conds_t[by_caption[p]] if cfg.preview_teacher and p in by_caption else None
                              for p in prompts],
                             cfg.resolution, cfg.resolution, cfg.preview_seed, device)

    def write_preview(step: int) -> None:
        try:
            with explain_oom(cfg, preset, "sampling a preview"):
                grid = previews.write(step)
            display.preview(grid)
            tracker.preview(step, grid)
        except (UserError, OSError) as exc:  # a preview is never worth the run (nor a full disk): say so, go on
            display.note(f"[yellow]preview skipped:[/] {exc}")

    def write_step_lora(step: int) -> None:
        """loras/step-NNNNNN.safetensors: the LoRA as it was at this step, kept to choose from later."""
        try:
            save_lora(out_dir / "loras" / f"step-{step:06d}.safetensors", lora, "student", {**info, "steps": step},
                      dtype=dtype)
        except OSError as exc:  # like a preview: the checkpoints still hold the run, go on
            display.note(f"[yellow]step LoRA skipped:[/] {exc.strerror or exc}")

    def save_checkpoint(step: int, rng_state: RNGState) -> Path:
        path = checkpoint.save(out_dir, step, lora, optimizer, scheduler, rng_state, cfg, identity, info,
                               cfg.keep_checkpoints)
        display.note(f"checkpoint: {path}")
        tracker.flush()  # TensorBoard then shows at least what a resume keeps
        return path

    def learn(height: int, width: int, c_s: list[Cond], c_t: list[Cond], weight: float,
              teacher: str | None = "teacher") -> list[float]:
        """One micro-batch: a roll-out from fresh noise at this size, `weight` × its mean loss back-propagated."""
        c_s, c_t = conds_on(c_s, device), conds_on(c_t, device)
        sigmas = family.sigmas(height, width, rollout_steps)
        x = torch.randn((len(c_s), *family.latent_shape(height, width)), generator=noise_gen,
                        dtype=torch.float32).to(device)
        k = cfg.train_states or rollout_steps
        trained = set(range(rollout_steps)) if k == rollout_steps else set(rng.sample(range(rollout_steps), k))
        losses, _ = rollout_and_learn(family, model, lora, x, sigmas, c_s, c_t, trained, cfg.loss,
                                      loss_scale=weight / len(trained), teacher=teacher, kernels=cfg.kernels)
        return losses

    last_ckpt, saved_step, step = (ckpt.path if ckpt else None), start, start
    skipped = skipped_in_a_row = 0  # updates skipped for a non-finite loss or gradient
    if start >= cfg.steps:
        console.print(f"[yellow]note[/] the checkpoint is already at step {start} = steps: nothing to train "
                      f"(pass --steps {start + 100} to train further); writing its LoRA.")

    tracker = tracking.Tracker(cfg.log_with, out_dir, start, {**cfg.to_dict(), **info}, display.note)
    with tracker, (out_dir / "metrics.jsonl").open("a", encoding="utf-8") as log, display, \
            GracefulStop(display.note) as stop:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if previews and start == 0 and not (out_dir / "previews" / "step-000000.png").exists():
            write_preview(0)  # the baseline: the base model before any training (not a resumed LoRA)
        for step in range(start + 1, cfg.steps + 1):
            t_step = time.perf_counter()
            at_start = RNGState.capture(noise_gen, rng, sampler.order)

            def save_before_this_step() -> str:  # weights and optimizer are still those of step - 1
                if step - 1 > saved_step:
                    return f"Saved the state before this step: {save_checkpoint(step - 1, at_start)}. "
                return f"The last checkpoint ({last_ckpt}) is intact. " if last_ckpt else ""

            with explain_oom(cfg, preset, f"training step {step}", on_oom=save_before_this_step):
                step_losses, prior_losses = [], []
                for _ in range(cfg.grad_accum):  # your images: the teacher reads each one
                    batch = sampler.next()
                    item = ds.items[batch[0]]
                    step_losses += learn(item.height, item.width, [conds_s[i] for i in batch],
                                         [conds_t[i] for i in batch], weight=1.0 / cfg.grad_accum)
                if conds_prior:  # a prompt without your subject: the target is the bare base model's
                    c = [conds_prior[rng.randrange(len(conds_prior))] for _ in range(cfg.micro_batch)]
                    prior_losses = learn(cfg.resolution, cfg.resolution, c, c, weight=cfg.prior_weight, teacher=None)
            loss = sum(step_losses) / len(step_losses)
            prior_loss = sum(prior_losses) / len(prior_losses) if prior_losses else 0.0
            step_lr = scheduler.get_last_lr()[0]  # this step's: after optimizer_step it is the next one's
            with explain_oom(cfg, preset, f"the optimizer step of step {step}"):
                update, grad_norm = optimizer_step(params, optimizer, scheduler, lora, cfg, loss + prior_loss)
            skipped += not update
            skipped_in_a_row = 0 if update else skipped_in_a_row + 1

            metrics = {"step": step, "loss": finite_or_none(loss),
                       **({"prior_loss": finite_or_none(prior_loss)} if prior_losses else {}),
                       "grad_norm": finite_or_none(grad_norm),
                       "lr": step_lr, "sec": round(time.perf_counter() - t_step, 4),
                       **({} if update else {"skipped": True})}
            if device.type == "cuda":
                metrics["vram_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            append_metrics(log, metrics, last_ckpt)
            tracker.step(metrics)
            display.step(step, metrics)

            diverged = skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested or diverged:
                last_ckpt = save_checkpoint(step, RNGState.capture(noise_gen, rng, sampler.order))
                saved_step = step
            if cfg.lora_every and step % cfg.lora_every == 0:  # the last step too: a resumed run goes on past it
                write_step_lora(step)
            if stop.requested or diverged:
                break
            if previews and (step % cfg.preview_every == 0 or step == cfg.steps):
                write_preview(step)

    path = write_loras(out_dir, lora, {**info, "steps": step}, dtype, last_ckpt)
    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:  # the loop stopped on it
        raise UserError(
            f"Steps {step - skipped_in_a_row + 1}-{step} all gave a non-finite loss or gradient (NaN or inf; "
            f"metrics.jsonl marks them \"skipped\"). None of them changed the LoRA: the LoRA so far ({path}) and "
            f"the checkpoint {last_ckpt} hold it as trained up to step {step - skipped_in_a_row}, and are finite. "
            f"Change what overflows and run again: {nonfinite_advice(cfg, lr)}.")
    stopped = step < cfg.steps
    if stopped:
        again = shlex.join([*command, "--resume"]) if command else "the same command with --resume"
        display.header({"stopped at": f"step {step} of {cfg.steps}", "checkpoint": str(last_ckpt),
                        "LoRA so far": str(path)}, title="stopped")
        display.commands({"resume with": again})
    else:
        display.header(done_summary(out_dir, path, skipped, previews is not None), title="done")
        display.commands(use_commands(cfg, family, out_dir))
    return TrainResult(path, family, model, lora, cache, step=step, stopped=stopped, checkpoint=last_ckpt)
