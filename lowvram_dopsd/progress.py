"""What the user sees: a header, a live progress line, a summary. Plain lines when not on a TTY.

Commands to copy (resume, load, sample, export) are printed under the boxes, one line each.
The live line (Rich, on a terminal) shows step, loss (and its running average), learning rate,
s/it, peak VRAM, the last preview's file and the ETA. Without a terminal (CI, `nohup`, a log
file) the same numbers are printed as one plain line at the first and last step and every
`PLAIN_EVERY_S` seconds in between; notes (checkpoints, previews) are printed as they happen.
"""
from __future__ import annotations

import codecs
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

Note = Callable[[str | Text], None]  # where a module says something during a run: Display.note


PLAIN_EVERY_S = 10.0
# A run that will take longer than this at the pace of its first steps is told once what shortens it:
# at the paper's settings Z-Image takes 8.6 h on an H100, and consumer cards have a sixth (RTX 4090)
# to about a twentieth (RTX 4060 Ti) of its bf16 tensor rate (README "How long will it take?").
LONG_RUN_S = 12 * 3600
# The pace is read off steps 2 and 3: the first one also compiles and autotunes the Triton kernels (7-25 s).
PACE_STEPS = 3


def make_console(quiet: bool = False) -> Console:
    """Every console of ours prints text exactly as given: no Rich markup (a caption's "[trigger]", a dataset
    file's "[[folders]]" or a path like "shots [v2]" would lose its brackets, and "[/]" in a path would raise),
    no ":emoji:" codes, no highlighting. Colour comes only from `styled` labels (Text), never from parsing
    what is printed, so nothing needs escaping. `quiet`: prints nothing (the ranks of a torchrun job other
    than rank 0, which speaks for the job)."""
    return _plain(stderr=False, quiet=quiet)


def error_console() -> Console:
    """Where the CLI prints an error: stderr, printed like `make_console`'s."""
    return _plain(stderr=True)


def _plain(stderr: bool, quiet: bool = False) -> Console:
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=False, quiet=quiet)


def program() -> list[str]:
    """How to run this tool again, as the first words of a command printed to be copied: `lowvram-dopsd`
    where that name finds this very program on PATH (or when Python code called us); else the path it was
    started by (scripts/demo.sh runs .venv/bin/lowvram-dopsd, which a fresh shell does not find), or
    `python -m lowvram_dopsd` with this Python."""
    started = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if started.name == "__main__.py" and started.parent.name == "lowvram_dopsd":
        return [sys.executable, "-m", "lowvram_dopsd"]
    if started.name != "lowvram-dopsd":
        return ["lowvram-dopsd"]
    found = shutil.which("lowvram-dopsd")
    if found and os.path.realpath(found) == os.path.realpath(started):
        return ["lowvram-dopsd"]
    return [os.path.abspath(started)]


def styled(label: str, text: str = "", style: str = "yellow") -> Text:
    """`label` in `style`, then `text` verbatim: "warning:" + a message that may hold any characters."""
    return Text.assemble((label, style), (" " + text) if text else "")


def _as_typed(exc: UnicodeError) -> tuple[str | bytes, int]:
    """Encoding errors when printing: a file name's undecodable bytes (Python holds them as surrogates)
    are written back as those bytes, as typed; a character the terminal's encoding lacks as \\uXXXX."""
    chunk = exc.object[exc.start:exc.end]
    if all("\udc80" <= c <= "\udcff" for c in chunk):
        return bytes(ord(c) - 0xDC00 for c in chunk), exc.end
    return chunk.encode("ascii", "backslashreplace").decode("ascii"), exc.end


codecs.register_error("lowvram_dopsd.as_typed", _as_typed)


