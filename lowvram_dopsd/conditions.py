"""Step 1 of the algorithm: the conditions, computed once before training and cached on disk.

c_s = the pipeline's own text encoding of each caption (the student's condition);
c_t = the teacher's condition of each item (caption + image: the grafted VLM, or klein's reference
      image); and the student conditions of the preview and prior prompts, encoded with the captions
      so that the text encoder is loaded once. The encoders live only inside the family's encode
      calls, so they never share the GPU with the transformer.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import data
from .cache import FeatureCache, key_for
from .config import TrainConfig
from .errors import UserError, quote
from .families.base import Cond, Family


@dataclass
class Conditions:
    student: list[Cond]    # c_s of each training item (of its first caption)
    teacher: list[Cond]    # c_t of each training item (of its first caption)
    preview: list[Cond]    # c_s of each preview prompt
    prior: list[Cond]      # c_s of each prior prompt (prompts whose images must not change)
    others: list[list[tuple[Cond, Cond]]] = field(default_factory=list)  # (c_s, c_t) of each item's other captions

    def pair(self, i: int, rng: random.Random) -> tuple[Cond, Cond]:
        """(c_s, c_t) of item i under one of its captions, drawn with `rng` (the run's: seeded, and
        restored on resume) where it has several; an item with one caption draws nothing, so a run
        without caption variants draws exactly what it always did."""
        others = self.others[i] if self.others else []
        j = rng.randrange(1 + len(others)) if others else 0
        return (self.student[i], self.teacher[i]) if j == 0 else others[j - 1]


# A large dataset is encoded this many conditions at a time, each chunk cached before the next: a stopped
# precompute continues where it stopped, for an encoder load per chunk (a multiple of the families' batch of 8,
# so a fresh run's batches, and features, are the ones one call would give)
ENCODE_CHUNK = 512


def encode_conditions(family: Family, ds: data.Dataset, teacher: str, cfg: TrainConfig, device: torch.device,
                      cache: FeatureCache, preview_prompts: list[str], note: Callable[[str], None] | None = None
                      ) -> Conditions:
    """Every condition the run needs, from the cache where it holds them, encoded (and cached) where not;
    `note` hears the progress of an encoding of more than one chunk."""
    # the items' first captions, then every other caption of an item (the teacher reads each one
    # with the item's image): item i's variants follow the first captions, in item order
    pairs = list(ds.items) + [replace(it, caption=c, other_captions=()) for it in ds.items for c in it.other_captions]
    texts = [it.caption for it in pairs] + list(preview_prompts) + list(cfg.prior_prompts)
    ident_s = family.encoder_identity("student", cfg)
    keys_s = [key_for("student", ident_s, text, None) for text in texts]
    student = cache.get_or_compute(keys_s, lambda idx: family.encode_student([texts[i] for i in idx], cfg, device),
                                   check=lambda i, c: check_finite(c, f"the caption {quote(texts[i])}", "text", cfg),
                                   chunk=ENCODE_CHUNK, progress=Progress("student (text) conditions", note))
    ident_t = family.encoder_identity(teacher, cfg)
    keys_t = [key_for(teacher, ident_t, it.caption, it.image_sha256) for it in pairs]
    teacher_conds = cache.get_or_compute(
        keys_t, lambda idx: family.encode_teacher([pairs[i] for i in idx], teacher, cfg, device),
        check=lambda i, c: check_finite(c, ds.name(pairs[i].image_path), f"{teacher} teacher's", cfg),
        chunk=ENCODE_CHUNK, progress=Progress(f"{teacher} teacher conditions", note))
    n, m, p = len(ds), len(pairs), len(preview_prompts)
    others, at = [], n
    for it in ds.items:
        k = len(it.other_captions)
        others.append(list(zip(student[at:at + k], teacher_conds[at:at + k])))
        at += k
    return Conditions(student[:n], teacher_conds[:n], student[m:m + p], student[m + p:],
                      others if m > n else [])


class Progress:
    """`progress` of FeatureCache.get_or_compute: a line per chunk, with the rate and what is left, when there is
    more than one chunk to encode (a small dataset's single call says nothing more than the summary line)."""

    def __init__(self, what: str, note: Callable[[str], None] | None):
        self.what, self.note, self.t0 = what, note, time.perf_counter()

    def __call__(self, done: int, missing: int) -> None:
        if self.note is None or missing <= ENCODE_CHUNK:
            return
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        self.note(f"encoded {done}/{missing} {self.what} ({rate:.1f}/s, {(missing - done) / rate / 60:.0f} min "
                  "left; cached as they go: a stopped run continues from here)")


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
