"""Files on disk that several stages read: model checkpoint folders (which weight files a loader
reads, whether a download is complete, a cheap identity for cache keys) and LoRA files (finding one
in what the user passed, reading its metadata). Low level: imports nothing of ours but `errors`."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"  # the trainer's output, in the diffusers/peft layout


def folder_identity(folder: Path) -> dict:
    """Cheap identity of a checkpoint folder: its real path, config hash and weight file sizes."""
    folder = Path(folder).resolve()
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.json")):
        h.update(p.name.encode() + p.read_bytes())
    weights = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
    return {"path": str(folder), "config_sha256": h.hexdigest(), "weights": weights}


# Weight formats that unpickle (can run code when loaded): never read, see component_problem
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# The weight files from_pretrained reads without a `variant` (diffusers models, transformers models);
# sharded: `<name>.index.json` and the shards it lists
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def shard_index(folder: Path) -> Path | None:
    """The shard index from_pretrained reads in a model component folder (`<name>.index.json` for the
    first of `WEIGHT_FILES` that has one), or None when the weights are not sharded."""
    for name in WEIGHT_FILES:
        if (folder / f"{name}.index.json").is_file():
            return folder / f"{name}.index.json"
    return None


def component_problem(folder: Path, model: bool = True) -> str:
    """What is wrong with one component folder of a checkpoint ('' if nothing): a model component
    needs its config.json and safetensors weights, every shard of a sharded one; a tokenizer or
    scheduler folder needs its files. Dangling links (an interrupted `hf download`) count as missing."""
    if not any(f.is_file() for f in folder.iterdir()):
        return "is empty. The download is probably incomplete: download the model again."
    if not (folder / "config.json").is_file():
        # tokenizer/, scheduler/: their loaders name a missing file themselves
        return "has no config.json. The download is probably incomplete: download the model again." if model else ""
    index = shard_index(folder)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            return f"has an unreadable shard index {index.name} ({exc}): download the model again."
        lost = sorted(s for s in shards if not (folder / s).is_file())
        if lost:
            return (f"lacks {len(lost)} of its {len(shards)} weight shards ({', '.join(lost[:3])}"
                    f"{', ...' if len(lost) > 3 else ''}). The download is incomplete: download the model again.")
        return ""
    if any((folder / name).is_file() for name in WEIGHT_FILES):
        return ""
    variants = sorted(f.name for f in folder.glob("*.safetensors") if f.is_file())
    if variants:  # e.g. diffusion_pytorch_model.fp16.safetensors: from_pretrained would say "no file named ..."
        return (f"has its weights only under other names ({', '.join(variants[:2])}{', ...' if len(variants) > 2 else ''}), "
                f"while the loader reads {' or '.join(WEIGHT_FILES)} (and their .index.json when sharded). A "
                "'.fp16' or '.bf16' in the name is a variant download: download the model again without a "
                "variant filter (e.g. `hf download <id>`).")
    pickled = sorted(f.name for pattern in PICKLED for f in folder.glob(pattern) if f.is_file())
    if pickled:
        return (f"has its weights only as {', '.join(pickled[:2])}, a pickle format that can run code when "
                "loaded; this tool reads safetensors only. Download the safetensors version of the model, or "
                "convert it (diffusers: load it once with from_pretrained and save_pretrained(..., "
                "safe_serialization=True)).")
    return "has no weights (*.safetensors). The download is probably incomplete: download the model again."


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
        if files:
            raise UserError(f"'{p}' has no {LORA_FILE} but {len(files)} .safetensors files "
                            f"({', '.join(f.name for f in files[:3])}{', ...' if len(files) > 3 else ''}): pass "
                            "the LoRA file itself.")
        raise UserError(f"'{p}' holds no LoRA (no .safetensors file). Pass a training output folder, a checkpoint "
                        f"folder (<output>/checkpoints/step-NNNNNN) or a LoRA .safetensors file.")
    raise UserError(f"The LoRA '{path}' does not exist. Pass the training output folder, a checkpoint folder "
                    "or a .safetensors file.")


def read_header(path: Path) -> tuple[dict, list[str]]:
    """A safetensors file's metadata and tensor names, read from its header alone (no weights)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}, list(fh.keys())
    except Exception as exc:  # SafetensorError (empty, cut short, not safetensors at all), OSError
        raise UserError(f"'{path}' is not a readable safetensors file ({exc}). If it was downloaded or copied, "
                        "it is probably incomplete: fetch it again.") from exc


