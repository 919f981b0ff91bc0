"""One training run: the state train.setup() builds and the loop advances, and what the run writes as
it goes (each step's metrics, checkpoints, step LoRAs, previews) and when it ends (the LoRA files, the
closing box and the commands to copy)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO

import torch

from . import advice, checkpoint, data, distributed, output, tracking
from .advice import explain_oom
from .cache import FeatureCache
from .checkpoint import RNGState
from .conditions import Conditions
from .config import TrainConfig
from .errors import UserError
from .families.base import Family
from .lora import DualLoRA
from .output import append_metrics, write_loras, write_step_lora
from .preview import Previewer
from .progress import Display, styled

# Consecutive non-finite steps before the run stops: one bad roll-out can be bad luck (an fp16
# overflow at one state); five in a row means the settings diverge, and each costs a full step.
MAX_SKIPPED_IN_A_ROW = 5


@dataclass
class StepResult:
    """What one train step reports."""

    loss: float                   # the D-OPSD loss on your images, mean over the trained states
    prior_loss: float | None      # the same on the prior prompts (None without them)
    lr: float                     # the learning rate this step used
    updated: bool                 # False: a non-finite loss or gradient, and nothing changed
    grad_norm: float


@dataclass
class Run:
    """One training run: what setup() builds, and the loop's place in it."""

    cfg: TrainConfig
    preset: str
    family: Family
    teacher: str                      # the teacher kind: "vlm" or "edit"
    rollout_steps: int
    train_states: int                 # the states of each roll-out that learn
    lr: float
    device: torch.device
    dtype: torch.dtype
    ds: data.Dataset
    conds: Conditions
    model: torch.nn.Module            # what computes: the frozen base, shared by student and teacher
    lora: DualLoRA                    # the weight sets: its two LoRA sets, "student" (trained) and "teacher" (EMA);
                                      # train_mode = "full": full.FullWeights, two sharded transformers
    params: list[torch.nn.Parameter]  # the student's (LoRA, or every weight)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: data.BucketSampler
    rng: random.Random                # the sampler's shuffles, the trained states, the prior prompts
    noise_gen: torch.Generator        # roll-out noise, on the CPU: the same on every device
    out_dir: Path
    identity: dict[str, str]          # what a resume must find again (checkpoint.check_compatible)
    info: dict                        # the facts every LoRA file of the run records
    cache: FeatureCache
    display: Display
    tracker: tracking.Tracker
    previews: Previewer | None
    command: list[str] | None         # the command line without --resume (said when the run stops)
    world: distributed.World          # this process's place in a torchrun job (rank 0 writes); alone: 0 of 1
    step: int = 0                     # the last step done
    last_ckpt: Path | None = None
    saved_step: int = 0
    skipped: int = 0                  # updates skipped for a non-finite loss or gradient
    skipped_in_a_row: int = 0
    lora_path: Path | None = None     # the LoRA file, once written
    run_id: str = ""                  # what its checkpoints carry: rotation deletes only the run's own
    store: ModuleType = checkpoint    # saves and restores its checkpoints: checkpoint, or full_io (full mode)

    @property
    def stopped(self) -> bool:        # by Ctrl-C or SIGTERM before `steps`, with a checkpoint: resumable
        return self.step < self.cfg.steps

    @property
    def diverged(self) -> bool:       # too many non-finite steps in a row: the loop stops
        return self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW

    def rng_state(self) -> RNGState:
        return RNGState.capture(self.noise_gen, self.rng, self.sampler.order)

    # ----- as it goes
    def log_step(self, log: IO[str], result: StepResult, sec: float, vram: list[float]) -> None:
        """One step's numbers: metrics.jsonl (the record), TensorBoard, the live line (`vram`: each rank's
        peak GPU memory)."""
        self.skipped += not result.updated
        self.skipped_in_a_row = 0 if result.updated else self.skipped_in_a_row + 1
        finite = advice.finite_or_none
        metrics = {"step": self.step, "loss": finite(result.loss),
                   **({"prior_loss": finite(result.prior_loss)} if result.prior_loss is not None else {}),
                   "grad_norm": finite(result.grad_norm), "lr": result.lr, "sec": round(sec, 4),
                   **({} if result.updated else {"skipped": True})}
        metrics.update(output.vram_metrics(vram))
        append_metrics(log, metrics, self.last_ckpt)
        self.tracker.step(metrics)
        self.display.step(self.step, metrics)

    def save_checkpoint(self, step: int, rng_state: RNGState | None = None) -> Path:
        """Checkpoint `step` (with the randomness as it is now, or as `rng_state` captured it). In a torchrun
        job rank 0 writes it, once every rank has shown it holds the same LoRA sets and randomness; a full
        fine-tune's ranks each write their shards of it."""
        rng_state = rng_state or self.rng_state()
        if self.cfg.train_mode == "lora":
            self.world.check_same(f"step {step}", checkpoint.shared_state(self.lora, rng_state))
        if self.world.main or self.cfg.train_mode == "full":
            self.last_ckpt = self.store.save(self.out_dir, step, self.lora, self.optimizer, self.scheduler, rng_state,
                                             self.cfg, self.identity, self.info, self.cfg.keep_checkpoints, self.run_id)
        else:  # rank 0 writes it; every rank names it when it stops (guard.RunGuard's message, an error)
            self.last_ckpt = checkpoint.step_dir(self.out_dir, step)
        self.saved_step = step
        self.display.note(f"checkpoint: {self.last_ckpt}")
        self.tracker.flush()  # TensorBoard then shows at least what a resume keeps
        return self.last_ckpt

    def save_before(self, step: int, at_start: RNGState) -> str:
        """After a failed `step`: save the state before it (the LoRA and optimizer are still step - 1's)."""
        if step - 1 > self.saved_step and self.world.size == 1:  # a job's ranks cannot all save now
            return f"Saved the state before this step: {self.save_checkpoint(step - 1, at_start)}. "
        return f"The last checkpoint ({self.last_ckpt}) is intact. " if self.last_ckpt else ""

    def write_step_lora(self, step: int) -> None:
        if self.world.main:
            write_step_lora(self.out_dir, self.lora, {**self.info, "steps": step}, self.dtype, self.display.note)

    def write_baseline_preview(self) -> None:
        """Step 0's grid, the base model before any training, unless the folder has it (a run resumed at step 0).
        A full fine-tune's ranks all sample it, so rank 0 decides for all: it may have just moved an earlier
        run's previews aside (checkpoint.archive_previous_run), and a rank that still saw them would skip the
        samples whose collectives rank 0 waits in."""
        if not self.previews or self.step:
            return
        path = self.out_dir / "previews" / "step-000000.png"
        there = self.world.from_main(path.exists) if self.cfg.train_mode == "full" else path.exists()
        if not there:
            self.write_preview(0)

    def write_preview(self, step: int) -> None:
        sampled = False
        try:
            with explain_oom(self.cfg, self.preset, "sampling a preview"):
                rows = self.previews.sample(step)
                sampled = True
                grid = self.previews.write(step, rows)
            if grid is None:  # another rank of a full fine-tune: it sampled with rank 0, which writes
                return
            self.display.preview(grid)
            self.tracker.preview(step, grid)
        except (UserError, OSError) as exc:  # a preview is never worth the run (nor a full disk): say so, go on
            if not sampled and self.cfg.train_mode == "full" and self.world.size > 1:
                raise  # but a rank of a full fine-tune cannot skip alone: the others wait in the samples' gathers
            self.display.note(styled("preview skipped:", str(exc)))

    # ----- at the end
    def finish(self) -> Run:
        """Write the LoRA files, say how the run ended and what to do next."""
        meta = {**self.info, "steps": self.step}
        if self.cfg.train_mode == "full":  # the transformer folder and its single file (every rank gathers);
            # stopped early, the checkpoint holds the weights (a model-sized write is not worth a stop)
            self.lora_path = path = self.last_ckpt if self.stopped or self.diverged else \
                self.store.write_transformer(self.out_dir, self.lora, self.family, self.dtype, meta,
                                             self.last_ckpt)
        else:  # rank 0 writes the files
            self.lora_path = path = write_loras(self.out_dir, self.lora, meta, self.dtype, self.last_ckpt) \
                if self.world.main else None
        if self.diverged:  # the loop stopped on it
            raise advice.diverged_error(self.cfg, self.lr, self.step, self.skipped_in_a_row, path, self.last_ckpt)
        if self.stopped:
            self.display.header({"stopped at": f"step {self.step} of {self.cfg.steps}",
                                 "checkpoint": str(self.last_ckpt),
                                 **({"LoRA so far": str(path)} if self.cfg.train_mode == "lora" else {})},
                                title="stopped")
            self.display.commands({"resume with": advice.resume_command(self.command)})
        elif self.cfg.train_mode == "full":
            single = self.store.single_file(self.out_dir)
            self.display.header(advice.full_done_summary(self.out_dir, path, single, self.last_ckpt, self.skipped,
                                                         self.previews is not None), title="done")
            self.display.commands(advice.full_use_commands(self.cfg, self.family, path, single))
        else:
            self.display.header(advice.done_summary(self.out_dir, path, self.skipped, self.previews is not None),
                                title="done")
            self.display.commands(advice.use_commands(self.cfg, self.family, self.out_dir))
        return self
