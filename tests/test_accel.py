"""The speed levers of accel.py on the tiny Z-Image, against the eager model they replace.

Compilation runs dynamo's `aot_eager` backend here: the graph capture, the graph breaks at the 8-bit and LoRA
linears, checkpointing's recomputation and the guards that decide recompilation are what the CPU can check
in seconds (inductor's code generation takes minutes on 2 cores; its numerics are checked on a GPU by
benchmarks/gpu_next.sh stage 13, which compares the compiled step's losses with the eager ones).
"""
from collections import Counter

import pytest
import torch

from lowvram_dopsd import accel
from lowvram_dopsd.config import load_config
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.families import load_family
from lowvram_dopsd.lora import DualLoRA
from lowvram_dopsd.train import rollout_and_learn

CPU = torch.device("cpu")


def _model(tiny_zimage_dir, **overrides):
    """The tiny Z-Image as the trainer loads it (8-bit base by default), a LoRA whose student and teacher
    sets differ, the 8-bit layers on the fused kernel's path (its torch reference on the CPU)."""
    family = load_family(str(tiny_zimage_dir))
    cfg = load_config("cpu-demo", {"quant": "qint8", "grad_checkpointing": True, **overrides})
    model = family.load_transformer(cfg, CPU, torch.float32)
    lora = DualLoRA.attach(model, family.lora_targets, cfg.rank, cfg.alpha, seed=0)
    lora.enable_fused_kernels("off", kernels="off")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.student_B.copy_(torch.randn(layer.student_B.shape, generator=gen) * 0.05)
            layer.teacher_B.copy_(torch.randn(layer.teacher_B.shape, generator=gen) * 0.05)
    return family, model, lora


def _conds(text: int, seed: int) -> list[dict]:
    return [{"cap": torch.randn(text, 32, generator=torch.Generator().manual_seed(seed))}]


# two buckets whose padded token counts differ (Z-Image pads image and caption tokens to multiples of 32)
BUCKETS = [(64, 64), (96, 128)]


def _run(family, model, lora, bucket: tuple[int, int]) -> tuple[list[float], list[torch.Tensor]]:
    """A one-state roll-out at this size learning toward the EMA teacher (a longer condition), then one toward
    the bare base (the prior roll-outs' target): the three LoRA switch positions. Losses, LoRA gradients."""
    h, w = bucket
    noise = torch.randn((1, *family.latent_shape(h, w)), generator=torch.Generator().manual_seed(h))
    losses = []
    for teacher in ("teacher", None):
        losses += rollout_and_learn(family, model, lora, noise, family.sigmas(h, w, 1), _conds(10, 0), _conds(40, 1),
                                    {0}, "x0", loss_scale=1.0, teacher=teacher)[0]
    grads = [p.grad.clone() for p in lora.student_parameters()]
    for p in lora.student_parameters():
        p.grad = None
    return losses, grads


