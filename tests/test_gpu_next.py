"""benchmarks/gpu_next.sh runs on a GPU machine, which sessions get rarely: its stages must not rot between
them. Every stage names only configs bench_memory.py defines, and the levers' stage runs end to end on the
CPU with --tiny."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_next.sh"


def test_every_stage_names_configs_that_exist():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_memory import CONFIGS

    named = {c for line in re.findall(r"--configs\s+(\S+)", SCRIPT.read_text()) for c in line.split(",")}
    assert named and named <= set(CONFIGS), named - set(CONFIGS)


def test_the_levers_stage_runs_tiny_on_the_cpu(tmp_path):
    """Stage 13 (each speed lever against the default, Z-Image) with --tiny: every config trains, records
    the attention kernel of each pass, and the levers show in its record. The script runs in a copy of the
    tree, as on a GPU machine: it links kernels/ and presets/ into the package it runs."""
    from test_bench_memory import _copy_tree

    tree = _copy_tree(tmp_path / "tree")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 = this environment's
    proc = subprocess.run(["bash", "benchmarks/gpu_next.sh", "13", "--tiny"], cwd=tree, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = (tmp_path / "out").glob("memory-*-tiny.json")
    assert all(r["code"] == str(tree) for r in json.loads(result.read_text())["results"])  # the copy's code ran
    runs = {r["config"]: r for r in json.loads(result.read_text())["results"]}
    assert list(runs) == ["zimage-16gb-fused", "zimage-16gb-compile", "zimage-16gb-keep", "zimage-16gb-cudnn"]
    for name, r in runs.items():
        assert "error" not in r and r["step"]["losses_finite"], (name, r.get("error"))
        att = r["levers"]["attention"]
        assert set(att) == {"backend", "teacher", "student"} and att["teacher"], (name, att)
    assert runs["zimage-16gb-fused"]["levers"]["attention"]["backend"] == ["native"]
    assert runs["zimage-16gb-cudnn"]["levers"]["attention"]["backend"] == ["_native_math"]  # cuDNN's CPU stand-in
    assert runs["zimage-16gb-compile"]["levers"]["compiled_blocks"] == 4
    # the tiny model fits the 16gb budget many times over: the planner keeps every block, and says so
    keep = runs["zimage-16gb-keep"]
    kept = keep["levers"]["kept_blocks"]
    assert sum(kept.values()) == 4 and keep["plan"]["kept_blocks"] == kept
    # the same inputs and initial LoRA in every config; dynamo's eager backend on the CPU runs the same kernels
    base = runs["zimage-16gb-fused"]["first_losses"]
    assert runs["zimage-16gb-compile"]["first_losses"] == base and keep["first_losses"] == base
    md = result.with_suffix(".md").read_text()
    assert "| zimage-16gb-compile | native: teacher: " in md
