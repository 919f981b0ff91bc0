"""Build the toy world's checkpoints from scratch (nothing downloaded), in minutes on a CPU:

    python -m lowvram_dopsd.toy.build --out lowvram_dopsd/assets/toy/model          # all stages
    python -m lowvram_dopsd.toy.build --out ... --stage base|distill|classifier

1. base: the encoder and the DiT are trained TOGETHER with the rectified-flow / flow-matching loss
   (x_sigma = (1-sigma)·x0 + sigma·noise, target v = noise - x0, sigma ~ logit-normal) on a mix of
     - text-only scenes of the named shapes (the student's reading), and
     - in-context items: a reference image + caption in the encoder, the target is the reference
       itself (half the time) or the same object (shape, colour, size) in another position and
       background; the reference's shape is a named shape or a random never-named "blob", and the
       caption's shape word is the name, a random rare word or "object". This teaches the model to
       take what the words do not say from the image: the teacher's in-context ability.
   The concept shape (ring) and the trigger word are NEVER shown. EMA of the weights is kept.
2. distill: 4-step student by knowledge distillation of the ODE map at the schedule points
   (Luhman & Luhman 2021, per segment): the EMA base integrates each segment
   sigma_k -> sigma_{k+1} of SIGMAS4 with 8 Euler sub-steps (32 NFE); the student regresses
   v_k = (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k) at the teacher states x_k, for text-only and
   in-context conditions alike (the D-OPSD teacher runs the distilled weights in context).
3. classifier: CNN with attribute heads on rendered scenes INCLUDING the concept (for evaluation only),
   with noise/blur augmentation.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .models import HEADS, ToyClassifier, ToyDiT, ToyEncoder, load_module, save_module

SIGMAS4 = (1.0, 0.9, 0.75, 0.5, 0.0)   # the authors' 4-step schedule t = {0, .1, .25, .5} -> 1 (0 = noise there)


# ------------------------------------------------------------------------------------------ data
def make_batch(rng: random.Random, n: int, p_context: float = 0.4, p_same: float = 0.5):
    """Returns (text-only part, in-context part), each (captions, targets[, refs])."""
    n_ctx = sum(rng.random() < p_context for _ in range(n))
    txt_scenes = [world.random_scene(rng) for _ in range(n - n_ctx)]
    text = ([s.caption() for s in txt_scenes], world.to_tensor([world.render(s) for s in txt_scenes]))
    caps, tgts, refs = [], [], []
    for _ in range(n_ctx):
        ref = world.random_scene(rng, shapes=world.SHAPES + ("blob", "blob", "blob", "blob"))
        if rng.random() < p_same:
            tgt = ref
        else:
            other = world.random_scene(rng)
            tgt = world.Scene(ref.shape, ref.colour, ref.size, other.position, other.background, other.jitter, ref.blob)
        if tgt.shape != "blob" and rng.random() < 0.5:
            word = tgt.shape
        else:
            word = rng.choice(world.PLACEHOLDERS + ("object",) * 4)
        caps.append(tgt.caption(word))
        tgts.append(world.render(tgt))
        refs.append(world.render(ref))
    ctx = (caps, world.to_tensor(tgts), world.to_tensor(refs)) if n_ctx else None
    return text, ctx


def encode(enc: ToyEncoder, tok: world.Tokenizer, captions: list[str], refs: torch.Tensor | None = None):
    ids, mask = tok(captions)
    return enc(ids, mask, refs)


def fm_loss(dit, enc, tok, caps, x0, refs=None, gen=None):
    h, m = encode(enc, tok, caps, refs)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))
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
def sample(dit, h, m, noise, sigmas, substeps: int = 1):
    """Euler over `sigmas` (each interval split into `substeps`)."""
    x = noise
    for k in range(len(sigmas) - 1):
        s0, s1 = float(sigmas[k]), float(sigmas[k + 1])
        for j in range(substeps):
            a = s0 + (s1 - s0) * j / substeps
            b = s0 + (s1 - s0) * (j + 1) / substeps
            x = x + (b - a) * dit(x, torch.full((x.shape[0],), a), h, m)
    return x


# ------------------------------------------------------------------------------------------ stages
def train_base(out: Path, steps: int, batch: int, seed: int, log, resume: bool = False,
               p_context: float = 0.4, p_same: float = 0.5, lr: float = 1e-3) -> None:
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc, dit, tok = ToyEncoder(), ToyDiT(), world.Tokenizer()
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
        text, ctx = make_batch(rng, batch, p_context, p_same)
        nt = len(text[0])
        loss = fm_loss(dit, enc, tok, *text, gen=gen) * nt / batch
        if ctx:
            loss = loss + fm_loss(dit, enc, tok, ctx[0], ctx[1], ctx[2], gen=gen) * len(ctx[0]) / batch
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
    save_module(enc_ema, out / "text_encoder", "ToyEncoder")
    save_module(dit_ema, out / "base_transformer", "ToyDiT")
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({"vocab": list(tok.vocab), "max_tokens": tok.max_tokens}))


def distill(out: Path, n_traj: int, steps: int, batch: int, seed: int, log) -> None:
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
            text, ctx = make_batch(rng, batch, p_context=0.3)
            for part in (text, ctx):
                if not part or not part[0]:
                    continue
                caps, refs = part[0], (part[2] if len(part) == 3 else None)
                h, m = encode(enc, tok, caps, refs)
                x = torch.randn((len(caps), 3, 32, 32), generator=gen)
                states = [x]
                for k in range(len(sig) - 1):
                    x = sample(teacher, h, m, x, sig[k:k + 2], substeps=8)
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
    save_module(student.eval(), out / "transformer", "ToyDiT")
    sched = out / "scheduler"
    sched.mkdir(parents=True, exist_ok=True)
    (sched / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "ToyEulerSchedule", "sigmas": list(SIGMAS4), "num_inference_steps": len(SIGMAS4) - 1,
         "distillation": "per-segment ODE-map knowledge distillation from the base (8 Euler sub-steps per segment)"},
        indent=2))
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "ToyDiTPipeline", "_lowvram_dopsd": "toy world (issue #7); see docs/toy.md",
         "transformer": ["lowvram_dopsd.toy.models", "ToyDiT"],
         "text_encoder": ["lowvram_dopsd.toy.models", "ToyEncoder"],
         "tokenizer": ["lowvram_dopsd.toy.world", "Tokenizer"],
         "scheduler": ["lowvram_dopsd.toy.build", "ToyEulerSchedule"]}, indent=2))


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
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "assets" / "toy" / "model"))
    ap.add_argument("--stage", default="all", choices=["all", "base", "distill", "classifier"])
    ap.add_argument("--base-steps", type=int, default=2000)
    ap.add_argument("--distill-steps", type=int, default=800)
    ap.add_argument("--trajectories", type=int, default=2048)
    ap.add_argument("--classifier-steps", type=int, default=800)
    ap.add_argument("--classifier-batch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="base: continue from the folder's EMA weights")
    ap.add_argument("--p-context", type=float, default=0.4, help="base: share of in-context items")
    ap.add_argument("--p-same", type=float, default=0.5, help="base: in-context target = the reference")
    ap.add_argument("--lr", type=float, default=1e-3, help="base: peak learning rate")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
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
    t0 = time.time()
    if a.stage in ("all", "base"):
        train_base(out, a.base_steps, a.batch, a.seed + (1 if a.resume else 0), log, a.resume, a.p_context,
                   a.p_same, a.lr)
        entry = {"steps": a.base_steps, "batch": a.batch, "seed": a.seed, "p_context": a.p_context,
                 "p_same": a.p_same, "lr": a.lr, "wall_s": round(time.time() - t0)}
        if a.resume:
            info["base_phase2"] = entry
        else:
            info["base"] = entry
    t1 = time.time()
    if a.stage in ("all", "distill"):
        distill(out, a.trajectories, a.distill_steps, a.batch, a.seed, log)
        info["distill"] = {"steps": a.distill_steps, "trajectories": a.trajectories, "seed": a.seed,
                           "sigmas": list(SIGMAS4), "wall_s": round(time.time() - t1)}
    t2 = time.time()
    if a.stage in ("all", "classifier"):
        train_classifier(out, a.classifier_steps, a.classifier_batch, a.seed, log)
        info["classifier"] = {"steps": a.classifier_steps, "batch": a.classifier_batch, "seed": a.seed, "wall_s": round(time.time() - t2)}
    info["threads"] = a.threads
    old = json.loads(info_path.read_text()) if info_path.is_file() else {}  # stages may run in parallel
    info_path.write_text(json.dumps({**old, **info}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
