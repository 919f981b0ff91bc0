"""Preview grids: what the LoRA makes right now, in the model's own few steps, from fixed seeds.

With `preview_every = N` (0 = off) the trainer writes `<output>/previews/step-000000.png` before the
first step (the base model: the baseline), every N steps, and at the end. Each grid holds one
sample per preview prompt (`preview_prompts`; default: two training captions and two unseen
scenes with the trigger, or one per trigger with several), drawn with the family's default
few-step schedule (Z-Image 8 steps) by the student (base + student LoRA), from seed `preview_seed + i` for prompt i, and decoded by
`family.decode_latents` (the VAE is loaded for that, then released). The same image comes out of

    lowvram-dopsd sample --lora <output> --prompt "<prompt i>" --seed <preview_seed + i>

With `preview_teacher = true` a second row shows the EMA teacher (teacher LoRA + the teacher's
image-aware condition) for the prompts that are training captions: what the student is pulled toward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from .data import mentions_trigger
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


def make_grid(rows: list[list[Image.Image | None]], title: str, labels: list[str]) -> Image.Image:
    """Images in rows (None = an empty cell), a title strip, and each column's label under the first row."""
    w, h = next(im.size for row in rows for im in row if im is not None)
    cols = max(len(r) for r in rows)
    font_size = max(10, w // 24)
    font = _font(font_size)
    title_h, label_h = font_size + 8, 2 * font_size + 8
    grid = Image.new("RGB", (cols * w, title_h + len(rows) * h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            if im is not None:
                grid.paste(im.convert("RGB").resize((w, h)), (c * w, title_h + r * h))
    chars = max(8, int(w / (font_size * 0.55)))
    for c, text in enumerate(labels):
        lines = [text[i:i + chars] for i in range(0, min(len(text), 2 * chars), chars)]
        for i, line in enumerate(lines):
            y = title_h + len(rows) * h + 3 + i * (font_size + 2)
            draw.text((c * w + 3, y), line, fill=(60, 60, 60), font=font)
    return grid


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

    @classmethod
    def for_run(cls, cfg: TrainConfig, family: Family, model: torch.nn.Module, lora: DualLoRA, out_dir: Path,
                prompts: list[str], conds: Conditions, ds: Dataset, device: torch.device) -> Previewer:
        """The preview grids: the student on each prompt, and the EMA teacher on those that are training captions."""
        by_caption = {it.caption: i for i, it in enumerate(ds.items)}
        teacher_conds = [conds.teacher[by_caption[p]] if cfg.preview_teacher and p in by_caption else None
                         for p in prompts]
        return cls(family, model, lora, out_dir, prompts, conds.preview, teacher_conds, cfg.resolution,
                   cfg.resolution, cfg.preview_seed, device)

    def noise(self, i: int) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(self.seed + i)  # = the stock pipeline with this generator
        return torch.randn((1, *self.family.latent_shape(self.height, self.width)), generator=gen,
                           dtype=torch.float32).to(self.device)

    def write(self, step: int) -> Path:
        sigmas = self.family.sigmas(self.height, self.width, self.family.default_rollout_steps)
        student = [few_step_sample(self.family, self.model, self.lora, "student", self.noise(i), sigmas, [c])
                   for i, c in enumerate(self.conds)]
        rows = [self.family.decode_latents(torch.cat(student))]
        if any(c is not None for c in self.teacher_conds):
            teacher = [None if c is None else
                       few_step_sample(self.family, self.model, self.lora, "teacher", self.noise(i), sigmas, [c])
                       for i, c in enumerate(self.teacher_conds)]
            decoded = iter(self.family.decode_latents(torch.cat([t for t in teacher if t is not None])))
            rows.append([None if t is None else next(decoded) for t in teacher])
        title = f"step {step}" + ("  (top: student, bottom: EMA teacher)" if len(rows) > 1 else "")
        grid = make_grid(rows, title, self.prompts)
        info = PngImagePlugin.PngInfo()
        info.add_text("step", str(step))
        info.add_text("prompts", "\n".join(self.prompts))
        info.add_text("seeds", ",".join(str(self.seed + i) for i in range(len(self.prompts))))
        info.add_text("steps", str(self.family.default_rollout_steps))
        path = self.out_dir / "previews" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        try:
            grid.save(tmp, pnginfo=info)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)  # a half-written grid (full disk) is not left behind
        return path
