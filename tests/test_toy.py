"""The toy world (issue #7): world, encoders, the toy family through the real trainer, the shipped checkpoints."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lowvram_dopsd.toy import world
from lowvram_dopsd.toy.models import ToyDiT, ToyEncoder, load_module
from lowvram_dopsd.toy.pipeline import ToyDiTPipeline, sample

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # experiments/ (research code, not installed) imports from the repository root
    sys.path.insert(0, str(ROOT))
ASSETS = ROOT / "lowvram_dopsd" / "assets" / "toy"
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


def test_reference_grid_and_aligned_reference_path(tmp_path):
    """ref_grid/ref_add: the reference's tokens sit on the DiT's grid; ref_add copies at that position."""
    torch.manual_seed(0)
    enc, dit = ToyEncoder(image_patch=4), ToyDiT(ref_add=True)
    torch.nn.init.normal_(dit.ref_in.weight, std=0.5)
    torch.nn.init.normal_(dit.final_ada.weight, std=0.5)  # zero-initialised heads would hide the paths
    torch.nn.init.normal_(dit.head_out.weight, std=0.5)
    for blk in dit.blocks:
        torch.nn.init.normal_(blk.ada.weight, std=0.5)
    ids, mask = world.Tokenizer()(["a small blue object at the top on white background"] * 2)
    x, sigma = torch.randn(2, 3, 32, 32), torch.full((2,), 0.9)
    ref = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1) * 2 - 1
    ref[1, :, 24:, 24:] = -1.0  # the second reference differs in its bottom-right patches only
    h, m = enc(ids, mask, ref)
    assert h.shape[1] == 64 + world.MAX_TOKENS
    with torch.no_grad():
        v = dit(x[:1].repeat(2, 1, 1, 1), sigma, h, m)
        v_text = dit(x, sigma, *enc(ids, mask))
    assert (v[0] - v[1]).abs().max() > 1e-3  # the reference is read
    assert v_text.shape == x.shape  # a text-only condition takes neither path
    from lowvram_dopsd.toy.models import save_module
    save_module(dit, tmp_path / "dit", "ToyDiT")  # the options travel in config.json
    again = load_module(tmp_path / "dit")
    assert again.ref_in is not None and again.ref_grid
    with torch.no_grad():
        torch.testing.assert_close(again(x[:1].repeat(2, 1, 1, 1), sigma, h, m), v)
    with pytest.raises(ValueError, match="encoder's image patch must equal the DiT's patch"):
        dit(x, sigma, *ToyEncoder(image_patch=8)(ids, mask, ref))  # 16 reference tokens on a 64-token grid


def test_caption_dropout_only_leaves_out_what_the_reference_shows():
    from experiments.toy.build import make_batch

    _, full = make_batch(random.Random(3), 256, p_context=1.0)
    assert all(world.parse_caption(c)["size"] in world.SIZES for c in full[0])  # p_drop = 0: nothing left out
    _, ctx = make_batch(random.Random(3), 256, p_context=1.0, p_drop=0.5)
    refs_equal_targets = [bool(torch.equal(t, r)) for t, r in zip(ctx[1], ctx[2])]
    dropped = {k: 0 for k in ("size", "colour", "position", "background")}
    for caption, same in zip(ctx[0], refs_equal_targets):
        attrs = world.parse_caption(caption)
        for k in dropped:
            if attrs[k] in world.PLACEHOLDERS:
                dropped[k] += 1
                assert same or k in ("size", "colour"), caption  # a moved target needs its position said
    assert all(n > 20 for n in dropped.values()), dropped


def _cfg(tmp_path, steps, **kw):
    from experiments.toy.experiment import make_cfg
    return make_cfg(TOY_MODEL, TOY_CONCEPT, tmp_path / "out", tmp_path / "cache", 0, steps, **kw)


def test_toy_family_through_train_and_saved_lora_reproduces_student(tmp_path):
    from lowvram_dopsd.output import read_info
    from experiments.toy.experiment import quiet_console
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


def test_same_command_same_lora_whether_the_feature_cache_is_cold_or_warm(tmp_path):
    """The toy encoders draw from torch's global RNG when they run (a cold cache) and not when their
    features are cached: the LoRA's initial A must not depend on that (it did, by 0.25 after 1 step)."""
    from experiments.toy.experiment import make_cfg, quiet_console
    from lowvram_dopsd.train import train

    runs = []
    for name in ("cold", "warm"):
        cfg = make_cfg(TOY_MODEL, TOY_CONCEPT, tmp_path / name, tmp_path / "cache", 0, 1)
        res = train(cfg, preset="toy", console=quiet_console())
        assert (res.cache.misses > 0) == (name == "cold")
        runs.append(res.lora.tensors("student"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_toy_trains_on_an_int8_base_with_int8_activations(tmp_path):
    """The toy family takes quant = "qint8" (blocks 8-bit, embedders and final layer kept, as for
    Z-Image) and act_quant = "int8": the arms of the 8-bit study (docs/kernels.md)."""
    from optimum.quanto import QLinear

    from experiments.toy.experiment import quiet_console
    from lowvram_dopsd.train import train

    res = train(_cfg(tmp_path, 2, quant="qint8", act_quant="int8"), preset="toy", console=quiet_console())
    kinds = {n: type(m) for n, m in res.model.named_modules()}
    assert kinds["blocks.0.ada"] is QLinear and kinds["final"] is torch.nn.Linear and kinds["x_embed"] is torch.nn.Linear
    assert all(type(layer.base) is QLinear and layer.fused and layer.act_quant == "int8"
               for layer in res.lora.layers.values())
    assert any(float(layer.student_B.detach().abs().max()) > 0 for layer in res.lora.layers.values())


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
    # The shipped (DMD2) model is about as sharp as the renders (build_info.json: 1.02 on the experiment's
    # prompts); the ODE-map model it replaced was grainy at 2.3x, a broken checkpoint is noise at >20x,
    # a blurred one < 0.5.
    assert 0.7 < laplacian_var(x) / laplacian_var(real) < 1.5


def test_shipped_teacher_passes_the_gate():
    """The experiment tests concept learning only if the self-teacher draws the ring in context:
    measured at build time (build_info.json: 0.79 with the image, 0.00 without); checked here."""
    from lowvram_dopsd.toy.evaluate import teacher_gate

    pipe = ToyDiTPipeline.from_pretrained(TOY_MODEL)
    gate = teacher_gate(pipe.encode, pipe.transformer, load_module(TOY_MODEL / "classifier"), pipe.sigmas, n=48)
    assert gate["ring_context"] > 0.5 and gate["ring_text"] < 0.05, gate
    assert gate["copy_same"] > 0.6 and gate["text_shape"] > 0.6, gate


def test_demo_world_toy(tmp_path, monkeypatch, capsys):
    from lowvram_dopsd.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWVRAM_DOPSD_DEMO_DIR", str(tmp_path / "demo"))
    assert main(["demo", "--world", "toy", "--steps", "1"]) == 0
    assert (tmp_path / "dopsd-demo-out" / "pytorch_lora_weights.safetensors").is_file()
    # the closing "load it" line runs as printed: it imports the toy's own pipeline, not a diffusers one
    (load_it,) = [line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
                  if line.startswith("load it:")]
    scope = {}
    exec(load_it, scope)
    assert isinstance(scope["pipe"], ToyDiTPipeline)


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


def test_train_sigmas_are_the_shifted_logit_normal():
    from experiments.toy.build import train_sigmas

    plain = train_sigmas(4096, torch.Generator().manual_seed(0), shift=1.0)
    torch.testing.assert_close(plain, torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(0))))
    shifted = train_sigmas(4096, torch.Generator().manual_seed(0), shift=3.0)
    # same draws, pushed to high noise: 0.5 -> 0.75, order kept, still inside (0, 1)
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert torch.equal(plain.argsort(), shifted.argsort()) and (shifted > plain).all() and shifted.max() < 1
    assert 0.45 < float((shifted > 0.75).float().mean()) < 0.55  # half the training where 4 steps decide shape


