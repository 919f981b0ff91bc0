"""Model families: find the checkpoint folder, read its `model_index.json`, pick the adapter.

A family adapter (`base.Family`) owns everything model-specific: loading, conditions, schedule,
velocity convention, LoRA targets, the ComfyUI export layout and the memory planner's numbers.
Code outside this package asks the adapter; it never compares a family's name.

Adding a family (e.g. a second size of an existing pipeline needs only an id and a config):
  1. `families/<name>.py`: a `Family` (usually `DiffusersFamily`) subclass decorated with
     `@register`, setting the class attributes of base.Family and implementing its methods:
     precompute (`encoder_identity`, `encode_student`, `encode_teacher`), training
     (`latent_shape`, `sigmas`, `velocity`), `decode_latents`, and for the planner `k_block`,
     `c_fwd`, `c_fwd_fused`, `plan_tokens`, `block_streams`, `tiny_transformer`, `block_probes`
     (measure `k_block` with plan.measure_block_activations; calibrate the `c_fwd`s on a GPU with
     benchmarks/bench_memory.py). `comfy_layout` (families/comfy.py) if ComfyUI loads its LoRAs.
  2. Import the module in `registered()` below.
  3. Its public ids in `hf_repo_ids`, each with its published configs (model_index.json,
     transformer/config.json) in `lowvram_dopsd/published/<owner>--<name>/`, sources listed in the
     README there: `plan` works offline from them.
  4. A tiny-model maker in `lowvram_dopsd/tiny.py` (the real classes, tiny configs, the Hugging
     Face folder layout) and tests: tests/test_families.py checks every registered family's
     seam; add a training test against the stock pipeline as tests/test_train_klein.py does.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import pipeline_index, resolve_dir
from .base import FAMILIES, Family


def registered() -> list[type[Family]]:
    """Every family adapter: importing a family module registers it."""
    from . import flux3, klein, toy, zimage  # noqa: F401

    return FAMILIES


def family_of_index(index: dict[str, Any]) -> type[Family] | None:
    """The family whose pipeline a checkpoint's `model_index.json` names; None for any other."""
    return next((cls for cls in registered() if cls.matches(index)), None)


def family_named(name: str) -> type[Family] | None:
    """The family recorded under `name` (a LoRA's metadata, a benchmark's results); None for no family."""
    return next((cls for cls in registered() if cls.name == name), None)


def published_dir(model_id: str) -> Path | None:
    """The configs kept in the package for a public id a family supports (`plan` reads them offline)."""
    if not any(model_id in cls.hf_repo_ids for cls in registered()):
        return None
    return Path(str(resources.files("lowvram_dopsd") / "published" / model_id.replace("/", "--")))


def family_class_of(model: str) -> type[Family] | None:
    """The family of a public id we support or of a local folder, found without loading or downloading
    anything (`settings` shows its defaults); None when that cannot be told offline."""
    for cls in registered():
        if model in cls.hf_repo_ids:
            return cls
    try:
        index = pipeline_index(Path(model).expanduser())
    except (OSError, ValueError):
        return None
    return family_of_index(index)


def load_family(model: str, check_files: bool = True, transformer_file: str = "") -> Family:
    """The family adapter of a model folder or id, its components checked (`check_files=False`: their
    folders only, not what is in them; the memory benchmark's folders hold configs and a transformer).
    `transformer_file`: a fine-tune's single .safetensors used instead of transformer/'s weights (checked
    here; transformer/ then needs its config.json only)."""
    model_dir = resolve_dir(model, "model")
    try:
        index = pipeline_index(model_dir)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"Could not read the model_index.json of {model_dir}: {exc}.") from exc
    cls = family_of_index(index)
    if cls is None:
        supported = ", ".join(f"{c.name} ({c.pipeline_class})" for c in FAMILIES)
        kind = index.get("_class_name", "unknown")
        why = next((c.near_misses[kind] for c in FAMILIES if kind in c.near_misses), "")
        raise UserError(f"'{model}' is a {kind} checkpoint; supported families are {supported}.{' ' + why if why else ''}")
    family = cls(model_dir, model)
    if transformer_file:
        if not family.takes_transformer_file:
            raise UserError(f"transformer_file is for diffusers transformers (Z-Image, klein); the {family.name} "
                            "model loads its own transformer/ only.")
        from ..quant import check_transformer_file
        family.transformer_file = check_transformer_file(transformer_file)
    family.check_components(index)
    if check_files:
        family.check_files()
    return family