def read_metadata(path: Path) -> dict:
    return read_header(path)[0]


# How the LoRA layouts name their weights: peft/diffusers (lora_A/B), kohya and ComfyUI (lora_down/up),
# LyCORIS (LoHa, LoKr), and the .alpha beside them
LORA_TENSORS = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".hada_w1_a",
                ".lokr_w1", ".alpha")


def is_lora(names: list[str]) -> bool:
    """Whether tensor names are a LoRA's (any layout above); a model's weights never use these names."""
    return any(name.endswith(LORA_TENSORS) for name in names)


def check_lora(path: Path) -> dict:
    """The metadata of a LoRA file; a UserError saying what the file is instead (a model's weights)."""
    metadata, names = read_header(path)
    if not names:
        raise UserError(f"'{path}' holds no tensors at all, so no LoRA. Pass the LoRA file (a training output "
                        "folder, a checkpoint folder or a LoRA .safetensors file).")
    if not is_lora(names):
        raise UserError(f"'{path}' is not a LoRA: its {len(names)} tensors ({', '.join(sorted(names)[:2])}, ...) "
                        "are a model's weights, not LoRA pairs (<layer>.lora_A.weight and .lora_B.weight, or "
                        "kohya's lora_down and lora_up). Pass the LoRA (a training output folder, a checkpoint "
                        "folder or a LoRA .safetensors file); a fine-tune's transformer goes to --transformer-file.")
    return metadata


# A diffusers pipeline folder names its pipeline class and components in one of these: modular
# pipelines (FLUX.3) write the second.
INDEX_FILES = ("model_index.json", "modular_model_index.json")


def resolve_dir(id_or_path: str, what: str, needs: str | tuple[str, ...] = INDEX_FILES,
                include: tuple[str, ...] = ()) -> Path:
    """A local folder, or a Hugging Face repo id found in the local cache or downloaded.

    `needs` is a file (or files, one of which) that must exist in the folder (so a half-finished
    download is caught here).
    `include`: download only the files matching these patterns (a repo that also holds pickled or other
    libraries' copies of its weights), and say so in the `hf download` advice.
    """
    path = Path(id_or_path).expanduser()
    if path.is_file():
        single = (" A fine-tune's single .safetensors transformer goes to --transformer-file, with --model the "
                  "official model it was made from." if what == "model" and path.suffix == ".safetensors" else "")
        raise UserError(f"The {what} '{path}' is a file; it must be the folder of a diffusers/transformers checkpoint "
                        f"(the one that contains {needs}), or a Hugging Face id.{single}")
    if path.exists():
        names = (needs,) if isinstance(needs, str) else needs
        if not any((path / name).is_file() for name in names):
            needs = " or ".join(names)
            raise UserError(
                f"The {what} folder '{path}' has no {needs}. Point to the folder of a diffusers/transformers "
                f"checkpoint (the one that contains {needs}), or pass a Hugging Face id."
            )
        return path
    if id_or_path.count("/") != 1 or id_or_path.startswith((".", "/", "~")):
        raise UserError(f"The {what} '{id_or_path}' is neither an existing folder nor a Hugging Face repo id "
                        "(owner/name). Check the path.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(id_or_path, local_files_only=True, allow_patterns=list(include) or None))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
    error = "offline mode (HF_HUB_OFFLINE is set)"
    if not offline:
        try:
            return Path(snapshot_download(id_or_path, allow_patterns=list(include) or None))
        except Exception as exc:  # no network, gated repo, typo: all end in the same advice
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    command = f"hf download {id_or_path}" + "".join(f' --include "{p}"' for p in include)
    raise UserError(
        f"The {what} '{id_or_path}' is not in the Hugging Face cache ({cache}) and could not be downloaded "
        f"({error}). On a machine with internet run `{command}` (it goes to that cache), or "
        f"download it anywhere and pass the folder's path instead of the id."
    )


def pipeline_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, or modular_model_index.json (raises OSError / ValueError)."""
    folder = Path(folder)
    name = next((n for n in INDEX_FILES if (folder / n).is_file()), INDEX_FILES[0])
    return json.loads((folder / name).read_text())
