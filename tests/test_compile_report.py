"""benchmarks/compile_report.py and compile_versions.py: a candidate that does not compile is a row
of the report with the compiler's reason, not a crash of the whole report (which is how Triton
3.3.0's missing sm_120 matrix multiplies were found, kernels.utils.NO_MMA). The real compiles run in
tests/kernels/test_kernels_aot.py; here the compiler is replaced, so these run in a second."""
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compile_report  # noqa: E402
import compile_versions  # noqa: E402

# what Triton 3.3.0 wrote to file descriptor 2 for a tl.dot on sm_120 (the whole message, as captured)
SAID_330 = (
    "python: /project/lib/Dialect/TritonGPU/Transforms/AccelerateMatmul.cpp:42: int mlir::triton::gpu::"
    "(anonymous namespace)::getMMAVersionSafe(int, DotOp): Assertion `false && \"computeCapability not "
    "supported\"' failed.\nmodule {\n}\n/work/main/kernels/lora_linear.py:213:0: error: Failures have been "
    "detected while processing an MLIR pass pipeline\n")


def test_compiler_messages_are_captured_from_the_file_descriptor():
    with compile_report.compiler_messages() as said:
        os.write(2, b"error: written below Python, as MLIR does\n")
    assert "".join(said) == "error: written below Python, as MLIR does\n"


def test_failure_text_names_the_compilers_reason():
    text = compile_report.failure_text(RuntimeError("PassManager::run failed"), SAID_330)
    assert text == ("RuntimeError: PassManager::run failed (AccelerateMatmul.cpp: Assertion `false && "
                    "\"computeCapability not supported\"' failed.)")
    assert compile_report.failure_text(ValueError("x"), "") == "ValueError: x"


def test_a_candidate_that_does_not_compile_is_a_row_and_is_reported(monkeypatch):
    from lowvram_dopsd.kernels import aot

    def compile_launch(launch, target, configs):
        if launch.name != "_mm_main":
            return real(launch, target, configs)
        os.write(2, SAID_330.encode())
        raise RuntimeError("PassManager::run failed")

    real = lambda launch, target, configs: [aot.Compiled(launch.label, launch.name, {"BLOCK": 1024}, 0, 32, 0, (),
                                                         True, 0, {})]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # aot refuses to run interpreted; nothing is compiled here
    monkeypatch.setattr(aot, "compile_launch", compile_launch)
    rows = compile_report.compile_target("sm_120", ["int8"], ["zimage"], rank=64, layers=1)
    failed = [r for r in rows if r.get("error")]
    assert failed and {r["kernel"] for r in failed} == {"_mm_main"}
    assert {r["role"] for r in failed} == {"y = x·W + LoRA (base GEMM)"}
    assert all("BLOCK_P" in r["config"] and "computeCapability not supported" in r["error"] for r in failed)
    assert len(rows) > len(failed)  # the other launches were still compiled

    merged = compile_report.merge(rows)
    assert not any(m["usable"] for m in merged if m["error"])
    meta = dict(date="d", command="c", triton="3.3.0", ptxas="p", torch="t", rank=64, tokens=4608,
                shapes=["zimage: attn"], targets={"sm_120": vars(aot.TARGETS["sm_120"])})
    md = compile_report.render(meta, merged)
    assert f"0/{len(failed)} (**{len(failed)} fail**)" in md
    assert "## Candidates that do not compile" in md and "**does not compile**" in md

    table = {"3.3.0": compile_versions.summarise(dict(meta=meta, rows=merged))}
    assert table["3.3.0"]["sm_120"]["failed"] == len(failed)
    md = compile_versions.render(dict(meta, targets=["sm_120"], shapes="zimage: attn"), table)
    assert f"| 3.3.0 | 2.7.0 | **{len(merged) - len(failed)}/{len(merged)}" in md
    assert "computeCapability not supported" in md
