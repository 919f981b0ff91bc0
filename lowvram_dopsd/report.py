"""What `eval` shows: the contact sheet with its metric table, the metrics against the training step, the
terminal table. Drawn with Pillow alone (no plotting library).

sheet.png: a title; the prompt sets' names over their columns; a "training image" row over the caption
columns; one row per model (the base, then each LoRA) with its label at the left and its metrics at the
right; under the columns, each prompt (shortened) and its seed. The PNG's text chunk `layout` holds the
row labels, the columns' prompts and seeds and the box of every cell, so a program can read it back.
steps.png: one panel per metric, the LoRAs with a known training step as points joined in step order, the
base as a dashed line; its text chunk `series` holds the numbers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, PngImagePlugin

from .preview import _font

@dataclass
class PromptSet:
    name: str  # captions | unseen | prior
    prompts: list[str]
    seeds: list[int]
    references: list[Path] = field(default_factory=list)  # captions: the training image of each prompt


@dataclass
class Row:
    label: str
    lora: Path | None
    step: int | None
    images: dict[str, list[Image.Image]] = field(default_factory=dict)
    paths: dict[str, list[Path]] = field(default_factory=dict)
    per_image: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # set -> metric -> values
    metrics: dict[str, float] = field(default_factory=dict)


INK, GREY, LIGHT, BEST = (20, 20, 20), (90, 90, 90), (235, 235, 235), (0, 120, 40)
SERIES = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def best_rows(result: dict) -> dict[str, int | None]:
    """Per metric, the index of the best row; the base is left out of `prior` (0 by definition)."""
    out = {}
    for name, m in result["metrics"].items():
        pick = min if m["better"] == "lower" else max
        scored = [(row["metrics"][name], k) for k, row in enumerate(result["rows"])
                  if row["metrics"][name] is not None and not (name == "prior" and row["lora"] is None)]
        out[name] = pick(scored)[1] if scored else None
    return out


def _save(image: Image.Image, path: Path, text: dict[str, str]) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of `width` pixels, the last one cut with an ellipsis."""
    words, out = text.split(), [""]
    for word in words:
        trial = f"{out[-1]} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not out[-1]:
            out[-1] = trial
        else:
            out.append(word)
    if len(out) > lines:
        out = out[:lines]
        out[-1] += "..."
    while out and draw.textlength(out[-1], font=font) > width and len(out[-1]) > 4:
        out[-1] = out[-1][:-4] + "..."
    return out


