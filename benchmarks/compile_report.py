"""What each kernel needs on each GPU architecture, compiled here, without a GPU (kernels/aot.py).

    TRITON_INTERPRET=0 python benchmarks/compile_report.py [--targets sm_80,sm_86,sm_89,sm_90,sm_120]
        [--shapes zimage,klein] [--layers N] [--modes int8,fp8,int8-act8] [--out benchmarks/results]

(`--targets sm_75` compiles for a Turing GPU too, below kernels.utils.MIN_CAPABILITY: what it shows is
why the kernels do not run there; results/compile-report-sm75.md.)

For each target the real host code of one LoRA linear (bf16 activations, rank 64, M = 4096 + 512
tokens, the layer shapes of bench_kernels.py) runs forward and backward on meta tensors with its
launches recorded, and every recorded launch is compiled in every autotune candidate by Triton and
ptxas. Per candidate: shared memory (and whether it fits the target's per-block maximum),
registers and spilled bytes per thread (ptxas -v), the tensor-core instructions in the SASS, and
what the GEMM's K loop issues per iteration (instructions, MMAs, synchronous global loads, async
copies, shared-memory loads and stores: kernels.aot.k_loop).
A candidate is *usable* when it compiles, fits and does not spill; one that does not compile is
reported with the compiler's reason (benchmarks/compile_versions.py runs this report once per
Triton release). The D-OPSD loss kernel is compiled for a
1×16×128×128 latent. Nothing is timed: that needs the GPU (bench_kernels.py).

Modes: int8 / fp8 weights with exact activations (the default path: dx on cuBLAS after a
dequantising pass), and int8 weights with act_quant = "int8" (both base GEMMs int8 x int8).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("TRITON_INTERPRET", "0")
import torch  # noqa: E402

try:
    import triton  # noqa: E402
except ImportError:  # pragma: no cover
    sys.exit("compile_report.py needs triton")

from lowvram_dopsd.kernels import aot, utils  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import SHAPES, TOKENS  # noqa: E402

MODES = {"int8": ("int8", False), "fp8": ("fp8", False), "int8-act8": ("int8", True)}
# what each recorded launch computes, by (phase, kernel handle)
ROLES = {
    ("forward", "_mm_main"): "y = x·W + LoRA (base GEMM)",
    ("forward", "_quant_rows_kernel"): "quantise x per token",
    ("backward", "_mm_main"): "dx = dy·W + LoRA (base GEMM)",
    ("backward", "_quant_rows_kernel"): "quantise dy⊙s_w per token",
    ("backward", "_scale_kernel"): "dequantise W (dx then on cuBLAS)",
    ("backward", "_transpose_kernel"): "transpose Wq (dx's int8 operand)",
    ("backward", "_mm_skinny_p"): "dA = s·uᵀ·x",
    ("backward", "_mm_skinny_q"): "dB = s·dyᵀ·t",
    ("loss", "_dopsd_loss_kernel"): "D-OPSD loss + grad",
    ("loss", "_scale_grad_kernel"): "loss grad × grad_output",
}


def compile_target(tname: str, modes: list, shapes: list, rank: int, layers: int = 0) -> list:
    target, rows, t0 = aot.TARGETS[tname], [], time.time()
    for mode in modes:
        jobs = [(f"{fam}: {name}", aot.lora_linear_step(TOKENS, K, N, rank, *MODES[mode]))
                for fam in shapes for name, K, N, _ in SHAPES[fam][:layers or None]]
        if mode == modes[0]:
            jobs.append(("loss", aot.loss_step()))
        for shape, run in jobs:
            for launch in aot.record(run, target):
                for cfg in launch.configs():  # one at a time: a candidate that does not compile is a row too
                    base = dict(target=tname, mode="-" if shape == "loss" else mode, shape=shape,
                                role=ROLES.get((launch.label, launch.name), f"{launch.label} {launch.name}"),
                                kernel=launch.name)
                    try:
                        with compiler_messages() as said:
                            (c,) = aot.compile_launch(launch, target, [cfg])
                    except Exception as exc:  # noqa: BLE001 - not hidden: the row and the report say what failed
                        kw = {**launch.kwargs, **(cfg.all_kwargs() if cfg else {})}
                        rows.append(dict(base, config=aot.shown_config(kw), error=failure_text(exc, "".join(said)),
                                         shared=0, fits=False, registers=0, spill_bytes=0, mma=[], loop={}))
                        continue
                    rows.append(dict(base, config=c.config, shared=c.shared, fits=c.fits, registers=c.registers,
                                     spill_bytes=c.spill_bytes, mma=list(c.mma), loop=c.loop))
        print(f"[{time.time() - t0:5.0f}s] {tname} {mode}: {len(rows)} rows", flush=True)
    return rows


@contextlib.contextmanager
def compiler_messages():
    """Capture what the compiler writes to file descriptor 2 (MLIR diagnostics and C++ assertions do
    not go through Python's sys.stderr) into the list it yields, as one string on exit."""
    sys.stderr.flush()
    said, saved = [], os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            said.append(f.read().decode(errors="replace"))


def failure_text(exc: Exception, said: str) -> str:
    """The exception and the compiler's own reason (an assertion or `error:` line), on one line."""
    # "python: /project/lib/.../AccelerateMatmul.cpp:42: int ...(int, DotOp): Assertion `...' failed."
    asserts = re.findall(r"/([\w.]+\.cpp):\d+: .*?(Assertion .*)", said)
    errors = re.findall(r"error: (.*)", said)
    why = [f"{src}: {text}" for src, text in asserts] + errors
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" + (f" ({why[0][:160]})" if why else "")


def ptxas_version() -> str:
    out = subprocess.run([aot.ptxas_path(90), "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(t for t, tg in aot.TARGETS.items()  # the GPUs the kernels run on
                                                  if divmod(tg.cap, 10) >= utils.MIN_CAPABILITY))
    ap.add_argument("--shapes", default="zimage,klein")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--layers", type=int, default=0, help="the first N layer shapes of each model (0 = all); "
                    "they compile to the same kernels, as the shapes are all multiples of 16")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="compile-report")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="targets compiled in parallel")
    args = ap.parse_args(argv)

    targets = args.targets.split(",")
    work = [(t, args.modes.split(","), args.shapes.split(","), args.rank, args.layers) for t in targets]
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(targets))) as pool:  # ptxas is single-threaded
        rows = [r for part in pool.map(compile_target, *zip(*work)) for r in part]

    meta = dict(
        date=datetime.date.today().isoformat(), host=platform.node(), python=platform.python_version(),
        torch=torch.__version__, triton=triton.__version__, ptxas=ptxas_version(),
        command=" ".join(["TRITON_INTERPRET=0 python benchmarks/compile_report.py", *(argv or sys.argv[1:])]),
        rank=args.rank, tokens=TOKENS, targets={k: vars(aot.TARGETS[k]) for k in targets}, layers=args.layers,
        shapes=[f"{fam}: {name}" for fam in args.shapes.split(",") for name, *_ in SHAPES[fam][:args.layers or None]],
    )
    merged = merge(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=merged), f, indent=1)
    md = render(meta, merged)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(md)
    print(md)


