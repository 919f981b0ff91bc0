"""Step 1 of the algorithm: the conditions, computed once before training and cached on disk.

c_s = the pipeline's own text encoding of each caption (the student's condition);
c_t = the teacher's condition of each item (caption + image: the grafted VLM, or klein's reference
      image); and the student conditions of the preview and prior prompts, encoded with the captions
      so that the text encoder is loaded once. The encoders live only inside the family's encode
      calls, so they never share the GPU with the transformer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data
from .cache import FeatureCache, key_for
from .config import TrainConfig
from .errors import UserError
from .families.base import Cond, Family


@dataclass
class Conditions:
    student: list[Cond]    # c_s of each training item
    teacher: list[Cond]    # c_t of each training item
    preview: list[Cond]    # c_s of each preview prompt
    prior: list[Cond]      # c_s of each prior prompt (prompts whose images must not change)


def encode_conditions(family: Family, ds: data.Dataset, teacher: str, cfg: TrainConfig, device: torch.device,
                      cache: FeatureCache, preview_prompts: list[str]) -> Conditions:
    """Every condition the run needs, from the cache where it holds them, encoded (and cached) where not."""
    texts = [it.caption for it in ds.items] + list(preview_prompts) + list(cfg.prior_prompts)
    ident_s = family.encoder_identity("student", cfg)
    keys_s = [key_for("student", ident_s, text, None) for text in texts]
    student = cache.get_or_compute(keys_s, lambda idx: family.encode_student([texts[i] for i in idx], cfg, device),
                                   check=lambda i, c: check_finite(c, f"the caption {texts[i]!r}", "text", cfg))
    ident_t = family.encoder_identity(teacher, cfg)
    keys_t = [key_for(teacher, ident_t, it.caption, it.image_sha256) for it in ds.items]
    teacher_conds = cache.get_or_compute(
        keys_t, lambda idx: family.encode_teacher([ds.items[i] for i in idx], teacher, cfg, device),
        check=lambda i, c: check_finite(c, ds.name(ds.items[i].image_path), f"{teacher} teacher's", cfg))
    n, p = len(ds), len(preview_prompts)
    return Conditions(student[:n], teacher_conds, student[n:n + p], student[n + p:])


def check_finite(cond: Cond, what: str, encoder: str, cfg: TrainConfig) -> None:
    """A NaN/inf condition would make every step that draws it non-finite, and the cache would keep it."""
    bad = sorted(k for k, v in cond.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        hint = ("fp16 overflows in these encoders' activations: use --dtype bf16 (RTX 30xx and newer) or fp32"
                if cfg.dtype == "fp16" else "check that the model and encoder downloads are complete "
                "(download them again)")
        raise UserError(f"The {encoder} encoder gave non-finite values (NaN or inf, in {', '.join(bad)}) for {what}. "
                        f"Nothing from this batch was cached. Most likely {hint}.")


def conds_on(conds: list[Cond], device: torch.device) -> list[Cond]:
    """A micro-batch's cached conditions (host RAM) on the device, copied once for its whole roll-out:
    each pass would copy them again otherwise, and a copy from pageable memory waits for the GPU."""
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in c.items()}
            for c in conds]