def test_compiled_blocks_equal_eager_and_compile_at_most_once_per_bucket(tiny_zimage_dir):
    """torch_compile = 'blocks' with the 8-bit base on the fused path, checkpointing, the student / teacher /
    bare-base switch and two buckets: the losses and gradients of eager (rtol 1e-5); the second bucket
    compiles at most what the first did (dynamo's dynamic shapes), and nothing compiles once both were seen,
    so a run compiles at most (buckets x one bucket's graphs)."""
    family, model, lora = _model(tiny_zimage_dir)
    eager = [_run(family, model, lora, b) for b in BUCKETS]

    torch._dynamo.reset()
    try:
        assert accel.compile_blocks(model, backend="aot_eager") == 4  # 2 layers + 2 refiners
        counts, compiled = [accel.compiled_graphs()], []
        for bucket in BUCKETS * 2:
            compiled.append(_run(family, model, lora, bucket))
            counts.append(accel.compiled_graphs())
    finally:
        torch._dynamo.reset()
    per_bucket = [b - a for a, b in zip(counts, counts[1:])]
    assert per_bucket[0] > 0 and per_bucket[1] <= per_bucket[0] and per_bucket[2:] == [0, 0], per_bucket
    for (losses, grads), (eager_losses, eager_grads) in zip(compiled, eager * 2):
        assert losses == pytest.approx(eager_losses, rel=1e-5)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)
        assert sum(g.abs().sum() for g in eager_grads) > 0


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(UserError, match="_repeated_blocks"):
        accel.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_attention_kernel_is_recorded_per_pass_and_the_backend_can_be_chosen(tiny_zimage_dir):
    """The record names the SDPA kernel of the teacher's and the student's passes; forcing diffusers' math
    backend changes the recorded kernel, not the velocities (rtol 1e-5) nor the gradients, and leaves the
    process-wide default backend as it was."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    family, model, lora = _model(tiny_zimage_dir, quant="none")
    x = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(0))
    sigma = family.sigmas(64, 64, 2)[0]
    c_s, c_t = _conds(10, 0), _conds(40, 1)

    def student() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with lora.use("student"):
            v = family.velocity(model, x, sigma, c_s)
            v.pow(2).mean().backward()
        grads = [p.grad.clone() for p in lora.student_parameters()]
        for p in lora.student_parameters():
            p.grad = None
        return v.detach(), grads

    default = accel.probe_attention(family, model, lora, x, sigma, c_s, c_t)
    # 4 blocks, one attention each, in each pass; on the CPU SDPA picks its flash kernel for these inputs
    assert default["backend"] == ["native"]
    assert default["teacher"] == default["student"] == {accel._sdp_kernel(*_sdpa_args()): 4}
    v0, g0 = student()

    active = _AttentionBackendRegistry._active_backend
    accel.set_attention_backend(model, "_native_math")
    try:
        assert _AttentionBackendRegistry._active_backend == active
        forced = accel.probe_attention(family, model, lora, x, sigma, c_s, c_t)
        assert forced == {"backend": ["_native_math"], "teacher": {"math": 4}, "student": {"math": 4}}
        v1, g1 = student()
    finally:
        accel.set_attention_backend(model, "native")
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert "native backend; teacher: " in accel.describe_attention(default)


def _sdpa_args():
    q = torch.randn(1, 2, 64, 32)
    return (q, q, q), {}


def test_attention_backend_that_cannot_run_says_what_to_do(tiny_zimage_dir, monkeypatch):
    from diffusers.models import attention_dispatch

    family, model, lora = _model(tiny_zimage_dir, quant="none")
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", False)  # as without the flash-attn package
    with pytest.raises(UserError, match=r"'flash' cannot run here: .*flash-attn.* attention_backend = ''"):
        accel.set_attention_backend(model, "flash")
    with pytest.raises(UserError) as refused:  # diffusers' sentence ends in a period: one, not two
        accel.set_attention_backend(model, "flash")
    assert ".." not in str(refused.value) and "(--set attention_backend=," in str(refused.value)


def test_eight_bit_attention_is_refused_and_keep_blocks_checked():
    with pytest.raises(UserError, match="8-bit attention.*not been measured"):
        load_config("cpu-demo", {"attention_backend": "sage"})
    with pytest.raises(UserError, match="must be one of"):
        load_config("cpu-demo", {"attention_backend": "xformerz"})
    with pytest.raises(UserError, match="keep_blocks.*'auto' or a whole number"):
        load_config("cpu-demo", {"keep_blocks": "some"})
    assert load_config("cpu-demo", {"keep_blocks": 3, "grad_checkpointing": True}).keep_blocks == "3"
    assert load_config("cpu-demo").attention_backend == "" and load_config("cpu-demo").torch_compile == "off"


def test_kept_blocks_run_once_and_give_the_checkpointed_gradients(tiny_zimage_dir):
    """keep_blocks: the kept blocks are not recomputed in the backward (one forward each instead of two) and
    the gradients are those of full checkpointing, exactly."""
    family, model, lora = _model(tiny_zimage_dir, quant="none")
    x = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(0))
    sigma = family.sigmas(64, 64, 2)[0]
    calls: Counter = Counter()
    for name in ("layers", "noise_refiner", "context_refiner"):
        for i, block in enumerate(getattr(model, name)):
            block.register_forward_pre_hook(lambda m, a, key=f"{name}.{i}": calls.update([key]))

    def grads() -> list[torch.Tensor]:
        calls.clear()
        with lora.use("student"):
            family.velocity(model, x, sigma, _conds(10, 0)).pow(2).mean().backward()
        out = [p.grad.clone() for p in lora.student_parameters()]
        for p in lora.student_parameters():
            p.grad = None
        return out

    every = grads()
    assert set(calls.values()) == {2}  # checkpointed: forward, then again in the backward
    assert accel.keep_activations(model, {"layers": 1, "noise_refiner": 1}) == 2
    kept = grads()
    assert calls == {"layers.0": 2, "layers.1": 1, "noise_refiner.0": 1, "context_refiner.0": 2}
    for a, b in zip(kept, every):
        assert torch.equal(a, b)
    model.disable_gradient_checkpointing()
    with pytest.raises(UserError, match="grad_checkpointing = false"):
        accel.keep_activations(model, {"layers": 1})


def test_kept_blocks_of_a_block_list_inside_a_module_dict(tiny_flux3_dir):
    """FLUX.3's per-mode blocks live in a ModuleDict ("mode_blocks.image", as the planner names them): kept
    ones run once, the others twice, and the gradients are full checkpointing's."""
    family = load_family(str(tiny_flux3_dir))
    cfg = load_config("cpu-demo", {"model": str(tiny_flux3_dir), "quant": "none", "grad_checkpointing": True})
    model = family.load_transformer(cfg, CPU, torch.float32)
    lora = DualLoRA.attach(model, family.lora_targets, cfg.rank, cfg.alpha, seed=0)
    c_s, _ = family.random_conditions(family.teachers[0], cfg, CPU, torch.float32)
    x = torch.randn((1, *family.latent_shape(64, 64)), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.5)
    calls: Counter = Counter()
    for name in ("txt_mode_blocks", "mode_blocks.image", "single_transformer_blocks"):
        for i, block in enumerate(model.get_submodule(name)):
            block.register_forward_pre_hook(lambda m, a, key=f"{name}.{i}": calls.update([key]))

    def grads() -> list[torch.Tensor]:
        calls.clear()
        with lora.use("student"):
            family.velocity(model, x, sigma, [c_s], sigma_next=sigma / 2).pow(2).mean().backward()
        out = [p.grad.clone() for p in lora.student_parameters()]
        for p in lora.student_parameters():
            p.grad = None
        return out

    every = grads()
    assert any(g.abs().sum() > 0 for g in every)
    assert accel.keep_activations(model, {"mode_blocks.image": 1}) == 1
    kept = grads()
    assert calls["mode_blocks.image.0"] == 1 and calls["txt_mode_blocks.0"] == 2, calls
    for a, b in zip(kept, every):
        assert torch.equal(a, b)


def test_keep_blocks_without_gradient_checkpointing_is_refused_not_ignored(capsys):
    """cpu-demo checkpoints nothing: --set keep_blocks=3 trained as if unset, without a word. It is refused
    with the settings, before anything loads; following the advice (checkpointing on) keeps the blocks."""
    from lowvram_dopsd.cli import main

    cpu = torch.device("cpu")
    with pytest.raises(UserError, match=r"which is off in this run .* --set grad_checkpointing=true\.$"):
        load_config("cpu-demo", {"keep_blocks": "3"})
    assert main(["plan", "--preset", "cpu-demo", "--set", "keep_blocks=auto"]) == 2
    assert "--set grad_checkpointing=true" in capsys.readouterr().err
    cfg = load_config("cpu-demo", {"keep_blocks": "3", "grad_checkpointing": "true"})
    assert sum(accel.kept_blocks(cfg, "cpu-demo", cpu).values()) == 3
