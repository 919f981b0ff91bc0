"""Two LoRA weight sets (student, EMA teacher) on ONE frozen base transformer.

Every targeted linear layer is wrapped in `DualLoRALinear`, which holds the frozen base module
(nn.Linear, or an 8-bit quantized linear from `quant.py`) and two (A, B) pairs. Which pair is
applied is a single shared switch (`DualLoRA.use("teacher")`), so switching costs nothing and
no base weight is ever copied: the 6B base is stored once for student and teacher (paper App. D).

    y = base(x) + s * (x @ A.T) @ B.T,   s = alpha / rank,   B = 0 at init (the LoRA starts as a no-op)

Only the student pair is trainable (nn.Parameter); the teacher pair is a buffer updated by EMA.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import UserError

ROLES = ("student", "teacher")


class _Switch:
    """Shared by all layers of one model: which LoRA set is active (or none, for the bare base)."""

    def __init__(self) -> None:
        self.active: str | None = "student"


INITS = ("gaussian", "kaiming")


class DualLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, switch: _Switch,
                 generator: torch.Generator | None = None, init: str = "gaussian"):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.switch = switch
        self.fused = False  # True: base is 8-bit and the fused kernel computes base + LoRA in one pass
        self.act_quant = "off"  # "int8": the fused kernel's base GEMMs on per-token int8 activations
        self.kernels = "auto"  # the fused kernel's dispatch rule, the run's `kernels` setting (kernels.utils)
        self._int8_cache: tuple | None = None  # (base weight, w_q, w_scale): see _int8
        dev = _weight_device(base)
        # B = 0, so training starts at the base model. A (see INITS): "gaussian" N(0, 1/rank²), the
        # authors' (peft's init_lora_weights="gaussian"), or "kaiming" uniform(±1/sqrt(in)), peft's
        # default. At rank 64 the gaussian A is 1.7x (in 3840) to 2.7x (in 10240) larger, and with
        # Adam the LoRA's change per step grows with |A|: the paper's learning rates were tuned on it.
        # Drawn on the CPU (from `generator`, else torch's global CPU RNG), then moved: the same A on
        # every device, as the trainer's noise is.
        a = torch.empty(rank, self.in_features, dtype=torch.float32, device="meta" if dev.type == "meta" else "cpu")
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank, generator=generator)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            raise ValueError(f"unknown LoRA init {init!r}; one of {INITS}")
        a = a.to(dev)
        self.student_A = nn.Parameter(a)
        self.student_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        self.register_buffer("teacher_A", a.clone())
        self.register_buffer("teacher_B", torch.zeros(self.out_features, rank, device=dev))

    def pair(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{role}_A"), getattr(self, f"{role}_B")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        role = self.switch.active
        if self.fused:
            # kernels/lora_linear.py: x·dequant(Wq)ᵀ + b + s·(x·Aᵀ)·Bᵀ without materialising the bf16
            # weight; it dispatches to its torch reference where Triton cannot run. The bare base (role
            # None: the prior roll-outs' target) takes the same kernel with s = 0, so it has the student's
            # base numerics, int8 activations included, and no dequantised weight either.
            from .kernels.lora_linear import lora_linear

            w_q, w_scale = self._int8()
            A, B = self.pair(role or "student")
            return lora_linear(x, w_q, w_scale, self.base.bias, A, B, self.scale if role else 0.0,
                               act_quant=self.act_quant, kernels=self.kernels)
        if role is None:
            return self.base(x)
        A, B = self.pair(role)
        y = self.base(x)
        # LoRA weights are kept in fp32 for the optimizer; the matmuls run in the compute dtype.
        lora = (x @ A.to(x.dtype).t()) @ B.to(x.dtype).t()
        return y + self.scale * lora

    def _int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's (w_q, w_scale), looked up again only when its weight object changes (a forward
        runs ~10^3 times per step, and reading them off quanto's tensor subclass costs ~20 µs)."""
        w = self.base.weight
        if self._int8_cache is None or self._int8_cache[0] is not w:
            from .quant import int8_view

            self._int8_cache = (w, *int8_view(self.base))
        return self._int8_cache[1], self._int8_cache[2]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _weight_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight")


