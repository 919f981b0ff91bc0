"""D-OPSD training, top to bottom (paper §2.2, Algorithm 1; DESIGN.md "The algorithm").

    lowvram-dopsd train --preset 16gb --images ./my_dog --trigger "sks dog"

Read it in order:
  setup(cfg) -> Run       (1) the conditions, precomputed and cached: c_s, the caption as the pipeline
                          encodes it, and c_t, the teacher's (caption + image); one frozen, optionally
                          8-bit base carrying two LoRA sets, the student and its EMA teacher; the
                          optimizer, the sampler, the randomness. `--resume` restores all of it.
  train_step(run, batch)  (2) roll out the STUDENT (base + student LoRA, c_s) from noise with the model's
                          own few-step sampler: every visited state x_k is on-policy; (3) at a trained
                          state, v_T = f(x_k; base + EMA LoRA, c_t) without grad, v_S = f(x_k; base +
                          student LoRA, c_s) with grad, and the loss mean((v_S - v_T)²) (or its x0 form)
                          is back-propagated at once: the states are detached between steps, so one
                          state's activations are alive at a time (the authors keep all K); (4) the
                          optimizer step on the student LoRA; (5) its EMA into the teacher LoRA.
  train(cfg)              the loop: draw a batch, train_step, log; checkpoints every `save_every` steps,
                          previews every `preview_every`; Ctrl-C or SIGTERM: finish the step, save, stop.

Elsewhere: the Run and what it writes as it goes (run.py: metrics, checkpoints, previews, the LoRA
files), what a run prints and advises (advice.py), the checks that refuse a run before it loads
anything (preflight.py), the conditions (conditions.py), checkpoints and exact resume (checkpoint.py).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from . import accel, advice, checkpoint, data, distributed, full, optim, output, preflight, tracking
from .advice import explain_oom
from .cache import FeatureCache, default_cache_dir
from .conditions import conds_on, encode_conditions
from .config import TrainConfig
from .families import load_family
from .families.base import Cond, Family
from .guard import RunGuard
from .interrupt import GracefulStop
from .lora import DualLoRA
from .losses import dopsd_loss
from .preview import Previewer, default_prompts
from .progress import Display, make_console, styled
from .quant import use_fused_linear
from .run import Run, StepResult
from .runtime import DTYPES, peak_vram_gb, reset_peak_vram, resolve_device

# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
def setup(cfg: TrainConfig, preset: str = "", console=None, resume: str | None = None,
          command: list[str] | None = None, guard: RunGuard | None = None) -> Run:
    """Check, announce, encode the conditions, load the model and its LoRA sets, restore a checkpoint."""
    world = distributed.current()
    console = console or make_console(quiet=not world.main)
    device = resolve_device(cfg.device)
    preflight.check_device(cfg, device)
    tracking.check(cfg.log_with)
    family = load_family(cfg.model, transformer_file=cfg.transformer_file)
    teacher, rollout_steps, train_states = preflight.check_method(cfg, family)
    lr = preflight.learning_rate(cfg, family)
    init, init_file = preflight.read_init_lora(cfg, family) if cfg.init_lora and resume is None else (None, None)
    ds = data.load(cfg.images, cfg.caption, cfg.trigger, cfg.resolution, cfg.on_bad_image)
    out_dir = world.from_main(preflight.prepare_output, cfg.output)
    if guard is not None:  # train()'s: the output folder is this run's from here on (rank 0 holds the lock)
        guard.claim(out_dir, console.print)
    identity = checkpoint.run_identity(family, ds, teacher, cfg)
    world.agree(checkpoint.shared_facts(cfg, identity, resume))  # every rank the same run, before any compute
    # A run continues from a checkpoint only if nothing that changes its math has changed.
    store = checkpoints_of(cfg)
    ckpt = world.from_main(store.load_resume, resume, out_dir) if resume is not None else None
    remarks = checkpoint.check_compatible(ckpt, cfg, identity) if ckpt else []
    torch.manual_seed(cfg.seed)

    notes = family.run_notes(teacher, cfg)
    display = Display(console, cfg.steps, start_step=ckpt.step if ckpt else 0,
                      shorten=advice.shorter_run_advice(cfg, rollout_steps, train_states), batch=cfg.batch_size)
    display.header(advice.run_header(cfg, preset, family, ds, teacher, (rollout_steps, train_states), lr, device,
                                     notes, out_dir, ckpt))
    advice.print_run_notes(console, display, cfg, family, ds, teacher, remarks, device, out_dir)
    preflight.check_act_quant(cfg, device)

    # (1) the conditions, then free the encoders before the transformer is loaded
    prompts = (cfg.preview_prompts or default_prompts([it.caption for it in ds.items], ds.triggers)) \
        if cfg.preview_every else []
    preflight.check_prior_prompts(cfg, ds.triggers)
    cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    t0 = time.perf_counter()
    enc_device = device if cfg.encoders_on == "auto" else resolve_device(cfg.encoders_on)
    with explain_oom(cfg, preset, "encoding the captions and images"):
        conds = world.from_main(encode_conditions, family, ds, teacher, cfg, enc_device, cache, prompts, console.print)
    console.print(f"conditions: {cache.hits} cached, {cache.misses} encoded ({time.perf_counter() - t0:.1f}s)")

    # one frozen base and two LoRA sets (full mode: two sharded transformers), the optimizer of the student's
    dtype = DTYPES[cfg.dtype]
    model, lora, optimizer = build_weights(cfg, preset, family, device, init, lr, console, conds, ds)
    params = lora.student_parameters()
    scheduler = optim.make_scheduler(optimizer, cfg)
    # A new run in a folder holding an earlier one moves that one aside, only now that everything
    # that can refuse this run has run: a bad setting or a broken download leaves the folder as it was.
    if ckpt is None and world.main and (archived := checkpoint.archive_previous_run(out_dir)):
        init_file = advice.note_archived(console, out_dir, archived, init_file)

    rng, noise_gen = random.Random(cfg.seed), torch.Generator("cpu").manual_seed(cfg.seed)
    sampler = data.BucketSampler(ds.items, cfg.micro_batch, rng)
    if ckpt is not None:
        store.restore(ckpt, lora, optimizer, scheduler, sampler, noise_gen, rng, out_dir)
        console.print(f"resumed from {ckpt.path} at step {ckpt.step}")
    start = ckpt.step if ckpt else 0
    init_lora = str(init_file) if init_file else ckpt.info.get("init_lora") if ckpt else None
    info = output.run_info(cfg, preset, family, teacher, rollout_steps, lr, ds, init_lora)
    previews = Previewer.for_run(cfg, family, model, lora, out_dir, prompts, conds, ds, device, writes=world.main) \
        if cfg.preview_every and (world.main or cfg.train_mode == "full") else None  # full: every rank samples
    tracker = tracking.Tracker(cfg.log_with, out_dir, start, {**cfg.to_dict(), **info}, display.note)
    return Run(cfg=cfg, preset=preset, family=family, teacher=teacher, rollout_steps=rollout_steps,
               train_states=train_states, lr=lr,
               device=device, dtype=dtype, ds=ds, conds=conds, model=model, lora=lora, params=params,
               optimizer=optimizer, scheduler=scheduler, sampler=sampler, rng=rng, noise_gen=noise_gen,
               out_dir=out_dir, identity=identity, info=info, cache=cache, display=display, tracker=tracker,
               previews=previews, command=command, step=start, saved_step=start,
               last_ckpt=ckpt.path if ckpt else None, run_id=checkpoint.run_id_for(ckpt), world=world,
               store=store)


def checkpoints_of(cfg: TrainConfig):
    """The module that saves, loads and restores this run's checkpoints: checkpoint (a LoRA run's files) or
    full_io (a full fine-tune's shards, torch.distributed.checkpoint); both have save, load and restore."""
    if cfg.train_mode == "full":
        from . import full_io  # torch.distributed.checkpoint: imported by full fine-tunes only
        return full_io
    return checkpoint


def build_weights(cfg: TrainConfig, preset: str, family: Family, device: torch.device,
                  init: dict[str, torch.Tensor] | None, lr: float, console, conds, ds):
    """(model, weight sets, optimizer): the frozen base carrying the student and teacher LoRA sets, routed and
    sped up as the settings ask; or, train_mode = "full", the student and teacher transformers, sharded (full.py)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.train_mode == "full":
        with explain_oom(cfg, preset, "loading the transformer"):
            weights = full.FullWeights.load(family, cfg, device)
        console.print(full.summary(weights))
        advice.print_speed(console, cfg, device, {})  # the time note (no speed levers in full mode)
        return weights.model, weights, full.make_optimizer(weights, cfg, lr)
    model, lora = load_model(cfg, preset, family, device, dtype, init)
    fused = route_fused_linears(lora, cfg, device)
    if cfg.teacher_ema_on == "cpu":
        lora.keep_teacher_ema_on_cpu(dtype)
    optimizer = optim.make_optimizer(lora.student_parameters(), cfg, lr)
    advice.print_lora(console, cfg, lora, fused, device)
    advice.print_speed(console, cfg, device, accel.speed_up(cfg, preset, family, model, lora, conds, ds, device))
    return model, lora, optimizer


def load_model(cfg: TrainConfig, preset: str, family: Family, device: torch.device, dtype: torch.dtype,
               init: dict[str, torch.Tensor] | None) -> tuple[torch.nn.Module, DualLoRA]:
    """The frozen base with the student and teacher LoRA sets attached."""
    with explain_oom(cfg, preset, "loading the transformer"):
        model = family.load_transformer(cfg, device, dtype)
        lora = DualLoRA.attach(model, tuple(cfg.lora_targets) or family.lora_targets, cfg.rank, cfg.alpha,
                               seed=cfg.seed, init=cfg.lora_init)
        if init is not None:  # both sets start as it, as a fresh run's EMA teacher starts as its student
            lora.load("student", init)
            lora.load("teacher", init)
    return model, lora


def route_fused_linears(lora: DualLoRA, cfg: TrainConfig, device: torch.device) -> int:
    """Put the 8-bit LoRA layers on the fused Triton LoRA linear (on CUDA unless kernels = "off";
    quant.py says why), with int8 activations if asked for; returns how many."""
    preflight.check_act_quant(cfg, device)
    on_route = use_fused_linear(device, cfg.kernels) or cfg.act_quant != "off"
    return lora.enable_fused_kernels(cfg.act_quant, cfg.kernels) if on_route else 0


# ---------------------------------------------------------------------------------------------
# One train step (Algorithm 1)
# ---------------------------------------------------------------------------------------------
@dataclass
class RollOut:
    """One micro-batch of a step: len(c_s) roll-outs from fresh noise at one training size."""

    c_s: list[Cond]               # the student's conditions
    c_t: list[Cond]               # the target's conditions
    noise: torch.Tensor           # the initial state, [B, *latent_shape], float32, CPU
    height: int
    width: int
    trained: set[int]             # the roll-out steps that learn
    target: str | None            # the LoRA set of the target: "teacher" (EMA), None (the bare base)
    weight: float                 # this micro-batch's share of the step's loss


def draw_batch(run: Run) -> list[RollOut]:
    """This step's micro-batches and all their randomness, drawn in one fixed order."""
    cfg, batch = run.cfg, []
    # A full fine-tune's ranks must run the same passes in the same order (each one gathers the sharded weights):
    # its micro-batches train the same states, drawn once per step; a LoRA's draw theirs each.
    shared = _trained(run) if cfg.train_mode == "full" else None
    for _ in range(cfg.grad_accum):  # your images: the teacher reads each one
        idx = run.sampler.next()
        item = run.ds.items[idx[0]]
        c_s, c_t = zip(*(run.conds.pair(i, run.rng) for i in idx))  # one caption of each: its variants
        batch.append(_draw(run, item.height, item.width, list(c_s), list(c_t), "teacher", 1.0 / cfg.grad_accum,
                           shared))
    if run.conds.prior:  # prompts without your subject: the target is the bare base model's
        c = [run.conds.prior[run.rng.randrange(len(run.conds.prior))] for _ in range(cfg.micro_batch)]
        batch.append(_draw(run, cfg.resolution, cfg.resolution, c, c, None, cfg.prior_weight))
    return batch


def _draw(run: Run, height: int, width: int, c_s: list[Cond], c_t: list[Cond], target: str | None,
          weight: float, trained: set[int] | None = None) -> RollOut:
    noise = torch.randn((len(c_s), *run.family.latent_shape(height, width)), generator=run.noise_gen,
                        dtype=torch.float32)
    return RollOut(c_s, c_t, noise, height, width, _trained(run) if trained is None else trained, target, weight)


def _trained(run: Run) -> set[int]:
    """The states of a roll-out that learn: all of them, or `train_states` of them at random."""
    k, steps = run.train_states, range(run.rollout_steps)
    return set(steps) if k == run.rollout_steps else set(run.rng.sample(steps, k))


def train_step(run: Run, batch: list[RollOut]) -> StepResult:
    """One optimizer step of Algorithm 1 over this step's micro-batches."""
    losses: dict[str | None, list[float]] = {"teacher": [], None: []}
    for r in run.world.mine(batch):  # this rank's share of the micro-batches
        # (2) + (3): the student's roll-out; at each trained state the target's and the student's
        # velocities, the loss and its backward (the gradients add up in the student LoRA)
        losses[r.target] += rollout_and_learn(
            run.family, run.model, run.lora, r.noise.to(run.device),
            run.family.sigmas(r.height, r.width, run.rollout_steps), conds_on(r.c_s, run.device),
            conds_on(r.c_t, run.device), r.trained, run.cfg.loss, loss_scale=r.weight / len(r.trained),
            teacher=r.target, kernels=run.cfg.kernels)[0]
    loss, prior_loss = run.world.means(losses["teacher"], losses[None])  # over every rank's roll-outs
    lr = run.scheduler.get_last_lr()[0]
    # (4) the optimizer step on the student LoRA's gradient summed over the ranks (none if it is not finite)
    with explain_oom(run.cfg, run.preset, f"the optimizer step of step {run.step + 1}"):
        if run.cfg.train_mode == "lora":  # a full fine-tune's FSDP summed each backward's (reduce-scatter)
            run.world.sum_grads(run.params)
        updated, grad_norm = optim.optimizer_step(run.params, run.optimizer, run.scheduler, run.cfg.max_grad_norm,
                                            loss + (prior_loss or 0.0))
    # (5) the EMA of the student LoRA into the teacher LoRA
    if updated:
        run.lora.ema_update(run.cfg.ema_decay)
    return StepResult(loss, prior_loss, lr, updated, grad_norm)


def rollout_and_learn(family: Family, model: torch.nn.Module, lora: DualLoRA, x: torch.Tensor,
                      sigmas: torch.Tensor, c_s: list[Cond], c_t: list[Cond], trained: set[int],
                      loss_kind: str, loss_scale: float, teacher: str | None = "teacher", kernels: str = "auto"
                      ) -> tuple[list[float], torch.Tensor]:
    """Roll out from noise `x`; at each step in `trained`, back-propagate `loss_scale * loss` at once.

    `teacher`: the LoRA set the target is computed with ("teacher" = the EMA teacher; None = the bare
    base model, for the prior roll-outs). `loss_scale = 0` measures only: no graph, no backward.
    `kernels`: the run's `kernels` setting, the loss kernel's dispatch rule (kernels.utils).
    Returns the per-trained-step losses and the final latents.
    """
    # Nothing in the loop waits for the GPU: the schedule goes to the device once and the losses are
    # read after the last state, so the host queues the next pass while the GPU runs this one.
    sigmas = sigmas.to(x.device, non_blocking=True)
    losses = []
    for k in range(len(sigmas) - 1):
        sigma = sigmas[k]
        if k in trained:
            with torch.no_grad(), lora.use(teacher):
                v_t = family.velocity(model, x, sigma, c_t, sigma_next=sigmas[k + 1])
            with lora.use("student"), torch.set_grad_enabled(loss_scale != 0):
                v_s = family.velocity(model, x, sigma, c_s, sigma_next=sigmas[k + 1])
                loss = dopsd_loss(loss_kind, v_s, v_t, sigma, kernels)
                # Backward inside the student context: gradient checkpointing re-runs the forward
                # during backward, and that re-run must see the same LoRA set.
                if loss_scale != 0:
                    (loss * loss_scale).backward()
            losses.append(loss.detach())
            v = v_s.detach()
        else:
            with torch.no_grad(), lora.use("student"):
                v = family.velocity(model, x, sigma, c_s, sigma_next=sigmas[k + 1])
        x = x + (sigmas[k + 1] - sigma) * v  # the pipeline's Euler step (FlowMatchEulerDiscreteScheduler)
    return (torch.stack(losses).tolist() if losses else []), x


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, preset: str = "", console=None, resume: str | None = None,
          command: list[str] | None = None) -> Run:
    """Train (or, with `resume` = "latest" or a path, continue) a run; returns it, done or stopped.
    `command`: the command line that started it, without --resume (printed as the way to resume)."""
    with RunGuard(command, resume) as guard:  # the output folder's lock; a stop at once says what is left
        run = guard.run = setup(cfg, preset, console, resume, command, guard)
        with run.tracker, output.metrics_log(run.out_dir, run.world.main) as log, run.display, \
                GracefulStop(run.display.note) as stop:
            reset_peak_vram(run.device)
            run.write_baseline_preview()
            for step in range(run.step + 1, cfg.steps + 1):
                t0, at_start = time.perf_counter(), run.rng_state()
                with explain_oom(cfg, preset, f"training step {step}", on_oom=partial(run.save_before, step, at_start)):
                    result = train_step(run, draw_batch(run))
                run.step = step
                stopping, vram = run.world.step_end(stop.requested, peak_vram_gb(run.device))  # the same on all ranks
                run.log_step(log, result, time.perf_counter() - t0, vram)
                if step % cfg.save_every == 0 or step == cfg.steps or stopping or run.diverged:
                    run.save_checkpoint(step)
                if cfg.lora_every and step % cfg.lora_every == 0:  # the last step too: a resume goes on past it
                    run.write_step_lora(step)
                if stopping or run.diverged:
                    break
                if run.previews and (step % cfg.preview_every == 0 or step == cfg.steps):
                    run.write_preview(step)
        return run.finish()
