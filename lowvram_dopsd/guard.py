"""A training run from its first check to its last write: what `train.train` holds around it all.

    with RunGuard(command, resume) as guard:
        out_dir = guard.claim(out_dir, note)    # the output folder's lock (runlock.py), from here to the end
        guard.run = ...                         # once built: what a stop at once reports
        ...

- The lock is released however the run ends: finished, stopped, an error, Ctrl-C, SIGTERM.
- SIGTERM outside the training loop (start-up, the last writes), where GracefulStop does not take it,
  stops the run at once like Ctrl-C instead of killing the process, so the lock is released and the
  user told. Inside the loop GracefulStop takes the first signal and hands a second one back to these.
- A run stopped at once ends with `Stopped`, exit code 128 + the signal (errors.py), whose message says
  what was kept and what to run next: the last checkpoint and the command that resumes it, or that
  nothing of the run was saved and the same command starts it again.
"""
from __future__ import annotations

import shlex
import signal
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import runlock
from .errors import EXIT_INTERRUPTED, Stopped
from .progress import Note, styled


def resume_command(command: list[str] | None, resume: str = "latest") -> str:
    """The command that continues a run: the one that started it, with --resume (PATH unless "latest")."""
    if not command:
        return "the same command with --resume"
    return shlex.join([*command, "--resume", *([resume] if resume != "latest" else [])])


class RunGuard:
    def __init__(self, command: list[str] | None, resume: str | None):
        self.command, self.resume = command, resume
        self.run: Any = None  # the train.Run, once setup() has built it
        self._held = ExitStack()

    def __enter__(self) -> RunGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            previous = signal.signal(signal.SIGTERM, self._terminated)
            self._held.callback(signal.signal, signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        return self

    @staticmethod
    def _terminated(signum, frame) -> None:
        raise Stopped("", 128 + signum)

    def claim(self, out_dir: Path, note: Note) -> Path:
        """Hold the output folder's lock until the run ends; a UserError naming the run that holds it."""
        typed = resume_command(self.command, self.resume) if self.resume else shlex.join(self.command or [])
        self._held.enter_context(runlock.hold(out_dir, typed or "lowvram-dopsd train",
                                              lambda text: note(styled("note:", text))))
        return out_dir

    def __exit__(self, kind, exc, tb) -> None:
        self._held.close()  # the lock released, SIGTERM's handler restored
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C (Python's own), or a Stopped from a signal
            raise Stopped(self.stopped_at_once(), getattr(exc, "exit_code", EXIT_INTERRUPTED)) from None

    def stopped_at_once(self) -> str:
        """What a run stopped at once leaves, and what to run next."""
        run = self.run
        when = "before training began" if run is None or run.step == 0 else f"after step {run.step}"
        if run is not None and run.last_ckpt is not None:
            return (f"Stopped at once {when}. The last checkpoint, {run.last_ckpt} (step {run.saved_step}), is intact; "
                    f"continue with: {resume_command(self.command)}")
        if self.resume:  # still starting: the checkpoint it was to resume from is untouched
            return (f"Stopped at once {when}; nothing was changed. Continue with the same command: "
                    f"{resume_command(self.command, self.resume)}")
        again = shlex.join(self.command) if self.command else "the same command"
        return f"Stopped at once {when}: no checkpoint of this run was saved, nothing to resume. Start it again: {again}"
