"""benchmarks/bench_ema.py times the EMA update at the real models' LoRA shapes; its --tiny mode keeps
the script (shapes from the published configs, both layouts) from rotting between GPU sessions."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ema  # noqa: E402


def test_lora_shapes_are_the_planners():
    """The same layers `plan` counts for the LoRA (and the trainer builds: both read the family adapter)."""
    from lowvram_dopsd.plan import build_meta, count, resolve_model

    for model, layers in (("zimage", 238), ("klein", 100)):
        shapes = bench_ema.lora_shapes(model)
        mc = resolve_model(bench_ema.MODELS[model])
        c = count(build_meta(mc.family, mc.transformer), mc.family.quant_skip, mc.family.lora_targets, 64)
        assert len(shapes) == c.lora_layers == layers
        assert sum(64 * (i + o) for _, i, o in shapes) == c.lora


def test_bench_ema_tiny_times_both_layouts(tmp_path):
    assert bench_ema.main(["--tiny", "--device", "cpu", "--repeat", "2", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("ema-*-tiny.json")
    rows = json.loads(result.read_text())["rows"]
    pairs = {(m, layout) for m in ("zimage", "klein") for layout in ("device", "cpu")}
    assert {(r["model"], r["layout"]) for r in rows} == pairs
    assert all(r["ms"] > 0 and r["tensors"] == 8 for r in rows)
    assert "| zimage | cpu | ema_update (lerp) | 8 |" in result.with_suffix(".md").read_text()
