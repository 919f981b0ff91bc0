"""The FLUX.3 family on a tiny FLUX.3 Image Klein (distilled) folder, checked against the stock
Flux3DistilledModularPipeline (diffusers' modular pipeline, prompt upsampler popped as its docs say)."""
import numpy as np
import pytest
import torch
from diffusers import Flux3DistilledAutoBlocks, Flux3Transformer2DModel
from PIL import Image

from lowvram_dopsd.cli import main
from lowvram_dopsd.config import load_config
from lowvram_dopsd.data import load_rgb, scan
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.families import load_family
from lowvram_dopsd.families.flux3 import encoder_states, text_layers, window
from lowvram_dopsd.families.klein import edit_prompt
from lowvram_dopsd.lora import DualLoRA
from lowvram_dopsd.output import read_info, save_lora
from lowvram_dopsd.preview import few_step_sample

CPU = torch.device("cpu")
PROMPT = "a photo of sks ball on the beach"
H, W = 64, 96  # a non-square grid (4 x 6 tokens) catches h/w mix-ups; the pipeline pads sides under 64


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_cfg(tmp_path, model_dir, images, **over):
    base = dict(model=str(model_dir), images=str(images), output=str(tmp_path / "out"),
                cache_dir=str(tmp_path / "cache"), steps=2, save_every=100)
    base.update({k: str(v) for k, v in over.items()})
    return load_config("cpu-demo", base)


@pytest.fixture(scope="module")
def family(tiny_flux3_dir):
    return load_family(str(tiny_flux3_dir))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_flux3_dir, demo_images):
    return make_cfg(tmp_path_factory.mktemp("flux3"), tiny_flux3_dir, demo_images)


def stock_pipeline(model_dir, family, lora_dir=None):
    """The stock modular pipeline from the folder, as its docs use it without the prompt upsampler. The
    tokenizer component is the family's: AutoProcessor, or where torchvision is missing (CI) the
    text-only stand-in the family itself uses (the prompt encoder reads only its template + tokenizer)."""
    blocks = Flux3DistilledAutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline(str(model_dir))
    pipe.load_components(names=["text_encoder", "transformer", "vae"], dtype=torch.float32)
    pipe.update_components(tokenizer=family.prompt_processor())
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return pipe


