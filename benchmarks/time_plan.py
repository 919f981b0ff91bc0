"""The time planner's table for every GPU it knows: the paper's run (16gb preset, 1024², 1000 steps x batch 4)
of each supported model, as `lowvram-dopsd plan --gpu NAME` predicts it. CPU only (meta models, no weights).

    python benchmarks/time_plan.py --out benchmarks/results      # writes time-plan.md and .json

The FLOPs are counted (timeplan.py); the seconds are measurements only where the table says "measured" (the
H100, from benchmarks/results); every other row is a prediction from spec-sheet rates.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def table(preset: str = "16gb") -> dict:
    from lowvram_dopsd import plan, timeplan
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.gpus import GPUS

    out = {"preset": preset, "models": []}
    for family in plan.planned_families():
        for model in family.hf_repo_ids:  # each published config (a family measured on one of them)
            mc = plan.resolve_model(model)
            settings = plan.run_settings(load_config(preset, {"model": model}))
            rows = [timeplan.predict(mc, settings, gpu).to_dict() for gpu in GPUS]
            out["models"].append({"model": model, "family": family.name, "rows": rows})
    return out


def markdown(data: dict) -> str:
    lines = [f"# Time planner: the paper's run on every GPU it knows ({data['preset']} preset, 1024², 1000 steps x "
             "batch 4)", "", "Written by `python benchmarks/time_plan.py` (CPU; the FLOPs counted on meta models, "
             "lowvram_dopsd/timeplan.py). Seconds per roll-out are **measured** only where the row says so (the "
             "H100, benchmarks/results); every other row is a **prediction**: the counted FLOPs at the share of "
             "the spec-sheet tensor rate that the measured H100 roll-out reached (sources in lowvram_dopsd/gpus.py)."
             " The act8 columns predict `--act-quant int8` (the 8-bit linears on int8 tensor cores), which is off "
             "by default.", ""]
    for m in data["models"]:
        first = m["rows"][0]
        st, ref = first["tflop_per_state"], first["reference"]
        lines += [f"## {m['model']}", "",
                  f"Per trained state (one sample): teacher {st['teacher']:.1f}, student {st['student']:.1f}, "
                  f"recompute {st['recompute']:.1f}, backward {st['backward']:.1f} TFLOP; "
                  f"{first['tflop_per_rollout']:.0f} TFLOP per roll-out ({first['states']} states, "
                  f"{first['trained_states']} trained). Efficiency {100 * first['efficiency']:.1f} % of the "
                  f"{ref['gpu']}'s rate, what a measured {ref['model']} roll-out reached ({ref['source']}"
                  + (f"; {ref['borrowed']}" if ref["borrowed"] else "") + ").", "",
                  "| GPU | bf16 TFLOPS | s per roll-out | run (h) | | act8 s per roll-out | act8 run (h) |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in m["rows"]:
            act8 = r.get("act8_seconds_per_rollout")
            act8_cells = "| |" if act8 is None else f"| {act8:.2f} | {r['rollouts'] * act8 / 3600:.1f} |"
            lines.append(f"| {r['gpu']} | {r['bf16_tflops']:g} | {r['seconds_per_rollout']:.2f} | {r['hours']:.1f} "
                         f"| {'**measured**' if r['measured'] else 'predicted'} {act8_cells}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    data = table()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "time-plan.json").write_text(json.dumps(data, indent=1))
    (out / "time-plan.md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
