"""`lowvram-dopsd sample`: the stock diffusers pipeline + load_lora_weights, matching the trainer's previews."""
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
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
    from safetensors.torch import save_file

    save_file({"transformer.a.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "x.safetensors"))
    assert main(["sample", "--lora", str(tmp_path / "x.safetensors"), "--prompt", "p"]) == 2
    assert "--model" in capsys.readouterr().err  # no base_model in the metadata
    (tmp_path / "x.ckpt").write_bytes(b"\x80pickle")
    assert main(["sample", "--lora", str(tmp_path / "x.ckpt"), "--prompt", "p"]) == 2
    assert "safetensors only" in capsys.readouterr().err
    assert main(["sample", "--lora", str(tmp_path / "missing"), "--prompt", "p"]) == 2


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
