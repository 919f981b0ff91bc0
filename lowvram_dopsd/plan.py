"""Memory planner: where a D-OPSD training step's GPU memory goes, from the model's config alone.

    lowvram-dopsd plan --preset 16gb --model Tongyi-MAI/Z-Image-Turbo
    lowvram-dopsd plan --preset 16gb --model ./my-zimage-folder --resolution 768

No weights and no GPU: the transformer is built on PyTorch's `meta` device from its config, so
every parameter is counted exactly, per kind (8-bit linears, linears kept in bf16, norms, LoRA).
The public ids we support are planned before anything is downloaded, from the configs kept in
`lowvram_dopsd/published/` (their sources are listed in the README there).

The prediction, for `micro_batch` = B roll-outs per forward (the trainer forwards B samples at
once, each with its own condition):

    peak = frozen base + LoRA (student + EMA teacher, fp32) + LoRA grads (fp32) + optimizer state
         (teacher_ema_on = "cpu": the EMA teacher is a bf16 copy, its fp32 state in host RAM)
         + activations of the worst phase + workspace

Only the activations depend on B; weights, LoRA, grads, optimizer state and workspace do not.
Activations (tokens T = image tokens (H/16)(W/16) + text tokens, both padded as the pipeline pads):
  * with gradient checkpointing every block keeps only its input (T x dim, bf16); in backward one
    block is recomputed with all its activations (`k_block * T * dim` bytes; k_block is measured
    on the real diffusers block with LoRA, see `measure_block_activations`), plus the backward's
    own temporaries (`c_bwd * T * dim * 2`, calibrated on a GPU);
  * without it every block keeps all its activations;
  * the teacher and the untrained roll-out steps run without autograd state: only transients
    (`c_fwd * T_teacher * dim * 2`, smaller on the fused 8-bit kernel). For Z-Image that is smaller
    than the student's backward; for klein's edit teacher (image tokens x 2) on quanto it is the
    peak phase.
Each of these is per sample and is multiplied by B; only the bf16 casts of a block's LoRA factors
(saved once per recomputed block) are not. The GPU calibration (`c_bwd`, `c_fwd`, the recorded runs)
is at B = 1: the linear scaling in B is the model, not a GPU measurement. On the CPU,
`measure_block_activations(batch=2)` checks it on the real blocks: per sample they keep what they
keep at B = 1, except klein's double-stream block, 2 B/token/dim more (its attention output is split
into text and image tokens; at B > 1 the slices are not contiguous and the LoRA's `x @ A^T` saves a
copy). That makes it as large as the single-stream block planned here, ~0.1 % of a klein peak: left
out. The model is an upper bound where the trainer splits a micro-batch (klein runs samples whose
conditions differ in shape one at a time).
The prior_prompts roll-out (train.py) also forwards B samples, at `resolution`, with the student's
conditions on both sides: its student backward is the phase planned here, and its target pass (the
bare base, no grad, student tokens) is smaller than that backward, so it adds no phase.
The calibration constants and the measurements they come from are in `CALIBRATION` below and in
`benchmarks/results/memory-*.md`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .quant import QUANTO, fused_linear_planned

GiB = 2**30

# Supported public ids -> folder under lowvram_dopsd/published/
PUBLISHED = {
    "Tongyi-MAI/Z-Image-Turbo": "Tongyi-MAI--Z-Image-Turbo",
    "black-forest-labs/FLUX.2-klein-4B": "black-forest-labs--FLUX.2-klein-4B",
}

# What fits where: the targets for peak allocated memory (the CUDA context, the caching
# allocator's slack and the desktop take the rest of the card).
CARD_BUDGET_GIB = {"12gb": 10.5, "16gb": 14.0, "24gb": 22.0}


def budget_for(vram_gib: float) -> float:
    """Allocatable budget on a card of `vram_gib` (16 -> 14.0, 24 -> 21.0, 12 -> 10.5)."""
    return round(vram_gib * 0.875, 2)


# ---------------------------------------------------------------------------------------------
# Architectures the planner knows: how tokens flow through the blocks
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    family: str
    model_class: str                  # diffusers class
    pipeline_class: str
    skip: tuple[str, ...]             # module prefixes kept in the compute dtype (quant.py)
    lora_targets: tuple[str, ...]
    # saved activation bytes per token per unit of `dim` for ONE block of each block list (bf16
    # compute, LoRA on, excluding the LoRA's own per-token intermediates, added separately), measured
    # with saved-tensor hooks on the real diffusers blocks (measure_block_activations; diffusers 0.42)
    k_block: dict[str, float]
    default_teacher: str
    # transients of a forward without autograd state (teacher pass), in units of tokens * dim * 2
    # bytes; calibrated on an H100 (benchmarks/results): the widest intermediate tensors of a block
    c_fwd: float
    # the same with the 8-bit LoRA linears on the fused Triton kernel (no dequantised weight, no
    # [tokens, out] LoRA temporaries); memory-nvidia-h100-80gb-hbm3.md run 3
    c_fwd_fused: float


def with_family(arch: "Arch") -> "Arch":
    """The LoRA targets and quantization skip list come from the family adapter itself, so the
    planner always counts what the trainer builds (one source of truth)."""
    from .families import registered

    cls = next(c for c in registered() if c.pipeline_class == arch.pipeline_class)
    return Arch(**{**arch.__dict__, "lora_targets": cls.lora_targets, "skip": cls.quant_skip})


ARCHS = {
    "ZImagePipeline": Arch(
        family="zimage", model_class="ZImageTransformer2DModel", pipeline_class="ZImagePipeline",
        skip=(), lora_targets=(),  # filled from families.zimage.ZImage by with_family()
        k_block={"noise_refiner": 67.5, "context_refiner": 67.5, "layers": 67.5}, default_teacher="vlm",
        c_fwd=18.6, c_fwd_fused=15.8),  # teacher probe 0.68 GiB on quanto, 0.58 fused (5120 tokens)
    "Flux2KleinPipeline": Arch(
        family="klein", model_class="Flux2Transformer2DModel", pipeline_class="Flux2KleinPipeline",
        skip=(), lora_targets=(),  # filled from families.klein.Klein by with_family()
        k_block={"transformer_blocks": 46.2, "single_transformer_blocks": 48.1}, default_teacher="edit",
        c_fwd=38.5, c_fwd_fused=21.6),  # teacher probe 1.92 GiB on quanto, 1.08 fused (8704 tokens)
}

# Calibrated on an H100 (benchmarks/bench_memory.py -> benchmarks/results/memory-*.md; docs/memory.md):
#   c_bwd  backward temporaries of the recomputed block + everything outside the blocks, in units of
#          tokens * dim * 2 bytes. The student probes at 1024² and 768² (Z-Image) give a slope of
#          149.8 B/token/dim; block inputs (2 x 30 of 34 blocks) + k_block 67.5 + 2 x c_bwd = 151.5.
#   work   fixed workspace, bytes. The probes' intercept is ~0.01 GiB, and the bf16 and qint8 bases
#          give the same student peak: quanto's per-layer dequantized weight is freed before the peak.
CALIBRATION = {"c_bwd": 12.0, "work": 32 * 2**20}

# Bytes per quantized weight element and per output-channel scale, by backend
QUANT_BYTES = {
    "none": None,
    "qint8": (1, 2),      # int8 data + one bf16 scale per output channel (quanto keeps the input dtype)
    "qfloat8": (1, 2),    # fp8 e4m3 data + bf16 scale
    "bnb-int8": (1, 4),   # int8 CB + fp32 SCB per row
}


# ---------------------------------------------------------------------------------------------
# Finding the config
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    arch: Arch
    transformer: dict[str, Any]
    source: str          # where the config was read from (shown in the table)


def published_dir(model_id: str) -> Path | None:
    name = PUBLISHED.get(model_id)
    if name is None:
        return None
    return Path(str(resources.files("lowvram_dopsd") / "published" / name))


def resolve_model(model: str) -> ModelConfig:
    """Config of a local folder, a supported public id (no download), or any id's two config files."""
    path = Path(model).expanduser()
    if path.exists():
        folder, source = path, str(path)
    elif published_dir(model) is not None:
        folder, source = published_dir(model), f"published config of {model} (lowvram_dopsd/published)"
    else:
        folder, source = _fetch_configs(model), f"{model} (config files only)"
    try:
        index = json.loads((folder / "model_index.json").read_text())
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"Could not read model_index.json and transformer/config.json of '{model}' ({exc}). "
                        "Point --model to a diffusers checkpoint folder or a supported id "
                        f"({', '.join(PUBLISHED)}).") from exc
    arch = ARCHS.get(index.get("_class_name", ""))
    if arch is None:
        raise UserError(f"'{model}' is a {index.get('_class_name', 'unknown')} checkpoint; the planner knows "
                        f"{', '.join(ARCHS)}.")
    return ModelConfig(with_family(arch), transformer, source)


