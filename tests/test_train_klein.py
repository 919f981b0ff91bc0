"""The klein family on a tiny FLUX.2-klein checkpoint, checked against the stock Flux2KleinPipeline."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from lowvram_dopsd.config import load_config
from lowvram_dopsd.data import load_rgb, scan
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.families import load_family
from lowvram_dopsd.families.klein import edit_prompt
from lowvram_dopsd.lora import DualLoRA
from rollout_helpers import assert_per_step_backward_equals_summed
from lowvram_dopsd.train import rollout_and_learn, train

CPU = torch.device("cpu")
PROMPT = "a photo of sks ball on the beach"
H, W, WIDE_RES = 80, 128, 96  # the pipeline wants reference images of at least 64 px a side


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_cfg(tmp_path, model_dir, images, **over):
    base = dict(model=str(model_dir), images=str(images), output=str(tmp_path / "out"),
                cache_dir=str(tmp_path / "cache"), steps=3, save_every=100)
    base.update({k: str(v) for k, v in over.items()})
    return load_config("cpu-demo", base)


@pytest.fixture(scope="module")
def wide_images(tmp_path_factory, demo_images):
    """Two non-square (128x80) training images with captions: a non-square grid catches h/w mix-ups.

    With `resolution = WIDE_RES` their training size is their own size, so the pipeline given the
    image as `image=` builds its reference at the same size as the trainer does.
    """
    root = tmp_path_factory.mktemp("wide")
    for src in sorted(demo_images.glob("*.png"))[:2]:
        Image.open(src).convert("RGB").resize((W, H), Image.BICUBIC).save(root / src.name)
        shutil.copy(src.with_suffix(".txt"), root / src.with_suffix(".txt").name)
    return root


def pack(x):
    return Flux2KleinPipeline._pack_latents(x)


def unpack(seq, h, w):
    return seq.permute(0, 2, 1).reshape(seq.shape[0], seq.shape[2], h, w)


def stock_pipeline(model_dir, lora_dir=None):
    pipe = Flux2KleinPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    return pipe


def pipeline_trajectory(pipe, noise, steps, cfg, height=64, width=64, **kw):
    """The pipeline's packed latents after every step (callback) and its final VAE latents."""
    states = []

    def keep(_pipe, _i, _t, kwargs):
        states.append(kwargs["latents"].clone())
        return {}

    out = pipe(prompt=kw.pop("prompt", PROMPT), height=height, width=width, num_inference_steps=steps,
               guidance_scale=1.0, latents=noise.clone(), max_sequence_length=cfg.max_sequence_length,
               callback_on_step_end=keep, **kw)
    return states, out.images


def student_rollout(family, model, lora, cond, noise, steps, height=64, width=64):
    sigmas = family.sigmas(height, width, steps)
    states = []
    x = noise.clone()
    with torch.no_grad():
        for k in range(steps):  # one step at a time through the trainer's own loop, to keep every state
            _, x = rollout_and_learn(family, model, lora, x, sigmas[k:k + 2], [cond], [cond], set(), "velocity", 1.0)
            states.append(x)
    return states


def attach(family, cfg):
    model = family.load_transformer(cfg, CPU, torch.float32)
    return model, DualLoRA.attach(model, family.lora_targets, rank=4, alpha=8.0)


# ----------------------------------------------------------------------------------------------
# Schedule and roll-out

