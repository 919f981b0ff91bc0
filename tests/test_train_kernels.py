"""The trainer on the fused kernels: same D-OPSD run with kernels forced on and off."""
import json

import pytest

from lowvram_dopsd.config import load_config
from lowvram_dopsd.kernels import utils as kutils
from lowvram_dopsd.train import train


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """One feature cache for every run of this module: the conditions are the same, keyed by content."""
    return tmp_path_factory.mktemp("features")


def run(tmp_path, name, model_dir, vlm_dir, images, kernels, quant, act_quant="off", cache=None, steps=2):
    cfg = load_config("cpu-demo", dict(
        model=str(model_dir), teacher_encoder=str(vlm_dir), images=str(images), output=str(tmp_path / name),
        cache_dir=str(cache or tmp_path / "cache"), steps=str(steps), rollout_steps="1", batch_size="1", quant=quant,
        act_quant=act_quant, kernels=kernels, lr="5e-3"))  # small: every LoRA layer runs through the Triton interpreter
    kutils.reset_dispatch_counts()
    result = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return losses, dict(kutils.DISPATCH_COUNTS), result


@pytest.mark.parametrize("quant", ["qint8", "qfloat8"])
def test_kernels_on_and_off_train_the_same(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, features, quant):
    on, counts_on, res_on = run(tmp_path, "on", tiny_zimage_dir, tiny_vlm_dir, demo_images, "on", quant, cache=features)
    off, counts_off, res_off = run(tmp_path, "off", tiny_zimage_dir, tiny_vlm_dir, demo_images, "off", quant,
                                   cache=features)
    # the "on" run really went through Triton (interpreted here), the "off" run never did
    assert counts_on.get("lora_linear.triton", 0) > 0 and counts_on.get("dopsd_loss.triton", 0) > 0
    assert counts_on.get("lora_linear.reference", 0) == 0
    assert counts_off.get("lora_linear.triton", 0) == 0 and counts_off.get("dopsd_loss.triton", 0) == 0
    assert all(layer.fused for layer in res_on.lora.layers.values())
    assert len(on) == len(off) == 2
    for a, b in zip(on, off):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-9, (on, off)
    # Adam normalises each update (|step| ≈ lr wherever a gradient is tiny), so compare the trained
    # LoRA as a whole: fp32 accumulation-order differences stay far below 1e-3 of its norm.
    on_t, off_t = res_on.lora.tensors("student"), res_off.lora.tensors("student")
    num = sum((on_t[k] - off_t[k]).pow(2).sum() for k in on_t).sqrt()
    den = sum(off_t[k].pow(2).sum() for k in off_t).sqrt()
    assert num / den < 1e-3, float(num / den)


def test_auto_follows_the_dispatch_rule(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, features, monkeypatch):
    """kernels = "auto": the trainer asks quant.use_fused_linear (True on CUDA with Triton, tested in
    test_quant.py) with its device and puts the 8-bit layers on the kernel when it says so (one step
    shows it: the question is asked once, before the loop)."""
    import lowvram_dopsd.train as train_mod

    asked = []
    monkeypatch.setattr(train_mod, "use_fused_linear", lambda device, kernels: asked.append((device, kernels)) or True)
    _, counts, res = run(tmp_path, "auto", tiny_zimage_dir, tiny_vlm_dir, demo_images, "auto", "qint8", cache=features,
                         steps=1)
    assert [(d.type, k) for d, k in asked] == [("cpu", "auto")]
    assert all(layer.fused for layer in res.lora.layers.values())
    assert counts.get("lora_linear.triton", 0) > 0 and counts.get("lora_linear.reference", 0) == 0


