"""`plan --train-mode full`: each GPU's share of a sharded full fine-tune, and the full-* presets it chose."""
import functools
import json
import re
import sys
from importlib import resources
from pathlib import Path

import pytest

from lowvram_dopsd import plan, plan_full
from lowvram_dopsd.cli import main
from lowvram_dopsd.config import load_config

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"Z-Image": "Tongyi-MAI/Z-Image-Turbo", "klein 4B": "black-forest-labs/FLUX.2-klein-4B"}


@functools.cache
def sizes(model: str):
    """The model's planner sizes (one meta model each): the same for every full-* preset (bf16, 1024²)."""
    cfg = load_config("full-4x80gb", {"model": model})
    mc = plan.resolve_model(model)
    return mc, plan_full.sizes(cfg, mc)


def test_each_full_preset_fits_its_cards_as_its_description_says():
    """The figures in a preset's description are the planner's (so they cannot drift from it), each fits the
    preset's cards, and the description says they were not measured."""
    for preset, (gpus, card) in plan_full.PRESET_CARDS.items():
        text = resources.files("lowvram_dopsd.presets").joinpath(f"{preset}.toml").read_text()
        described = re.search(r"planned ([\d.]+) GiB(?: per GPU)? for Z-Image \(klein 4B ([\d.]+)\), not measured "
                              r"yet", text)
        assert described, text.splitlines()[0]
        for model, said in zip(MODELS.values(), described.groups()):
            cfg = load_config(preset, {"model": model})
            fp = plan_full.make(cfg, gpus, plan.budget_for(card), *sizes(model))
            assert f"{fp.peak_gib:.1f}" == said and fp.fits() and fp.smallest <= gpus, (preset, model, fp.peak_gib)
            assert not fp.notes  # the batch divides among the preset's GPUs


def test_sharded_terms_divide_by_the_gpus_and_the_others_do_not():
    cfg = load_config("full-4x80gb")
    mc, sz = sizes(cfg.model)
    one, eight = (plan_full.make(cfg, n, None, mc, sz) for n in (1, 8))
    for a, b in zip(one.rows, eight.rows):
        sharded = a.what.startswith(("student", "optimizer", "EMA"))
        assert b.bytes == pytest.approx(a.bytes / 8 if sharded else a.bytes), a.what
    # Z-Image 6.15B parameters: fp32 master + fp32 gradients + AdamW + fp32 EMA = 20 bytes each, whole on one GPU
    assert sum(r.bytes for r in one.rows[:4]) == 20 * sz.params
    assert 6.1e9 < sz.params < 6.2e9 and sz.max_block < sz.params / 30


def test_the_fewest_gpus_and_a_run_that_fits_no_number_of_them():
    cfg = load_config("full-8x24gb")
    mc, sz = sizes(cfg.model)
    budget = plan.budget_for(24)
    n = plan_full.smallest_gpus(cfg, budget, mc, sz)
    assert plan_full.make(cfg, n, budget, mc, sz).fits() and not plan_full.make(cfg, n - 1, budget, mc, sz).fits()
    # what never shrinks (a block gathered, the activations at 1024²) is over a 4 GB card's budget
    assert plan_full.smallest_gpus(cfg, plan.budget_for(4), mc, sz) is None


def test_plan_command_for_a_full_fine_tune(capsys):
    assert main(["plan", "--train-mode", "full", "--gpus", "2", "--vram", "24", "--json"]) == 3  # 2 cards: too few
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"] == 2 and out["smallest_gpus"] == 7 and not out["fits"]
    assert main(["plan", "--preset", "full-8x24gb"]) == 0
    text = capsys.readouterr().out
    assert "full fine-tune on 8 GPUs" in text and "fewest such GPUs that hold this run: 7" in text
    # a batch that does not divide among the GPUs is said (train_mode = 'full' refuses it)
    assert main(["plan", "--preset", "full-8x24gb", "--batch-size", "12", "--json"]) == 0
    assert "do not divide among 8 GPUs" in json.loads(capsys.readouterr().out)["notes"][0]