@pytest.mark.parametrize("steps,size", [(4, (64, 64)), (2, (48, 80))])
def test_zero_lora_rollout_equals_stock_pipeline(tmp_path, tiny_klein_dir, demo_images, steps, size):
    height, width = size
    cfg = make_cfg(tmp_path, tiny_klein_dir, demo_images)
    family = load_family(str(tiny_klein_dir))
    assert family.name == "klein" and family.teachers[0] == "edit" and family.default_rollout_steps == 4
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    model, lora = attach(family, cfg)
    # The noise as the pipeline draws it: prepare_latents' randn of [B, 128, H/16, W/16].
    noise = torch.randn((1, *family.latent_shape(height, width)), generator=torch.Generator().manual_seed(7))
    assert noise.shape == (1, 128, height // 16, width // 16)
    ours = student_rollout(family, model, lora, cond, noise, steps, height, width)

    pipe = stock_pipeline(tiny_klein_dir)
    ref, _ = pipeline_trajectory(pipe, noise, steps, cfg, height, width, output_type="latent")
    assert torch.equal(family.sigmas(height, width, steps), pipe.scheduler.sigmas)  # same shift, same mu
    assert len(ours) == len(ref) == steps
    for a, b in zip(ours, ref):
        assert rel_err(pack(a), b) < 1e-5
    assert rel_err(pack(noise), ref[-1]) > 0.05  # the roll-out moved: not a vacuous comparison


def test_position_ids_are_made_once_per_shape(tmp_path, tiny_klein_dir, demo_images):
    """The velocity builds the pipeline's position ids once per shape and keeps them on the device:
    built on the CPU and copied in every pass, they made the host wait for the GPU there."""
    cfg = make_cfg(tmp_path, tiny_klein_dir, demo_images)
    family = load_family(str(tiny_klein_dir))
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    model, _ = attach(family, cfg)
    with torch.no_grad():
        for h, w in ((64, 64), (48, 80), (64, 64)):
            family.velocity(model, torch.zeros(1, *family.latent_shape(h, w)), torch.tensor(0.5), [cond])
    cache = family._id_cache
    assert len(cache) == 3  # latent ids for two sizes, text ids for one caption length
    for (name, shape, _device), ids in cache.items():
        assert torch.equal(ids, getattr(Flux2KleinPipeline, name)(torch.zeros(shape)))


def test_decode_latents_equals_the_pipeline_images(tmp_path, tiny_klein_dir, demo_images):
    cfg = make_cfg(tmp_path, tiny_klein_dir, demo_images)
    family = load_family(str(tiny_klein_dir))
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    model, lora = attach(family, cfg)
    noise = torch.randn((2, *family.latent_shape(48, 80)), generator=torch.Generator().manual_seed(5))
    final = student_rollout(family, model, lora, cond, noise[:1], 4, 48, 80)[-1]
    final = torch.cat([final, student_rollout(family, model, lora, cond, noise[1:], 4, 48, 80)[-1]])
    ours = family.decode_latents(final)
    pipe = stock_pipeline(tiny_klein_dir)
    _, ref = pipeline_trajectory(pipe, noise, 4, cfg, 48, 80, prompt=[PROMPT, PROMPT], output_type="pil")
    assert len(ours) == 2 and all(im.size == (80, 48) and im.mode == "RGB" for im in ours)
    for a, b in zip(ours, ref):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        assert np.abs(a - b).max() <= 1
    assert np.abs(np.asarray(ours[0], np.int16) - np.asarray(ours[1], np.int16)).max() > 10  # two images


def test_previews_decode_in_the_compute_dtype_not_the_stored_one(tmp_path, tiny_klein_dir, demo_images):
    # a full fine-tune loads its student in fp32 and its EMA teacher in ema_dtype, and computes in cfg.dtype
    cfg = make_cfg(tmp_path, tiny_klein_dir, demo_images, dtype="bf16")
    family = load_family(str(tiny_klein_dir))
    family.load_transformer(cfg, CPU, torch.float32)
    assert family._dtype == torch.bfloat16  # decode_latents' dtype on a GPU


# ----------------------------------------------------------------------------------------------
# The edit teacher

def capture_transformer_calls(pipe):
    calls = []

    def hook(_module, _args, kwargs, output):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, output[0].clone()))

    return calls, pipe.transformer.register_forward_hook(hook, with_kwargs=True)


