"""Generate with a trained LoRA through the STOCK diffusers pipeline: what users of the LoRA will get.

    lowvram-dopsd sample --lora out --prompt "sks dog surfing a wave" [--seed 0] [--count 4] [--output dog.png]
    lowvram-dopsd sample --lora out/loras/step-000500.safetensors --lora out/loras/step-001000.safetensors --prompt ...

The base model is read from the (first) LoRA's metadata (`base_model`, written by the trainer) unless
`--model` is given. The pipeline is `DiffusionPipeline.from_pretrained(base)` (FLUX.3: its modular
pipeline, as its docs load it) and the LoRA goes in
with `pipe.load_lora_weights(...)`: no code of ours runs between them, so this is the check that
the file works outside this tool. `--lora` takes an output folder, a checkpoint folder or a
.safetensors file (including a ComfyUI export: diffusers converts it on load); given several times,
the pipeline is loaded once and each LoRA in turn replaces the last (`delete_adapters`), every LoRA
drawing the same prompts from the same seeds. Noise comes from a CPU generator seeded with `--seed`
(`--count N`: image c of a prompt gets seed + c), so `--seed preview_seed + i` reproduces preview image i.
Weights are read from safetensors only; remote code runs only with `--trust-remote-code`.

Output names. `--output` is an image file (no extension: .png, which also keeps the prompt, seed, steps
and LoRA as text) or a folder; flags, names and formats are checked before the pipeline is loaded.
- Default names (no `--output`, or a folder) are `sample[-<lora>]-<seed>[-<prompt index>].png`: the
  LoRA's label only with several LoRAs, the prompt index only with several prompts. They NEVER replace
  a file: like ComfyUI's SaveImage counter or ai-toolkit's timestamped samples, a second run gets
  `sample-0_2.png`, then `_3`, ... (the first number free for every name of the call, so one run's
  images share it; chosen before the pipeline loads, and moved on again if another run takes the name
  meanwhile).
- An explicit file name is the user's: `--output dog.png` replaces dog.png (the console says so), and
  several images become `dog[-<lora>][-<seed> with --count > 1][-<prompt index>].png`, replaced likewise.
Each image is written to a temporary name beside it and renamed, so a failed write (full disk, folder
gone) leaves no half-written image; it stops with an error listing the images already written.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, PngImagePlugin

from .errors import UserError, quote
from .files import LORA_FILE, check_lora, find_lora_file
from .runtime import DTYPES, resolve_device

if TYPE_CHECKING:
    from .families.base import Family


@dataclass
class SampleRequest:
    loras: list[str]
    prompts: list[str]
    model: str = ""
    steps: int = 0
    seed: int = 0
    count: int = 1  # images per prompt (and LoRA), seeds seed .. seed + count - 1
    width: int = 0
    height: int = 0
    output: str = ""
    device: str = "auto"
    dtype: str = "bf16"
    scale: float = 1.0
    trust_remote_code: bool = False
    offload: bool | None = None  # None: model CPU offload on a GPU with < 40 GB
    transformer_file: str = ""  # a fine-tune's single file; '' = the (first) LoRA's `transformer_file`, if any


@dataclass
class Shot:
    """One image to make: which LoRA and prompt (indices), its seed, and where it goes."""
    lora: int
    prompt: int
    seed: int
    base: Path  # the name before any `_2` that keeps an existing file
    path: Path


def lora_labels(files: list[Path]) -> list[str]:
    """Names for the LoRAs in image names: the file's stem, or its folder's name for a pytorch_lora_weights
    file; prefixed with the position when two would be the same (images of one call never share a name)."""
    labels = [f.parent.resolve().name if f.name == LORA_FILE else f.stem for f in files]
    return labels if len(set(labels)) == len(labels) else [f"{k}-{label}" for k, label in enumerate(labels)]


def numbered(path: Path, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}_{n}{path.suffix}")


def first_free(paths: list[Path]) -> list[Path]:
    """The paths with the first number none of them has yet (none, `_2`, `_3`, ...): one call's images share it."""
    n = next(n for n in itertools.count(1) if not any(numbered(p, n).exists() for p in paths))
    return [numbered(p, n) for p in paths]


