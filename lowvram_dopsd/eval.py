"""Which LoRA is better? `lowvram-dopsd eval` samples each LoRA and the base, then scores them.

    lowvram-dopsd eval --lora out/loras/step-000500.safetensors --lora out/loras/step-001000.safetensors \\
        --lora other-trainer-sft.safetensors --images ./my_dog --trigger "sks dog" --output eval/

1. Before anything loads: every LoRA is checked against the base (`--model`, else the LoRAs' own): one of
   another family, or trained on another base model, is refused.
2. Sampling, through `sample`'s own code (sample.StockPipeline: the stock diffusers pipeline, the model's
   own steps, noise from a CPU generator): the base first (no LoRA), then each LoRA, on three prompt sets,
   prompt j of a set from seed `--seed + j`:
     captions  the training captions (at most `--captions`, spread over the data set), each paired with its image;
     unseen    new scenes with the trigger (defaults below, or `--prompts FILE`, one a line);
     prior     prompts without the trigger (defaults below, or `--prior-prompts FILE`).
   So `lowvram-dopsd sample --lora L --prompt P --seed S` gives any of these images again.
3. The pipeline is released; the metric models (metrics.py) load one at a time, on the GPU when their
   planned memory fits the card (the `--preset`'s, else the GPU's own), else on the CPU:
     concept   DINO distance of each caption image to its training image (the paper's DINO-D); lower is better
     clip_s    CLIP score of the unseen images with their prompts (the paper's CLIP-S); higher is better
     prior     DINO distance of each prior image to the base's image of the same prompt and seed; lower is better
     quality   CLIP-IQA, no reference (good / sharp / clean photo vs bad / blurry / noisy), over every image
               of the row: the few-step quality proxy; higher is better
4. Written to `--output`: images/<row>/<set>-<j>.png, sheet.png (rows: base and each LoRA, columns: the
   prompts, the metric table at the right), eval.json (docs/eval.md has its schema), steps.png for two or
   more LoRAs with known training steps (each metric against the step), and the table in the terminal.
"""
from __future__ import annotations

import gc
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import __version__, data, metrics
from .errors import UserError, quote
from .preview import UNSEEN_SCENES
from .report import PromptSet, Row
from .files import find_lora_file, read_metadata
from .runtime import DTYPES, release, resolve_device
from .sample import (SampleRequest, StockPipeline, check_family, check_offload, check_request, check_stock,
                     checked_base, lora_labels, png_info, write_image)

SCHEMA = "lowvram-dopsd-eval/1"
UNSEEN_PROMPTS = (*UNSEEN_SCENES,
                  "{trigger} on a wooden table in a sunlit kitchen",
                  "{trigger} in a snowy forest at dawn, soft light",
                  "{trigger} on a beach at sunset, waves in the background",
                  "a close-up photo of {trigger} in front of a red brick wall")
PRIOR_PROMPTS = ("a red apple and a glass of water on a white table",
                 "a lighthouse on a rocky coast under a stormy sky",
                 "a portrait photo of an old fisherman with a grey beard",
                 "a cozy library with tall wooden shelves and a reading lamp",
                 "a street market with colorful spices in the afternoon light",
                 'a shop window with a neon sign that says "OPEN"')


@dataclass(frozen=True)
class Metric:
    title: str
    better: str  # "lower" | "higher"
    what: str


METRICS = {
    "concept": Metric("concept DINO-D", "lower", "DINO distance of each training-caption image to its training "
                      "image (1 - cosine), mean"),
    "clip_s": Metric("CLIP-S", "higher", "CLIP cosine of each unseen-prompt image with its prompt (the trigger "
                     "read as --subject), mean"),
    "prior": Metric("prior DINO-D", "lower", "DINO distance of each no-trigger image to the base's image of the "
                    "same prompt and seed, mean (0 for the base)"),
    "quality": Metric("quality CLIP-IQA", "higher", "CLIP-IQA over every image of the row: mean over images and "
                      "the pairs good/bad, sharp/blurry, clean/noisy photo of the positive's probability"),
}


