"""Full fine-tuning (train_mode = "full"): every transformer weight trains, sharded over the GPUs by FSDP2.

    torchrun --nproc_per_node 8 -m lowvram_dopsd train --preset full-8x24gb --images dataset.toml --output ./ft

The paper's second setting. Only what the weights are differs from LoRA mode; the roll-out, the loss and
the per-step backward are train.py's, unchanged. `FullWeights` gives the trainer what DualLoRA gives it:
`model` (what rollout_and_learn calls), `use(role)` (which weights it computes with), the student's
parameters and `ema_update`. Where each piece lives, per GPU of N:

- the student: the transformer, `fully_shard`ed per block and at the root. Each GPU keeps 1/N of every
  weight in fp32: that is the master copy the optimizer updates. bf16 weights could not hold the updates: at
  the paper's lr 3e-5, Adam moves a weight by ~3e-5 per step, while bf16 resolves 2^-8 (0.4 %) of a weight's
  size, so most steps would round back to the weight they started from. FSDP2's mixed precision gathers a
  block's weights in the compute dtype (bf16) just before the block runs and frees them after, reduce-
  scatters each backward's gradients in fp32, summed over the ranks (every micro-batch's loss is already
  weighted by its share of the global batch, as in one process), and keeps them sharded in fp32.
- the EMA teacher: a second transformer sharded the same way, without gradients. Its shards line up with the
  student's (same shapes, same mesh), so the EMA is a per-rank lerp, no communication. `ema_dtype` fp32, or
  bf16 with stochastic rounding (1 - 0.9999 of a step's change is far below bf16's resolution: rounded to
  nearest, the teacher would never move; rounded stochastically, it moves by the right amount on average);
  `teacher_ema_on = "cpu"` keeps its shards in host RAM (FSDP2's CPU offload copies a block up to run it).
- the optimizer state: AdamW on the sharded parameters (DTensors), so checkpoints reshard across GPU counts;
  bitsandbytes' 8-bit AdamW takes no DTensors and runs on each GPU's shards (`ShardedAdamW8bit`).

Every FSDP forward and backward is a collective, so every rank must run the same passes in the same order.
They do: each rank rolls out as many micro-batches as the others (train_mode = "full" refuses a batch that
does not divide), each of the same schedule, and previews are sampled on every rank (rank 0 writes them).
"""
from __future__ import annotations

import functools
import hashlib
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError
from .runtime import DTYPES


# ---------------------------------------------------------------------------------------------
# The two transformers, sharded
# ---------------------------------------------------------------------------------------------
def device_mesh(device: torch.device):
    """The 1-D mesh of the job's ranks. A process started without torchrun makes a group of its own, so one
    GPU runs the same sharded code, and writes checkpoints in the same format, as eight."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def check_torch() -> None:
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise UserError(f"train_mode = 'full' needs FSDP2 as PyTorch 2.8 or newer has it; this is PyTorch "
                        f"{torch.__version__}. Upgrade torch (pip install -U torch).")


def load_sharded(family, cfg, device: torch.device, mesh, dtype: torch.dtype, trains: bool) -> nn.Module:
    """The transformer from the base checkpoint, sharded block by block as it loads (a block at a time is whole
    on this GPU), then at the root. `dtype`: what the shards hold; the forward computes in cfg.dtype."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    offload = not trains and cfg.teacher_ema_on == "cpu" and device.type == "cuda"
    # cast_forward_inputs off: the blocks get what they get in one process (rope tables, timesteps in fp32);
    # the families' velocity already hands the transformer its inputs in the compute dtype.
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.dtype], reduce_dtype=torch.float32, cast_forward_inputs=False)
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mp,
                              offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy())
    model = family.load_transformer(cfg, torch.device("cpu") if offload else device, dtype,
                                    on_unit=functools.partial(_shard_block, shard, trains))
    model.requires_grad_(trains)
    # the root's own weights freed after each forward too (FSDP2 keeps them by default): a no-grad pass (the
    # teacher's, an untrained state's) would otherwise leave them gathered across the optimizer step, and the
    # next pass would compute with the old ones (an unsharded group is not gathered again)
    shard(model, reshard_after_forward=True)
    for module in model.modules():  # the gradient of a step is the sum over ranks, as in one process
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied one
    return model


def _shard_block(shard: Callable[[nn.Module], None], trains: bool, name: str, module: nn.Module) -> None:
    """quant.load_frugal's hook: a block of the transformer (an item of a top-level ModuleList) is sharded as
    soon as it is loaded, so no GPU ever holds the whole model; the rest goes with the root."""
    if name.rsplit(".", 1)[-1].isdigit():
        module.requires_grad_(trains)
        shard(module)


