"""What running under torchrun costs a one-GPU run: the same training, plain and as a job of one process.

    python benchmarks/bench_dist_overhead.py --out benchmarks/results        # CUDA if there is one
    python benchmarks/bench_dist_overhead.py --tiny --out /tmp/r              # CPU smoke test (tests/)

A job of one process joins torchrun's process group and runs the watchdog thread, and the trainer makes
its distributed calls (share of the batch, loss means, gradient sum, step-end exchange, drift check at
checkpoints), each of which does nothing at world size 1. The two commands alternate (`--repeat` times
each) on the tiny Z-Image model; the figure is the median of every run's mean s/step over steps 2 on
(metrics.jsonl `sec`; step 1 compiles). The tiny model's steps are short, so fixed per-step costs weigh
more here than in a real model's step: an upper bound. Criterion (issue #32): at most 2 %.

Results: <out>/dist-overhead-<device>.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lowvram_dopsd.tiny import make_tiny_qwen3vl, make_tiny_zimage  # noqa: E402


def run(launcher: list[str], args: list[str], out: Path) -> float:
    """Mean seconds per step after the first, of one training run."""
    subprocess.run([*launcher, *args, "--output", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    secs = [json.loads(line)["sec"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(secs[1:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 4 steps, once each")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    steps, repeat = (4, 1) if a.tiny else (a.steps, a.repeat)
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    work = Path(tempfile.mkdtemp(prefix="dist-overhead-"))
    model, vlm = work / "tiny-zimage", work / "tiny-qwen3vl"
    make_tiny_zimage(model)
    make_tiny_qwen3vl(vlm, text_encoder_dir=model / "text_encoder")
    images = str(resources.files("lowvram_dopsd") / "assets" / "demo")
    args = ["train", "--preset", "cpu-demo", "--model", str(model), "--teacher-encoder", str(vlm), "--images", images,
            "--cache-dir", str(work / "cache"), "--steps", str(steps), "--device", device, "--batch-size", "4",
            "--set", f"save_every={steps}"]
    launchers = {"plain": [sys.executable, "-m", "lowvram_dopsd"],
                 "torchrun, 1 process": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc-per-node=1", "-m", "lowvram_dopsd"]}
    times: dict[str, list[float]] = {k: [] for k in launchers}
    for i in range(repeat):
        for name, launcher in launchers.items():
            times[name].append(run(launcher, args, work / f"out-{len(times[name])}-{name[:5]}"))
            print(f"{name:20s} {times[name][-1]:.4f} s/step", flush=True)
    plain, job = (statistics.median(times[k]) for k in launchers)
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu-{platform.machine()}"
    result = {"device": name, "torch": torch.__version__, "steps": steps, "repeat": repeat, "s_per_step": times,
              "overhead_pct": round(100 * (job / plain - 1), 2),
              "command": "python benchmarks/bench_dist_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = name.lower().replace(" ", "-") + ("-tiny" if a.tiny else "")
    (out / f"dist-overhead-{slug}.json").write_text(json.dumps(result, indent=1))
    (out / f"dist-overhead-{slug}.md").write_text(
        f"# torchrun with one process against a plain run: {name}\n\n{result['command']}; torch {torch.__version__}, "
        f"tiny Z-Image, batch 4, {steps} steps, median of {repeat} runs each (mean s/step over steps 2 on)\n\n"
        f"| run | s/step |\n|---|---|\n| plain | {plain:.4f} |\n| torchrun, 1 process | {job:.4f} |\n\n"
        f"Overhead: {result['overhead_pct']} % (criterion: at most 2 %).\n")
    print(f"overhead {result['overhead_pct']} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
