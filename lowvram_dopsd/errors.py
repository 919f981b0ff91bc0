"""One exception type for mistakes a user can fix, and the exit codes every command returns.

Exit codes (a job script or scheduler reads these; under torchrun every rank returns the same one):
    0    finished: every step trained, the LoRA written (or: the command did what it was asked)
    1    a bug: an unexpected error with its traceback (please report it)
    2    something to fix first (UserError): bad input or settings, the output folder in use by another
         run, a full disk, CUDA out of memory, a loss that stays NaN; the message says what to do
    3    `plan`: the run is predicted not to fit the card's memory
    69   (a torchrun job) another rank is gone without a word: killed (kill -9, the host's out-of-memory
         killer) or its node lost; every rank stops, the message names it, the last checkpoint is intact
         and --resume continues from it (EX_UNAVAILABLE of sysexits.h). A rank that fails with one of the
         other codes makes every rank exit with that code.
    75   stopped by Ctrl-C or SIGTERM after saving a checkpoint: resumable, the same command with --resume
         continues it exactly (EX_TEMPFAIL of sysexits.h: "try again later")
    130  stopped at once by Ctrl-C (143: by SIGTERM) before anything new was saved; the message says
         whether an earlier checkpoint of the run is there to resume from (128 + the signal's number,
         what a shell reports for a process killed by that signal)
"""

EXIT_FINISHED, EXIT_BUG, EXIT_USER_ERROR, EXIT_PLAN_DOES_NOT_FIT = 0, 1, 2, 3
EXIT_STOPPED = 75
EXIT_RANK_LOST = 69
EXIT_INTERRUPTED = 130  # 128 + SIGINT; 128 + SIGTERM = 143


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do. Exit code 2."""

    exit_code = EXIT_USER_ERROR


class Stopped(KeyboardInterrupt):
    """A stop at once (a second Ctrl-C, or a signal before training began), with what it leaves behind.
    A KeyboardInterrupt, so that nothing that catches errors swallows it; exit code 128 + the signal."""

    def __init__(self, message: str, exit_code: int = EXIT_INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code


def quote(text: str) -> str:
    """The user's text in a message: in single quotes, exactly as typed. Unlike repr(), a backslash or a quote
    stays one character (a Windows path, "it's"); only what would break the line (a newline, a tab, other
    unprintable characters) is shown as its escape, so the message stays one paragraph."""
    return "'" + "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text) + "'"
