"""Training configuration: one flat, typed dataclass, filled from a preset file and overrides.

Presets live in `presets/*.toml` (shipped as `lowvram_dopsd.presets`). Any key can be overridden
from the command line (`--steps 500` or `--set lr=1e-5`). Unknown keys are rejected with the
closest valid name, so a typo in a preset never silently trains with a default. A preset file of
your own can start from another one (`base = "16gb"`) and override a few of its settings.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import shlex
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from .errors import UserError, quote

# diffusers' exact attention backends (lowvram_dopsd/accel.py says why these)
ATTENTION_BACKENDS = ("native", "_native_flash", "_native_cudnn", "_native_efficient", "_native_math", "flash",
                      "_flash_3")

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_TEACHER_VLM = "Qwen/Qwen3-VL-4B-Instruct"
# The authors' klein edit-teacher instruction (their FLUX.2-klein-4B training script's --edit-sys-prompt).
DEFAULT_EDIT_INSTRUCTION = ("Make the main subject (facial/ip details), background, and overall composition "
                            "consistent with the reference image.")


def setting(default: Any, help: str, choices: tuple[str, ...] = (), section: str = "") -> Any:
    """A TrainConfig field with its one-line help (shown by `train --help` and `lowvram-dopsd settings`),
    the values a string setting may take (checked by `validate`), and, on the first field of a group,
    the group's title."""
    meta = {"help": help, "choices": choices, "section": section}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    model: str = setting(DEFAULT_MODEL, "Hugging Face id or local diffusers folder of the base model "
                         "(Z-Image-Turbo, FLUX.2-klein 4B / 9B, FLUX.3 Image Klein)", section="What to train on")
    transformer_file: str = setting("", "a .safetensors transformer (a fine-tune or merge, original or diffusers "
                                    "key layout) used instead of the model's transformer/; the rest of --model "
                                    "(VAE, text encoder, scheduler) as is; '' = the model's own")
    images: str = setting("", "folder of training images (.jpg/.png/.webp), each with an optional same-name "
                          ".txt caption, or a .toml dataset file with several folders (README)")
    caption: str = setting("", "caption for images without a .txt ('' = the trigger alone)")
    trigger: str = setting("", "word(s) naming your subject or style: put in front of every caption that lacks "
                           "them; a '[trigger]' placeholder in a caption is replaced")
    output: str = setting("out", "folder for the LoRA, checkpoints, previews and metrics.jsonl")

    teacher: str = setting("", "teacher condition: 'vlm' (caption + your photo, read by Qwen3-VL) or 'edit' "
                           "(klein's and FLUX.3's reference-image path); '' = the model's default",
                           choices=("", "vlm", "edit"), section="The method (paper §2.2, Appendix D)")
    teacher_encoder: str = setting(DEFAULT_TEACHER_VLM, "Qwen3-VL folder or id for the vlm teacher's graft; the "
                                   "default becomes the model's match (Qwen3-VL-8B-Instruct for klein 9B's "
                                   "Qwen3-8B); FLUX.3 reads your photo with its own encoder")
    edit_instruction: str = setting(DEFAULT_EDIT_INSTRUCTION, "appended to the caption for the edit teacher "
                                    "(default: the authors' instruction)")
    loss: str = setting("x0", "'x0' (the authors' code: the velocity error weighted by sigma², early steps "
                        "weigh more) or 'velocity' (paper eq. 6)", choices=("velocity", "x0"))
    rollout_steps: int = setting(0, "steps of each student roll-out; 0 = the model's own (Z-Image 8, klein 4, "
                                    "FLUX.3 16)")
    train_states: int = setting(0, "visited states trained per roll-out, chosen at random; 0 = all of them "
                                   "(paper), except FLUX.3: 4 of its 16. The others cost one forward "
                                   "pass each, about a quarter of a trained one: 2 of Z-Image's 8 should take "
                                   "~0.45 of the step time")
    ema_decay: float = setting(0.9999, "EMA decay of the teacher's LoRA (paper: 0.9999)")
    prior_prompts: list[str] = setting(
        [], "prompts WITHOUT your subject, e.g. 'a photo of a dog' for 'sks dog' ('|'-separated on the command "
        "line): each step also rolls out a micro-batch of them and pulls the student toward the bare base model "
        "there, so the LoRA changes less of what it should not (DreamBooth's prior preservation, on-policy; not "
        "in the paper); [] = off")
    prior_weight: float = setting(1.0, "weight of the prior_prompts roll-out's loss against your images' loss; 0 = "
                                       "only measure it (prior_loss in metrics.jsonl: how far the LoRA moved them)")

    train_mode: str = setting("lora", "'lora': train a LoRA on the frozen base (the student and its EMA teacher are two "
                              "LoRA sets on one base); 'full': train every transformer weight, sharded over the GPUs "
                              "with FSDP2, the teacher a second sharded copy (docs/full.md)", choices=("lora", "full"),
                              section="What trains")
    ema_dtype: str = setting("fp32", "train_mode = 'full': the EMA teacher's weights in 'fp32', or 'bf16' (half the "
                             "memory; each update rounded stochastically, since 1 - ema_decay of a step is below "
                             "bf16's resolution); the LoRA's EMA is always fp32", choices=("fp32", "bf16"))

    rank: int = setting(64, "LoRA rank (paper: 64)", section="LoRA and optimisation (paper: rank 64, alpha "
                        "128, batch 4, lr 4e-5 Z-Image / 1e-5 klein)")
    alpha: float = setting(128.0, "LoRA alpha: the update is scaled by alpha / rank")
    lora_init: str = setting("gaussian", "initial LoRA A (B starts at 0): 'gaussian' N(0, 1/rank²), the authors' "
                             "(the paper's learning rates were tuned with it), or 'kaiming' uniform(±1/sqrt(in "
                             "features)), peft's default: 1.7-2.7x smaller at rank 64, so the LoRA learns slower",
                             choices=("gaussian", "kaiming"))
    init_lora: str = setting("", "start from this LoRA instead of a fresh one (a LoRA this tool wrote: an output, "
                             "checkpoint or step LoRA, or its ComfyUI export); student and EMA teacher both start "
                             "as it; its rank and alpha must be the run's; '' = fresh")
    lora_targets: list[str] = setting([], "module names that get a LoRA (comma-separated on the command line); "
                                      "[] = the model's attention and feed-forward linears")
    lr: float = setting(0.0, "learning rate; 0 = the paper's for the model (Z-Image 4e-5, klein 1e-5; FLUX.3 "
                        "klein's, no paper value)")
    batch_size: int = setting(4, "roll-outs per optimizer step")
    micro_batch: int = setting(1, "roll-outs per forward pass; batch_size / micro_batch are accumulated")
    steps: int = setting(1000, "optimizer steps to train")
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps (0 = none)")
    lr_schedule: str = setting("constant", "learning rate after the warm-up: 'constant' (the paper's and the "
                               "authors'), or 'cosine' / 'linear' decay to 0 at the last step",
                               choices=("constant", "cosine", "linear"))
    max_grad_norm: float = setting(1.0, "gradient-norm clip (0 = no clipping)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    optimizer: str = setting("adamw", "'adamw' (torch) or 'adamw8bit' (bitsandbytes: 8-bit moments, a "
                             "quarter of the optimizer memory)", choices=("adamw", "adamw8bit"))
    seed: int = setting(0, "seed of the noise, the item order and the LoRA initialisation")

    resolution: int = setting(1024, "training area is resolution², each image keeping its aspect ratio "
                              "(buckets); a multiple of 16", section="Resolution and precision")
    dtype: str = setting("bf16", "compute dtype of the frozen base", choices=("bf16", "fp16", "fp32"))
    quant: str = setting("none", "frozen base in 8 bits, shared by student and teacher: 'qint8' / 'qfloat8' "
                         "(optimum-quanto), 'bnb-int8' (bitsandbytes), 'none' (bf16)",
                         choices=("none", "qint8", "qfloat8", "bnb-int8"))
    act_quant: str = setting("off", "'int8': the 8-bit base's matmuls also quantise their activations per "
                             "token (int8 tensor cores; quant = 'qint8' only; docs/kernels.md)",
                             choices=("off", "int8"))
    grad_checkpointing: bool = setting(True, "recompute each block's activations in the backward pass: "
                                       "far less memory, about 1/3 more compute in the trained passes")
    teacher_ema_on: str = setting("device", "where the EMA teacher's fp32 weights live: 'cpu' keeps them in host "
                                  "RAM and the GPU a copy in the compute dtype (exact for the teacher passes; "
                                  "0.30 GiB less for Z-Image at rank 64; the EMA update then runs on the CPU)",
                                  choices=("device", "cpu"))
    kernels: str = setting("auto", "Triton kernels (D-OPSD loss, fused 8-bit LoRA linear): 'auto' = on CUDA, "
                           "'on' = force (CPU: TRITON_INTERPRET=1), 'off' = plain torch",
                           choices=("auto", "on", "off"))
    torch_compile: str = setting("off", "'blocks': torch.compile each repeated transformer block (regional "
                                 "compilation; the 8-bit linears and the LoRA stay outside the graphs, so switching "
                                 "student and teacher compiles nothing); the first steps take longer. Speed-up not "
                                 "measured yet (docs/speed.md)", choices=("off", "blocks"),
                                 section="Speed (docs/speed.md; the defaults are what was measured)")
    attention_backend: str = setting("", "diffusers' attention backend: '' = its default (PyTorch's SDPA, which picks "
                                     "flash, cuDNN or memory-efficient attention itself; the run prints which), or "
                                     "native, _native_flash, _native_cudnn, _native_efficient, _native_math, flash "
                                     "(flash-attn 2), _flash_3 (FlashAttention 3, Hopper). 8-bit attention is not "
                                     "offered: its numerics are not measured", choices=("", *ATTENTION_BACKENDS))
    keep_blocks: str = setting("0", "selective checkpointing: blocks that keep their activations instead of "
                               "recomputing them in the backward (less compute, more memory); 'auto' = as many as "
                               "fit the preset's memory budget, chosen by the planner (`plan` shows how many); "
                               "0 = recompute every block")
    device: str = setting("auto", "where training runs ('auto': CUDA if available)", choices=("auto", "cuda", "cpu"))
    encoders_on: str = setting("auto", "where the text encoder and VLM compute the conditions ('auto' = device)",
                               choices=("auto", "cpu", "cuda"))

    max_sequence_length: int = setting(512, "text tokens of the student's caption (the pipeline's default, 512)",
                                       section="Encoders")
    teacher_max_sequence_length: int = setting(1024, "tokens of the vlm teacher's condition, image "
                                               "tokens included (the authors': 1024)")
    vlm_min_pixels: int = setting(512 * 512, "the VLM reads your photo resized to at least this many pixels")
    vlm_max_pixels: int = setting(768 * 768, "the VLM reads your photo resized to at most this many pixels")
    cache_dir: str = setting("", "cache of computed conditions ('' = ~/.cache/lowvram-dopsd/features)")

    save_every: int = setting(250, "write a resumable checkpoint every N steps (and at the end and on Ctrl-C or "
                              "SIGTERM)", section="Checkpoints and input checks")
    keep_checkpoints: int = setting(3, "keep the last K checkpoints (0 = keep all)")
    lora_every: int = setting(0, "also write the student LoRA alone every N steps, as loras/step-NNNNNN.safetensors "
                              "in the compute dtype, never deleted (rank 64, bf16: 0.32 GB each for Z-Image, "
                              "0.19 GB for klein), to pick the best step afterwards with `sample`; 0 = off")
    on_bad_image: str = setting("skip", "unreadable or too-small images: 'skip' (listed at the start) or 'stop'",
                                choices=("skip", "stop"))

    preview_every: int = setting(0, "sample a preview grid before training, every N steps and at the end "
                                 "(0 = off)", section="Previews")
    preview_prompts: list[str] = setting([], "preview prompts ('|'-separated on the command line); [] = two "
                                         "training captions and two new scenes with the trigger (one per trigger with "
                                         "a dataset file's several)")
    preview_seed: int = setting(1000, "image i of a grid uses seed preview_seed + i (as `sample --seed`)")
    preview_teacher: bool = setting(False, "add a row of the EMA teacher's samples, reading your photo")

    log_with: str = setting("none", "also log each step's numbers (loss, lr, grad norm, s/step, peak VRAM) and the "
                            "previews to 'tensorboard': <output>/tensorboard, watch with `tensorboard --logdir "
                            "<output>` (needs `pip install tensorboard`); or to 'wandb': a Weights & Biases run "
                            "(needs `pip install wandb`; a resumed run continues it); metrics.jsonl is always written",
                            choices=("none", "tensorboard", "wandb"), section="Logging")

    def resolved_lr(self, family_default: float) -> float:
        return self.lr if self.lr > 0 else family_default

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# the values each string setting may take (its `choices`), e.g. CHOICES["quant"]
CHOICES = {f.name: f.metadata["choices"] for f in fields(TrainConfig) if f.metadata["choices"]}


LIST_SEPARATORS = {"preview_prompts": "|", "prior_prompts": "|"}
SETTINGS = {f.name: f for f in fields(TrainConfig)}  # name -> field, its metadata holds help, choices, section


def typed_value(name: str, value: Any) -> str:
    """A setting's value as it is typed after `--set name=` (lists joined by their separator, bools lowercase)."""
    if isinstance(value, list):
        return LIST_SEPARATORS.get(name, ",").join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


# flag -> config key, for the settings people change most; everything else via --set key=value.
# Here rather than in cli.py so that checkpoint.py can name a setting's flag without importing the CLI.
FLAGS = {
    "--model": "model", "--transformer-file": "transformer_file", "--images": "images", "--caption": "caption",
    "--trigger": "trigger",
    "--output": "output", "--teacher": "teacher", "--teacher-encoder": "teacher_encoder", "--loss": "loss",
    "--steps": "steps", "--rank": "rank", "--alpha": "alpha", "--lora-init": "lora_init", "--init-lora": "init_lora",
    "--lr": "lr", "--lr-schedule": "lr_schedule",
    "--warmup-steps": "warmup_steps", "--batch-size": "batch_size",
    "--micro-batch": "micro_batch", "--resolution": "resolution", "--rollout-steps": "rollout_steps",
    "--train-states": "train_states", "--ema-decay": "ema_decay", "--quant": "quant",
    "--optimizer": "optimizer", "--device": "device", "--encoders-on": "encoders_on", "--dtype": "dtype",
    "--seed": "seed", "--cache-dir": "cache_dir", "--save-every": "save_every", "--lora-every": "lora_every",
    "--preview-every": "preview_every", "--kernels": "kernels",
    "--act-quant": "act_quant", "--log-with": "log_with", "--train-mode": "train_mode",
}
FLAG_OF = {key: flag for flag, key in FLAGS.items()}  # config key -> its flag


def as_argument(name: str, value: Any) -> str:
    """The shell words that set `name` to `value`: its flag where it has one, else --set (shell-quoted)."""
    typed = typed_value(name, value)
    return f"{FLAG_OF[name]} {shlex.quote(typed)}" if name in FLAG_OF else "--set " + shlex.quote(f"{name}={typed}")


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _unknown_key(key: str, where: str) -> UserError:
    valid = field_names()
    close = difflib.get_close_matches(key, valid, n=1)
    docs = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    hint = f" Did you mean '{close[0]}' ({docs[close[0]]})?" if close else ""
    return UserError(
        f"Unknown setting '{key}' in {where}.{hint} Valid settings are: {', '.join(valid)} "
        "(`lowvram-dopsd settings` says what each one does)."
    )


def coerce(name: str, value: Any, where: str = "the command line") -> Any:
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
            if isinstance(value, bool) or not math.isfinite(float(value)):  # "nan", "inf" parse as floats
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
    wanted = {float: "a finite number such as 0.5", int: "a whole number such as 4", bool: "true or false",
              str: "text", list[str]: "a list of text"}[hint]
    shown = quote(value) if isinstance(value, str) else repr(value)
    raise UserError(f"Setting '{name}' in {where} must be {wanted}, got {shown} "
                    f"({SETTINGS[name].metadata['help']}).")


NOTHING_TO_KEEP = ("keep_blocks keeps some blocks out of gradient checkpointing, which is off in this run "
                   "(grad_checkpointing = false: every block keeps its activations already). Set keep_blocks "
                   "= 0 (the default), or turn checkpointing on with --set grad_checkpointing=true.")


def validate(cfg: TrainConfig) -> TrainConfig:
    if cfg.attention_backend.startswith(("sage", "_sage")):  # before the generic list of choices: say why
        raise UserError(f"attention_backend = '{cfg.attention_backend}' is an 8-bit attention (SageAttention: int8 "
                        "Q·Kᵀ, fp8 P·V). It changes the teacher's and the student's velocities, and what that does "
                        "to D-OPSD's gradients has not been measured, so it is not offered. Leave attention_backend "
                        "= '' (exact attention).")
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a)
            raise UserError(f"Setting '{name}' is {value!r}; it must be one of {shown}.")
    positive = ("rank", "batch_size", "micro_batch", "steps", "resolution", "save_every",
                "max_sequence_length", "teacher_max_sequence_length", "vlm_min_pixels", "vlm_max_pixels")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"Setting '{name}' must be a positive number, got {getattr(cfg, name)}.")
    # 0 means something for these (their help says what); a negative value means nothing
    non_negative = ("prior_weight", "lr", "warmup_steps", "max_grad_norm", "weight_decay", "keep_checkpoints",
                    "preview_every", "rollout_steps", "train_states", "lora_every")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise UserError(f"Setting '{name}' must be 0 or more, got {getattr(cfg, name)} "
                            f"({SETTINGS[name].metadata['help']}).")
    if cfg.keep_blocks != "auto" and not cfg.keep_blocks.isdigit():
        raise UserError(f"Setting 'keep_blocks' is {cfg.keep_blocks!r}; it must be 'auto' or a whole number of blocks "
                        f"({SETTINGS['keep_blocks'].metadata['help']}).")
    if cfg.keep_blocks != "0" and not cfg.grad_checkpointing:  # else the planner keeps nothing, unsaid
        raise UserError(NOTHING_TO_KEEP)
    if cfg.vlm_min_pixels > cfg.vlm_max_pixels:
        raise UserError(f"vlm_min_pixels ({cfg.vlm_min_pixels}) is above vlm_max_pixels ({cfg.vlm_max_pixels}): "
                        "the VLM resizes your photo into that range. Lower the first or raise the second.")
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
    if cfg.act_quant == "int8" and cfg.quant != "qint8":
        raise UserError(
            f"act_quant = 'int8' multiplies int8 activations with an int8 base weight, so it needs "
            f"quant = 'qint8' (this run has quant = '{cfg.quant}'). Set --quant qint8, or --act-quant off."
        )
    check_train_mode(cfg)
    if cfg.rollout_steps and cfg.train_states > cfg.rollout_steps:
        raise UserError(
            f"train_states ({cfg.train_states}) cannot exceed rollout_steps ({cfg.rollout_steps})."
        )
    return cfg


