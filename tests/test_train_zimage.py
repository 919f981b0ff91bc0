"""The spine on a tiny Z-Image checkpoint, checked against the stock diffusers ZImagePipeline."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import ZImagePipeline
from safetensors import safe_open

from lowvram_dopsd.config import load_config
from lowvram_dopsd.families import load_family
from lowvram_dopsd.lora import DualLoRA
from lowvram_dopsd.train import rollout_and_learn, train
from rollout_helpers import assert_per_step_backward_equals_summed

CPU = torch.device("cpu")
PROMPT = "a photo of sks ball on the beach"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_cfg(tmp_path, model_dir, vlm_dir, images, **over):
    base = dict(model=str(model_dir), teacher_encoder=str(vlm_dir), images=str(images),
                output=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), steps=3, save_every=100)
    base.update({k: str(v) for k, v in over.items()})
    return load_config("cpu-demo", base)


def student_rollout(family, model, lora, cond, noise, steps):
    sigmas = family.sigmas(64, 64, steps)
    with torch.no_grad():
        _, x = rollout_and_learn(family, model, lora, noise.clone(), sigmas, [cond], [cond], set(), "velocity", 1.0)
    return x


def pipeline_latents(model_dir, noise, steps, lora_dir=None):
    pipe = ZImagePipeline.from_pretrained(model_dir, dtype=torch.float32)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    return pipe(PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=0.0,
                latents=noise.clone(), output_type="latent").images


@pytest.mark.parametrize("steps", [4, 8])
def test_zero_lora_rollout_equals_stock_pipeline(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, steps):
    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images)
    family = load_family(str(tiny_zimage_dir))
    (cond,) = family.encode_student([PROMPT], cfg, CPU)
    model = family.load_transformer(cfg, CPU, torch.float32)
    lora = DualLoRA.attach(model, family.lora_targets, rank=4, alpha=8.0)
    noise = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(7))
    ours = student_rollout(family, model, lora, cond, noise, steps)
    ref = pipeline_latents(tiny_zimage_dir, noise, steps)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(noise, ref) > 0.05  # the roll-out moved: not a vacuous comparison


@pytest.mark.parametrize("loss_kind,ckpt", [("velocity", False), ("x0", True)])
def test_per_step_backward_equals_one_backward_of_the_summed_loss(tmp_path, tiny_zimage_dir, tiny_vlm_dir,
                                                                   demo_images, loss_kind, ckpt):
    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, grad_checkpointing=ckpt)
    family = load_family(str(tiny_zimage_dir))
    c_s, c_t = family.encode_student([PROMPT, "a red ball, studio photo, detailed"], cfg, CPU)
    model = family.load_transformer(cfg, CPU, torch.float32)
    assert model.gradient_checkpointing == ckpt
    lora = DualLoRA.attach(model, family.lora_targets, rank=4, alpha=8.0)
    torch.manual_seed(0)
    noise = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(1))
    assert_per_step_backward_equals_summed(family, model, lora, c_s, c_t, noise, family.sigmas(64, 64, 4),
                                           loss_kind)


@pytest.mark.parametrize("lora_init", ["gaussian", "kaiming"])
def test_trained_lora_loads_in_stock_pipeline_and_reproduces_the_student(tmp_path, tiny_zimage_dir, tiny_vlm_dir,
                                                                        demo_images, lora_init):
    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, steps=3, lr=5e-3, rank=4, alpha=16,
                   **({} if lora_init == "gaussian" else {"lora_init": lora_init}))
    base_family = load_family(str(tiny_zimage_dir))
    base_before = {k: v.clone() for k, v in base_family.load_transformer(cfg, CPU, torch.float32).state_dict().items()}
    result = train(cfg)
    assert result.lora_path.name == "pytorch_lora_weights.safetensors"
    # the LoRA init the run asked for (default: the authors' "gaussian", A ~ N(0, 1/rank²); "kaiming":
    # uniform, std 1/sqrt(3 in)). 3 steps at lr 5e-3 move A by ~0.015 per element against a std of 0.25
    # (gaussian) or ~0.07 (kaiming, these in_features), so the trained A still shows its init
    assert cfg.lora_init == lora_init
    for init, unit in (("gaussian", lambda layer: cfg.rank), ("kaiming", lambda layer: (3 * layer.in_features) ** 0.5)):
        z = torch.cat([layer.student_A.detach().flatten() * unit(layer) for layer in result.lora.layers.values()])
        assert (abs(z.std().item() - 1) < 0.1) == (init == lora_init), (init, z.std())
    with safe_open(str(result.lora_path), framework="pt") as fh:
        assert json.loads(fh.metadata()["lowvram_dopsd"])["lora_init"] == lora_init

    # the frozen base was never modified
    for name, module in result.model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if "student_" in pname:
                continue
            key = (f"{name}.{pname}" if name else pname).replace(".base.", ".")
            assert torch.equal(param, base_before[key]), key

    (cond,) = result.family.encode_student([PROMPT], cfg, CPU)
    noise = torch.randn((1, *result.family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(3))
    ours = student_rollout(result.family, result.model, result.lora, cond, noise, 8)
    loaded = pipeline_latents(tiny_zimage_dir, noise, 8, lora_dir=result.lora_path.parent)
    stock = pipeline_latents(tiny_zimage_dir, noise, 8)
    assert rel_err(ours, loaded) < 1e-5
    assert rel_err(stock, loaded) > 1e-3  # the LoRA learned something, and alpha/rank (4x) was applied


def test_cache_second_run_reencodes_nothing_and_a_changed_caption_only_its_item(tmp_path, tiny_zimage_dir,
                                                                             tiny_vlm_dir, demo_images):
    images = tmp_path / "images"
    shutil.copytree(demo_images, images)
    n = len(list(images.glob("*.png")))
    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, images, steps=1)
    first = train(cfg).cache
    assert (first.hits, first.misses) == (0, 2 * n)
    second = train(cfg).cache
    assert (second.hits, second.misses) == (2 * n, 0)
    txt = sorted(images.glob("*.txt"))[0]
    txt.write_text("a photo of sks ball on a red carpet, studio light")
    third = train(cfg).cache
    assert (third.hits, third.misses) == (2 * n - 2, 2)  # its student and its teacher condition


def test_teacher_condition_sees_the_image(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images):
    from lowvram_dopsd.data import scan

    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images)
    family = load_family(str(tiny_zimage_dir))
    ds = scan(str(demo_images), "", "", 64)
    (c_s,) = family.encode_student([ds.items[0].caption], cfg, CPU)
    c_t0, c_t1 = family.encode_teacher(ds.items[:2], "vlm", cfg, CPU)
    assert c_t0["cap"].shape[1] == c_s["cap"].shape[1]  # same feature space as the student's encoder
    assert c_t0["cap"].shape[0] > c_s["cap"].shape[0]  # image tokens are in the teacher's context
    # the same caption with another image gives another condition
    items = [ds.items[0], ds.items[1]]
    items[1].caption = items[0].caption
    a, b = family.encode_teacher(items, "vlm", cfg, CPU)
    assert not torch.equal(a["cap"], b["cap"])


def test_prompt_token_counts_are_what_the_pipeline_keeps_and_long_captions_are_warned(tmp_path, tiny_zimage_dir,
                                                                                       tiny_vlm_dir, demo_images):
    """ZImagePipeline keeps min(count, max_sequence_length) tokens: our count says which captions it cuts."""
    from transformers import AutoModel, AutoTokenizer

    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images)  # cpu-demo: max_sequence_length 64
    family = load_family(str(tiny_zimage_dir))
    captions = [PROMPT, " ".join(["a red ball"] * 12), " ".join(["on a sunny beach with a dog"] * 9)]
    counts = family.prompt_token_counts(captions)
    pipe = ZImagePipeline(scheduler=None, vae=None, transformer=None,
                          text_encoder=AutoModel.from_pretrained(tiny_zimage_dir / "text_encoder"),
                          tokenizer=AutoTokenizer.from_pretrained(tiny_zimage_dir / "tokenizer"))
    with torch.no_grad():
        kept = [e.shape[0] for e in pipe._encode_prompt(prompt=list(captions), device=CPU,
                                                        max_sequence_length=cfg.max_sequence_length)]
    assert kept == [min(n, cfg.max_sequence_length) for n in counts] and counts[0] < 64 < counts[2], (kept, counts)
    warnings = family.prompt_warnings(captions, ["a.txt", "b.txt", "c.txt"], "vlm", cfg)
    n_cut = sum(n > cfg.max_sequence_length for n in counts)
    assert len(warnings) == 1 and warnings[0].startswith(f"{n_cut} of 3 caption prompts") and "c.txt" in warnings[0]
    assert warnings[0].endswith("--set max_sequence_length=512 (the pipeline's default).")  # the setting has no flag
    assert family.prompt_warnings(captions, ["a.txt", "b.txt", "c.txt"], "vlm",
                                  replace(cfg, max_sequence_length=512)) == []  # the advice followed
    assert family.prompt_warnings(captions[:1], ["a.txt"], "vlm", cfg) == []


def test_a_prior_rollout_learns_toward_the_bare_base_model(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images):
    """rollout_and_learn(teacher=None): the target is the base without any LoRA, not the EMA teacher."""
    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images)
    family = load_family(str(tiny_zimage_dir))
    (c,) = family.encode_student(["a red ball in space"], cfg, CPU)
    model = family.load_transformer(cfg, CPU, torch.float32)
    lora = DualLoRA.attach(model, family.lora_targets, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(3)
    for layer in lora.layers.values():  # student, EMA teacher and base: three different models
        layer.student_B.data.normal_(0, 0.05, generator=g)
        layer.teacher_B.copy_(-layer.student_B.data)  # the teacher's LoRA term is the student's negated
    x = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(4))
    sigmas = family.sigmas(64, 64, 4)
    (loss,), _ = rollout_and_learn(family, model, lora, x.clone(), sigmas, [c], [c], {0}, "velocity", 1.0,
                                   teacher=None)
    with torch.no_grad():
        v = {}
        for role in ("student", None, "teacher"):
            with lora.use(role):
                v[role] = family.velocity(model, x, sigmas[0], [c])
    assert loss == pytest.approx(((v["student"] - v[None]) ** 2).mean().item(), rel=1e-5)
    assert abs(loss - ((v["student"] - v["teacher"]) ** 2).mean().item()) > 0.1 * loss  # not the EMA teacher
    # prior_weight = 0 measures the same loss without a graph or a backward (no .grad at all)
    for p in lora.student_parameters():
        p.grad = None
    (measured,), _ = rollout_and_learn(family, model, lora, x.clone(), sigmas, [c], [c], {0}, "velocity", 0.0,
                                       teacher=None)
    assert measured == pytest.approx(loss, rel=1e-6)
    assert all(p.grad is None for p in lora.student_parameters())


def test_prior_prompts_keep_the_student_near_the_base_on_them(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images):
    """Trained on the demo's 'sks ball' with a high lr, the LoRA moves the model on a prompt without the
    trigger; with that prompt among prior_prompts it moves half as far (measured: 0.21 vs 0.10)."""
    prompt = "a red ball in space"

    def moved(tag, **over):
        cfg = make_cfg(tmp_path / tag, tiny_zimage_dir, tiny_vlm_dir, demo_images, steps=8, lr=1e-2,
                       rollout_steps=2, cache_dir=tmp_path / "cache", **over)
        r = train(cfg)
        (c,) = r.family.encode_student([prompt], cfg, CPU)
        x = torch.randn((4, *r.family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(5))
        sigma = r.family.sigmas(64, 64, 2)[0]
        with torch.no_grad():
            with r.lora.use("student"):
                v_s = r.family.velocity(r.model, x, sigma, [c] * 4)
            with r.lora.use(None):
                v_b = r.family.velocity(r.model, x, sigma, [c] * 4)
        return rel_err(v_s, v_b)

    free, kept = moved("off"), moved("prior", prior_prompts=f"{prompt}|a ball on grass")
    assert free > 0.1  # the LoRA does move this prompt: not a vacuous comparison
    assert kept < 0.7 * free


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records the tensor methods that make the host wait for the GPU (on CUDA they synchronise)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.cpu, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_rollout_reads_its_losses_once(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images):
    """The losses of all trained states come back in one read after the roll-out, not one `.item()` per
    state: on a GPU each read waits for the queue to drain, and the host could not queue the next pass
    while the GPU runs this one (benchmarks/results/profile-host-*.md)."""
    cfg = make_cfg(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images)
    family = load_family(str(tiny_zimage_dir))
    (c,) = family.encode_student(["a red ball in space"], cfg, CPU)
    model = family.load_transformer(cfg, CPU, torch.float32)
    lora = DualLoRA.attach(model, family.lora_targets, rank=4, alpha=8.0)
    x = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(4))
    sigmas = family.sigmas(64, 64, 4)
    with _HostReads() as reads:
        losses, _ = rollout_and_learn(family, model, lora, x, sigmas, [c], [c], {0, 1, 3}, "x0", 1.0)
    assert len(losses) == 3 and all(isinstance(v, float) for v in losses)
    assert reads.calls == ["tolist"], reads.calls
