"""Time planner: how long one roll-out and a whole run take on a GPU, before anything is downloaded.

    lowvram-dopsd plan --preset 16gb --gpu "RTX 4090"

FLOPs are counted, not estimated. The transformer is built on PyTorch's `meta` device from its config (no
memory), the LoRA attached, and the family's own `velocity` runs one state under torch's FlopCounterMode
(it counts the matrix multiplications and attention; norms and other elementwise work are not counted):

    teacher     the teacher's forward, no grad, with the teacher's condition
    student     the student's forward (an untrained roll-out state costs this alone)
    recompute   the checkpointed blocks' forward again, inside the backward (kept blocks: none)
    backward    the backward proper: input gradients through the frozen base, the LoRA's gradients (a full
                fine-tune, train_mode = "full": every weight's gradient instead of the LoRA's)
    int8        of those, the 8-bit base linears' multiplications (what act_quant = "int8" runs in int8)

per sample; a roll-out is `train_states` trained states and the rest student passes.

Seconds come from an efficiency measured on a GPU we had: a family's measured roll-out time (the family's
`measured_rollout_s`, from benchmarks/results) divided into its counted FLOPs at the spec-sheet rate gives
the share of the tensor-core peak that roll-out reached. On another GPU the prediction is that the same
share of its own spec-sheet rate is reached (gpus.py has the rates and their sources):

    seconds = (FLOPs - int8 FLOPs) / bf16 rate + int8 FLOPs / (int8 rate if act_quant else bf16 rate)
              --------------------------------------------------------------------------------------
                                        measured efficiency of this path

Only the H100 has been measured. Everything else is a prediction, and says so: a card whose step is bound by
memory bandwidth or by the host, not by its tensor cores, will be slower than this.

A full fine-tune's roll-out is counted the same way on a model whose weights all train (no LoRA): its backward
adds each weight's gradient, about one more forward's worth of multiplications. Its seconds use a LoRA roll-out's
efficiency (no full fine-tune has been measured), and leave out what is not multiplications: the optimizer step
and EMA over every weight (once a step) and FSDP's collectives (each pass gathers the weights, each backward
reduce-scatters the gradients), whose time depends on the GPUs' interconnect; `describe` says how many bytes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .gpus import GPU, find_gpu
from .quant import QUANTO
from .runtime import block_lists

TERA = 1e12


@dataclass(frozen=True)
class StateFlops:
    """FLOPs of one trained roll-out state for one sample, by pass (see the module docstring), and of them the
    8-bit base linears' (`*8`; the backward's input gradient through them costs what their forward does)."""

    teacher: float
    student: float
    recompute: float
    backward: float
    teacher8: float = 0.0
    student8: float = 0.0
    recompute8: float = 0.0
    per_block: dict[str, float] = field(default_factory=dict)   # forward FLOPs of one block, by block list
    weights: int = 0  # train_mode = "full": the transformer's weights, all trained (0: a LoRA run)

    @property
    def trained(self) -> float:
        return self.teacher + self.student + self.recompute + self.backward

    @property
    def trained8(self) -> float:
        return self.teacher8 + 2 * self.student8 + self.recompute8


@dataclass(frozen=True)
class RolloutFlops:
    """One roll-out of one sample: `trained` of its `states` states in full, the others a student pass."""

    state: StateFlops
    states: int
    trained: int

    @property
    def total(self) -> float:
        return self.trained * self.state.trained + (self.states - self.trained) * self.state.student

    @property
    def int8(self) -> float:
        return self.trained * self.state.trained8 + (self.states - self.trained) * self.state.student8


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
def _count(fn) -> tuple[float, dict[str, float]]:
    """Total FLOPs of `fn()` and the FLOPs per module (by qualified name, the root's class name first)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        fn()
    per_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), per_module


_COUNTED: dict[tuple, StateFlops] = {}  # a 6B model's meta passes take seconds: once per process and shape
# the settings the count depends on (the rest, e.g. quant or the optimizer, change no multiplication)
COUNTED_SETTINGS = ("resolution", "height", "width", "rank", "lora_targets", "max_sequence_length",
                    "teacher_max_sequence_length", "teacher", "grad_checkpointing", "train_mode")


