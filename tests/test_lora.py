import pytest
import torch
from torch import nn

from lowvram_dopsd.lora import DualLoRA, names_target


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"to_q": nn.Linear(6, 5), "other": nn.Linear(5, 5)})

    def forward(self, x):
        return self.block["other"](self.block["to_q"](x))


def test_attach_targets_and_zero_init_is_the_base():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 6)
    ref = model(x)
    lora = DualLoRA.attach(model, ["to_q"], rank=2, alpha=4.0)
    assert list(lora.layers) == ["block.to_q"]
    assert torch.equal(model(x), ref)  # B = 0 at init
    assert all(not p.requires_grad for n, p in model.named_parameters() if "student" not in n)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "block.to_q.student_A", "block.to_q.student_B"}


def test_a_star_in_a_target_is_one_whole_name_part():
    assert names_target("layers.3.attention.to_q", "attention.to_q")                     # plain suffix
    assert not names_target("layers.3.cross_attention.to_q", "attention.to_q")           # whole parts only
    assert names_target("mode_blocks.image.0.attn.to_q", "mode_blocks.image.*.attn.to_q")
    assert names_target("x.mode_blocks.image.12.attn.to_q", "mode_blocks.image.*.attn.to_q")
    assert not names_target("mode_blocks.image_cond.0.attn.to_q", "mode_blocks.image.*.attn.to_q")
    assert not names_target("mode_blocks.image.0.attn.to_q.x", "mode_blocks.image.*.attn.to_q")
    assert not names_target("image.0.attn.to_q", "mode_blocks.image.*.attn.to_q")       # too short


def test_switch_selects_the_set_and_scale_is_alpha_over_rank():
    torch.manual_seed(0)
    model = Toy()
    lora = DualLoRA.attach(model, ["to_q"], rank=2, alpha=4.0)
    layer = lora.layers["block.to_q"]
    with torch.no_grad():
        layer.student_B.normal_()
    x = torch.randn(3, 6)
    base = layer.base(x)
    expect = base + 2.0 * (x @ layer.student_A.t()) @ layer.student_B.t()
    with lora.use("student"):
        assert torch.allclose(layer(x), expect, atol=1e-6)
    with lora.use("teacher"):
        assert torch.allclose(layer(x), base)  # teacher B still 0
    with lora.use(None):
        assert torch.equal(layer(x), base)


def test_seeded_init_is_a_function_of_the_seed_alone():
    """attach(seed=s) draws A from its own generator, on the CPU: whatever drew from the global RNG
    before (the trainer's encoders on a cold feature cache) does not change the starting LoRA."""
    inits = []
    for seed, draws in ((3, 0), (3, 5), (4, 0)):
        torch.manual_seed(0)
        torch.rand(draws)
        lora = DualLoRA.attach(Toy(), ["to_q", "other"], rank=3, alpha=3.0, seed=seed)
        inits.append([t.clone() for t in lora.student_parameters()])
        assert all(torch.equal(lora.layers[n].teacher_A, lora.layers[n].student_A) for n in lora.layers)
    assert all(torch.equal(a, b) for a, b in zip(inits[0], inits[1]))
    assert not torch.equal(inits[0][0], inits[2][0])


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_init_draws_A_as_peft_does(init):
    """lora_init = "gaussian" is peft's init_lora_weights="gaussian" (the authors' LoraConfig), "kaiming"
    peft's default (init_lora_weights=True): A has the same distribution as the A peft makes for that
    option, and not the other's (at in_features 512, rank 64 they differ 1.4x in scale)."""
    from peft import LoraConfig, get_peft_model

    def a_of(cfg_init):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(512, 96))
        peft_model = get_peft_model(net, LoraConfig(r=64, lora_alpha=128, target_modules=["0"],
                                                    init_lora_weights=cfg_init))
        return next(p for n, p in peft_model.named_parameters() if "lora_A" in n).detach()

    peft_a = {"gaussian": a_of("gaussian"), "kaiming": a_of(True)}
    ours = DualLoRA.attach(nn.Sequential(nn.Linear(512, 96)), ["0"], rank=64, alpha=128.0, seed=0, init=init)
    a = ours.layers["0"].student_A.detach()
    assert torch.equal(ours.layers["0"].student_B, torch.zeros(96, 64))
    other = "kaiming" if init == "gaussian" else "gaussian"
    # std of 32768 draws is within ~0.4% of the true one; the two options' stds are 1/64 = 0.0156 and
    # 1/sqrt(3 * 512) = 0.0255, and only kaiming's draws are bounded (by 1/sqrt(512) = 0.0442)
    assert abs(a.std() / peft_a[init].std() - 1) < 0.03
    assert abs(a.std() / peft_a[other].std() - 1) > 0.3
    bounded = a.abs().max() <= 512 ** -0.5
    assert bounded == (init == "kaiming") == bool(peft_a[init].abs().max() <= 512 ** -0.5)