def _cfg(c: dict) -> str:
    if "BLOCK_R" not in c:  # an elementwise / row kernel
        return f"BLOCK {c.get('BLOCK', c.get('BLOCK_K'))}, {c.get('num_warps', 4)} warps"
    return f"{c['BLOCK_P']}×{c['BLOCK_Q']}×{c['BLOCK_R']} w{c['num_warps']} s{c['num_stages']}"


def _loop(lp: dict) -> str:
    if not lp:
        return "-"
    sync = f"**{lp['ldg']} LDG**, " if lp["ldg"] else ""
    return f"{lp['inst']} inst, {lp['mma']} MMA, {sync}{lp['ldgsts']} async, {lp['lds']} LDS, {lp['sts']} STS"


def merge(rows: list) -> list:
    """One row per (target, mode, role, candidate): the worst shared memory / registers / spills
    over the layer shapes (real shapes are all multiples of 16, so they mostly agree)."""
    merged = {}
    for r in rows:
        key = (r["target"], r["mode"], r["role"], _cfg(r["config"]))
        m = merged.setdefault(key, dict(r, candidate=key[3], shapes=[], shared=0, registers=0, spill_bytes=0,
                                        fits=True, mma=[], loop={}))
        m["shapes"].append(r["shape"])
        m["shared"] = max(m["shared"], r["shared"])
        m["registers"] = max(m["registers"], r["registers"])
        m["spill_bytes"] = max(m["spill_bytes"], r["spill_bytes"])
        m["fits"] = m["fits"] and r["fits"]
        m["mma"] = sorted(set(m["mma"]) | set(r["mma"]))
        m["loop"] = {k: max(v, m["loop"].get(k, 0)) for k, v in r["loop"].items()}
        m["error"] = m.get("error") or r.get("error")  # failing on one shape is failing
    for m in merged.values():
        m.pop("shape")
        m["usable"] = m["fits"] and m["spill_bytes"] == 0 and not m["error"]
    return list(merged.values())


