"""The training set: a folder of images with optional same-stem .txt captions.

Caption rule (shown in every run's summary and written into the LoRA's metadata):
  1. `<stem>.txt` next to the image, if present and not empty;
  2. otherwise `--caption`;
  3. otherwise the trigger word alone.
  Then, if a trigger is set: a `[trigger]` placeholder in the caption is replaced by it; otherwise
  the trigger is put in front ("sks, a photo of a dog") unless the caption already contains it.

Each image gets a training size of about `resolution`² pixels with its own aspect ratio, rounded
to a multiple of 64 (16 for tiny resolutions) so that items share a few sizes (buckets).

Bad input never crashes the run and never passes silently: an unreadable, truncated, too small
(< 16 px) or over-the-decompression-bomb-limit image is skipped and listed (or, with
`on_bad_image = "stop"`, stops the run with the list); a small image (short side under a quarter
of the training resolution) or a caption that is not UTF-8 is used with a warning.
"""
from __future__ import annotations

import codecs
import hashlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .families.base import Item

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# Image files that are not read, listed as skipped rather than passed over in silence: GIF keeps at
# most 256 colours (training learns its dithering); the others need Pillow plugins or a raw developer.
NOT_READ_SUFFIXES = (".gif", ".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".dng", ".cr2", ".nef", ".arw")
MIN_SIDE = 16  # below this an image carries no usable detail at any training size


@dataclass
class Dataset:
    items: list[Item]
    skipped: list[tuple[Path, str]]  # images not used, and why
    caption_rule: str
    warnings: list[tuple[Path, str]] = field(default_factory=list)  # used, but the user should know

    def __len__(self) -> int:
        return len(self.items)

    def identity(self) -> list[list]:
        """What a checkpoint must find again to resume: every item's file, bytes hash, caption and size."""
        return [[it.image_path.name, it.image_sha256, it.caption, it.width, it.height] for it in self.items]


def caption_rule(caption: str, trigger: str) -> str:
    parts = ["<stem>.txt if present"]
    parts.append(f"else {caption!r}" if caption else ("else the trigger" if trigger
                                                      else "else none (an error: pass --caption or --trigger)"))
    if trigger:
        parts.append(f"trigger {trigger!r} replaces [trigger] or is prepended if absent")
    return "; ".join(parts)


def mentions_trigger(text: str, trigger: str) -> bool:
    """The trigger as a whole word or phrase ("sks" in "a sks dog", not in "sksx")."""
    return bool(trigger) and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text) is not None


def apply_trigger(text: str, trigger: str) -> str:
    if not trigger:
        return text
    if "[trigger]" in text:
        return text.replace("[trigger]", trigger)
    if mentions_trigger(text, trigger):
        return text
    return f"{trigger}, {text}" if text else trigger


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with area ≈ resolution², the image's aspect ratio, sides multiples of 64 (16 if tiny)."""
    step = 64 if resolution >= 512 else 16
    aspect = min(max(width / height, 1 / 4), 4)  # extreme panoramas are cropped to 4:1
    w = max(step, round(math.sqrt(resolution * resolution * aspect) / step) * step)
    h = max(step, round(math.sqrt(resolution * resolution / aspect) / step) * step)
    return w, h


def read_caption_checked(path: Path) -> tuple[str, str | None]:
    """The caption text and, if its encoding had to be guessed, a note saying so.

    UTF-8 (with or without BOM) and UTF-16 with a BOM are read as such; anything else is read as
    Windows-1252 (then Latin-1, which never fails): a readable caption beats a crash, but the
    user is told, because a mis-decoded caption silently trains the wrong words.
    """
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16").strip(), None
    try:
        text, note = raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        note = "caption is not UTF-8; read as Windows-1252: check the accents, or re-save it as UTF-8"
    if "\x00" in text:
        text = text.replace("\x00", "")
        note = "caption holds NUL bytes (UTF-16 without a BOM, or not a text file?); they were removed"
    return text.strip(), note


def read_caption(path: Path) -> str:
    return read_caption_checked(path)[0]


def load_rgb(path: Path) -> Image.Image:
    """Open as 8-bit RGB with EXIF rotation applied; transparency is flattened onto white."""
    with Image.open(path) as im:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a damaged EXIF block: keep the stored orientation rather than fail
            im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            canvas = Image.new("RGB", im.size, (255, 255, 255))
            canvas.paste(im, mask=im.getchannel("A"))
            return canvas
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")
        elif im.mode == "F":
            im = im.convert("L")
        return im.convert("RGB")