def transformer_calls(pipe):
    calls = []

    def hook(_module, _args, kwargs, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    return calls, pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def attach(family, cfg):
    model = family.load_transformer(cfg, CPU, torch.float32)
    return model, DualLoRA.attach(model, family.lora_targets, rank=4, alpha=8.0)


def test_detection_defaults_and_targets(family, tiny_flux3_dir, tmp_path):
    assert family.name == "flux3" and family.teachers == ("edit", "vlm")
    assert text_layers() == (4, 8, 12, 16, 20, 24, 28, 32)
    # 16 steps: the distilled blocks' own default; 4 trained states of them by default
    from diffusers.modular_pipelines.flux3.modular_blocks_flux3_distilled import Flux3DistilledCoreDenoiseBlocks
    assert family.default_rollout_steps == Flux3DistilledCoreDenoiseBlocks["set_timesteps"].num_inference_steps == 16
    assert family.default_train_states == 4
    model, lora = attach(family, make_cfg(tmp_path, tiny_flux3_dir, tmp_path))
    names = set(lora.layers)
    assert any(n.startswith("mode_blocks.image.") for n in names) and any(n.startswith("txt_mode_blocks.") for n in names)
    assert not any("image_cond" in n for n in names)  # the student never runs the reference blocks
    assert len(names) == 6 * (1 + 1 + 2)  # 6 linears x (1 text + 1 image block + 2 joint blocks)


def test_bf16_load_is_diffusers_own(family, tiny_flux3_dir, tmp_path):
    """The frugal loader keeps what from_pretrained keeps in fp32 (the class's _keep_in_fp32_modules: the
    QK norms) and loads mode_blocks block by block: same tensors, same bf16 prediction as diffusers."""
    from lowvram_dopsd.quant import units

    cfg = make_cfg(tmp_path, tiny_flux3_dir, tmp_path, dtype="bf16")
    ours = family.load_transformer(cfg, CPU, torch.bfloat16)
    ref = Flux3Transformer2DModel.from_pretrained(tiny_flux3_dir / "transformer", dtype=torch.bfloat16)
    theirs = ref.state_dict()
    assert {k: (v.dtype, v.shape) for k, v in ours.state_dict().items()} == {k: (v.dtype, v.shape)
                                                                           for k, v in theirs.items()}
    assert ours.single_transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    assert "mode_blocks.image_cond.0" in dict(units(ours))
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    x = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(9))
    sig = family.sigmas(H, W, 16)
    with torch.no_grad():
        v = family.velocity(ours, x, sig[1], [cond], sig[2])
        out = ref(hidden_states=x.to(torch.bfloat16).flatten(2).transpose(1, 2), encoder_hidden_states=cond["cap"][None],
                  timestep=sig[1:2].to(torch.bfloat16), target_timestep=sig[2:3].to(torch.bfloat16),
                  img_ids=family._ids("img", (H // 16, W // 16), CPU), txt_ids=family._ids("txt", cond["cap"].shape[0], CPU),
                  return_dict=False)[0]
    assert torch.equal(v, out.float().transpose(1, 2).reshape(v.shape))


def test_base_flux3_is_refused(tiny_flux3_dir, tmp_path):
    base = tmp_path / "flux3-base"
    base.mkdir()
    for sub in tiny_flux3_dir.iterdir():
        if sub.name != "transformer":
            (base / sub.name).symlink_to(sub)
    model = Flux3Transformer2DModel.from_pretrained(tiny_flux3_dir / "transformer")
    config = dict(model.config)
    config["flow_map"] = False
    Flux3Transformer2DModel.from_config(config).save_pretrained(base / "transformer")
    with pytest.raises(UserError, match="flow-map"):
        load_family(str(base))


# ----------------------------------------------------------------------------------------------
# Roll-out and decoding

def test_zero_lora_rollout_and_images_equal_the_stock_pipeline(family, cfg, tiny_flux3_dir):
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    model, lora = attach(family, cfg)
    noise = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(7))
    assert noise.shape == (1, 128, H // 16, W // 16)
    sigmas = family.sigmas(H, W, family.default_rollout_steps)
    ours = few_step_sample(family, model, lora, "student", noise, sigmas, [cond])

    pipe = stock_pipeline(tiny_flux3_dir, family)
    calls, handle = transformer_calls(pipe)
    out = pipe(prompt=PROMPT, height=H, width=W, latents=noise.clone(), max_sequence_length=cfg.max_sequence_length,
               output=["latents", "images"])
    handle.remove()
    assert torch.equal(sigmas, pipe.scheduler.sigmas)                    # constant shift 6.93, 16 steps
    assert len(calls) == 16
    assert torch.equal(calls[0][0]["encoder_hidden_states"][0], cond["cap"])  # the prompt's 80-token window
    # each step passes the sigma it jumps to (the flow map's target timestep), 0 after the last
    assert [float(kw["target_timestep"]) for kw, _ in calls] == pytest.approx(sigmas[1:].tolist())
    assert rel_err(ours, out["latents"]) < 1e-5
    assert rel_err(noise, out["latents"]) > 0.05                        # the roll-out moved
    images = family.decode_latents(ours)
    a, b = np.asarray(images[0], np.int16), np.asarray(out["images"][0], np.int16)
    assert images[0].size == (W, H) and np.abs(a - b).max() <= 1


def test_velocity_needs_the_step_target(family, cfg):
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    model, _ = attach(family, cfg)
    x = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(1))
    sig = family.sigmas(H, W, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="flow map"):
            family.velocity(model, x, sig[3], [cond])
        # the target matters: the same state and sigma, another jump, another prediction
        assert rel_err(family.velocity(model, x, sig[3], [cond], sig[4]),
                       family.velocity(model, x, sig[3], [cond], sig[8])) > 1e-4


def test_batched_velocity_equals_per_item(family, cfg):
    short, long = family.encode_student([PROMPT, " ".join(["a red ball"] * 12)], cfg, CPU)
    model, _ = attach(family, cfg)
    x = torch.randn((2, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(4))
    sig = family.sigmas(H, W, 16)
    with torch.no_grad():
        for conds in ([short, short], [short, long]):  # the second pair: windows of different lengths
            both = family.velocity(model, x, sig[2], conds, sig[3])
            one_by_one = torch.cat([family.velocity(model, x[i:i + 1], sig[2], [c], sig[3])
                                    for i, c in enumerate(conds)])
            assert torch.allclose(both, one_by_one, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Teachers

@pytest.fixture(scope="module")
def wide_item(tmp_path_factory, demo_images):
    """One 96x64 training image (its training size at resolution 80 is its own size)."""
    root = tmp_path_factory.mktemp("wide3")
    src = sorted(demo_images.glob("*.png"))[0]
    Image.open(src).convert("RGB").resize((W, H), Image.BICUBIC).save(root / src.name)
    (root / src.with_suffix(".txt").name).write_text(src.with_suffix(".txt").read_text())
    return root


def test_edit_teacher_is_the_pipelines_reference_image_path(family, tiny_flux3_dir, tmp_path, wide_item):
    cfg = make_cfg(tmp_path, tiny_flux3_dir, wide_item, resolution=80)
    (item,) = scan(str(wide_item), "", "", cfg.resolution).items
    assert (item.width, item.height) == (W, H)
    (cond,) = family.encode_teacher([item], "edit", cfg, CPU)
    n = (H // 16) * (W // 16)
    assert cond["ref"].shape == (n, 128) and cond["ref_ids"].shape == (n, 4)

    # The stock pipeline given the photo at the training size as its one reference image, and the
    # caption + edit instruction; it sizes the generation from the reference (its canvas).
    pipe = stock_pipeline(tiny_flux3_dir, family)
    calls, handle = transformer_calls(pipe)
    noise = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(11))
    image = family.reference_image(load_rgb(item.image_path), item.width, item.height)
    pipe(prompt=edit_prompt(item.caption, cfg.edit_instruction), image=image, latents=noise.clone(),
         max_sequence_length=cfg.max_sequence_length, num_inference_steps=4, output="latents")
    handle.remove()
    assert len(calls) == 4
    model, lora = attach(family, cfg)
    sigmas = family.sigmas(H, W, 4)
    for k, (kw, out) in enumerate(calls):
        assert torch.equal(kw["image_cond_hidden_states"][0], cond["ref"])  # VAE mode, patchify, BN, pack
        assert torch.equal(kw["image_cond_ids"], cond["ref_ids"])
        assert torch.equal(kw["encoder_hidden_states"][0], cond["cap"])
        state = kw["hidden_states"].transpose(1, 2).reshape(1, 128, H // 16, W // 16)
        with torch.no_grad(), lora.use("teacher"):
            v = family.velocity(model, state, sigmas[k], [cond], sigmas[k + 1])
        assert rel_err(v.flatten(2).transpose(1, 2), out) < 1e-5
    # the reference lies on the generated image's grid, scaled alike (0.5), on its own l = -1 plane
    img_ids = calls[0][0]["img_ids"]
    assert torch.equal(cond["ref_ids"][:, 1:3], img_ids[:, 1:3]) and cond["ref_ids"][:, 3].eq(-1).all()
    assert img_ids[:, 3].eq(0).all() and img_ids[:, 1].max() == 0.5 * (H // 16 - 1)


def test_vlm_teacher_is_the_prompt_encoding_with_the_photo(family, cfg, tiny_flux3_dir, tmp_path, wide_item):
    from transformers import Qwen3VLForConditionalGeneration

    # 1. With no image, the message path (padding, pad positions, layers) is the pipeline's prompt encoding.
    (student,) = family.encode_student([PROMPT], cfg, CPU)
    processor = family.prompt_processor()
    text = processor.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = dict(processor.tokenizer([text], return_tensors="pt"))
    encoder = Qwen3VLForConditionalGeneration.from_pretrained(tiny_flux3_dir / "text_encoder", dtype=torch.float32)
    length = window(inputs["input_ids"].shape[1], family.pad_multiple, cfg.max_sequence_length)
    ours = encoder_states(encoder, inputs, text_layers(), length, processor.tokenizer.pad_token_id)
    assert ours.shape == student["cap"].shape and torch.allclose(ours, student["cap"], atol=1e-6, rtol=1e-5)

    # 2. With the photo: the same encoder reads [image, caption] in one message.
    vcfg = make_cfg(tmp_path, tiny_flux3_dir, wide_item, vlm_min_pixels=64 * 64, vlm_max_pixels=128 * 128)
    (item,) = scan(str(wide_item), "", "", vcfg.resolution).items
    item.caption = PROMPT
    (teacher,) = family.encode_teacher([item], "vlm", vcfg, CPU)
    (plain,) = family.encode_student([PROMPT], vcfg, CPU)
    grid = family._vlm_inputs(PROMPT, load_rgb(item.image_path), vcfg.vlm_min_pixels, vcfg.vlm_max_pixels)
    image_tokens = int(grid["image_grid_thw"].prod()) // 4
    assert image_tokens > 0 and teacher["cap"].shape[1] == 8 * 32 and teacher["cap"].shape[0] % 80 == 0
    assert teacher["cap"].shape[0] >= plain["cap"].shape[0] and not torch.equal(teacher["cap"][:5], plain["cap"][:5])


# ----------------------------------------------------------------------------------------------
# The LoRA in the stock pipeline

def test_student_lora_loads_in_the_stock_pipeline_and_reproduces_the_student(family, cfg, tiny_flux3_dir, tmp_path):
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    model, lora = attach(family, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking student: B away from its zero init
        for layer in lora.layers.values():
            layer.student_B.copy_(torch.randn(layer.student_B.shape, generator=gen) * 0.05)
    path = save_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors", lora, "student",
                     {"family": "flux3"}, dtype=torch.float32)
    noise = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(5))
    sigmas = family.sigmas(H, W, 16)
    ours = few_step_sample(family, model, lora, "student", noise, sigmas, [cond])
    base = few_step_sample(family, model, lora, None, noise, sigmas, [cond])
    pipe = stock_pipeline(tiny_flux3_dir, family, lora_dir=path.parent)
    loaded = pipe(prompt=PROMPT, height=H, width=W, latents=noise.clone(), max_sequence_length=cfg.max_sequence_length,
                  output="latents")
    assert rel_err(ours, loaded) < 1e-5
    assert rel_err(base, loaded) > 1e-3  # the LoRA changed the roll-out, at alpha / rank

    # `sample` opens the same stock pipeline (upsampler popped), with the pipeline's own prompt length,
    # and draws its noise from the seed on a CPU generator: the student's roll-out from that noise
    png = tmp_path / "s.png"
    assert main(["sample", "--lora", str(path.parent), "--model", str(tiny_flux3_dir), "--prompt", PROMPT, "--seed",
                 "5", "--width", str(W), "--height", str(H), "--device", "cpu", "--output", str(png)]) == 0
    (full,) = family.encode_student([PROMPT], make_cfg(tmp_path, tiny_flux3_dir, tmp_path, max_sequence_length=512),
                                    CPU)
    mine = family.decode_latents(few_step_sample(family, model, lora, "student", noise, sigmas, [full]))[0]
    assert np.abs(np.asarray(Image.open(png), np.int16) - np.asarray(mine, np.int16)).max() <= 1


# ----------------------------------------------------------------------------------------------
# The command line

@pytest.mark.parametrize("teacher", ["edit", "vlm"])
def test_cli_trains_flux3_with_each_teacher(tmp_path, tiny_flux3_dir, demo_images, teacher, capsys, timed_on_4090):
    args = ["train", "--preset", "cpu-demo", "--model", str(tiny_flux3_dir), "--images", str(demo_images),
            "--output", str(tmp_path / "run"), "--steps", "1", "--cache-dir", str(tmp_path / "cache"),
            "--batch-size", "1", "--teacher", teacher]
    assert main(args) == 0, capsys.readouterr().err
    printed = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the header box's lines joined
    assert "16-step roll-outs, 4 states trained" in printed  # the family's defaults
    # before the first step: attention kernels, the time prediction (a flow map's count once raised there)
    assert "attention: native backend; teacher: " in printed and "time on the RTX 4090 (predicted" in printed
    # the closing "load it" line loads the modular pipeline's components before the LoRA, and works
    assert "blocks.init_pipeline(" in printed and "pipe.load_components(); pipe.load_lora_weights(" in printed
    from lowvram_dopsd.advice import use_commands

    family = load_family(str(tiny_flux3_dir))
    scope: dict = {}
    exec(use_commands(load_config("cpu-demo", {"model": str(tiny_flux3_dir)}), family, tmp_path / "run")["load it"],
         scope)
    assert "transformer" in scope["pipe"].get_list_adapters()
    info = read_info(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert info["family"] == "flux3" and info["teacher"] == teacher and info["rollout_steps"] == 16
