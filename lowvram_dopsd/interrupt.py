"""Ctrl-C and SIGTERM during training: finish the step, save, stop (GracefulStop)."""
from __future__ import annotations

import signal
import threading

from .progress import Note, styled


class GracefulStop:
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current step, save, stop. A second one: stop at once.

    SIGTERM is what `kill PID`, `docker stop`, systemd and a cluster scheduler's preemption or time
    limit send before they kill: the run then leaves a checkpoint of the step it was in instead of
    losing the steps since the last periodic one (at the paper's settings, hours of work)."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self, note: Note):
        self.note, self.requested, self.previous = note, False, {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second: stop at once, as the handler outside the loop does (guard.RunGuard's)
            self._restore()
            outside = signal.getsignal(signum)
            if callable(outside):
                outside(signum, frame)
            raise KeyboardInterrupt
        self.requested = True
        name = self.SIGNALS[signum]
        self.note(styled(f"{name}:", f"finishing this step, then saving a checkpoint ({name} again quits at once)."))

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