def _fetch_configs(model_id: str) -> Path:
    if model_id.count("/") != 1:
        raise UserError(f"'{model_id}' is neither a folder nor a Hugging Face id (owner/name).")
    import logging

    from huggingface_hub import hf_hub_download

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its "... thrown while requesting HEAD" warning would precede our message
    try:
        index = hf_hub_download(model_id, "model_index.json")
        hf_hub_download(model_id, "transformer/config.json")
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
        raise UserError(f"Could not get the configs of '{model_id}' ({why}). The planner needs only "
                        "model_index.json and transformer/config.json: pass a folder that holds them.") from exc
    finally:
        hub_log.setLevel(level)
    return Path(index).parent


# ---------------------------------------------------------------------------------------------
# Exact parameter counts from a meta model
# ---------------------------------------------------------------------------------------------
@dataclass
class Counts:
    quant_weight: int = 0      # elements of the linears a backend quantizes
    quant_rows: int = 0        # their output channels (one scale each)
    quant_bias: int = 0
    kept_linear: int = 0       # linears under `skip` (weights + biases)
    other: int = 0             # norms, pad tokens, ...
    lora: int = 0              # one LoRA set (A and B of every target)
    lora_layers: int = 0
    max_linear: int = 0        # largest quantized weight (dequantization workspace)
    blocks: dict[str, int] = field(default_factory=dict)   # block list name -> number of blocks

    @property
    def total(self) -> int:
        return self.quant_weight + self.quant_bias + self.kept_linear + self.other


