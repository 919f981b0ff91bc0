"""FLUX.2-klein 9B: the klein family on a tiny 9B folder (Qwen3-8B-shaped, untied text encoder; more
blocks), against the stock Flux2KleinPipeline; where its reference image goes (the "zoom-in" check);
its matching Qwen3-VL for the vlm teacher; the CLI with both teachers; klein-9b-kv refused."""
import json

import pytest
import torch
from PIL import Image

from lowvram_dopsd.cli import main
from lowvram_dopsd.data import load_rgb, scan
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.families import load_family
from lowvram_dopsd.families.klein import edit_prompt
from lowvram_dopsd.output import read_info
from test_train_klein import (CPU, PROMPT, attach, capture_transformer_calls, make_cfg, pack, pipeline_trajectory,
                              rel_err, stock_pipeline, student_rollout, unpack, variant_of)

H, W = 64, 96  # training size of the reference (4 x 6 tokens)


@pytest.fixture(scope="module")
def vlm8b_dir(tmp_path_factory, tiny_klein9b_dir):
    """The tiny Qwen3-VL shaped like the 9B's text encoder: its Qwen3-VL-8B-Instruct."""
    from lowvram_dopsd.tiny import make_tiny_qwen3vl

    return make_tiny_qwen3vl(tmp_path_factory.mktemp("vlm8b") / "vlm", tiny_klein9b_dir / "text_encoder")


def test_9b_student_rollout_equals_the_stock_pipeline(tmp_path, tiny_klein9b_dir, demo_images):
    cfg = make_cfg(tmp_path, tiny_klein9b_dir, demo_images)
    family = load_family(str(tiny_klein9b_dir))
    assert family.name == "klein" and family.teachers[0] == "edit"
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    assert cond["cap"].shape[1] == 3 * 48  # layers 9, 18, 27 of the (tiny) Qwen3-8B
    model, lora = attach(family, cfg)
    noise = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(7))
    ours = student_rollout(family, model, lora, cond, noise, 4, H, W)
    ref, _ = pipeline_trajectory(stock_pipeline(tiny_klein9b_dir), noise, 4, cfg, H, W, output_type="latent")
    for a, b in zip(ours, ref):
        assert rel_err(pack(a), b) < 1e-5


