"""The optimizer of the student LoRA: its making, its guarded step and its learning-rate schedule."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .errors import UserError


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        if params[0].device.type != "cuda":
            raise UserError("optimizer = 'adamw8bit' (bitsandbytes) needs a CUDA GPU; use optimizer = 'adamw' on CPU.")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("optimizer = 'adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, "
                            "or set optimizer = 'adamw'.") from exc
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
                   max_grad_norm: float, loss: float) -> tuple[bool, float]:
    """Clip and step; returns (updated, gradient norm). One NaN/inf update would make the LoRA, its EMA
    teacher and every later checkpoint NaN for good: such a step changes nothing (the loop stops a run
    that keeps making them)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf))
    updated = math.isfinite(loss) and math.isfinite(grad_norm)
    if updated:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return updated, grad_norm


def lr_factor(updates: int, cfg: TrainConfig) -> float:
    """The learning rate of the next optimizer step, as a fraction of `lr`, after `updates` steps
    (LambdaLR's counter: skipped non-finite steps do not advance it). Linear warm-up to 1 over
    `warmup_steps`, then `lr_schedule`: constant, or a cosine / linear decay that reaches 0 where the
    step after the last one would be (the last step still learns; the usual convention, e.g.
    transformers' get_cosine_schedule_with_warmup)."""
    if updates < cfg.warmup_steps:
        return (updates + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    done = min((updates - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda updates: lr_factor(updates, cfg))


def lr_shape(cfg: TrainConfig) -> str:
    """The schedule around the learning rate, e.g. "2-step warm-up, cosine decay"; '' when it is
    constant from step 1 (the run header and the LoRA's metadata)."""
    parts = ([f"{cfg.warmup_steps}-step warm-up"] if cfg.warmup_steps else []) + \
        ([f"{cfg.lr_schedule} decay"] if cfg.lr_schedule != "constant" else [])
    return ", ".join(parts)