def write_sheet(path: Path, rows: list[Row], sets: list[PromptSet], result: dict, thumb: int = 192) -> Path:
    from .data import load_rgb

    w0, h0 = rows[0].images[next(s.name for s in sets if s.prompts)][0].size
    tw = min(thumb, w0)
    th = round(tw * h0 / w0)
    fs = max(11, tw // 15)
    font, bold = _font(fs), _font(fs + 2)
    pad, line = 6, fs + 3
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(scratch.textlength(r.label, font=bold)) for r in rows) + 2 * pad
    label_w = max(label_w, int(scratch.textlength("training image", font=font)) + 2 * pad)
    columns = [(s, j) for s in sets for j in range(len(s.prompts))]
    names = list(result["metrics"])
    col_w = [max(int(scratch.textlength(result["metrics"][n]["title"], font=font)),
                 int(scratch.textlength("higher is better", font=font)),
                 int(scratch.textlength("0.000", font=bold))) + 3 * pad for n in names]
    title_h, set_h, foot_h = 2 * line + pad, 2 * line + pad, 4 * line + pad
    has_refs = any(s.references for s in sets)
    top = title_h + set_h
    row_y = [top + (th + pad if has_refs else 0) + k * (th + pad) for k in range(len(rows))]
    grid_w = len(columns) * (tw + pad)
    width = label_w + grid_w + pad + sum(col_w)
    height = row_y[-1] + th + pad + foot_h
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)

    s = result["sampling"]
    draw.text((pad, pad), f"{result['base_model']}: {s['steps']} steps, {s['width']}x{s['height']}, "
              f"seed {s['seed']} + column, LoRA scale {s['lora_scale']}", fill=INK, font=bold)
    draw.text((pad, pad + line), "Each column: one prompt and seed for every row. Metrics at the right "
              "(green: the best row).", fill=GREY, font=font)
    cells: list[list[list[int]]] = [[] for _ in rows]
    x = label_w
    for set_ in sets:
        if set_.prompts:
            span = len(set_.prompts) * (tw + pad)
            draw.rectangle([x, title_h, x + span - pad, title_h + set_h - 3], fill=LIGHT)
            draw.text((x + pad, title_h + 2), {"captions": "training captions", "unseen": "unseen prompts, trigger",
                                               "prior": "prompts without the trigger"}[set_.name], fill=INK, font=font)
            x += span
    if has_refs:
        draw.text((pad, top + th // 2 - line // 2), "training image", fill=GREY, font=font)
    for c, (set_, j) in enumerate(columns):
        cx = label_w + c * (tw + pad)
        if set_.references:
            sheet.paste(load_rgb(set_.references[j]).resize((tw, th), Image.Resampling.LANCZOS), (cx, top))
        for k, row in enumerate(rows):
            sheet.paste(row.images[set_.name][j].convert("RGB").resize((tw, th), Image.Resampling.LANCZOS),
                        (cx, row_y[k]))
            cells[k].append([cx, row_y[k], tw, th])
        y = row_y[-1] + th + pad
        for i, text in enumerate(_wrap(draw, set_.prompts[j], font, tw - 2, 3)):
            draw.text((cx + 1, y + i * line), text, fill=INK, font=font)
        draw.text((cx + 1, y + 3 * line), f"seed {set_.seeds[j]}", fill=GREY, font=font)

    best = best_rows(result)
    tx = label_w + grid_w + pad
    for n, cw in zip(names, col_w):
        m = result["metrics"][n]
        draw.text((tx + pad, title_h + 2), m["title"], fill=INK, font=font)
        draw.text((tx + pad, title_h + 2 + line), f"{m['better']} is better", fill=GREY, font=font)
        for k, row in enumerate(result["rows"]):
            draw.text((tx + pad, row_y[k] + th // 2 - line // 2), fmt(row["metrics"][n]),
                      fill=BEST if best[n] == k else INK, font=bold)
        tx += cw
    for k, row in enumerate(rows):
        draw.text((pad, row_y[k] + th // 2 - line), row.label, fill=INK, font=bold)
        if row.step is not None:
            draw.text((pad, row_y[k] + th // 2 + 2), f"step {row.step}", fill=GREY, font=font)
    layout = {"rows": [r.label for r in rows],
              "columns": [{"set": set_.name, "prompt": set_.prompts[j], "seed": set_.seeds[j]} for set_, j in columns],
              "cells": cells, "reference_row": has_refs}
    return _save(sheet, path, {"layout": json.dumps(layout)})


def write_steps_plot(path: Path, rows: list[Row], result: dict) -> Path | None:
    """Each metric against the training step, for two or more LoRAs with distinct known steps; else None."""
    points = sorted((row.step, k) for k, row in enumerate(rows) if row.step is not None)
    if len({s for s, _ in points}) < 2:
        path.unlink(missing_ok=True)  # an earlier run's plot would not belong to this evaluation
        return None
    pw, ph, m = 420, 260, 48
    font = _font(12)
    plot = Image.new("RGB", (2 * pw, 2 * ph), (255, 255, 255))
    draw = ImageDraw.Draw(plot)
    steps = [s for s, _ in points]
    series = {}
    for i, (name, meta) in enumerate(result["metrics"].items()):
        ox, oy = (i % 2) * pw, (i // 2) * ph
        values = [result["rows"][k]["metrics"][name] for _, k in points]
        base = result["rows"][0]["metrics"][name]
        known = [v for v in values + [base] if v is not None]
        series[name] = {"steps": steps, "values": values, "base": base}
        draw.text((ox + m, oy + 8), f"{meta['title']} ({meta['better']} is better)", fill=INK, font=font)
        if not known:
            continue
        lo, hi = min(known), max(known)
        lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        x0, x1, y0, y1 = ox + m, ox + pw - 16, oy + ph - 36, oy + 30

        def at(step: float, v: float) -> tuple[float, float]:
            return (x0 + (step - steps[0]) / ((steps[-1] - steps[0]) or 1) * (x1 - x0),
                    y0 - (v - lo) / (hi - lo) * (y0 - y1))

        draw.rectangle([x0, y1, x1, y0], outline=GREY)
        for v in (lo, hi):
            draw.text((ox + 2, at(steps[0], v)[1] - 6), f"{v:.3f}", fill=GREY, font=font)
        for s in (steps[0], steps[-1]):
            draw.text((at(s, lo)[0] - 10, y0 + 4), str(s), fill=GREY, font=font)
        draw.text(((x0 + x1) // 2 - 12, y0 + 18), "step", fill=GREY, font=font)
        if base is not None:
            by = at(steps[0], base)[1]
            for dx in range(int(x0), int(x1), 12):
                draw.line([dx, by, min(dx + 6, x1), by], fill=GREY, width=1)
            draw.text((x1 - 34, by - 14), "base", fill=GREY, font=font)
        xy = [at(s, v) for s, v in zip(steps, values) if v is not None]
        if len(xy) > 1:
            draw.line(xy, fill=SERIES[0], width=2)
        for px, py in xy:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=SERIES[0])
    return _save(plot, path, {"series": json.dumps(series)})


def print_table(console, result: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    best = best_rows(result)
    table = Table(title="eval: lower is better for the DINO distances, higher for CLIP-S and quality",
                  title_justify="left")
    table.add_column("row")
    table.add_column("step", justify="right")
    for name, m in result["metrics"].items():
        table.add_column(f"{m['title']} {'↓' if m['better'] == 'lower' else '↑'}", justify="right")
    for k, row in enumerate(result["rows"]):
        table.add_row(Text(row["label"]), "" if row["step"] is None else str(row["step"]),  # a label as typed
                      *[Text(fmt(row["metrics"][n]), style="bold green" if best[n] == k else "")
                        for n in result["metrics"]])
    console.print(table)
