"""The D-OPSD objective at one visited state (paper eq. 6, and the authors' x0 form).

    velocity:  mean((v_S - sg(v_T))²)
    x0:        mean((x0_S - sg(x0_T))²),  x0 = x - sigma·v  =>  = mean(sigma²·(v_S - sg(v_T))²)

The x0 form is a per-step weighting of the velocity loss (sigma² = (1 - t)² in the paper's
t convention): early, noisy steps weigh more. The authors report faster convergence with it.
"""
from __future__ import annotations

import torch


def dopsd_loss(kind: str, v_student: torch.Tensor, v_teacher: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    v_teacher = v_teacher.detach()
    weight = None
    if kind == "x0":
        weight = (sigma.to(torch.float32) ** 2).expand(v_student.shape[0]).to(v_student.device)
    elif kind != "velocity":
        raise ValueError(f"unknown loss kind {kind!r}")
    diff2 = (v_student.float() - v_teacher.float()).pow(2)
    if weight is not None:
        diff2 = diff2 * weight.view(-1, *([1] * (diff2.dim() - 1)))
    return diff2.mean()
