"""Where the sharpness column's change comes from: edges or flat ground (a diagnostic, issue #36).

`evaluate.quality`'s sharpness is the Laplacian variance of the gray samples over the renders'. It
reads blur (lower) and grain (higher) at once, so a LoRA that removes grain looks "blurred". This
splits the sample's Laplacian energy (mean square over all pixels, / the renders') into the part on
the renders' edges (within 2 px, the mask of `evaluate.grain`) and the part on flat ground, for the
base, SFT and D-OPSD (x0) at the main table's settings, on the same prompts and noise as the
experiment (`experiment.py`: the same seeds give the same LoRAs and samples).

    python -m experiments.toy.sharpness_split --seeds 0 1 2 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from lowvram_dopsd.toy import world
from lowvram_dopsd.toy.evaluate import eval_scenes, laplacian_var
from lowvram_dopsd.toy.pipeline import ToyDiTPipeline, sample

from .build import source_commit
from .experiment import DEFAULT_MODEL, concept_set, make_cfg, quiet_console, run_sft

LAPLACE = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=torch.float32).view(1, 1, 3, 3)


def split(x: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Mean-square gray Laplacian of `x` on the renders' edges and on flat ground, each over all pixels
    and / the renders' total (the two add up to about `evaluate.quality`'s sharpness, whose variance
    also subtracts each image's mean Laplacian)."""
    lx = F.conv2d(x.mean(1, keepdim=True), LAPLACE)
    lr = F.conv2d(real.mean(1, keepdim=True), LAPLACE)
    edge = F.max_pool2d((lr.abs() > 1e-6).float(), 5, stride=1, padding=2) > 0
    total = lr.pow(2).mean()
    return {"edges": float(lx.pow(2).where(edge, 0).mean() / total),
            "flat": float(lx.pow(2).where(~edge, 0).mean() / total)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="toy-sharp-split")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lowvram_dopsd.train import train

    pipe = ToyDiTPipeline.from_pretrained(DEFAULT_MODEL)
    work = Path(tempfile.mkdtemp(prefix="toy-split-"))
    runs = []
    for seed in a.seeds:
        images = work / f"concept-{seed}"
        prior, _ = eval_scenes(exclude=concept_set(images, 6, seed))
        real = world.to_tensor([world.render(s) for s in prior])
        caps = [s.caption() for s in prior]

        def draw(dit):
            with torch.no_grad():
                h, m = pipe.encode(caps)
                noise = torch.randn((len(caps), 3, 32, 32), generator=torch.Generator().manual_seed(100 * seed))
                return sample(dit, h, m, noise, pipe.sigmas)

        samples = {"base": draw(pipe.transformer)}
        model, lora = run_sft(make_cfg(DEFAULT_MODEL, images, work / f"sft-{seed}", work / "cache", seed, 200), images)
        lora.switch.active = "student"
        samples["sft"] = draw(model)
        cfg = make_cfg(DEFAULT_MODEL, images, work / f"dopsd-{seed}", work / "cache", seed, 200, loss="x0")
        result = train(cfg, preset="toy", console=quiet_console())
        result.lora.switch.active = "student"
        samples["dopsd-x0"] = draw(result.model)
        for name, x in samples.items():
            # sharpness as the experiment computes it: equal to its result file's, the check that these
            # are the same samples
            runs.append({"method": name, "seed": seed, "sharpness": laplacian_var(x) / laplacian_var(real),
                         **split(x, real)})
            print(f"[seed {seed}] {name:9s} sharpness {runs[-1]['sharpness']:.4f} edges {runs[-1]['edges']:.3f} flat {runs[-1]['flat']:.3f}", flush=True)
    summary = {m: {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                   for k in ("sharpness", "edges", "flat") for v in [[r[k] for r in runs if r["method"] == m]]}
               for m in dict.fromkeys(r["method"] for r in runs)}
    meta = {"command": "python -m experiments.toy.sharpness_split " + " ".join(argv if argv is not None
                                                                               else __import__("sys").argv[1:]),
            "commit": source_commit(), "torch": torch.__version__}
    out = Path(a.out)
    (out / f"{a.tag}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    lines = [f"# Sharpness split into edges and flat ground (issue #36)\n", f"Command: `{meta['command']}`, "
             f"code at commit {meta['commit']}, n = {len(a.seeds)} seeds, mean ± std.\n",
             "| method | sharpness | on the renders' edges | on flat ground |", "|---|---|---|---|"]
    lines += [f"| {m} | " + " | ".join(f"{d[k][0]:.3f} ± {d[k][1]:.3f}" for k in ("sharpness", "edges", "flat")) + " |"
              for m, d in summary.items()]
    (out / f"{a.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
