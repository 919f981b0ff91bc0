"""Issue #7: learn a new concept in the toy world with vanilla SFT LoRA vs D-OPSD LoRA, measured at 4 steps.

    python -m experiments.toy.experiment --out benchmarks/results            # the table (3 seeds), from the repo root
    python -m experiments.toy.experiment --out benchmarks/results --ablations

Per seed: a concept set of N images of the never-seen shape (a ring) in random scenes, captioned
with the trigger in the shape slot ("a large red sks at the left on gray background"). Methods,
all with the same LoRA (targets, rank, alpha), steps, batch, learning rate and optimizer:
  base        the 4-step distilled model, no LoRA;
  sft         vanilla SFT LoRA: flow-matching loss on noised training images (sigma ~ shifted
              logit-normal, the base's own training distribution), student (text-only) condition; written here;
  dopsd-v / dopsd-x0   D-OPSD through the project's `train()` (loss `velocity` / `x0`), preset `toy`.
Ablations: teacher = frozen base LoRA-less (EMA decay ~1), teacher = student copy (decay 0),
one random state per roll-out (train_states = 1).
dopsd-x0-ema0.9999: the paper's EMA decay (preset toy: 0.999). --lr sets every method's learning rate
(the sweep in docs/toy.md); its rows are labelled "<method> lr=<lr>".
Prior arms (--methods dopsd-x0-prior dopsd-x0-prior-w<weight>): prior_prompts at prior_weight 1 or <weight>
(the prior-weight sweep in docs/toy.md).
8-bit arms (--methods dopsd-x0-qint8 dopsd-x0-act8): the base quantised to int8 (quanto qint8), and
the same with the base GEMMs on per-token int8 activations (act_quant = "int8").
EMA-precision arms (--methods dopsd-x0-ema-bf16 dopsd-x0-ema0.9999-bf16): the teacher's EMA in bf16, as
the authors' run keeps it (bf16_ema), at EMA 0.999 and 0.9999.
Also reported: the TEACHER's own concept rate (in-context: training image + caption) — an upper
bound on what the self-teacher can transmit.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from lowvram_dopsd.toy import world
from lowvram_dopsd.toy.evaluate import classify, eval_scenes, evaluate, grid
from lowvram_dopsd.toy.models import load_module
from lowvram_dopsd.toy.pipeline import ToyDiTPipeline, sample

from .build import ROOT, source_commit, train_sigmas

DEFAULT_MODEL = ROOT / "lowvram_dopsd" / "assets" / "toy" / "model"


def concept_set(folder: Path, n: int, seed: int) -> list[world.Scene]:
    rng = random.Random(1000 + seed)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = []
    for i in range(n):
        s = world.random_scene(rng, shapes=(world.CONCEPT_SHAPE,))
        scenes.append(s)
        Image.fromarray(world.render(s)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(s.caption(world.TRIGGER))
    return scenes


def prior_prompts(n: int = 12) -> list[str]:
    """The prior_prompts of the `dopsd-x0-prior` variant (fixed before it was first run): captions of
    named-shape scenes, the world the LoRA should leave alone, none of them an evaluation prompt."""
    held_out = {s.caption() for s in eval_scenes()[0]}
    rng, out = random.Random(777), []
    while len(out) < n:
        caption = world.random_scene(rng).caption()
        if caption not in held_out and caption not in out:
            out.append(caption)
    return out


def prior_variant(method: str) -> dict | None:
    """`dopsd-x0-prior-w<weight>` (e.g. w0.25): the prior arm at that prior_weight; None for other names."""
    m = re.fullmatch(r"dopsd-x0-prior-w(\d+(?:\.\d+)?)", method)
    return {"loss": "x0", "prior_prompts": prior_prompts(), "prior_weight": float(m[1])} if m else None


@contextlib.contextmanager
def bf16_ema():
    """The authors' EMA teacher, as their run appears to keep it: DeepSpeed with bf16 enabled casts the
    whole transformer, the frozen teacher adapter included, to bf16, and their EMA
    `teacher.mul_(decay).add_(student, alpha=1 - decay)` then rounds to bf16 after each op (8 bits of
    mantissa: an increment under about 1/512 of the teacher's value rounds away). Our teacher stays
    fp32; here each update runs in bf16 and the fp32 buffers hold its exact bf16 values."""
    from lowvram_dopsd.lora import DualLoRA

    fp32_update = DualLoRA.ema_update

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        for teacher, student in zip(self._teacher_buffers(), self.student_parameters()):
            t = teacher.to(torch.bfloat16)
            t.mul_(decay).add_(student.detach().to(torch.bfloat16), alpha=1.0 - decay)
            teacher.copy_(t)

    DualLoRA.ema_update = ema_update
    try:
        yield
    finally:
        DualLoRA.ema_update = fp32_update


def teacher_b_share(lora) -> float:
    """|B_teacher| / |B_student| over all layers (Frobenius): how far the EMA teacher has followed the
    student (B starts at 0 in both; a frozen teacher stays at 0, a copy of the student is at 1)."""
    t, s = ({k: v.detach() for k, v in lora.tensors(role).items()} for role in ("teacher", "student"))
    keys = [k for k in s if k.endswith("lora_B.weight")]
    num = sum(float(t[k].float().pow(2).sum()) for k in keys) ** 0.5
    return num / max(sum(float(s[k].float().pow(2).sum()) for k in keys) ** 0.5, 1e-12)


def quiet_console():
    from rich.console import Console
    return Console(file=io.StringIO(), width=120)


def make_cfg(model: Path, images: Path, out: Path, cache: Path, seed: int, steps: int, **kw):
    from lowvram_dopsd.config import load_config
    overrides = {"model": str(model), "images": str(images), "output": str(out), "cache_dir": str(cache),
                 "seed": seed, "steps": steps, "save_every": steps + 1, **kw}
    return load_config("toy", overrides)


def run_sft(cfg, images: Path) -> tuple[torch.nn.Module, object]:
    """Vanilla SFT LoRA with the trainer's own LoRA machinery, optimizer and data."""
    from lowvram_dopsd import data
    from lowvram_dopsd.families import load_family
    from lowvram_dopsd.lora import DualLoRA
    from lowvram_dopsd.data import BucketSampler
    from lowvram_dopsd import optim

    family = load_family(cfg.model)
    ds = data.scan(str(images), cfg.caption, cfg.trigger, cfg.resolution)
    conds = family.encode_student([it.caption for it in ds.items], cfg, torch.device("cpu"))
    x0_all = world.to_tensor([world.render_file(it.image_path) for it in ds.items])
    torch.manual_seed(cfg.seed)
    model = family.load_transformer(cfg, torch.device("cpu"), torch.float32)
    lora = DualLoRA.attach(model, family.lora_targets, cfg.rank, cfg.alpha, seed=cfg.seed, init=cfg.lora_init)  # as train()
    params = lora.student_parameters()
    opt = optim.make_optimizer(params, cfg, cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    # the base's own training distribution of sigmas (its shift is recorded in the scheduler config)
    sched = json.loads((Path(cfg.model) / "scheduler" / "scheduler_config.json").read_text())
    shift = sched.get("train_shift", 1.0)
    sampler = BucketSampler(ds.items, cfg.micro_batch, random.Random(cfg.seed))
    for _ in range(cfg.steps):
        for _ in range(cfg.grad_accum):
            idx = sampler.next()
            x0 = x0_all[idx]
            noise = torch.randn(x0.shape, generator=gen)
            sigma = train_sigmas(len(idx), gen, shift)
            xs = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
            with lora.use("student"):
                v = torch.stack([family.velocity(model, xs[j:j + 1], sigma[j], [conds[i]])[0]
                                 for j, i in enumerate(idx)])
            loss = (v - (noise - x0)).pow(2).mean() / cfg.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, lora


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--methods", nargs="*", default=["sft", "dopsd-v", "dopsd-x0"])
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank for every method (default: preset toy's 8)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha for every method (default: = rank)")
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate for every method (default: preset toy's 1e-3); rows are then labelled "
                         "'<method> lr=<lr>'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="toy")
    ap.add_argument("--grid", default="docs/img/toy-samples.png")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only merge the runs of earlier result files (e.g. seeds run in parallel) into --tag")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.merge:
        files = [json.loads(Path(f).read_text()) for f in a.merge]
        runs, seen = [], set()
        for r in (r for f in files for r in f["runs"]):  # a base or teacher row per file: keep one per seed
            if (r["method"], r["seed"]) not in seen:
                seen.add((r["method"], r["seed"]))
                runs.append(r)
        meta = dict(files[0]["meta"])
        for key in {k for f in files for k in f["meta"]}:  # a setting the files differ in (a sweep's lr):
            values = [f["meta"].get(key) for f in files]   # one value per file, not the first file's
            if any(v != values[0] for v in values):
                meta[key] = values
        meta["seeds"] = sorted({r["seed"] for r in runs})
        meta["wall_s"] = sum(f["meta"]["wall_s"] for f in files)
        meta["command"] = " ; ".join(f["meta"]["command"] for f in files)
        meta["merged_from"] = list(a.merge)
        meta["commit"] = ", ".join(sorted({f["meta"].get("commit", "unknown") for f in files}))
        summary = summarize(runs)
        out = Path(a.out)
        (out / f"{a.tag}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
        (out / f"{a.tag}.md").write_text(table(summary, meta))
        print(table(summary, meta))
        return 0
    from lowvram_dopsd.train import train

    t_start = time.time()
    model_dir = Path(a.model)
    pipe = ToyDiTPipeline.from_pretrained(model_dir)
    clf = load_module(model_dir / "classifier")
    methods = list(a.methods)
    if a.ablations:
        methods += ["dopsd-x0-frozen", "dopsd-x0-copy", "dopsd-x0-1state"]
    variants = {"dopsd-v": {"loss": "velocity"}, "dopsd-x0": {"loss": "x0"},
                "dopsd-x0-frozen": {"loss": "x0", "ema_decay": 0.99999999},
                "dopsd-x0-copy": {"loss": "x0", "ema_decay": 0.0},
                "dopsd-x0-1state": {"loss": "x0", "train_states": 1},
                "dopsd-x0-ema0.9999": {"loss": "x0", "ema_decay": 0.9999},  # the paper's decay (toy preset: 0.999)
                # + one micro-batch of prompts without the trigger per step, pulled toward the bare base
                # (dopsd-x0-prior-w<weight>: the same at prior_weight = <weight>; see prior_variant)
                "dopsd-x0-prior": {"loss": "x0", "prior_prompts": prior_prompts()},
                # the 8-bit paths (docs/kernels.md): int8 base, then int8 base + int8 activations
                "dopsd-x0-qint8": {"loss": "x0", "quant": "qint8"},
                "dopsd-x0-act8": {"loss": "x0", "quant": "qint8", "act_quant": "int8"},
                # the EMA-precision study (docs/toy.md): the teacher LoRA kept in bf16 as the authors' run
                # does (see bf16_ema), at the toy preset's decay and the paper's
                "dopsd-x0-ema-bf16": {"loss": "x0"},
                "dopsd-x0-ema0.9999-bf16": {"loss": "x0", "ema_decay": 0.9999}}
    variants.update({m: arm for m in methods if (arm := prior_variant(m))})
    unknown = [m for m in methods if m != "sft" and m not in variants]
    if unknown:  # before any seed has run, not after an hour of them
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: sft, {', '.join(variants)}, dopsd-x0-prior-w<weight>")
    every_arm = {} if a.rank is None else {"rank": a.rank, "alpha": a.alpha if a.alpha is not None else float(a.rank)}
    if a.lr is not None:
        every_arm["lr"] = a.lr
    runs: list[dict] = []
    rows_for_grid: dict[str, torch.Tensor] = {}
    work = Path(tempfile.mkdtemp(prefix="toy-exp-"))
    for seed in a.seeds:
        images = work / f"concept-{seed}"
        train_scenes = concept_set(images, a.images, seed)
        prior, concept = eval_scenes(exclude=train_scenes)
        show_p, show_c = prior[:8], concept[:8]

        def gen_with(dit):
            def generate(caps, s):
                h, m = pipe.encode(caps)
                noise = torch.randn((len(caps), 3, 32, 32), generator=torch.Generator().manual_seed(s))
                return sample(dit, h, m, noise, pipe.sigmas)
            return generate

        def record(method, generate, wall, extra=None):
            t = time.time()
            res = evaluate(generate, clf, prior, concept, seed=100 * seed)
            runs.append({"method": method, "seed": seed, "wall_s": round(wall, 1),
                         "eval_s": round(time.time() - t, 1), **res, **(extra or {})})
            print(f"[seed {seed}] {method:18s} " + " ".join(f"{k}={v:.3f}" for k, v in res.items()
                                                           if k in ("concept", "fd", "sharpness", "prior_all",
                                                                    "concept_fd")), flush=True)
            if seed == a.seeds[0]:
                with torch.no_grad():
                    rows_for_grid[method] = torch.cat([
                        generate([s.caption(world.TRIGGER) for s in show_c], 7),
                        generate([s.caption() for s in show_p], 8)])

        # base + the teacher's own in-context concept rate (its best case: the training image itself)
        record("base", gen_with(pipe.transformer), 0.0)
        refs = world.to_tensor([world.render(s) for s in train_scenes])
        caps = [s.caption(world.TRIGGER) for s in train_scenes]
        with torch.no_grad():
            reps = 8
            h, m = pipe.encode(caps * reps, refs.repeat(reps, 1, 1, 1))
            noise = torch.randn((len(caps) * reps, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
            tx = sample(pipe.transformer, h, m, noise, pipe.sigmas)
            _, pred = classify(clf, tx)
            ring = world.ALL_SHAPES.index(world.CONCEPT_SHAPE)
            teacher_rate = float((pred["shape"] == ring).float().mean())
            h2, m2 = pipe.encode(caps * reps)
            sx = sample(pipe.transformer, h2, m2, noise, pipe.sigmas)
            _, pred2 = classify(clf, sx)
            student_rate = float((pred2["shape"] == ring).float().mean())
        runs.append({"method": "teacher-in-context", "seed": seed, "concept_train_prompts": teacher_rate,
                     "base_text_only_train_prompts": student_rate})
        print(f"[seed {seed}] teacher in-context ring rate on training prompts {teacher_rate:.3f} "
              f"(text-only base {student_rate:.3f})", flush=True)
        if seed == a.seeds[0]:
            rows_for_grid["teacher (in context, train prompts)"] = tx[:8] if len(tx) >= 8 else tx
            rows_for_grid["training images"] = refs

        for method in methods:
            t0 = time.time()
            out = work / f"{method}-{seed}"
            if method == "sft":
                cfg = make_cfg(model_dir, images, out, work / "cache", seed, a.steps, **every_arm)
                model, lora = run_sft(cfg, images)
            else:
                cfg = make_cfg(model_dir, images, out, work / "cache", seed, a.steps, **every_arm, **variants[method])
                with bf16_ema() if method.endswith("-bf16") else contextlib.nullcontext():
                    result = train(cfg, preset="toy", console=quiet_console())
                model, lora = result.model, result.lora
            wall = time.time() - t0
            lora.switch.active = "student"
            record(label(method, a.lr), gen_with(model), wall,
                   None if method == "sft" else {"teacher_b_share": teacher_b_share(lora)})

    summary = summarize(runs)
    meta = {"command": "python -m experiments.toy.experiment " + " ".join(argv or []) if argv is not None else
            "python -m experiments.toy.experiment " + " ".join(__import__("sys").argv[1:]),
            "seeds": a.seeds, "steps": a.steps, "images": a.images, "threads": a.threads, **every_arm,
            "model": str(model_dir), "wall_s": round(time.time() - t_start, 1),
            "preset": "presets/toy.toml", "torch": torch.__version__, "commit": source_commit()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.tag}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    (out / f"{a.tag}.md").write_text(table(summary, meta))
    print(table(summary, meta))
    if a.grid:
        Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
        names = list(rows_for_grid)
        grid([rows_for_grid[n] for n in names], a.grid)
        (Path(a.grid).with_suffix(".txt")).write_text(
            "rows, top to bottom: " + "; ".join(names) + "\nmethod rows: 8 trigger prompts (new scenes), "
            "then 8 prompts without the trigger\n")
    return 0


METRICS = [("concept", "concept ↑"), ("concept_colour", "concept colour ↑"), ("concept_fd", "concept FD ↓"),
           ("fd", "FD (no trigger) ↓"), ("sharpness", "sharpness (1=real)"), ("grain", "grain (0=real) ↓"),
           ("prior_shape", "shape ↑"),
           ("prior_colour", "colour ↑"), ("prior_position", "position ↑"), ("prior_all", "all 5 attrs ↑"),
           ("prior_ring", "ring w/o trigger ↓"), ("teacher_b_share", "teacher |B| / student |B|"),
           ("wall_s", "train s")]


def label(method: str, lr: float | None) -> str:
    """A result row's name: the method, and the learning rate when --lr set it (so the runs of a sweep
    can be merged into one table)."""
    return method if lr is None else f"{method} lr={lr:g}"


def summarize(runs):
    out = {}
    for r in runs:
        if r["method"] == "teacher-in-context":
            continue
        out.setdefault(r["method"], {}).setdefault("_n", 0)
        out[r["method"]]["_n"] += 1
        for k, _ in METRICS:
            if k in r:  # a metric some rows lack (teacher_b_share: D-OPSD's; older result files)
                out[r["method"]].setdefault(k, []).append(r[k])
    tch = [r for r in runs if r["method"] == "teacher-in-context"]
    summ = {m: {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in d.items()
                if k != "_n"} | {"n_seeds": d["_n"]} for m, d in out.items()}
    if tch:
        v = [r["concept_train_prompts"] for r in tch]
        w = [r["base_text_only_train_prompts"] for r in tch]
        summ["teacher-in-context"] = {"concept_train_prompts": (statistics.mean(v), statistics.pstdev(v)),
                                      "base_text_only_train_prompts": (statistics.mean(w), statistics.pstdev(w))}
    return summ


def table(summary, meta) -> str:
    head = "| method | " + " | ".join(lbl for _, lbl in METRICS) + " |\n"
    head += "|---|" + "---|" * len(METRICS) + "\n"
    lines = []
    for m, d in summary.items():
        if m == "teacher-in-context":
            continue
        cells = []
        for k, _ in METRICS:
            mu, sd = d.get(k, (None, None))
            cells.append("-" if mu is None else f"{mu:.0f}" if k == "wall_s" else f"{mu:.3f} ± {sd:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    t = summary.get("teacher-in-context")
    tail = ""
    if t:
        tail = (f"\nTeacher's own concept rate (4 steps, in context: training image + training caption): "
                f"{t['concept_train_prompts'][0]:.3f} ± {t['concept_train_prompts'][1]:.3f}; "
                f"the base with the same captions text-only: {t['base_text_only_train_prompts'][0]:.3f}.\n")
    return (f"# Toy world: SFT vs D-OPSD (issue #7)\n\nCommand: `{meta['command']}`  \n"
            f"Seeds {meta['seeds']}, {meta['steps']} steps, {meta['images']} concept images, "
            f"{meta['threads']} CPU thread(s), total wall-clock {meta['wall_s']:.0f} s (summed over processes), torch {meta['torch']}, "
            f"code at commit {meta.get('commit', 'unknown')}.  \n"
            f"Mean ± std over seeds (n = {len(meta['seeds'])}).\n\n" + head + "\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    raise SystemExit(main())