def plan_shots(req: SampleRequest, labels: list[str]) -> tuple[list[Shot], bool]:
    """Every image of the call, in generation order, and whether the names are the user's own (`--output` file).

    Names carry what varies: the LoRA's label (several LoRAs), the seed (always in default names; with an
    explicit name only for --count > 1) and the prompt index (several prompts)."""
    keys = [(k, i, req.seed + c) for k in range(len(labels)) for i in range(len(req.prompts)) for c in range(req.count)]

    def parts(k: int, i: int, seed: int, with_seed: bool) -> list[str]:
        return ([labels[k]] if len(labels) > 1 else []) + ([str(seed)] if with_seed else []) + \
            ([str(i)] if len(req.prompts) > 1 else [])

    out = Path(req.output).expanduser() if req.output else None
    if out is None or req.output.endswith(("/", os.sep)) or out.is_dir():
        base = [(out or Path()) / ("-".join(["sample", *parts(*key, True)]) + ".png") for key in keys]
        return [Shot(*key, b, p) for key, b, p in zip(keys, base, first_free(base))], False
    out = out if out.suffix else out.with_name(out.name + ".png")
    base = [out] if len(keys) == 1 else \
        [out.with_name("-".join([out.stem, *parts(*key, req.count > 1)]) + out.suffix) for key in keys]
    return [Shot(*key, b, b) for key, b in zip(keys, base)], True


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
    if req.count < 1:
        raise UserError(f"--count {req.count}: the number of images per prompt must be at least 1 (they get the "
                        "seeds --seed, --seed + 1, ...).")


def check_offload(req: SampleRequest, device: torch.device) -> None:
    if req.offload and device.type != "cuda":
        # diffusers' offload needs an accelerator (it raises a RuntimeError in load_lora_weights otherwise)
        raise UserError("--offload keeps the pipeline's models in CPU memory and moves each one to the GPU while "
                        "it runs; here there is no GPU to move them to (--device cpu, or PyTorch sees no CUDA "
                        "GPU), so everything already runs from CPU memory. Leave out --offload.")


def check_family(info: dict, family_name: str, lora_file: Path, base: str) -> None:
    """A LoRA trained on another family has no module of this model: diffusers would fail after loading it."""
    trained = info.get("family")
    if trained and trained != family_name:  # no metadata (another trainer's LoRA): let diffusers decide
        raise UserError(f"'{lora_file}' was trained on a {trained} model ({info.get('base_model', 'unknown')}), but "
                        f"--model '{base}' is a {family_name} model. A LoRA only works on the family it was "
                        f"trained on: pass a {trained} model as --model, or leave --model out to use the base "
                        "model in the LoRA's metadata.")


def png_info(**values) -> PngImagePlugin.PngInfo:
    """PNG text chunks: what made the image (prompt, seed, steps, base model, LoRA)."""
    info = PngImagePlugin.PngInfo()
    for key, value in values.items():
        info.add_text(key, str(value))
    return info