def test_int8_activations_on_the_kernel_and_its_reference_train_the_same(
        tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, features):
    """act_quant = "int8": every 8-bit LoRA layer takes the int8-activation path, through Triton
    (interpreted) with kernels on and through the kernel's torch reference with kernels off; both
    train the same, and differently from the exact-activation run (the quantisation is really on)."""
    def run_act(name, kernels, act_quant):
        return run(tmp_path, name, tiny_zimage_dir, tiny_vlm_dir, demo_images, kernels, "qint8", act_quant,
                   cache=features)

    on, counts_on, res_on = run_act("on", "on", "int8")
    off, counts_off, res_off = run_act("off", "off", "int8")
    exact, _, res_exact = run_act("exact", "off", "off")
    assert counts_on.get("lora_linear.triton", 0) > 0 and counts_on.get("lora_linear.reference", 0) == 0
    assert counts_off.get("lora_linear.reference", 0) > 0 and counts_off.get("lora_linear.triton", 0) == 0
    for res in (res_on, res_off):
        assert all(layer.fused and layer.act_quant == "int8" for layer in res.lora.layers.values())
    for a, b in zip(on, off):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-9, (on, off)

    def dist(r1, r2):
        t1 = {k: t.detach() for k, t in r1.lora.tensors("student").items()}
        t2 = {k: t.detach() for k, t in r2.lora.tensors("student").items()}
        return float(sum((t1[k] - t2[k]).pow(2).sum() for k in t1).sqrt()
                     / sum(t2[k].pow(2).sum() for k in t2).sqrt())

    assert dist(res_on, res_off) < 1e-3
    d_exact = dist(res_off, res_exact)
    print(f"trained LoRA, relative distance: kernel vs reference {dist(res_on, res_off):.2e}, "
          f"int8 vs exact activations {d_exact:.2e}")
    assert 1e-3 < d_exact < 0.3, d_exact  # int8 activations change the gradients, not the training


def test_int8_activations_on_a_gpu_need_the_kernel():
    """On CUDA, act_quant = "int8" without the fused kernel (kernels = "off", or no Triton) would run
    the CPU emulation on the GPU: the trainer stops before loading anything (check_act_quant runs
    before the encoders), saying what to do."""
    import torch

    from lowvram_dopsd.errors import UserError
    from lowvram_dopsd.preflight import check_act_quant
    from lowvram_dopsd.train import route_fused_linears

    cfg = load_config("16gb", {"act_quant": "int8", "kernels": "off"})
    for check in (lambda: check_act_quant(cfg, torch.device("cuda")),
                  lambda: route_fused_linears(None, cfg, torch.device("cuda"))):
        with pytest.raises(UserError, match="kernels = 'auto' with a Triton that runs it"):
            check()
    check_act_quant(cfg, torch.device("cpu"))  # the CPU runs the reference: allowed


def test_int8_activations_with_a_too_old_triton_say_so(monkeypatch, fake_gpu):
    """kernels = "auto" but Triton older than the kernels need (kernels.utils.MIN_TRITON): the
    error names the installed version instead of a kernels = 'off' the user never set."""
    import torch

    from lowvram_dopsd.errors import UserError
    from lowvram_dopsd.kernels import utils
    from lowvram_dopsd.preflight import check_act_quant

    monkeypatch.setattr(utils, "HAS_TRITON", False)
    monkeypatch.setattr(utils, "TRITON_MISSING", "Triton 3.2.0 is older than the 3.3 the kernels need")
    fake_gpu((8, 6))  # an RTX 3090
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = load_config("16gb", {"act_quant": "int8"})
    with pytest.raises(UserError, match=r"\(Triton 3\.2\.0 is older than the 3\.3 the kernels need\)"):
        check_act_quant(cfg, torch.device("cuda"))


def test_int8_activations_on_a_gpu_older_than_ampere_are_refused_with_no_install_advice(monkeypatch, fake_gpu):
    """A T4 / RTX 20xx (compute capability 7.5): Triton compiles no tensor-core GEMM there and not the
    act8 one at all (kernels.utils.MIN_CAPABILITY), so no Triton install helps; the error says so."""
    import torch

    from lowvram_dopsd.errors import UserError
    from lowvram_dopsd.kernels import utils
    from lowvram_dopsd.preflight import check_act_quant

    monkeypatch.setattr(utils, "HAS_TRITON", True)  # as on a CUDA install
    fake_gpu((7, 5))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = load_config("16gb", {"act_quant": "int8"})
    with pytest.raises(UserError, match=r"does not run on this GPU \(this GPU \(compute capability 7\.5\) is older "
                                        r"than Ampere.*Set act_quant = 'off'\.$") as err:
        check_act_quant(cfg, torch.device("cuda"))
    assert "pip install" not in str(err.value)


