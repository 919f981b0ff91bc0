"""Build the toy world's checkpoints from scratch (nothing downloaded), in minutes on a CPU:

    python -m experiments.toy.build --out lowvram_dopsd/assets/toy/model          # all stages, from the repo root
    python -m experiments.toy.build --out ... --stage classifier|base|distill|dmd

1. classifier (first: the later stages log the teacher gate with it): CNN with attribute heads on
   rendered scenes INCLUDING the concept (for evaluation only), with noise/blur augmentation.
2. base: the encoder and the DiT are trained TOGETHER with the rectified-flow / flow-matching loss
   (x_sigma = (1-sigma)·x0 + sigma·noise, target v = noise - x0, sigma ~ logit-normal with time
   shift 3, see train_sigmas) on a mix of
     - text-only scenes of the named shapes (the student's reading), and
     - in-context items: a reference image + caption in the encoder, the target is the reference
       itself (half the time) or the same object (shape, colour, size) in another position and
       background; the reference's shape is a named shape or a random never-named "blob" (half of
       them with a hole), the caption's shape word is the name, a random rare word or "object",
       and each other attribute the reference shows is left out of the caption half the time.
       This teaches the model to take what the words do not say from the image: the teacher's
       in-context ability, checked by evaluate.teacher_gate every 500 steps.
   The concept shape (ring) and the trigger word are NEVER shown. EMA of the weights is kept.
3. distill: 4-step student by knowledge distillation of the ODE map at the schedule points
   (Luhman & Luhman 2021, per segment): the EMA base integrates each segment
   sigma_k -> sigma_{k+1} of SIGMAS4 with 8 Euler sub-steps (32 NFE); the student regresses
   v_k = (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k) at the teacher states x_k, for text-only and
   in-context conditions alike (the D-OPSD teacher runs the distilled weights in context).
   Kept in kd_transformer/ (the world of the earlier results); its samples are grainy.
4. dmd: distribution-matching distillation (DMD2, experiments/toy/dmd.py) from the ODE-map student:
   the shipped transformer/. Resumable (its state is saved beside the folder every 100 iterations;
   the same command picks it up), with progress and time left in the log.
The distilled stages record the 4-step model's quality in build_info.json (`sharpness`, `fd`,
`prior_all`: evaluate.quality on the experiment's 256 prompts, mean over its 3 seeds) and its gate.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowvram_dopsd.toy import world
from lowvram_dopsd.toy.evaluate import eval_scenes, quality, teacher_gate
from lowvram_dopsd.toy.models import HEADS, ToyClassifier, ToyDiT, ToyEncoder, load_module, save_module
from lowvram_dopsd.toy.pipeline import sample as euler

ROOT = Path(__file__).resolve().parents[2]

SIGMAS4 = (1.0, 0.9, 0.75, 0.5, 0.0)   # the authors' 4-step schedule t = {0, .1, .25, .5} -> 1 (0 = noise there)


# ------------------------------------------------------------------------------------------ data
def make_batch(rng: random.Random, n: int, p_context: float = 0.4, p_same: float = 0.5, p_drop: float = 0.0,
               blob_holes: float = 0.0):
    """Returns (text-only part, in-context part), each (captions, targets[, refs])."""
    n_ctx = sum(rng.random() < p_context for _ in range(n))
    txt_scenes = [world.random_scene(rng) for _ in range(n - n_ctx)]
    text = ([s.caption() for s in txt_scenes],
            world.to_tensor([world.render(s) for s in txt_scenes]) if txt_scenes else torch.empty(0, 3, 32, 32))
    caps, tgts, refs = [], [], []
    for _ in range(n_ctx):
        ref = world.random_scene(rng, shapes=world.SHAPES + ("blob", "blob", "blob", "blob"), blob_holes=blob_holes)
        if rng.random() < p_same:
            tgt = ref
        else:
            other = world.random_scene(rng)
            tgt = world.Scene(ref.shape, ref.colour, ref.size, other.position, other.background, other.jitter, ref.blob,
                              ref.hole)
        if tgt.shape != "blob" and rng.random() < 0.5:
            word = tgt.shape
        else:
            word = rng.choice(world.PLACEHOLDERS + ("object",) * 4)
        caption = tgt.caption(word).split()
        # p_drop: each other attribute the target shares with the reference is left out of the
        # caption, so colour, size (and position, background in the same scene) must be read from
        # the image too. That is most of the pixels, so the reading of the reference gets a strong
        # gradient early; with the shape alone (a few edge pixels) it stays at chance (docs/toy.md).
        shared = [1, 2] + ([6, 8] if tgt is ref else [])  # size, colour[, position, background]
        for i in shared if p_drop else ():  # p_drop = 0 draws nothing: v1's data stream unchanged
            if rng.random() < p_drop:
                caption[i] = rng.choice(world.PLACEHOLDERS)
        caps.append(" ".join(caption))
        tgts.append(world.render(tgt))
        refs.append(world.render(ref))
    ctx = (caps, world.to_tensor(tgts), world.to_tensor(refs)) if n_ctx else None
    return text, ctx


def encode(enc: ToyEncoder, tok: world.Tokenizer, captions: list[str], refs: torch.Tensor | None = None):
    ids, mask = tok(captions)
    return enc(ids, mask, refs)


def train_sigmas(n: int, gen: torch.Generator | None, shift: float = 1.0) -> torch.Tensor:
    """sigma ~ logit-normal, then the flow-matching time shift sigma' = shift·s / (1 + (shift-1)·s).

    Why shift: a 4-step sampler at (1, .9, .75, .5) decides the shape in its first two steps, but
    plain logit-normal (shift 1, the shipped base's recipe) puts 1.4 % of the training at sigma > 0.9
    and 14 % above 0.75. Shift 3 (Z-Image-Turbo's scheduler config has shift 3.0) puts 13.5 % above
    0.9 and 50 % above 0.75; measured in docs/toy.md, it lifts the base's text-only shape accuracy
    at 4 steps (0.35 -> 0.50 after 1000 steps).
    """
    s = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * s / (1 + (shift - 1) * s)


def fm_loss(dit, enc, tok, caps, x0, refs=None, gen=None, shift: float = 1.0):
    h, m = encode(enc, tok, caps, refs)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = train_sigmas(x0.shape[0], gen, shift)
    xs = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
    v = dit(xs, sigma, h, m)
    return F.mse_loss(v, noise - x0)


@torch.no_grad()
def ema_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, 1 - decay)


def cosine_lr(step, total, base, warmup=100, floor=0.1):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def substeps(s0: float, s1: float, n: int) -> list[float]:
    """The sigma grid that splits the interval s0 -> s1 into n equal Euler steps (pipeline.sample over it)."""
    return [s0 + (s1 - s0) * j / n for j in range(n + 1)]


# ------------------------------------------------------------------------------------------ stages
def train_base(out: Path, steps: int, batch: int, seed: int, log, resume: bool = False,
               p_context: float = 0.4, p_same: float = 0.5, lr: float = 1e-3, enc_kw=None, dit_kw=None,
               shift: float = 1.0, p_drop: float = 0.0, blob_holes: float = 0.0, gate_every: int = 500) -> dict:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc, dit, tok = ToyEncoder(**(enc_kw or {})), ToyDiT(**(dit_kw or {})), world.Tokenizer()
    clf = load_module(out / "classifier") if (out / "classifier" / "config.json").is_file() else None
    gate = {}
    if resume:  # continue from the EMA weights in `out` (a second phase with other data weights)
        enc.load_state_dict(load_module(out / "text_encoder").state_dict())
        dit.load_state_dict(load_module(out / "base_transformer").state_dict())
    enc_ema, dit_ema = copy.deepcopy(enc), copy.deepcopy(dit)
    params = list(enc.parameters()) + list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        text, ctx = make_batch(rng, batch, p_context, p_same, p_drop, blob_holes)
        nt = len(text[0])
        loss = fm_loss(dit, enc, tok, *text, gen=gen, shift=shift) * nt / batch if nt else 0.0
        if ctx:
            loss = loss + fm_loss(dit, enc, tok, ctx[0], ctx[1], ctx[2], gen=gen, shift=shift) * len(ctx[0]) / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = 0.999 if resume else min(0.999, (1 + step) / (10 + step))
        ema_(enc_ema, enc, d)
        ema_(dit_ema, dit, d)
        if step % 100 == 0 or step == steps - 1:
            log(f"base {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if step % 300 == 299:  # snapshots, to look at samples while it trains
            save_module(dit_ema, out / "base_transformer", "ToyDiT")
            save_module(enc_ema, out / "text_encoder", "ToyEncoder")
        if clf is not None and (step % gate_every == gate_every - 1 or step == steps - 1):
            gate = teacher_gate(lambda c, r: encode(enc_ema, tok, c, r), dit_ema, clf, SIGMAS4)
            log(f"base {step + 1}/{steps} gate (EMA, 4 Euler steps): "
                + " ".join(f"{k} {v:.2f}" for k, v in gate.items()))
    save_module(enc_ema, out / "text_encoder", "ToyEncoder")
    save_module(dit_ema, out / "base_transformer", "ToyDiT")
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({"vocab": list(tok.vocab), "max_tokens": tok.max_tokens}))
    return gate


def distill(out: Path, n_traj: int, steps: int, batch: int, seed: int, log, shift: float = 1.0,
            p_drop: float = 0.0, blob_holes: float = 0.0, report_prompts: int = 256) -> dict:
    rng, gen = random.Random(seed + 1), torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    enc, teacher = load_module(out / "text_encoder"), load_module(out / "base_transformer")
    tok = world.Tokenizer()
    sig = torch.tensor(SIGMAS4)
    # 1. teacher trajectories (states at the schedule points), text-only and in-context conditions
    data = []  # (captions, refs or None, states [K+1,B,...])
    t0 = time.time()
    with torch.no_grad():
        for i in range(max(1, n_traj // batch)):
            text, ctx = make_batch(rng, batch, p_context=0.3, p_drop=p_drop, blob_holes=blob_holes)
            for part in (text, ctx):
                if not part or not part[0]:
                    continue
                caps, refs = part[0], (part[2] if len(part) == 3 else None)
                h, m = encode(enc, tok, caps, refs)
                x = torch.randn((len(caps), 3, 32, 32), generator=gen)
                states = [x]
                for k in range(len(sig) - 1):
                    x = euler(teacher, h, m, x, substeps(float(sig[k]), float(sig[k + 1]), 8))
                    states.append(x)
                data.append((caps, refs, torch.stack(states)))
    log(f"distill: {sum(len(d[0]) for d in data)} teacher trajectories ({time.time() - t0:.0f}s)")
    # 2. regression of the segment maps
    student = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-4)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 3e-4, warmup=50)
        caps, refs, states = data[rng.randrange(len(data))]
        B = len(caps)
        k = torch.randint(0, len(sig) - 1, (B,), generator=gen)
        idx = torch.arange(B)
        x, x1 = states[k, idx], states[k + 1, idx]
        s0, s1 = sig[k], sig[k + 1]
        target = (x1 - x) / (s1 - s0)[:, None, None, None]
        with torch.no_grad():
            h, m = encode(enc, tok, caps, refs)
        loss = F.mse_loss(student(x, s0, h, m), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"distill {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    save_module(student.eval(), out / "kd_transformer", "ToyDiT")
    save_module(student, out / "transformer", "ToyDiT")  # the shipped model until the dmd stage replaces it
    report = distilled_report(out, student, enc, tok, log, report_prompts, gate_n=min(96, report_prompts))
    sched = out / "scheduler"
    sched.mkdir(parents=True, exist_ok=True)
    (sched / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "ToyEulerSchedule", "sigmas": list(SIGMAS4), "num_inference_steps": len(SIGMAS4) - 1,
         "train_shift": shift,  # the base's training sigmas (train_sigmas); SFT baselines sample the same
         "distillation": "per-segment ODE-map knowledge distillation from the base (8 Euler sub-steps per segment)"},
        indent=2))
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "ToyDiTPipeline", "_lowvram_dopsd": "toy world (issue #7); see docs/toy.md",
         "transformer": ["lowvram_dopsd.toy.models", "ToyDiT"],
         "text_encoder": ["lowvram_dopsd.toy.models", "ToyEncoder"],
         "tokenizer": ["lowvram_dopsd.toy.world", "Tokenizer"],
         "scheduler": ["lowvram_dopsd.toy.pipeline", "ToyEulerSchedule"]}, indent=2))
    return report


def distilled_report(out: Path, dit: ToyDiT, enc: ToyEncoder, tok: world.Tokenizer, log, n: int = 256,
                     seeds=(0, 100, 200), gate_n: int = 96) -> dict:
    """The 4-step model's quality on prompts without the trigger (evaluate.quality: the experiment's
    256 prompts and the noise of its base rows, seeds 0-2, averaged) and its teacher gate."""
    if not (out / "classifier" / "config.json").is_file():
        return {}
    clf, sig = load_module(out / "classifier"), torch.tensor(SIGMAS4)

    def generate(caps, seed):
        h, m = encode(enc, tok, caps)
        return euler(dit, h, m, torch.randn((len(caps), 3, 32, 32), generator=torch.Generator().manual_seed(seed)), sig)

    with torch.no_grad():
        runs = [quality(generate, clf, eval_scenes()[0][:n], seed) for seed in seeds]
        gate = teacher_gate(lambda c, r: encode(enc, tok, c, r), dit, clf, SIGMAS4, n=gate_n)
    report = {k: sum(r[k] for r in runs) / len(runs) for k in ("sharpness", "grain", "fd", "prior_all", "prior_shape")}
    report["gate"] = gate
    log("distilled model (4 steps): " + " ".join(f"{k} {v:.3f}" for k, v in report.items() if k != "gate")
        + " | gate " + " ".join(f"{k} {v:.2f}" for k, v in gate.items()))
    return report


def dmd_stage(out: Path, a, log) -> dict:
    """DMD2 from the ODE-map student (kd_transformer/) with the base as the real score; writes the
    generator's EMA to transformer/. Resumes from `out.parent / "dmd-state.pt"` when it is there."""
    from .dmd import train_dmd

    if not (out / "kd_transformer" / "config.json").is_file():  # a folder built before this stage existed
        save_module(load_module(out / "transformer"), out / "kd_transformer", "ToyDiT")
    enc, real, g = (load_module(out / d) for d in ("text_encoder", "base_transformer", "kd_transformer"))
    enc.requires_grad_(False)
    tok = world.Tokenizer()

    def batches(rng):
        text, ctx = make_batch(rng, a.dmd_batch, p_context=a.dmd_p_context, p_drop=a.p_drop,
                               blob_holes=a.blob_holes)
        if text[0]:
            yield text[0], text[1], None
        if ctx:
            yield ctx

    clf, sig = load_module(out / "classifier"), torch.tensor(SIGMAS4)
    rng = random.Random(2024)  # validation scenes: not the experiment's (eval_scenes' seed 12345)
    scenes = [world.random_scene(rng) for _ in range(128)]

    def check(dit) -> dict:
        def generate(caps, seed):
            noise = torch.randn((len(caps), 3, 32, 32), generator=torch.Generator().manual_seed(seed))
            return euler(dit, *encode(enc, tok, caps), noise, sig)
        r = quality(generate, clf, scenes, 7)
        return {k: r[k] for k in ("sharpness", "fd", "prior_all")}

    def stop(result) -> bool:  # fixed before the run (docs/toy.md): sharp as the renders, on validation scenes
        return a.dmd_stop > 0 and abs(result["sharpness"] - 1.0) <= a.dmd_stop

    state = out.parent / "dmd-state.pt"
    g_ema, history, cpu_s = train_dmd(
        g, real, lambda c, r: encode(enc, tok, c, r), torch.tensor(SIGMAS4), batches, a.dmd_iters, log,
        seed=a.seed + 3, ratio=a.dmd_ratio, lr_g=a.dmd_lr_g, lr_c=a.dmd_lr_c, lr_d=a.dmd_lr_d, gan_g=a.dmd_gan_g,
        gan_t_max=a.dmd_gan_t_max, r1=a.dmd_r1, dmd_t_min=a.dmd_t_min, k_min=a.dmd_k_min, ema=a.dmd_ema,
        state_path=state, check=check, check_every=a.dmd_check_every, stop=stop,
        settings={"batch": a.dmd_batch, "p_context": a.dmd_p_context, "p_drop": a.p_drop, "blob_holes": a.blob_holes})
    save_module(g_ema, out / "transformer", "ToyDiT")
    sched = out / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "distillation": (
        "DMD2 (distribution matching + GAN, experiments/toy/dmd.py) from the per-segment ODE-map "
        "distilled model (kd_transformer/), the base as the real score")}, indent=2))
    state.unlink(missing_ok=True)
    return {**distilled_report(out, g_ema, enc, tok, log, a.report_prompts, gate_n=min(96, a.report_prompts)),
            "cpu_s": round(cpu_s), "iters_done": history[-1]["it"] if history else a.dmd_iters,
            "validation": history}