def test_edit_teacher_input_and_velocity_equal_the_pipeline_with_a_reference_image(tmp_path, tiny_klein_dir,
                                                                                 wide_images):
    cfg = make_cfg(tmp_path, tiny_klein_dir, wide_images, resolution=WIDE_RES)
    item = scan(str(wide_images), "", "", cfg.resolution).items[0]
    assert (item.width, item.height) == (W, H)
    family = load_family(str(tiny_klein_dir))
    (cond,) = family.encode_teacher([item], "edit", cfg, CPU)
    n = (H // 16) * (W // 16)
    assert cond["ref"].shape == (n, 128) and cond["ref_ids"].shape == (n, 4)

    # The stock pipeline given the target image as `image=` and the caption + edit instruction.
    pipe = stock_pipeline(tiny_klein_dir)
    calls, handle = capture_transformer_calls(pipe)
    noise = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(11))
    pipeline_trajectory(pipe, noise, 4, cfg, H, W, image=load_rgb(item.image_path),
                        prompt=edit_prompt(item.caption, cfg.edit_instruction), output_type="latent")
    handle.remove()
    assert len(calls) == 4

    model, lora = attach(family, cfg)
    sigmas = family.sigmas(H, W, 4)
    for k, (kw, out) in enumerate(calls):
        hidden, img_ids = kw["hidden_states"], kw["img_ids"]
        assert hidden.shape == (1, 2 * n, 128)                      # noisy tokens, then reference tokens
        assert torch.equal(hidden[0, n:], cond["ref"])              # VAE mode, patchify, BN-normalise, pack
        assert torch.equal(img_ids[0, n:], cond["ref_ids"])         # T = 10 for the first reference image
        assert torch.equal(kw["encoder_hidden_states"][0], cond["cap"])
        state = unpack(hidden[:, :n], H // 16, W // 16)
        with torch.no_grad(), lora.use("teacher"):
            v = family.velocity(model, state, sigmas[k], [cond])
        assert rel_err(pack(v), out[:, :n]) < 1e-5                 # read off the noisy-latent part
    assert img_ids[0, :n, 0].eq(0).all() and img_ids[0, n:, 0].eq(10).all()


def test_edit_teacher_sees_the_image_and_the_instruction(tmp_path, tiny_klein_dir, wide_images):
    cfg = make_cfg(tmp_path, tiny_klein_dir, wide_images, resolution=WIDE_RES)
    family = load_family(str(tiny_klein_dir))
    items = scan(str(wide_images), "", "", cfg.resolution).items
    items[1].caption = items[0].caption
    a, b = family.encode_teacher(items, "edit", cfg, CPU)
    (student,) = family.encode_student([items[0].caption], cfg, CPU)
    assert torch.equal(a["cap"], b["cap"]) and not torch.equal(a["cap"], student["cap"])  # instruction in
    assert a["cap"].shape == student["cap"].shape                         # the pipeline's padded length
    assert (a["ref"] - b["ref"]).abs().max() > 1e-2                        # another image, another reference

    model, lora = attach(family, cfg)
    x = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sig = family.sigmas(H, W, 4)[1]
        va, vb = (family.velocity(model, x, sig, [c]) for c in (a, b))
        vs = family.velocity(model, x, sig, [student])
    # Random tiny weights attend diffusely, so the effects are small, but far above float noise (~1e-7).
    assert rel_err(va, vb) > 1e-5 and rel_err(va, vs) > 1e-5


def test_batched_velocity_equals_per_item(tmp_path, tiny_klein_dir, wide_images):
    cfg = make_cfg(tmp_path, tiny_klein_dir, wide_images, resolution=WIDE_RES)
    family = load_family(str(tiny_klein_dir))
    items = scan(str(wide_images), "", "", cfg.resolution).items
    edit = family.encode_teacher(items, "edit", cfg, CPU)
    gen = torch.Generator().manual_seed(4)
    # VLM-like conditions of different lengths cannot share one call (one set of position ids)
    ragged = [{"cap": torch.randn(9, 96, generator=gen)}, {"cap": torch.randn(13, 96, generator=gen)}]
    model, lora = attach(family, cfg)
    x = torch.randn((2, *family.latent_shape(H, W)), generator=gen)
    sig = family.sigmas(H, W, 4)[2]
    with torch.no_grad():
        for conds in (edit, ragged):
            both = family.velocity(model, x, sig, conds)
            one_by_one = torch.cat([family.velocity(model, x[i:i + 1], sig, [c]) for i, c in enumerate(conds)])
            assert torch.allclose(both, one_by_one, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Training

def test_per_step_backward_equals_one_backward_of_the_summed_loss(tmp_path, tiny_klein_dir, wide_images):
    cfg = make_cfg(tmp_path, tiny_klein_dir, wide_images, resolution=WIDE_RES, grad_checkpointing=True)
    family = load_family(str(tiny_klein_dir))
    item = scan(str(wide_images), "", "", cfg.resolution).items[0]
    (c_s,) = family.encode_student([item.caption], cfg, CPU)
    (c_t,) = family.encode_teacher([item], "edit", cfg, CPU)
    model, lora = attach(family, cfg)
    assert model.gradient_checkpointing
    torch.manual_seed(0)
    noise = torch.randn((1, *family.latent_shape(H, W)), generator=torch.Generator().manual_seed(1))
    assert_per_step_backward_equals_summed(family, model, lora, c_s, c_t, noise, family.sigmas(H, W, 4), "x0")


def test_trained_lora_loads_in_stock_pipeline_and_reproduces_the_student(tmp_path, tiny_klein_dir, demo_images):
    cfg = make_cfg(tmp_path, tiny_klein_dir, demo_images, steps=3, lr=5e-3, rank=4, alpha=16)
    base_before = {k: v.clone() for k, v in
                   load_family(str(tiny_klein_dir)).load_transformer(cfg, CPU, torch.float32).state_dict().items()}
    result = train(cfg)
    assert result.family.name == "klein"
    for name, module in result.model.named_modules():  # the frozen base was never modified
        for pname, param in module.named_parameters(recurse=False):
            if "student_" not in pname:
                key = (f"{name}.{pname}" if name else pname).replace(".base.", ".")
                assert torch.equal(param, base_before[key]), key

    meta = json.loads(__import__("safetensors").safe_open(str(result.lora_path), "pt").metadata()["lowvram_dopsd"])
    assert meta["teacher"] == "edit" and meta["family"] == "klein"
    (cond,) = result.family.encode_student([PROMPT], cfg, CPU)
    noise = torch.randn((1, *result.family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(3))
    ours = student_rollout(result.family, result.model, result.lora, cond, noise, 4)[-1]
    loaded, _ = pipeline_trajectory(stock_pipeline(tiny_klein_dir, result.lora_path.parent), noise, 4, cfg,
                                    output_type="latent")
    stock, _ = pipeline_trajectory(stock_pipeline(tiny_klein_dir), noise, 4, cfg, output_type="latent")
    assert rel_err(pack(ours), loaded[-1]) < 1e-5
    assert rel_err(stock[-1], loaded[-1]) > 1e-3  # the LoRA learned something, and alpha/rank (4x) was applied


# ----------------------------------------------------------------------------------------------
# Detection

def variant_of(model_dir, folder, **index):
    """`folder`: the model's components (linked) under a model_index.json with `index`'s keys changed."""
    folder.mkdir()
    for sub in model_dir.iterdir():
        if sub.is_dir():
            (folder / sub.name).symlink_to(sub)
    changed = {**json.loads((model_dir / "model_index.json").read_text()), **index}
    (folder / "model_index.json").write_text(json.dumps(changed))
    return folder


def test_a_non_distilled_klein_is_refused(tmp_path, tiny_klein_dir):
    base = variant_of(tiny_klein_dir, tmp_path / "klein-base", is_distilled=False)
    with pytest.raises(UserError, match="not step-distilled"):
        load_family(str(base))


def test_edit_prompts_cut_by_the_pipeline_are_warned(tmp_path, tiny_klein_dir, demo_images):
    """The edit teacher's prompt is the caption plus the instruction: it can pass the limit alone."""
    cfg = make_cfg(tmp_path, tiny_klein_dir, demo_images)  # cpu-demo: max_sequence_length 64
    family = load_family(str(tiny_klein_dir))
    caption = " ".join(["a red ball"] * 9)
    prompts = [caption, edit_prompt(caption, cfg.edit_instruction)]
    counts = family.prompt_token_counts(prompts)
    seen = []  # the tokens the pipeline's own encoding keeps (its attention mask)
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein_dir, transformer=None, vae=None, dtype=torch.float32)
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda mod, args, kw: seen.extend(kw["attention_mask"].sum(1).tolist()), with_kwargs=True)
    with torch.no_grad():
        pipe.encode_prompt(prompt=prompts, device=CPU, max_sequence_length=cfg.max_sequence_length)
    hook.remove()
    assert seen == [min(n, cfg.max_sequence_length) for n in counts] and counts[0] <= 64 < counts[1], (seen, counts)
    (warning,) = family.prompt_warnings([caption], ["dog.txt"], "edit", cfg)
    assert warning.startswith("1 of 1 edit-teacher prompts") and "dog.txt" in warning
    assert family.prompt_warnings([caption], ["dog.txt"], "vlm", cfg) == []
