"""`plan --gpus N` (scaling.py): the memory table unchanged, the gradient sum and the expected step."""
import json

import pytest

from lowvram_dopsd.cli import main
from lowvram_dopsd.families.zimage import ZImage
from lowvram_dopsd.scaling import BUSES


def plan_json(capsys, *flags):
    assert main(["plan", "--preset", "16gb", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_on_gpus_keeps_the_memory_and_prices_the_step(capsys):
    one = plan_json(capsys)
    four = plan_json(capsys, "--gpus", "4")
    assert four["peak_gib"] == one["peak_gib"] and four["rows"] == one["rows"]  # every GPU holds it all
    dp = four["data_parallel"]
    assert dp["allreduce_bytes"] == 4 * one["lora_params"]  # the fp32 student LoRA's gradient
    assert dp["sent_per_gpu_bytes"] == round(1.5 * dp["allreduce_bytes"])  # a ring: 2 (N - 1) / N
    assert dp["busiest_gpu_micro_batches"] == 1 and dp["one_gpu_step_s"] == pytest.approx(4 * ZImage.rollout_s_h100)
    for bus, bandwidth in BUSES.items():
        assert dp["expected_step_s"][bus] == pytest.approx(ZImage.rollout_s_h100 + 1.5 * dp["allreduce_bytes"] / bandwidth)
    assert "data_parallel" not in one


def test_plan_on_gpus_prices_no_step_away_from_the_measured_settings(capsys):
    dp = plan_json(capsys, "--gpus", "3", "--resolution", "768")["data_parallel"]
    assert dp["busiest_gpu_micro_batches"] == 2 and dp["rollout_s"] is None
    assert set(dp["expected_step_s"].values()) == {None}
    assert main(["plan", "--preset", "16gb", "--gpus", "3", "--resolution", "768"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "do not divide evenly" in text and "no roll-out time was measured at these settings" in text


def test_plan_on_gpus_of_a_named_kind_prices_the_step_with_the_time_planner(capsys):
    """--gpu NAME --gpus N: each GPU's roll-out is the time planner's for that GPU (here a 4090, predicted)."""
    out = plan_json(capsys, "--gpus", "2", "--gpu", "4090", "--micro-batch", "2", "--batch-size", "8")
    dp, time = out["data_parallel"], out["time"]
    assert dp["rollout_s"] == pytest.approx(2 * time["seconds_per_rollout"], rel=1e-3)  # a micro-batch of 2
    assert "4090" in dp["rollout_from"] and "predicted" in dp["rollout_from"]
    assert dp["one_gpu_step_s"] == pytest.approx(4 * dp["rollout_s"])  # 8 roll-outs as 4 micro-batches of 2
    assert list(dp["expected_step_s"]) == ["PCIe 4.0 x16"]  # a GeForce card has no NVLink to price
    sxm = plan_json(capsys, "--gpus", "2", "--gpu", "H100 SXM")["data_parallel"]["expected_step_s"]
    assert any(bus.startswith("NVLink") for bus in sxm)


def test_plan_on_gpus_of_a_named_kind_divides_the_run_s_hours_as_train_says(capsys):
    """train's time note on N processes divides the roll-outs among them; plan --gpus N --gpu NAME said one
    GPU's hours alone for a LoRA run (full mode already divided them)."""
    assert main(["plan", "--gpus", "2", "--gpu", "4090"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    hours = float(text.split(" h for the run")[0].rsplit(" ", 1)[1])
    assert f"On 2 GPUs the roll-outs are divided among them: about {hours / 2:.1f} h" in text, text
