"""Speed levers around the frozen transformer: regional compilation, the attention backend (and a record of
the attention kernel each pass runs), and selective checkpointing. Each is a setting whose default leaves
the model as diffusers runs it; none changes what is computed beyond the rounding of its kernels.

    torch_compile = "blocks"      torch.compile of each repeated transformer block (regional compilation)
    attention_backend = "..."     one of diffusers' attention backends instead of its default
    keep_blocks = N or "auto"     N blocks keep their activations instead of recomputing them in backward

They work on any family whose transformer is a diffusers model: the repeated blocks are the model's own
`_repeated_blocks`, the backends diffusers' `set_attention_backend`, the checkpointing diffusers'
`enable_gradient_checkpointing`. What each gains on a GPU is not measured yet: `benchmarks/gpu_next.sh`
stage 13 measures them against the default on one machine (docs/speed.md).
"""
from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .config import NOTHING_TO_KEEP
from .errors import UserError
from .runtime import block_lists

# ---------------------------------------------------------------------------------------------
# Regional compilation
# ---------------------------------------------------------------------------------------------
# The 8-bit layers (quanto's tensor subclasses, bitsandbytes, our Triton kernel) and the LoRA switch stay
# out of the compiled graphs: each linear of a block is a graph break. What is compiled is everything
# between them (norms, modulation, RoPE, attention, gates), the elementwise work the H100 profile shows
# as hundreds of small kernels per pass. The LoRA set in use is read inside the linears, outside any
# graph, so switching student / teacher / bare base needs no recompilation.
COMPILE_BACKEND = "inductor"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks: modules whose class diffusers lists in `_repeated_blocks`
    (what its `compile_repeated_blocks` compiles)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def leaf_linear(module: nn.Module) -> bool:
    """A layer that stays outside the compiled graphs: a LoRA-wrapped linear, or an 8-bit linear (any
    nn.Linear subclass: quanto's QLinear, bitsandbytes' Linear8bitLt). A plain nn.Linear is traced."""
    from .lora import DualLoRALinear

    return isinstance(module, DualLoRALinear) or (isinstance(module, nn.Linear) and type(module) is not nn.Linear)


def compile_blocks(model: nn.Module, backend: str = COMPILE_BACKEND) -> int:
    """Compile each repeated block of `model` in place, its linears left outside; returns how many blocks.

    Shapes: dynamo compiles a block for the first token count it sees and, when a second one comes (the
    teacher's longer condition, another bucket), a graph with dynamic sizes that serves the rest, so the
    number of compilations does not grow with the steps (tests/test_accel.py counts them).
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise UserError(f"torch_compile = 'blocks' compiles the repeated transformer blocks that a diffusers model "
                        f"lists in `_repeated_blocks`; this {type(model).__name__} lists none. Set "
                        "torch_compile = 'off'.")
    for block in blocks:
        for module in block.modules():
            if leaf_linear(module):
                module.forward = torch.compiler.disable(module.forward)
        block.compile(backend=backend)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (each compilation or recompilation adds its graphs)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
# The backends `attention_backend` offers (config.ATTENTION_BACKENDS) compute exact attention up to their
# kernels' rounding: PyTorch's SDPA letting torch pick its kernel ("native", diffusers' default) or forced to
# one kernel, and the flash-attn packages (2, and 3 for Hopper). Backends that download their kernels from
# the Hub at run time are left out (a training machine may be offline). 8-bit attention (SageAttention:
# int8 Q·Kᵀ, fp8 P·V) changes the teacher's and the student's velocities; what that does to D-OPSD's
# gradients has not been measured, so config.validate refuses it.


def set_attention_backend(model: nn.Module, name: str) -> None:
    """Route every attention module of `model` through diffusers' backend `name` ("" = leave diffusers'
    default). Only this model's processors change: the process-wide default stays as it was."""
    if not name:
        return
    if not hasattr(model, "set_attention_backend"):
        raise UserError(f"attention_backend chooses among diffusers' attention backends; this {type(model).__name__} "
                        "is not a diffusers model. Set attention_backend = ''.")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)  # "Attention backends are an experimental feature ...", on every call
    try:
        model.set_attention_backend(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"attention_backend = '{name}' cannot run here: {str(exc).rstrip('.')}. Install what it "
                        "needs, or set attention_backend = '' (--set attention_backend=, diffusers' default: "
                        "PyTorch's SDPA).") from exc
    finally:
        log.setLevel(level)
        _AttentionBackendRegistry.set_active_backend(before)


def attention_backends(model: nn.Module) -> list[str]:
    """The diffusers backends this model's attention modules use ("native" where none was set)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    names = {getattr(m.processor, "_attention_backend", None) or default
             for m in model.modules() if getattr(m, "processor", None) is not None}
    return sorted(getattr(n, "value", str(n)) for n in names)


def _sdp_kernel(args: tuple, kwargs: dict) -> str:
    """The kernel PyTorch's SDPA dispatches these arguments to (flash, efficient, cuDNN, math)."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(*args, **kwargs)).name.lower()
    except Exception:  # a private helper: say so rather than guess
        return "unknown"


