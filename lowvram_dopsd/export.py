"""Export a trained LoRA for ComfyUI, in the key layout ComfyUI's LoRA loader maps for the family.

    lowvram-dopsd export --format comfyui out            # -> out/comfyui/<out>.safetensors
    lowvram-dopsd export --format comfyui out --teacher  # the EMA teacher LoRA instead
    lowvram-dopsd export --format comfyui out/checkpoints/step-000500  # -> out/comfyui/step-000500.safetensors

Our own file (`pytorch_lora_weights.safetensors`) is in the diffusers/peft layout with rank and
alpha in the peft metadata. ComfyUI reads neither that metadata nor the `transformer.` names of
every family, and without a `<module>.alpha` tensor it applies the LoRA at scale 1 instead of
alpha/rank (comfy/weight_adapter/lora.py: `alpha = v[2] / mat2.shape[0]` if an alpha was found,
else 1.0). The export therefore writes the layout of the family the LoRA was trained on
(`Family.comfy_layout`; the layouts and their sources are in families/comfy.py). Each layout's
inverse gives the original tensors back; the tests also load the export with the stock diffusers
pipeline and compare images.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import __version__
from .cache import atomic_save_safetensors
from .checkpoint import TEACHER_FILE, list_checkpoints
from .errors import UserError
from .families import family_named, registered
from .families.comfy import Layout
from .files import LORA_FILE, check_lora, find_lora_file

Tensors = dict[str, torch.Tensor]


def split_modules(tensors: Tensors, prefix: str = "transformer.") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A [r, in], B [out, r])} from diffusers/peft keys `<prefix><module>.lora_A.weight`."""
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            module = module[len(prefix):] if module.startswith(prefix) else module
            b_key = key[: -len(".lora_A.weight")] + ".lora_B.weight"
            if b_key not in tensors:
                raise UserError(f"The LoRA has {key} but no {b_key}: the file is incomplete.")
            out[module] = (a, tensors[b_key])
    if not out:
        raise UserError("The file holds no diffusers LoRA tensors (`*.lora_A.weight`). Export takes the "
                        "trainer's own pytorch_lora_weights.safetensors.")
    return out


def lora_config(meta: dict[str, str]) -> tuple[int, float]:
    cfg = json.loads(meta.get("lora_adapter_metadata", "{}"))
    r = next((v for k, v in cfg.items() if k.endswith(".r") or k == "r"), None)
    alpha = next((v for k, v in cfg.items() if k.endswith("lora_alpha")), None)
    if r is None or alpha is None:
        raise UserError("The LoRA has no rank/alpha in its metadata (lora_adapter_metadata): export takes the "
                        "trainer's own pytorch_lora_weights.safetensors.")
    return int(r), float(alpha)


def our_lora(lora_file: Path, reader: str) -> tuple[dict[str, str], dict]:
    """A LoRA file this tool wrote: its metadata and our facts in it; `reader` (the flag or command that
    reads it) is named in the error for a model's weights or another trainer's LoRA, whose base model,
    alpha and layout are unknown here (another trainer's klein LoRA may fuse q/k/v in ways our split
    would garble)."""
    meta = check_lora(lora_file)
    info = json.loads(meta.get("lowvram_dopsd", "{}"))
    if not info:
        raise UserError(f"'{lora_file}' was not written by lowvram-dopsd (no lowvram_dopsd metadata): another "
                        f"trainer's LoRA, whose base model and alpha are unknown here. {reader} reads this tool's LoRAs "
                        "(an output folder, a checkpoint, a step LoRA) and their ComfyUI exports.")
    return meta, info


def comfy_layout(family: str, lora_file: Path) -> Layout:
    """The ComfyUI layout of the family `lora_file` names in its metadata."""
    cls = family_named(family)
    if cls is None or cls.comfy_layout is None:
        known = ", ".join(c.name for c in registered() if c.comfy_layout is not None)
        raise UserError(f"'{lora_file}' is a LoRA of the {family} family; ComfyUI export knows {known}.")
    return cls.comfy_layout