def state_flops(mc, settings: dict[str, Any], keep: dict[str, int] | None = None) -> StateFlops:
    """Count one trained state of this model (plan.ModelConfig) at these settings (as plan.make_plan takes
    them) on `meta`; `keep`: blocks per block list that are not recomputed (keep_blocks)."""
    shape = {**settings, "teacher": settings.get("teacher") or mc.family.teachers[0],
             "lora_targets": tuple(settings.get("lora_targets") or mc.family.lora_targets)}
    key = (mc.source, tuple(repr(shape.get(k)) for k in COUNTED_SETTINGS), tuple(sorted((keep or {}).items())))
    if key not in _COUNTED:
        _COUNTED[key] = _count_state(mc, settings, keep or {})
    return _COUNTED[key]


@dataclass
class MetaState:
    """One roll-out state of the model on `meta`: the transformer (bf16, LoRA attached; a full fine-tune's: every
    weight trains), its family's adapter, the state and both conditions, in the shapes a real run has."""

    model: nn.Module
    adapter: Any
    x: torch.Tensor
    sigma: torch.Tensor
    c_s: dict
    c_t: dict

    def velocity(self, role: str) -> torch.Tensor:  # a step from sigma 0.5 to 0.25 (flow maps take both)
        return self.adapter.velocity(self.model, self.x, self.sigma, [self.c_t if role == "teacher" else self.c_s],
                                     sigma_next=self.sigma / 2)


def meta_state(mc, s: dict[str, Any]) -> MetaState:
    from .lora import DualLoRA
    from .plan import build_meta

    family = mc.family
    meta = build_meta(family, mc.transformer)
    nn.Module.to(meta, torch.bfloat16)  # the compute dtype (nn.Module's .to: diffusers' own warns about it)
    meta.requires_grad_(s.get("train_mode") == "full")  # full: the backward computes every weight's gradient
    meta._dopsd_dtype = torch.bfloat16
    if s.get("train_mode") != "full":
        rank = int(s["rank"])
        DualLoRA.attach(meta, tuple(s.get("lora_targets") or family.lora_targets), rank, 2.0 * rank)
    adapter = family(mc.folder, mc.source)
    res = int(s.get("resolution") or 1024)
    cfg = SimpleNamespace(max_sequence_length=int(s["max_sequence_length"]), resolution=res,
                          teacher_max_sequence_length=int(s["teacher_max_sequence_length"]))
    meta_device = torch.device("meta")
    with torch.device("meta"):
        c_s, c_t = adapter.random_conditions(s.get("teacher") or family.teachers[0], cfg, meta_device, torch.bfloat16)
        x = torch.randn((1, *adapter.latent_shape(int(s.get("height") or res), int(s.get("width") or res))))
        sigma = torch.tensor(0.5)
    return MetaState(meta, adapter, x, sigma, c_s, c_t)


def _count_state(mc, s: dict[str, Any], keep: dict[str, int]) -> StateFlops:
    """Count on meta models that keep two or three blocks of each block list (a 6B model's passes then take
    seconds, not minutes). The blocks of a list see the same tokens and all but the first get an input that
    needs a gradient, so the whole model's FLOPs are a two-block model's plus, per missing block, what a third
    block of that list adds (tests/test_timeplan.py checks this against the whole model)."""
    state = meta_state(mc, s)
    meta = state.model
    weights = sum(p.numel() for p in meta.parameters()) if s.get("train_mode") == "full" else 0
    blocks = {name: list(m) for name, m in block_lists(meta).items() if len(m)}
    root = type(meta).__name__

    def run(role: str, backward: bool, longer: str = "") -> tuple[float, dict[str, float]]:
        """One pass of the short model (two blocks per list, three in `longer`): total, per module."""
        for name, full in blocks.items():
            owner, _, attr = name.rpartition(".")  # "mode_blocks.image": the ModuleDict's entry
            setattr(meta.get_submodule(owner), attr, nn.ModuleList(full[:3 if name == longer else 2]))
        with torch.set_grad_enabled(backward):
            if backward:
                return _count(lambda: state.velocity(role).float().pow(2).mean().backward())
            return _count(lambda: state.velocity(role))

    def forward(role: str) -> tuple[float, dict[str, float], dict[str, float], float]:
        """The whole model's forward FLOPs, one (non-first) block's by list, the same for the 8-bit base
        linears (forward FLOPs are attributed to the module that runs them)."""
        counts = run(role, False)[1]

        def part(prefix: str, base: bool) -> float:
            if not base:
                return counts.get(prefix, 0.0)
            return sum(f for name, f in counts.items() if name.startswith(prefix + ".") and name.endswith(".base"))
        per, per8 = ({name: part(f"{root}.{name}.{min(len(full), 2) - 1}", base) for name, full in blocks.items()}
                     for base in (False, True))
        extra = {name: max(len(full) - 2, 0) for name, full in blocks.items()}
        return (part(root, False) + sum(n * per[name] for name, n in extra.items()), per, per8,
                part(root, True) + sum(n * per8[name] for name, n in extra.items()))

    teacher, _, _, teacher8 = forward("teacher")
    student, per_block, per_block8, student8 = forward("student")

    # the backward's FLOPs land on modules only roughly (autograd runs them outside the module calls): its
    # totals, a two-block model's plus what a third block of each list adds
    def backward_of(longer: str = "") -> float:
        return run("student", True, longer)[0] - run("student", False, longer)[0]

    short = backward_of()
    backward = short + sum((len(full) - 2) * (backward_of(name) - short)  # (a list the student skips: none)
                           for name, full in blocks.items() if len(full) > 2 and per_block[name])
    recompute = recompute8 = 0.0
    if s.get("grad_checkpointing", True):  # every block runs twice but the kept ones
        for name, full in blocks.items():
            again = len(full) - min(keep.get(name, 0), len(full))
            recompute += again * per_block[name]
            recompute8 += again * per_block8[name]
    return StateFlops(teacher, student, recompute, backward, teacher8, student8, recompute8, per_block, weights)