def _measure(work: str, out: str) -> int:
    """bench_full's measurement of the tiny Z-Image on this job's ranks; rank 0 saves it."""
    import argparse
    import os

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_full import measure

    res = measure("zimage-8l-adamw", argparse.Namespace(device="cpu", work=work, tiny=True))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(res, out)
    return 0


def test_the_gpu_stage_names_runs_the_benchmark_has():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_full import CONFIGS

    named = re.findall(r"bench_full\.py .*?--runs\s+(\S+)", (ROOT / "benchmarks" / "gpu_next.sh").read_text(), re.S)
    assert named and set(named[0].split(",")) <= set(CONFIGS)


def test_each_gpu_holds_the_planned_share_of_the_sharded_terms(tmp_path):
    """The tensors a full fine-tune's rank holds (its shards of the student, the EMA teacher and AdamW's state,
    after a real step) are the planner's per-GPU terms, up to FSDP's padding of each tensor to 2 rows."""
    import torch

    from dist_helpers import fork_job

    assert fork_job(2, _measure, str(tmp_path / "work"), str(tmp_path / "res.pt")) == [0, 0]
    res = torch.load(tmp_path / "res.pt")
    assert res["world_size"] == 2 and res["loss_finite"]
    planned = res["planned"]
    for held, row in (("student", "student weights (fp32 master)"), ("teacher", "EMA teacher (fp32)"),
                      ("optimizer", "optimizer state")):
        assert res["bytes"][held] == pytest.approx(planned[row], rel=0.01), held


def test_a_full_fine_tune_is_warned_by_its_per_gpu_plan_on_this_many_gpus(monkeypatch):
    """Before loading, a run checks the planner's peak against its card: a full fine-tune's is plan_full's for
    the job's number of GPUs (the LoRA planner would count a frozen base, and no sharded gradients, optimizer
    or EMA). full-8x24gb on one 24 GB card is warned; on 8 of them it is not."""
    import io

    import torch
    from rich.console import Console

    from lowvram_dopsd import advice, distributed, quant

    class Props:
        total_memory = 24 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    monkeypatch.setattr(quant, "use_fused_linear", lambda device, kernels: False)
    cfg = load_config("full-8x24gb")
    for gpus in (1, 8):
        monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank=0, size=gpus))
        shown = io.StringIO()
        advice.warn_if_it_will_not_fit(cfg, torch.device("cuda"), Console(file=shown, width=300))
        peak = plan_full.make(cfg, gpus, plan.budget_for(24), *sizes(cfg.model)).peak_gib
        assert (f"a peak of {peak:.1f} GiB" in shown.getvalue()) == (gpus == 1), shown.getvalue()


def test_the_fewest_gpus_come_with_a_batch_they_can_share(capsys):
    """7 cards of 24 GB hold Z-Image, but full mode refuses 64 micro-batches on 7 processes: the plan says which
    --batch-size (or how many GPUs) to take, and following it leaves no note."""
    assert main(["plan", "--train-mode", "full", "--gpus", "2", "--vram", "24"]) == 3
    text = " ".join(capsys.readouterr().out.split())
    assert "hold this run: 7; their processes share a step's micro-batches evenly only with --batch-size a " \
           "multiple of 7 (e.g. 70), or take 8 GPUs for batch_size 64." in text, text
    for followed in (["--gpus", "7", "--batch-size", "70"], ["--gpus", "8"]):
        assert main(["plan", "--train-mode", "full", "--vram", "24", "--json", *followed]) == 0
        assert json.loads(capsys.readouterr().out)["notes"] == [], followed
    assert main(["plan", "--preset", "full-4x80gb", "--gpus", "3", "--json"]) == 0  # the note names a batch too
    assert json.loads(capsys.readouterr().out)["notes"][0].endswith("needs a multiple of 3 (--batch-size 66)")
    assert main(["plan", "--preset", "full-4x80gb", "--gpus", "3", "--batch-size", "66", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