def check_train_mode(cfg: TrainConfig) -> None:
    """The settings that mean nothing, or something else, when every weight trains (train_mode = 'full')."""
    if cfg.train_mode == "lora":
        if cfg.ema_dtype != "fp32":
            raise UserError(f"ema_dtype = {cfg.ema_dtype!r} is the full fine-tune's setting (train_mode = 'full'); the "
                            "LoRA's EMA teacher is always fp32. Remove ema_dtype, or set --set train_mode=full.")
        return
    fix = "Use a full-* preset (`lowvram-dopsd presets`), or set train_mode = 'lora'."
    if cfg.quant != "none":
        raise UserError(f"quant = {cfg.quant!r} makes the frozen base 8-bit, but with train_mode = 'full' nothing is "
                        f"frozen: every transformer weight trains (fp32 weights, computed in {cfg.dtype}). Set "
                        f"quant = 'none' (--quant none). {fix}")
    if cfg.dtype == "fp16":
        raise UserError("train_mode = 'full' computes in bf16 (or fp32): fp16 gradients of every weight underflow "
                        f"without loss scaling. Set --dtype bf16. {fix}")
    lora_only = [(name, why) for name, why in (
        ("prior_prompts", "their target is the bare base model, which a full fine-tune no longer holds"),
        ("lora_every", "a step's whole transformer is the size of the model"),
        ("init_lora", "a LoRA starts a LoRA run"),
        ("torch_compile", "the speed levers are not wired to the sharded transformers yet"),
        ("attention_backend", "the speed levers are not wired to the sharded transformers yet"),
        ("keep_blocks", "the speed levers are not wired to the sharded transformers yet"))
        if getattr(cfg, name) not in ("", "off", "0", [], 0)]
    if lora_only:
        name, why = lora_only[0]
        raise UserError(f"{name} is not available with train_mode = 'full' ({why}). Remove {name}, or train a "
                        "LoRA (train_mode = 'lora').")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    names = set(field_names())
    for key, value in overrides.items():
        if key not in names:
            raise _unknown_key(key, where)
        setattr(cfg, key, coerce(key, value, where))
    return cfg