@dataclass
class EvalRequest:
    loras: list[str]
    images: str
    trigger: str = ""
    caption: str = ""
    subject: str = ""  # what the trigger stands for ("dog"): CLIP reads it in the trigger's place
    output: str = "eval"
    prompts_file: str = ""
    prior_prompts_file: str = ""
    captions: int = 6  # training captions sampled at most
    model: str = ""
    transformer_file: str = ""
    steps: int = 0
    seed: int = 0
    width: int = 0
    height: int = 0
    scale: float = 1.0
    device: str = "auto"
    dtype: str = "bf16"
    offload: bool | None = None
    preset: str = ""  # the card whose memory the metric models must fit ('' = the GPU's own)
    dino_model: str = metrics.DINO_DEFAULT
    clip_model: str = metrics.CLIP_DEFAULT
    trust_remote_code: bool = False

    def sample_request(self) -> SampleRequest:
        return SampleRequest(loras=self.loras, prompts=[], model=self.model, steps=self.steps, seed=self.seed,
                             width=self.width, height=self.height, device=self.device, dtype=self.dtype,
                             scale=self.scale, trust_remote_code=self.trust_remote_code, offload=self.offload,
                             transformer_file=self.transformer_file)


# ---------------------------------------------------------------------------------------------
# Checks before anything loads
# ---------------------------------------------------------------------------------------------
def _local_dir(model: str) -> Path | None:
    """A model's folder if it is on this machine (a folder, or an id in the Hugging Face cache); never downloads."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.count("/") != 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached: cannot be told offline
        return None


def same_base(a: str, a_file: str, b: str, b_file: str) -> bool | None:
    """Whether two (base model, transformer file) pairs are one model: the same name, or the same transformer
    config and weight sizes (checkpoint.model_identity, as a resume compares them); None when it cannot be told
    without downloading."""
    from .checkpoint import model_identity

    if a == b and Path(a_file or ".").name == Path(b_file or ".").name:
        return True
    dirs = _local_dir(a), _local_dir(b)
    files_there = all(not f or Path(f).is_file() for f in (a_file, b_file))
    if None in dirs or not files_there:
        return None
    return model_identity(dirs[0], "", a_file or None) == model_identity(dirs[1], "", b_file or None)


def check_loras(req: EvalRequest, lora_files: list[Path], infos: list[dict], console=None) -> str:
    """The base every LoRA is compared with, each LoRA checked against it: one of another family or trained on
    another base model is refused (a foreign LoRA, without our metadata, cannot be checked: diffusers decides)."""
    from .families import family_class_of

    known = [(f, info) for f, info in zip(lora_files, infos) if info.get("base_model")]
    base = req.model or (known[0][1]["base_model"] if known else "")
    if not base:
        raise UserError(f"'{lora_files[0]}' does not say which base model it was trained on (no lowvram_dopsd "
                        "metadata). Pass --model (a Hugging Face id or a local diffusers folder).")
    if (family := family_class_of(base)) is not None:
        for f, info in known:
            check_family(info, family.name, f, base)
        check_stock(family, "eval")  # before the metric models are fetched
    base_file = req.transformer_file or (known[0][1].get("transformer_file", "") if known else "")
    for f, info in known:
        same = same_base(info["base_model"], info.get("transformer_file", ""), base, base_file)
        trained_on = info["base_model"] + (f" with the transformer file {info['transformer_file']}"
                                           if info.get("transformer_file") else "")
        if same is False:
            raise UserError(f"'{f}' was trained on {trained_on}, which is not the base model of this evaluation "
                            f"({base}{f' with {base_file}' if base_file else ''}): its transformer config or "
                            "weights differ. LoRAs are compared on the base they were trained on: evaluate LoRAs of "
                            "another base in a run of their own (with --model set to that base).")
        if same is None and console is not None:
            console.print(f"note: could not check without downloading that '{f}' (trained on {trained_on}) was "
                          f"trained on {base}; it is evaluated on the latter.")
    return base


def read_prompt_file(path: str, flag: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are left out."""
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} '{path}' could not be read ({exc}). Pass a UTF-8 text file with one prompt a "
                        "line.") from exc
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{flag} '{path}' holds no prompt (one a line; lines starting with # are comments).")
    return prompts


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def prompt_sets(req: EvalRequest, ds: data.Dataset, triggers: list[str]) -> list[PromptSet]:
    items = [ds.items[i] for i in spread(len(ds.items), req.captions)]
    unseen = read_prompt_file(req.prompts_file, "--prompts") if req.prompts_file else list(UNSEEN_PROMPTS)
    unseen = [data.apply_trigger(p.replace("{trigger}", "[trigger]"), triggers[i % len(triggers)])
              for i, p in enumerate(unseen)]
    prior = read_prompt_file(req.prior_prompts_file, "--prior-prompts") if req.prior_prompts_file else \
        list(PRIOR_PROMPTS)
    for p in prior:
        if named := [t for t in triggers if data.mentions_trigger(p, t)]:
            raise UserError(f"The prior prompt {quote(p)} names the trigger {quote(named[0])}. Prior prompts "
                            "measure what the LoRA does to prompts without it: leave the trigger out of "
                            "--prior-prompts.")

    def seeds(n: int) -> list[int]:
        return [req.seed + j for j in range(n)]

    return [PromptSet("captions", [it.caption for it in items], seeds(len(items)), [it.image_path for it in items]),
            PromptSet("unseen", unseen, seeds(len(unseen))), PromptSet("prior", prior, seeds(len(prior)))]


def clip_text(prompt: str, triggers: list[str], subject: str) -> str:
    """The prompt as CLIP reads it: the trigger replaced by what it stands for (the authors replace their [V]
    token by the class name: CLIP does not know the trigger)."""
    for t in triggers if subject else ():
        prompt = re.sub(rf"(?<!\w){re.escape(t)}(?!\w)", subject, prompt)
    return prompt


def check_output_folder(folder: Path) -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"--output '{folder}': '{existing}' is not a folder you can write to. Pass a folder you can "
                        "write to.")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def lora_step(path: Path, info: dict) -> int | None:
    """The training step of a LoRA: its metadata's `steps`, else a step-NNNNNN in its name (checkpoints)."""
    if isinstance(info.get("steps"), int):
        return info["steps"]
    m = re.search(r"step-(\d+)", f"{path.parent.name}/{path.stem}")
    return int(m.group(1)) if m else None