def rollout_flops(mc, settings: dict[str, Any], keep: dict[str, int] | None = None) -> RolloutFlops:
    steps = int(settings.get("rollout_steps") or mc.family.default_rollout_steps)
    trained = min(int(settings.get("train_states") or 0) or mc.family.default_train_states or steps, steps)
    return RolloutFlops(state_flops(mc, settings, keep), steps, trained)


# ---------------------------------------------------------------------------------------------
# Efficiency: what a measured roll-out reached of its GPU's peak
# ---------------------------------------------------------------------------------------------
# The measurements (each family's `measured_rollout_s`) ran the 16gb preset at 1024², one sample per roll-out,
# every state trained, the family's default teacher; the path names how the 8-bit linears ran.
MEASURED_PRESET = "16gb"
PATHS = {"fused": {"kernels": "on"}, "act8": {"act_quant": "int8"}, "quanto": {"kernels": "off"},
         "bf16": {"quant": "none"}}


def path_of(settings: dict[str, Any]) -> str:
    """How a run's linears compute: 'act8', 'bf16', 'fused' (the 8-bit kernel), 'quanto' or the backend."""
    if settings.get("act_quant", "off") != "off":
        return "act8"
    if settings["quant"] == "none":
        return "bf16"
    if settings["quant"] in QUANTO:
        return "fused" if settings.get("fused_linear") else "quanto"
    return settings["quant"]


def gpu_seconds(flops: float, int8: float, gpu: GPU, act8: bool, efficiency: float) -> float:
    """Seconds for these FLOPs at `efficiency` of the GPU's spec-sheet rates (int8 ones on int8 tensor cores
    when `act8`)."""
    rate8 = gpu.int8_tops if act8 else gpu.bf16_tflops
    return ((flops - int8) / gpu.bf16_tflops + int8 / rate8) / TERA / efficiency


@dataclass(frozen=True)
class Reference:
    """A measured roll-out: the model, GPU and path, its seconds and counted FLOPs, and the efficiency they give."""

    model: str            # the public id that was measured (its family's first)
    gpu: GPU
    path: str
    seconds: float
    flops: RolloutFlops
    source: str           # the result file
    borrowed: str = ""    # why this measurement stands in for another model or path ('' when it is theirs)

    @property
    def efficiency(self) -> float:
        return gpu_seconds(self.flops.total, self.flops.int8, self.gpu, self.path == "act8", 1.0) / self.seconds


def measured(family_cls, path: str) -> Reference:
    """The family's measured roll-out on `path`, its FLOPs counted at the settings it ran with."""
    from .config import load_config
    from .plan import resolve_model, run_settings

    model = family_cls.hf_repo_ids[0]
    gpu_name, seconds = next((g, paths[path]) for g, paths in family_cls.measured_rollout_s.items() if path in paths)
    cfg = load_config(MEASURED_PRESET, {"model": model, "micro_batch": 1, **PATHS[path]})
    flops = rollout_flops(resolve_model(model), {**run_settings(cfg), "teacher": family_cls.teachers[0]})
    return Reference(model, find_gpu(gpu_name), path, seconds, flops, family_cls.measured_in)


