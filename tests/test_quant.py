"""8-bit frozen base (quant.py): roll-out parity with the bf16 base, LoRA on quantized layers, frugal loading.

A tiny `ZImageTransformer2DModel` is built here from a tiny config (the real class, random weights);
the roll-out is the family's own sampler (`ZImage.sigmas` / `ZImage.velocity`, Euler steps as in
`train.rollout_and_learn`). Tolerances are relative L2 errors of the final latents against the same
roll-out on the bf16 base (4 Euler steps, 64x64). Measured on this model over seeds 1-3:
  qint8 (per-channel int8 weights)                      1.1-1.3 %   bound 3 %
  qfloat8 (e4m3 weights, 3 mantissa bits)               3.5-4.0 %   bound 8 %
  bnb-int8 (LLM.int8(): int8 weights AND activations)   1.0-1.3 %   bound 3 %
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("diffusers")
from diffusers import ZImageTransformer2DModel  # noqa: E402

from lowvram_dopsd.families.zimage import ZImage  # noqa: E402
from lowvram_dopsd.lora import DualLoRA  # noqa: E402
from lowvram_dopsd.quant import load_frugal, quantize_frozen, storage_bytes  # noqa: E402

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TINY = {"all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
        "cap_feat_dim": 64, "dim": 256, "in_channels": 16, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2,
        "n_refiner_layers": 1, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0}
SKIP = ("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer")
BOUNDS = {"qint8": 0.03, "qfloat8": 0.08, "bnb-int8": 0.03}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = ZImageTransformer2DModel(**TINY)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.05)
    return m.to(torch.bfloat16).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A Z-Image folder with the published scheduler/VAE configs and the tiny transformer config."""
    from importlib import resources

    root = tmp_path_factory.mktemp("zimage")
    src = resources.files("lowvram_dopsd") / "published" / "Tongyi-MAI--Z-Image-Turbo"
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text((src / rel).read_text())
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", **TINY}))
    return ZImage(root, "tiny")


@pytest.fixture(scope="module")
def base():
    return tiny_model()


def rollout(family, model, steps=4, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *family.latent_shape(size, size)), generator=g)
    cond = [{"cap": torch.randn(24, TINY["cap_feat_dim"], generator=g, dtype=torch.bfloat16)}]
    sigmas = family.sigmas(size, size, steps)
    with torch.no_grad():
        for k in range(steps):
            v = family.velocity(model, x, sigmas[k], cond)
            x = x + (sigmas[k + 1] - sigmas[k]) * v
    return x


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_quantized_rollout_matches_bf16(family, base, kind):
    ref = rollout(family, base)
    q = quantize_frozen(copy.deepcopy(base), kind, SKIP)
    out = rollout(family, q)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all()
    assert rel < BOUNDS[kind], f"{kind}: relative error {rel:.4f} over the bound {BOUNDS[kind]}"
    assert rel > 0  # it really ran quantized


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_lora_wraps_quantized_layers_and_gets_gradients(family, base, kind):
    q = quantize_frozen(copy.deepcopy(base), kind, SKIP)
    lora = DualLoRA.attach(q, ZImage.lora_targets, rank=4, alpha=8)
    # every targeted linear is wrapped, and what it wraps is the 8-bit layer (a Linear subclass)
    assert len(lora.layers) == 7 * (TINY["n_layers"] + 2 * TINY["n_refiner_layers"])
    for layer in lora.layers.values():
        assert isinstance(layer.base, nn.Linear) and type(layer.base) is not nn.Linear
    with torch.no_grad():  # B = 0 at init gives A no gradient; make the LoRA non-trivial
        for layer in lora.layers.values():
            layer.student_B.normal_(0, 0.01)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((1, *family.latent_shape(64, 64)), generator=g)
    cond = [{"cap": torch.randn(24, TINY["cap_feat_dim"], generator=g, dtype=torch.bfloat16)}]
    v = family.velocity(q, x, torch.tensor(0.7), cond)
    v.pow(2).mean().backward()
    for name, layer in lora.layers.items():
        for p in (layer.student_A, layer.student_B):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in q.named_parameters() if "student_" not in n)


