"""What a full fine-tune writes: sharded checkpoints (torch.distributed.checkpoint) and the trained transformer.

A checkpoint is a folder `<output>/checkpoints/step-000250/` as in LoRA mode (checkpoint.py), with the weights
in DCP's sharded format instead of LoRA files:

    weights/                       torch.distributed.checkpoint: the student's fp32 shards ("student"), the EMA
                                   teacher's ("teacher") and AdamW's state ("optimizer"), each rank writing its
                                   own shards; DCP reshards on load, so a run saved on 2 GPUs resumes on 1 or 8
    optimizer-rank<r>.safetensors  (8-bit AdamW only) rank r's optimizer state, block-quantized over its shards:
                                   resumable on the same number of GPUs only
    rng.safetensors, state.json    as in LoRA mode (every rank draws the same randomness); state.json also
                                   says the world size, the optimizer's kind and the EMA update count

Every rank writes into one hidden `.tmp-*` folder (a shared filesystem across nodes, as DCP needs), and rank 0
renames it into place once all have written and state.json is on disk: a kill during a save leaves the
previous checkpoint whole. DCP's own metadata file is a pickle; ours is the same metadata as JSON
(`weights/.metadata.json`), rebuilt from DCP's dataclasses by name: nothing in a checkpoint folder can run
code when it is loaded, as in LoRA mode.

The trained transformer (`write_transformer`), rank 0 writing while all ranks gather one block at a time:

    <output>/transformer/                 a diffusers folder (config.json + safetensors in the compute dtype):
                                          ZImageTransformer2DModel.from_pretrained(out / "transformer")
    <output>/comfyui/<output name>.safetensors   one file in the model's original key layout (the one ComfyUI's
                                          loaders and diffusers' from_single_file read), where the family has it;
    <output>/single-file/<output name>.safetensors   the same for a model ComfyUI lacks (FLUX.3): diffusers reads it
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from . import __version__, checkpoint, distributed
from .cache import current_umask, write_safetensors
from .checkpoint import CKPT_DIR, Checkpoint, RNGState
from .config import TrainConfig
from .errors import UserError
from .full import FullWeights

WEIGHTS_DIR = "weights"
TRANSFORMER_DIR = "transformer"
SHARD_BYTES = 5 * 2**30  # the transformer folder's safetensors files hold at most this much each


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _dcp_state(weights: FullWeights, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What DCP saves and loads in place: the two models' shards, and AdamW's state (keyed by parameter name,
    sharded like the parameters; torch initialises it if no step was taken yet)."""
    weights.sharded()
    state = {"student": get_model_state_dict(weights.student), "teacher": get_model_state_dict(weights.teacher)}
    if not _eight_bit(optimizer):
        state["optimizer"] = get_optimizer_state_dict(weights.student, optimizer)
    return state


def _eight_bit(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "sharded")  # full.ShardedAdamW8bit


def save(out_dir: Path, step: int, weights: FullWeights, optimizer: torch.optim.Optimizer, scheduler,
         rng_state: RNGState, cfg: TrainConfig, identity: dict[str, Any], info: dict[str, Any], keep: int,
         run_id: str | None = None) -> Path:
    """Checkpoint `step`; every rank calls it (each writes its shards), rank 0 publishes it."""
    world = distributed.current()
    final = Path(out_dir) / CKPT_DIR / f"step-{step:06d}"
    previous = checkpoint.latest(out_dir)
    tmp = None
    try:
        tmp = world.from_main(checkpoint.new_tmp, final.parent, step)
        dcp.save(_dcp_state(weights, optimizer), storage_writer=SafeWriter(tmp / WEIGHTS_DIR))
        extra = {"train_mode": "full", "world_size": world.size, "ema_updates": weights.updates,
                 "scheduler": scheduler.state_dict(), "optimizer": {"kind": cfg.optimizer}}
        if _eight_bit(optimizer):
            tensors, extra["optimizer"]["meta"] = checkpoint._optimizer_to_files(optimizer.state_dict())
            # cloned: bitsandbytes' quantization maps are one tensor shared by every parameter's state
            write_safetensors({k: v.clone() for k, v in tensors.items()},
                              tmp / f"optimizer-rank{world.rank}.safetensors")
        world.barrier()  # every rank's files are on disk (DCP and write_safetensors fsync them)
        if world.main:
            checkpoint.write_state(tmp, step, rng_state, cfg, identity, info, run_id, extra)
            checkpoint.publish(tmp, final)
        world.barrier()
    except (OSError, CheckpointException) as exc:
        error = exc if isinstance(exc, OSError) else _os_error(exc)
        if error is None:
            raise
        if tmp is not None and world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint.save_failed(error, out_dir, step, previous) from exc
    if world.main:
        checkpoint.prune(out_dir, keep, run_id, step)
    return final