def reference(family_cls, path: str) -> Reference:
    """The measurement whose efficiency predicts `path` for this family, the first of: its own on the path,
    its own fused kernel's, other families' on the path, other families' fused kernel's (of several, the
    lowest efficiency: the cautious guess)."""
    from .plan import planned_families

    def paths(cls) -> set[str]:
        return {p for by_gpu in cls.measured_rollout_s.values() for p in by_gpu}

    others = [cls for cls in planned_families() if cls is not family_cls]
    for candidates, on in (([family_cls], path), ([family_cls], "fused"), (others, path), (others, "fused")):
        refs = [measured(cls, on) for cls in candidates if on in paths(cls)]
        if not refs:
            continue
        best = min(refs, key=lambda r: r.efficiency)
        why = "" if on == path else f"the {path} path was not measured: the fused kernel's efficiency"
        if best.model not in family_cls.hf_repo_ids:
            why = f"{family_cls.name} was not measured: the lowest efficiency measured, {best.model}'s" + (
                f"; {why}" if why else "")
        return dataclasses.replace(best, borrowed=why)
    raise ValueError(f"no model was measured on the {path} path, nor on the fused kernel")


# ---------------------------------------------------------------------------------------------
# The prediction
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimePlan:
    gpu: GPU
    path: str
    flops: RolloutFlops
    micro_batch: int
    seconds: float            # one roll-out (one sample)
    rollouts: int             # roll-outs in the whole run (prior prompts' included)
    measured: bool            # the seconds are a measurement of this GPU, path and settings
    ref: Reference
    act8_seconds: float | None = None  # the same run with act_quant = "int8" (an 8-bit int8 base only)

    @property
    def hours(self) -> float:
        return self.rollouts * self.seconds / 3600

    def to_dict(self) -> dict[str, Any]:
        st = self.flops.state
        return {"gpu": self.gpu.name, "bf16_tflops": self.gpu.bf16_tflops, "int8_tops": self.gpu.int8_tops,
                "gpu_source": self.gpu.source, "path": self.path, "measured": self.measured,
                "tflop_per_state": {k: round(getattr(st, k) / TERA, 3) for k in
                                    ("teacher", "student", "recompute", "backward")},
                "tflop_per_rollout": round(self.flops.total / TERA, 2), "states": self.flops.states,
                **({"trained_weights": st.weights} if st.weights else {}),
                "trained_states": self.flops.trained, "seconds_per_rollout": round(self.seconds, 3),
                "rollouts": self.rollouts, "hours": round(self.hours, 2),
                "efficiency": round(self.ref.efficiency, 4),
                "reference": {"model": self.ref.model, "gpu": self.ref.gpu.name, "path": self.ref.path,
                              "seconds": self.ref.seconds, "source": self.ref.source, "borrowed": self.ref.borrowed},
                **({"act8_seconds_per_rollout": round(self.act8_seconds, 3)} if self.act8_seconds else {})}


def predict(mc, settings: dict[str, Any], gpu: GPU, keep: dict[str, int] | None = None) -> TimePlan:
    """Seconds per roll-out (one sample) and hours for the run on `gpu` (see the module docstring); `settings`:
    plan.run_settings. A micro-batch of B samples is taken to cost B roll-outs, and a prior prompts' roll-out
    one of yours (its target pass reads the shorter student condition: a little less)."""
    path = path_of(settings)
    flops = rollout_flops(mc, settings, keep)
    ref = reference(mc.family, path)
    act8 = path == "act8"
    seconds = gpu_seconds(flops.total, flops.int8, gpu, act8, ref.efficiency)
    b = int(settings.get("micro_batch") or 1)
    is_measured = (gpu == ref.gpu and ref.path == path and not ref.borrowed and b == 1 and not flops.state.weights
                   and math.isclose(flops.total, ref.flops.total, rel_tol=1e-3))
    if is_measured:
        seconds = ref.seconds
    steps, batch = int(settings.get("steps") or 1000), int(settings.get("batch_size") or 4)
    rollouts = steps * (batch + (b if settings.get("prior") else 0))
    act8_seconds = None
    if not act8 and settings["quant"] == "qint8":  # what int8 activations would give here (a prediction)
        ref8 = reference(mc.family, "act8")
        act8_seconds = gpu_seconds(flops.total, flops.int8, gpu, True, ref8.efficiency)
    return TimePlan(gpu, path, flops, b, seconds, rollouts, is_measured, ref, act8_seconds)


