"""benchmarks/bench_memory.py runs only on a GPU machine, which sessions get rarely: its --tiny CPU
mode (the same code on tiny configs of the real classes) keeps it from rotting in between."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_memory_tiny_runs_the_trainers_families(tmp_path):
    configs = ("zimage-12gb,klein-16gb-edit-act8,zimage-16gb-prior,zimage-16gb-file,zimage-16gb-ts2,klein9b-16gb-edit,"
               "flux3-16gb-vlm")
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
    # another public id of a family (its own published configs), and FLUX.3 with its vlm teacher: 16 steps,
    # 4 of them trained by default
    assert runs["klein9b-16gb-edit"]["model"] == "black-forest-labs/FLUX.2-klein-9B"
    assert runs["flux3-16gb-vlm"]["plan"]["settings"]["teacher"] == "vlm"
    assert (runs["flux3-16gb-vlm"]["step"]["rollout_steps"], runs["flux3-16gb-vlm"]["step"]["trained_passes"]) == (16, 4)
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
    # train_states = 2: the whole 8-step roll-out, learning at 2 of its states
    ts2 = runs["zimage-16gb-ts2"]
    assert ts2["step"]["trained_passes"] == 2 and ts2["step"]["rollout_steps"] == 8
    assert ts2["settings"]["train_states"] == 2
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


def _copy_tree(dst: Path) -> Path:
    """The code bench_memory imports, as benchmarks/tree_at.sh unpacks a commit (here: the working tree)."""
    def skip(folder, names):  # what tree_at.sh leaves out: recorded results, the toy checkpoints
        return [n for n in names if n == "__pycache__" or Path(folder, n) in (ROOT / "benchmarks" / "results",
                                                                             ROOT / "lowvram_dopsd" / "assets" / "toy")]

    for name in ("lowvram_dopsd", "kernels", "presets", "benchmarks", "tests"):
        shutil.copytree(ROOT / name, dst / name, ignore=skip)
    return dst


def test_bench_memory_trees_alternate_and_each_run_imports_its_own_tree(tmp_path):
    """--trees: a before/after on one machine. Each run's child imports its tree's code (the copy's, not the
    installed checkout's), the trees alternate A B, B A, and the report puts their step times side by side."""
    other = _copy_tree(tmp_path / "other")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--tiny", "--device", "cpu",
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--configs", "zimage-12gb",
           "--trees", f"other={other},this={ROOT}", "--rounds", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "out").glob("memory-*-tiny.json")
    runs = json.loads(result.read_text())["results"]
    assert [(r["tree"], r["round"]) for r in runs] == [("other", 0), ("this", 0), ("this", 1), ("other", 1)]
    assert [r["code"] for r in runs] == [str(other), str(ROOT), str(ROOT), str(other)]
    assert all("error" not in r and r["config"] == f"zimage-12gb @ {r['tree']}" for r in runs), runs
    md = result.with_suffix(".md").read_text()
    (row,) = [ln for ln in md.splitlines() if ln.startswith("| zimage-12gb | ")]
    assert row.count("(**") == 2 and row.rstrip(" |").split("| ")[-1].replace(".", "").isdigit(), row

    # a tree that would import someone else's kernels (here: none of its own) is refused before any run
    shutil.rmtree(other / "kernels")
    (other / "lowvram_dopsd" / "kernels").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0 and "does not import its own code" in proc.stderr, proc.stderr[-2000:]