def test_teacher_gate_scores_an_oracle_reader_and_a_blind_model():
    """The gate measures what it says: a model that copies the reference passes, a blind one does not."""
    from lowvram_dopsd.toy.evaluate import teacher_gate

    clf = load_module(TOY_MODEL / "classifier")

    def encode(caps, refs):  # "hidden states" = the image to draw: the reference, else a flat background
        if refs is not None:
            return refs, None
        return world.to_tensor([world.render(world.Scene("circle", "red", "small", "center", "gray"))] * len(caps)), None

    class Oracle(torch.nn.Module):  # v such that one Euler step from any sigma lands on the image
        def forward(self, x, sigma, h, m):
            return (x - h) / sigma.clamp(min=1e-6)[:, None, None, None]

    gate = teacher_gate(encode, Oracle(), clf, torch.tensor([1.0, 0.0]), n=32)
    assert gate["copy_same"] > 0.95 and gate["ring_context"] > 0.95, gate
    assert gate["ring_text"] == 0.0 and gate["text_shape"] < 0.5, gate  # only circles without the image
    assert gate["ref_gain"] > 0.99, gate  # x0 from pure noise is the reference itself


def test_blob_holes_are_drawn_only_when_asked():
    rng = random.Random(0)
    solid = [world.random_scene(rng, shapes=("blob",)) for _ in range(20)]
    assert all(s.hole == 0.0 for s in solid)
    holed = world.Scene("blob", "red", "large", "center", "black", blob=(1.0,) * 8, hole=0.5)
    m = world.shape_mask(holed)
    assert m[16, 16] == 0.0 and m[16, 16 + 7] == 1.0  # empty centre, filled band (outline 9.9 px)
    assert world.shape_mask(world.Scene("blob", "red", "large", "center", "black", blob=(1.0,) * 8))[16, 16] == 1.0


