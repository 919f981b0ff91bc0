"""benchmarks/profile_host.py profiles a LoRA'd linear's host time on a GPU machine, which sessions get
rarely: its --tiny CPU mode runs every path the trainer has (fused, fused with int8 activations,
quanto, bf16) through the same code so that it does not rot in between."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_host_tiny_runs_every_path(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_host.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "profile-host-cpu-tiny.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["fused", "fused-act8", "quanto", "bf16"]
    for r in rows:
        assert r["host_fwd_ms"] > 0 and r["host_fwd_bwd_ms"] > 0, r
    # the fused paths went through the trainer's fused layer (its torch reference on the CPU), profiled
    for r in rows[:2]:
        names = [t["fn"] for t in r["python"]["top"]]
        assert any("lora_linear" in n for n in names), names
    md = (tmp_path / "profile-host-cpu-tiny.md").read_text()
    assert "| tiny 96->160 | fused-act8 |" in md and "## cProfile, fused on tiny 96->160" in md


def test_kernel_table_sums_gpu_time_by_kind():
    """The per-kernel profile of bench_memory --profile: kernels sorted by GPU time, and the time per kind
    (names as CUDA, cuBLAS, flash attention, inductor and our kernels give them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from hostprof import kernel_kind, kernel_table

    names = {"_qlora_mm_kernel": "gemm (ours)", "sm90_xmma_gemm_bf16bf16_bf16f32": "gemm (cuBLAS/CUTLASS)",
             "pytorch_flash::flash_fwd_kernel<...>": "attention", "fmha_cutlassB_bf16_aligned": "attention",
             "triton_red_fused_mean_pow_0": "compiled (inductor)", "void at::native::vectorized_elementwise_kernel":
             "elementwise", "Memcpy HtoD (Pageable -> Device)": "copy / cast", "_dopsd_loss_kernel": "loss (ours)",
             "some_new_kernel": "other"}
    assert {n: kernel_kind(n) for n in names} == names
    table = kernel_table({"_qlora_mm_kernel": (10, 6_000_000), "fmha_cutlassB_bf16_aligned": (4, 3_000_000),
                          "triton_red_fused_mean_pow_0": (20, 1_000_000)}, top=2)
    assert table["total_ms"] == 10.0 and [t["name"] for t in table["top"]] == ["_qlora_mm_kernel",
                                                                              "fmha_cutlassB_bf16_aligned"]
    assert table["kinds"]["gemm (ours)"] == {"n": 10, "ms": 6.0, "pct": 60.0}
    assert kernel_table({}) == {"total_ms": 0.0, "kinds": {}, "top": []}
