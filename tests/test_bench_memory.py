"""benchmarks/bench_memory.py runs only on a GPU machine, which sessions get rarely: its --tiny CPU
mode (the same code on tiny configs of the real classes) keeps it from rotting in between."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_memory_tiny_runs_the_trainers_families(tmp_path):
    configs = "zimage-12gb,klein-16gb-edit-act8,zimage-16gb-prior,zimage-16gb-file"
    # The fused linear's CPU path is its torch reference unless the Triton interpreter is on (as the
    # suite sets it for tests/kernels, where the kernels are checked): interpreted, one klein
    # roll-out takes minutes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--tiny", "--device", "cpu",
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--configs", configs, "--profile"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "out").glob("memory-*-tiny.json")
    runs = {r["config"]: r for r in json.loads(result.read_text())["results"]}
    assert list(runs) == configs.split(","), runs
    for name, r in runs.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["step"]["losses_finite"], name
    # each model's own roll-out length (the family's default, not a benchmark constant)
    assert runs["zimage-12gb"]["step"]["rollout_steps"] == 8
    assert runs["klein-16gb-edit-act8"]["step"]["rollout_steps"] == 4
    assert runs["zimage-12gb"]["teacher_ema_on"] == "cpu"                 # the 12gb preset, applied as train.py
    assert runs["zimage-12gb"]["plan"]["settings"]["teacher_ema_on"] == "cpu"  # ... and told to the planner
    # --transformer-file: the random checkpoint rewritten as one original-layout file, trained from it
    single = runs["zimage-16gb-file"]["transformer_file"]
    assert single and runs["zimage-16gb-file"]["step"]["trained_passes"] == 8
    from safetensors import safe_open
    with safe_open(single, "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("model.diffusion_model.") for k in keys) and any(k.endswith(".qkv.weight") for k in keys)
    # prior_prompts as train.py runs them: a second roll-out per step, every state trained again
    assert runs["zimage-12gb"]["step"]["trained_passes"] == 8
    assert runs["zimage-16gb-prior"]["prior"] and runs["zimage-16gb-prior"]["step"]["trained_passes"] == 16
    # act_quant routes every LoRA'd 8-bit linear of the tiny klein (1 double + 1 single block: 12 + 2)
    assert runs["klein-16gb-edit-act8"]["fused_layers"] == 14
    # the klein folder is one the real family reads, with the dynamic shifting its pipeline needs
    from lowvram_dopsd.families import load_family
    klein = load_family(str(tmp_path / "work" / "klein"), check_files=False)  # encoders: placeholders
    assert klein.name == "klein" and klein.scheduler().config.use_dynamic_shifting
    md = result.with_suffix(".md").read_text()
    assert "| klein-16gb-edit-act8 | FLUX.2-klein 4B (edit teacher) |" in md
    # --profile: one trained state under torch.profiler and cProfile (no GPU here: no GPU events)
    for name, r in runs.items():
        prof = r["profile"]
        assert prof["timeline"]["wall_s"] > 0 and prof["timeline"]["gpu_events"] == 0, name
        assert any("forward" in t["fn"] for t in prof["python"]["top"]), name
    assert "| zimage-12gb | " in md.split("under torch.profiler")[1] and "cProfile, klein-16gb-edit-act8" in md
