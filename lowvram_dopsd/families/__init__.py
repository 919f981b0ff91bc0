"""Model families: find the checkpoint folder, read its `model_index.json`, pick the adapter."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import Family

FAMILIES: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    FAMILIES.append(cls)
    return cls


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


def registered() -> list[type[Family]]:
    """Every family adapter: importing a family module registers it."""
    from . import flux3, klein, toy, zimage  # noqa: F401

    return FAMILIES


def pipeline_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, or modular_model_index.json (raises OSError / ValueError)."""
    folder = Path(folder)
    name = next((n for n in INDEX_FILES if (folder / n).is_file()), INDEX_FILES[0])
    return json.loads((folder / name).read_text())


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
    return next((cls for cls in registered() if cls.matches(index)), None)


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
    for cls in registered():
        if cls.matches(index):
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
    supported = ", ".join(f"{c.name} ({c.pipeline_class})" for c in FAMILIES)
    kind = index.get("_class_name", "unknown")
    why = next((c.near_misses[kind] for c in FAMILIES if kind in c.near_misses), "")
    raise UserError(f"'{model}' is a {kind} checkpoint; supported families are {supported}.{' ' + why if why else ''}")
