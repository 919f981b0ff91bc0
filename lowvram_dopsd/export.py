"""Export a trained LoRA for ComfyUI, in the key layout ComfyUI's LoRA loader maps for the family.

    lowvram-dopsd export --format comfyui out            # -> out/comfyui/<out>.safetensors
    lowvram-dopsd export --format comfyui out --teacher  # the EMA teacher LoRA instead
    lowvram-dopsd export --format comfyui out/checkpoints/step-000500  # -> out/comfyui/step-000500.safetensors

Our own file (`pytorch_lora_weights.safetensors`) is in the diffusers/peft layout with rank and
alpha in the peft metadata. ComfyUI reads neither that metadata nor the `transformer.` names of
every family, and without a `<module>.alpha` tensor it applies the LoRA at scale 1 instead of
alpha/rank (comfy/weight_adapter/lora.py: `alpha = v[2] / mat2.shape[0]` if an alpha was found,
else 1.0). The export therefore writes, per family:

* Z-Image (ComfyUI model class `Lumina2`): `diffusion_model.<diffusers module>.lora_A.weight`,
  `.lora_B.weight` and `.alpha`. ComfyUI's `model_lora_keys_unet` maps `diffusion_model.` + the
  diffusers names onto its native fused `attention.qkv` (to_q/to_k/to_v as row slices) and
  `attention.out` through `comfy.utils.z_image_to_diffusers`
  (github.com/Comfy-Org/ComfyUI, comfy/lora.py `if isinstance(model, comfy.model_base.Lumina2)`,
  comfy/utils.py `z_image_to_diffusers`; read at commits 17358c8f and 09708eae). diffusers reads the
  same layout back (`_convert_non_diffusers_z_image_lora_to_diffusers` in
  diffusers/loaders/lora_conversion_utils.py, which also applies `.alpha`).
* FLUX.2-klein (ComfyUI `Flux2`, a `Flux` subclass): the kohya layout of ComfyUI's native module
  names, `lora_unet_<native name with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`, which the
  generic loop of `model_lora_keys_unet` maps for every model. Native names follow
  comfy/utils.py `flux_to_diffusers` (e.g. `attn.to_qkv_mlp_proj` -> `linear1`, `ff.linear_in` ->
  `img_mlp.0`); the separate q/k/v LoRAs of a double block become ONE LoRA on the fused
  `img_attn.qkv` with the A's stacked and the B's block-diagonal (rank 3r, alpha 3·alpha: the same
  product and scale, exactly). diffusers splits it back (`_convert_kohya_flux2_lora_to_diffusers`
  detects the block-diagonal "sparse" up weight).

`to_diffusers` is the inverse of each layout, so a round trip gives the original tensors; the
tests also load the export with the stock diffusers pipeline and compare images.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from . import __version__
from .cache import atomic_save_safetensors
from .checkpoint import TEACHER_FILE, list_checkpoints
from .errors import UserError
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


# ---------------------------------------------------------------------------------------------
# Z-Image: diffusers names under `diffusion_model.`, plus .alpha
# ---------------------------------------------------------------------------------------------
# Module names ComfyUI's Lumina2 branch maps for Z-Image (our summary of z_image_to_diffusers' table).
_ZIMAGE_BLOCK = r"(layers|context_refiner|noise_refiner)\.\d+\."
ZIMAGE_MAPPED = re.compile(
    rf"^(?:{_ZIMAGE_BLOCK}(?:attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123]|adaLN_modulation\.0)"
    r"|all_final_layer\.2-1\.linear|all_final_layer\.2-1\.adaLN_modulation\.1|all_x_embedder\.2-1"
    r"|cap_embedder\.1|t_embedder\.mlp\.[02])$")


def zimage_to_comfy(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> Tensors:
    unmapped = [m for m in modules if not ZIMAGE_MAPPED.match(m)]
    if unmapped:
        raise UserError(f"ComfyUI's Z-Image loader has no mapping for {unmapped[:3]}: a LoRA on these layers "
                        "cannot be exported (train with the default lora_targets).")
    out = {}
    for module, (a, b) in modules.items():
        out[f"diffusion_model.{module}.lora_A.weight"] = a
        out[f"diffusion_model.{module}.lora_B.weight"] = b
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    return out


def zimage_to_diffusers(comfy: Tensors) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    modules, alphas = {}, set()
    for key, t in comfy.items():
        if key.endswith(".alpha"):
            alphas.add(float(t))
    for key in comfy:
        if key.endswith(".lora_A.weight"):
            module = key[len("diffusion_model."): -len(".lora_A.weight")]
            modules[module] = (comfy[key], comfy[key.replace(".lora_A.", ".lora_B.")])
    return modules, _one_alpha(alphas)


# ---------------------------------------------------------------------------------------------
# FLUX.2-klein: kohya names of ComfyUI's native modules, fused q/k/v
# ---------------------------------------------------------------------------------------------
KLEIN_FUSED = {  # diffusers q/k/v modules of a double block -> native fused module
    ("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn.qkv",
    ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn.qkv",
}
KLEIN_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
KLEIN_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
KLEIN_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer"}


def _kohya(native: str) -> str:
    return "lora_unet_" + native.replace(".", "_")


def klein_native_name(module: str) -> str | None:
    if module in KLEIN_TOP:
        return KLEIN_TOP[module]
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", module)
    if not m:
        return None
    kind, idx, rest = m.groups()
    if kind == "single_transformer_blocks":
        return f"single_blocks.{idx}.{KLEIN_SINGLE[rest]}" if rest in KLEIN_SINGLE else None
    if rest in KLEIN_DOUBLE:
        return f"double_blocks.{idx}.{KLEIN_DOUBLE[rest]}"
    for group, fused in KLEIN_FUSED.items():
        if rest in group:
            return f"double_blocks.{idx}.{fused}"
    return None


def klein_to_comfy(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float) -> Tensors:
    unmapped = [m for m in modules if klein_native_name(m) is None]
    if unmapped:
        raise UserError(f"ComfyUI's FLUX.2 loader has no mapping for {unmapped[:3]}: a LoRA on these layers "
                        "cannot be exported.")
    out, done = {}, set()
    for module, (a, b) in modules.items():
        if module in done:
            continue
        native = klein_native_name(module)
        block, _, rest = module.rpartition(".attn.")
        group = next((g for g in KLEIN_FUSED if f"attn.{rest}" in g), None) if ".attn." in module else None
        if group is None:
            out[f"{_kohya(native)}.lora_down.weight"] = a
            out[f"{_kohya(native)}.lora_up.weight"] = b
            out[f"{_kohya(native)}.alpha"] = torch.tensor(float(alpha))
            done.add(module)
            continue
        # q, k, v -> one LoRA on the fused qkv: down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v).
        members = [f"{block}.{name}" for name in group]
        r, n_in = a.shape
        n_out = b.shape[0]
        down = torch.zeros(3 * r, n_in, dtype=a.dtype)
        up = torch.zeros(3 * n_out, 3 * r, dtype=b.dtype)
        for i, name in enumerate(members):
            if name in modules:  # a member that was not trained stays zero
                down[i * r:(i + 1) * r] = modules[name][0]
                up[i * n_out:(i + 1) * n_out, i * r:(i + 1) * r] = modules[name][1]
            done.add(name)
        out[f"{_kohya(native)}.lora_down.weight"] = down
        out[f"{_kohya(native)}.lora_up.weight"] = up
        out[f"{_kohya(native)}.alpha"] = torch.tensor(float(alpha) * 3)  # alpha/rank unchanged
    return out


def klein_to_diffusers(comfy: Tensors) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    native_to_module: dict[str, str | tuple[str, ...]] = {}
    for top, native in KLEIN_TOP.items():
        native_to_module[_kohya(native)] = top
    modules, alphas = {}, set()
    for key in comfy:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        down, up, alpha = comfy[key], comfy[base + ".lora_up.weight"], float(comfy[base + ".alpha"])
        m = re.match(r"^lora_unet_(double|single)_blocks_(\d+)_(.+)$", base)
        if m is None:
            modules[native_to_module[base]] = (down, up)
            alphas.add(alpha)
            continue
        kind, idx, rest = m.groups()
        table = KLEIN_SINGLE if kind == "single" else KLEIN_DOUBLE
        prefix = "single_transformer_blocks" if kind == "single" else "transformer_blocks"
        plain = {v.replace(".", "_"): k for k, v in table.items()}
        if rest in plain:
            modules[f"{prefix}.{idx}.{plain[rest]}"] = (down, up)
            alphas.add(alpha)
            continue
        group = next(g for g, fused in KLEIN_FUSED.items() if fused.replace(".", "_") == rest)
        r, n_out = down.shape[0] // 3, up.shape[0] // 3
        for i, name in enumerate(group):
            modules[f"{prefix}.{idx}.{name}"] = (down[i * r:(i + 1) * r],
                                                 up[i * n_out:(i + 1) * n_out, i * r:(i + 1) * r])
        alphas.add(alpha / 3)
    return modules, _one_alpha(alphas)


def _one_alpha(alphas: set[float]) -> float:
    """The LoRA's alpha from its per-layer .alpha tensors: fp32, so 0.1 reads 0.10000000149 (and a fused
    klein q/k/v's alpha / 3 a little off that): equal to 7 digits is one alpha, given with 7 digits."""
    rounded = {float(f"{a:.7g}") for a in alphas}
    if len(rounded) != 1:
        raise UserError(f"Expected one alpha for every layer, found {sorted(rounded)}.")
    return rounded.pop()