def test_ema_formula_and_base_untouched():
    torch.manual_seed(0)
    model = Toy()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = DualLoRA.attach(model, ["to_q", "other"], rank=3, alpha=3.0)
    layer = lora.layers["block.other"]
    with torch.no_grad():
        for p in lora.student_parameters():
            p.normal_()
    t_A, s_A = layer.teacher_A.clone(), layer.student_A.clone()
    lora.ema_update(0.9)
    assert torch.allclose(layer.teacher_A, 0.9 * t_A + 0.1 * s_A)
    assert torch.allclose(layer.teacher_B, 0.1 * layer.student_B)  # teacher B started at 0
    lora.ema_update(0.0)  # decay 0 copies the student exactly (the toy's student-copy ablation)
    assert torch.equal(layer.teacher_A, layer.student_A) and torch.equal(layer.teacher_B, layer.student_B)
    for name, value in base_before.items():
        mod, _, leaf = name.rpartition(".")
        assert torch.equal(model.get_submodule(mod).base.get_parameter(leaf), value)


def test_teacher_gets_no_gradient_and_load_roundtrip():
    torch.manual_seed(0)
    model = Toy()
    lora = DualLoRA.attach(model, ["to_q"], rank=2, alpha=2.0)
    x = torch.randn(2, 6, requires_grad=True)
    with lora.use("teacher"):
        model(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in lora.student_parameters())
    layer = lora.layers["block.to_q"]
    assert not layer.teacher_A.requires_grad and layer.teacher_A.grad is None
    saved = {k: v.clone() + 1 for k, v in lora.tensors("student").items()}
    lora.load("teacher", saved)
    assert all(torch.equal(lora.tensors("teacher")[k], saved[k]) for k in saved)


def test_teacher_ema_on_cpu_is_the_same_ema_with_a_compute_dtype_copy():
    torch.manual_seed(0)
    models = [Toy(), Toy()]
    models[1].load_state_dict(models[0].state_dict())
    torch.manual_seed(1)
    here = DualLoRA.attach(models[0], ["to_q", "other"], rank=3, alpha=3.0)
    torch.manual_seed(1)
    away = DualLoRA.attach(models[1], ["to_q", "other"], rank=3, alpha=3.0)
    away.keep_teacher_ema_on_cpu(torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in away._teacher_buffers())
    assert all(t.dtype == torch.float32 for t in away.tensors("teacher").values())
    for step in range(3):
        with torch.no_grad():
            for a, b in zip(here.student_parameters(), away.student_parameters()):
                a.add_(torch.randn_like(a))
                b.copy_(a)
        here.ema_update(0.9)
        away.ema_update(0.9)
    mine, theirs = here.tensors("teacher"), away.tensors("teacher")
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # the fp32 state: the same EMA
    for name, layer in away.layers.items():  # the layers hold its bf16 rounding
        assert torch.equal(layer.teacher_B, mine[f"{name}.lora_B.weight"].to(torch.bfloat16))
    for lora in (here, away):  # a bf16 base: the teacher pass casts A and B to x's dtype anyway
        for layer in lora.layers.values():
            layer.base.to(torch.bfloat16)
    assert here.layers["block.to_q"].teacher_A.dtype == torch.float32
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    with here.use("teacher"), away.use("teacher"):
        assert torch.equal(models[0](x), models[1](x))
    # load (resume) writes the state and its copy
    new = {k: v + 1 for k, v in mine.items()}
    away.load("teacher", new)
    assert torch.equal(away.tensors("teacher")["block.to_q.lora_A.weight"], new["block.to_q.lora_A.weight"])
    assert torch.equal(away.layers["block.to_q"].teacher_A, new["block.to_q.lora_A.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("act_quant", ["off", "int8"])
def test_the_bare_base_of_a_fused_layer_runs_on_the_kernel_with_the_students_numerics(act_quant):
    """use(None) (the prior roll-outs' target) on an 8-bit layer routed to the fused kernel: the same
    kernel with a zero LoRA scale, not quanto's own forward (exact activations, a dequantised weight)."""
    from lowvram_dopsd.kernels import utils as kutils
    from lowvram_dopsd.kernels.lora_linear import lora_linear_reference
    from lowvram_dopsd.quant import int8_view, quantize_frozen

    torch.manual_seed(0)
    model = quantize_frozen(Toy(), "qint8")
    lora = DualLoRA.attach(model, ["to_q"], rank=2, alpha=4.0)
    assert lora.enable_fused_kernels(act_quant) == 1
    layer = lora.layers["block.to_q"]
    x = torch.randn(3, 6)
    kutils.reset_dispatch_counts()
    with torch.no_grad(), lora.use(None):
        bare = layer(x)
    assert sum(n for k, n in kutils.DISPATCH_COUNTS.items() if k.startswith("lora_linear.")) == 1
    with torch.no_grad():
        student = layer(x)  # B = 0: the student is the base, computed the same way
    assert torch.equal(bare, student)
    w_q, w_scale = int8_view(layer.base)
    expect = lora_linear_reference(x, w_q, w_scale, layer.base.bias, layer.student_A, layer.student_B, 0.0, act_quant)
    assert torch.allclose(bare, expect, atol=1e-6)
    if act_quant == "int8":  # quanto's forward would have used the exact activations
        assert not torch.allclose(bare, layer.base(x), atol=1e-6)