def draw_rows(req: EvalRequest, rows: list[Row], sets: list[PromptSet], stock: StockPipeline, base: str,
              out: Path, console) -> None:
    """Every row's images, the base first (before any LoRA is in the pipeline), written as `sample` writes them."""
    for k, row in enumerate(rows):
        stock.use(None if row.lora is None else k - 1, row.lora)
        folder = out / "images" / f"{k}-{row.label}"
        for s in sets:
            row.images[s.name], row.paths[s.name] = [], []
            for j, (prompt, seed) in enumerate(zip(s.prompts, s.seeds)):
                image = stock.draw(prompt, seed)
                path = folder / f"{s.name}-{j}.png"
                write_image(image, path, "PNG", png_info(prompt=prompt, seed=seed, steps=stock.steps, base_model=base,
                                                         lora=str(row.lora or ""), lora_scale=req.scale))
                row.images[s.name].append(image)
                row.paths[s.name].append(path)
        if console is not None:
            console.print(f"sampled {row.label}: {sum(len(s.prompts) for s in sets)} images in {folder}")


def metric_device(planned: float, device: torch.device, budget_gib: float | None) -> torch.device:
    """Where a metric model of `planned` GiB runs: the GPU when it fits the budget, else the CPU."""
    if device.type == "cuda" and budget_gib is not None and planned > budget_gib:
        return torch.device("cpu")
    return device


