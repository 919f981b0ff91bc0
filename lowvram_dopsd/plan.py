"""Memory planner: where a D-OPSD training step's GPU memory goes, from the model's config alone.

    lowvram-dopsd plan --preset 16gb --model Tongyi-MAI/Z-Image-Turbo
    lowvram-dopsd plan --preset 16gb --model ./my-zimage-folder --resolution 768

No weights and no GPU: the transformer is built on PyTorch's `meta` device from its config, so
every parameter is counted exactly, per kind (8-bit linears, linears kept in bf16, norms, LoRA).
The public ids we support are planned before anything is downloaded, from the configs kept in
`lowvram_dopsd/published/` (their sources are listed in the README there). Everything about the
architecture (its block lists, the tokens through each, the constants below) comes from the family
adapter (families/base.py, "the memory planner"); this module holds the arithmetic.

The prediction, for `micro_batch` = B roll-outs per forward (the trainer forwards B samples at
once, each with its own condition):

    peak = frozen base + LoRA (student + EMA teacher, fp32) + LoRA grads (fp32) + optimizer state
         (teacher_ema_on = "cpu": the EMA teacher is a bf16 copy, its fp32 state in host RAM)
         + activations of the worst phase + workspace

Only the activations depend on B; weights, LoRA, grads, optimizer state and workspace do not.
Activations (tokens T = image tokens (H/16)(W/16) + text tokens, both padded as the pipeline pads):
  * with gradient checkpointing every block keeps only its input (T x dim, bf16); in backward one
    block is recomputed with all its activations (the family's `k_block * T * dim` bytes, measured
    on the real diffusers block with LoRA by `measure_block_activations`), plus the backward's own
    temporaries (`c_bwd * T * dim * 2`, calibrated on a GPU);
  * without it every block keeps all its activations;
  * the teacher and the untrained roll-out steps run without autograd state: only transients
    (the family's `c_fwd * T_teacher * dim * 2`, `c_fwd_fused` on the fused 8-bit kernel). For
    Z-Image that is smaller than the student's backward; for klein's edit teacher (image tokens x 2)
    on quanto it is the peak phase.
Each of these is per sample and is multiplied by B; only the bf16 casts of a block's LoRA factors
(saved once per recomputed block) are not. The GPU calibration (`c_bwd`, `c_fwd`, the recorded runs)
is at B = 1: the linear scaling in B is the model, not a GPU measurement. On the CPU,
`measure_block_activations(batch=2)` checks it on the real blocks: per sample they keep what they
keep at B = 1, except klein's double-stream block, which keeps a little more (its attention output is
split into text and image tokens; at B > 1 the slices are not contiguous and the LoRA's `x @ A^T`
saves a copy) and so becomes as large as the single-stream block planned here: left out
(tests/test_plan.py measures both). The model is an upper bound where the trainer splits a micro-batch (klein runs samples whose
conditions differ in shape one at a time).
The prior_prompts roll-out (train.py) also forwards B samples, at `resolution`, with the student's
conditions on both sides: its student backward is the phase planned here, and its target pass (the
bare base, no grad, student tokens) is smaller than that backward, so it adds no phase.
How the constants were measured, and how close the plans come to the GPU runs: docs/memory.md,
"The planner" (runs in `benchmarks/results/memory-*.md`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .families import family_of_index, published_dir, registered
from .families.base import Family, Tokens
from .files import pipeline_index
from .quant import QUANTO, fused_linear_planned
from .runtime import block_lists

GiB = 2**30

# What fits where: the targets for peak allocated memory (the CUDA context, the caching
# allocator's slack and the desktop take the rest of the card).
CARD_BUDGET_GIB = {"12gb": 10.5, "16gb": 14.0, "24gb": 22.0}


def budget_for(vram_gib: float) -> float:
    """Allocatable budget on a card of `vram_gib` (16 -> 14.0, 24 -> 21.0, 12 -> 10.5)."""
    return round(vram_gib * 0.875, 2)


# Every family's, calibrated on a GPU (docs/memory.md, "The planner"):
#   c_bwd  backward temporaries of the recomputed block + everything outside the blocks, in units of
#          tokens * dim * 2 bytes (the slope of the student probes at two resolutions, less the blocks');
#   work   fixed workspace, bytes (the probes' intercept: quanto's per-layer dequantized weight is
#          freed before the peak).
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
    family: type[Family]
    transformer: dict[str, Any]
    source: str          # where the config was read from (shown in the table)
    folder: Path | None = None  # the folder that holds it (the time planner builds the family's adapter on it)


def planned_families() -> list[type[Family]]:
    """The families whose adapters carry the planner's numbers."""
    return [cls for cls in registered() if cls.k_block]


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
        index = pipeline_index(folder)
        transformer = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        ids = [i for cls in planned_families() for i in cls.hf_repo_ids]
        raise UserError(f"Could not read model_index.json and transformer/config.json of '{model}' ({exc}). "
                        "Point --model to a diffusers checkpoint folder or a supported id "
                        f"({', '.join(ids)}).") from exc
    family = family_of_index(index)
    if family is None or not family.k_block:
        raise UserError(f"'{model}' is a {index.get('_class_name', 'unknown')} checkpoint; the planner knows "
                        f"{', '.join(cls.pipeline_class for cls in planned_families())}.")
    if folder == published_dir(model) and model in family.unpublished_configs:  # said where it is shown
        source = f"{model}: {family.unpublished_configs[model]} (lowvram_dopsd/published)"
    return ModelConfig(family, transformer, source, folder)


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