def this_gpu(device: torch.device) -> GPU | None:
    """The time planner's entry for the GPU a run is on (None: not one it knows)."""
    return find_gpu(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def describe(tp: TimePlan, gpus: int = 1) -> str:
    """One paragraph: what `train` prints before it starts, and `plan --gpu` under its table; `gpus`: the run's
    roll-outs are divided among that many."""
    run = f"{tp.rollouts} roll-outs = {tp.hours:.1f} h for the run"
    if tp.measured:
        text = (f"time on the {tp.gpu.name} (measured): {tp.seconds:.2f} s per roll-out, {run} "
                f"({tp.ref.source}).")
    else:
        borrowed = f" ({tp.ref.borrowed})" if tp.ref.borrowed else ""
        text = (f"time on the {tp.gpu.name} (predicted, not measured): {tp.seconds:.2f} s per roll-out, {run}. "
                f"{tp.flops.total / TERA:.0f} TFLOP per roll-out (counted) at {100 * tp.ref.efficiency:.0f} % of "
                f"the card's spec-sheet {tp.gpu.bf16_tflops:g} TFLOPS bf16: the share a measured {tp.ref.model} "
                f"roll-out reached on the {tp.ref.gpu.name}{borrowed}.")
    if tp.act8_seconds:
        text += (f" With --act-quant int8 (predicted, not measured): {tp.act8_seconds:.2f} s per roll-out, "
                 f"{tp.rollouts * tp.act8_seconds / 3600:.1f} h; off by default until measured (docs/speed.md).")
    if tp.flops.state.weights:
        text += _full_note(tp.flops, gpus)
    if gpus > 1:
        text += (f" On {gpus} GPUs the roll-outs are divided among them: about {tp.hours / gpus:.1f} h, plus "
                 f"{'the collectives above' if tp.flops.state.weights else 'the gradient sum of every step'}.")
    return text


def _full_note(f: RolloutFlops, gpus: int) -> str:
    """What a full fine-tune's prediction leaves out, and the bytes of its collectives (module docstring)."""
    gathers, size = f.states + 2 * f.trained, f.state.weights / 1e9  # every pass; a backward gathers again
    share = (gpus - 1) / gpus  # of each collective's bytes, what a GPU sends and receives (a ring's)
    per_gpu = share * (2 * gathers + 4 * f.trained) * size
    moved = ("one GPU has no collectives" if gpus == 1 else f"each of {gpus} GPUs sends and receives {share:.0%} of "
             f"those ({per_gpu:.0f} GB a roll-out), at its interconnect's speed")
    return (f" Full fine-tune: the count includes every weight's gradient, at a LoRA roll-out's efficiency (no full "
            f"fine-tune has been measured). Left out: the optimizer step and EMA over the {size:.2f} B weights (once "
            f"a step) and FSDP's collectives: a roll-out gathers the bf16 weights ({2 * size:.1f} GB) {gathers} times "
            f"and reduce-scatters their fp32 gradients ({4 * size:.1f} GB) {f.trained} times; {moved}.")


def render(tp: TimePlan, console, gpus: int = 1) -> None:
    """The time planner's table under `plan`'s memory table, then `describe`'s paragraph."""
    from rich.table import Table
    from rich.text import Text

    st, f = tp.flops.state, tp.flops
    kind = "measured" if tp.measured else "predicted, not measured"
    table = Table(title=f"time on the {tp.gpu.name} ({kind})",
                  caption=f"{tp.gpu.bf16_tflops:g} TFLOPS bf16, {tp.gpu.int8_tops:g} TOPS int8: {tp.gpu.source}")
    table.add_column("pass (one sample)")
    table.add_column("TFLOP", justify="right")
    for name, what in (("teacher", "teacher forward (no grad)"), ("student", "student forward"),
                       ("recompute", "recompute of the checkpointed blocks"),
                       ("backward", "backward, every weight's gradient too" if st.weights else "backward")):
        table.add_row(what, f"{getattr(st, name) / TERA:.1f}")
    table.add_section()
    table.add_row("one trained state", f"{st.trained / TERA:.1f}")
    table.add_row(f"one roll-out: {f.states} states, {f.trained} trained", f"{f.total / TERA:.0f}")
    console.print(table)
    console.print(Text(describe(tp, gpus)))
