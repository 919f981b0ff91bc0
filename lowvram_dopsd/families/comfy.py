"""The ComfyUI LoRA key layouts of the families, and their inverses (`Family.comfy_layout`).

ComfyUI reads neither our peft metadata nor every family's `transformer.` names, and without a
`<module>.alpha` tensor it applies a LoRA at scale 1 instead of alpha/rank
(comfy/weight_adapter/lora.py). Each layout writes, per family:

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

`to_diffusers` is each layout's exact inverse (export.read_lora reads an export back with it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError

Tensors = dict[str, torch.Tensor]
Modules = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])


@dataclass(frozen=True)
class Layout:
    to_comfy: Callable[[Modules, float], Tensors]          # (modules, alpha) -> ComfyUI tensors
    to_diffusers: Callable[[Tensors], tuple[Modules, float]]
    architecture: str  # ComfyUI model class, for the metadata
    # A whole model's diffusers tensors (whole blocks at a time) -> ComfyUI's native keys: a full fine-tune's
    # single file (full_io.py), which diffusers' from_single_file reads back through its own converter.
    model_to_comfy: Callable[[Tensors], Tensors] | None = None


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


# ---------------------------------------------------------------------------------------------
# Whole models: a full fine-tune's transformer as one file in the original (ComfyUI's native) layout
# ---------------------------------------------------------------------------------------------
# diffusers' names -> the original ones: the renames of diffusers' convert_z_image_transformer_checkpoint_to_
# diffusers undone (ComfyUI's NextDiT has the original names: comfy/ldm/lumina/model.py)
ZIMAGE_MODEL_NAMES = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
                      (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
                      (".attention.norm_q.", ".attention.q_norm."))


def zimage_model_to_comfy(tensors: Tensors) -> Tensors:
    """Z-Image's tensors by diffusers name (whole blocks) -> the original layout: each block's to_q, to_k and
    to_v weights stacked into one `attention.qkv`, the other names as the original model has them."""
    out = {}
    for key, t in tensors.items():
        if key.endswith((".attention.to_k.weight", ".attention.to_v.weight")):
            continue  # stacked with to_q's
        if key.endswith(".attention.to_q.weight"):
            base = key[: -len("to_q.weight")]
            out[base + "qkv.weight"] = torch.cat([t, tensors[base + "to_k.weight"], tensors[base + "to_v.weight"]])
            continue
        for ours, theirs in ZIMAGE_MODEL_NAMES:
            key = key.replace(ours, theirs)
        out[key] = t
    return out


# klein's tensors that are not LoRA targets (klein_native_name has those): norms (".scale" in the original),
# the guidance embedder and the modulations (diffusers' convert_flux2_transformer_checkpoint_to_diffusers)
KLEIN_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                      "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
KLEIN_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
KLEIN_MODEL_TOP = {"time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                   "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                   "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
                   "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
                   "single_stream_modulation.linear": "single_stream_modulation.lin"}


def klein_model_to_comfy(tensors: Tensors) -> Tensors:
    """FLUX.2-klein's tensors by diffusers name (whole blocks) -> BFL's original layout: fused q/k/v per stream,
    norms as `.scale`, the final modulation as (shift, scale) where diffusers has (scale, shift)."""
    out = {}
    for key, t in tensors.items():
        module, _, kind = key.rpartition(".")
        m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", module)
        norms = (KLEIN_DOUBLE_NORMS if m[1] == "transformer_blocks" else KLEIN_SINGLE_NORMS) if m else {}
        if m and m[3] in norms:
            out[f"{'double' if m[1] == 'transformer_blocks' else 'single'}_blocks.{m[2]}.{norms[m[3]]}.scale"] = t
        elif module == "norm_out.linear":
            scale, shift = t.chunk(2)
            out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
        elif m and m[1] == "transformer_blocks" and (group := next((g for g in KLEIN_FUSED if m[3] in g), None)):
            if m[3] == group[0]:  # the q of the group: stack q, k, v
                block = f"transformer_blocks.{m[2]}"
                out[f"{klein_native_name(module)}.{kind}"] = torch.cat([tensors[f"{block}.{n}.{kind}"] for n in group])
        else:
            native = KLEIN_MODEL_TOP.get(module) or klein_native_name(module)
            if native is None:
                raise UserError(f"The original FLUX.2 layout has no name for {key}: cannot write the single file.")
            out[f"{native}.{kind}"] = t
    return out


ZIMAGE = Layout(zimage_to_comfy, zimage_to_diffusers, "Lumina2 (Z-Image)", zimage_model_to_comfy)
KLEIN = Layout(klein_to_comfy, klein_to_diffusers, "Flux2 (FLUX.2-klein)", klein_model_to_comfy)