@pytest.mark.parametrize("kind", ["none", "qint8", "bnb-int8"])
@pytest.mark.parametrize("sharded", [False, True])
def test_frugal_loading_equals_load_then_quantize(tmp_path, base, kind, sharded):
    folder = tmp_path / "transformer"
    base.save_pretrained(folder, max_shard_size="300KB" if sharded else "10GB")
    assert (len(list(folder.glob("*.safetensors"))) > 1) == sharded
    ref = quantize_frozen(ZImageTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16), kind, SKIP)
    got = load_frugal(ZImageTransformer2DModel, folder, torch.device("cpu"), torch.bfloat16, kind, SKIP)
    assert storage_bytes(got) == storage_bytes(ref)
    assert not any(t.is_meta for t in list(got.parameters()) + list(got.buffers()))
    assert not any(p.requires_grad for p in got.parameters())
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(16, 1, 8, 8, generator=g, dtype=torch.bfloat16)]
    cap = [torch.randn(24, TINY["cap_feat_dim"], generator=g, dtype=torch.bfloat16)]
    with torch.no_grad():
        a = ref.eval()(x, torch.tensor([0.5]), cap, return_dict=False)[0][0].float()
        b = got.eval()(x, torch.tensor([0.5]), cap, return_dict=False)[0][0].float()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-2 if kind == "bnb-int8" else 0)


def test_frugal_loading_reads_the_file_from_pretrained_reads(tmp_path, base, monkeypatch):
    """A full download holds the weights and their fp16 variant side by side; the loader reads the file
    from_pretrained reads, block by block (it used to see two files and load the whole model)."""
    folder = tmp_path / "transformer"
    base.save_pretrained(folder)
    variant = {k: torch.zeros_like(v, dtype=torch.float16) for k, v in base.state_dict().items()}
    save_file(variant, str(folder / "diffusion_pytorch_model.fp16.safetensors"))

    def whole_model(*args, **kwargs):
        raise AssertionError("load_frugal fell back to from_pretrained")
    monkeypatch.setattr(ZImageTransformer2DModel, "from_pretrained", whole_model)
    got = load_frugal(ZImageTransformer2DModel, folder, torch.device("cpu"), torch.bfloat16, "none", SKIP)
    for k, v in base.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def test_quantize_keeps_skipped_layers_in_compute_dtype(base):
    q = quantize_frozen(copy.deepcopy(base), "qint8", SKIP)
    for name, m in q.named_modules():
        if isinstance(m, nn.Linear):
            skipped = any(name.startswith(s + ".") or name == s for s in SKIP)
            assert (type(m) is nn.Linear) == skipped, name
            if skipped:
                assert m.weight.dtype == torch.bfloat16


def test_bnb_int8_is_a_config_choice():
    from lowvram_dopsd.config import CHOICES, load_config

    assert "bnb-int8" in CHOICES["quant"]
    assert load_config(None, {"quant": "bnb-int8"}).quant == "bnb-int8"


def test_fused_linear_dispatch(monkeypatch):
    """kernels = "auto" puts 8-bit layers on the fused kernel on CUDA only; "on"/"off" force it."""
    from lowvram_dopsd.kernels import utils
    from lowvram_dopsd.quant import use_fused_linear

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(utils, "kernels_available", lambda device=None: True)  # as on a GPU with Triton
    assert use_fused_linear(cuda, "auto") and not use_fused_linear(cpu, "auto")
    assert not use_fused_linear(cuda, "off")
    assert use_fused_linear(cpu, "on")
    monkeypatch.setattr(utils, "kernels_available", lambda device=None: False)  # no Triton / no GPU
    assert not use_fused_linear(cuda, "auto")
    assert use_fused_linear(cuda, "on")  # forced: the kernel then says why it cannot run


def test_act_quant_values_are_the_kernels():
    """config.py names the values without importing the kernels (the CLI starts without torch)."""
    from lowvram_dopsd.config import CHOICES
    from lowvram_dopsd.kernels.lora_linear import ACT_QUANT

    assert CHOICES["act_quant"] == ACT_QUANT
