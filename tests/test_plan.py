"""The memory planner (plan.py): exact counts, arithmetic checked against real tensors on the CPU.

* parameter counts of a meta model equal the real model's, per kind (8-bit / kept / LoRA);
* the predicted weight bytes equal the bytes the real quantized tiny model holds, per backend;
* the per-block activation constant matches what autograd actually saves for the real block;
* the optimizer-state formula matches torch's AdamW state;
* micro_batch multiplies the per-sample activation terms only, as the real blocks do on the CPU;
* the published configs plan offline, and the CLI prints a table / JSON, warns and suggests.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel  # noqa: E402

from lowvram_dopsd import plan  # noqa: E402
from lowvram_dopsd.families.flux3 import Flux3  # noqa: E402
from lowvram_dopsd.families.klein import Klein  # noqa: E402
from lowvram_dopsd.families.zimage import ZImage  # noqa: E402
from lowvram_dopsd.lora import DualLoRA  # noqa: E402
from lowvram_dopsd.quant import quantize_frozen, storage_bytes  # noqa: E402

warnings.filterwarnings("ignore", message="MatMul8bitLt")

TINY_Z = {"all_f_patch_size": [1], "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
          "cap_feat_dim": 64, "dim": 256, "in_channels": 16, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2,
          "n_refiner_layers": 1, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0}
TINY_K = {"attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": False,
          "in_channels": 128, "joint_attention_dim": 64, "mlp_ratio": 3.0, "num_attention_heads": 2,
          "num_layers": 1, "num_single_layers": 2, "patch_size": 1, "rope_theta": 2000,
          "timestep_guidance_channels": 256}
SETTINGS = {"resolution": 1024, "rank": 64, "quant": "qint8", "optimizer": "adamw8bit", "grad_checkpointing": True,
            "max_sequence_length": 512, "teacher_max_sequence_length": 1024}


def tiny(pipeline: str) -> tuple[plan.ModelConfig, nn.Module]:
    family = plan.resolve_model("Tongyi-MAI/Z-Image-Turbo" if pipeline == "ZImagePipeline"
                                else "black-forest-labs/FLUX.2-klein-4B").family
    cfg = TINY_Z if pipeline == "ZImagePipeline" else TINY_K
    cls = ZImageTransformer2DModel if pipeline == "ZImagePipeline" else Flux2Transformer2DModel
    torch.manual_seed(0)
    return plan.ModelConfig(family, dict(cfg), "tiny"), cls(**cfg).to(torch.bfloat16).requires_grad_(False)


@pytest.mark.parametrize("pipeline", ["ZImagePipeline", "Flux2KleinPipeline"])
def test_meta_counts_are_exact(pipeline):
    mc, real = tiny(pipeline)
    meta = plan.build_meta(mc.family, mc.transformer)
    assert all(p.is_meta for p in meta.parameters())
    c = plan.count(meta, mc.family.quant_skip, mc.family.lora_targets, rank=8)
    assert c.total == sum(p.numel() for p in real.parameters())
    # the split matches what the backend really quantizes, and the LoRA what DualLoRA really adds
    q = quantize_frozen(copy.deepcopy(real), "qint8", mc.family.quant_skip)
    quantized = sum(m.in_features * m.out_features for m in q.modules()
                    if isinstance(m, nn.Linear) and type(m) is not nn.Linear)
    assert c.quant_weight == quantized
    lora = DualLoRA.attach(q, mc.family.lora_targets, rank=8, alpha=16)
    assert c.lora == lora.num_parameters() and c.lora_layers == len(lora.layers)


@pytest.mark.parametrize("kind", ["none", "qint8", "qfloat8", "bnb-int8"])
@pytest.mark.parametrize("pipeline", ["ZImagePipeline", "Flux2KleinPipeline"])
def test_weight_bytes_equal_the_real_quantized_model(pipeline, kind):
    mc, real = tiny(pipeline)
    c = plan.count(plan.build_meta(mc.family, mc.transformer), mc.family.quant_skip, mc.family.lora_targets, rank=8)
    q_bytes, kept_bytes = plan.weights_bytes(c, kind)
    q = quantize_frozen(copy.deepcopy(real), kind, mc.family.quant_skip)
    held = storage_bytes(q)
    n_q = sum(1 for m in q.modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear)
    extra = 4 * n_q if kind in ("qint8", "qfloat8") else 0  # quanto's two scalar activation-scale buffers
    bias = 2 * c.quant_bias if kind != "none" else 0        # biases of 8-bit layers stay bf16 ("other" here)
    assert held["quantized"] == q_bytes - bias
    assert held["other"] == kept_bytes + bias + extra


@pytest.mark.parametrize("family", [ZImage, Klein, Flux3], ids=["zimage", "klein", "flux3"])
def test_block_activation_constant_matches_autograd(family):
    """k_block (+ the planner's per-token LoRA term) is what autograd really keeps for one block, within 2 %."""
    rank, dim = 8, 256
    # klein: 100 LoRA layers over 25 blocks (average); FLUX.3: q/k/v/out + 2 FFN linears in every block
    lora_layers_per_block = {ZImage: 7, Klein: 4, Flux3: 6}[family]
    measured = plan.measure_block_activations(family, dim_heads=dim // 128, tokens=192, text=64, rank=rank)
    for name, k in measured.items():
        predicted = family.k_block[name] + lora_layers_per_block * rank * 2 / dim
        assert k == pytest.approx(predicted, rel=0.02), (name, k, predicted)


def test_optimizer_formula_matches_torch_adamw():
    p = [nn.Parameter(torch.randn(64, 100)), nn.Parameter(torch.randn(30, 64))]
    opt = torch.optim.AdamW(p)
    sum(x.sum() for x in p).backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert held == plan.optimizer_bytes(sum(x.numel() for x in p), "adamw")


def test_tokens_follow_the_pipelines():
    t = ZImage.plan_tokens(1024, 1024, 500, 1000, "vlm")
    assert (t.img, t.student, t.teacher) == (4096, 4096 + 512, 4096 + 1024)  # captions padded to 32
    t = Klein.plan_tokens(1024, 1024, 512, 512, "edit")
    assert (t.student, t.teacher) == (4096 + 512, 2 * 4096 + 512)  # edit teacher: reference latents too
    # the edit teacher's caption is encoded as the student's, to max_sequence_length: the vlm teacher's
    # teacher_max_sequence_length (1024 by default) does not apply to it (the recorded klein runs: 8704)
    assert Klein.plan_tokens(1024, 1024, 512, 1024, "edit").teacher == 2 * 4096 + 512
    assert plan.make_plan("black-forest-labs/FLUX.2-klein-4B", SETTINGS).tokens.teacher == 2 * 4096 + 512


def test_published_configs_plan_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(plan, "_fetch_configs", lambda *_: pytest.fail("tried to download"))
    z = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", SETTINGS)
    assert 6.15e9 < z.counts.total < 6.16e9            # "6B"; the paper says 6.15B
    assert z.counts.blocks == {"noise_refiner": 2, "context_refiner": 2, "layers": 30}
    assert z.tokens.student == 4608 and z.phase == "student backward"
    k = plan.make_plan("black-forest-labs/FLUX.2-klein-4B", {**SETTINGS, "teacher_max_sequence_length": 512})
    assert 3.8e9 < k.counts.total < 3.95e9
    assert k.tokens.teacher == 2 * 4096 + 512 and k.phase.startswith("teacher")


def test_predictions_within_10_percent_of_the_recorded_gpu_runs():
    """The recorded H100 measurements (benchmarks/results) stay within 10 % of the current planner."""
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("memory-*.json"))
    if not files:
        pytest.skip("no recorded GPU results")
    ids = {"zimage": "Tongyi-MAI/Z-Image-Turbo", "klein": "black-forest-labs/FLUX.2-klein-4B"}
    checked = 0
    for f in files:
        for r in json.loads(f.read_text())["results"]:
            if r.get("step", {}).get("peak_gib") is None or r.get("superseded"):
                continue
            settings = {**r["settings"], "teacher": r["plan"]["settings"]["teacher"],
                        "teacher_max_sequence_length": r["plan"]["settings"]["teacher_max_sequence_length"],
                        "fused_linear": bool(r.get("fused_layers"))}
            p = plan.make_plan(ids[r["family"]], settings)
            assert p.peak_gib == pytest.approx(r["step"]["peak_gib"], rel=0.10), r["config"]
            checked += 1
    assert checked >= 3


def test_fused_linear_shrinks_the_teacher_pass(monkeypatch):
    """On the fused 8-bit kernel the teacher pass holds no dequantised weight: klein's edit teacher
    stops being the peak phase (measured 6.54 GiB, memory-...-run3); Z-Image's student-backward
    peak is unchanged; bf16 and bitsandbytes bases never use the kernel."""
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.kernels import utils
    from lowvram_dopsd.quant import fused_linear_planned

    k_set = {**SETTINGS, "teacher_max_sequence_length": 512}
    quanto = plan.make_plan("black-forest-labs/FLUX.2-klein-4B", k_set)
    fused = plan.make_plan("black-forest-labs/FLUX.2-klein-4B", {**k_set, "fused_linear": True})
    assert quanto.phase.startswith("teacher") and fused.phase == "student backward"
    assert fused.peak_gib < quanto.peak_gib - 0.25
    z = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", SETTINGS)
    assert plan.make_plan("Tongyi-MAI/Z-Image-Turbo", {**SETTINGS, "fused_linear": True}).peak_gib == z.peak_gib
    bf16 = {**SETTINGS, "quant": "none", "optimizer": "adamw"}
    assert (plan.make_plan("Tongyi-MAI/Z-Image-Turbo", {**bf16, "fused_linear": True}).peak_gib
            == plan.make_plan("Tongyi-MAI/Z-Image-Turbo", bf16).peak_gib)

    monkeypatch.setattr(utils, "HAS_TRITON", True)
    assert fused_linear_planned("auto", "qint8") and fused_linear_planned("on", "qfloat8")
    assert not fused_linear_planned("off", "qint8") and not fused_linear_planned("auto", "bnb-int8")
    assert not fused_linear_planned("auto", "none")
    monkeypatch.setattr(utils, "HAS_TRITON", False)  # e.g. torch on Windows without triton
    assert not fused_linear_planned("auto", "qint8")
    assert fused_linear_planned("on", "qint8")  # forced on: the run uses it (or stops saying why)
    # the config reaches the planner
    assert plan._settings(load_config("16gb", {}))["fused_linear"] is False  # auto, and no Triton
    assert plan._settings(load_config("16gb", {"kernels": "off"}))["fused_linear"] is False
    assert plan._settings(load_config("16gb", {"kernels": "on"}))["fused_linear"] is True


def test_no_checkpointing_keeps_every_block():
    on = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", SETTINGS)
    off = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", {**SETTINGS, "grad_checkpointing": False})
    assert off.peak_gib > on.peak_gib + 20  # ~36 GiB of activations at 1024²
    assert off.no_ckpt_activations == pytest.approx(on.no_ckpt_activations)


def test_keep_blocks_auto_keeps_as_many_as_fit_the_budget(capsys):
    """Selective checkpointing: `auto` keeps the most blocks whose peak stays under the budget (one more would
    not fit), those that see the most tokens first (Z-Image's main layers); each kept block adds its saved
    activations to the peak; a number keeps that many; `plan` shows the count and `suggest` gives them back
    first."""
    model = "Tongyi-MAI/Z-Image-Turbo"
    every = plan.make_plan(model, SETTINGS, budget_gib=14.0)
    auto = plan.make_plan(model, {**SETTINGS, "keep_blocks": "auto"}, budget_gib=14.0)
    n = sum(auto.kept.values())
    assert auto.kept == {"layers": n} and 0 < n < 30 and auto.fits()
    more = plan.make_plan(model, {**SETTINGS, "keep_blocks": str(n + 1)}, budget_gib=14.0)
    assert not more.fits() and more.kept == {"layers": n + 1}
    one = plan.make_plan(model, {**SETTINGS, "keep_blocks": "1"})
    block = one.peak - every.peak
    assert block > 0 and auto.peak - every.peak == pytest.approx(n * block)
    assert plan.make_plan(model, {**SETTINGS, "keep_blocks": "auto"}).kept == {}  # no budget: nothing kept
    assert plan.make_plan(model, {**SETTINGS, "keep_blocks": "99"}).kept == {"layers": 30, "noise_refiner": 2,
                                                                             "context_refiner": 2}
    fixes = plan.suggest(model, {**SETTINGS, "keep_blocks": "30"}, 14.0)
    assert fixes and fixes[0][0] == "--set keep_blocks=0"
    from lowvram_dopsd.cli import main

    main(["plan", "--preset", "16gb", "--set", "keep_blocks=auto"])
    assert f"{n} of 34 blocks keep all" in capsys.readouterr().out


def test_suggestions_bring_it_under_the_budget():
    s = {**SETTINGS, "quant": "none", "optimizer": "adamw"}
    p = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", s, budget_gib=14.0)
    assert not p.fits()
    fixes = plan.suggest("Tongyi-MAI/Z-Image-Turbo", s, 14.0)
    assert fixes and all(f.fits() for _, f in fixes)
    assert any("--quant qint8" in flag for flag, _ in fixes)


def test_cli_plan(capsys):
    from lowvram_dopsd.cli import main

    assert main(["plan", "--preset", "16gb", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "zimage" and out["peak_gib"] < 14.0 and out["budget_gib"] == 14.0
    assert main(["plan", "--preset", "24gb", "--vram", "16"]) == 3  # does not fit: warns, suggests
    text = capsys.readouterr().out
    assert "warning" in text and "--quant qint8" in text
    assert main(["plan", "--preset", "16gb", "--model", "black-forest-labs/FLUX.2-klein-4B"]) == 0
    assert "klein" in capsys.readouterr().out
    for vram in ("-3", "0", "lots"):  # one line (exit 2), not a plan against a negative budget
        assert main(["plan", "--preset", "16gb", "--vram", vram]) == 2
        err = capsys.readouterr().err
        assert "card's memory in GiB" in err and "usage:" not in err


def test_plan_takes_the_train_flags_and_lists_those_that_change_memory(capsys):
    from lowvram_dopsd.cli import main

    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert "--rank" in out and "--micro-batch" in out and "--quant" in out
    assert "--images" not in out and "--lr " not in out and "--save-every" not in out
    # a train command with its first word changed: accepted, the memory-neutral flags change nothing
    assert main(["plan", "--preset", "16gb", "--json", "--images", "x", "--lr", "1e-4", "--steps", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_gib"] < 14.0


def test_teacher_ema_on_cpu_leaves_a_bf16_copy_on_the_gpu():
    dev = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", SETTINGS)
    cpu = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", {**SETTINGS, "teacher_ema_on": "cpu"})
    row = {r.what: r.bytes for r in cpu.rows}
    assert row["LoRA EMA teacher (bf16 copy)"] == 2 * cpu.counts.lora
    assert dev.peak - cpu.peak == 2 * dev.counts.lora  # 0.30 GiB for Z-Image at rank 64
    from lowvram_dopsd.config import load_config

    assert plan.plan_from_config(load_config("12gb")).settings["teacher_ema_on"] == "cpu"


def test_a_cumulative_suggestion_names_each_setting_once():
    fixes = plan.suggest("Tongyi-MAI/Z-Image-Turbo", {**SETTINGS, "quant": "qint8"}, 8.75)
    assert any(flag.count("--") > 1 for flag, _ in fixes)  # a cumulative one: 896, 768 ... were tried in turn
    for flag, _ in fixes:
        assert flag.count("--resolution") <= 1 and flag.count("--rank") <= 1, flag


def test_an_unknown_id_gives_one_paragraph_without_the_hubs_own_warning(monkeypatch, caplog, capsys):
    import logging

    import huggingface_hub

    from lowvram_dopsd.cli import main

    def download(repo_id, filename, **kw):  # what the hub does offline: warn, then raise
        logging.getLogger("huggingface_hub.file_download").warning(
            "'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/...")
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files in the local cache.")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    level = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING):
        assert main(["plan", "--preset", "16gb", "--model", "someone/typo"]) == 2
    assert "Could not get the configs of 'someone/typo'" in capsys.readouterr().err
    assert not [r for r in caplog.records if "thrown while requesting" in r.getMessage()]
    assert logging.getLogger("huggingface_hub").level == level  # put back as it was


def _rows(p: plan.Plan) -> dict[str, float]:
    return {r.what: r.bytes for r in p.rows}


@pytest.mark.parametrize("model,extra", [("Tongyi-MAI/Z-Image-Turbo", {}),  # student backward is the peak
                                         ("black-forest-labs/FLUX.2-klein-4B",  # the edit teacher's pass is
                                          {"teacher_max_sequence_length": 512})])
def test_micro_batch_multiplies_the_per_sample_terms_only(model, extra):
    """By the model, micro_batch 2 doubles every per-sample activation term exactly (the recomputed
    block's bf16 LoRA casts excepted: once per block) and leaves weights, LoRA, grads, optimizer
    state and workspace as they are."""
    one = plan.make_plan(model, {**SETTINGS, **extra})
    assert plan.make_plan(model, {**SETTINGS, **extra, "micro_batch": 1}).peak == one.peak  # the default
    two = plan.make_plan(model, {**SETTINGS, **extra, "micro_batch": 2})
    r1, r2 = _rows(one), _rows(two)
    assert r1.keys() == r2.keys() and one.phase == two.phase
    per_sample = [w for w in r1 if "activations" in w or "teacher pass" in w]
    assert len(per_sample) == 5, per_sample  # inputs, recomputed block, bwd temporaries, teacher, no-ckpt
    lora_casts = {"activations: one block recomputed": 2 * one.counts.lora / sum(one.counts.blocks.values()),
                  "(activations without checkpointing)": 2 * one.counts.lora}  # every block's
    for what in r1:
        if what in per_sample:
            assert r2[what] == pytest.approx(2 * r1[what] - lora_casts.get(what, 0), rel=1e-12), what
        else:
            assert r2[what] == r1[what], what
    peak_rows = {r.what for r in one.rows if r.in_peak}
    assert two.peak - one.peak == pytest.approx(sum(r2[w] - r1[w] for w in peak_rows), rel=1e-9)
    four = plan.make_plan(model, {**SETTINGS, **extra, "micro_batch": 4})
    assert one.peak < two.peak < four.peak
    assert (one.settings["micro_batch"], two.to_dict()["settings"]["micro_batch"]) == (1, 2)


def test_block_activations_per_sample_do_not_depend_on_the_batch():
    """The per-sample scaling, checked on the real diffusers blocks (CPU, saved-tensor hooks): batch 2
    keeps twice what batch 1 keeps. klein's double-stream block keeps 2 B/token/dim more per sample
    at batch > 1 (the split attention output's slices are copied by the LoRA's matmul): that makes
    it as large as the single-stream block, which the planner already recomputes (plan.py docstring)."""
    extra = {"transformer_blocks": 2.0}
    for family in (ZImage, Klein):
        one = plan.measure_block_activations(family, dim_heads=2, tokens=192, text=64, rank=8, batch=1)
        two = plan.measure_block_activations(family, dim_heads=2, tokens=192, text=64, rank=8, batch=2)
        for name, k in one.items():
            assert two[name] == pytest.approx(k + extra.get(name, 0.0), rel=0.01), (name, k, two[name])
        if family is Klein:
            assert two["transformer_blocks"] == pytest.approx(two["single_transformer_blocks"], rel=0.02)


def test_a_no_grad_pass_over_the_student_tokens_is_never_the_peak():
    """The prior_prompts roll-out (micro_batch samples at `resolution`, the bare base as target) and
    the untrained roll-out steps run no-grad passes over the student's tokens: with the teacher's
    tokens equal to the student's, the student backward stays the peak phase, so they add none."""
    same = {**SETTINGS, "teacher_max_sequence_length": SETTINGS["max_sequence_length"], "micro_batch": 2}
    for model, teacher in (("Tongyi-MAI/Z-Image-Turbo", "vlm"), ("black-forest-labs/FLUX.2-klein-4B", "vlm")):
        p = plan.make_plan(model, {**same, "teacher": teacher})
        assert p.tokens.teacher == p.tokens.student and p.phase == "student backward", model


def test_micro_batch_is_stated_and_suggested_back_to_1(capsys):
    """The caption and the JSON say which micro_batch was planned; one that does not fit is told to
    go back to 1 (batch_size is kept through accumulation)."""
    import io

    from rich.console import Console

    from lowvram_dopsd.cli import main

    s4 = {**SETTINGS, "micro_batch": 4}
    p = plan.make_plan("Tongyi-MAI/Z-Image-Turbo", s4, budget_gib=14.0)
    assert not p.fits()
    fixes = dict(plan.suggest("Tongyi-MAI/Z-Image-Turbo", s4, 14.0))
    assert "--micro-batch 1" in fixes and fixes["--micro-batch 1"].settings["micro_batch"] == 1
    assert fixes["--micro-batch 1"].fits()
    assert not any("--micro-batch" in f for f, _ in plan.suggest("Tongyi-MAI/Z-Image-Turbo", SETTINGS, 8.75))

    out = io.StringIO()
    plan.render(p, Console(file=out, width=400), suggestions=list(fixes.items()))
    text = " ".join(out.getvalue().split())  # the caption wraps at the table's width
    assert "micro_batch 4 (activations scaled linearly from the batch-1 GPU calibration)" in text
    assert "batch 1;" not in text and "try --micro-batch 1" in text

    assert main(["plan", "--preset", "16gb", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["plan", "--preset", "16gb", "--micro-batch", "2", "--json"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert (base["settings"]["micro_batch"], two["settings"]["micro_batch"]) == (1, 2)
    assert two["peak_gib"] > base["peak_gib"]


@pytest.mark.parametrize("pipeline", ["ZImagePipeline", "Flux2KleinPipeline"])
def test_fp32_doubles_the_compute_dtype_bytes_and_is_planned_from_the_config(pipeline, capsys):
    """dtype = fp32: the base kept in the compute dtype is what a real fp32 model holds, every activation
    term is twice bf16's (the calibration is bf16: a model), the fp32 LoRA, grads and optimizer state do
    not change; `plan --dtype fp32` plans it and suggests --dtype bf16."""
    mc, real = tiny(pipeline)
    c = plan.count(plan.build_meta(mc.family, mc.transformer), mc.family.quant_skip, mc.family.lora_targets, rank=8)
    assert plan.weights_bytes(c, "none", 4)[1] == sum(p.numel() * 4 for p in real.float().parameters())
    bf16 = plan.make_plan("tiny", {**SETTINGS, "quant": "none"}, mc)
    fp32 = plan.make_plan("tiny", {**SETTINGS, "quant": "none", "dtype": "fp32"}, mc)
    r16, r32 = _rows(bf16), _rows(fp32)
    assert r32["frozen base, fp32"] == 2 * r16["frozen base, bf16"]
    for what in r16:
        if "activations" in what or "teacher pass" in what:
            assert r32[what] == pytest.approx(2 * r16[what], rel=1e-12), what
        elif "LoRA" in what or "optimizer" in what:
            assert r32[what] == r16[what], what
    assert fp32.settings["dtype"] == "fp32" and bf16.settings["dtype"] == "bf16"

    from lowvram_dopsd.cli import main

    assert main(["plan", "--preset", "24gb", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["peak_gib"]
    assert main(["plan", "--preset", "24gb", "--dtype", "fp32", "--vram", "24", "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert 1.7 * base < out["peak_gib"] < 2 * base
    assert "--dtype bf16" in [flag for flag, _ in out["suggestions"]]


def test_a_preset_file_built_on_a_card_preset_is_planned_against_that_card(tmp_path, capsys):
    from lowvram_dopsd.cli import main

    (tmp_path / "mine.toml").write_text('base = "16gb"\nrank = 32\n')
    (tmp_path / "derived.toml").write_text('base = "mine.toml"\n')
    (tmp_path / "alone.toml").write_text('rank = 32\n')
    assert plan.vram_of_preset(str(tmp_path / "derived.toml")) == plan.CARD_BUDGET_GIB["16gb"]
    assert plan.vram_of_preset(str(tmp_path / "alone.toml")) is None and plan.vram_of_preset("cpu-demo") is None
    assert main(["plan", "--preset", str(tmp_path / "derived.toml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget_gib"] == 14.0 and out["settings"]["rank"] == 32


@pytest.mark.parametrize("model,fits", [
    ("black-forest-labs/FLUX.2-klein-9B", {"12gb": False, "16gb": True, "24gb": False}),
    ("black-forest-labs/flux-3-image-klein", {"12gb": True, "16gb": True, "24gb": True})])
def test_the_new_families_plan_on_each_preset_at_1024(model, fits, capsys):
    """klein 9B and FLUX.3 plan offline at 1024² on every card preset; where one does not fit its budget
    (klein 9B: 12gb, and 24gb's bf16 base) the planner names settings that do."""
    from lowvram_dopsd.cli import main

    for preset, ok in fits.items():
        code = main(["plan", "--preset", preset, "--model", model, "--json"])
        out = json.loads(capsys.readouterr().out)
        assert out["settings"]["height"] == out["settings"]["width"] == 1024
        assert (code == 0) == ok and (out["peak_gib"] <= out["budget_gib"]) == ok, (preset, out["peak_gib"])
        assert ok or (out["suggestions"] and all(gib <= out["budget_gib"] for _, gib in out["suggestions"]))
    if "flux-3" in model:  # its per-token modulations are planned, and its config's origin is said
        rows = {r["what"] for r in out["rows"]}
        assert "activations: outside the blocks" in rows
        assert main(["plan", "--preset", "16gb", "--model", model]) == 0
        assert "NOT its published config" in " ".join(capsys.readouterr().out.split())