class RoleSwitch:
    """What the trainer calls as its `model` in full mode: the student or the EMA teacher transformer, whichever
    `FullWeights.use` made active (DualLoRA switches its two LoRA sets on one base the same way)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, dtype: torch.dtype):
        self.modules = {"student": student, "teacher": teacher}
        self.active = "student"
        self._dopsd_dtype = dtype  # the families cast the inputs to it (the shards are fp32)

    def __call__(self, *args, **kwargs):
        return self.modules[self.active](*args, **kwargs)


class FullWeights:
    """The student transformer (trained) and its EMA teacher, both sharded: the trainer's weight sets in full
    mode, as lora.DualLoRA is in LoRA mode."""

    holds_base = False  # the base model is not kept: use(None) has nothing to compute with

    def __init__(self, student: nn.Module, teacher: nn.Module, dtype: torch.dtype, seed: int = 0):
        self.student, self.teacher = student, teacher
        self.model = RoleSwitch(student, teacher, dtype)
        self.seed = seed
        self.updates = 0  # EMA updates so far: with the seed, the stochastic rounding's stream (checkpointed)

    @classmethod
    def load(cls, family, cfg, device: torch.device) -> "FullWeights":
        check_torch()
        mesh = device_mesh(device)
        student = load_sharded(family, cfg, device, mesh, torch.float32, trains=True)
        teacher = load_sharded(family, cfg, device, mesh, DTYPES[cfg.ema_dtype], trains=False)
        return cls(student, teacher, DTYPES[cfg.dtype], cfg.seed)

    @contextmanager
    def use(self, role: str | None) -> Iterator[nn.Module]:
        if role is None:  # config.check_train_mode refuses prior_prompts first; this is a bug if reached
            raise RuntimeError("train_mode = 'full' holds no bare base model to compute a prior target with")
        previous, self.model.active = self.model.active, role
        try:
            yield self.model.modules[role]
        finally:
            self.model.active = previous

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters())

    def teacher_dtype(self) -> str:
        """The EMA teacher's dtype (most of its weights': a bf16 FLUX.3 keeps its QK norms in fp32), and "in host
        RAM" where it is offloaded from the student's GPU (a CPU run has everything there: nothing to say)."""
        teacher = list(self.teacher.parameters())
        dtype = max({t.dtype for t in teacher}, key=lambda d: sum(t.numel() for t in teacher if t.dtype == d))
        offloaded = teacher[0].device.type == "cpu" and next(self.student.parameters()).device.type != "cpu"
        return f"{str(dtype).removeprefix('torch.')}{' in host RAM' if offloaded else ''}"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.student.parameters())  # a DTensor's numel is the whole tensor's

    def sharded(self) -> "FullWeights":
        """Both models holding their shards (DTensors), none gathered: what the EMA, checkpoints and the export
        read (load_sharded frees each group after its forward; this makes sure of it)."""
        for model in (self.student, self.teacher):
            for module in model.modules():
                if hasattr(module, "reshard"):
                    module.reshard()
        return self

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """teacher <- teacher + (1 - decay)·(student - teacher), shard by shard on each rank. Each tensor by its own
        dtype: a bf16 teacher keeps some in fp32 (FLUX.3's QK norms, its class's _keep_in_fp32_modules)."""
        self.sharded()
        self.updates += 1
        gen = None
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t, s = t.to_local(), s.to_local()
            if t.dtype == torch.float32:
                t.lerp_(s.to(t.device), 1.0 - decay)  # as DualLoRA.ema_update
                continue
            if gen is None:
                gen = self._rounding_generator(t.device)
            t.copy_(stochastic_round(torch.lerp(t.float(), s.to(t.device).float(), 1.0 - decay), t.dtype, gen))

    def _rounding_generator(self, device: torch.device) -> torch.Generator:
        """The stochastic rounding's stream of this update on this rank, the same in every Python (tuple hash()
        may change)."""
        gen = torch.Generator(device)
        key = hashlib.blake2b(f"{self.seed}/{self.updates}/{dist.get_rank()}".encode(), digest_size=8).digest()
        return gen.manual_seed(int.from_bytes(key, "little") >> 1)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """fp32 `x` rounded to bf16, up or down with the probabilities that make the result's mean `x`: the low 16
    bits of each float get a uniform random carry, then are cut (bf16 is fp32's upper half). Sign and magnitude
    are separate bits, so this rounds the magnitude, which is unbiased for either sign."""
    if dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding to {dtype} is not implemented (bf16 only)")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, device=bits.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def summary(weights: FullWeights) -> str:
    """The run's line about what trains."""
    world = dist.get_world_size()
    return (f"full fine-tune: {weights.num_parameters() / 1e9:.3f}B trainable parameters (fp32 master, computed in "
            f"{str(weights.model._dopsd_dtype).removeprefix('torch.')}), sharded over {world} "
            f"process{'es' * (world > 1)}, EMA teacher {weights.teacher_dtype()}")


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------
def make_optimizer(weights: FullWeights, cfg, lr: float) -> torch.optim.Optimizer:
    """AdamW on the sharded parameters (its state shards with them), or 8-bit AdamW on each rank's shards."""
    params = weights.student_parameters()
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UserError("optimizer = 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, or set "
                        "optimizer = 'adamw'.") from exc
    return _sharded_adamw8bit()(params, lr=lr, weight_decay=cfg.weight_decay)


@functools.cache
def _sharded_adamw8bit() -> type:
    """The class of `ShardedAdamW8bit`, made when first asked for (bitsandbytes is an optional package)."""
    import bitsandbytes as bnb

    class ShardedAdamW8bit(bnb.optim.AdamW8bit):
        """bitsandbytes' 8-bit AdamW over this rank's shards of the parameters: it takes no DTensors, so it gets
        plain tensors that view the shards' memory, and each step hands them the shards of the gradients. Its
        state is quantized in blocks of this rank's shards: it resumes on the same number of GPUs only."""

        def __init__(self, sharded: list[nn.Parameter], **kwargs):
            self.sharded = list(sharded)
            super().__init__([nn.Parameter(p.to_local(), requires_grad=True) for p in self.sharded], **kwargs)

        def step(self, closure=None):
            for p, view in zip(self.sharded, self.param_groups[0]["params"]):
                local = p.to_local()
                if view.data_ptr() != local.data_ptr():  # FSDP re-padded its storage (it may, once, lazily)
                    view.data = local
                view.grad = None if p.grad is None else p.grad.to_local()
            return super().step(closure)

        def zero_grad(self, set_to_none: bool = True) -> None:
            super().zero_grad(set_to_none)
            for p in self.sharded:
                p.grad = None

    return ShardedAdamW8bit