def write_image(image: Image.Image, path: Path, fmt: str, pnginfo: PngImagePlugin.PngInfo | None) -> None:
    """Write to a temporary name in the same folder, then rename: a failed write (full disk) never leaves a
    half-written file under the final name, nor replaces an older image with one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: its 0600 would stay on the image
    try:
        image.save(tmp, format=fmt, **({"pnginfo": pnginfo} if pnginfo else {}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def mixed_notes(req: SampleRequest, infos: list[dict], labels: list[str]) -> list[str]:
    """Several LoRAs share one pipeline at one size, the first LoRA's: say so where their metadata disagree
    and no flag decides (a 768² LoRA drawn at another's 1024², or on another base, looks worse for it)."""
    notes = []
    for key, flag, given in (("base_model", "--model", req.model),
                             ("transformer_file", "--transformer-file", req.transformer_file),
                             ("resolution", "--width and --height", req.width and req.height)):
        values = [info.get(key) for info in infos]
        if not given and len({str(v) for v in values}) > 1:
            notes.append(f"the LoRAs were trained with different {key} ("
                         + ", ".join(f"{label}: {v or 'none'}" for label, v in zip(labels, values))
                         + f"); all are sampled with the first one's ({values[0] or 'none'}). Pass {flag} to choose.")
    return notes


def save_failed(path: Path, exc: OSError, written: list[Path]) -> UserError:
    done = ", ".join(map(str, written[:6])) + (f" and {len(written) - 6} more" if len(written) > 6 else "")
    return UserError(f"Could not write '{path}' ({exc.strerror or exc}); no partial image was left. "
                     + (f"Already written: {done}. " if written else "No image was written. ")
                     + "Free disk space, or pass --output a folder you can write to, and run the command again: "
                     "the same seeds give the same images (and default names never replace earlier ones).")


def check_stock(family: type[Family] | Family, command: str = "sample") -> None:
    """`sample` and `eval` draw through the stock diffusers pipeline: refuse a family whose pipeline is its own
    (the toy's), or one this diffusers lacks."""
    # a class (the family told from the id, nothing loaded yet): its pipeline is looked up in diffusers later
    stock = family.pipeline_module == "diffusers" and (isinstance(family, type) or family.in_diffusers)
    if not stock:
        raise UserError(f"`{command}` runs the stock diffusers pipeline, and {family.pipeline_class} (the "
                        f"{family.name} family) is not one. Load the LoRA with the family's own pipeline "
                        f"instead (for the toy world: lowvram_dopsd.toy.pipeline.ToyDiTPipeline, docs/toy.md).")


def checked_base(req: SampleRequest, lora_files: list[Path], labels: list[str], console=None,
                 command: str = "sample") -> tuple[list[dict], str, Family]:
    """The LoRAs' metadata, the base model and its family adapter, every LoRA checked against that family
    before the (slow) pipeline is loaded; notes where the LoRAs disagree go to `console`."""
    from .families import family_class_of, load_family

    infos = [json.loads(check_lora(f).get("lowvram_dopsd", "{}")) for f in lora_files]
    if console is not None:
        for note in mixed_notes(req, infos, labels):
            console.print(f"note: {note}")
    base = req.model or infos[0].get("base_model", "")
    if not base:
        raise UserError(f"'{lora_files[0]}' does not say which base model it was trained on (no lowvram_dopsd "
                        "metadata). Pass --model (a Hugging Face id or a local diffusers folder).")
    if (known := family_class_of(base)) is not None:  # before load_family may download a model for nothing
        for info, f in zip(infos, lora_files):
            check_family(info, known.name, f, base)
        check_stock(known, command)
    transformer_file = req.transformer_file or infos[0].get("transformer_file", "")
    if transformer_file and not req.transformer_file and not Path(transformer_file).is_file():
        raise UserError(f"'{lora_files[0]}' was trained on the transformer file '{transformer_file}', which is not "
                        "there any more. Pass --transformer-file with its new location.")
    # finds the folder (or cached id) and checks its components, and the transformer file if any
    family = load_family(base, transformer_file=transformer_file)
    for info, f in zip(infos, lora_files):
        check_family(info, family.name, f, base)
    check_stock(family, command)
    return infos, base, family


@dataclass
class StockPipeline:
    """The stock diffusers pipeline (`family.stock_pipeline` + `load_lora_weights`), at most one
    LoRA in it at a time, drawing images as `sample` does: noise from a CPU generator, the model's own steps."""
    pipe: Any
    family: Family
    steps: int
    width: int
    height: int
    scale: float = 1.0
    loaded: int | None = None  # index of the LoRA in the pipeline (None: the base alone)

    @classmethod
    def open(cls, req: SampleRequest, family: Family, size: int, device: torch.device) -> "StockPipeline":
        dtype = DTYPES[req.dtype] if device.type == "cuda" else torch.float32
        parts = {}
        if family.transformer_file:  # the fine-tune, read by diffusers' own single-file loader (not ours)
            import diffusers
            parts["transformer"] = getattr(diffusers, family.transformer_class).from_single_file(
                str(family.transformer_file), config=str(family.model_dir), subfolder="transformer", torch_dtype=dtype)
        pipe = family.stock_pipeline(dtype, trust_remote_code=req.trust_remote_code, **parts)
        offload = req.offload
        if offload is None:
            offload = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 40 * 2**30
        family.place(pipe, device, offload)
        steps = req.steps or family.default_rollout_steps  # the model's own few-step count
        return cls(pipe, family, steps, req.width or size, req.height or size, req.scale)

    def use(self, k: int | None, lora_file: Path | None = None) -> None:
        """LoRA number k (`lora_file`) in the pipeline, replacing the one before: nothing stacks. None: no LoRA."""
        if k == self.loaded:
            return
        if self.loaded is not None:
            self.pipe.delete_adapters(f"dopsd{self.loaded}")
        if k is not None:
            self.load(lora_file, f"dopsd{k}")
            if self.scale != 1.0:
                self.pipe.set_adapters([f"dopsd{k}"], adapter_weights=[self.scale])
        self.loaded = k

    def load(self, lora_file: Path, name: str) -> None:
        """diffusers' own loader, whose errors about a file (another model's LoRA, a layout it does not
        convert, other shapes) become one paragraph; so does a LoRA none of whose layers is in this model,
        which diffusers would skip with a log line, drawing the base model's images as if it were the LoRA's."""
        theirs = f"the {self.family.pipeline_class} of '{self.family.model_dir}'"
        quiet = logging.getLogger("diffusers.loaders.peft")  # logs the error it raises: said once, below
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            self.pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, use_safetensors=True,
                                        adapter_name=name)
        except Exception as exc:  # ValueError, RuntimeError (shapes), peft's NoMatchingPeftModuleError, KeyError
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise UserError(f"diffusers could not load the LoRA '{lora_file}' into {theirs} ({why[:300]}). It was "
                            "made for another model, or in a layout diffusers does not convert. Pass a LoRA of this "
                            "model (or the model it was trained on as --model).") from exc
        finally:
            quiet.setLevel(level)
        if name not in self.pipe.get_list_adapters().get("transformer", []):
            raise UserError(f"None of the layers of the LoRA '{lora_file}' is in {theirs}: diffusers loaded nothing "
                            "from it. It was made for another model. Pass a LoRA of this model (or the model it "
                            "was trained on as --model).")

    def draw(self, prompt: str, seed: int) -> Image.Image:
        gen = torch.Generator("cpu").manual_seed(seed)  # same noise on any device (= the trainer's previews)
        return self.family.draw(self.pipe, prompt, self.steps, self.width, self.height, gen)


