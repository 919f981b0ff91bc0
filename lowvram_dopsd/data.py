"""The training set: a folder of images with optional same-stem .txt captions.

Caption rule (shown in every run's summary and written into the LoRA's metadata):
  1. `<stem>.txt` next to the image, if present and not empty;
  2. otherwise `--caption`;
  3. otherwise the trigger word alone.
  Then, if a trigger is set: a `[trigger]` placeholder in the caption is replaced by it; otherwise
  the trigger is put in front ("sks, a photo of a dog") unless the caption already contains it.

Each image gets a training size of about `resolution`² pixels with its own aspect ratio, rounded
to a multiple of 64 (16 for tiny resolutions) so that items share a few sizes (buckets).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .families.base import Item

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Dataset:
    items: list[Item]
    skipped: list[tuple[Path, str]]  # unreadable images and why
    caption_rule: str

    def __len__(self) -> int:
        return len(self.items)


def caption_rule(caption: str, trigger: str) -> str:
    parts = ["<stem>.txt if present"]
    parts.append(f"else {caption!r}" if caption else ("else the trigger" if trigger
                                                      else "else none (an error: pass --caption or --trigger)"))
    if trigger:
        parts.append(f"trigger {trigger!r} replaces [trigger] or is prepended if absent")
    return "; ".join(parts)


def apply_trigger(text: str, trigger: str) -> str:
    if not trigger:
        return text
    if "[trigger]" in text:
        return text.replace("[trigger]", trigger)
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text):
        return text
    return f"{trigger}, {text}" if text else trigger


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with area ≈ resolution², the image's aspect ratio, sides multiples of 64 (16 if tiny)."""
    step = 64 if resolution >= 512 else 16
    aspect = min(max(width / height, 1 / 4), 4)  # extreme panoramas are cropped to 4:1
    w = max(step, round(math.sqrt(resolution * resolution * aspect) / step) * step)
    h = max(step, round(math.sqrt(resolution * resolution / aspect) / step) * step)
    return w, h


def read_caption(path: Path) -> str:
    raw = path.read_bytes()
    for enc in ("utf-8-sig", "utf-16"):
        try:
            return raw.decode(enc).strip()
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1").strip()  # never fails: a readable caption beats a crash


def load_rgb(path: Path) -> Image.Image:
    """Open as 8-bit RGB with EXIF rotation applied; transparency is flattened onto white."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            canvas = Image.new("RGB", im.size, (255, 255, 255))
            canvas.paste(im, mask=im.getchannel("A"))
            return canvas
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")
        return im.convert("RGB")


def scan(folder: str, caption: str, trigger: str, resolution: int) -> Dataset:
    root = Path(folder).expanduser()
    if not str(folder):
        raise UserError("No training images given. Pass --images DIR (a folder of .jpg/.png/.webp files).")
    if not root.is_dir():
        raise UserError(f"The images folder '{root}' does not exist or is not a folder. "
                        "Pass --images with the folder that holds your training images.")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"No images in '{root}'. Put .jpg, .png or .webp files there "
                        "(optionally with same-name .txt captions) and run again.")
    items, skipped = [], []
    for path in files:
        try:
            data = path.read_bytes()
            with Image.open(path) as probe:
                probe.verify()  # catches truncated / corrupt files before training starts
            im = load_rgb(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            skipped.append((path, str(exc) or type(exc).__name__))
            continue
        txt = path.with_suffix(".txt")
        text = read_caption(txt) if txt.is_file() else ""
        text = text or caption or trigger
        if not text:
            raise UserError(
                f"'{path.name}' has no caption: there is no {txt.name}, and neither --caption nor --trigger "
                "was given. Add .txt captions next to the images, or pass --trigger WORD (and optionally "
                "--caption 'a photo of [trigger]')."
            )
        w, h = bucket_size(*im.size, resolution)
        items.append(Item(image_path=path, caption=apply_trigger(text, trigger),
                          image_sha256=hashlib.sha256(data).hexdigest(), width=w, height=h))
    if not items:
        listed = "; ".join(f"{p.name}: {why}" for p, why in skipped[:5])
        raise UserError(f"None of the {len(files)} images in '{root}' could be read ({listed}). "
                        "Re-export them as PNG or JPEG and run again.")
    return Dataset(items=items, skipped=skipped, caption_rule=caption_rule(caption, trigger))