def build_meta(arch: Arch, transformer: dict[str, Any]) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, arch.model_class)
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in transformer.items() if not k.startswith("_")})


def count(model: nn.Module, skip: tuple[str, ...], targets: tuple[str, ...], rank: int) -> Counts:
    from .lora import is_target
    from .quant import _skipped

    c = Counts()
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if isinstance(module, nn.ModuleList) and "." not in name:
            c.blocks[name] = len(module)
        if type(module) is nn.Linear:
            n_w = module.weight.numel()
            n_b = module.bias.numel() if module.bias is not None else 0
            if _skipped(name, skip):
                c.kept_linear += n_w + n_b
            else:
                c.quant_weight += n_w
                c.quant_rows += module.out_features
                c.quant_bias += n_b
                c.max_linear = max(c.max_linear, n_w)
            if is_target(name, module, targets):
                c.lora += rank * (module.in_features + module.out_features)
                c.lora_layers += 1
        else:
            c.other += sum(p.numel() for p in own)
    return c


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def image_tokens(height: int, width: int) -> int:
    """Both families: VAE /8, then 2x2 patches (Z-Image patchify, klein's packed latents)."""
    return (height // 16) * (width // 16)


@dataclass
class Tokens:
    img: int
    text_student: int
    text_teacher: int
    img_teacher: int       # klein's edit teacher sees the reference latents too: 2 x img

    @property
    def student(self) -> int:
        return self.img + self.text_student

    @property
    def teacher(self) -> int:
        return self.img_teacher + self.text_teacher


def tokens_for(arch: Arch, height: int, width: int, text_student: int, text_teacher: int,
               teacher: str) -> Tokens:
    img = image_tokens(height, width)
    if arch.family == "zimage":  # the transformer pads captions and images to multiples of 32 tokens
        return Tokens(_ceil(img, 32), _ceil(text_student, 32), _ceil(text_teacher, 32), _ceil(img, 32))
    return Tokens(img, text_student, text_teacher, 2 * img if teacher == "edit" else img)


def block_streams(arch: Arch, counts: Counts, tok: Tokens) -> list[tuple[str, int, int]]:
    """(block list, number of blocks, tokens through each) for the student's forward."""
    if arch.family == "zimage":
        return [("noise_refiner", counts.blocks.get("noise_refiner", 0), tok.img),
                ("context_refiner", counts.blocks.get("context_refiner", 0), tok.text_student),
                ("layers", counts.blocks.get("layers", 0), tok.student)]
    return [("transformer_blocks", counts.blocks.get("transformer_blocks", 0), tok.student),
            ("single_transformer_blocks", counts.blocks.get("single_transformer_blocks", 0), tok.student)]


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    what: str
    detail: str
    bytes: float
    in_peak: bool = True


@dataclass
class Plan:
    model: str
    source: str
    arch: Arch
    settings: dict[str, Any]
    counts: Counts
    tokens: Tokens
    rows: list[Row]
    peak: float
    no_ckpt_activations: float
    phase: str
    budget_gib: float | None = None

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    def fits(self) -> bool:
        return self.budget_gib is None or self.peak_gib <= self.budget_gib

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "family": self.arch.family, "settings": self.settings,
                "params_total": self.counts.total, "params_quantized": self.counts.quant_weight,
                "lora_params": self.counts.lora, "tokens_student": self.tokens.student,
                "tokens_teacher": self.tokens.teacher, "peak_gib": round(self.peak_gib, 3),
                "phase": self.phase, "budget_gib": self.budget_gib,
                "rows": [{"what": r.what, "detail": r.detail, "gib": round(r.bytes / GiB, 4), "in_peak": r.in_peak}
                         for r in self.rows]}