def test_research_scripts_run_from_the_repository_root_and_are_not_installed():
    """experiments/toy/ is one command each from the repository root (their docstrings say so), and the
    installed package no longer carries it (pyproject's package list)."""
    import tomllib

    out = subprocess.run([sys.executable, "-m", "experiments.toy.experiment", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--merge" in out.stdout, out.stderr[-2000:]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "lowvram_dopsd.toy" in packages and not any(p.startswith("experiments") for p in packages)


def test_results_name_the_commit_they_were_made_from(tmp_path):
    """experiments.toy.experiment writes the source commit into its result meta and table (a re-run after a fix is
    then told apart from the numbers before it)."""
    import re

    from experiments.toy.experiment import source_commit, table

    here = source_commit()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", here) and here.startswith(head.stdout.strip())
    assert source_commit(tmp_path) == "unknown"  # no repository there
    meta = dict(command="c", seeds=[0], steps=1, images=1, threads=1, wall_s=1.0, torch="t", commit=here)
    assert f"code at commit {here}." in table({}, meta)


def test_experiment_lr_sets_every_method_and_labels_its_rows(tmp_path, monkeypatch):
    """`experiments.toy.experiment --lr` (the learning-rate sweep, docs/toy.md): SFT and D-OPSD both train at that
    rate, and the rows carry it, so the runs of several rates merge into one table."""
    import json

    from lowvram_dopsd import optim
    from experiments.toy import experiment

    used = []
    real = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda params, cfg, lr: used.append(lr) or real(params, cfg, lr))
    assert experiment.main(["--out", str(tmp_path), "--seeds", "0", "--steps", "1", "--images", "2",
                            "--methods", "sft", "dopsd-x0", "--lr", "2.5e-4", "--grid", "", "--tag", "t"]) == 0
    assert used == [2.5e-4, 2.5e-4]
    result = json.loads((tmp_path / "t.json").read_text())
    assert [r["method"] for r in result["runs"] if r["method"] != "teacher-in-context"] == \
        ["base", "sft lr=0.00025", "dopsd-x0 lr=0.00025"]
    assert result["meta"]["lr"] == 2.5e-4


def test_merge_lists_a_setting_the_merged_runs_differ_in(tmp_path):
    """`--merge` of a sweep's files: the meta keeps one value per file for what differs (the lr of each),
    not the first file's value as if it held for every row."""
    import json

    from experiments.toy import experiment

    def result(lr, name):
        runs = [{"method": experiment.label("sft", lr), "seed": 0, **{k: 0.5 for k, _ in experiment.METRICS}}]
        meta = dict(command=f"c {lr}", seeds=[0], steps=200, images=6, threads=1, wall_s=1.0, torch="t",
                    commit="abc", lr=lr)
        path = tmp_path / name
        path.write_text(json.dumps({"meta": meta, "runs": runs}))
        return str(path)

    assert experiment.main(["--merge", result(2.5e-4, "a.json"), result(1e-3, "b.json"), "--out", str(tmp_path),
                            "--tag", "m"]) == 0
    meta = json.loads((tmp_path / "m.json").read_text())["meta"]
    assert meta["lr"] == [2.5e-4, 1e-3] and meta["steps"] == 200 and meta["commit"] == "abc"
    assert meta["command"] == "c 0.00025 ; c 0.001" and meta["wall_s"] == 2.0


def test_prior_weight_arms_are_named_by_their_weight(tmp_path):
    """`dopsd-x0-prior-w<weight>` trains the prior arm at that weight (the prior-weight sweep, docs/toy.md);
    an unknown method stops the experiment before any seed runs."""
    from experiments.toy import experiment

    arm = experiment.prior_variant("dopsd-x0-prior-w0.05")
    assert arm["prior_weight"] == 0.05 and arm["loss"] == "x0" and arm["prior_prompts"] == experiment.prior_prompts()
    assert experiment.prior_variant("dopsd-x0-prior") is None and experiment.prior_variant("dopsd-x0-prior-w") is None
    with pytest.raises(SystemExit):
        experiment.main(["--out", str(tmp_path), "--seeds", "0", "--methods", "dopsd-x0-prior-wx", "--grid", ""])
    assert not list(tmp_path.iterdir())


def _tiny_dmd_setup():
    torch.manual_seed(0)
    real = ToyDiT(dim=16, layers=1, heads=2, cond_dim=8)
    for m in (real.final_ada, real.head_out):  # zero-initialised heads would make every velocity 0
        torch.nn.init.normal_(m.weight, std=0.3)
    g = ToyDiT(dim=16, layers=1, heads=2, cond_dim=8)
    g.load_state_dict(real.state_dict())
    cond = torch.randn(4, world.MAX_TOKENS, 8)

    def encode(caps, refs):
        return cond[: len(caps)], torch.ones(len(caps), world.MAX_TOKENS, dtype=torch.bool)

    def batches(rng):  # two parts per batch, as text-only + in-context items
        for n in (3, 1):
            yield [f"c{rng.random()}"] * n, torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(rng.randrange(99))) * 2 - 1, None
    return real, g, encode, batches