def _os_error(exc: CheckpointException) -> OSError | None:
    """The OSError (a full disk, most likely) inside DCP's CheckpointException: DCP wraps each rank's error,
    with its traceback, in a BaseException that every rank raises."""
    return next((e for e, _ in exc.failures.values() if isinstance(e, OSError)), None)


def load(path: Path) -> Checkpoint:
    """A full fine-tune's checkpoint: its state and randomness now; the weights when `restore` reads them."""
    path = Path(path)
    try:
        state, rng_state = checkpoint.read_state(path)
        if state.get("train_mode") != "full":
            raise UserError(f"'{path}' is a LoRA run's checkpoint (train_mode = 'lora'); this run has train_mode = "
                            "'full'. Resume it with its own settings, or start the full fine-tune without --resume.")
        SafeReader(path / WEIGHTS_DIR).read_metadata()  # there, and nothing in it but DCP's metadata
    except UserError:
        raise
    except Exception as exc:
        raise checkpoint.damaged(path, exc) from exc
    return Checkpoint(path=path, step=int(state["step"]), student={}, teacher={}, optimizer=state["optimizer"],
                      scheduler=state["scheduler"], rng=rng_state, config=state["config"], identity=state["identity"],
                      info={**state.get("info", {}), "world_size": state["world_size"],
                            "ema_updates": state["ema_updates"]}, run_id=state.get("run_id"))


def load_resume(resume: str, out_dir: Path) -> Checkpoint:
    """The checkpoint `--resume [PATH]` names (checkpoint.resolve), loaded."""
    return load(checkpoint.resolve(resume, out_dir))


def restore(ckpt: Checkpoint, weights: FullWeights, optimizer: torch.optim.Optimizer, scheduler, sampler,
            noise_gen: torch.Generator, rng, out_dir: Path) -> None:
    """Every rank reads its shards (DCP reshards a checkpoint of another world size), the randomness, the
    schedule and the sampler's place: the run continues exactly where it stopped."""
    world = distributed.current()
    saved_on, now_on = ckpt.info["world_size"], world.size
    if _eight_bit(optimizer) and saved_on != now_on:
        raise UserError(f"'{ckpt.path}' was saved by {saved_on} GPUs with optimizer = 'adamw8bit', whose state is "
                        f"quantized per GPU; it resumes on {saved_on} GPUs only (this job has {now_on}). Resume on "
                        f"{saved_on}, or start a new run.")
    state = _dcp_state(weights, optimizer)
    try:
        dcp.load(state, storage_reader=SafeReader(ckpt.path / WEIGHTS_DIR), planner=SafeLoadPlanner())
    except CheckpointException as exc:  # a shard missing or cut short, on some rank: every rank raises it
        raise checkpoint.damaged(ckpt.path, next((e for e, _ in exc.failures.values()), exc)) from exc
    set_model_state_dict(weights.student, state["student"])
    set_model_state_dict(weights.teacher, state["teacher"])
    if _eight_bit(optimizer):
        tensors = load_file(str(ckpt.path / f"optimizer-rank{world.rank}.safetensors"))
        optimizer.load_state_dict(checkpoint._optimizer_from_files(tensors, ckpt.optimizer["meta"]))
    else:
        set_optimizer_state_dict(weights.student, optimizer, state["optimizer"])
    weights.updates = int(ckpt.info["ema_updates"])
    scheduler.load_state_dict(ckpt.scheduler)
    sampler.order = ckpt.rng.restore(noise_gen, rng)
    if world.main:
        checkpoint.trim_metrics(Path(out_dir) / "metrics.jsonl", ckpt.step)


# DCP's metadata (what each tensor's shards are and where their bytes lie), as JSON: DCP writes it as a pickle,
# which could run code when read; these are the only classes it is made of, rebuilt by name on load.
META_CLASSES = {c.__name__: c for c in (dcp.metadata.Metadata, dcp.metadata.TensorStorageMetadata,
                                        dcp.metadata.ChunkStorageMetadata, dcp.metadata.TensorProperties,
                                        dcp.metadata.BytesStorageMetadata, dcp.metadata.MetadataIndex,
                                        dcp.metadata.StorageMeta, dcp.filesystem._StorageInfo)}
META_FILE = ".metadata.json"