def build_meta(family: type[Family], transformer: dict[str, Any]) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, family.transformer_class)
    with torch.device("meta"):
        return cls.from_config({k: v for k, v in transformer.items() if not k.startswith("_")})


def count(model: nn.Module, skip: tuple[str, ...], targets: tuple[str, ...], rank: int) -> Counts:
    from .lora import is_target
    from .quant import _skipped

    c = Counts()
    c.blocks = {name: len(blocks) for name, blocks in block_lists(model).items()}
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
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
    family: type[Family]
    settings: dict[str, Any]
    counts: Counts
    tokens: Tokens
    rows: list[Row]
    peak: float
    no_ckpt_activations: float
    phase: str
    budget_gib: float | None = None
    kept: dict[str, int] = field(default_factory=dict)  # blocks per block list kept out of checkpointing

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    def fits(self) -> bool:
        return self.budget_gib is None or self.peak_gib <= self.budget_gib

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "family": self.family.name, "settings": self.settings,
                "params_total": self.counts.total, "params_quantized": self.counts.quant_weight,
                "lora_params": self.counts.lora, "tokens_student": self.tokens.student,
                "tokens_teacher": self.tokens.teacher, "peak_gib": round(self.peak_gib, 3),
                "phase": self.phase, "budget_gib": self.budget_gib, "kept_blocks": self.kept,
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
    family = mc.family
    s = dict(settings)
    height = int(s.get("height") or s["resolution"])
    width = int(s.get("width") or s["resolution"])
    teacher = s.get("teacher") or family.teachers[0]
    meta = build_meta(family, mc.transformer)
    c = count(meta, family.quant_skip, tuple(s.get("lora_targets") or family.lora_targets), int(s["rank"]))
    tok = family.plan_tokens(height, width, int(s["max_sequence_length"]), int(s["teacher_max_sequence_length"]),
                             teacher)
    quant, dtype, checkpointing = s["quant"], s.get("dtype") or "bf16", s.get("grad_checkpointing", True)
    # bytes per element of the compute dtype: the base kept unquantized, the activations and the LoRA's
    # casts. Calibrated in bf16; fp32 doubles each of them (a model, not measured: fp32 is for the CPU)
    e = 4 if dtype == "fp32" else 2

    # what the step holds from start to end, then the activations of its two passes: the larger is the peak
    rows = static_rows(c, s, dtype, e)
    static, work = sum(r.bytes for r in rows), cal["work"]
    act = Activations.of(family, c, tok, _dim(meta, mc.transformer), e, int(s.get("micro_batch") or 1),
                         int(s["rank"]), cal, fused=bool(s.get("fused_linear")) and quant in QUANTO)
    want = str(s.get("keep_blocks") or "0")
    kept = choose_kept(act, want, budget_gib, static, work) if checkpointing else {}
    student, student_rows = student_activations(act, kept, want, checkpointing, dtype)
    phase, activation, phase_rows = peak_phase(act, student, student_rows)
    rows += phase_rows
    # the fixed workspace, then two sizes shown for comparison only
    rows.append(Row("workspace", "cuBLAS/attention workspaces", work))
    if quant != "none":
        rows.append(Row("(largest dequantized weight)", "transient inside one 8-bit matmul; freed before the peak",
                        c.max_linear * e, in_peak=False))
    if checkpointing:
        rows.append(Row("(activations without checkpointing)", "for comparison", act.no_ckpt + act.bwd, in_peak=False))
    settings_out = {**{k: s[k] for k in ("rank", "quant", "optimizer", "grad_checkpointing", "max_sequence_length",
                                         "teacher_max_sequence_length", "teacher_ema_on", "keep_blocks") if k in s},
                    "dtype": dtype, "height": height, "width": width, "teacher": teacher, "micro_batch": act.b}
    return Plan(model, mc.source, family, settings_out, c, tok, rows, static + activation + work,
                act.no_ckpt + act.bwd, phase, budget_gib, kept)