def _open_checked(path: Path) -> tuple[Image.Image, str | None]:
    """Verify, decode and convert one image; raise ValueError with a human reason if it is unusable."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as probe:
                probe.verify()  # catches truncated / corrupt files before training starts
            im = load_rgb(path)
        except Image.DecompressionBombError as exc:
            limit = (Image.MAX_IMAGE_PIXELS or 0) * 2 / 1e6
            raise ValueError(f"larger than Pillow's decompression-bomb limit ({limit:.0f} MP): downscale it "
                             "(training uses about resolution² pixels anyway)") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"not a readable image ({str(exc) or type(exc).__name__})") from exc
    note = None
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        note = f"very large ({im.width}x{im.height}); it is used, but decoding it takes a lot of memory"
    return im, note


def _not_read_why(path: Path) -> str:
    suffix = path.suffix.lower()
    why = ("256 colours at most: training would learn the dithering" if suffix == ".gif"
           else "not a format this tool reads")
    return f"{suffix} is not read ({why}): convert it to PNG or JPEG"


def _images_in_subfolders(root: Path) -> list[str]:
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if any(q.suffix.lower() in IMAGE_SUFFIXES for q in sub.iterdir() if q.is_file()):
            found.append(sub.name + "/")
    return found


def scan(folder: str, caption: str, trigger: str, resolution: int, on_bad_image: str = "skip") -> Dataset:
    root = Path(folder).expanduser()
    if not str(folder):
        raise UserError("No training images given. Pass --images DIR (a folder of .jpg/.png/.webp files).")
    if not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "does not exist"
        raise UserError(f"The images folder '{root}' {what}. "
                        "Pass --images with the folder that holds your training images.")
    try:
        listing = sorted(p for p in root.iterdir() if p.is_file())
    except OSError as exc:
        raise UserError(f"Cannot list the images folder '{root}' ({exc.strerror or exc}). "
                        "Check its permissions.") from exc
    files = [p for p in listing if p.suffix.lower() in IMAGE_SUFFIXES]
    not_read = [p for p in listing if p.suffix.lower() in NOT_READ_SUFFIXES]
    if not files:
        subs = _images_in_subfolders(root)
        where = (f" Images were found in its subfolders {', '.join(subs[:5])}: pass one of those folders "
                 "(subfolders are not searched)." if subs else "")
        if not_read:
            where += (f" Its {', '.join(p.name for p in not_read[:3])}{', ...' if len(not_read) > 3 else ''} "
                      "are in a format this tool does not read: convert them to PNG or JPEG.")
        raise UserError(f"No images in '{root}'. Put {', '.join(IMAGE_SUFFIXES)} files there "
                        f"(optionally with same-name .txt captions) and run again.{where}")
    items, notes = [], []
    skipped = [(p, _not_read_why(p)) for p in not_read]
    for path in files:
        try:
            data = path.read_bytes()
            im, note = _open_checked(path)
        except PermissionError as exc:
            skipped.append((path, f"cannot be read ({exc.strerror})"))
            continue
        except (OSError, ValueError) as exc:
            skipped.append((path, str(exc)))
            continue
        if min(im.size) < MIN_SIDE:
            skipped.append((path, f"too small ({im.width}x{im.height}); images need at least {MIN_SIDE} px a side"))
            continue
        if note:
            notes.append((path, note))
        if min(im.size) < resolution / 4:
            factor = math.sqrt(resolution * resolution / (im.width * im.height))
            notes.append((path, f"small ({im.width}x{im.height}): upscaled about {factor:.0f}x to train at "
                                f"{resolution}², expect soft results; use a larger original if you have one"))
        txt = path.with_suffix(".txt")
        text = ""
        if txt.is_file():
            try:
                text, cap_note = read_caption_checked(txt)
            except OSError as exc:
                skipped.append((path, f"its caption {txt.name} cannot be read ({exc.strerror or exc})"))
                continue
            if cap_note:
                notes.append((txt, cap_note))
            if not text:
                notes.append((txt, "empty caption; " + ("using --caption" if caption else "using the trigger")))
        text = text or caption or trigger
        if "[trigger]" in text and not trigger:
            raise UserError(
                f"The caption of '{path.name}' ({text!r}) has a [trigger] placeholder, but no --trigger was given, "
                "so it would be trained literally. Pass --trigger WORD (e.g. --trigger 'sks dog'), or write "
                "the word into the caption.")
        if not text:
            raise UserError(
                f"'{path.name}' has no caption: there is no {txt.name}, and neither --caption nor --trigger "
                "was given. Add .txt captions next to the images, or pass --trigger WORD (and optionally "
                "--caption 'a photo of [trigger]')."
            )
        w, h = bucket_size(*im.size, resolution)
        items.append(Item(image_path=path, caption=apply_trigger(text, trigger),
                          image_sha256=hashlib.sha256(data).hexdigest(), width=w, height=h))
    total = len(files) + len(not_read)
    listed = "; ".join(f"{p.name}: {why}" for p, why in skipped[:8]) + ("; ..." if len(skipped) > 8 else "")
    if not items:
        raise UserError(f"None of the {total} images in '{root}' could be read and used ({listed}). "
                        "Re-export them as PNG or JPEG and run again.")
    if skipped and on_bad_image == "stop":
        raise UserError(f"{len(skipped)} of the {total} images in '{root}' cannot be used ({listed}), and "
                        "on_bad_image = 'stop'. Fix or remove them, or set on_bad_image = 'skip' "
                        f"(--set on_bad_image=skip) to train on the {len(items)} good ones.")
    return Dataset(items=items, skipped=skipped, caption_rule=caption_rule(caption, trigger), warnings=notes)