def _to_json(v: Any) -> Any:
    if type(v).__name__ in META_CLASSES:
        return {"class": type(v).__name__, **{f.name: _to_json(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, (torch.dtype, torch.layout, torch.memory_format)):
        return {"torch": str(v).removeprefix("torch.")}
    if isinstance(v, dict):
        return {"items": [[_to_json(k), _to_json(x)] for k, x in v.items()]}
    if isinstance(v, tuple):
        return {"tuple": [_to_json(x) for x in v]}
    if isinstance(v, list):
        return [_to_json(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"DCP metadata holds a {type(v).__name__}, which its JSON form does not know")


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "class" in v:
        cls = META_CLASSES.get(v["class"])
        if cls is None:
            raise ValueError(f"{v['class']} is not part of a checkpoint's metadata")
        return cls(**{k: _from_json(x) for k, x in v.items() if k != "class"})
    if "size" in v:
        return torch.Size(v["size"])
    if "torch" in v:
        value = getattr(torch, v["torch"], None)
        if not isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            raise ValueError(f"torch.{v['torch']} is not a dtype, layout or memory format")
        return value
    if "items" in v:
        return {_from_json(k): _from_json(x) for k, x in v["items"]}
    return tuple(_from_json(x) for x in v["tuple"])


class SafeWriter(dcp.FileSystemWriter):
    """DCP's writer, its metadata written as JSON (META_FILE) instead of a pickle."""

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)  # sets the metadata's storage data, writes the pickle
        for rank in (None, self.rank):  # where DCP put it (one file, or one per rank without collectives)
            Path(self._get_metadata_path(rank)).unlink(missing_ok=True)
        tmp = Path(self.path) / f"{META_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(_to_json(metadata), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, Path(self.path) / META_FILE)


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's load planner, but the values that are not tensors (AdamW's hyper-parameters) must first load with
    torch.load(weights_only=True): DCP's own planner unpickles them with weights_only=False."""

    def load_bytes(self, read_item, value) -> None:
        torch.load(value, weights_only=True)  # raises on anything but plain values: nothing else is read
        value.seek(0)
        super().load_bytes(read_item, value)


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, its metadata read from META_FILE (the rest as FileSystemReader.read_metadata)."""

    def read_metadata(self, *args, **kwargs):
        metadata = _from_json(json.loads((Path(self.path) / META_FILE).read_text(encoding="utf-8")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------------------------------
# The trained transformer
# ---------------------------------------------------------------------------------------------
def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The root's own tensors first (as one unit: the model with its children's left out), then each unit of
    quant.units: the order the files are written in, one unit gathered at a time."""
    from .quant import units

    return [("", model)] + units(model)


def _unit_state(prefix: str, module: nn.Module, root: bool) -> dict[str, torch.Tensor]:
    """A unit's tensors by full name (DTensor shards for parameters); the root's own only for the root."""
    if root:
        own = dict(module.named_parameters(recurse=False))
        own.update({n: b for n, b in module.named_buffers(recurse=False)
                    if n not in module._non_persistent_buffers_set})
        return own
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _gathered(weights: FullWeights, dtype: torch.dtype, main: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The student, one unit at a time, whole, on the CPU in `dtype` (floats): every rank gathers, rank 0 gets it."""
    weights.sharded()
    for prefix, module in _units(weights.student):
        out = {}
        for name, t in _unit_state(prefix, module, prefix == "").items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a collective: every rank, same order
            if main:
                out[name] = full.detach().to("cpu", dtype if full.is_floating_point() else full.dtype)
        yield out


def _meta_state(weights: FullWeights, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Per unit, meta tensors of the shapes and dtypes `_gathered` will give (the files' headers come first)."""
    out = []
    for prefix, module in _units(weights.student):
        out.append({k: torch.empty(tuple(t.shape), dtype=dtype if t.is_floating_point() else t.dtype, device="meta")
                    for k, t in _unit_state(prefix, module, prefix == "").items()})
    return out


def write_transformer(out_dir: Path, weights: FullWeights, family, dtype: torch.dtype, info: dict[str, Any],
                      last_ckpt: Path | None) -> Path:
    """<output>/transformer/ (diffusers) and, where the family knows its original layout, the single file;
    returns the folder. Every rank calls it: the weights are gathered unit by unit, and rank 0 writes them.
    A write that fails (a full disk) names `last_ckpt`, which holds the weights, on every rank."""
    world = distributed.current()
    out_dir = Path(out_dir)
    layouts = _meta_state(weights, dtype)
    passes = [_gathered(weights, dtype, world.main) for _ in range(1 if family.single_file_layout() is None else 2)]
    failed = None
    if world.main:
        try:
            _write_files(out_dir, family, layouts, passes, info)
        except OSError as exc:
            failed = exc.strerror or str(exc)
    for units in passes:  # the gathers a failed write left (all of them on the other ranks): each is a collective
        for _ in units:
            pass
    failed = world.from_main(lambda: failed)  # every rank waits for rank 0's files, and hears if they failed
    if failed is not None:
        size = sum(t.numel() * t.element_size() for u in layouts for t in u.values()) * len(passes) / 1e9
        raise UserError(f"Could not write the trained transformer to '{out_dir}' ({failed}; it needs {size:.1f} GB). "
                        f"The checkpoint {last_ckpt} holds it (the student's fp32 weights): free some space and run "
                        "the same command with --resume to write it.")
    return out_dir / TRANSFORMER_DIR


def _write_files(out_dir: Path, family, layouts: list[dict[str, torch.Tensor]], passes: list[Iterator],
                 info: dict[str, Any]) -> None:
    """Rank 0's part of write_transformer: the folder from the first gather, the single file from the second; a
    failed write leaves nothing behind (a resumed run's earlier folder stays until the new one is whole)."""
    meta = {"format": "pt", "lowvram_dopsd": json.dumps({**info, "train_mode": "full", "tool_version": __version__},
                                                        sort_keys=True, default=str)}
    tmp = out_dir / f".tmp-{TRANSFORMER_DIR}-{os.getpid()}"
    where = single_file(out_dir, known=False, folder="comfyui" if family.comfy_layout else "single-file")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tmp.chmod(0o777 & ~current_umask())
        shutil.copy(family.model_dir / "transformer" / "config.json", tmp / "config.json")
        _write_sharded(tmp, layouts, passes[0], meta)
        if layout := family.single_file_layout():
            single, units = [layout(u) for u in layouts], (layout(u) for u in passes[1])
            _stream_file(where, _keys(single), {k: t for u in single for k, t in u.items()},
                         (u[k] for u in units for k in sorted(u)), meta)
        _replace_dir(tmp, out_dir / TRANSFORMER_DIR)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        where.with_name(f".tmp-{where.name}").unlink(missing_ok=True)  # _stream_file's, cut short
        raise


SINGLE_FILE_DIRS = ("comfyui", "single-file")  # ComfyUI's layout; another original one that diffusers reads


def single_file(out_dir: Path, known: bool = True, folder: str = "comfyui") -> Path | None:
    """Where write_transformer puts the single file: <folder>/<output folder's name>.safetensors; `known`: the
    one written, if any (a family without an original layout has none)."""
    name = f"{Path(out_dir).resolve().name}.safetensors"
    if not known:
        return Path(out_dir) / folder / name
    return next((p for d in SINGLE_FILE_DIRS if (p := Path(out_dir) / d / name).is_file()), None)


def _keys(units: list[dict[str, torch.Tensor]]) -> list[str]:
    return [k for u in units for k in sorted(u)]


def _replace_dir(tmp: Path, folder: Path) -> None:
    """`tmp` becomes `folder` in one rename; an earlier `folder` (a resumed run's) goes only after."""
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def _write_sharded(folder: Path, layouts: list[dict[str, torch.Tensor]], units: Iterator[dict[str, torch.Tensor]],
                   meta: dict[str, str]) -> None:
    """diffusers' file names: one diffusion_pytorch_model.safetensors, or numbered files of at most SHARD_BYTES
    and their index, filled unit by unit in order."""
    files: list[list[str]] = [[]]
    size, total = 0, 0
    for unit in layouts:
        nbytes = sum(t.numel() * t.element_size() for t in unit.values())
        if files[-1] and size + nbytes > SHARD_BYTES:
            files.append([])
            size = 0
        files[-1] += list(unit)
        size, total = size + nbytes, total + nbytes
    names = (["diffusion_pytorch_model.safetensors"] if len(files) == 1 else
             [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    shapes = {k: t for u in layouts for k, t in u.items()}
    tensors = (t for unit in units for t in unit.values())
    for name, keys in zip(names, files):
        _stream_file(folder / name, keys, shapes, tensors, meta)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in zip(names, files) for k in keys}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8"}


def _stream_file(path: Path, keys: list[str], shapes: dict[str, torch.Tensor], tensors: Iterator[torch.Tensor],
                 meta: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor: the header from `shapes` (meta tensors), then the next
    len(keys) of `tensors`, in the order of `keys`, as they come (one unit in memory at a time)."""
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for k in keys:
        t = shapes[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for k in keys:
            t = next(tensors)
            if tuple(t.shape) != tuple(shapes[k].shape) or t.dtype != shapes[k].dtype:
                raise RuntimeError(f"{k}: {tuple(t.shape)} {t.dtype}, the header says {tuple(shapes[k].shape)}")
            fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
