"""`lowvram-dopsd sample`: the stock diffusers pipeline + load_lora_weights, matching the trainer's previews."""
import contextlib
import errno
import json
import os
import re
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from trust_helpers import CPU, random_lora

import lowvram_dopsd
from lowvram_dopsd.cli import main
from lowvram_dopsd.preview import Previewer, few_step_sample

PROMPT = "sks ball on the moon"


def test_sample_uses_the_metadata_base_model_and_matches_the_preview(tmp_path, tiny_zimage_dir, capsys):
    out = tmp_path / "run"
    cfg, family, model, lora, _ = random_lora(tiny_zimage_dir, out)
    png = tmp_path / "img.png"
    assert main(["sample", "--lora", str(out), "--prompt", PROMPT, "--seed", "5", "--output", str(png)]) == 0
    assert "wrote" in capsys.readouterr().out
    image = Image.open(png)
    assert image.size == (64, 64)  # the training resolution from the metadata
    assert image.text["prompt"] == PROMPT and image.text["seed"] == "5" and image.text["steps"] == "8"

    # The trainer's own preview path: few-step student sample from seed 5, decoded by family.decode_latents.
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    preview = Previewer(family, model, lora, tmp_path, [PROMPT], [cond], [None], 64, 64, seed=5, device=CPU)
    sigmas = family.sigmas(64, 64, family.default_rollout_steps)
    ours = family.decode_latents(few_step_sample(family, model, lora, "student", preview.noise(0), sigmas, [cond]))[0]
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(image.convert("RGB"), dtype=np.int16))
    assert diff.max() <= 1  # same pixels up to 8-bit rounding of fp32 noise
    bare = few_step_sample(family, model, lora, None, preview.noise(0), sigmas, [cond])
    assert not np.array_equal(np.asarray(family.decode_latents(bare)[0]), np.asarray(ours))  # the LoRA acts


def test_sample_errors_are_one_paragraph(tmp_path, capsys):
    save_file({"transformer.a.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "x.safetensors"))
    assert main(["sample", "--lora", str(tmp_path / "x.safetensors"), "--prompt", "p"]) == 2
    assert "--model" in capsys.readouterr().err  # no base_model in the metadata
    (tmp_path / "x.ckpt").write_bytes(b"\x80pickle")
    assert main(["sample", "--lora", str(tmp_path / "x.ckpt"), "--prompt", "p"]) == 2
    assert "safetensors only" in capsys.readouterr().err
    assert main(["sample", "--lora", str(tmp_path / "missing"), "--prompt", "p"]) == 2


@pytest.fixture(scope="module")
def zimage_lora(tmp_path_factory, tiny_zimage_dir):
    """An output folder with a trained-looking LoRA on the tiny Z-Image (metadata: family zimage, 64 px)."""
    out = tmp_path_factory.mktemp("sample") / "run"
    random_lora(tiny_zimage_dir, out)
    return out


@pytest.fixture
def no_pipeline(monkeypatch):
    """Bad input must be refused before the pipeline is loaded (minutes for a real model), not after."""
    from diffusers import DiffusionPipeline

    def load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the bad input was refused")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", load)


@pytest.mark.parametrize("flags, says", [
    (["--width", "100"], "--width 100: the image size must be a positive multiple of 16"),  # diffusers: ValueError
    (["--height", "-16"], "--height -16: the image size must be a positive multiple of 16"),  # negative tensor dim
    (["--steps", "-1"], "--steps -1: the number of sampling steps cannot be negative"),
    (["--count", "0"], "--count 0: the number of images per prompt must be at least 1"),
    (["--output", "dog.xyz"], "'.xyz' is not an image format Pillow can write"),  # used to fail after generating
    (["--output", "dog.xbm"], "'.xbm' cannot be written by Pillow here"),  # registered, but XBM is 1-bit only
])
def test_bad_sample_flags_stop_before_the_pipeline_is_loaded(zimage_lora, tmp_path, capsys, monkeypatch,
                                                             no_pipeline, flags, says):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, *flags]) == 2
    assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_offload_without_a_gpu_is_a_clear_error(zimage_lora, tmp_path, capsys, monkeypatch):
    """Model CPU offload needs a GPU: on the CPU diffusers raised a RuntimeError (traceback) inside
    load_lora_weights, after the pipeline was loaded."""
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, "--device", "cpu", "--offload"]) == 2
    assert "Leave out --offload" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sample_output_names(zimage_lora, tmp_path, capsys):
    """No extension: .png (it used to generate, then fail in PIL's save); a folder: the default names in it;
    another format Pillow writes: that format, without PNG's text chunks."""
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, "--output", str(tmp_path / "dog")]) == 0
    assert Image.open(tmp_path / "dog.png").text["prompt"] == PROMPT
    (tmp_path / "shots").mkdir()
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", "a", "--prompt", "b", "--seed", "3",
                 "--output", str(tmp_path / "shots")]) == 0
    assert sorted(p.name for p in (tmp_path / "shots").iterdir()) == ["sample-3-0.png", "sample-3-1.png"]
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, "--output", str(tmp_path / "d.jpg")]) == 0
    jpg = Image.open(tmp_path / "d.jpg")
    assert jpg.format == "JPEG" and jpg.size == (64, 64)
    assert str(tmp_path / "d.jpg") in capsys.readouterr().out