def weights_bytes(c: Counts, quant: str, dtype_bytes: int = 2) -> tuple[float, float]:
    """(bytes of the quantized linears, bytes kept in the compute dtype)."""
    kept = (c.kept_linear + c.other) * dtype_bytes
    if quant == "none":
        return 0.0, kept + (c.quant_weight + c.quant_bias) * dtype_bytes
    data, scale = QUANT_BYTES[quant]
    return c.quant_weight * data + c.quant_rows * scale + c.quant_bias * dtype_bytes, kept


def optimizer_bytes(n: int, optimizer: str) -> float:
    if optimizer == "adamw8bit":  # two uint8 states + fp32 absmax per 256-element block for each
        return 2 * n + 2 * 4 * math.ceil(n / 256)
    return 8 * n                  # two fp32 states


def make_plan(model: str, settings: dict[str, Any], mc: ModelConfig | None = None,
              calibration: dict[str, float] | None = None, budget_gib: float | None = None) -> Plan:
    """`settings`: resolution (or height/width), rank, quant, optimizer, grad_checkpointing,
    max_sequence_length, teacher_max_sequence_length, teacher, teacher_ema_on, micro_batch (default 1), dtype
    (default bf16; fp32 doubles the compute-dtype bytes: a model, the calibration is bf16; all
    as in TrainConfig), and fused_linear (the 8-bit layers run on the fused Triton kernel; default False:
    quanto)."""
    cal = {**CALIBRATION, **(calibration or {})}
    mc = mc or resolve_model(model)
    arch = mc.arch
    s = dict(settings)
    height = int(s.get("height") or s["resolution"])
    width = int(s.get("width") or s["resolution"])
    teacher = s.get("teacher") or arch.default_teacher
    meta = build_meta(arch, mc.transformer)
    c = count(meta, arch.skip, tuple(s.get("lora_targets") or arch.lora_targets), int(s["rank"]))
    dim = _dim(meta, mc.transformer)
    tok = tokens_for(arch, height, width, int(s["max_sequence_length"]),
                     int(s["teacher_max_sequence_length"]), teacher)
    quant = s["quant"]
    dtype = s.get("dtype") or "bf16"
    # bytes per element of the compute dtype: the base kept unquantized, the activations and the LoRA's
    # casts. Calibrated in bf16; fp32 doubles each of them (a model, not measured: fp32 is for the CPU)
    e = 4 if dtype == "fp32" else 2
    q_bytes, kept_bytes = weights_bytes(c, quant, e)
    b = int(s.get("micro_batch") or 1)  # samples per forward: every per-token activation term is x b
    per = f" x {b} samples" if b > 1 else ""

    rows = []
    if quant != "none":
        rows.append(Row("frozen base, 8-bit", f"{c.quant_weight / 1e9:.2f}B weights ({quant}) + scales", q_bytes))
    rows.append(Row(f"frozen base, {dtype}", f"{(c.total - (c.quant_weight + c.quant_bias if quant != 'none' else 0)) / 1e9:.3f}B "
                    "params (skipped layers, norms, pad tokens)" if quant != "none" else f"{c.total / 1e9:.2f}B params",
                    kept_bytes))
    rows.append(Row("LoRA student (fp32)", f"{c.lora / 1e6:.1f}M params, rank {s['rank']}, {c.lora_layers} layers",
                    4 * c.lora))
    if s.get("teacher_ema_on", "device") == "cpu":  # the fp32 EMA in host RAM, a bf16 copy on the GPU
        rows.append(Row(f"LoRA EMA teacher ({dtype} copy)", "its fp32 EMA state in host RAM", e * c.lora))
    else:
        rows.append(Row("LoRA EMA teacher (fp32)", "same shapes, a buffer", 4 * c.lora))
    rows.append(Row("LoRA gradients (fp32)", "kept across the roll-out's per-step backwards", 4 * c.lora))
    rows.append(Row("optimizer state", s["optimizer"], optimizer_bytes(c.lora, s["optimizer"])))
    static = sum(r.bytes for r in rows)

    streams = block_streams(arch, c, tok)
    n_blocks = sum(n for _, n, _ in streams)
    rank = int(s["rank"])
    lora_per_block = c.lora_layers / max(n_blocks, 1)
    lora_copies = e * c.lora / max(n_blocks, 1)   # compute-dtype casts of one block's LoRA factors, saved for backward

    def full(name: str, t: int) -> float:  # all saved activations of one block with t tokens per sample
        return b * (arch.k_block[name] * e / 2 * t * dim + lora_per_block * rank * e * t) + lora_copies

    block_full = {name: full(name, t) for name, n, t in streams if n}
    worst = max(block_full, key=block_full.get)
    t_worst = next(t for name, _, t in streams if name == worst)
    inputs = b * sum(n * t * dim * e for _, n, t in streams)
    bwd = b * cal["c_bwd"] * tok.student * dim * e
    no_ckpt = sum(n * full(name, t) for name, n, t in streams if n)
    if s.get("grad_checkpointing", True):
        act_rows = [Row("activations: block inputs", f"{n_blocks} checkpointed blocks ({dtype} inputs, <= {tok.student} "
                        f"tokens x {dim}{per})", inputs),
                    Row("activations: one block recomputed", f"{worst}: {arch.k_block[worst]:g} B/token/dim x "
                        f"{t_worst} tokens{per} + LoRA", block_full[worst])]
        student = inputs + block_full[worst] + bwd
    else:
        act_rows = [Row("activations: all blocks (no checkpointing)",
                        f"{n_blocks} blocks x <= {tok.student} tokens{per}", no_ckpt)]
        student = no_ckpt + bwd
    act_rows.append(Row("activations: backward temporaries", f"{cal['c_bwd']:g} x tokens x dim x {e} B{per}", bwd))
    fused = bool(s.get("fused_linear")) and quant in QUANTO
    teacher_fwd = b * cal.get("c_fwd", arch.c_fwd_fused if fused else arch.c_fwd) * tok.teacher * dim * e
    work = cal["work"]
    if student >= teacher_fwd:
        phase, rows_act = "student backward", act_rows
        activation = student
    else:
        phase, rows_act = "teacher forward (no grad)", [Row("activations: teacher pass (no grad)",
                                                            f"{tok.teacher} tokens{per}" + (", fused 8-bit linears"
                                                                                      if fused else ""), teacher_fwd)]
        activation = teacher_fwd
        rows += [Row(r.what, r.detail, r.bytes, in_peak=False) for r in act_rows]
    rows += rows_act
    if phase == "student backward":
        rows.append(Row("teacher pass transients (no grad)", f"{tok.teacher} tokens{per}; not the peak phase",
                        teacher_fwd, in_peak=False))
    rows.append(Row("workspace", "cuBLAS/attention workspaces", work))
    if quant != "none":
        rows.append(Row("(largest dequantized weight)", "transient inside one 8-bit matmul; freed before the peak",
                        c.max_linear * e, in_peak=False))
    if s.get("grad_checkpointing", True):
        rows.append(Row("(activations without checkpointing)", "for comparison", no_ckpt + bwd, in_peak=False))
    peak = static + activation + work
    settings_out = {**{k: s[k] for k in ("rank", "quant", "optimizer", "grad_checkpointing", "max_sequence_length",
                                         "teacher_max_sequence_length", "teacher_ema_on") if k in s}, "dtype": dtype,
                    "height": height, "width": width, "teacher": teacher, "micro_batch": b}
    return Plan(model, mc.source, arch, settings_out, c, tok, rows, peak, no_ckpt + bwd, phase, budget_gib)