def test_a_gpu_run_without_a_usable_triton_says_why_its_8bit_layers_are_slower(monkeypatch, fake_gpu):
    import torch

    from lowvram_dopsd.kernels import utils
    from lowvram_dopsd.advice import no_kernel_note

    cuda, cfg = torch.device("cuda"), load_config("16gb", {})
    monkeypatch.setattr(utils, "TRITON_MISSING", "Triton 3.2.0 is older than the 3.3 the kernels need")
    assert "quanto" in no_kernel_note(cfg, cuda, fused=0) and "Triton 3.2.0 is older" in no_kernel_note(cfg, cuda, 0)
    assert no_kernel_note(cfg, cuda, fused=210) == ""  # on the kernel after all
    assert no_kernel_note(load_config("24gb", {}), cuda, 0) == ""  # a bf16 base has no 8-bit layers
    assert no_kernel_note(cfg, torch.device("cpu"), 0) == ""
    monkeypatch.setattr(utils, "TRITON_MISSING", "")  # Triton fine: kernels = "off" was the user's choice
    assert no_kernel_note(cfg, cuda, 0) == ""
    # Triton fine, but it cannot compile for this GPU (kernels.utils.NO_MMA): the note says so, and the fix
    real_gpu_problem = utils.gpu_problem
    monkeypatch.setattr(utils, "gpu_problem", lambda device=None: "Triton 3.3.0 cannot compile matrix multiplies "
                        "for this GPU (compute capability 12.0); a newer Triton can (torch 2.7.1+ ships 3.3.1)")
    note = no_kernel_note(cfg, cuda, 0)
    assert "quanto" in note and "compute capability 12.0" in note and "3.3.1" in note
    # a GPU older than the kernels run on (kernels.utils.MIN_CAPABILITY): where the layers run, no speed
    # claim measured on another GPU, nothing to install
    monkeypatch.setattr(utils, "gpu_problem", real_gpu_problem)
    monkeypatch.setattr(utils, "HAS_TRITON", True)
    fake_gpu((7, 5))
    note = no_kernel_note(cfg, cuda, 0)
    assert "quanto" in note and "compute capability 7.5" in note and "1.2x" not in note and "Triton 3" not in note


@pytest.mark.parametrize("problem, planned_fused", [("", True), ("Triton 3.3.0 cannot compile ...", False)])
def test_the_fit_warning_plans_the_path_the_run_will_take(monkeypatch, capsys, problem, planned_fused):
    """On a GPU the installed Triton cannot compile for (kernels.utils.NO_MMA) the 8-bit layers run on
    quanto, whose teacher pass needs more memory (plan.py): the fit warning before loading plans that
    path, and the fused kernel's elsewhere."""
    import io

    import torch
    from rich.console import Console

    from lowvram_dopsd import plan
    from lowvram_dopsd.advice import warn_if_it_will_not_fit

    asked = []
    real = plan.plan_from_config

    def spy(cfg, budget_gib=None):
        asked.append(plan._settings(cfg)["fused_linear"])
        return real(cfg, budget_gib=budget_gib)

    class Props:
        total_memory = 12 * 2**30

    monkeypatch.setattr(plan, "plan_from_config", spy)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(kutils, "gpu_problem", lambda device=None: problem)
    monkeypatch.setattr(kutils, "HAS_TRITON", True)  # as on a CUDA install
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    warn_if_it_will_not_fit(load_config("16gb", {}), torch.device("cuda"), Console(file=io.StringIO()))
    assert asked == [planned_fused]


def test_bf16_on_a_gpu_older_than_ampere_is_said_to_be_emulated(fake_gpu):
    """A T4 / RTX 20xx has no bf16 arithmetic: the run says so before anything is encoded, and
    nothing is said on an Ampere GPU or for an fp16 run."""
    import torch

    from lowvram_dopsd.advice import emulated_bf16_note

    cuda = torch.device("cuda")
    fake_gpu((7, 5))
    note = emulated_bf16_note(load_config("16gb", {}), cuda)
    assert "compute capability 7.5" in note and "emulates" in note and "`plan`" in note and "fp16" in note
    assert emulated_bf16_note(load_config("16gb", {"dtype": "fp16"}), cuda) == ""
    fake_gpu((8, 6))
    assert emulated_bf16_note(load_config("16gb", {}), cuda) == ""
    assert emulated_bf16_note(load_config("16gb", {}), torch.device("cpu")) == ""
