"""The training set: a folder of images with optional same-stem .txt captions.

Caption rule (shown in every run's summary and written into the LoRA's metadata):
  1. `<stem>.txt` next to the image, if present and not empty;
  2. otherwise `--caption`;
  3. otherwise the trigger word alone.
  Then, if a trigger is set: a `[trigger]` placeholder in the caption is replaced by it; otherwise
  the trigger is put in front ("sks, a photo of a dog") unless the caption already contains it.
  A `.txt` of several lines holds several captions of its image (caption variants: short, detailed,
  another language; blank lines are skipped): each roll-out draws one of them with the run's seed,
  as the authors' training draws one of several captions per image for each batch.

Each image gets a training size of about `resolution`² pixels with its own aspect ratio, rounded
to a multiple of 64 (16 for tiny resolutions) so that items share a few sizes (buckets).

Bad input never crashes the run and never passes silently: an unreadable, truncated, too small
(< 16 px) or over-the-decompression-bomb-limit image is skipped and listed (or, with
`on_bad_image = "stop"`, stops the run with the list); a small image (short side under a quarter
of the training resolution) or a caption that is not UTF-8 is used with a warning.

Several folders (several subjects, or folders weighted against each other): `--images` may name a
.toml dataset file instead of a folder, one `[[folders]]` table per folder:

    [[folders]]
    path = "my_dog"          # relative to the .toml file's folder
    trigger = "sks dog"      # optional, default --trigger; caption likewise, default --caption
    repeats = 2              # optional, default 1: drawn this many times per epoch

Each folder is scanned as above with its own trigger and caption, and the items are merged.
"""
from __future__ import annotations

import codecs
import difflib
import hashlib
import math
import os
import random
import re
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError, quote


@dataclass
class Item:
    """One training pair as the families see it at precompute time."""

    image_path: Path
    caption: str
    image_sha256: str
    width: int            # training size of this item (bucketed), multiple of 16
    height: int
    repeats: int = 1      # times the sampler draws it per epoch (a dataset file's `repeats`)
    other_captions: tuple[str, ...] = ()  # the caption variants after the first (one per line of the .txt)

    @property
    def captions(self) -> tuple[str, ...]:
        return (self.caption, *self.other_captions)


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
    triggers: list[str] = field(default_factory=list)  # the distinct non-empty triggers, in folder order
    source: str = ""  # where the items come from, for the run's summary
    base: Path | None = None  # a dataset file's folder: items are named by their path from it

    def __len__(self) -> int:
        return len(self.items)

    def name(self, path: Path) -> str:
        """How the run names a file: its name, or in a dataset file its path from the file's folder
        (two folders may both hold 1.jpg)."""
        if self.base is None:
            return path.name
        try:
            return Path(os.path.relpath(path, self.base)).as_posix()
        except ValueError:  # another drive (Windows)
            return str(path)

    def identity(self) -> list[list]:
        """What a checkpoint must find again to resume: every item's file, bytes hash, caption and size,
        and its repeats where not 1 (they change the sampling order). A single folder's identity is
        what it always was, so that existing checkpoints still resume."""
        return [[self.name(it.image_path), it.image_sha256, it.caption, it.width, it.height]
                + ([it.repeats] if it.repeats != 1 else [])
                + ([{"other_captions": list(it.other_captions)}] if it.other_captions else []) for it in self.items]


def caption_rule(caption: str, trigger: str, variants: bool = False) -> str:
    """The rule as the run states it; `variants`: some .txt holds several captions (said only then)."""
    lines = " (one caption per line; one line drawn per roll-out)" if variants else ""
    if not caption and not trigger:  # a loaded dataset then has a .txt for every image (else load refuses it)
        return f"<stem>.txt{lines}"
    parts = [f"<stem>.txt if present{lines}", f"else {quote(caption)}" if caption else "else the trigger"]
    if trigger:
        parts.append(f"trigger {quote(trigger)} replaces [trigger] or is prepended if absent")
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