def sample(req: SampleRequest, console=None) -> list[Path]:
    check_request(req)
    device = resolve_device(req.device)
    check_offload(req, device)
    lora_files = [find_lora_file(lora) for lora in req.loras]
    labels = lora_labels(lora_files)
    shots, explicit = plan_shots(req, labels)  # decided now, not after minutes of generation
    formats = {shot.path: check_output(shot.path) for shot in shots}
    infos, base, family = checked_base(req, lora_files, labels, console)
    # the first LoRA's size: several are compared at one size
    stock = StockPipeline.open(req, family, infos[0].get("resolution") or 1024, device)
    written: list[Path] = []
    for shot in shots:
        lora_file = lora_files[shot.lora]
        stock.use(shot.lora, lora_file)
        prompt = req.prompts[shot.prompt]
        image = stock.draw(prompt, shot.seed)
        fmt, pnginfo = formats[shot.path], None
        if fmt == "PNG":  # text chunks: only PNG has them (other writers ignore pnginfo)
            pnginfo = png_info(prompt=prompt, seed=shot.seed, steps=stock.steps, base_model=base,
                               lora=str(lora_file), lora_scale=req.scale,
                               **({"transformer_file": str(family.transformer_file)} if family.transformer_file else {}))
        path, note = shot.path, ""
        if not explicit and path.exists():  # another run took the name while this one generated
            path = first_free([shot.base])[0]
        elif explicit and path.exists():
            note = ", replaced the existing file"
        try:
            write_image(image, path, fmt, pnginfo)
        except OSError as exc:
            raise save_failed(path, exc, written) from exc
        written.append(path)
        if console is not None:
            console.print(f"wrote {path}  ({quote(prompt)}, seed {shot.seed}, {stock.steps} steps"
                          + (f", {labels[shot.lora]}" if len(labels) > 1 else "") + f"{note})")
    return written