def test_9b_edit_teacher_places_the_reference_exactly_as_the_pipeline(tmp_path, tiny_klein9b_dir, demo_images):
    """The zoom-in check (vvvvvjdy/D-OPSD issue #10 reports the authors' 9B edit teacher drifting into a
    zoom): position ids, the reference tokens' timestep and their scale, as the 9B's pipeline sets them.

    The photo is larger than its training size (192x128 for 96x64): the trainer builds the reference at
    the training size, so that the pipeline given that reference and the training size as the output
    size sees one grid. The pipeline given the photo itself keeps it at its own size (up to 1024²):
    with the generated image's grid 4 x 6 and the reference's 8 x 12 on the same position axes, every
    reference token would sit at twice the scale of the image it is compared with: a zoom."""
    src = sorted(demo_images.glob("*.png"))[1]
    folder = tmp_path / "photo"
    folder.mkdir()
    Image.open(src).convert("RGB").resize((2 * W, 2 * H), Image.BICUBIC).save(folder / src.name)
    (folder / src.with_suffix(".txt").name).write_text(src.with_suffix(".txt").read_text())
    cfg = make_cfg(tmp_path, tiny_klein9b_dir, folder, resolution=80)
    (item,) = scan(str(folder), "", "", cfg.resolution).items
    assert (item.width, item.height) == (W, H)
    family = load_family(str(tiny_klein9b_dir))
    (cond,) = family.encode_teacher([item], "edit", cfg, CPU)
    n = (H // 16) * (W // 16)
    assert cond["ref"].shape == (n, 128)

    pipe = stock_pipeline(tiny_klein9b_dir)
    reference = Image.fromarray(  # the trainer's reference pixels, as the image the pipeline is given
        ((family.reference_pixels(pipe, load_rgb(item.image_path), W, H)[0].permute(1, 2, 0) + 1) * 127.5)
        .round().clamp(0, 255).to(torch.uint8).numpy())
    calls, handle = capture_transformer_calls(pipe)
    noise = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(3))
    pipeline_trajectory(pipe, noise, 4, cfg, H, W, image=reference,
                        prompt=edit_prompt(item.caption, cfg.edit_instruction), output_type="latent")
    handle.remove()
    model, lora = attach(family, cfg)
    sigmas = family.sigmas(H, W, 4)
    for k, (kw, out) in enumerate(calls):
        ids = kw["img_ids"][0]
        # position ids: the reference after the noisy tokens at T = 10 (the pipeline's scale for image
        # 0), on the same H/W grid as the generated image (no offset, no scaling), L = 0
        assert torch.equal(ids[n:], cond["ref_ids"]) and ids[n:, 0].eq(10).all() and ids[:n, 0].eq(0).all()
        assert torch.equal(ids[n:, 1:], ids[:n, 1:])
        # the reference tokens' timestep: klein's transformer takes ONE timestep per sample, the step's
        # t = sigma, for the noisy and the reference tokens alike (no separate clean timestep)
        assert kw["timestep"].shape == (1,) and float(kw["timestep"]) == pytest.approx(float(sigmas[k]))
        assert torch.allclose(kw["hidden_states"][0, n:], cond["ref"], atol=1e-5)  # the same pixels, re-encoded
        with torch.no_grad(), lora.use("teacher"):
            v = family.velocity(model, unpack(kw["hidden_states"][:, :n], H // 16, W // 16), sigmas[k], [cond])
        assert rel_err(pack(v), out[:, :n]) < 1e-4

    # scale: the photo given as is would be encoded at its own size, twice the generated grid
    whole, whole_ids = pipe.prepare_image_latents(
        images=[pipe.image_processor.preprocess(load_rgb(item.image_path), height=2 * H, width=2 * W,
                                                resize_mode="crop")], batch_size=1, generator=None, device=CPU,
        dtype=torch.float32)
    assert whole.shape[1] == 4 * n and whole_ids[0, :, 1].max() == 2 * H // 16 - 1
    assert cond["ref_ids"][:, 1].max() == H // 16 - 1


def test_9b_vlm_teacher_uses_the_matching_qwen3_vl(tmp_path, tiny_klein9b_dir, tiny_vlm_dir, vlm8b_dir):
    family = load_family(str(tiny_klein9b_dir))
    # the published pairs (hidden size, layers): Qwen3-4B -> Qwen3-VL-4B, Qwen3-8B -> Qwen3-VL-8B
    for hidden, vl in ((2560, "Qwen/Qwen3-VL-4B-Instruct"), (4096, "Qwen/Qwen3-VL-8B-Instruct")):
        folder = tmp_path / str(hidden)
        (folder / "text_encoder").mkdir(parents=True)
        (folder / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": hidden,
                                                                           "num_hidden_layers": 36}))
        other = type(family)(folder, str(folder))
        cfg = make_cfg(tmp_path, folder, tmp_path)
        assert other.matching_vlm() == vl and other.teacher_encoder(cfg) == vl  # the shipped default resolves
        assert other.teacher_encoder(make_cfg(tmp_path, folder, tmp_path, teacher_encoder="mine")) == "mine"
    # the 4B's VLM does not fit the 9B's text encoder: the graft says which pair works
    from lowvram_dopsd.teacher_vlm import load_grafted_vlm
    with pytest.raises(UserError, match="Qwen3-VL-8B-Instruct for Qwen3-8B"):
        load_grafted_vlm(tiny_vlm_dir, tiny_klein9b_dir / "text_encoder", "cpu", torch.float32)
    model, _ = load_grafted_vlm(vlm8b_dir, tiny_klein9b_dir / "text_encoder", "cpu", torch.float32)
    assert not model.config.tie_word_embeddings  # Qwen3-VL-8B keeps its own lm_head, as Qwen3-8B does


@pytest.mark.parametrize("teacher", ["edit", "vlm"])
def test_cli_trains_the_9b_with_each_teacher(tmp_path, tiny_klein9b_dir, vlm8b_dir, demo_images, teacher, capsys):
    args = ["train", "--preset", "cpu-demo", "--model", str(tiny_klein9b_dir), "--images", str(demo_images),
            "--output", str(tmp_path / "run"), "--steps", "1", "--cache-dir", str(tmp_path / "cache"),
            "--teacher", teacher, "--teacher-encoder", str(vlm8b_dir), "--set", "train_states=1"]
    assert main(args) == 0, capsys.readouterr().err
    info = read_info(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert info["family"] == "klein" and info["teacher"] == teacher
    stock_pipeline(tiny_klein9b_dir, tmp_path / "run")  # the 9B's stock pipeline loads the LoRA


def test_klein_9b_kv_is_refused_with_the_reason(tmp_path, tiny_klein9b_dir):
    kv = variant_of(tiny_klein9b_dir, tmp_path / "klein-9b-kv", _class_name="Flux2KleinKVPipeline")
    with pytest.raises(UserError, match="timestep 0") as err:
        load_family(str(kv))
    assert "FLUX.2-klein-9B instead" in str(err.value)