def names_target(name: str, target: str) -> bool:
    """Whether a module's qualified name ends with a `lora_targets` entry ("layers.3.attention.to_q").
    A `*` in the entry stands for one whole name part ("mode_blocks.image.*.attn.to_q": every block of
    that list, and not those of "mode_blocks.image_cond")."""
    if "*" not in target:
        return name == target or name.endswith("." + target)
    parts, want = name.split("."), target.split(".")
    tail = parts[len(parts) - len(want):] if len(parts) >= len(want) else []
    return bool(tail) and all(w == "*" or w == p for w, p in zip(want, tail))


def is_target(name: str, module: nn.Module, targets: tuple[str, ...] | list[str]) -> bool:
    """Whether `attach` puts a LoRA on this module: a linear whose qualified name ends with a target."""
    return _is_linear(module) and any(names_target(name, t) for t in targets)


class DualLoRA:
    """The set of wrapped layers of one transformer, with the operations the trainer needs: the trainer's
    weight sets in LoRA mode (full.FullWeights is the other kind: `use`, `student_parameters`, `ema_update`)."""

    holds_base = True  # use(None) computes with the bare base model (the prior roll-outs' target, previews)

    def __init__(self, model: nn.Module, layers: dict[str, DualLoRALinear], switch: _Switch):
        self.model, self.layers, self.switch = model, layers, switch
        # teacher_ema_on = "cpu": the EMA state (fp32, A and B of every layer in order) in host RAM;
        # the layers then hold a copy in the compute dtype. None: the layers' buffers are the state.
        self.teacher_master: list[torch.Tensor] | None = None

    @classmethod
    def attach(cls, model: nn.Module, targets: tuple[str, ...] | list[str], rank: int, alpha: float,
               seed: int | None = None, init: str = "gaussian") -> "DualLoRA":
        """Wrap every linear whose qualified name ends with one of `targets` (e.g. 'attention.to_q').

        `seed`: the LoRA's initial A come from a generator of their own, so they are a function of the
        seed alone. From the global RNG instead (seed None) they would depend on whatever drew from it
        before: the trainer's encoders do on a cold feature cache and not on a warm one, which made two
        runs of one command start from different LoRAs."""
        for p in model.parameters():
            p.requires_grad_(False)
        switch = _Switch()
        names = [n for n, m in model.named_modules() if is_target(n, m, targets)]
        if not names:
            raise UserError(
                f"No layer of the transformer matches the LoRA targets {list(targets)}. "
                "Check `lora_targets` in your preset: they are suffixes of module names such as 'attention.to_q'."
            )
        generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        layers: dict[str, DualLoRALinear] = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = DualLoRALinear(getattr(parent, child), rank, alpha, switch, generator, init)
            setattr(parent, child, wrapped)
            layers[name] = wrapped
        return cls(model, layers, switch)

    def enable_fused_kernels(self, act_quant: str = "off", kernels: str = "auto") -> int:
        """Route every layer whose base is 8-bit (quanto qint8 / qfloat8) through the fused kernel,
        with `act_quant` activations; `kernels` ("auto" | "on" | "off", the run's setting) decides
        whether that is Triton or the kernel's torch reference. Returns how many layers."""
        from .quant import int8_view

        n = 0
        for layer in self.layers.values():
            layer.fused = int8_view(layer.base) is not None
            layer.act_quant = act_quant if layer.fused else "off"
            layer.kernels = kernels
            n += layer.fused
        return n

    def keep_teacher_ema_on_cpu(self, dtype: torch.dtype) -> None:
        """Move the EMA teacher's fp32 weights (the EMA state) to host RAM and leave the layers a copy
        in `dtype`, the compute dtype. The teacher passes read nothing else, and both LoRA paths
        cast A and B to the activations' dtype anyway, so they compute exactly what they did: a bf16
        copy halves the teacher's GPU memory (0.30 GiB for Z-Image at rank 64). The EMA update then
        runs on the CPU (lowvram_dopsd.plan counts it)."""
        pin = next(iter(self.layers.values())).teacher_A.is_cuda
        master = []
        for layer in self.layers.values():
            for name in ("teacher_A", "teacher_B"):
                t = getattr(layer, name)
                m = t.detach().to("cpu", torch.float32, copy=True)
                master.append(m.pin_memory() if pin else m)
                setattr(layer, name, t.to(dtype))  # replaces the registered buffer
        self.teacher_master = master

    def _teacher_buffers(self) -> list[torch.Tensor]:
        return [t for layer in self.layers.values() for t in (layer.teacher_A, layer.teacher_B)]

    @torch.no_grad()
    def _sync_teacher_copy(self) -> None:
        for buf, m in zip(self._teacher_buffers(), self.teacher_master):
            buf.copy_(m)  # host -> device, cast to the copy's dtype; blocking: the next update rewrites m

    # ----- which set is active
    @contextmanager
    def use(self, role: str | None) -> Iterator[nn.Module]:
        """Compute with the LoRA set `role` (None: the bare base); yields the module to call, the base."""
        assert role is None or role in ROLES
        previous, self.switch.active = self.switch.active, role
        try:
            yield self.model
        finally:
            self.switch.active = previous

    # ----- parameters
    def student_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.student_A, layer.student_B)]

    def tensors(self, role: str) -> dict[str, torch.Tensor]:
        """Name -> tensor for one set, names relative to the transformer (`<module>.lora_A.weight`)."""
        pairs = [layer.pair(role) for layer in self.layers.values()]
        if role == "teacher" and self.teacher_master is not None:  # the fp32 EMA state, not the copy
            pairs = list(zip(self.teacher_master[0::2], self.teacher_master[1::2]))
        out = {}
        for name, (A, B) in zip(self.layers, pairs):
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = A, B
        return out

    @torch.no_grad()
    def load(self, role: str, tensors: dict[str, torch.Tensor]) -> None:
        mine = self.tensors(role)
        missing = sorted(set(mine) - set(tensors))
        extra = sorted(set(tensors) - set(mine))
        if missing or extra:
            raise UserError(
                f"The LoRA tensors do not match this model's LoRA layers (missing {missing[:3]}, "
                f"unexpected {extra[:3]}). Was it trained with other targets or another model?"
            )
        for k, t in mine.items():
            if t.shape != tensors[k].shape:
                raise UserError(f"LoRA tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(t.shape)} "
                                "(different rank?).")
            t.copy_(tensors[k])
        if role == "teacher" and self.teacher_master is not None:
            self._sync_teacher_copy()

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, on the LoRA weights only."""
        student = [p.detach() for p in self.student_parameters()]
        if self.teacher_master is None:
            teacher = self._teacher_buffers()
        else:  # on the CPU: the student comes down (fp32), the new teacher copy goes back up
            teacher, student = self.teacher_master, [p.to("cpu") for p in student]
        # teacher + (1 - decay)·(student - teacher): one pass over both lists where mul_ + add_ took two,
        # half the rounding error; Z-Image's 159M elements on one CPU thread: 78 ms instead of 120 ms
        # (benchmarks/bench_ema.py, results/ema-cpu-x86_64.md)
        torch._foreach_lerp_(teacher, student, 1.0 - decay)
        if self.teacher_master is not None:
            self._sync_teacher_copy()

    @property
    def rank(self) -> int:
        return next(iter(self.layers.values())).rank

    @property
    def alpha(self) -> float:
        return next(iter(self.layers.values())).alpha

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.student_parameters())
