"""On-disk cache of precomputed conditions, one safetensors file per (item, condition kind).

The key is a sha256 over everything that changes the features: the condition kind, the encoder's
identity (checkpoint folder + config hash + settings such as max tokens or VLM pixel range), the
caption, and for image-conditioned teachers the image bytes' hash. A second run finds every file
and loads no encoder; editing one caption re-encodes that item only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

Cond = dict[str, torch.Tensor]


def default_cache_dir() -> Path:
    base = os.environ.get("LOWVRAM_DOPSD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lowvram-dopsd")
    return Path(base) / "features"


def key_for(kind: str, identity: dict[str, Any], caption: str, image_sha256: str | None) -> str:
    blob = json.dumps({"kind": kind, "identity": identity, "caption": caption, "image": image_sha256},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """save_file, readable as any file the user writes, and on disk (fsync) when this returns.
    safetensors' writer leaves 0600 whatever the umask: a ComfyUI service or a container running as
    another user could not read the LoRA."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as exc:
        # A failed write (full disk, quota, file-size limit) comes back as "I/O error: ... (os error 28)", not as
        # an OSError: as one, every caller's "free some space" message and the runs that go on apply to it.
        code = re.search(r"I/O error.*\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from exc
    os.chmod(path, 0o666 & ~current_umask())
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        write_safetensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get_or_compute(self, keys: list[str], compute: Callable[[list[int]], list[Cond]],
                       check: Callable[[int, Cond], None] = lambda i, cond: None, chunk: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> list[Cond]:
        """Load every key present; call `compute(indices)` for the missing ones and store them.

        `chunk`: at most that many per call (0: all in one), each chunk stored before the next is computed, so
        a stopped precompute of a large dataset continues where it stopped; `progress(done, missing)` after
        each. `check(i, cond)` sees every fresh condition of a chunk before any of it is stored; raising there
        stores none of that chunk (a bad condition must not be found again by the next run)."""
        out: list[Cond | None] = [None] * len(keys)
        missing = []
        for i, key in enumerate(keys):
            p = self.path(key)
            if p.is_file():
                try:
                    out[i] = load_file(p)
                    continue
                except Exception:  # a damaged cache file is recomputed, never fatal
                    p.unlink(missing_ok=True)
            missing.append(i)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        step = chunk or max(len(missing), 1)
        for start in range(0, len(missing), step):
            part = missing[start:start + step]
            fresh = compute(part)
            for i, cond in zip(part, fresh):
                check(i, cond)
            for i, cond in zip(part, fresh):
                atomic_save_safetensors(cond, self.path(keys[i]))
                out[i] = {k: v.cpu() for k, v in cond.items()}
            if progress is not None:
                progress(start + len(part), len(missing))
        return out  # type: ignore[return-value]
