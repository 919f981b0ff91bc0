"""Do the kernels compile with every Triton that a supported torch ships? Checked without a GPU.

    python benchmarks/compile_versions.py [--versions 3.3.0,3.3.1,...] [--targets sm_80,...]
        [--layers 1] [--out benchmarks/results]

A user gets the Triton their torch pins (below), not the one CI tests (the newest). The interpreter
parity tests say what the kernels compute, on one version; only the compiler says whether they
compile there, and a candidate that does not compile stops the first training step on that card
(the autotuner skips launch failures, not compiler errors). So for each version this script
installs the Triton wheel alone (`pip install --no-deps --target`) into its own folder,
puts it first on PYTHONPATH and runs compile_report.py under it: the LoRA linear's forward and
backward, every mode, every target, every autotune candidate, and the loss, compiled by that
version's Triton and ptxas. It keeps each report (compile-report-triton-<version>.json/.md) and
writes one table over the versions (<name>.md/.json).

Nothing runs on a GPU: "compiles" and "usable" (fits in shared memory, no spills) are what this
can say; speed and numerics on a version are not covered.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the Triton each torch release pins on Linux x86_64 (its wheel metadata, read with
# `pip install --dry-run --no-deps --report - torch==X`); torch 2.6's 3.2 is below MIN_TRITON
TORCH_PINS = {"3.3.0": "2.7.0", "3.3.1": "2.7.1", "3.4.0": "2.8", "3.5.0": "2.9.0", "3.5.1": "2.9.1",
              "3.6.0": "2.10, 2.11", "3.7.0": "2.12.0", "3.7.1": "2.12.1, 2.13",
              "3.8.0": "2.14", "3.9.0": "2.15"}


def install(version: str, root: Path) -> Path:
    folder = root / version
    if not (folder / "triton" / "__init__.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", str(folder), f"triton=={version}"], check=True)
    return folder


def run_report(version: str, folder: Path, args) -> dict:
    name = f"compile-report-triton-{version}"
    kept = Path(args.out) / f"{name}.json"
    if args.reuse and kept.is_file():  # compiled by an earlier run of this script: ~10 min per version on 2 cores
        report = json.loads(kept.read_text())
        meta = report["meta"]
        if meta["targets"].keys() == set(args.targets.split(",")) and meta.get("layers") == args.layers:
            return report
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    # a version's compiled kernels stay in their own cache (Triton's cache key holds the version anyway)
    env["TRITON_CACHE_DIR"] = str(folder / ".cache")
    cmd = [sys.executable, str(HERE / "compile_report.py"), "--targets", args.targets, "--shapes", args.shapes,
           "--layers", str(args.layers), "--out", args.out, "--name", name, "--jobs", str(args.jobs)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(args.out, name + ".json")) as f:
        return json.load(f)


def summarise(report: dict) -> dict:
    """Per target: candidates, how many compile, how many are usable, and the failures' reasons."""
    out = {}
    for t in report["meta"]["targets"]:
        rows = [r for r in report["rows"] if r["target"] == t]
        failed = [r for r in rows if r.get("error")]
        out[t] = dict(candidates=len(rows), failed=len(failed), usable=sum(r["usable"] for r in rows),
                      reasons=sorted({f"{r['role']}: {r['error']}" for r in failed}))
    return out


def render(meta: dict, table: dict) -> str:
    targets = meta["targets"]
    lines = [
        "# Do the kernels compile with each Triton a supported torch ships? (compiled without a GPU)", "",
        f"- {meta['date']}, `{meta['command']}`; torch {meta['torch']} (the host code), one report per "
        "version beside this file (`compile-report-triton-<version>.md`).",
        f"- Per version: every mode, role and autotune candidate of compile_report.py on {meta['shapes']}, "
        "and the D-OPSD loss. A cell is *compiled / candidates (usable)*; *usable* = fits the target's "
        "shared memory and spills nothing. Nothing is timed or run.",
        "- *torch*: the releases that pin that Triton on Linux x86_64 (their wheel metadata; `~=3.8.0` "
        "and `~=3.9.0` for 2.14 and 2.15, `==` before); `-`: none checked. CI runs 3.9.0 beside the CPU "
        "build of torch 2.13.",
        "",
        "| Triton | torch | " + " | ".join(targets) + " |",
        "| --- | --- | " + " | ".join("---" for _ in targets) + " |",
    ]
    for version, per in table.items():
        cells = []
        for t in targets:
            s = per[t]
            ok = s["candidates"] - s["failed"]
            cell = f"{ok}/{s['candidates']} ({s['usable']})"
            cells.append(f"**{cell}**" if s["failed"] else cell)
        lines.append(f"| {version} | {TORCH_PINS.get(version, '-')} | " + " | ".join(cells) + " |")
    failures = [(v, t, why) for v, per in table.items() for t in targets for why in per[t]["reasons"]]
    if failures:
        lines += ["", "## What does not compile", "", "| Triton | target | role: error |", "| --- | --- | --- |"]
        lines += [f"| {v} | {t} | {why} |" for v, t, why in failures]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--versions", default=",".join(TORCH_PINS))
    ap.add_argument("--targets", default="sm_80,sm_86,sm_89,sm_90,sm_120")
    ap.add_argument("--shapes", default="zimage")
    ap.add_argument("--layers", type=int, default=1, help="layer shapes per model (compile_report.py --layers)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--wheels", default=os.path.expanduser("~/.cache/lowvram-dopsd/triton-versions"),
                    help="where each version's Triton is installed")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="compile-triton-versions")
    ap.add_argument("--reuse", action="store_true", help="take a version's report from --out if it is there "
                    "(same targets and layers) instead of compiling again")
    args = ap.parse_args(argv)

    table, shapes = {}, ""
    for version in args.versions.split(","):
        folder = install(version, Path(args.wheels))
        report = run_report(version, folder, args)
        assert report["meta"]["triton"] == version, f"PYTHONPATH did not pick Triton {version}: {report['meta']}"
        table[version] = summarise(report)
        shapes = "; ".join(report["meta"]["shapes"])
        print(f"triton {version}: " + ", ".join(f"{t} {s['candidates'] - s['failed']}/{s['candidates']}"
                                                 for t, s in table[version].items()), flush=True)
    import torch

    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, shapes=shapes,
                targets=args.targets.split(","),
                command=" ".join(["python benchmarks/compile_versions.py", *(argv or sys.argv[1:])]))
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump(dict(meta=meta, versions=table), f, indent=1)
    md = render(meta, table)
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