def static_rows(c: Counts, s: dict[str, Any], dtype: str, e: int) -> list[Row]:
    """What a step holds from start to end: the frozen base, the LoRA sets, their gradients and the optimizer's
    state. None of it depends on the resolution or on micro_batch."""
    quant = s["quant"]
    q_bytes, kept_bytes = weights_bytes(c, quant, e)
    rows = []
    if quant != "none":
        rows.append(Row("frozen base, 8-bit", f"{c.quant_weight / 1e9:.2f}B weights ({quant}) + scales", q_bytes))
        rows.append(Row(f"frozen base, {dtype}", f"{(c.total - c.quant_weight - c.quant_bias) / 1e9:.3f}B params "
                        "(skipped layers, norms, pad tokens)", kept_bytes))
    else:
        rows.append(Row(f"frozen base, {dtype}", f"{c.total / 1e9:.2f}B params", kept_bytes))
    rows.append(Row("LoRA student (fp32)", f"{c.lora / 1e6:.1f}M params, rank {s['rank']}, {c.lora_layers} layers",
                    4 * c.lora))
    if s.get("teacher_ema_on", "device") == "cpu":  # the fp32 EMA in host RAM, a bf16 copy on the GPU
        rows.append(Row(f"LoRA EMA teacher ({dtype} copy)", "its fp32 EMA state in host RAM", e * c.lora))
    else:
        rows.append(Row("LoRA EMA teacher (fp32)", "same shapes, a buffer", 4 * c.lora))
    rows.append(Row("LoRA gradients (fp32)", "kept across the roll-out's per-step backwards", 4 * c.lora))
    rows.append(Row("optimizer state", s["optimizer"], optimizer_bytes(c.lora, s["optimizer"])))
    return rows