def score(req: EvalRequest, rows: list[Row], sets: list[PromptSet], triggers: list[str], folders: dict[str, Path],
          device: torch.device, budget_gib: float | None, console) -> dict:
    """Every metric of every row, the metric models loaded one at a time; returns what ran where."""
    by_name = {s.name: s for s in sets}
    size = rows[0].images["captions"][0].size  # every set holds a prompt (checked when they were read)
    runs = {}

    def place(name: str, batch: int, image_size: tuple[int, int] | None) -> tuple[torch.device, torch.dtype]:
        dtype = DTYPES[req.dtype] if device.type == "cuda" else torch.float32  # the sampling dtype
        planned = metrics.planned_bytes(folders[name], dtype, batch, image_size)
        where = metric_device(planned / 2**30, device, budget_gib)
        dtype = dtype if where.type == "cuda" else torch.float32
        runs[name] = {"model": getattr(req, f"{name}_model"), "folder": str(folders[name]), "device": where.type,
                      "dtype": str(dtype).removeprefix("torch."), "planned_bytes": planned, "peak_bytes": None}
        if where != device and console is not None:
            console.print(f"note: the {name} model needs about {planned / 2**30:.1f} GiB, more than the card's "
                          f"{budget_gib:.1f} GiB budget: it runs on the CPU.")
        if where.type == "cuda":
            torch.cuda.reset_peak_memory_stats(where)
        return where, dtype

    def peak(name: str, where: torch.device) -> None:
        if where.type == "cuda":
            runs[name]["peak_bytes"] = torch.cuda.max_memory_allocated(where)

    # DINO: the caption images against the training images, the prior images against the base's
    where, dtype = place("dino", 1, size)
    dino = metrics.Dino.open(folders["dino"], where, dtype)
    refs = dino.features([data.load_rgb(p) for p in by_name["captions"].references], size)
    feats = [{name: dino.features(row.images[name], size) for name in ("captions", "prior")} for row in rows]
    peak("dino", where)
    release(dino.model)
    del dino
    for row, f in zip(rows, feats):
        row.per_image["captions"] = {"concept": metrics.cosine_distance(f["captions"], refs)}
        row.per_image["prior"] = {"prior": metrics.cosine_distance(f["prior"], feats[0]["prior"])}

    # CLIP: the unseen images with their prompts, and CLIP-IQA of every image
    where, dtype = place("clip", metrics.Clip.batch, None)
    clip = metrics.Clip.open(folders["clip"], where, dtype)
    texts = clip.text_features([clip_text(p, triggers, req.subject) for p in by_name["unseen"].prompts])
    for row in rows:
        for s in sets:
            f = clip.image_features(row.images[s.name])
            parts = clip.iqa(f)
            quality = [sum(v) / len(v) for v in zip(*parts.values())]
            row.per_image.setdefault(s.name, {}).update({"quality": quality, **{f"iqa_{k}": v for k, v in parts.items()}})
            if s.name == "unseen":
                row.per_image[s.name]["clip_s"] = (f * texts).sum(dim=-1).tolist()
    peak("clip", where)
    release(clip.model)
    del clip

    for row in rows:
        per = row.per_image
        row.metrics = {"concept": _mean(per["captions"]["concept"]), "clip_s": _mean(per["unseen"]["clip_s"]),
                       "prior": _mean(per["prior"]["prior"]),
                       "quality": _mean([q for s in sets for q in per[s.name]["quality"]])}
    return runs


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate(req: EvalRequest, console=None, command: list[str] | None = None) -> Path:
    """Sample, score, write everything to `req.output`; returns the path of eval.json."""
    from . import report
    from .plan import budget_for, vram_of_preset

    sreq = req.sample_request()
    check_request(sreq)
    if req.captions < 1:
        raise UserError(f"--captions {req.captions}: at least one training caption is sampled (it pairs with its "
                        "image for the concept score).")
    device = resolve_device(req.device)
    check_offload(sreq, device)
    out = Path(req.output).expanduser()
    check_output_folder(out)
    lora_files = [find_lora_file(lora) for lora in req.loras]
    labels = lora_labels(lora_files)
    infos = [json.loads(read_metadata(f).get("lowvram_dopsd", "{}")) for f in lora_files]
    base = check_loras(req, lora_files, infos, console)
    # the trigger as typed, else the one the LoRAs record (a dataset file's folders: joined by ', ')
    trigger = req.trigger or next((i["trigger"].split(", ")[0] for i in infos if i.get("trigger")), "")
    ds = data.load(req.images, req.caption, trigger, infos[0].get("resolution") or 1024)
    triggers = ds.triggers
    if not triggers:
        raise UserError("Which trigger did the LoRAs learn? None of them records one: pass --trigger (the word or "
                        "phrase of your captions, e.g. \"sks dog\").")
    if not ds.items:
        raise UserError(f"--images '{req.images}' holds no usable image: the concept score compares the LoRAs' "
                        "images with the training images. Pass the folder (or dataset file) the LoRAs were trained on.")
    sets = prompt_sets(req, ds, triggers)
    # the metric models' files first (a download, or the offline error), before minutes of sampling
    folders = {"dino": metrics.locate(req.dino_model, "DINO model (--dino-model)"),
               "clip": metrics.locate(req.clip_model, "CLIP model (--clip-model)")}
    sreq.model = base
    _, base, family = checked_base(sreq, lora_files, labels, console, "eval")

    started = time.time()
    stock = StockPipeline.open(sreq, family, infos[0].get("resolution") or 1024, device)
    stock.pipe.set_progress_bar_config(disable=True)  # one line per row instead of a bar per image
    rows = [Row("base", None, None)] + [Row(label, f, lora_step(f, info))
                                        for label, f, info in zip(labels, lora_files, infos)]
    draw_rows(req, rows, sets, stock, base, out, console)
    steps, width, height = stock.steps, stock.width, stock.height
    del stock  # the pipeline leaves before any metric model loads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    budget = vram_of_preset(req.preset) if req.preset else (
        budget_for(torch.cuda.get_device_properties(device).total_memory / 2**30) if device.type == "cuda" else None)
    runs = score(req, rows, sets, triggers, folders, device, budget, console)

    result = {
        "schema": SCHEMA, "tool_version": __version__, "command": command or [],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - started, 1),
        "base_model": base, "family": family.name,
        "transformer_file": str(family.transformer_file) if family.transformer_file else None,
        "sampling": {"steps": steps, "width": width, "height": height, "seed": req.seed, "lora_scale": req.scale,
                     "device": device.type, "dtype": req.dtype if device.type == "cuda" else "fp32"},
        "triggers": triggers, "subject": req.subject or None, "images": str(Path(req.images).expanduser()),
        "metric_models": runs, "budget_gib": budget,
        "metrics": {name: asdict(m) for name, m in METRICS.items()},
        "prompt_sets": {s.name: [{"prompt": p, "seed": seed,
                                  **({"reference": str(s.references[j])} if s.references else {}),
                                  **({"clip_text": clip_text(p, triggers, req.subject)} if s.name == "unseen" else {})}
                                 for j, (p, seed) in enumerate(zip(s.prompts, s.seeds))] for s in sets},
        "rows": [{"label": row.label, "lora": str(row.lora) if row.lora else None, "step": row.step,
                  "metrics": row.metrics,
                  "images": {s.name: [{"path": str(path.relative_to(out)),
                                       **{m: vals[j] for m, vals in row.per_image[s.name].items()}}
                                      for j, path in enumerate(row.paths[s.name])] for s in sets}}
                 for row in rows],
    }
    sheet = report.write_sheet(out / "sheet.png", rows, sets, result)
    plot = report.write_steps_plot(out / "steps.png", rows, result)
    result["files"] = {"sheet": sheet.name, "steps_plot": plot.name if plot else None}
    path = out / "eval.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    if console is not None:
        report.print_table(console, result)
        console.print(f"wrote {path}, {sheet}" + (f", {plot}" if plot else ""))
    return path
