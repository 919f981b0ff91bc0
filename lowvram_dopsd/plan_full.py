"""`plan --train-mode full --gpus N`: where each GPU's memory goes when every weight trains, sharded N ways.

    lowvram-dopsd plan --preset full-8x24gb --model Tongyi-MAI/Z-Image-Turbo
    lowvram-dopsd plan --train-mode full --gpus 4 --vram 80 --optimizer adamw8bit

The same model of a step as plan.py's (the parameters counted exactly on a meta model; the activations of the
student's backward or the teacher's pass, whichever is larger, from plan.make_plan with no LoRA), with full
fine-tuning's static memory in place of the frozen base and the LoRA (full.py says where each lives):

    per GPU = (master fp32 weights 4 + fp32 gradients 4 + optimizer state + EMA teacher) x P / N
            + the gathered weights of a block, and of the next one prefetched (compute dtype)
            + a block's unsharded gradients in the compute dtype and as fp32 for the reduce-scatter
            + the root's own weights, gathered in the compute dtype for the whole forward (student and teacher)
            + activations and workspace (as plan.py; they do not shrink with N)

P: the transformer's parameters; optimizer state 8 bytes (AdamW's two fp32 moments) or ~2 (8-bit AdamW);
EMA teacher 4 (fp32) or 2 (bf16) bytes, 0 on the GPU with teacher_ema_on = "cpu" (then host RAM). The
sharded terms are exact up to FSDP's padding of each tensor to a multiple of N rows; the block terms are
FSDP2's defaults (one block prefetched, reshard after forward). None of it was measured on a GPU yet: how
one GPU checks every term is in docs/full.md ("Checking the planner on one GPU").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import plan
from .plan import GiB, Row

EMA_BYTES = {"fp32": 4, "bf16": 2}
# The full-* presets' GPUs and card memory (GiB): `plan --preset full-8x24gb` plans 8 cards of 24 GB
PRESET_CARDS = {"full-8x24gb": (8, 24.0), "full-4x80gb": (4, 80.0), "full-1x80gb": (1, 80.0)}


@dataclass
class FullPlan:
    model: str
    family: str
    gpus: int
    params: int                     # P: the transformer's parameters
    rows: list[Row]                 # per GPU
    host: list[Row]                 # per node's host RAM (the EMA teacher with teacher_ema_on = "cpu")
    settings: dict[str, Any]
    budget_gib: float | None = None
    smallest: int | None = None     # the fewest GPUs of this budget that fit (None: no number of them does)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return sum(r.bytes for r in self.rows if r.in_peak) / GiB

    def fits(self) -> bool:
        return self.budget_gib is None or self.peak_gib <= self.budget_gib

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "family": self.family, "train_mode": "full", "gpus": self.gpus,
                "params": self.params, "peak_gib_per_gpu": round(self.peak_gib, 3), "budget_gib": self.budget_gib,
                "fits": self.fits(), "smallest_gpus": self.smallest, "settings": self.settings, "notes": self.notes,
                "rows": [{"what": r.what, "detail": r.detail, "gib": round(r.bytes / GiB, 4), "in_peak": r.in_peak}
                         for r in self.rows],
                "host_rows": [{"what": r.what, "detail": r.detail, "gib": round(r.bytes / GiB, 4)} for r in self.host]}


@dataclass
class Sizes:
    """What the full plan needs of the model, whatever the number of GPUs."""

    params: int
    max_block: int      # the largest block's parameters (one FSDP unit)
    root: int           # the parameters outside the blocks (the root's FSDP unit)
    activations: float  # bytes: the activation phase and workspace of plan.make_plan, without LoRA


def sizes(cfg, mc=None) -> Sizes:
    """Counted on the meta model; the activations from plan.py's model with a LoRA of rank 0 on a bf16 base."""
    from .quant import units

    mc = mc or plan.resolve_model(cfg.model)
    settings = {**plan._settings(cfg), "rank": 0, "quant": "none", "fused_linear": False}
    lora_free = plan.make_plan(cfg.model, settings, mc)
    e = 4 if cfg.dtype == "fp32" else 2
    base = sum(plan.weights_bytes(lora_free.counts, "none", e))
    meta = plan.build_meta(mc.family, mc.transformer)
    blocks = [sum(p.numel() for p in m.parameters()) for name, m in units(meta) if name.rsplit(".", 1)[-1].isdigit()]
    total = sum(p.numel() for p in meta.parameters())
    return Sizes(total, max(blocks, default=0), total - sum(blocks), lora_free.peak - base)