def read_lora(path: str, family: str) -> tuple[Tensors, int, float]:
    """A LoRA this tool wrote, in its own layout or as its ComfyUI export (`--init-lora`): tensors named
    as DualLoRA names them (`<module>.lora_A.weight`, relative to the transformer), rank, alpha."""
    lora_file = find_lora_file(path)
    meta, info = our_lora(lora_file, "--init-lora")
    if info.get("family") != family:
        raise UserError(f"'{lora_file}' is a LoRA of a {info.get('family')} model ({info.get('base_model', '?')}); "
                        f"this run trains a {family} model. Pass a LoRA trained on this family, or the model it "
                        "was trained on as --model.")
    tensors = load_file(str(lora_file))
    if info.get("export") == "comfyui":  # alpha from the .alpha tensors (fp32; _one_alpha rounds it)
        modules, alpha = comfy_layout(family, lora_file).to_diffusers(tensors)
    else:
        modules, alpha = split_modules(tensors), lora_config(meta)[1]
    ranks = {a.shape[0] for a, _ in modules.values()}
    if len(ranks) != 1:
        raise UserError(f"'{lora_file}' mixes LoRA ranks {sorted(ranks)}; one rank per LoRA is expected.")
    out = {}
    for module, (a, b) in modules.items():
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = a, b
    return out, ranks.pop(), alpha


def default_dest(lora_file: Path, teacher: bool) -> Path:
    """<folder>/comfyui/<name>.safetensors, <name> = the folder's for our own file names (an output or a
    checkpoint folder), else the file's (a step LoRA, loras/step-000500.safetensors). A checkpoint's export
    goes to the run's output folder: the checkpoint rotation deletes the checkpoint with everything inside."""
    folder = lora_file.parent
    here = folder.resolve()  # "." (a file in the current folder) has no name, "../step-000500" no run folder
    name = here.name if lora_file.name in (LORA_FILE, TEACHER_FILE) else lora_file.stem
    if here in {p for _, p in list_checkpoints(here.parent.parent)}:  # how checkpoint._rotate finds what to delete
        folder = here.parent.parent
    return folder / "comfyui" / f"{name}{'-teacher' if teacher else ''}.safetensors"


def export_comfyui(source: str, dest: str = "", teacher: bool = False) -> Path:
    src = Path(source).expanduser()
    if teacher:
        if src.is_file() and src.name != TEACHER_FILE:  # it would be exported as it is, named "-teacher"
            raise UserError(f"--teacher exports the {TEACHER_FILE} of an output or checkpoint folder; '{src}' is "
                            "a LoRA file: pass its folder, or the file without --teacher.")
        src = src / TEACHER_FILE if src.is_dir() else src
    lora_file = find_lora_file(str(src))
    meta, info = our_lora(lora_file, "export")
    family = info.get("family", "")
    if info.get("export") == "comfyui":
        raise UserError(f"'{lora_file}' is already a ComfyUI export: put it in ComfyUI/models/loras as it is.")
    layout = comfy_layout(family, lora_file)
    rank, alpha = lora_config(meta)
    tensors = load_file(str(lora_file))
    comfy = layout.to_comfy(split_modules(tensors), alpha)
    path = Path(dest).expanduser() if dest else default_dest(lora_file, teacher)
    # No lora_adapter_metadata here: diffusers would apply alpha/r a second time on top of the .alpha tensors.
    metadata = {"format": "pt", "lowvram_dopsd": json.dumps({**info, "export": "comfyui", "tool_version": __version__},
                                                            sort_keys=True),
                "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
                "ss_base_model_version": family, "modelspec.architecture": layout.architecture}
    try:
        atomic_save_safetensors({k: v.contiguous() for k, v in comfy.items()}, path, metadata=metadata)
    except OSError as exc:
        raise UserError(f"Could not write '{path}' ({exc.strerror or exc}). Pass --output with a writable file.") \
            from exc
    return path
