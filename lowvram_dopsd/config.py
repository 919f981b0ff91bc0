"""Training configuration: one flat, typed dataclass, filled from a preset file and overrides.

Presets live in `presets/*.toml` (shipped as `lowvram_dopsd.presets`). Any key can be overridden
from the command line (`--steps 500` or `--set lr=1e-5`). Unknown keys are rejected with the
closest valid name, so a typo in a preset never silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from .errors import UserError

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_TEACHER_VLM = "Qwen/Qwen3-VL-4B-Instruct"
# The authors' klein edit-teacher instruction (their FLUX.2-klein-4B training script's --edit-sys-prompt).
DEFAULT_EDIT_INSTRUCTION = ("Make the main subject (facial/ip details), background, and overall composition "
                            "consistent with the reference image.")


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = DEFAULT_MODEL          # HF repo id or local diffusers folder
    images: str = ""                    # folder of images (+ optional same-stem .txt captions)
    caption: str = ""                   # caption for images without a .txt ("" = use the trigger alone)
    trigger: str = ""                   # word prepended to every caption (if not already in it)
    output: str = "out"
    # --- the method (paper §2.2 / Appendix D)
    teacher: str = ""                   # "vlm" | "edit"; "" = the family's default
    teacher_encoder: str = DEFAULT_TEACHER_VLM  # Qwen3-VL folder or id, for the vlm teacher
    edit_instruction: str = DEFAULT_EDIT_INSTRUCTION  # appended to the caption for the edit teacher (klein)
    loss: str = "x0"                    # "velocity" (paper eq. 6) | "x0" (authors' code)
    rollout_steps: int = 0              # 0 = the family's own few-step count (Z-Image 8, klein 4)
    train_states: int = 0               # visited states trained per roll-out; 0 = all
    ema_decay: float = 0.9999
    # --- LoRA and optimisation (paper: r64 / a128 / batch 4 / lr 4e-5 Z-Image, 1e-5 klein)
    rank: int = 64
    alpha: float = 128.0
    lora_targets: list[str] = field(default_factory=list)  # [] = the family's default
    lr: float = 0.0                     # 0 = the family's paper learning rate
    batch_size: int = 4                 # total batch per optimizer step
    micro_batch: int = 1                # roll-outs per forward; batch_size / micro_batch = accumulation
    steps: int = 1000
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"            # "adamw" | "adamw8bit"
    seed: int = 0
    # --- resolution and precision
    resolution: int = 1024              # training area is resolution², aspect kept per image (buckets)
    dtype: str = "bf16"                 # "bf16" | "fp16" | "fp32" compute dtype of the frozen base
    quant: str = "none"                 # "none" | "qint8" | "qfloat8" (optimum-quanto) | "bnb-int8" (quant.py)
    act_quant: str = "off"              # "int8": the 8-bit base's GEMMs on per-token int8 activations
                                        # (quant = "qint8" only; int8 tensor cores; docs/kernels.md)
    grad_checkpointing: bool = True
    kernels: str = "auto"               # "auto": Triton kernels (loss, fused 8-bit LoRA linear) on CUDA;
                                        # "on": force them (CPU: TRITON_INTERPRET=1); "off": plain torch
    device: str = "auto"                # "auto" | "cuda" | "cpu"
    encoders_on: str = "auto"           # "auto" (= device) | "cpu" | "cuda": where precompute runs
    # --- encoders (Z-Image pipeline: 512 tokens; authors' VLM: 1024 tokens, 512-768 px images)
    max_sequence_length: int = 512
    teacher_max_sequence_length: int = 1024
    vlm_min_pixels: int = 512 * 512
    vlm_max_pixels: int = 768 * 768
    cache_dir: str = ""                 # "" = ~/.cache/lowvram-dopsd/features
    # --- bookkeeping
    save_every: int = 250               # checkpoint (resumable) every N steps, and at the end / on Ctrl-C
    keep_checkpoints: int = 3           # keep the last K checkpoints (0 = keep all)
    log_every: int = 1
    on_bad_image: str = "skip"          # "skip" (warn and list) | "stop": unreadable or too-small images
    # --- previews (0 = off): a grid of few-step samples before training, every N steps and at the end
    preview_every: int = 0
    preview_prompts: list[str] = field(default_factory=list)  # [] = two training captions + two new scenes
    preview_seed: int = 1000            # image i of a grid uses seed preview_seed + i (= `sample --seed`)
    preview_teacher: bool = False       # add the EMA teacher's sample (teacher condition) for training captions

    def resolved_lr(self, family_default: float) -> float:
        return self.lr if self.lr > 0 else family_default

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "teacher": ("", "vlm", "edit"),
    "loss": ("velocity", "x0"),
    "optimizer": ("adamw", "adamw8bit"),
    "dtype": ("bf16", "fp16", "fp32"),
    "quant": ("none", "qint8", "qfloat8", "bnb-int8"),
    "kernels": ("auto", "on", "off"),
    "act_quant": ("off", "int8"),
    "device": ("auto", "cuda", "cpu"),
    "encoders_on": ("auto", "cpu", "cuda"),
    "on_bad_image": ("skip", "stop"),
}


LIST_SEPARATORS = {"preview_prompts": "|"}


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _unknown_key(key: str, where: str) -> UserError:
    valid = field_names()
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(
        f"Unknown setting '{key}' in {where}.{hint} Valid settings are: {', '.join(valid)}."
    )


def _coerce(name: str, value: Any, where: str) -> Any:
    """Turn a TOML value or a command-line string into the field's type, or explain why not."""
    hint = get_type_hints(TrainConfig)[name]
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if hint == list[str]:
            if isinstance(value, str):  # prompts hold commas: they are separated by "|" on the command line
                return [v.strip() for v in value.split(LIST_SEPARATORS.get(name, ",")) if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError(value)
    except (TypeError, ValueError):
        pass
    type_name = getattr(hint, "__name__", str(hint))
    raise UserError(f"Setting '{name}' in {where} must be a {type_name}, got {value!r}.")


def validate(cfg: TrainConfig) -> TrainConfig:
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a)
            raise UserError(f"Setting '{name}' is {value!r}; it must be one of {shown}.")
    positive = ("rank", "batch_size", "micro_batch", "steps", "resolution", "save_every", "log_every",
                "max_sequence_length", "teacher_max_sequence_length")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"Setting '{name}' must be a positive number, got {getattr(cfg, name)}.")
    if cfg.batch_size % cfg.micro_batch:
        raise UserError(
            f"batch_size ({cfg.batch_size}) must be a multiple of micro_batch ({cfg.micro_batch}): "
            "the optimizer step averages batch_size / micro_batch accumulated micro-batches."
        )
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"ema_decay must be in [0, 1), got {cfg.ema_decay} (the paper uses 0.9999).")
    if cfg.alpha <= 0:
        raise UserError(f"alpha must be positive, got {cfg.alpha}.")
    if cfg.resolution % 16:
        raise UserError(f"resolution must be a multiple of 16 (VAE 8x and patch 2x), got {cfg.resolution}.")
    if cfg.keep_checkpoints < 0 or cfg.preview_every < 0:
        raise UserError("keep_checkpoints and preview_every must be >= 0 (0 means keep all / no previews).")
    if cfg.train_states < 0 or cfg.rollout_steps < 0:
        raise UserError("rollout_steps and train_states must be >= 0 (0 means the default).")
    if cfg.act_quant == "int8" and cfg.quant != "qint8":
        raise UserError(
            f"act_quant = 'int8' multiplies int8 activations with an int8 base weight, so it needs "
            f"quant = 'qint8' (this run has quant = '{cfg.quant}'). Set --quant qint8, or --act-quant off."
        )
    if cfg.rollout_steps and cfg.train_states > cfg.rollout_steps:
        raise UserError(
            f"train_states ({cfg.train_states}) cannot exceed rollout_steps ({cfg.rollout_steps})."
        )
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    names = set(field_names())
    for key, value in overrides.items():
        if key not in names:
            raise _unknown_key(key, where)
        setattr(cfg, key, _coerce(key, value, where))
    return cfg


def preset_names() -> list[str]:
    folder = resources.files("lowvram_dopsd.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_preset(name_or_path: str) -> tuple[dict[str, Any], str]:
    """A preset is a shipped name (`16gb`) or a path to a TOML file of the same keys."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        entry = resources.files("lowvram_dopsd.presets").joinpath(f"{name_or_path}.toml")
        if not entry.is_file():
            raise UserError(
                f"Unknown preset '{name_or_path}'. Shipped presets: {', '.join(preset_names())}; "
                "or pass the path of your own .toml file with the same keys."
            )
        text, where = entry.read_text(encoding="utf-8"), f"preset '{name_or_path}'"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"Could not parse {where}: {exc}. Fix the TOML syntax and run again.") from exc
    return data, where


def load_config(preset: str | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    cfg = TrainConfig()
    if preset:
        data, where = read_preset(preset)
        data.pop("description", None)  # human text shown by `presets`, not a setting
        apply_overrides(cfg, data, where)
    apply_overrides(cfg, overrides or {}, "the command line")
    return validate(cfg)