def _dim(meta: nn.Module, transformer: dict[str, Any]) -> int:
    if "dim" in transformer:
        return int(transformer["dim"])
    return int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"])


# ---------------------------------------------------------------------------------------------
# Suggestions when it does not fit
# ---------------------------------------------------------------------------------------------
def suggest(model: str, settings: dict[str, Any], budget_gib: float, mc: ModelConfig | None = None
            ) -> list[tuple[str, Plan]]:
    """Cumulative changes, least intrusive first, that bring the peak under `budget_gib`."""
    mc = mc or resolve_model(model)
    s = dict(settings)
    out = []
    steps: list[tuple[str, dict[str, Any]]] = []
    if s.get("dtype") == "fp32":  # twice the bytes of bf16 in the base and every activation
        steps.append(("--dtype bf16", {"dtype": "bf16"}))
    if s["quant"] == "none":
        steps.append(("--quant qint8", {"quant": "qint8"}))
    if s["optimizer"] != "adamw8bit":
        steps.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if not s.get("grad_checkpointing", True):
        steps.append(("--set grad_checkpointing=true", {"grad_checkpointing": True}))
    if s.get("teacher_ema_on", "device") != "cpu":  # same math; the EMA update moves to the CPU
        steps.append(("--set teacher_ema_on=cpu", {"teacher_ema_on": "cpu"}))
    if int(s.get("micro_batch") or 1) > 1:  # batch_size is kept through accumulation; only slower
        steps.append(("--micro-batch 1", {"micro_batch": 1}))
    res = int(s.get("resolution") or 1024)
    for r in (896, 768, 640, 512):
        if r < res:
            steps.append((f"--resolution {r}", {"resolution": r, "height": None, "width": None}))
    for rank in (32, 16):
        if rank < int(s["rank"]):
            steps.append((f"--rank {rank}", {"rank": rank}))
    applied: dict[str, str] = {}  # setting -> its flag: a later --resolution replaces an earlier one
    for flag, change in steps:
        s.update(change)
        applied[next(iter(change))] = flag
        p = make_plan(model, s, mc, budget_gib=budget_gib)
        if p.fits():
            out.append((" ".join(applied.values()), p))
            break
    # single changes that fit on their own are often nicer than the cumulative list
    for flag, change in steps:
        p = make_plan(model, {**settings, **change}, mc, budget_gib=budget_gib)
        if p.fits() and all(flag != o[0] for o in out):
            out.insert(0, (flag, p))
    return out