def test_sample_refuses_a_lora_of_another_family(zimage_lora, tiny_klein_dir, capsys, no_pipeline):
    """A Z-Image LoRA on klein used to load the whole pipeline, then die in peft (NoMatchingPeftModuleError)."""
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, "--model", str(tiny_klein_dir)]) == 2
    err = capsys.readouterr().err
    assert "trained on a zimage model" in err and "is a klein model" in err


def test_sample_lets_a_lora_without_our_metadata_through(zimage_lora, tiny_zimage_dir, tmp_path):
    """Another trainer's LoRA has no family to compare: the family check must not refuse it."""
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(str(zimage_lora / "pytorch_lora_weights.safetensors")), str(foreign))  # no metadata
    assert main(["sample", "--lora", str(foreign), "--prompt", PROMPT, "--model", str(tiny_zimage_dir),
                 "--width", "64", "--height", "48", "--output", str(tmp_path / "f.png")]) == 0
    assert Image.open(tmp_path / "f.png").size == (64, 48)


def test_nothing_loaded_can_run_code():
    """No pickle anywhere: torch.load only with weights_only=True, no pickle module, no remote code by default."""
    root = Path(lowvram_dopsd.__file__).parent
    sources = {p: p.read_text(encoding="utf-8") for p in root.rglob("*.py")}
    for path, text in sources.items():
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1]
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        assert "trust_remote_code=True" not in text, path
        assert "allow_pickle=True" not in text, path
    from lowvram_dopsd.cli import build_parser
    args = build_parser().parse_args(["sample", "--lora", "x", "--prompt", "p"])
    assert args.trust_remote_code is False
    assert "use_safetensors=True" in sources[root / "sample.py"]


class Hook:
    """The console `sample` prints "wrote ..." to, with an action after the n-th image: something that happens
    on the machine while a (minutes-long) run goes on. Installed through progress.make_console, as the CLI gets it."""

    def __init__(self, monkeypatch, after: int, action):
        self.lines, self.after, self.action = [], after, action
        monkeypatch.setattr("lowvram_dopsd.progress.make_console", lambda: self)

    def print(self, line, *args, **kwargs):
        self.lines.append(line)
        if len(self.lines) == self.after:
            self.action()


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_default_names_never_replace_a_file(zimage_lora, tmp_path, monkeypatch):
    """A second `sample` (another prompt, another LoRA) used to overwrite sample-0.png without a word."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample-0.png").write_bytes(b"earlier")
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT]) == 0
    assert (tmp_path / "sample-0.png").read_bytes() == b"earlier"
    assert Image.open(tmp_path / "sample-0_2.png").text["prompt"] == PROMPT
    # Several names: the first number free for all of them, so one run's images keep one suffix.
    (tmp_path / "sample-0-1.png").write_bytes(b"earlier")
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", "a", "--prompt", "b"]) == 0
    assert names(tmp_path) == ["sample-0-0_2.png", "sample-0-1.png", "sample-0-1_2.png", "sample-0.png",
                               "sample-0_2.png"]
    assert (tmp_path / "sample-0-1.png").read_bytes() == b"earlier"


def test_a_name_taken_during_the_run_is_not_replaced(zimage_lora, tmp_path, monkeypatch):
    """Names are picked before the pipeline loads; another run in the same folder may take one meanwhile."""
    monkeypatch.chdir(tmp_path)
    hook = Hook(monkeypatch, 1, lambda: (tmp_path / "sample-0-1.png").write_bytes(b"other run"))
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", "a", "--prompt", "b"]) == 0
    assert (tmp_path / "sample-0-1.png").read_bytes() == b"other run"
    assert Image.open(tmp_path / "sample-0-1_2.png").text["prompt"] == "b"
    assert "sample-0-1_2.png" in hook.lines[1]


def test_an_explicit_name_is_replaced_and_says_so(zimage_lora, tmp_path, capsys):
    (tmp_path / "dog.png").write_bytes(b"earlier")
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, "--output", str(tmp_path / "dog.png")]) == 0
    assert Image.open(tmp_path / "dog.png").text["prompt"] == PROMPT
    assert "replaced the existing file" in capsys.readouterr().out
    assert names(tmp_path) == ["dog.png"]


@contextlib.contextmanager
def file_size_limit(monkeypatch, after: int | None = None):
    """A real failed write: no file grows past 256 bytes (EFBIG, as a full disk fails a write), from the start or
    once `after` images are written. Only Python-level output (captured in memory) runs meanwhile."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    tighten = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (256, limit[1]))  # noqa: E731
    if after:
        Hook(monkeypatch, after, tighten)
    else:
        tighten()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_save_is_an_error_that_lists_what_was_written(zimage_lora, tmp_path, monkeypatch, capsys):
    """The second of two images fails to save: it used to be an OSError traceback after the whole generation,
    and a half-written sample-0-1.png (Pillow's buffered write fails when the file is closed)."""
    with file_size_limit(monkeypatch, after=1):
        code = main(["sample", "--lora", str(zimage_lora), "--prompt", "a", "--prompt", "b", "--output", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())  # the paragraph is wrapped to the terminal
    assert code == 2
    assert f"Could not write '{tmp_path / 'sample-0-1.png'}' ({os.strerror(errno.EFBIG)})" in err
    assert f"Already written: {tmp_path / 'sample-0-0.png'}." in err
    assert names(tmp_path) == ["sample-0-0.png"]  # no half-written image, no temporary file
    Image.open(tmp_path / "sample-0-0.png").load()


def test_a_failed_save_leaves_the_file_it_would_replace(zimage_lora, tmp_path, monkeypatch, capsys):
    """Saving straight to dog.png truncates it first, so a failed write lost the earlier image too: the new one
    is written beside it and renamed over it only once complete."""
    (tmp_path / "dog.png").write_bytes(b"earlier")
    with file_size_limit(monkeypatch):
        code = main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, "--output", str(tmp_path / "dog.png")])
    assert code == 2 and "No image was written" in " ".join(capsys.readouterr().err.split())
    assert names(tmp_path) == ["dog.png"] and (tmp_path / "dog.png").read_bytes() == b"earlier"


