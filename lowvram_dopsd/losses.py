"""The D-OPSD objective at one visited state (paper eq. 6, and the authors' x0 form).

    velocity:  mean((v_S - sg(v_T))²)
    x0:        mean((x0_S - sg(x0_T))²),  x0 = x - sigma·v  =>  = mean(sigma²·(v_S - sg(v_T))²)

The x0 form is a per-step weighting of the velocity loss (sigma² = (1 - t)² in the paper's
t convention): early, noisy steps weigh more. The authors report faster convergence with it.
"""
from __future__ import annotations

import torch


def dopsd_loss(kind: str, v_student: torch.Tensor, v_teacher: torch.Tensor, sigma: torch.Tensor,
               kernels: str = "auto") -> torch.Tensor:
    """One fused pass (kernels/dopsd_loss.py; `kernels`, the run's setting, picks Triton or its torch
    reference); no grad to v_T."""
    from .kernels.dopsd_loss import dopsd_loss as fused_loss, x0_weight

    weight = None
    if kind == "x0":
        weight = x0_weight(sigma.expand(v_student.shape[0])).to(v_student.device)
    elif kind != "velocity":
        raise ValueError(f"unknown loss kind {kind!r}")
    return fused_loss(v_student, v_teacher.detach(), weight, kernels=kernels)