def safe_streams() -> None:
    """stdout and stderr never fail on a character (an emoji in a caption on a Latin-1 terminal, a file
    name that is not UTF-8): a message about the user's text must not become a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="lowvram_dopsd.as_typed")
        except (AttributeError, ValueError):  # not a text stream we can reconfigure (replaced by a caller)
            pass


class Display:
    def __init__(self, console: Console, total_steps: int, start_step: int = 0, shorten: str = "", batch: int = 0):
        """`shorten`: what would shorten this run, said if it will take over LONG_RUN_S ("" = never);
        `batch`: roll-outs per step, all processes' together (shown as the run's throughput; 0: not shown)."""
        self.console, self.shorten, self.batch = console, shorten, batch
        self.first_secs: list[float] = []
        self.live = console.is_terminal and sys.stdout.isatty()
        self.total, self.start = total_steps, start_step
        self.t0 = time.perf_counter()
        self.last_plain = 0.0
        self.busy = 0.0
        self.smoothed: float | None = None
        self.last_preview: Path | None = None
        self.progress = None
        if self.live:
            self.progress = Progress(
                TextColumn("step", style="bold", markup=False), MofNCompleteColumn(), BarColumn(bar_width=30),
                TextColumn("{task.fields[stats]}", markup=False), TimeRemainingColumn(), console=console,
                transient=False)

    def header(self, rows: dict[str, str], title: str = "lowvram-dopsd train") -> None:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for k, v in rows.items():
            table.add_row(k, Text(v))  # plain text: captions like "[trigger]" are not markup
        self.console.print(Panel(table, title=Text(title), expand=False))

    def commands(self, rows: dict[str, str]) -> None:
        """Commands to copy, printed under a box one per line, never wrapped or cut: inside the box a
        long command would be broken over lines with the border in between, and a path longer than its
        column cut short with an ellipsis."""
        width = max(map(len, rows)) + 2
        for name, command in rows.items():
            self.console.print(Text.assemble((f"{name}:".ljust(width), "bold cyan"), command), soft_wrap=True)

    def __enter__(self) -> "Display":
        if self.progress:
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, stats="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.__exit__(*exc)

    def step(self, step: int, metrics: dict[str, float | None]) -> None:
        loss = metrics["loss"]
        if metrics.get("skipped"):
            self.note(styled(f"step {step}:", "the loss or a gradient is not finite (NaN or inf); this update "
                                                "was skipped"))
        if loss is not None:
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        done = step - self.start
        self.busy += metrics.get("sec", 0.0)  # the steps' own time: not model loading nor previews
        if done <= PACE_STEPS:
            self.first_secs.append(metrics.get("sec", 0.0))
            if done == PACE_STEPS:
                self._long_run_note(step)
        spi = (self.busy or time.perf_counter() - self.t0) / max(done, 1)
        eta = spi * (self.total - step)
        avg = "-" if self.smoothed is None else f"{self.smoothed:.4g}"
        stats = f"loss {'nan' if loss is None else f'{loss:.4g}'} (avg {avg})  lr {metrics['lr']:.2e}  {spi:.2f} s/it"
        if self.batch:
            stats += f"  {self.batch / spi:.3g} roll-outs/s"
        if metrics.get("vram_gb_ranks"):  # a torchrun job: each rank's peak
            stats += f"  peak {' | '.join(f'{v:.1f}' for v in metrics['vram_gb_ranks'])} GB"
        elif metrics.get("vram_gb"):
            stats += f"  peak {metrics['vram_gb']:.1f} GB"
        if self.last_preview is not None:
            stats += f"  preview {self.last_preview.name}"
        if self.progress:
            self.progress.update(self.task, completed=step, stats=stats)
        elif time.perf_counter() - self.last_plain > PLAIN_EVERY_S or step in (self.start + 1, self.total):
            self.last_plain = time.perf_counter()
            self.console.print(f"step {step}/{self.total}  {stats}  eta {eta / 60:.1f} min", soft_wrap=True)

    def _long_run_note(self, step: int) -> None:
        pace, steps = sum(self.first_secs[1:]) / (len(self.first_secs) - 1), self.total - step
        if self.shorten and pace * steps > LONG_RUN_S:
            left = f"{steps} steps left take" if steps != 1 else "step left takes"
            self.note(styled("note:", f"at {pace:.3g} s per step, the {left} about {pace * steps / 3600:.0f} h. "
                                      f"What shortens it: {self.shorten} (README: \"How long will it take?\")."))

    def note(self, text: str | Text) -> None:
        """A line above the live one: plain text as given, or a `styled` one."""
        (self.progress.console if self.progress else self.console).print(text)

    def preview(self, path: Path) -> None:
        self.last_preview = Path(path)
        self.note(f"preview: {path}")