def training_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image as the run trains on it: scaled to cover width x height (the item's bucket) and
    centre-cropped, as the pipelines' `resize_mode="crop"` does. What the student learns to draw is
    this crop, so the teacher that reads the image reads it too (as the authors' teacher reads the
    bucketed, centre-cropped training image), not the uncropped photo."""
    if width * image.height > height * image.width:  # wider than the image: fit the width
        w, h = width, image.height * width // image.width
    else:
        w, h = image.width * height // image.height, height
    left, top = w // 2 - width // 2, h // 2 - height // 2
    return image.resize((w, h), Image.Resampling.LANCZOS).crop((left, top, left + width, top + height))


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
            raise ValueError(f"not a readable image ({str(exc) or type(exc).__name__}): damaged, or not an image; "
                             "open it in an image viewer and re-export it as PNG or JPEG") from exc
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
            skipped.append((path, f"too small ({im.width}x{im.height}): images need at least {MIN_SIDE} px a "
                                  "side; use a larger version of it"))
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
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [caption or trigger]
        text = lines[0]
        if (placed := next((line for line in lines if "[trigger]" in line), None)) and not trigger:
            raise UserError(
                f"The caption of '{path.name}' ({quote(placed)}) has a [trigger] placeholder, but no --trigger was given, "
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
                          image_sha256=hashlib.sha256(data).hexdigest(), width=w, height=h,
                          other_captions=tuple(apply_trigger(line, trigger) for line in lines[1:])))
    total = len(files) + len(not_read)
    if not items:
        raise UserError(f"None of the {total} images in '{root}' could be read and used: "
                        f"{_listing(skipped, lambda p: p.name)}. Do what each one's reason says and run again.")
    ds = Dataset(items=items, skipped=skipped, warnings=notes,
                 caption_rule=caption_rule(caption, trigger, any(it.other_captions for it in items)),
                 triggers=[trigger] if trigger else [], source=str(folder))
    if on_bad_image == "stop":
        _stop_on_bad(ds, f"'{root}'")
    return ds


def _listing(skipped: list[tuple[Path, str]], name) -> str:
    return "; ".join(f"{name(p)}: {why}" for p, why in skipped[:8]) + ("; ..." if len(skipped) > 8 else "")


def _stop_on_bad(ds: Dataset, where: str) -> None:
    """on_bad_image = 'stop': refuse to train with any image left out (every file is an item or skipped)."""
    if ds.skipped:
        raise UserError(f"{len(ds.skipped)} of the {len(ds.items) + len(ds.skipped)} images in {where} cannot be "
                        f"used ({_listing(ds.skipped, ds.name)}), and on_bad_image = 'stop'. Fix or remove them, or "
                        f"set on_bad_image = 'skip' (--set on_bad_image=skip) to train on the {len(ds.items)} good ones.")


def load(images: str, caption: str, trigger: str, resolution: int, on_bad_image: str = "skip") -> Dataset:
    """`--images`: a folder (`scan`), or a .toml dataset file that lists several folders."""
    path = Path(images).expanduser()
    if path.suffix.lower() != ".toml" or path.is_dir():
        return scan(images, caption, trigger, resolution, on_bad_image)
    parts, rules, repeats = [], [], []
    for entry, folder in _read_dataset_file(path):
        try:  # each folder on its own; on_bad_image = 'stop' is decided below, listing every folder's files
            part = scan(str(folder), entry.get("caption", caption), entry.get("trigger", trigger), resolution)
        except UserError as exc:
            raise UserError(f"In the dataset file '{path}', folder '{entry['path']}': {exc} (A folder's trigger "
                            "and caption can also be set in its [[folders]] table.)") from exc
        repeats.append(entry.get("repeats", 1))
        for it in part.items:
            it.repeats = repeats[-1]
        parts.append(part)
        rules.append(f"{entry['path'].rstrip('/')}/: {part.caption_rule}")
    count = f"{len(parts)} folder{'s' if len(parts) > 1 else ''}"
    ds = Dataset(items=[it for part in parts for it in part.items],
                 skipped=[s for part in parts for s in part.skipped],
                 caption_rule=" | ".join(rules),
                 warnings=[w for part in parts for w in part.warnings],
                 triggers=list(dict.fromkeys(t for part in parts for t in part.triggers)),
                 source=f"{count} in {images}" + (f" (repeats {', '.join(map(str, repeats))})"
                                                   if set(repeats) != {1} else ""),
                 base=path.parent)
    if on_bad_image == "stop":
        _stop_on_bad(ds, f"the folders of '{path}'")
    return ds


FOLDER_KEYS = {"path": str, "trigger": str, "caption": str, "repeats": int}
EXAMPLE = '[[folders]] path = "my_dog" trigger = "sks dog" repeats = 2'


def _read_dataset_file(path: Path) -> list[tuple[dict, Path]]:
    """The dataset file's [[folders]] tables and their folders, checked: every mistake is named before
    anything is scanned."""
    def bad(what: str) -> UserError:
        return UserError(f"The dataset file '{path}' {what}. Each folder is one table, e.g. {EXAMPLE} "
                         "(keys: path, and optionally trigger, caption, repeats; README, 'Several folders').")

    def unknown(key: str, valid: list[str], where: str) -> UserError:
        close = difflib.get_close_matches(key, valid, n=1)
        return bad(f"has an unknown key '{key}' {where}.{f' Did you mean {close[0]!r}?' if close else ''} "
                   f"Valid keys there: {', '.join(valid)}")

    if not path.is_file():
        raise UserError(f"The dataset file '{path}' does not exist. Pass --images with a folder of images, or "
                        "with a .toml file that lists folders (README, 'Several folders').")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the dataset file '{path}' ({exc}). Check that it is a UTF-8 text file "
                        "you can read.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"The dataset file '{path}' is not valid TOML ({exc}). Fix the syntax and run again.") from exc
    for key in doc:
        if key != "folders":
            raise unknown(key, ["folders"], "at the top level")
    entries = doc.get("folders")
    if not entries:
        raise bad("lists no folders: it needs at least one [[folders]] table with a path")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise bad("has 'folders' as a plain value: write one [[folders]] table per folder")
    seen: dict[Path, int] = {}
    folders = []
    for n, entry in enumerate(entries, 1):
        where = f"in its [[folders]] table {n}"
        for key, value in entry.items():
            if key not in FOLDER_KEYS:
                raise unknown(key, list(FOLDER_KEYS), where)
            want = FOLDER_KEYS[key]
            if not isinstance(value, want) or isinstance(value, bool):  # TOML true is no repeat count
                raise bad(f"has {key} = {quote(value) if isinstance(value, str) else repr(value)} {where}: it must be "
                          + ("a whole number like 2" if want is int else 'a string in quotes, like "sks dog"'))
        if not entry.get("path"):
            raise bad(f"has no path {where}: add path = \"FOLDER\" (relative to the file's folder)")
        if entry.get("repeats", 1) < 1:
            raise bad(f"has repeats = {entry['repeats']} {where}: it must be 1 or more (how many times each "
                      "of the folder's images is drawn per epoch)")
        folder = path.parent / Path(entry["path"]).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.is_file() else "does not exist"
            raise bad(f"names the folder '{entry['path']}' {where}, which {what} (looked for '{folder}'; a "
                      "relative path starts at the dataset file's folder)")
        if (first := seen.setdefault(folder.resolve(), n)) != n:
            raise bad(f"lists the folder '{entry['path']}' twice (tables {first} and {n}): give each folder one "
                      "table (repeats = N draws its images N times per epoch)")
        folders.append((entry, folder))
    return folders


class BucketSampler:
    """Endless shuffled epochs; a micro-batch holds items of one training size (bucket)."""

    def __init__(self, items: list[Item], micro_batch: int, rng: random.Random):
        self.items, self.micro_batch, self.rng = items, micro_batch, rng
        self.order: list[int] = []

    def next(self) -> list[int]:
        if not self.order:  # an epoch holds each item `repeats` times (1 unless a dataset file says so)
            self.order = [i for i, it in enumerate(self.items) for _ in range(it.repeats)]
            self.rng.shuffle(self.order)
        first = self.order.pop()
        size = (self.items[first].width, self.items[first].height)
        # other images before another copy of this one (a repeated item's copies are alike)
        same = [i for i in dict.fromkeys(self.order)
                if i != first and (self.items[i].width, self.items[i].height) == size]
        batch = [first] + same[: self.micro_batch - 1]
        for i in batch[1:]:
            self.order.remove(i)
        while len(batch) < self.micro_batch:  # a small bucket repeats its items
            batch.append(self.rng.choice([i for i, it in enumerate(self.items)
                                          if (it.width, it.height) == size]))
        return batch