def test_dmd_gradient_moves_the_sample_from_the_fake_score_toward_the_real_one():
    """DMD's loss on x0 has the gradient (x0_fake - x0_real) / mean|x0 - x0_real| per sample (DMD2's
    normalisation), so a step against it moves x0 toward what the real score denoises to."""
    from experiments.toy.dmd import dmd_loss

    a, b = torch.full((2, 3, 32, 32), 0.5), torch.full((2, 3, 32, 32), -0.5)

    class Denoiser(torch.nn.Module):  # predicts v such that x0 = target at any x_t, sigma
        def __init__(self, target):
            super().__init__()
            self.target = target

        def forward(self, x, sigma, h, m):
            return (x - self.target) / sigma[:, None, None, None]

    x0 = torch.zeros(2, 3, 32, 32, requires_grad=True)
    dmd_loss(x0, Denoiser(a), Denoiser(b), None, None, torch.Generator().manual_seed(0)).backward()
    # grad = (b - a) / mean|x0 - a| = -1 / 0.5, over the mean's 2·3·32·32 elements
    torch.testing.assert_close(x0.grad * x0.numel(), torch.full_like(x0, -2.0))


def test_dmd_training_resumes_exactly_and_refuses_other_settings(tmp_path):
    """The DMD2 loop (generator, fake score, discriminator, their optimisers, the EMA, the RNGs) picks
    up from its saved state and ends where one uninterrupted run ends, bit for bit."""
    from experiments.toy.dmd import train_dmd

    sig = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
    kw = dict(ratio=2, lr_g=1e-3, lr_c=1e-3, lr_d=1e-3, gan_g=0.1, ema=0.5, save_every=2)
    real, g, encode, batches = _tiny_dmd_setup()
    straight, _, _ = train_dmd(g, real, encode, sig, batches, 4, lambda s: None, **kw)

    real, g, encode, batches = _tiny_dmd_setup()
    state = tmp_path / "state.pt"
    train_dmd(g, real, encode, sig, batches, 3, lambda s: None, state_path=state, **kw)  # stopped after 3
    assert torch.load(state, weights_only=False)["it"] == 2  # the last save
    real, g2, encode, batches = _tiny_dmd_setup()  # a new process: fresh models, the state from disk
    with pytest.raises(SystemExit, match="other settings"):
        train_dmd(g2, real, encode, sig, batches, 4, lambda s: None, state_path=state, **{**kw, "gan_g": 0.2})
    resumed, _, _ = train_dmd(g2, real, encode, sig, batches, 4, lambda s: None, state_path=state, **kw)
    assert any(not torch.equal(p, q) for p, q in zip(resumed.parameters(), real.parameters()))  # it trained
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_bf16_ema_rounds_as_the_authors_teacher_and_is_undone_after(tmp_path):
    """experiments.toy.experiment's bf16 arm: each EMA update rounds the teacher to bf16 after the
    multiply and after the add (their DeepSpeed-bf16 adapter), so a small increment is lost where fp32
    keeps it; outside the arm the trainer's fp32 update is back."""
    from experiments.toy.experiment import bf16_ema
    from lowvram_dopsd.lora import DualLoRA

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lora = DualLoRA.attach(model, ("0",), rank=2, alpha=2, seed=0)
    layer = lora.layers["0"]
    with torch.no_grad():
        layer.teacher_B.fill_(1.0)
        layer.student_B.fill_(2.0)
    with bf16_ema():
        lora.ema_update(0.9999)  # 1 + 1e-4: under half of bf16's step at 1 (2^-8): rounds back to 1
    assert torch.equal(layer.teacher_B, torch.ones_like(layer.teacher_B))
    assert torch.equal(layer.teacher_A, layer.student_A.to(torch.bfloat16).float())
    lora.ema_update(0.9999)  # the trainer's own, fp32
    torch.testing.assert_close(layer.teacher_B, torch.full_like(layer.teacher_B, 1.0001))


