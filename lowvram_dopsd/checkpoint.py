"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

    lowvram-dopsd train ... --resume             # the latest checkpoint in the output folder
    lowvram-dopsd train ... --resume out/checkpoints/step-000250

A checkpoint is a folder `<output>/checkpoints/step-000250/`:

    pytorch_lora_weights.safetensors  student LoRA, fp32, diffusers layout: loadable as is
                                      (`pipe.load_lora_weights(folder)`, `lowvram-dopsd sample --lora folder`)
    teacher_ema_lora.safetensors      EMA teacher LoRA, fp32, same layout
    optimizer.safetensors             optimizer state tensors (AdamW moments and step counts)
    rng.safetensors                   torch RNG states: the CPU noise generator, the global CPU and CUDA RNGs
    state.json                        step, resolved config, model/dataset/condition identities,
                                      optimizer hyper-parameters, LR-scheduler state, python RNG state,
                                      the sampler's remaining epoch order

It is written into a hidden `.tmp-*` folder that is renamed into place only when every file is
on disk (fsync'ed), so a crash, a full disk or `kill -9` in the middle of a save leaves the previous
checkpoints intact; a stale `.tmp-*` folder is ignored and removed by the next save. The last
`keep_checkpoints` are kept. Nothing is pickled: tensors are safetensors, everything else JSON,
so loading a checkpoint cannot run code.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from . import __version__, distributed
from .cache import current_umask, write_safetensors
from .config import TrainConfig, as_argument
from .errors import UserError
from .output import LORA_FILE, TEACHER_FILE, save_lora
from .runlock import pid_runs
from .tracking import TB_DIR, WANDB_DIR

if TYPE_CHECKING:
    from .data import Dataset
    from .families.base import Family

CKPT_DIR = "checkpoints"
STUDENT_FILE = LORA_FILE  # a checkpoint holds the LoRA files a run writes, under the same names
STATE_FILE = "state.json"
FORMAT = 2

# Settings that may change between a run and its resume without changing the training math.
# Everything else (rank, alpha, lr, loss, teacher, resolution, targets, seed, dtype, quant, ...) must
# match, or the resumed run would not be the run that was stopped.
# Paths checked through the identities instead (a moved folder is fine, so a new path says nothing):
BY_IDENTITY = {"model", "transformer_file", "images", "caption", "trigger", "teacher_encoder"}
HARMLESS = {
    "steps", "save_every", "keep_checkpoints", "lora_every", "output", "cache_dir", "device", "encoders_on",
    "kernels", "grad_checkpointing", "on_bad_image", "preview_every", "preview_prompts", "preview_seed",
    "preview_teacher", "teacher_ema_on", "log_with", *BY_IDENTITY,
    "lora_init", "init_lora",  # read at step 0 only: a resumed run loads its LoRAs from the checkpoint
    "torch_compile", "attention_backend",  # the same math, other kernels (accel.py)
    "keep_blocks",  # the same kernels, fewer of them recomputed
}
# harmless for the method, but results are no longer bit-identical
NUMERIC_ONLY = {"device", "kernels", "teacher_ema_on", "torch_compile", "attention_backend"}


# ---------------------------------------------------------------------------------------------
# identities: what must be the same to continue a run
# ---------------------------------------------------------------------------------------------
def _strip_paths(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_paths(v) for k, v in obj.items() if k != "path"}
    if isinstance(obj, list):
        return [_strip_paths(v) for v in obj]
    return obj


def digest(obj: Any) -> str:
    """sha256 of a JSON value with folder paths left out (moving a model folder changes nothing)."""
    return hashlib.sha256(json.dumps(_strip_paths(obj), sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model_dir: Path, family_name: str, transformer_file: Path | str | None = None) -> str:
    """The transformer's config and weight file sizes: a different checkpoint gives another value. With a
    `transformer_file` (a fine-tune's single file), its name and size stand for transformer/'s weights
    (moving it changes nothing)."""
    folder = Path(model_dir) / "transformer"
    h = hashlib.sha256(family_name.encode())
    for p in sorted(folder.glob("*.json")):
        h.update(p.name.encode() + p.read_bytes())
    weights = [Path(transformer_file)] if transformer_file else sorted(folder.glob("*.safetensors"))
    for p in weights:
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()


def run_identity(family: Family, ds: Dataset, teacher: str, cfg: TrainConfig) -> dict[str, str]:
    """What a checkpoint must find again to be resumed (check_compatible)."""
    return {"model": model_identity(family.model_dir, family.name, family.transformer_file),
            "dataset": digest(ds.identity()),
            "conditions": digest([family.encoder_identity("student", cfg),
                                             family.encoder_identity(teacher, cfg)])}


def shared_facts(cfg: TrainConfig, identity: dict[str, str], resume: str | None) -> dict[str, Any]:
    """What every rank of a torchrun job must agree on (distributed.World.agree): the settings, and the model,
    data and encoders by identity (each node may keep them under another path); rank 0 alone writes the
    output folder and the cache, so theirs may differ."""
    own = BY_IDENTITY | {"output", "cache_dir"}
    return {"settings": {k: v for k, v in cfg.to_dict().items() if k not in own}, **identity, "resume": resume}


# ---------------------------------------------------------------------------------------------
# what is saved
# ---------------------------------------------------------------------------------------------
@dataclass
class RNGState:
    """Every source of randomness of the loop, captured together (also at the start of a step)."""

    noise: torch.Tensor            # the CPU generator the roll-out noise is drawn from
    python: Any                    # random.Random: sampler shuffles and trained-state choice
    order: list[int]               # the sampler's remaining epoch order
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor]

    @classmethod
    def capture(cls, noise_gen: torch.Generator, rng: random.Random, order: list[int]) -> "RNGState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return cls(noise_gen.get_state(), rng.getstate(), list(order), torch.get_rng_state(), cuda)

    def restore(self, noise_gen: torch.Generator, rng: random.Random) -> list[int]:
        noise_gen.set_state(self.noise)
        rng.setstate(self.python)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda and torch.cuda.is_available() and len(self.cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(self.cuda)
        return list(self.order)


@dataclass
class Checkpoint:
    path: Path
    step: int
    student: dict[str, torch.Tensor]  # names as DualLoRA.tensors() (no "transformer." prefix)
    teacher: dict[str, torch.Tensor]
    optimizer: dict[str, Any]         # an optimizer.state_dict()
    scheduler: dict[str, Any]
    rng: RNGState
    config: dict[str, Any]
    identity: dict[str, Any]
    info: dict[str, Any]
    run_id: str | None = None         # the run it belongs to (None: written before runs had one)


def run_id_for(ckpt: Checkpoint | None) -> str:
    """The id a run's checkpoints carry (rotation keeps to it): the resumed checkpoint's, else a new one."""
    return ckpt.run_id if ckpt is not None and ckpt.run_id else uuid.uuid4().hex[:12]


def shared_state(lora, rng_state: RNGState) -> dict[str, Any]:
    """What rank 0 saves for every rank of a job, so what every rank must hold bit for bit: both LoRA sets
    and the randomness (all ranks draw the whole global batch from the same streams)."""
    return {"student LoRA": lora.tensors("student"), "EMA teacher LoRA": lora.tensors("teacher"),
            "noise generator": rng_state.noise, "python RNG": rng_state.python, "sampler order": rng_state.order,
            "torch CPU RNG": rng_state.torch_cpu}


def _tuple_state(state: Any) -> Any:
    """random.Random.getstate() -> JSON gives lists; setstate wants the nested tuples back."""
    return tuple(_tuple_state(v) for v in state) if isinstance(state, list) else state


def _optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer.state_dict() as flat safetensors + JSON. Per-parameter state may nest dicts
    (bitsandbytes' 8-bit AdamW wraps its quantization state in one): keys are paths "0/exp_avg"."""
    tensors, scalars = {}, {}

    def walk(path: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}/{k}", v)
        elif value is None or isinstance(value, (bool, int, float, str, list, tuple)):
            scalars[path] = value
        else:
            raise TypeError(f"optimizer state {path} is a {type(value).__name__}: cannot be saved without pickle")

    for idx, slots in sd["state"].items():
        walk(str(idx), slots)
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for path, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, *names = path.split("/")
        node = state.setdefault(int(idx), {})
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = value
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync folders; the rename is still atomic
    finally:
        os.close(fd)


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (a state.json is present), oldest first."""
    root = Path(out_dir) / CKPT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and (p / STATE_FILE).is_file():
                try:
                    found.append((int(p.name[5:]), p))
                except ValueError:
                    continue
    return sorted(found)


def latest(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def step_dir(out_dir: Path, step: int) -> Path:
    """Where checkpoint `step` of the run in `out_dir` is published."""
    return Path(out_dir) / CKPT_DIR / f"step-{step:06d}"


def save(out_dir: Path, step: int, lora, optimizer: torch.optim.Optimizer, scheduler, rng_state: RNGState,
         cfg: TrainConfig, identity: dict[str, Any], info: dict[str, Any], keep: int, run_id: str | None = None
         ) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep` (0 = keep all) of the run's
    (`run_id`: the run these checkpoints continue, see `_rotate`; None: every checkpoint in the folder)."""
    final = step_dir(out_dir, step)
    root = final.parent
    previous = latest(out_dir)
    tmp = None
    try:
        tmp = new_tmp(root, step)
        meta = {**info, "steps": step}
        save_lora(tmp / STUDENT_FILE, lora, "student", meta, dtype=torch.float32)
        save_lora(tmp / TEACHER_FILE, lora, "teacher", meta, dtype=torch.float32)
        opt_tensors, opt_meta = _optimizer_to_files(optimizer.state_dict())
        write_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        write_state(tmp, step, rng_state, cfg, identity, info, run_id,
                    {"optimizer": opt_meta, "scheduler": scheduler.state_dict()})
        publish(tmp, final)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise save_failed(exc, out_dir, step, previous) from exc
    _rotate(root, keep, run_id, step)
    return final


def new_tmp(root: Path, step: int) -> Path:
    """The hidden folder a checkpoint is written into before `publish` renames it into place."""
    root.mkdir(parents=True, exist_ok=True)
    # the writer's PID in the name: a later save removes leftovers of dead writers only (_rotate)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-{os.getpid()}-", dir=root))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: readable as any folder the user makes
    return tmp


def write_state(tmp: Path, step: int, rng_state: RNGState, cfg: TrainConfig, identity: dict[str, Any],
                info: dict[str, Any], run_id: str | None, extra: dict[str, Any]) -> None:
    """The randomness (rng.safetensors), then state.json: written last, its presence marks a complete checkpoint."""
    rng_tensors = {"noise": rng_state.noise, "torch_cpu": rng_state.torch_cpu}
    rng_tensors.update({f"cuda.{i}": t for i, t in enumerate(rng_state.cuda)})
    write_safetensors(rng_tensors, tmp / "rng.safetensors")
    _write_json(tmp / STATE_FILE, {
        "format": FORMAT, "tool_version": __version__, "step": step, "saved_at": time.time(),
        "config": cfg.to_dict(), "identity": identity, "info": info, **extra,
        "python_rng": rng_state.python, "sampler_order": rng_state.order,
        "cuda_rng_devices": len(rng_state.cuda), **({"run_id": run_id} if run_id else {}),
    })


def publish(tmp: Path, final: Path) -> None:
    """The complete checkpoint in `tmp` becomes `final` in one rename (fsync'ed first)."""
    root = final.parent
    _fsync(tmp)
    if final.exists():  # the same step saved again (e.g. stopped right after a periodic save)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)


def save_failed(exc: OSError, out_dir: Path, step: int, previous: Path | None) -> UserError:
    """What a save that could not write says: why, and which checkpoint is intact to continue from."""
    root = Path(out_dir) / CKPT_DIR
    why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    # Old checkpoints are pruned only after a save succeeds, so no setting frees space now: what
    # can go is said by name.
    if previous is None:
        then = ("No checkpoint of this run was written yet: free some space, then run the same command again "
                "(without --resume; this run's files are moved aside).")
    else:
        older = [p.name for _, p in list_checkpoints(out_dir) if p != previous]
        spare = (f" (the older checkpoints beside it, {', '.join(older)}, can be deleted: --resume reads the "
                 "latest)" if older else "")
        then = (f"The previous checkpoint, {previous}, is intact: free some space{spare}, then run the same "
                "command with --resume to continue from it.")
    return UserError(f"Could not save the checkpoint of step {step} in '{root}': {why}. {then}")


def prune(out_dir: Path, keep: int, run_id: str | None, saved: int) -> None:
    """After checkpoint `saved` was published by another writer (full_io.py): as save() does after its own."""
    _rotate(Path(out_dir) / CKPT_DIR, keep, run_id, saved)


def _rotate(root: Path, keep: int, run_id: str | None = None, saved: int | None = None) -> None:
    """After a successful save: delete what earlier saves of the run left behind, never another run's files.

    Leftover `.tmp-step-*` / `.old-step-*` folders go when the process that wrote them no longer runs (its PID
    is in the name; none: an older version's, gone). With `run_id`, the checkpoints beyond the newest `keep`
    go only if this run wrote them (or the run it resumes: same run_id) and are older than the one just saved
    (`saved`): a run resumed from an earlier checkpoint never deletes the later ones of the run it branched
    from, nor another run's. The output folder's lock (runlock.py) keeps two runs apart; this holds even so."""
    for p in root.iterdir():  # leftovers of a save that was killed
        if p.name.startswith((".tmp-step-", ".old-step-")) and p.is_dir():
            writer = p.name.split("-")[3]
            if not writer.isdigit() or int(writer) == os.getpid() or not pid_runs(int(writer)):
                shutil.rmtree(p, ignore_errors=True)
    if keep <= 0:
        return
    found = list_checkpoints(root.parent)
    if run_id is not None:
        found = [(step, p) for step, p in found if step <= (saved or step) and _run_id(p) == run_id]
    for _, p in found[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _run_id(path: Path) -> str | None:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in tensors.items()}


def load(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        state, rng_state = read_state(path)
        if state.get("train_mode") == "full":
            raise UserError(f"'{path}' is a full fine-tune's checkpoint (train_mode = 'full'); this run trains a "
                            "LoRA. Resume it with its own settings (--set train_mode=full and its preset), or start "
                            "the LoRA run without --resume.")
        student = _strip_prefix(load_file(str(path / STUDENT_FILE)))
        teacher = _strip_prefix(load_file(str(path / TEACHER_FILE)))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except UserError:
        raise
    except Exception as exc:  # missing file, cut-off safetensors header, bad JSON: all the same to the user
        raise damaged(path, exc) from exc
    return Checkpoint(path=path, step=int(state["step"]), student=student, teacher=teacher,
                      optimizer=_optimizer_from_files(opt_tensors, state["optimizer"]),
                      scheduler=state["scheduler"], rng=rng_state, config=state["config"],
                      identity=state["identity"], info=state.get("info", {}), run_id=state.get("run_id"))


def read_state(path: Path) -> tuple[dict[str, Any], RNGState]:
    """A checkpoint's state.json and its randomness (what every checkpoint holds, LoRA or full)."""
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    rng = load_file(str(path / "rng.safetensors"))
    if state.get("format") != FORMAT:
        raise UserError(f"The checkpoint '{path}' was written by lowvram-dopsd {state.get('tool_version')} in a "
                        f"format this version ({__version__}) cannot read.")
    return state, RNGState(noise=rng["noise"], python=_tuple_state(state["python_rng"]),
                           order=state["sampler_order"], torch_cpu=rng["torch_cpu"],
                           cuda=[rng[f"cuda.{i}"] for i in range(state.get("cuda_rng_devices", 0))])


def damaged(path: Path, exc: Exception) -> UserError:
    return UserError(f"The checkpoint '{path}' is damaged or incomplete ({exc}). Resume from an older one: "
                     f"--resume {path.parent}/step-XXXXXX (see the folder's contents).")


def restore(ckpt: Checkpoint, lora, optimizer: torch.optim.Optimizer, scheduler, sampler, noise_gen: torch.Generator,
            rng: random.Random, out_dir: Path) -> None:
    """Every piece of state the training loop reads, exactly as it was after step `ckpt.step`; the
    metrics it logged after that step are dropped (the resumed run logs them again; rank 0 of a job,
    the one that writes them)."""
    lora.load("student", ckpt.student)
    lora.load("teacher", ckpt.teacher)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    sampler.order = ckpt.rng.restore(noise_gen, rng)
    if distributed.current().main:
        trim_metrics(Path(out_dir) / "metrics.jsonl", ckpt.step)


def load_resume(resume: str, out_dir: Path) -> Checkpoint:
    """The checkpoint `--resume [PATH]` names (resolve), loaded."""
    return load(resolve(resume, out_dir))


def resolve(resume: str, out_dir: Path) -> Path:
    """`--resume` with no value -> "latest"; a checkpoint folder; or an output folder (its latest)."""
    if resume in ("", "latest"):
        found = latest(out_dir)
        if found is None:
            archived = sorted(p.parent for p in (Path(out_dir) / ARCHIVE_DIR).glob(f"*/{CKPT_DIR}") if latest(p.parent))
            hint = (f" The last run in it was moved to '{archived[-1]}' when a new run started there: "
                    f"--resume {archived[-1]} continues it." if archived else "")
            raise UserError(f"--resume: there is no checkpoint in '{Path(out_dir) / CKPT_DIR}'.{hint} Pass the run's "
                            "--output folder (or --resume PATH), or leave out --resume to start a new run.")
        return found
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    found = latest(path) if path.is_dir() else None
    if found is None:
        raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}) nor an output folder with "
                        f"checkpoints in {CKPT_DIR}/.")
    return found


def check_compatible(ckpt: Checkpoint, cfg: TrainConfig, identity: dict[str, Any]) -> list[str]:
    """Raise a UserError if resuming would change the run's math; return warnings for harmless changes."""
    problems, notes = [], []
    defaults = TrainConfig().to_dict()
    for key, now in cfg.to_dict().items():
        before = ckpt.config.get(key, defaults.get(key))
        if before == now or (isinstance(before, list) and list(now) == before):
            continue
        if key == "steps" and cfg.lr_schedule != "constant":  # the decay is spread over `steps`
            problems.append(f"steps = {now!r} (the run used {before!r}; with lr_schedule = "
                            f"{cfg.lr_schedule!r} it sets the learning rate of every step)")
        elif key in HARMLESS:
            if key == "steps" and now < ckpt.step:
                raise UserError(f"The checkpoint '{ckpt.path}' is at step {ckpt.step}, but steps = {now}. "
                                f"Pass --steps {ckpt.step + 1} or more to train further.")
            if key in NUMERIC_ONLY:
                notes.append(f"{key} changed ({before!r} -> {now!r}): the run continues, but not bit-identically")
            elif key not in BY_IDENTITY and key != "lora_init":
                notes.append(f"{key} changed ({before!r} -> {now!r})")
        else:
            problems.append(f"{key} = {now!r} (the run used {before!r})")
    what = {"model": "the base model (its transformer config or weights differ)",
            "dataset": "the training set (images, captions, their sizes or a dataset file's repeats differ)",
            "conditions": "the encoders that computed the conditions (text encoder, teacher VLM or their settings)"}
    for key, label in what.items():
        if key in ckpt.identity and ckpt.identity[key] != identity.get(key):
            problems.append(label)
    if problems:
        # as flags where they have one: a `--set rank=64` added after the user's `--rank 32` is refused
        fixes = " ".join(as_argument(k, ckpt.config.get(k, defaults.get(k)))
                         for k in (p.split(" = ")[0] for p in problems if " = " in p))
        raise UserError(
            f"Cannot resume '{ckpt.path}': this run would not continue the one that was saved. Changed: "
            f"{'; '.join(problems)}. Run with the original settings"
            f"{' (change these in your command: ' + fixes + ')' if fixes else ''}, "
            "or start a new run in another --output folder."
        )
    # Every rank draws the whole global batch from the same streams, so the data and noise of a step do not
    # depend on the number of processes; only the order in which the ranks' gradients add up does.
    trained_on, now_on = ckpt.info.get("processes", 1), distributed.current().size
    if trained_on != now_on:
        notes.append(f"the run was trained by {trained_on} process{'es' * (trained_on > 1)} and continues on "
                     f"{now_on}: the same batches, data and noise, but the gradients add up in another order, so it "
                     "continues the same run, not bit for bit")
    if ckpt.step >= cfg.steps:
        notes.append(f"the checkpoint is already at step {ckpt.step} = steps: nothing to train (pass --steps "
                     f"{ckpt.step + 100} to train further); writing its LoRA.")
    return notes


# ---------------------------------------------------------------------------------------------
# the output folder between runs
# ---------------------------------------------------------------------------------------------
ARCHIVE_DIR = "previous-runs"  # where a new run moves the one it finds in --output
RUN_FILES = (CKPT_DIR, "previews", "loras", "metrics.jsonl", TB_DIR, WANDB_DIR, STUDENT_FILE, TEACHER_FILE, "comfyui",
             "transformer")  # the last: a full fine-tune's output (full_io.py)


def archive_previous_run(out_dir: Path) -> Path | None:
    """A new run in a folder that holds a finished or stopped one: move that run aside, never delete it."""
    out_dir = Path(out_dir)
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not (out_dir / CKPT_DIR).is_dir() and not (out_dir / "metrics.jsonl").is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out_dir / ARCHIVE_DIR / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = out_dir / "previous-runs" / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for name in present:
        os.replace(out_dir / name, dest / name)
    return dest


def moved_by_archive(path: Path, out_dir: Path, archived: Path | None) -> Path:
    """Where a file of the earlier run in --output is after archive_previous_run moved it (an --init-lora
    from the same folder: the LoRA's metadata must name where it is now)."""
    try:
        inside = path.relative_to(out_dir.resolve())
    except ValueError:
        return path
    return archived / inside if archived is not None and (archived / inside).exists() else path


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the log lines of steps <= last_step (a resumed run re-does the later ones), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)