def plan_from_config(cfg, budget_gib: float | None = None) -> Plan:
    """The plan for a TrainConfig (what `train` will run), e.g. to warn before loading anything."""
    return make_plan(cfg.model, _settings(cfg), budget_gib=budget_gib)


def _settings(cfg) -> dict[str, Any]:
    return {"resolution": cfg.resolution, "rank": cfg.rank, "quant": cfg.quant, "optimizer": cfg.optimizer,
            "grad_checkpointing": cfg.grad_checkpointing, "max_sequence_length": cfg.max_sequence_length,
            "teacher_max_sequence_length": cfg.teacher_max_sequence_length, "teacher": cfg.teacher,
            "teacher_ema_on": cfg.teacher_ema_on, "micro_batch": cfg.micro_batch, "dtype": cfg.dtype,
            "lora_targets": list(cfg.lora_targets), "fused_linear": fused_linear_planned(cfg.kernels, cfg.quant) or cfg.act_quant != "off"}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def render(plan: Plan, console=None, suggestions: list[tuple[str, Plan]] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    s = plan.settings
    title = (f"{plan.model} ({plan.arch.family}) - {s['height']}x{s['width']}, {s.get('dtype', 'bf16')}, rank {s['rank']}, "
             f"quant {s['quant']}, {s['optimizer']}, checkpointing {'on' if s.get('grad_checkpointing', True) else 'off'}")
    b = s.get("micro_batch", 1)
    batch = (f"micro_batch {b} (activations scaled linearly from the batch-1 GPU calibration)" if b > 1
             else "micro_batch 1")
    # Text: the model's path and the config's are the user's, printed as typed (no markup)
    table = Table(title=Text(title), caption=Text(f"config: {plan.source}; {batch}; tokens: student "
                                                  f"{plan.tokens.student}, teacher {plan.tokens.teacher}; peak phase: "
                                                  f"{plan.phase}"))
    table.add_column("where", style="bold")
    table.add_column("what")
    table.add_column("GiB", justify="right")
    for r in plan.rows:
        gib = f"{r.bytes / GiB:.2f}"
        table.add_row(r.what if r.in_peak else f"[dim]{r.what}[/]", r.detail if r.in_peak else f"[dim]{r.detail}[/]",
                      gib if r.in_peak else f"[dim]({gib})[/]")
    table.add_section()
    table.add_row("predicted peak", "torch.cuda.max_memory_allocated over a step", f"[bold]{plan.peak_gib:.2f}[/]")
    if plan.budget_gib is not None:
        colour = "green" if plan.fits() else "red"
        table.add_row("budget", "allocatable on this card", f"[{colour}]{plan.budget_gib:.2f}[/]")
    console.print(table)
    console.print(f"[dim]parameters: {plan.counts.total / 1e9:.3f}B in the transformer; "
                  f"{plan.counts.quant_weight / 1e9:.3f}B in quantizable linears; "
                  f"{plan.counts.lora / 1e6:.2f}M per LoRA set. Rows in (brackets) are not part of the peak.[/]")
    if plan.budget_gib is not None and not plan.fits():
        console.print(f"[bold red]warning:[/] this run is predicted to need {plan.peak_gib:.2f} GiB, more than the "
                      f"{plan.budget_gib:.2f} GiB budget: it will run out of memory.")
        for flag, p in suggestions or []:
            console.print(f"  try [bold]{flag}[/]: {p.peak_gib:.2f} GiB")
        if not suggestions:
            console.print("  no setting brings it under the budget; use a larger card.")


# ---------------------------------------------------------------------------------------------
# Measuring one block (tests, and to re-derive `k_block` when diffusers changes a block)
# ---------------------------------------------------------------------------------------------
def measure_block_activations(family: str, dim_heads: int = 4, tokens: int = 256, text: int = 64,
                              rank: int = 8, quant: str = "none", batch: int = 1) -> dict[str, float]:
    """Bytes saved for backward by one real diffusers block with LoRA (bf16, CPU), per token per dim
    per sample, for a forward of `batch` samples.

    Counts every tensor the autograd graph keeps, minus the block's inputs (checkpointing keeps
    those anyway), the module's own parameters (they exist regardless) and the bf16 casts of the
    LoRA factors (once per forward, whatever the batch). Returns a dict per block kind. About the
    same value at batch 2 as at batch 1 is what lets make_plan scale these terms by micro_batch.
    """
    from .lora import DualLoRA
    from .quant import _leaves, quantize_frozen

    import diffusers

    H = dim_heads
    D = H * 128
    torch.manual_seed(0)
    if family == "zimage":
        m = diffusers.ZImageTransformer2DModel(in_channels=16, dim=D, n_layers=1, n_refiner_layers=1, n_heads=H,
                                               n_kv_heads=H, cap_feat_dim=64, axes_dims=[32, 48, 48],
                                               axes_lens=[1536, 512, 512]).to(torch.bfloat16)
        arch = with_family(ARCHS["ZImagePipeline"])
    else:
        m = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=128, num_attention_heads=H, joint_attention_dim=64,
                                              mlp_ratio=3.0, guidance_embeds=False).to(torch.bfloat16)
        arch = with_family(ARCHS["Flux2KleinPipeline"])
    quantize_frozen(m, quant, arch.skip)
    DualLoRA.attach(m, arch.lora_targets, rank, 2 * rank)
    own: set[int] = set()
    for t in list(m.parameters()) + list(m.buffers()):
        own.update(x.untyped_storage().data_ptr() for x in _leaves(t))

    def lora_copies(block: nn.Module) -> float:  # bf16 casts of the block's LoRA factors (not per token)
        return 2.0 * sum(p.numel() for n, p in block.named_parameters() if n.endswith(("student_A", "student_B")))

    def run(fn, inputs, block: nn.Module) -> float:
        mine = set(own) | {x.untyped_storage().data_ptr() for x in inputs}
        seen: dict[int, int] = {}

        def pack(t):
            for x in _leaves(t):
                try:
                    ptr = x.untyped_storage().data_ptr()
                except RuntimeError:
                    continue
                if ptr not in mine:
                    seen[ptr] = x.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return float(sum(seen.values())) - lora_copies(block)

    out = {}
    B = batch
    if family == "zimage":
        T = tokens
        x = torch.randn(B, T, D, dtype=torch.bfloat16, requires_grad=True)
        freqs = torch.randn(B, T, 64, dtype=torch.complex64)
        ad = torch.randn(B, 256, dtype=torch.bfloat16)
        out["layers"] = run(lambda: m.layers[0](x, None, freqs, ad), [x, freqs], m.layers[0]) / (B * T * D)
    else:
        N, L = tokens, text
        hs = torch.randn(B, N, D, dtype=torch.bfloat16, requires_grad=True)
        enc = torch.randn(B, L, D, dtype=torch.bfloat16, requires_grad=True)
        temb = torch.randn(B, D, dtype=torch.bfloat16)
        with torch.no_grad():
            mi, mt, ms = (m.double_stream_modulation_img(temb), m.double_stream_modulation_txt(temb),
                          m.single_stream_modulation(temb))
            rot = m.pos_embed(torch.zeros(N + L, 4))
        out["transformer_blocks"] = run(
            lambda: m.transformer_blocks[0](hidden_states=hs, encoder_hidden_states=enc, temb_mod_img=mi,
                                            temb_mod_txt=mt, image_rotary_emb=rot, joint_attention_kwargs=None),
            [hs, enc, *rot], m.transformer_blocks[0]) / (B * (N + L) * D)
        xs = torch.randn(B, N + L, D, dtype=torch.bfloat16, requires_grad=True)
        out["single_transformer_blocks"] = run(lambda: m.single_transformer_blocks[0](xs, None, ms, rot, None),
                                               [xs, *rot], m.single_transformer_blocks[0]) / (B * (N + L) * D)
    return out


def vram_of_preset(preset: str | None) -> float | None:
    """The budget of the card preset a run is built on: `--preset 16gb`, or a file whose `base` is it."""
    from .config import shipped_root

    return CARD_BUDGET_GIB.get(shipped_root(preset)) if preset else None