@contextmanager
def record_attention(which: Callable[[], str]) -> Iterator[dict[str, Counter]]:
    """Record the SDPA kernel of every attention call made inside: {pass name: Counter(kernel: calls)},
    the pass named by `which()` at the time of the call."""
    from torch.overrides import TorchFunctionMode

    record: dict[str, Counter] = {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa:
                record.setdefault(which(), Counter())[_sdp_kernel(args, kwargs)] += 1
            return func(*args, **kwargs)

    with Recorder():
        yield record


def probe_attention(family, model: nn.Module, lora, x: torch.Tensor, sigma: torch.Tensor, c_s, c_t,
                    sigma_next: torch.Tensor | None = None) -> dict:
    """Which attention runs in each pass of a trained state: one teacher pass (no grad) and one student
    forward with grad, in eager mode (run it before compile_blocks). Returns {"backend": [...], "teacher":
    {kernel: calls}, "student": {...}}: the backward of a call runs the backward of the kernel its forward
    ran."""
    passes = {"teacher": ("teacher", False, c_t), "student": ("student", True, c_s)}
    now = {"pass": ""}
    with record_attention(lambda: now["pass"]) as record:
        for name, (role, grad, conds) in passes.items():
            now["pass"] = name
            with lora.use(role), torch.set_grad_enabled(grad):
                family.velocity(model, x, sigma, conds, sigma_next)
    return {"backend": attention_backends(model), **{k: dict(v) for k, v in record.items()}}


def describe_attention(facts: dict) -> str:
    """One line for the run's output, e.g. 'native backend; teacher: flash_attention x 30, student: ...'."""
    passes = ", ".join(f"{name}: " + (" + ".join(f"{k} x {n}" for k, n in kernels.items()) or "no SDPA call")
                       for name, kernels in facts.items() if name != "backend")
    return f"{'/'.join(facts.get('backend', [])) or 'native'} backend; {passes}"


# ---------------------------------------------------------------------------------------------
# Selective checkpointing
# ---------------------------------------------------------------------------------------------
def keep_activations(model: nn.Module, keep: dict[str, int]) -> int:
    """Checkpoint every block of `model` except the last `keep[name]` blocks of each block list `name`
    (runtime.block_lists), which keep their activations and are not recomputed in the backward.
    Returns how many blocks are kept. The model must have gradient checkpointing on (diffusers')."""
    if not any(keep.values()):
        return 0
    if not getattr(model, "gradient_checkpointing", False):
        raise UserError(NOTHING_TO_KEEP)
    kept: set[int] = set()
    lists = block_lists(model)
    for name, n in keep.items():
        blocks = list(lists[name])
        kept.update(id(b) for b in blocks[len(blocks) - min(n, len(blocks)):] if n)

    def checkpoint_unless_kept(block: nn.Module, *args):  # diffusers' own function, but for the kept blocks
        if id(block) in kept:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(checkpoint_unless_kept)
    return len(kept)


# ---------------------------------------------------------------------------------------------
# All of them, as a run applies them
# ---------------------------------------------------------------------------------------------
def apply(cfg, family, model: nn.Module, lora, probe: tuple | None, keep: dict[str, int],
          compile_backend: str = COMPILE_BACKEND) -> dict:
    """The run's speed settings on its model, after the LoRA is attached and routed: the attention backend,
    a probe of the attention kernel each pass runs (`probe` = (x, sigma, c_s, c_t, sigma_next) of one state,
    sigma_next the sigma the step goes to, a flow map's target; None: no probe), the kept blocks (`keep`,
    resolved by the planner from `keep_blocks`) and the compilation, last. Returns what was done, for the
    run's record."""
    set_attention_backend(model, cfg.attention_backend)
    facts: dict = {}
    if probe is not None:
        facts["attention"] = probe_attention(family, model, lora, *probe)
    if any(keep.values()):
        facts["kept_blocks"] = {name: n for name, n in keep.items() if n}
        keep_activations(model, keep)
    if cfg.torch_compile == "blocks":
        facts["compiled_blocks"] = compile_blocks(model, compile_backend)
    return facts


def speed_up(cfg, preset: str, family, model: nn.Module, lora, conds, ds, device: torch.device) -> dict:
    """`apply` for a training run: the attention probe on the first item's conditions at its size, the kept
    blocks the planner chooses for `keep_blocks` within the preset's budget (or this GPU's)."""
    from .conditions import conds_on

    item = ds.items[0]
    x = torch.randn((1, *family.latent_shape(item.height, item.width)), generator=torch.Generator().manual_seed(0))
    sigmas = family.sigmas(item.height, item.width, cfg.rollout_steps or family.default_rollout_steps)[:2].to(device)
    probe = (x.to(device), sigmas[0], conds_on([conds.student[0]], device), conds_on([conds.teacher[0]], device),
             sigmas[1])
    return apply(cfg, family, model, lora, probe, kept_blocks(cfg, preset, device))


def kept_blocks(cfg, preset: str, device: torch.device) -> dict[str, int]:
    """Blocks per block list that keep their activations (`keep_blocks`: a number, or "auto": as many as the
    planner fits under the preset's budget, else this GPU's); {} for 0."""
    if cfg.keep_blocks == "0":
        return {}
    from . import plan

    budget = plan.vram_of_preset(preset)
    if budget is None and device.type == "cuda":
        budget = plan.budget_for(torch.cuda.get_device_properties(device).total_memory / 2**30)
    try:
        return plan.plan_from_config(cfg, budget_gib=budget).kept
    except UserError as exc:
        raise UserError(f"keep_blocks = '{cfg.keep_blocks}' needs the memory planner, which cannot plan this "
                        f"model ({exc}). Set keep_blocks = 0.") from exc