@dataclass
class Activations:
    """The activation model of one step (the module docstring's), in bytes for `b` samples per forward. The
    student's forward runs through block streams: a block list and the tokens through each of its blocks."""

    family: type[Family]
    tok: Tokens
    dim: int
    e: int                         # bytes per element of the compute dtype
    b: int                         # samples per forward
    c_bwd: float
    fused: bool                    # the teacher's 8-bit linears run on the fused kernel
    counts: dict[str, int]         # blocks of each block list that has any, in the family's order
    tokens: dict[str, int]         # tokens per sample through each block of a list
    block_full: dict[str, float]   # every saved activation of one block of a list, with its LoRA's casts
    order: list[str]               # block lists, the ones that see the most tokens first
    inputs: float                  # every block's input: what a checkpointed block keeps
    bwd: float                     # the backward's own temporaries
    outside: float                 # per-token tensors made outside the blocks (FLUX.3's modulation)
    no_ckpt: float                 # every block's full activations: no checkpointing at all
    teacher_fwd: float             # the teacher's pass (no grad): transients only

    @classmethod
    def of(cls, family: type[Family], c: Counts, tok: Tokens, dim: int, e: int, b: int, rank: int,
           cal: dict[str, float], fused: bool) -> Activations:
        streams = [(name, n, t) for name, n, t in family.block_streams(c.blocks, tok) if n]
        n_blocks = max(sum(n for _, n, _ in streams), 1)
        layers = c.lora_layers / n_blocks  # LoRA layers per block
        lora_copies = e * c.lora / n_blocks  # compute-dtype casts of a block's LoRA factors: once, not per sample
        full = {name: b * (family.k_block[name] * e / 2 * t * dim + layers * rank * e * t) + lora_copies
                for name, _, t in streams}
        # a block kept out of checkpointing saves the most recompute where it sees the most tokens (attention
        # grows with tokens²): those lists are kept first
        order = [name for name, _, _ in sorted(streams, key=lambda x: -x[2])]
        return cls(family, tok, dim, e, b, cal["c_bwd"], fused, counts={name: n for name, n, _ in streams},
                   tokens={name: t for name, _, t in streams}, block_full=full, order=order,
                   inputs=b * sum(n * t * dim * e for _, n, t in streams),
                   bwd=b * cal["c_bwd"] * tok.student * dim * e,
                   outside=b * family.c_outside * tok.student * dim * e,
                   no_ckpt=sum(n * full[name] for name, n, _ in streams),
                   teacher_fwd=b * cal.get("c_fwd", family.c_fwd_fused if fused else family.c_fwd) * tok.teacher
                   * dim * e)

    @property
    def n_blocks(self) -> int:
        return sum(self.counts.values())

    @property
    def per(self) -> str:  # said after every per-sample size
        return f" x {self.b} samples" if self.b > 1 else ""

    def kept_for(self, total: int) -> dict[str, int]:
        """`total` blocks kept out of checkpointing, per block list (the last ones of a list: accel.py)."""
        out: dict[str, int] = {}
        for name in self.order:
            out[name] = min(self.counts[name], total - sum(out.values()))
        return {name: k for name, k in out.items() if k}

    def kept_bytes(self, kept: dict[str, int]) -> float:
        return sum(k * self.block_full[name] for name, k in kept.items())

    def recomputed(self, kept: dict[str, int]) -> list[str]:
        """The block lists that still have checkpointed blocks (recomputed in backward, one at a time)."""
        return [name for name in self.order if kept.get(name, 0) < self.counts[name]]

    def student(self, kept: dict[str, int]) -> float:
        """The student's backward with checkpointing: every block's input, the kept blocks whole, the largest
        recomputed block, the backward's temporaries and what is made outside the blocks."""
        return (self.inputs + self.kept_bytes(kept)
                + max((self.block_full[name] for name in self.recomputed(kept)), default=0.0) + self.bwd + self.outside)


def choose_kept(act: Activations, want: str, budget_gib: float | None, static: float, work: float) -> dict[str, int]:
    """keep_blocks (selective checkpointing): kept blocks hold all their activations and are not recomputed,
    memory for time. A number keeps that many blocks; "auto" as many as fit under the budget (none without
    a budget)."""
    if want == "0":
        return {}
    if want != "auto":
        return act.kept_for(min(int(want), act.n_blocks))
    if budget_gib is None:
        return {}
    fits = [k for k in range(act.n_blocks + 1)
            if static + max(act.student(act.kept_for(k)), act.teacher_fwd) + work <= budget_gib * GiB]
    return act.kept_for(max(fits, default=0))


def student_activations(act: Activations, kept: dict[str, int], want: str, checkpointing: bool, dtype: str
                        ) -> tuple[float, list[Row]]:
    """The student's backward: its bytes and the rows that make them up."""
    per = act.per
    if checkpointing:
        rows = [Row("activations: block inputs", f"{act.n_blocks} checkpointed blocks ({dtype} inputs, <= "
                    f"{act.tok.student} tokens x {act.dim}{per})", act.inputs)]
        if kept:
            rows.append(Row("activations: kept blocks", f"{sum(kept.values())} of {act.n_blocks} blocks keep all "
                            f"their activations (keep_blocks = {want}): "
                            + ", ".join(f"{k} {name}" for name, k in kept.items()), act.kept_bytes(kept)))
        again = act.recomputed(kept)
        if again:
            worst = max(again, key=act.block_full.get)
            rows.append(Row("activations: one block recomputed", f"{worst}: {act.family.k_block[worst]:g} "
                            f"B/token/dim x {act.tokens[worst]} tokens{per} + LoRA", act.block_full[worst]))
        student = act.student(kept)
    else:
        rows = [Row("activations: all blocks (no checkpointing)",
                    f"{act.n_blocks} blocks x <= {act.tok.student} tokens{per}", act.no_ckpt)]
        student = act.no_ckpt + act.bwd + act.outside
    rows.append(Row("activations: backward temporaries", f"{act.c_bwd:g} x tokens x dim x {act.e} B{per}", act.bwd))
    if act.outside:
        rows.append(Row("activations: outside the blocks", f"per-token modulation, {act.family.c_outside:g} x tokens "
                        f"x dim x {act.e} B{per}", act.outside))
    return student, rows