def make(cfg, gpus: int, budget_gib: float | None = None, mc=None, sz: Sizes | None = None) -> FullPlan:
    mc = mc or plan.resolve_model(cfg.model)
    sz = sz or sizes(cfg, mc)
    e = 4 if cfg.dtype == "fp32" else 2
    dtype = "fp32" if e == 4 else "bf16"
    n, p = gpus, sz.params
    ema = EMA_BYTES[cfg.ema_dtype] * p
    on_host = cfg.teacher_ema_on == "cpu"
    opt = plan.optimizer_bytes(p, cfg.optimizer)
    rows = [Row("student weights (fp32 master)", f"{p / 1e9:.2f}B params / {n} GPUs", 4 * p / n),
            Row("student gradients (fp32)", "reduce-scattered after each backward, kept sharded", 4 * p / n),
            Row("optimizer state", f"{cfg.optimizer}, sharded", opt / n),
            Row(f"EMA teacher ({cfg.ema_dtype})", "in host RAM (teacher_ema_on = 'cpu')" if on_host else "sharded",
                ema / n, in_peak=not on_host),
            Row(f"gathered blocks ({dtype})", f"the running block and the next one, {sz.max_block / 1e6:.0f}M params "
                "each", 2 * e * sz.max_block),
            Row("a block's gradients before the reduce-scatter", f"{dtype}, then fp32", (e + 4) * sz.max_block),
            Row(f"root weights gathered ({dtype})", f"{sz.root / 1e6:.0f}M params outside the blocks, during a "
                "pass (a bound: student and teacher)", 2 * e * sz.root),
            Row("activations and workspace", "plan.py's model of the step (no LoRA; the same on every GPU)",
                sz.activations)]
    local = max(1, min(n, 8))
    host = [Row(f"EMA teacher ({cfg.ema_dtype}, pinned)", f"the shards of {local} GPU{'s' * (local > 1)} of one node",
                ema * local / n)] if on_host else []
    notes = []
    if cfg.grad_accum % n:
        notes.append(f"batch_size {cfg.batch_size} / micro_batch {cfg.micro_batch} = {cfg.grad_accum} micro-batches "
                     f"do not divide among {n} GPUs: train_mode = 'full' needs a multiple of {n} "
                     f"(--batch-size {shared_batch(n, cfg.batch_size, cfg.micro_batch)})")
    settings = {k: getattr(cfg, k) for k in ("resolution", "dtype", "optimizer", "ema_dtype", "teacher_ema_on",
                                              "grad_checkpointing", "micro_batch", "batch_size")}
    fp = FullPlan(cfg.model, mc.family.name, n, p, rows, host, settings, budget_gib, notes=notes)
    if budget_gib is not None:
        fp.smallest = smallest_gpus(cfg, budget_gib, mc, sz)
    return fp


def smallest_gpus(cfg, budget_gib: float, mc=None, sz: Sizes | None = None, most: int = 1024) -> int | None:
    """The fewest GPUs of `budget_gib` each that hold this run, or None when even `most` do not (the terms
    that do not shrink with N, activations and gathered blocks, are over the budget)."""
    mc = mc or plan.resolve_model(cfg.model)
    sz = sz or sizes(cfg, mc)
    lo = 1
    while lo <= most:
        if make(cfg, lo, None, mc, sz).peak_gib <= budget_gib:
            return lo
        lo += max(1, lo // 8)  # every count up to 16, then ~12 % steps (18, 20, ..., 32, 36, ...)
    return None


def render(fp: FullPlan, console) -> None:
    from rich.table import Table
    from rich.text import Text

    s = fp.settings
    title = (f"{fp.model} ({fp.family}), full fine-tune on {fp.gpus} GPU{'s' * (fp.gpus > 1)} - {s['resolution']}², "
             f"{s['dtype']}, {s['optimizer']}, EMA {s['ema_dtype']}"
             + (" in host RAM" if s["teacher_ema_on"] == "cpu" else ""))
    table = Table(title=Text(title), caption=Text("per GPU; not measured on a GPU yet (docs/full.md)"))
    for col, justify in (("where", "left"), ("what", "left"), ("GiB", "right")):
        table.add_column(col, justify=justify)
    for r in fp.rows:
        gib = f"{r.bytes / GiB:.2f}"
        table.add_row(Text(r.what, style="" if r.in_peak else "dim"), Text(r.detail, style="" if r.in_peak else "dim"),
                      gib if r.in_peak else f"({gib})")
    table.add_section()
    table.add_row("predicted peak", "per GPU", f"{fp.peak_gib:.2f}")
    if fp.budget_gib is not None:
        table.add_row("budget", "allocatable on this card", Text(f"{fp.budget_gib:.2f}",
                                                                 style="green" if fp.fits() else "red"))
    console.print(table)
    for r in fp.host:
        console.print(f"host RAM per node: {r.what}, {r.detail}: {r.bytes / GiB:.1f} GiB")
    for note in fp.notes:
        console.print(f"note: {note}")
    if fp.budget_gib is not None:
        console.print(f"The fewest such GPUs that hold this run: {fp.smallest}{sharing(fp.smallest, s)}." if fp.smallest
                      else "No number of such GPUs holds this run: the terms that do not shrink with the GPUs "
                      "(activations, gathered blocks) are over the budget. Lower --resolution, or use larger cards.")


def sharing(n: int, settings: dict[str, Any]) -> str:
    """What `--gpus n` also needs: each process rolls out as many micro-batches as the others (full.py)."""
    batch, micro = settings["batch_size"], settings["micro_batch"]
    if (batch // micro) % n == 0:
        return ""
    more = next((k for k in range(n + 1, batch // micro + 1) if (batch // micro) % k == 0), None)
    return (f"; their processes share a step's micro-batches evenly only with --batch-size a multiple of "
            f"{n * micro} (e.g. {shared_batch(n, batch, micro)})"
            + (f", or take {more} GPUs for batch_size {batch}" if more else ""))


def shared_batch(n: int, batch: int, micro: int) -> int:
    """The smallest batch_size from `batch` up whose micro-batches divide among n processes."""
    return -(-batch // (n * micro)) * n * micro