def preset_names() -> list[str]:
    folder = resources.files("lowvram_dopsd.presets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _preset_file(name: str, folder: Path | None = None, named_in: str = "") -> tuple[Any, str]:
    """(file, where) of a preset: a .toml path, taken from `folder` when relative, or a shipped name."""
    path = Path(folder or "", name)
    if path.suffix == ".toml" and path.is_file():
        return path.resolve(), str(path)
    entry = resources.files("lowvram_dopsd.presets").joinpath(f"{name}.toml")
    if not entry.is_file():
        raise UserError(
            f"Unknown preset '{path if path.suffix == '.toml' else name}'"
            f"{f' (the base of {named_in})' if named_in else ''}. Shipped presets: {', '.join(preset_names())}; "
            "or pass the path of your own .toml file with the same keys."
        )
    return entry, f"preset '{name}'"


def _parse_preset(file: Any, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"Could not parse {where}: {exc}. Fix the TOML syntax and run again.") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a binary file, a folder named .toml, no permission
        raise UserError(f"Could not read {where} ({exc}): a preset is a UTF-8 TOML text file of settings "
                        "(`lowvram-dopsd settings` lists them).") from exc


def read_preset(name_or_path: str) -> tuple[dict[str, Any], str]:
    """A preset is a shipped name (`16gb`) or a path to a TOML file of the same keys."""
    file, where = _preset_file(name_or_path)
    return _parse_preset(file, where), where


def preset_layers(preset: str) -> list[tuple[dict[str, Any], str]]:
    """The preset and the ones it builds on, base first, each as (its keys, where it is). A preset's
    `base = "16gb"` (a shipped name, or a .toml path relative to the file) starts it from that preset,
    whose settings its own then override; the base may have a base in turn."""
    layers, files, name, folder, named_in = [], [], preset, None, ""
    while name:
        file, where = _preset_file(name, folder, named_in)
        if file in files:  # resolved paths: the same file however its base was spelled
            chain = " -> ".join([w for _, w in layers] + [where])
            raise UserError(f"Presets name each other as base in a loop: {chain}. Remove one of these `base` keys.")
        data = _parse_preset(file, where)
        name = data.pop("base", "")
        if not isinstance(name, str):
            raise UserError(f"'base' in {where} must be a shipped preset's name or a .toml path, got {name!r}.")
        layers.append((data, where))
        files.append(file)
        folder, named_in = file.parent, where
    return layers[::-1]


def shipped_root(preset: str) -> str:
    """The shipped preset at the bottom of a preset's `base` chain: itself if shipped, '16gb' for a file
    built on it, '' for a file with no shipped base (`plan` takes the card's memory from it)."""
    # shipped presets have no base, so one in the chain is its first layer, "where" = "preset 'NAME'"
    _, where = preset_layers(preset)[0]
    return where[len("preset '"):-1] if where.startswith("preset '") else ""


def load_config(preset: str | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    cfg = TrainConfig()
    for data, where in preset_layers(preset) if preset else []:
        data.pop("description", None)  # human text shown by `presets`, not a setting
        apply_overrides(cfg, data, where)
    apply_overrides(cfg, overrides or {}, "the command line")
    return validate(cfg)