def render(meta: dict, merged: list) -> str:
    out = [
        "# What the kernels need per GPU architecture (compiled without a GPU)", "",
        f"- {meta['date']}, `{meta['command']}`; triton {meta['triton']}, {meta['ptxas']}, torch {meta['torch']}.",
        f"- LoRA linear: bf16 activations, rank {meta['rank']}, M = {meta['tokens']} tokens, the layer shapes "
        f"{'; '.join(meta.get('shapes', ['of bench_kernels.py']))}, forward and backward; compiled in every "
        "autotune candidate the autotuner would time. Figures are the worst over the shapes.",
        "- *usable*: fits the per-block shared-memory maximum and spills nothing. The autotuner skips "
        "candidates that do not launch and times the rest, so a spilling one costs first-step compile "
        "time, and speed only if it still wins.",
        "- *K loop*: what the GEMM's main loop issues per iteration, per thread, from the SASS "
        "(kernels.aot.k_loop): a synchronous global load (LDG) there makes every iteration wait on "
        "global memory; async copies (LDGSTS) overlap the MMAs.",
        "",
    ]
    targets = list(dict.fromkeys(m["target"] for m in merged))
    groups = list(dict.fromkeys((m["mode"], m["role"]) for m in merged))
    out += ["## Usable candidates", "", "| mode | role | " + " | ".join(targets) + " |",
            "| --- | --- | " + " | ".join("---" for _ in targets) + " |"]
    for mode, role in groups:
        cells = []
        for t in targets:
            ms = [m for m in merged if (m["target"], m["mode"], m["role"]) == (t, mode, role)]
            failed = sum(bool(m["error"]) for m in ms)
            cells.append(f"{sum(m['usable'] for m in ms)}/{len(ms)}" + (f" (**{failed} fail**)" if failed else ""))
        out.append(f"| {mode} | {role} | " + " | ".join(cells) + " |")
    out.append("")
    failures = [m for m in merged if m["error"]]
    if failures:
        out += ["## Candidates that do not compile", "",
                "The autotuner on such a card would stop the first step on them (a compiler error is not "
                "one of the launch failures it skips).", "",
                "| target | mode | role | candidate | error |", "| --- | --- | --- | --- | --- |"]
        out += [f"| {m['target']} | {m['mode']} | {m['role']} | {m['candidate']} | {m['error']} |" for m in failures]
        out.append("")
    for tname in targets:
        t = meta["targets"][tname]
        out += [f"## {tname} ({t['example']}; {t['smem'] // 1024} KB shared per block)", "",
                "| mode | role | candidate | shared KB | fits | regs | spills B | tensor-core SASS | K loop |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in (m for m in merged if m["target"] == tname):
            if m["error"]:
                out.append(f"| {m['mode']} | {m['role']} | {m['candidate']} | - | **does not compile** | - | - | - | - |")
                continue
            spill = f"**{m['spill_bytes']}**" if m["spill_bytes"] else "0"
            out.append(f"| {m['mode']} | {m['role']} | {m['candidate']} | {m['shared'] / 1024:.0f} | "
                       f"{'yes' if m['fits'] else '**no**'} | {m['registers']} | {spill} | "
                       f"{', '.join(m['mma']) or '-'} | {_loop(m['loop'])} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