def test_build_dmd_stage_replaces_the_model_keeps_the_ode_map_one_and_records_its_sharpness(tmp_path):
    """`experiments.toy.build --stage dmd` on a copy of the shipped folder: the generator's EMA becomes
    transformer/, the ODE-map model stays in kd_transformer/, build_info.json records the distilled
    model's sharpness, FD, attributes and gate, and the resumable state is gone once it is done."""
    import shutil

    from experiments.toy import build

    model = tmp_path / "model"
    shutil.copytree(ASSETS / "model", model)
    shutil.rmtree(model / "kd_transformer", ignore_errors=True)  # a folder from before this stage: the
    ode_map = (model / "transformer" / "model.safetensors").read_bytes()  # ODE-map model is transformer/
    assert build.main(["--out", str(model), "--stage", "dmd", "--dmd-iters", "3", "--dmd-batch", "4",
                       "--dmd-ratio", "2", "--report-prompts", "8"]) == 0
    assert (model / "kd_transformer" / "model.safetensors").read_bytes() == ode_map
    assert (model / "transformer" / "model.safetensors").read_bytes() != ode_map
    info = json.loads((tmp_path / "build_info.json").read_text())["dmd"]
    assert info["sharpness"] > 0 and info["fd"] > 0 and 0 <= info["prior_all"] <= 1 and "ring_context" in info["gate"]
    assert info["iters"] == 3 and info["method"].startswith("DMD2") and not (tmp_path / "dmd-state.pt").exists()
    assert "DMD2" in json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())["distillation"]


def test_grain_reads_noise_on_flat_ground_and_not_edges():
    """evaluate.grain: 0 for the renders themselves, up with noise in any colour channel (a chroma noise
    whose gray mean is 0 too), and not raised by moving a shape (its edges are where the render has edges
    within 2 px, or outside the flat mask)."""
    from lowvram_dopsd.toy.evaluate import grain

    rng = random.Random(0)
    scenes = [world.random_scene(rng) for _ in range(16)]
    real = world.to_tensor([world.render(s) for s in scenes])
    assert grain(real, real) == 0.0
    chroma = torch.randn(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.05
    chroma = torch.cat([chroma, -chroma, torch.zeros_like(chroma)], 1)  # gray mean unchanged
    assert grain(real + chroma, real) > 0.1 and grain(real + chroma / 2, real) < grain(real + chroma, real)
    moved = world.to_tensor([world.render(world.Scene(s.shape, s.colour, s.size, s.position, s.background,
                                                       (s.jitter[0] + 1.0, s.jitter[1]))) for s in scenes])
    assert grain(moved, real) < 0.02


def test_sharpness_split_puts_grain_on_flat_ground_and_blur_on_edges():
    """experiments.toy.sharpness_split: the renders themselves are all edge energy (edges 1, flat 0),
    noise shows on flat ground, a blur lowers the edges' part, and the two parts add up to about the
    experiment's sharpness."""
    import torch.nn.functional as F

    from experiments.toy.sharpness_split import split
    from lowvram_dopsd.toy.evaluate import laplacian_var

    rng = random.Random(0)
    real = world.to_tensor([world.render(world.random_scene(rng)) for _ in range(16)])
    assert split(real, real) == pytest.approx({"edges": 1.0, "flat": 0.0})
    noisy = real + 0.05 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    parts = split(noisy, real)
    assert parts["flat"] > 0.2 and 1.0 < parts["edges"] < 1.0 + parts["flat"]  # the noise lands mostly on flat ground
    assert sum(parts.values()) == pytest.approx(laplacian_var(noisy) / laplacian_var(real), rel=0.1)
    blurred = F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert split(blurred, real) == pytest.approx({"edges": 0.11, "flat": 0.0}, abs=0.02)
