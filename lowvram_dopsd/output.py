"""The LoRA file users get: diffusers/peft layout, loadable with `pipe.load_lora_weights(out_dir)`.

Keys are `transformer.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]. The LoRA
config (r, lora_alpha, target_modules) goes into the safetensors metadata under
`lora_adapter_metadata`, which diffusers turns into the peft `LoraConfig` on load, so alpha ≠ r
(the paper's r64/a128) loads with the right scale. Our own facts (base model, steps, caption rule,
teacher, tool version) go in a second metadata entry, `lowvram_dopsd`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from . import __version__, distributed
from .cache import atomic_save_safetensors
from .errors import UserError
from .files import LORA_FILE
from .lora import DualLoRA
from .optim import lr_shape
from .progress import Note, styled

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import Dataset
    from .families.base import Family

TEACHER_FILE = "teacher_ema_lora.safetensors"  # the EMA teacher's LoRA, beside LORA_FILE, same layout


def lora_state_dict(lora: DualLoRA, role: str, prefix: str = "transformer", dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to(dtype) for k, v in lora.tensors(role).items()}


def save_lora(path: Path, lora: DualLoRA, role: str, info: dict[str, Any], prefix: str = "transformer",
              dtype=torch.bfloat16) -> Path:
    config = {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.layers),
              "init_lora_weights": True}
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
        "lowvram_dopsd": json.dumps({**info, "rank": lora.rank, "alpha": lora.alpha, "role": role,
                                     "tool_version": __version__}, sort_keys=True, default=str),
    }
    atomic_save_safetensors(lora_state_dict(lora, role, prefix, dtype), path, metadata=metadata)
    return path


def read_info(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return json.loads(meta.get("lowvram_dopsd", "{}"))


def write_loras(out_dir: Path, lora: DualLoRA, meta: dict, dtype: torch.dtype, last_ckpt: Path | None) -> Path:
    """The student LoRA (the product) and the EMA teacher's, in the compute dtype; returns the student's path."""
    try:
        path = save_lora(out_dir / LORA_FILE, lora, "student", meta, dtype=dtype)
        save_lora(out_dir / TEACHER_FILE, lora, "teacher", meta, dtype=dtype)
    except OSError as exc:
        raise UserError(f"Could not write the LoRA to '{out_dir}' ({exc.strerror or exc}). The checkpoint "
                        f"{last_ckpt} holds it (fp32, loadable as is); free some space and run again with "
                        "--resume to write it.") from exc
    return path


def write_step_lora(out_dir: Path, lora: DualLoRA, meta: dict, dtype: torch.dtype,
                    note: Note) -> None:
    """loras/step-NNNNNN.safetensors: the LoRA as it was at this step, kept to choose from later."""
    try:
        save_lora(out_dir / "loras" / f"step-{meta['steps']:06d}.safetensors", lora, "student", meta, dtype=dtype)
    except OSError as exc:  # like a preview: the checkpoints still hold the run, go on
        note(styled("step LoRA skipped:", exc.strerror or str(exc)))


def metrics_log(out_dir: Path, main: bool = True) -> IO[str]:
    """metrics.jsonl, open for appending; on the ranks of a job other than rank 0, a log that keeps nothing."""
    return (Path(out_dir) / "metrics.jsonl" if main else Path(os.devnull)).open("a", encoding="utf-8")


def vram_metrics(peaks_gb: list[float]) -> dict[str, Any]:
    """The peak GPU memory of a step for metrics.jsonl: the most any rank used (`vram_gb`), and with several
    ranks each one's (`vram_gb_ranks`, rank 0 first); nothing on the CPU."""
    if not peaks_gb:
        return {}
    return {"vram_gb": max(peaks_gb), **({"vram_gb_ranks": peaks_gb} if len(peaks_gb) > 1 else {})}


def append_metrics(log: IO[str], metrics: dict, last_ckpt: Path | None) -> None:
    """One line of metrics.jsonl, flushed: a reader (or a crash) sees every finished step."""
    try:
        log.write(json.dumps(metrics) + "\n")
        log.flush()
    except OSError as exc:  # a full disk, most likely: the next checkpoint would fail as well
        kept = (f"The last checkpoint ({last_ckpt}) is intact: free some space and run the same command "
                "with --resume." if last_ckpt else "No checkpoint was written yet: free some space and run again.")
        raise UserError(f"Could not append step {metrics['step']} to {log.name} ({exc.strerror or exc}). "
                        f"{kept}") from exc


def model_for_metadata(model: str) -> str:
    """The base model as the LoRA records it: a local folder as its absolute path (`sample` reads it
    from any working directory), a Hugging Face id as typed."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def run_info(cfg: TrainConfig, preset: str, family: Family, teacher: str, rollout_steps: int, lr: float,
             ds: Dataset, init_lora: str | None) -> dict:
    """The facts every LoRA file of a run records in its metadata (`init_lora`: the file it started from)."""
    init = {"init_lora": init_lora} if init_lora else {}
    return {"base_model": model_for_metadata(cfg.model), "family": family.name, "teacher": teacher, "loss": cfg.loss,
            **({"transformer_file": str(family.transformer_file)} if family.transformer_file else {}),
            "caption_rule": ds.caption_rule, "trigger": ", ".join(ds.triggers), "rollout_steps": rollout_steps,
            "preset": preset, "lr": lr, "lora_init": cfg.lora_init, "ema_decay": cfg.ema_decay, **init,
            "resolution": cfg.resolution, **({"lr_schedule": schedule} if (schedule := lr_shape(cfg)) else {}),
            **({"prior_prompts": " | ".join(cfg.prior_prompts), "prior_weight": cfg.prior_weight}
               if cfg.prior_prompts else {}),
            **({"processes": n} if (n := distributed.current().size) > 1 else {}),  # a torchrun job's
            **family.run_notes(teacher, cfg)}
