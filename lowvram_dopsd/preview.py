"""Preview grids: what the LoRA makes right now, in the model's own few steps, from fixed seeds.

With `preview_every = N` (0 = off) the trainer writes `<output>/previews/step-000000.png` before the
first step (the base model: the baseline), every N steps, and at the end. Each grid holds one
sample per preview prompt (`preview_prompts`; default: two training captions and two unseen
scenes with the trigger, or one per trigger with several), drawn with the family's default
few-step schedule (Z-Image 8 steps) by the student (base + student LoRA), from seed `preview_seed + i` for prompt i, and decoded by
`family.decode_latents` (the VAE is loaded for that, then released). The same image comes out of

    lowvram-dopsd sample --lora <output> --prompt "<prompt i>" --seed <preview_seed + i>

A grid reads at a glance: on top, as many of your training images as there are prompts, with a legend
saying that they are what the trigger should draw; then each prompt above its column, and the rows:
the LoRA at this step, and at the last step also the base model (no LoRA) from the same noise beside it.
With `preview_teacher = true` a row shows the EMA teacher (teacher LoRA + the teacher's image-aware
condition) for the prompts that are training captions: what the student is pulled toward. Samples under
MIN_TILE pixels (the toy world's 32x32) are enlarged pixel for pixel so that they and their captions can be read.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from .data import load_rgb, mentions_trigger
from .families.base import Cond, Family
from .lora import DualLoRA

if TYPE_CHECKING:
    from .conditions import Conditions
    from .config import TrainConfig
    from .data import Dataset

UNSEEN_SCENES = ("{trigger}, walking through a busy city street at night, neon signs, rain",
                 "a watercolor painting of {trigger} in a sunny meadow")


def default_prompts(captions: list[str], triggers: str | list[str]) -> list[str]:
    """Two training captions (what it learns), plus two new scenes with the trigger (does it generalise).

    Several triggers (a dataset file's folders): a caption of each of the first two, and one new scene
    per trigger, six prompts at most (each preview prompt costs a sample at every preview)."""
    triggers = [t for t in ([triggers] if isinstance(triggers, str) else triggers) if t]
    if len(triggers) <= 1:
        return list(dict.fromkeys(captions))[:2] + [s.format(trigger=t) for t in triggers for s in UNSEEN_SCENES]
    seen = [next((c for c in captions if mentions_trigger(c, t)), None) for t in triggers[:2]]
    unseen = [UNSEEN_SCENES[i % len(UNSEEN_SCENES)].format(trigger=t) for i, t in enumerate(triggers[:4])]
    return list(dict.fromkeys(c for c in seen if c)) + unseen


@torch.no_grad()
def few_step_sample(family: Family, model: torch.nn.Module, lora: DualLoRA, role: str | None, noise: torch.Tensor,
                    sigmas: torch.Tensor, conds: list[Cond]) -> torch.Tensor:
    """The pipeline's Euler sampler with one LoRA set (the roll-out of `rollout_and_learn`, nothing trained)."""
    x, sigmas = noise, sigmas.to(noise.device, non_blocking=True)  # as rollout_and_learn: no copy per pass
    with lora.use(role):
        for k in range(len(sigmas) - 1):
            x = x + (sigmas[k + 1] - sigmas[k]) * family.velocity(model, x, sigmas[k], conds, sigmas[k + 1])
    return x


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


# A tile is drawn at least this wide: a 32x32 toy sample becomes 192 px (nearest-neighbour, so its pixels
# stay sharp), wide enough for a readable caption under it. Larger samples are drawn at their own size.
MIN_TILE = 192
LABEL_LINES = 3  # a prompt above its column: at most this many lines, the last cut with "..."


@dataclass
class GridLayout:
    """Where everything of a grid is, top to bottom: the title and legend, the reference row (if any), the
    prompts, the rows; `box(r, c)` is the cell of row r (0 = the first row under the prompts), column c,
    `box(-1, c)` a reference's."""

    tile_w: int
    tile_h: int
    font_size: int
    margin: int       # the row labels' column, on the left
    head: int         # the title and legend strip
    refs: int         # the reference row's height (0: none)
    labels: int       # the prompts' strip

    @classmethod
    def of(cls, w: int, h: int, has_legend: bool, has_refs: bool) -> GridLayout:
        scale = -(-MIN_TILE // w) if w < MIN_TILE else 1
        font_size = max(12, w * scale // 16)
        line = font_size + 4
        return cls(w * scale, h * scale, font_size, margin=8 * font_size, head=8 + line * (1 + has_legend),
                   refs=h * scale if has_refs else 0, labels=line * LABEL_LINES + 6)

    @property
    def line(self) -> int:
        return self.font_size + 4

    def box(self, r: int, c: int) -> tuple[int, int, int, int]:
        x = self.margin + c * self.tile_w
        y = self.head if r < 0 else self.head + self.refs + self.labels + r * self.tile_h
        return x, y, x + self.tile_w, y + self.tile_h


def _wrap(text: str, width_px: int, font_size: int, lines: int) -> list[str]:
    chars = max(6, int(width_px / (font_size * 0.55)))
    out = textwrap.wrap(text, chars) or [""]
    return out[:lines - 1] + [out[lines - 1][:chars - 3] + "..."] if len(out) > lines else out


def make_grid(rows: list[tuple[str, list[Image.Image | None]]], title: str, labels: list[str], legend: str = "",
              references: tuple[str, list[Image.Image]] | None = None) -> tuple[Image.Image, GridLayout]:
    """Rows of images (None: an empty cell), each with its label on the left, and each column's label (its
    prompt) above them; on top the title, an optional legend line and an optional row of reference images
    (the training images the legend speaks of). Small images are enlarged to MIN_TILE."""
    w, h = next(im.size for _, row in rows for im in row if im is not None)
    cols = max(len(row) for _, row in rows)
    layout = GridLayout.of(w, h, bool(legend), bool(references and references[1]))
    font, size, line = _font(layout.font_size), layout.font_size, layout.line
    grid = Image.new("RGB", (layout.margin + cols * layout.tile_w, layout.box(len(rows), 0)[1]), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), title, fill=(0, 0, 0), font=font)
    if legend:
        draw.text((6, 6 + line), legend, fill=(40, 40, 160), font=font)

    def row_label(text: str, y: int) -> None:
        for i, part in enumerate(_wrap(text, layout.margin - 10, size, 4)):
            draw.text((6, y + 6 + i * line), part, fill=(0, 0, 0), font=font)

    if layout.refs:
        row_label(references[0], layout.head)
        for c, im in enumerate(references[1][:cols]):
            grid.paste(_fit(im, layout.tile_w, layout.tile_h), layout.box(-1, c)[:2])
    for c, text in enumerate(labels):
        x, y = layout.box(0, c)[0] + 4, layout.head + layout.refs + 3
        for i, part in enumerate(_wrap(text, layout.tile_w - 8, size, LABEL_LINES)):
            draw.text((x, y + i * line), part, fill=(60, 60, 60), font=font)
    for r, (name, row) in enumerate(rows):
        row_label(name, layout.box(r, 0)[1])
        for c, im in enumerate(row):
            if im is not None:
                grid.paste(_fit(im, layout.tile_w, layout.tile_h), layout.box(r, c)[:2])
    return grid, layout


def _fit(im: Image.Image, w: int, h: int) -> Image.Image:
    """`im` in a w x h tile: enlarged pixel for pixel when it is smaller (a sample), else fitted whole on white
    (a training photo of another aspect ratio)."""
    im = im.convert("RGB")
    if im.width <= w and im.height <= h and (w % im.width, h % im.height) == (0, 0) and w // im.width == h // im.height:
        return im.resize((w, h), Image.NEAREST)
    im = ImageOps.contain(im, (w, h), Image.LANCZOS)
    tile = Image.new("RGB", (w, h), (255, 255, 255))
    tile.paste(im, ((w - im.width) // 2, (h - im.height) // 2))
    return tile


@dataclass
class Previewer:
    family: Family
    model: torch.nn.Module
    lora: DualLoRA
    out_dir: Path
    prompts: list[str]
    conds: list[Cond]                      # student condition of each prompt
    teacher_conds: list[Cond | None]       # teacher condition for prompts that are training captions
    height: int
    width: int
    seed: int
    device: torch.device
    references: list[Image.Image] = field(default_factory=list)  # training images: what the trigger should draw
    triggers: list[str] = field(default_factory=list)
    last_step: int = 0                     # its grid also shows the base model, beside the last step's
    writes: bool = True                    # False: sample (a full fine-tune's other ranks) but write nothing

    @classmethod
    def for_run(cls, cfg: TrainConfig, family: Family, model: torch.nn.Module, lora: DualLoRA, out_dir: Path,
                prompts: list[str], conds: Conditions, ds: Dataset, device: torch.device, writes: bool = True
                ) -> Previewer:
        """The preview grids: the student on each prompt, and the EMA teacher on those that are training captions;
        above them, as many training images (the legend: what the trigger should draw)."""
        by_caption = {it.caption: i for i, it in enumerate(ds.items)}
        teacher_conds = [conds.teacher[by_caption[p]] if cfg.preview_teacher and p in by_caption else None
                         for p in prompts]
        references = [load_rgb(it.image_path) for it in ds.items[:len(prompts)]]
        return cls(family, model, lora, out_dir, prompts, conds.preview, teacher_conds, cfg.resolution,
                   cfg.resolution, cfg.preview_seed, device, references, ds.triggers, cfg.steps, writes)

    def noise(self, i: int) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(self.seed + i)  # = the stock pipeline with this generator
        return torch.randn((1, *self.family.latent_shape(self.height, self.width)), generator=gen,
                           dtype=torch.float32).to(self.device)

    def latents(self, role: str | None, conds: list[Cond | None]) -> list[torch.Tensor | None]:
        """One sample's final latents per prompt with a condition (None: an empty cell), with the weights `role`."""
        sigmas = self.family.sigmas(self.height, self.width, self.family.default_rollout_steps)
        return [None if c is None else few_step_sample(self.family, self.model, self.lora, role, self.noise(i),
                                                       sigmas, [c]) for i, c in enumerate(conds)]

    def decoded(self, latents: list[torch.Tensor | None]) -> list[Image.Image | None]:
        images = iter(self.family.decode_latents(torch.cat([x for x in latents if x is not None])))
        return [None if x is None else next(images) for x in latents]

    def sample(self, step: int) -> list[tuple[str, list[torch.Tensor | None]]]:
        """The grid's rows of `step`: (label, final latents per prompt). A full fine-tune's ranks all sample (each
        pass gathers the sharded weights)."""
        rows = []
        if step and step == self.last_step and self.lora.holds_base:  # the end: beside the base model, same noise
            rows.append(("base model (no LoRA)", self.latents(None, self.conds)))
        trained = "LoRA" if self.lora.holds_base else "model"  # a full fine-tune: the whole model
        rows.append((f"{trained} at step {step}", self.latents("student", self.conds)))
        if any(c is not None for c in self.teacher_conds):
            rows.append(("EMA teacher, reading your image", self.latents("teacher", self.teacher_conds)))
        return rows

    def write(self, step: int, rows: list[tuple[str, list[torch.Tensor | None]]] | None = None) -> Path | None:
        """The grid of `step`, from `rows` if `sample` made them already. On the other ranks of a full fine-tune
        it samples and returns None: `writes` is rank 0's alone."""
        rows = self.sample(step) if rows is None else rows
        if not self.writes:
            return None
        rows = [(name, self.decoded(latents)) for name, latents in rows]
        named = " / ".join(f"'{t}'" for t in self.triggers)
        legend = f"what {named} should draw: your images, the top row" if self.references and named else ""
        references = ("your images", self.references) if self.references else None
        title = f"step {step}" + (f" of {self.last_step}" if self.last_step else "") + \
            ("  (before training: the base model)" if step == 0 else "")
        grid, self.layout = make_grid(rows, title, self.prompts, legend, references)
        info = PngImagePlugin.PngInfo()
        info.add_text("step", str(step))
        info.add_text("prompts", "\n".join(self.prompts))
        info.add_text("seeds", ",".join(str(self.seed + i) for i in range(len(self.prompts))))
        info.add_text("steps", str(self.family.default_rollout_steps))
        info.add_text("rows", "\n".join(name for name, _ in ([references] if references else []) + rows))
        path = self.out_dir / "previews" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        try:
            grid.save(tmp, pnginfo=info)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)  # a half-written grid (full disk) is not left behind
        return path