@dataclass(frozen=True)
class Layout:
    family: str
    to_comfy: Callable
    to_diffusers: Callable
    architecture: str  # ComfyUI model class, for the metadata


LAYOUTS = {"zimage": Layout("zimage", zimage_to_comfy, zimage_to_diffusers, "Lumina2 (Z-Image)"),
           "klein": Layout("klein", klein_to_comfy, klein_to_diffusers, "Flux2 (FLUX.2-klein)")}


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
        modules, alpha = LAYOUTS[family].to_diffusers(tensors)
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
    if family not in LAYOUTS:
        raise UserError(f"'{lora_file}' is a LoRA of the {family} family; ComfyUI export knows "
                        f"{', '.join(LAYOUTS)}.")
    rank, alpha = lora_config(meta)
    tensors = load_file(str(lora_file))
    comfy = LAYOUTS[family].to_comfy(split_modules(tensors), alpha)
    path = Path(dest).expanduser() if dest else default_dest(lora_file, teacher)
    # No lora_adapter_metadata here: diffusers would apply alpha/r a second time on top of the .alpha tensors.
    metadata = {"format": "pt", "lowvram_dopsd": json.dumps({**info, "export": "comfyui", "tool_version": __version__},
                                                            sort_keys=True),
                "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
                "ss_base_model_version": family, "modelspec.architecture": LAYOUTS[family].architecture}
    try:
        atomic_save_safetensors({k: v.contiguous() for k, v in comfy.items()}, path, metadata=metadata)
    except OSError as exc:
        raise UserError(f"Could not write '{path}' ({exc.strerror or exc}). Pass --output with a writable file.") \
            from exc
    return path