def source_commit(where: Path = Path(__file__).parent) -> str:
    """The git commit the code ran from, "+dirty" with uncommitted changes, "unknown" outside a git
    checkout: a result file then says which code made it (a number re-run after a fix is not mixed
    with one from before it)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):  # no git
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    B = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    w = (torch.rand(B, 1, 1, 1, generator=gen) < 0.3).float() * torch.rand(B, 1, 1, 1, generator=gen)
    x = x * (1 - w) + blur * w
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(B, 1, 1, 1, generator=gen) * 0.12
    return x * (1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=gen) - 0.5))


def train_classifier(out: Path, steps: int, batch: int, seed: int, log) -> None:
    rng, gen = random.Random(seed + 2), torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 2)
    clf = ToyClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, 1e-3)
        scenes, x = world.batch(rng, batch, shapes=world.ALL_SHAPES)
        logits = clf(augment(x, gen))
        loss = sum(F.cross_entropy(logits[k], torch.tensor([v.index(getattr(s, k)) for s in scenes]))
                   for k, v in HEADS.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    save_module(clf.eval(), out / "classifier", "ToyClassifier")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "lowvram_dopsd" / "assets" / "toy" / "model"))
    ap.add_argument("--stage", default="all", choices=["all", "base", "distill", "dmd", "classifier"])
    # Defaults = the shipped recipe (docs/toy.md; the gate runs in benchmarks/results/toy-teacher-attempts.md).
    # The first shipped base (2000 steps, whose teacher could not read the ring) is
    # --base-steps 2000 --p-context 0.4 --lr 1e-3 --enc-patch 8 --no-ref-add --p-drop 0 --blob-holes 0 --shift 1
    ap.add_argument("--base-steps", type=int, default=3000)
    ap.add_argument("--distill-steps", type=int, default=800)
    ap.add_argument("--trajectories", type=int, default=2048)
    ap.add_argument("--classifier-steps", type=int, default=800)
    ap.add_argument("--classifier-batch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="base: continue from the folder's EMA weights")
    ap.add_argument("--p-context", type=float, default=0.5, help="base: share of in-context items")
    ap.add_argument("--p-same", type=float, default=0.5, help="base: in-context target = the reference")
    ap.add_argument("--lr", type=float, default=2e-3, help="base: peak learning rate")
    ap.add_argument("--enc-patch", type=int, default=4, help="base: reference-image patch size in the encoder")
    ap.add_argument("--dit-dim", type=int, default=64, help="base: DiT width")
    ap.add_argument("--dit-layers", type=int, default=4)
    ap.add_argument("--ref-grid", action=argparse.BooleanOptionalAction, default=False,
                    help="base: reference tokens share the DiT's position grid")
    ap.add_argument("--ref-add", action=argparse.BooleanOptionalAction, default=True,
                    help="base: reference tokens are also added to the image tokens at their grid positions "
                         "(implies --ref-grid)")
    ap.add_argument("--p-drop", type=float, default=0.5,
                    help="base, distill: in-context items leave each attribute shared with the reference out "
                         "of the caption with this probability")
    ap.add_argument("--blob-holes", type=float, default=0.5,
                    help="base, distill: share of in-context blobs with a hole (the ring itself is never drawn)")
    ap.add_argument("--shift", type=float, default=3.0,
                    help="base: time shift of the training sigmas (recorded for the SFT baseline)")
    dmd = ap.add_argument_group("dmd (DMD2, experiments/toy/dmd.py; defaults = the shipped recipe)")
    dmd.add_argument("--dmd-iters", type=int, default=3000,
                     help="fake-score updates (at most); the generator gets 1 in --dmd-ratio")
    dmd.add_argument("--dmd-batch", type=int, default=16)
    dmd.add_argument("--dmd-ratio", type=int, default=2, help="fake-score updates per generator update (DMD2: 5)")
    dmd.add_argument("--dmd-lr-g", type=float, default=5e-5)
    dmd.add_argument("--dmd-lr-c", type=float, default=2e-4, help="the fake score's learning rate")
    dmd.add_argument("--dmd-lr-d", type=float, default=4e-4, help="the discriminator's learning rate")
    dmd.add_argument("--dmd-gan-g", type=float, default=0.1, help="weight of the generator's GAN loss")
    dmd.add_argument("--dmd-gan-t-max", type=float, default=0.05, help="GAN inputs are noised at t ~ U[0, this]")
    dmd.add_argument("--dmd-r1", type=float, default=0.1, help="R1 penalty weight of the discriminator")
    dmd.add_argument("--dmd-t-min", type=float, default=0.3, help="the DMD term's lowest t (DMD2: 0.02)")
    dmd.add_argument("--dmd-k-min", type=int, default=3, help="the first roll-out step G learns at (3: the last)")
    dmd.add_argument("--dmd-ema", type=float, default=0.99, help="EMA of the generator per generator update")
    dmd.add_argument("--dmd-p-context", type=float, default=0.3, help="share of in-context items (as distill)")
    dmd.add_argument("--dmd-check-every", type=int, default=200, help="validation check of the EMA generator")
    dmd.add_argument("--dmd-stop", type=float, default=0.1,
                     help="stop at the first check whose validation sharpness is within 1 +- this (0: never)")
    ap.add_argument("--report-prompts", type=int, default=256,
                    help="distill, dmd: prompts of the quality report (the gate: 96 scenes, or as many)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    commit = source_commit()  # at the start: the code that runs, whatever the checkout holds by the end
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = (out.parent / f"build-{a.stage}.log").open("a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    info_path = out.parent / "build_info.json"
    info = {}
    t2 = time.time()
    if a.stage in ("all", "classifier"):  # first: the base and distill stages gate with it
        train_classifier(out, a.classifier_steps, a.classifier_batch, a.seed, log)
        info["classifier"] = {"steps": a.classifier_steps, "batch": a.classifier_batch, "seed": a.seed,
                              "threads": a.threads, "wall_s": round(time.time() - t2)}
    t0 = time.time()
    if a.stage in ("all", "base"):
        gate = train_base(out, a.base_steps, a.batch, a.seed + (1 if a.resume else 0), log, a.resume, a.p_context,
                          a.p_same, a.lr, enc_kw={"image_patch": a.enc_patch},
                          dit_kw={"dim": a.dit_dim, "layers": a.dit_layers, "ref_grid": a.ref_grid,
                                  "ref_add": a.ref_add},
                          shift=a.shift, p_drop=a.p_drop, blob_holes=a.blob_holes)
        entry = {"steps": a.base_steps, "batch": a.batch, "seed": a.seed, "p_context": a.p_context,
                 "p_same": a.p_same, "lr": a.lr, "enc_patch": a.enc_patch, "dit_dim": a.dit_dim,
                 "dit_layers": a.dit_layers, "ref_grid": a.ref_grid, "ref_add": a.ref_add, "p_drop": a.p_drop,
                 "blob_holes": a.blob_holes, "shift": a.shift, "gate": gate, "threads": a.threads,
                 "wall_s": round(time.time() - t0)}
        if a.resume:
            info["base_phase2"] = entry
        else:
            info["base"] = entry
    t1 = time.time()
    if a.stage in ("all", "distill"):
        report = distill(out, a.trajectories, a.distill_steps, a.batch, a.seed, log, a.shift, a.p_drop, a.blob_holes,
                         a.report_prompts)
        info["distill"] = {"steps": a.distill_steps, "trajectories": a.trajectories, "seed": a.seed,
                           "sigmas": list(SIGMAS4), **report, "threads": a.threads,
                           "wall_s": round(time.time() - t1)}
    t3 = time.time()
    if a.stage in ("all", "dmd"):
        report = dmd_stage(out, a, log)
        info["dmd"] = {"method": "DMD2 (Yin et al. 2024, arXiv 2405.14867): distribution matching from t = t_min "
                                 "against a fake score (TTUR), PatchGAN term on the pixels with R1, no regression "
                                 "loss; the generator learns at roll-out steps >= k_min (experiments/toy/dmd.py)",
                       "init": "kd_transformer (the distill stage)", "real_score": "base_transformer",
                       **{k[4:]: v for k, v in vars(a).items() if k.startswith("dmd_")}, "seed": a.seed + 3,
                       **report, "threads": a.threads, "wall_s": round(time.time() - t3)}
    for entry in info.values():
        entry["commit"] = commit
    old = json.loads(info_path.read_text()) if info_path.is_file() else {}  # stages may run in parallel
    info_path.write_text(json.dumps({**old, **info}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