def peak_phase(act: Activations, student: float, student_rows: list[Row]) -> tuple[str, float, list[Row]]:
    """(phase, its activation bytes, rows): the student's backward or the teacher's pass, whichever is larger;
    the other's rows are shown out of the peak."""
    teacher = f"{act.tok.teacher} tokens{act.per}"
    if student >= act.teacher_fwd:
        return "student backward", student, student_rows + [
            Row("teacher pass transients (no grad)", f"{teacher}; not the peak phase", act.teacher_fwd, in_peak=False)]
    shown = [Row(r.what, r.detail, r.bytes, in_peak=False) for r in student_rows]
    return "teacher forward (no grad)", act.teacher_fwd, shown + [
        Row("activations: teacher pass (no grad)", teacher + (", fused 8-bit linears" if act.fused else ""),
            act.teacher_fwd)]


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
    if str(s.get("keep_blocks") or "0") != "0":  # kept blocks trade memory for time: the first to give back
        steps.append(("--set keep_blocks=0", {"keep_blocks": "0"}))
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


def run_settings(cfg) -> dict[str, Any]:
    """`_settings` and what the time planner also reads: how long the run is and how its linears compute."""
    return {**_settings(cfg), "rollout_steps": cfg.rollout_steps, "train_states": cfg.train_states,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "prior": bool(cfg.prior_prompts),
            "act_quant": cfg.act_quant, "train_mode": cfg.train_mode}


def _settings(cfg) -> dict[str, Any]:
    return {"keep_blocks": cfg.keep_blocks,
            "resolution": cfg.resolution, "rank": cfg.rank, "quant": cfg.quant, "optimizer": cfg.optimizer,
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
    title = (f"{plan.model} ({plan.family.name}) - {s['height']}x{s['width']}, {s.get('dtype', 'bf16')}, rank {s['rank']}, "
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
def measure_block_activations(family: type[Family], dim_heads: int = 4, tokens: int = 256, text: int = 64,
                              rank: int = 8, quant: str = "none", batch: int = 1) -> dict[str, float]:
    """Bytes saved for backward by one real block of each kind of the family's tiny model with LoRA
    (bf16, CPU), per token per dim per sample, for a forward of `batch` samples: `k_block`.

    Counts every tensor the autograd graph keeps, minus the block's inputs (checkpointing keeps
    those anyway), the module's own parameters (they exist regardless) and the bf16 casts of the
    LoRA factors (once per forward, whatever the batch). Returns a dict per block kind. About the
    same value at batch 2 as at batch 1 is what lets make_plan scale these terms by micro_batch.
    """
    from .lora import DualLoRA
    from .quant import _leaves, quantize_frozen

    torch.manual_seed(0)
    m = family.tiny_transformer(dim_heads)
    quantize_frozen(m, quant, family.quant_skip)
    DualLoRA.attach(m, family.lora_targets, rank, 2 * rank)
    own: set[int] = set()
    for t in list(m.parameters()) + list(m.buffers()):
        own.update(x.untyped_storage().data_ptr() for x in _leaves(t))

    def lora_copies(block: nn.Module) -> float:  # bf16 casts of the block's LoRA factors (not per token)
        return 2.0 * sum(p.numel() for n, p in block.named_parameters() if n.endswith(("student_A", "student_B")))

    def saved_bytes(probe) -> float:
        mine = set(own) | {x.untyped_storage().data_ptr() for x in probe.inputs}
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
            probe.forward()
        return float(sum(seen.values())) - lora_copies(probe.block)

    dim = dim_heads * 128
    return {name: saved_bytes(probe) / (batch * probe.tokens * dim)
            for name, probe in family.block_probes(m, tokens, text, batch).items()}


def vram_of_preset(preset: str | None) -> float | None:
    """The budget of the card preset a run is built on: `--preset 16gb`, or a file whose `base` is it."""
    from .config import shipped_root

    return CARD_BUDGET_GIB.get(shipped_root(preset)) if preset else None
