"""Several processes, one run: the process group torchrun starts, and what data parallelism needs of it.

    torchrun --nproc_per_node 4 -m lowvram_dopsd train --preset 24gb --images ./my_dog
    lowvram-dopsd train --gpus 4 ...          # the same on this node: hands the command over to torchrun

torchrun starts the processes and their rendezvous (multi-node included); `launched()` joins them into
one process group (NCCL for CUDA tensors, gloo for CPU ones) and `current()` says who is who. Nothing
here knows about training; FSDP (issue #35) can build on the same group. What the trainer gets:

- `World`: rank, size, local rank; rank 0 (`main`) is the one that writes files and prints;
- `World.share`: which of a step's micro-batches this rank rolls out;
- collectives: `sum_grads` (the LoRA gradients, summed in flat buckets), `means` and `step_end`
  (a step's losses, stop request and peak memory across ranks), `from_main` (a value made on rank 0,
  such as the conditions or a checkpoint, sent to the others: no shared filesystem needed);
- agreement: `agree` stops every rank before any compute if they run different code, packages,
  settings or data; `check_same` stops them if their LoRA sets or randomness ever drift apart;
- faults: a `Watchdog` thread stops every rank within seconds when another is gone (kill -9, out of
  memory, a crash), naming it, instead of leaving them in a collective until its timeout.

Why one all-reduce of the summed gradients and not DDP: a D-OPSD step back-propagates once per trained
state of every micro-batch (a dozen backward passes a step), through one module whose LoRA set is
switched between teacher and student passes, with gradient checkpointing re-running forwards. DDP would
all-reduce at every backward unless each but the last ran under `no_sync()`, and it would wrap the module
the teacher passes also go through. The gradient is wanted once per optimizer step, after the last
micro-batch: summing it then, in a few flat buckets, is exactly that, with no wrapper. DDP's overlap of
communication with the backward has little to hide here: one sum per step of several roll-outs.
Buckets rather than one all-reduce per tensor: NCCL pays a launch and a latency per call (Z-Image: 476
tensors). Measured on the CPU only, where the three ways were within noise:
benchmarks/results/allreduce-cpu-x86_64-2proc.md (bench_allreduce.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_RANK_LOST, UserError

T = TypeVar("T")

# Gradients are summed in flat buckets of at most this size: one all-reduce per bucket and one bucket
# of extra memory (Z-Image's rank-64 LoRA, 0.64 GB of fp32 gradients, takes 20; DDP's bucket is 25 MB).
BUCKET_BYTES = 32 * 2**20
# A collective's own timeout, for a live rank that hangs. The others wait in one while rank 0 encodes the
# conditions (minutes for a VLM on a small card) or samples a preview; a dead rank is the watchdog's.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
BEAT_S = 1.0         # each rank says it is alive this often
DEAD_AFTER_S = 20.0  # a rank on another host not heard from for this long is gone (one on this host: at once)
# Packages whose versions change results: every rank must run the same ones.
PACKAGES = ("torch", "diffusers", "transformers", "peft", "safetensors", "triton", "bitsandbytes",
            "optimum-quanto")


# ---------------------------------------------------------------------------------------------
# who is who, and the collectives
# ---------------------------------------------------------------------------------------------
@dataclass
class World:
    """This process's place in the job; every method is a no-op (no collective) for a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    watchdog: "Watchdog | None" = None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes the run's files and prints."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """The indices of this rank's items among `n` (a step's micro-batches): contiguous, as even as
        possible, the remainder going to the last ranks (rank 0 also writes the files and previews)."""
        base, extra = divmod(n, self.size)
        first_extra = self.size - extra
        start = self.rank * base + max(0, self.rank - first_extra)
        return range(start, start + base + (self.rank >= first_extra))

    def mine(self, items: list[T]) -> list[T]:
        return [items[i] for i in self.share(len(items))]

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank's gradients of `params` summed, on every rank (the micro-batches' losses are already
        weighted by their share of the global batch, so the sum is the one process's gradient)."""
        if self.size == 1:
            return
        for p in params:
            if p.grad is None:  # a rank that back-propagated nothing still adds its zeros
                p.grad = torch.zeros_like(p)
        sum_in_buckets([p.grad for p in params])

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64, on the CPU: gloo)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def means(self, *groups: list[float]) -> list[float | None]:
        """The mean of each group of values over every rank's (None where no rank has one)."""
        if self.size == 1:
            return [sum(g) / len(g) if g else None for g in groups]
        totals = self.sum([x for g in groups for x in (sum(g), len(g))])
        return [s / n if n else None for s, n in zip(totals[0::2], totals[1::2])]

    def step_end(self, stop: bool, vram_gb: float | None) -> tuple[bool, list[float]]:
        """After a step: whether any rank was asked to stop (Ctrl-C or SIGTERM reach the ranks at slightly
        different moments; all stop after the same step), and each rank's peak GPU memory."""
        if self.size == 1:
            return stop, [] if vram_gb is None else [vram_gb]
        t = torch.tensor([float(stop), -1.0 if vram_gb is None else vram_gb], dtype=torch.float64)
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t)
        return any(o[0] > 0 for o in out), [o[1].item() for o in out if o[1] >= 0]

    def gather(self, obj: T) -> list[T]:
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` run on rank 0 alone, its result sent to every rank (which wait for it)."""
        if self.size == 1:
            return fn(*args, **kwargs)
        box = [fn(*args, **kwargs) if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    # ----- what a job can run
    def check_job(self, device: str, micro_batches: int, micro_batch: int = 1) -> None:
        """Refuse a device or a batch this job cannot run, before anything is loaded (`micro_batches` of
        `micro_batch` samples each a step)."""
        if self.size == 1:
            return
        if device not in ("auto", "cuda", "cpu"):
            raise UserError(f"device = {device!r}: in a job of {self.size} processes each one uses the GPU of its "
                            "local rank (rank 0 the first GPU of its node, ...). Leave device at 'auto' (or 'cuda') "
                            "and choose the GPUs with CUDA_VISIBLE_DEVICES.")
        here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", self.size)), torch.cuda.device_count()
        if device != "cpu" and torch.cuda.is_available() and here > gpus:
            raise UserError(f"{here} processes were started on this machine, but it has {gpus} GPU{'s' * (gpus > 1)} "
                            f"(CUDA_VISIBLE_DEVICES included): two processes would share one. Start {gpus} per "
                            f"machine (--gpus {gpus}, or torchrun --nproc-per-node {gpus}).")
        if micro_batches < self.size:
            raise UserError(
                f"This job has {self.size} processes but a step has only {micro_batches} micro-batches "
                f"(batch_size / micro_batch) to divide among them: {self.size - micro_batches} would idle. Raise "
                f"--batch-size to {self.size * micro_batch} or a multiple of it ({self.size} processes x micro_batch "
                f"{micro_batch}: the global batch, each process rolls out batch_size / {self.size}), lower "
                "--micro-batch, or start fewer processes.")

    def division_note(self, micro_batches: int) -> str:
        """'' when the step's micro-batches divide evenly among the ranks; else what the uneven split costs.
        An uneven split is run as it is: the global batch, and so the result, stay those of one process."""
        if self.size == 1 or micro_batches % self.size == 0:
            return ""
        few, many = micro_batches // self.size, micro_batches // self.size + 1
        busy = micro_batches / (many * self.size)
        return (f"{micro_batches} micro-batches per step do not divide evenly among {self.size} processes: "
                f"some roll out {many}, the others {few} and then wait, so the GPUs are busy {busy:.0%} of the time. "
                f"A batch_size that is a multiple of {self.size} x micro_batch uses them all.")

    # ----- agreement
    def agree(self, facts: dict[str, Any]) -> None:
        """Stop every rank, before anything is computed, unless all run the same code and packages and
        report the same `facts` (settings, the model's and the data's identities; a dict's items one by one)."""
        if self.size == 1:
            return
        flat = {f"{k} {sub}": v for k, d in facts.items() if isinstance(d, dict) for sub, v in d.items()}
        flat.update({k: v for k, v in facts.items() if not isinstance(v, dict)})
        mine = {**environment(), **{k: json.dumps(v, sort_keys=True, default=str) for k, v in flat.items()}}
        everyone = self.gather(mine)
        lines = []
        for r, theirs in enumerate(everyone[1:], start=1):
            differ = [k for k in mine if theirs.get(k) != everyone[0].get(k)]
            if differ:
                lines.append(f"rank {r} differs from rank 0 in " + "; ".join(
                    f"{k} ({_short(theirs.get(k))} vs {_short(everyone[0].get(k))})" for k in differ))
        if lines:
            raise UserError(
                f"The {self.size} processes of this job do not run the same training: {'. '.join(lines)}. Every "
                "rank must run the same lowvram-dopsd and packages, with the same command, model and images: "
                "install the same versions on every node (`lowvram-dopsd --version` on each), copy the same "
                "files, and start every node with the same command.")

    def check_same(self, what: str, values: dict[str, Any]) -> None:
        """Raise (a bug: exit 1) unless every rank holds bit for bit the same `values` (tensors, or any
        JSON-able value): the LoRA sets and randomness that rank 0 alone saves must be everyone's."""
        if self.size == 1:
            return
        mine = {k: fingerprint(v) for k, v in values.items()}
        everyone = self.gather(mine)
        differ = sorted({k for theirs in everyone for k in mine if theirs[k] != everyone[0][k]})
        if differ:
            ranks = [r for r, theirs in enumerate(everyone) if theirs != everyone[0]]
            raise RuntimeError(f"{what}: the ranks no longer hold the same {', '.join(differ)} (ranks {ranks} "
                               "differ from rank 0). This is a bug in lowvram-dopsd; please report it.")


def sum_in_buckets(tensors: list[torch.Tensor], bucket_bytes: int | None = None) -> None:
    """Each tensor summed over the group in place, consecutive tensors flattened together into buckets of
    at most `bucket_bytes` (BUCKET_BYTES): one all-reduce per bucket (benchmarks/bench_allreduce.py)."""
    limit = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    bucket: list[torch.Tensor] = []
    for g in tensors + [None]:
        if bucket and (g is None or g.dtype != bucket[0].dtype or g.device != bucket[0].device
                       or sum(b.nbytes for b in bucket) + g.nbytes > limit):
            _all_reduce(bucket)
            bucket = []
        if g is not None:
            bucket.append(g)


def _all_reduce(bucket: list[torch.Tensor]) -> None:
    if len(bucket) == 1:
        dist.all_reduce(bucket[0])
        return
    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat)
    for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
        g.copy_(part.view_as(g))


def _short(value: str | None, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fingerprint(value: Any) -> str:
    """sha256 of a value's exact bits: tensors byte for byte, lists and dicts item by item."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for item in v:
                feed(item)
            h.update(b"]")
        else:
            h.update(repr(v).encode())
    feed(value)
    return h.hexdigest()


def environment() -> dict[str, str]:
    """The code and the packages this process runs: what every rank must share."""
    return {"python": sys.version.split()[0], "code": code_digest(),
            **{f"package {name}": _version(name) for name in PACKAGES}}


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def code_digest() -> str:
    """sha256 of lowvram-dopsd's source files (the kernels' included): two checkouts at different
    commits, or one with local edits, differ."""
    roots = [Path(__file__).parent]
    spec = find_spec("lowvram_dopsd.kernels")
    roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    h = hashlib.sha256()
    for root in dict.fromkeys(roots):
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# joining and leaving the job
# ---------------------------------------------------------------------------------------------
_WORLD = World()


def current() -> World:
    """This process's world: the job's under torchrun (inside `launched()`), else a single process."""
    return _WORLD


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# A rank asked to stop (Ctrl-C, SIGTERM) finishes its step and rank 0 saves: torchrun's agent must wait
# that long before it kills them (its default, 30 s, is less than one step of the real models).
SHUTDOWN_TIMEOUT_S = 900


def hand_over_to_torchrun(processes: int, argv: list[str]) -> int:
    """`lowvram-dopsd train --gpus N ...`: run `torchrun --standalone --nproc-per-node N -m lowvram_dopsd
    train --gpus N ...` (one process per GPU of this node) in this process, and return the job's exit code.
    torchrun itself exits 1 with a traceback whenever a rank exits non-zero, a stopped run's 75 and a
    setting's 2 included; each rank has already said what happened, so this returns the code of the first
    rank to exit (a rank killed by a signal: 128 + the signal, as a shell says it)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    flags = ["--standalone", f"--nproc-per-node={processes}"]
    if "--shutdown-timeout" in parser._option_string_actions:  # newer torchruns (older: 30 s)
        flags.append(f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}")
    for name in list(logging.Logger.manager.loggerDict):  # torchrun's notes repeat what the ranks say (and
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):  # its OMP one: multi-gpu.md)
            logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.stdout.flush()
    try:
        run(parser.parse_args([*flags, "-m", "lowvram_dopsd", *argv]))
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code
    except SignalException as exc:  # Ctrl-C or SIGTERM to this process: torchrun stopped the ranks
        return 128 + int(exc.sigval)
    return 0


@contextmanager
def launched() -> Iterator[World]:
    """Inside the block this process is its rank of the torchrun job (nothing to do when it is not
    under torchrun; a job of one process joins its group too, so that its cost can be measured). The
    block's end waits for every rank, so that none reports success while rank 0 still writes the run's files. A rank that fails tells the others (its exit code and message) before
    it raises: they stop with the same code."""
    global _WORLD
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():  # torchrun sets it, at one process too
        yield _WORLD
        return
    rank, size, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = torch.cuda.is_available()
    if cuda and local < torch.cuda.device_count():  # more processes than GPUs: World.check_job refuses
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    watchdog = Watchdog(rank, size)
    _WORLD = World(rank, size, local, watchdog)
    watchdog.start()
    try:
        yield _WORLD
        ignore_stop_signals()
        _WORLD.barrier()
    except BaseException as exc:
        ignore_stop_signals()
        if isinstance(exc, RuntimeError) and not isinstance(exc, UserError):
            watchdog.await_verdict()  # a collective that failed because another rank is gone: say which
        watchdog.report(exit_code_of(exc), str(exc))
        if isinstance(exc, UserError) and rank and watchdog.main_said(str(exc)):
            exc.said_by_main = True  # every rank checked the same setting: say it once, not N times
        raise
    finally:
        watchdog.retire()
        _WORLD = World()
        dist.destroy_process_group()


def ignore_stop_signals() -> None:
    """Once this rank's run is over (done, stopped or failed) a Ctrl-C or SIGTERM has nothing left to stop.
    torchrun's agent sends SIGTERM to the ranks still running as soon as one exits with any code but 0 (a
    stopped run's 75, a failure): with Python's default that would kill this rank before it finishes
    writing the run's files, or before it says which rank failed, and its exit code would be -15."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def exit_code_of(exc: BaseException) -> int:
    if isinstance(exc, (UserError, KeyboardInterrupt)):
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)
    return EXIT_BUG


class Watchdog:
    """A thread that stops this process, naming the rank, when another rank of the job is gone.

    Every rank counts up its own key in the job's store (the one torchrun's agent serves) every BEAT_S.
    A rank on this host is gone as soon as its process is; one on another host when its count has not
    moved for DEAD_AFTER_S. A rank that fails in Python (out of memory, a setting, a bug) first stores its
    exit code and message, and every other rank exits with that code. Without it the others would wait
    in their next collective until its timeout (NCCL does not notice a dead peer by itself)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        prefix = f"lowvram-dopsd/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/" \
                 f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                               timeout=timedelta(seconds=30))
        self.store = dist.PrefixStore(prefix, client)
        self.host = host_id()
        self.store.set(f"where/{rank}", json.dumps({"host": self.host, "pid": os.getpid()}))
        self.where: dict[int, dict] = {}
        self.beats: dict[int, tuple[int, float]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lowvram-dopsd watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(BEAT_S):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                lost = self.lost()
            except Exception as exc:  # the store is gone with its host: torchrun's agent or rank 0
                lost = (0, f"the job's rendezvous store stopped answering ({exc}): rank 0's node or torchrun "
                        "is gone", EXIT_RANK_LOST)
            if lost and not self.stopping.is_set():
                self.stop_process(*lost)

    def lost(self) -> tuple[int, str, int] | None:
        """(rank, what happened, exit code) of a rank that is gone, or None."""
        others = [r for r in range(self.size) if r != self.rank]
        if int(self.store.add("failed", 0)):
            for r in others:
                if self.store.check([f"failed/{r}"]):
                    info = json.loads(self.store.get(f"failed/{r}"))
                    if r == 0 and self.on_this_host(0):  # rank 0's paragraph is on this terminal already
                        return r, "", info["code"]
                    return r, f"stopped with exit code {info['code']}: {info['message']}", info["code"]
        now = time.monotonic()
        for r in others:
            if self.store.check([f"done/{r}"]):
                continue
            beat = int(self.store.add(f"beat/{r}", 0))
            if r not in self.beats or self.beats[r][0] != beat:
                self.beats[r] = (beat, now)
            if r not in self.where and self.store.check([f"where/{r}"]):
                self.where[r] = json.loads(self.store.get(f"where/{r}"))
            place = self.where.get(r)
            if place and place["host"] == self.host and not process_alive(place["pid"]):
                return r, (f"its process ({place['pid']}) is gone without a word: killed (kill -9, or the "
                           "kernel's out-of-memory killer when host RAM ran out) or crashed"), EXIT_RANK_LOST
            if now - self.beats[r][1] > DEAD_AFTER_S:
                return r, f"not heard from for {DEAD_AFTER_S:.0f} s: its process or node is gone", EXIT_RANK_LOST
        return None

    def on_this_host(self, rank: int) -> bool:
        return self.store.check([f"where/{rank}"]) and json.loads(self.store.get(f"where/{rank}"))["host"] == self.host

    def stop_process(self, rank: int, what: str, code: int) -> None:
        """Exit now: the main thread may be inside a collective that would wait for the lost rank. Quietly when
        `what` is '' (rank 0 said why, here: its refusal, e.g. an output folder in use, is not one to resume)."""
        sys.stdout.flush()
        if what:
            print(f"error: rank {rank} {what.rstrip('.')}. Rank {self.rank} stops too (exit {code}). The run's "
                  "last checkpoint is intact: run the same command with --resume to continue from it.",
                  file=sys.stderr, flush=True)
        os._exit(code)

    def await_verdict(self) -> None:
        """After a failed collective: give the thread the time to find the rank that is gone (it exits the
        process then); return if none is found (the failure was this rank's own)."""
        deadline = time.monotonic() + DEAD_AFTER_S + 2 * BEAT_S
        while time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(BEAT_S / 4)

    def report(self, code: int, message: str) -> None:
        """This rank fails: the others stop with its code (its own message is printed where it runs)."""
        self.stopping.set()
        try:
            self.store.set(f"failed/{self.rank}", json.dumps({"code": code, "message": message[:2000]}))
            self.store.add("failed", 1)
        except Exception:  # the store is gone too: the others find this rank gone by its silence
            pass

    def main_said(self, message: str, wait_s: float = 2.0) -> bool:
        """Whether rank 0 failed with this very message (rank 0 prints it; waits up to wait_s for it)."""
        deadline = time.monotonic() + wait_s
        try:
            while not self.store.check(["failed/0"]):
                if time.monotonic() > deadline:
                    return False
                time.sleep(BEAT_S / 4)
            return json.loads(self.store.get("failed/0"))["message"] == message[:2000]
        except Exception:  # the store is gone with rank 0's node: say it here
            return False

    def retire(self) -> None:
        """This rank leaves the job: its silence from now on is not a failure."""
        self.stopping.set()
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:
            pass


def host_id() -> str:
    """This machine, for 'is that rank's process here?': its name and boot id (containers on two
    nodes may share a host name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def process_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (killed, not yet reaped by torchrun)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
