"""`lowvram-dopsd sample`: the stock diffusers pipeline + load_lora_weights, matching the trainer's previews."""
import re
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
    (["--output", "dog.xyz"], "'.xyz' is not an image format Pillow can write"),  # used to fail after generating
    (["--output", "dog.xbm"], "'.xbm' cannot be written by Pillow here"),  # registered, but XBM is 1-bit only
])
def test_bad_sample_flags_stop_before_the_pipeline_is_loaded(zimage_lora, tmp_path, capsys, monkeypatch,
                                                             no_pipeline, flags, says):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--lora", str(zimage_lora), "--prompt", PROMPT, *flags]) == 2
    assert says in capsys.readouterr().err
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
