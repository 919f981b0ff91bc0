"""Experiment tracking beside metrics.jsonl: TensorBoard (`log_with = "tensorboard"`) or Weights & Biases
(`log_with = "wandb"`).

metrics.jsonl stays the record a resume trims and any tool can read; this only mirrors each step's
numbers and each preview grid, so runs can be watched and compared live as in the other trainers: into
<output>/tensorboard (`tensorboard --logdir <output>`), or into a W&B run (its files in <output>/wandb;
WANDB_MODE=offline keeps it on disk for `wandb sync`). A resumed run tells TensorBoard to drop what the
stopped run logged after its checkpoint (the steps it re-does), as trim_metrics does for metrics.jsonl;
it continues the same W&B run (its id is kept in <output>/wandb), where the re-done steps are logged again
beside the first ones (W&B cannot drop them). In a torchrun job rank 0 alone logs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import distributed
from .errors import UserError
from .progress import Note, styled

TB_DIR = "tensorboard"  # under --output; moved aside with the rest of a run (checkpoint.RUN_FILES)
WANDB_DIR = "wandb"     # the same, for W&B's files and the run's id
WANDB_ID_FILE = "lowvram-dopsd-run-id"

# metrics.jsonl key -> TensorBoard tag (grouped as TensorBoard's scalar tab shows them); W&B uses the same
SCALARS = {"loss": "loss/train", "prior_loss": "loss/prior", "grad_norm": "train/grad_norm", "lr": "train/lr",
           "sec": "speed/sec_per_step", "vram_gb": "memory/peak_vram_gb"}
NEEDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check(log_with: str) -> None:
    """Said before anything is loaded: a run that would fail to log after its model loads is minutes lost."""
    if log_with not in NEEDS:
        return
    module, package = NEEDS[log_with]
    try:
        __import__(module)
    except ImportError as exc:
        raise UserError(f"log_with = '{log_with}' needs the {package} package ({exc}). Install it with "
                        f"`pip install {package}` (or `pip install 'lowvram-dopsd[{package}]'`), or set "
                        "log_with = 'none' to log to metrics.jsonl only.") from exc


class WandbWriter:
    """The few SummaryWriter calls the Tracker makes, sent to a W&B run. Its x axis is our step (a W&B
    run's own step only grows, and a resumed run logs the steps after its checkpoint again)."""

    def __init__(self, out_dir: Path, start_step: int, settings: dict):
        import wandb

        root = Path(out_dir) / WANDB_DIR
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else None  # None: a new run
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lowvram-dopsd", id=run_id,
                              resume="allow", dir=str(out_dir), name=Path(out_dir).resolve().name, config=settings)
        id_file.write_text(self.run.id)
        self.run.define_metric("*", step_metric="step")

    def add_scalars_of(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "step": step})

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        self.run.log({tag: self.wandb.Image(image), "step": step})

    def flush(self) -> None:
        pass  # W&B sends (or, offline, writes) as it goes

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Mirrors the training loop's metrics and previews to TensorBoard or W&B when asked to; does nothing
    otherwise (so the loop calls it unconditionally). Use as a context manager: the files are flushed
    and closed however the loop ends (done, Ctrl-C, a crash). A write that fails (a full disk) stops
    this log with a `note`, not the run: metrics.jsonl, the record, has its own full-disk stop."""

    def __init__(self, log_with: str, out_dir: Path, start_step: int, settings: dict, note: Note):
        self.writer, self.note, self.name = None, note, {"tensorboard": "TensorBoard", "wandb": "W&B"}.get(log_with)
        if log_with == "none" or not distributed.current().main:  # a torchrun job: rank 0 logs
            return
        if log_with == "wandb":
            self.writer = WandbWriter(out_dir, start_step, settings)
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard discards the events at steps >= it that an earlier writer of this folder
        # left, i.e. those a crashed or stopped run logged after the checkpoint this run resumes from.
        # Its default loader (the Rust data server) and EventAccumulator do; checked by hand on 2.21,
        # its old Python loader (--load_fast=false) still shows both copies of those steps.
        self.writer = SummaryWriter(str(Path(out_dir) / TB_DIR), purge_step=start_step + 1 if start_step else None)
        if not start_step:  # the run's settings, once, as a two-column table in the Text tab
            rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in settings.items())
            self.writer.add_text("run", "| setting | value |\n| --- | --- |\n" + rows, 0)

    def step(self, metrics: dict) -> None:
        # a skipped step's loss is None (NaN): left out, not plotted as 0
        values = {tag: metrics[key] for key, tag in SCALARS.items() if metrics.get(key) is not None}

        def write():
            if isinstance(self.writer, WandbWriter):
                self.writer.add_scalars_of(metrics["step"], values)
            else:
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, metrics["step"])
        self._guarded(write)

    def preview(self, step: int, path: Path) -> None:
        def write():
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self.writer.add_image("previews", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self._guarded(write)

    def flush(self) -> None:
        """Called with each checkpoint: what the log shows is then at least what a resume keeps."""
        self._guarded(lambda: self.writer.flush())

    def _guarded(self, write: Callable[[], None]) -> None:
        if self.writer is None:
            return
        try:
            write()
        except Exception as exc:  # a full disk (OSError), W&B's own errors: the log stops, never the run
            # Not closed: closing waits on its writer thread, which may be the one that failed.
            self.writer = None
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.note(styled(f"{self.name} log stopped:", f"{why} (metrics.jsonl goes on)"))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self._guarded(lambda: self.writer.close())
