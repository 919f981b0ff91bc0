"""Generate with a trained LoRA through the STOCK diffusers pipeline: what users of the LoRA will get.

    lowvram-dopsd sample --lora out --prompt "sks dog surfing a wave" [--steps 8] [--seed 0] [--output dog.png]

The base model is read from the LoRA's metadata (`base_model`, written by the trainer) unless
`--model` is given. The pipeline is `DiffusionPipeline.from_pretrained(base)` and the LoRA goes in
with `pipe.load_lora_weights(...)`: no code of ours runs between them, so this is the check that
the file works outside this tool. `--lora` takes an output folder, a checkpoint folder or a
.safetensors file (including a ComfyUI export: diffusers converts it on load). Noise comes from a
CPU generator seeded with `--seed`, so `--seed preview_seed + i` reproduces preview image i.
Weights are read from safetensors only; remote code runs only with `--trust-remote-code`.
`--output` is an image file (no extension: .png, which also keeps the prompt, seed and steps as text)
or a folder; flags and the file name are checked before the pipeline is loaded.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open

from .errors import UserError
from .output import LORA_FILE

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def find_lora_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise UserError(f"'{p}' is not a .safetensors file. LoRAs are read from safetensors only "
                            "(other formats can run code when loaded).")
        return p
    if (p / LORA_FILE).is_file():
        return p / LORA_FILE
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise UserError(f"'{p}' has no {LORA_FILE}" + (f" but {len(files)} .safetensors files: pass one of them."
                                                       if files else "."))
    raise UserError(f"The LoRA '{path}' does not exist. Pass the training output folder, a checkpoint folder "
                    "or a .safetensors file.")


def read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except Exception as exc:
        raise UserError(f"'{path}' is not a readable safetensors file ({exc}).") from exc


@dataclass
class SampleRequest:
    lora: str
    prompts: list[str]
    model: str = ""
    steps: int = 0
    seed: int = 0
    width: int = 0
    height: int = 0
    output: str = ""
    device: str = "auto"
    dtype: str = "bf16"
    scale: float = 1.0
    trust_remote_code: bool = False
    offload: bool | None = None  # None: model CPU offload on a GPU with < 40 GB


def output_paths(req: SampleRequest) -> list[Path]:
    """Where each image goes. A name without an extension gets .png; a folder gets the default names."""
    n = len(req.prompts)
    default = [Path(f"sample-{req.seed}-{i}.png" if n > 1 else f"sample-{req.seed}.png") for i in range(n)]
    if not req.output:
        return default
    out = Path(req.output).expanduser()
    if req.output.endswith(("/", os.sep)) or out.is_dir():
        return [out / p for p in default]
    out = out if out.suffix else out.with_name(out.name + ".png")
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def check_output(path: Path) -> str:
    """Pillow's format for an output file, checked before generating: a save that fails afterwards loses the images."""
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    why = "is not an image format Pillow can write"
    if fmt in Image.SAVE:
        try:  # some registered formats cannot write RGB (XBM, MSP) or need a plugin that is not installed (WMF)
            Image.new("RGB", (16, 16)).save(io.BytesIO(), format=fmt)
            why = ""
        except (OSError, ValueError) as exc:
            why = f"cannot be written by Pillow here ({exc})"
    if why:
        raise UserError(f"--output '{path}': '{path.suffix}' {why}. Use .png (keeps the prompt, seed and steps in "
                        "the file), .jpg or .webp.")
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # missing folders are made later
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--output '{path}': '{folder}' is not a folder you can write to. Pass a file in one "
                        "that you can.")
    return fmt


def check_request(req: SampleRequest) -> None:
    """Mistakes in the numbers, found before the (slow) pipeline is loaded."""
    for flag, value in (("--width", req.width), ("--height", req.height)):
        if value < 0 or value % 16:
            raise UserError(f"{flag} {value}: the image size must be a positive multiple of 16 (the VAE works in "
                            f"8x8 pixels and the transformer in 2x2 latent patches), e.g. {max(16, value // 16 * 16)}; "
                            "leave it out to use the training resolution.")
    if req.steps < 0:
        raise UserError(f"--steps {req.steps}: the number of sampling steps cannot be negative. Leave it out (or "
                        "pass 0) for the model's own few-step count.")


def check_family(info: dict, family_name: str, lora_file: Path, base: str) -> None:
    """A LoRA trained on another family has no module of this model: diffusers would fail after loading it."""
    trained = info.get("family")
    if trained and trained != family_name:  # no metadata (another trainer's LoRA): let diffusers decide
        raise UserError(f"'{lora_file}' was trained on a {trained} model ({info.get('base_model', 'unknown')}), but "
                        f"--model '{base}' is a {family_name} model. A LoRA only works on the family it was "
                        f"trained on: pass a {trained} model as --model, or leave --model out to use the base "
                        "model in the LoRA's metadata.")


def sample(req: SampleRequest, console=None) -> list[Path]:
    from diffusers import DiffusionPipeline

    from .families import family_class_of, load_family
    from .train import resolve_device

    check_request(req)
    paths = output_paths(req)
    formats = [check_output(path) for path in paths]
    lora_file = find_lora_file(req.lora)
    meta = read_metadata(lora_file)
    info = json.loads(meta.get("lowvram_dopsd", "{}"))
    base = req.model or info.get("base_model", "")
    if not base:
        raise UserError(f"'{lora_file}' does not say which base model it was trained on (no lowvram_dopsd "
                        "metadata). Pass --model (a Hugging Face id or a local diffusers folder).")
    if (known := family_class_of(base)) is not None:  # before load_family may download a model for nothing
        check_family(info, known.name, lora_file, base)
    family = load_family(base)  # finds the folder (or cached id) and checks its components
    check_family(info, family.name, lora_file, base)
    if not family.in_diffusers:
        raise UserError(f"`sample` runs the stock diffusers pipeline, and {family.pipeline_class} (the "
                        f"{family.name} family) is not one. Load the LoRA with the family's own pipeline "
                        f"instead (for the toy world: lowvram_dopsd.toy.pipeline.ToyDiTPipeline, docs/toy.md).")
    device = resolve_device(req.device)
    dtype = DTYPES[req.dtype] if device.type == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(family.model_dir, dtype=dtype, use_safetensors=True,
                                             trust_remote_code=req.trust_remote_code)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, use_safetensors=True,
                           adapter_name="dopsd")
    if req.scale != 1.0:
        pipe.set_adapters(["dopsd"], adapter_weights=[req.scale])
    offload = req.offload
    if offload is None:
        offload = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 40 * 2**30
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    steps = req.steps or family.default_rollout_steps  # the model's own few-step count
    size = info.get("resolution") or 1024
    width, height = req.width or size, req.height or size
    written = []
    for prompt, path, fmt in zip(req.prompts, paths, formats):
        gen = torch.Generator("cpu").manual_seed(req.seed)  # same noise on any device (= the trainer's previews)
        image = pipe(prompt, num_inference_steps=steps, width=width, height=height, generator=gen,
                     **family.pipeline_call_kwargs).images[0]
        extra = {}
        if fmt == "PNG":  # text chunks: only PNG has them (other writers ignore pnginfo)
            extra["pnginfo"] = PngImagePlugin.PngInfo()
            for key, value in {"prompt": prompt, "seed": req.seed, "steps": steps, "base_model": base,
                               "lora": str(lora_file), "lora_scale": req.scale}.items():
                extra["pnginfo"].add_text(key, str(value))
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=fmt, **extra)
        written.append(path)
        if console is not None:
            console.print(f"wrote {path}  ({prompt!r}, seed {req.seed}, {steps} steps)")
    return written
