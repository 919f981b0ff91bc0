"""Experiment tracking beside metrics.jsonl: TensorBoard event files (`log_with = "tensorboard"`).

metrics.jsonl stays the record a resume trims and any tool can read; this only mirrors each step's
numbers and each preview grid into <output>/tensorboard, so runs can be watched and compared live
(`tensorboard --logdir <output>`) as in the other trainers. A resumed run tells TensorBoard to drop
what the stopped run logged after its checkpoint (the steps it re-does), as trim_metrics does for
metrics.jsonl.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import UserError
from .progress import Note, styled

TB_DIR = "tensorboard"  # under --output; moved aside with the rest of a run (checkpoint.RUN_FILES)

# metrics.jsonl key -> TensorBoard tag (grouped as TensorBoard's scalar tab shows them)
SCALARS = {"loss": "loss/train", "prior_loss": "loss/prior", "grad_norm": "train/grad_norm", "lr": "train/lr",
           "sec": "speed/sec_per_step", "vram_gb": "memory/peak_vram_gb"}


def check(log_with: str) -> None:
    """Said before anything is loaded: a run that would fail to log after its model loads is minutes lost."""
    if log_with == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError as exc:
            raise UserError(f"log_with = 'tensorboard' needs the tensorboard package ({exc}). Install it with "
                            "`pip install tensorboard` (or `pip install 'lowvram-dopsd[tensorboard]'`), or set "
                            "log_with = 'none' to log to metrics.jsonl only.") from exc


class Tracker:
    """Mirrors the training loop's metrics and previews to TensorBoard when asked to; does nothing
    otherwise (so the loop calls it unconditionally). Use as a context manager: the files are flushed
    and closed however the loop ends (done, Ctrl-C, a crash). A write that fails (a full disk) stops
    this log with a `note`, not the run: metrics.jsonl, the record, has its own full-disk stop."""

    def __init__(self, log_with: str, out_dir: Path, start_step: int, settings: dict, note: Note):
        self.writer, self.note = None, note
        if log_with != "tensorboard":
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
        def write():
            for key, tag in SCALARS.items():
                if metrics.get(key) is not None:  # a skipped step's loss is None (NaN): left out, not plotted as 0
                    self.writer.add_scalar(tag, metrics[key], metrics["step"])
        self._guarded(write)

    def preview(self, step: int, path: Path) -> None:
        def write():
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self.writer.add_image("previews", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self._guarded(write)

    def flush(self) -> None:
        """Called with each checkpoint: what TensorBoard shows is then at least what a resume keeps."""
        self._guarded(lambda: self.writer.flush())

    def _guarded(self, write: Callable[[], None]) -> None:
        if self.writer is None:
            return
        try:
            write()
        except OSError as exc:
            # Not closed: closing waits on its writer thread, which may be the one that failed.
            self.writer = None
            self.note(styled("TensorBoard log stopped:", f"{exc.strerror or exc} (metrics.jsonl goes on)"))

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self._guarded(lambda: self.writer.close())
