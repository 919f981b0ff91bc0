"""One output folder, one run: a lock held for the run's whole life (train and resume).

    with hold(out_dir, command):    # UserError (exit 2) naming the other run if one holds the folder
        ...                         # released on every way out Python sees: the end, an error, Ctrl-C

Two runs in one folder (easy: the default --output is `out`) would each move the other's files aside,
rotate away the other's checkpoints and leave one run's metrics beside the other's LoRA. So a run
takes `<output>/.lowvram-dopsd.lock` before it reads or moves anything in the folder: a JSON record of
who holds it (PID, host, start time, command, torchrun job) under an advisory OS lock (`flock`),
kept open until the run ends, when the record is deleted.

A run killed without a chance to clean up (kill -9, a crash, the machine switched off) leaves the
record behind, but not the OS lock: the kernel drops that with the process. The next run then finds
an unlocked record and checks it:
- same host: the recorded PID no longer runs (or runs another program: its start time differs, PID
  reuse) -> the lock is taken over with a note;
- another host (a shared file system, a job rescheduled on another node): that host's processes
  cannot be seen from here, so the holder refreshes the file's modification time every HEARTBEAT_S;
  a record silent for STALE_AFTER_S is taken over, a fresher one refused with the file to delete if
  that run is known to be gone.
Where the file system has no `flock` (some network mounts; Windows, where it is not tested), the
record alone decides by the same rules.

torchrun: one job is one run. Only rank 0 takes the lock (`hold(..., rank=...)`, default: the RANK
that torchrun sets); the job must share rank 0's outcome (a broadcast), so that every rank of a job
refused here exits with the same code.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the record alone decides
    fcntl = None

LOCK_FILE = ".lowvram-dopsd.lock"
HEARTBEAT_S = 60.0
# A record from another host silent this long is a dead run's: five missed heartbeats, so a paused
# NFS mount or a suspended laptop does not hand a live run's folder to another.
STALE_AFTER_S = 5 * HEARTBEAT_S


@dataclass
class Holder:
    """Who holds a folder: what the lock file records."""

    pid: int
    host: str
    started: float                  # time.time() when the lock was taken
    command: str                    # the command line, shell-quoted
    process_start: str = ""         # the PID's start time as the OS tells it (Linux), to tell PID reuse
    torchrun: dict = field(default_factory=dict)  # {"job": TORCHELASTIC_RUN_ID, "world_size": N} under torchrun

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = (f" (torchrun job {self.torchrun.get('job')}, {self.torchrun.get('world_size')} processes; rank 0)"
               if self.torchrun else "")
        return f"PID {self.pid} on {self.host}{job}, started {when}: {self.command}"


def _process_start(pid: int) -> str:
    """The start time of a process (Linux: /proc, in clock ticks since boot, with the boot's id); ''
    elsewhere. A PID reused by a later process has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22; the name before ')' may hold spaces


def pid_runs(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_runs(holder: Holder, mtime: float, locked: bool | None, now: float | None = None) -> bool:
    """Whether the run a lock record names may still be running, for a record found unlocked (`locked`:
    True, we hold the OS lock now; None, the file system has none). See the module docstring."""
    if holder.host != socket.gethostname():
        return (now or time.time()) - mtime < STALE_AFTER_S
    if holder.pid == os.getpid():  # this process wrote it: a lock not released, or (no flock) held right now
        return locked is None
    if not pid_runs(holder.pid):
        return False
    return not holder.process_start or holder.process_start == _process_start(holder.pid)


def _read(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):  # empty (just created, or being written), or not ours
        return None


def _try_lock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


class RunLock:
    """The lock of one output folder, held by this process (see `hold`)."""

    def __init__(self, out_dir: Path, command: list[str] | str, note: Callable[[str], None] = print):
        self.path = Path(out_dir) / LOCK_FILE
        self.command = command if isinstance(command, str) else shlex.join(command)
        self.note, self.fd = note, None
        self.holder: Holder | None = None
        self._stop = threading.Event()

    def acquire(self) -> "RunLock":
        for _ in range(50):  # a run that releases the lock meanwhile deletes the file: open the new one
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"Cannot write to the output folder '{self.path.parent}' ({exc.strerror or exc}). "
                                "Pass --output with a folder you can write to.") from exc
            try:
                if self._acquire(fd):
                    self.fd = fd
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            time.sleep(0.01)
        else:
            raise UserError(f"Could not take the lock file '{self.path}': it keeps being replaced. Is a program "
                            "starting runs in this output folder in a loop?")
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock heartbeat", daemon=True)
        self._beat.start()
        return self

    def _acquire(self, fd: int) -> bool:
        """Lock the open file `fd`, or raise the UserError naming who holds it; False: try again."""
        locked = _try_lock(fd)
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released (deleted) between our open and our lock
            return False
        other = _read(fd)
        if locked is False:
            for _ in range(20):  # the holder may be between creating the file and writing its record
                if other is not None:
                    break
                time.sleep(0.05)
                other = _read(fd)
            raise self._busy(other, alive_for_sure=True)
        if other is not None and holder_runs(other, os.fstat(fd).st_mtime, locked):
            raise self._busy(other, alive_for_sure=False)
        if other is not None:
            self.note(f"the output folder was locked by a run that is no longer running ({other.describe()}); "
                      "this run takes it over.")
        self.holder = Holder(pid=os.getpid(), host=socket.gethostname(), started=time.time(), command=self.command,
                             process_start=_process_start(os.getpid()),
                             torchrun={"job": os.environ.get("TORCHELASTIC_RUN_ID", "none"),
                                       "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
                             if "TORCHELASTIC_RUN_ID" in os.environ else {})
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(asdict(self.holder), indent=1).encode())
        os.fsync(fd)
        return True

    def _busy(self, other: Holder | None, alive_for_sure: bool) -> UserError:
        folder = self.path.parent
        if other is None:
            who = "another process (its lock record cannot be read)"
        else:
            who = f"another run: {other.describe()}"
        remote = other is not None and other.host != socket.gethostname() and not alive_for_sure
        if remote:
            silent = time.time() - os.stat(self.path).st_mtime
            then = (f"This machine cannot see {other.host}'s processes; that run last showed it is alive "
                    f"{silent:.0f} s ago. If it is not running any more (its machine was switched off, its job "
                    f"killed), delete '{self.path}', or wait: a lock silent for {STALE_AFTER_S / 60:.0f} minutes "
                    "is taken over. ")
        else:
            stop = f"`kill {other.pid}`" if other is not None else "`kill PID`"
            then = (f"Wait for it to end, or stop it (Ctrl-C in its terminal, or {stop}: it saves a checkpoint "
                    "to continue from with --resume). ")
        return UserError(f"The output folder '{folder}' is in use by {who}. Two runs in one folder would overwrite "
                         f"each other's checkpoints and LoRA. {then}To train something else meanwhile, pass another "
                         "--output.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the folder gone or read-only for a moment: the next beat
                pass

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        self._beat.join()  # no beat after the release
        try:
            ours = os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            ours = False  # the folder is gone: nothing left to delete
        if os.name == "nt":
            os.close(self.fd)  # Windows deletes no open file
        try:
            if ours:  # deleted under the lock: a waiter that opened it sees it gone and opens the next one
                self.path.unlink()
        except OSError:
            pass  # a read-only folder now: the next run finds the record of a PID that no longer runs
        if os.name != "nt":
            os.close(self.fd)  # drops the flock
        self.fd = None


def process_rank() -> int:
    """This process's rank in a torchrun job (RANK), 0 alone."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def hold(out_dir: Path, command: list[str] | str, note: Callable[[str], None] = print,
         rank: int | None = None) -> Iterator[RunLock | None]:
    """Hold the output folder's lock for the `with` block (rank 0 of a torchrun job only: None elsewhere)."""
    if (process_rank() if rank is None else rank) != 0:
        yield None
        return
    lock = RunLock(out_dir, command, note).acquire()
    try:
        yield lock
    finally:
        lock.release()
