"""The toy world (issue #7): world, encoders, the toy family through the real trainer, the shipped checkpoints."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lowvram_dopsd.toy import world
from lowvram_dopsd.toy.models import ToyDiT, ToyEncoder, load_module
from lowvram_dopsd.toy.pipeline import ToyDiTPipeline, sample

ASSETS = Path(__file__).resolve().parent.parent / "lowvram_dopsd" / "assets" / "toy"
TOY_MODEL = Path(os.environ.get("LOWVRAM_DOPSD_TOY_MODEL", ASSETS / "model"))  # env: try a rebuilt folder
TOY_CONCEPT = ASSETS / "concept"


def test_world_is_deterministic_and_captions_match_attributes():
    a = [world.random_scene(random.Random(3)) for _ in range(1)] + [world.random_scene(random.Random(3))]
    assert a[0] == a[1]
    assert np.array_equal(world.render(a[0]), world.render(a[1]))
    rng = random.Random(0)
    for _ in range(50):
        s = world.random_scene(rng, shapes=world.ALL_SHAPES)
        attrs = world.parse_caption(s.caption())
        assert attrs == {"shape": s.shape, "colour": s.colour, "size": s.size, "position": s.position,
                         "background": s.background}
        img = world.render(s)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        # the background colour is where the shape is not; the shape's colour is in the image
        assert tuple(img[0, 0]) == world.BACKGROUNDS[s.background] or s.position in ("left", "top")
        assert (np.abs(img.astype(int) - world.COLOURS[s.colour]).sum(-1) < 10).any()
    assert world.parse_caption(s.caption(world.TRIGGER))["shape"] == world.TRIGGER
    ids, mask = world.Tokenizer()(["a large red sks at the left on gray background", "a zebra"])
    assert ids.shape == (2, world.MAX_TOKENS) and mask.sum(1).tolist() == [10, 2]
    assert ids[1, 1] == 1  # unknown word -> [unk]


def test_encoder_shapes_text_only_and_in_context():
    enc, dit = ToyEncoder(), ToyDiT()
    ids, mask = world.Tokenizer()(["a small blue circle at the top on white background"] * 3)
    h, m = enc(ids, mask)
    assert h.shape == (3, world.MAX_TOKENS, 64) and m.shape == (3, world.MAX_TOKENS)
    img = torch.rand(3, 3, 32, 32) * 2 - 1
    h2, m2 = enc(ids, mask, img)
    assert h2.shape == (3, 16 + world.MAX_TOKENS, 64) and m2[:, :16].all()
    v = dit(img, torch.rand(3), h2, m2)
    assert v.shape == img.shape


def _cfg(tmp_path, steps, **kw):
    from lowvram_dopsd.toy.experiment import make_cfg
    return make_cfg(TOY_MODEL, TOY_CONCEPT, tmp_path / "out", tmp_path / "cache", 0, steps, **kw)


def test_toy_family_through_train_and_saved_lora_reproduces_student(tmp_path):
    from lowvram_dopsd.output import read_info
    from lowvram_dopsd.toy.experiment import quiet_console
    from lowvram_dopsd.train import train

    res = train(_cfg(tmp_path, 2, lr=1e-2), preset="toy", console=quiet_console())
    assert res.lora_path.is_file() and res.family.name == "toy"
    info = read_info(res.lora_path)
    assert info["family"] == "toy" and info["steps"] == 2 and info["rollout_steps"] == 4
    assert any(float(layer.student_B.detach().abs().max()) > 0 for layer in res.lora.layers.values())

    pipe = ToyDiTPipeline.from_pretrained(TOY_MODEL)
    prompts = ["a large red sks at the left on gray background", "a small blue circle at the top on white background"]
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    h, m = pipe.encode(prompts)
    with res.lora.use("student"):
        mine = sample(res.model, h, m, noise, pipe.sigmas)
    with res.lora.use(None):
        bare = sample(res.model, h, m, noise, pipe.sigmas)
    pipe.load_lora_weights(res.lora_path.parent)
    theirs = pipe(prompts, noise=noise)
    assert (mine - bare).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(theirs, mine, atol=2e-4, rtol=1e-4)
    pipe.unload_lora_weights()
    torch.testing.assert_close(pipe(prompts, noise=noise), bare, atol=2e-4, rtol=1e-4)


def test_cli_train_on_the_toy_folder(tmp_path):
    from lowvram_dopsd.cli import main

    out = tmp_path / "o"
    rc = main(["train", "--preset", "toy", "--model", str(TOY_MODEL), "--images", str(TOY_CONCEPT),
               "--output", str(out), "--steps", "1", "--cache-dir", str(tmp_path / "c")])
    assert rc == 0 and (out / "pytorch_lora_weights.safetensors").is_file()


def test_shipped_distilled_checkpoint_passes_quality_bar():
    """A broken or badly trained checkpoint is caught: 4-step samples must be recognisable."""
    from lowvram_dopsd.toy.evaluate import accuracy, classify, laplacian_var

    pipe = ToyDiTPipeline.from_pretrained(TOY_MODEL)
    clf = load_module(TOY_MODEL / "classifier")
    rng = random.Random(99)
    scenes = [world.random_scene(rng) for _ in range(64)]
    real = world.to_tensor([world.render(s) for s in scenes])
    _, pred_real = classify(clf, real)
    assert accuracy(pred_real, scenes)["all"] > 0.95  # the classifier itself
    x = pipe([s.caption() for s in scenes], seed=0)
    _, pred = classify(clf, x)
    acc = accuracy(pred, scenes)
    assert acc["colour"] > 0.85 and acc["background"] > 0.95 and acc["position"] > 0.9 and acc["shape"] > 0.3, acc
    assert 0.5 < laplacian_var(x) / laplacian_var(real) < 2.0


def test_demo_world_toy(tmp_path, monkeypatch):
    from lowvram_dopsd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWVRAM_DOPSD_DEMO_DIR", str(tmp_path / "demo"))
    assert main(["demo", "--world", "toy", "--steps", "1"]) == 0
    assert (tmp_path / "dopsd-demo-out" / "pytorch_lora_weights.safetensors").is_file()


def test_sample_refuses_a_non_diffusers_family_with_a_clear_error(tmp_path, capsys):
    from lowvram_dopsd.cli import main
    from lowvram_dopsd.families import load_family

    assert not load_family(str(TOY_MODEL)).in_diffusers
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, str(lora),
              metadata={"lowvram_dopsd": json.dumps({"base_model": str(TOY_MODEL)})})
    assert main(["sample", "--lora", str(lora), "--prompt", "a ring"]) == 2
    assert "stock diffusers pipeline" in capsys.readouterr().err


def test_toy_decode_latents_is_the_pixel_image():
    from lowvram_dopsd.families import load_family

    family = load_family(str(TOY_MODEL))
    x = torch.rand(2, 3, world.IMAGE_SIZE, world.IMAGE_SIZE) * 2.4 - 1.2  # a little out of range: clamped
    images = family.decode_latents(x)
    assert len(images) == 2 and images[0].size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert np.array_equal(np.asarray(images[1]), world.to_uint8(x)[1])