def test_count_draws_consecutive_seeds(zimage_lora, tmp_path):
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", "a", "--prompt", "b", "--seed", "5",
                 "--count", "2", "--output", str(tmp_path / "c") + "/"]) == 0
    assert names(tmp_path / "c") == ["sample-5-0.png", "sample-5-1.png", "sample-6-0.png", "sample-6-1.png"]
    image = Image.open(tmp_path / "c" / "sample-6-1.png")
    assert image.text["prompt"] == "b" and image.text["seed"] == "6"
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", "b", "--seed", "6",
                 "--output", str(tmp_path / "one.png")]) == 0
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "one.png")))
    # An explicit name gets the seed only when it varies.
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", "a", "--count", "2",
                 "--output", str(tmp_path / "d" / "dog.jpg")]) == 0
    assert names(tmp_path / "d") == ["dog-0.jpg", "dog-1.jpg"]


@pytest.fixture(scope="module")
def other_lora(tmp_path_factory, tiny_zimage_dir):
    out = tmp_path_factory.mktemp("sample") / "other"
    random_lora(tiny_zimage_dir, out, seed=1)
    return out


def test_several_loras_share_one_pipeline(zimage_lora, other_lora, tmp_path, monkeypatch):
    """Each LoRA draws the same prompt and seed, and the second is not mixed with the first (delete_adapters)."""
    from diffusers import DiffusionPipeline

    loads = []
    real = DiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))
    assert main(["sample", "--lora", str(zimage_lora), "--lora", str(other_lora), "--prompt", PROMPT,
                 "--output", str(tmp_path)]) == 0
    assert len(loads) == 1
    assert names(tmp_path) == ["sample-other-0.png", "sample-run-0.png"]
    assert main(["sample", "--lora", str(other_lora), "--prompt", PROMPT, "--output", str(tmp_path / "alone.png")]) == 0
    alone = np.asarray(Image.open(tmp_path / "alone.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sample-other-0.png")), alone)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "sample-run-0.png")), alone)
    # Two LoRAs with one name (the same folder twice here): the position tells their images apart.
    assert main(["sample", "--lora", str(other_lora), "--lora", str(other_lora), "--prompt", PROMPT,
                 "--output", str(tmp_path / "same") + "/"]) == 0
    assert names(tmp_path / "same") == ["sample-0-other-0.png", "sample-1-other-0.png"]


def test_loras_with_different_settings_are_noted(zimage_lora, tmp_path, capsys):
    """The first LoRA's size (and base) is used for all: a LoRA trained at another size says so."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = zimage_lora / "pytorch_lora_weights.safetensors"
    with safe_open(str(src), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    info = json.loads(meta["lowvram_dopsd"])
    save_file(tensors, str(tmp_path / "big.safetensors"), {**meta, "lowvram_dopsd": json.dumps({**info, "resolution": 128})})
    main(["sample", "--lora", str(zimage_lora), "--lora", str(tmp_path / "big.safetensors"), "--prompt", PROMPT,
          "--output", str(tmp_path) + "/"])
    out = " ".join(capsys.readouterr().out.split())
    assert "different resolution (run: 64, big: 128); all are sampled with the first one's (64)" in out
    assert "different base_model" not in out
    main(["sample", "--lora", str(zimage_lora), "--lora", str(tmp_path / "big.safetensors"), "--prompt", PROMPT,
          "--width", "64", "--height", "64", "--output", str(tmp_path) + "/"])
    assert "different resolution" not in capsys.readouterr().out
