"""Metrics of the toy world, all at the model's own 4 steps, all with the shipped classifier.

concept   trigger prompts ("a small blue sks at the top on white background") in scenes that are
          not in the training set: rate of samples whose shape head says `ring` (the concept), colour
          accuracy on those prompts, and the Frechet distance to real renders of the same scenes.
quality   prompts without the trigger: Frechet distance (FD) between the classifier's penultimate
          features (128-d) of the samples and of real renders of the same scenes (lower = better;
          not comparable to Inception FID), and sharpness = mean Laplacian variance of the samples /
          that of the real renders (1 = as sharp as real; blur < 1; grain/noise > 1), and grain = the
          noise of every colour channel where the render is flat (0 = none; see `grain`).
prior     prompts without the trigger: attribute accuracy (shape, colour, size, position, background)
          with the classifier's heads, GenEval-like; `prior_all` = all five right; `prior_ring` =
          share of them drawn as the concept (the concept bleeding into prompts that did not ask).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .models import HEADS


def eval_scenes(n_prior: int = 256, n_concept: int = 128, exclude: list[world.Scene] = (), seed: int = 12345):
    rng = random.Random(seed)
    prior = [world.random_scene(rng) for _ in range(n_prior)]
    seen = {(s.colour, s.size, s.position, s.background) for s in exclude}
    concept = []
    while len(concept) < n_concept:
        s = world.random_scene(rng, shapes=(world.CONCEPT_SHAPE,))
        if (s.colour, s.size, s.position, s.background) not in seen:
            concept.append(s)
    return prior, concept


def frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)

    def sqrtm(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    s1 = sqrtm(c1)
    cross = sqrtm(s1 @ c2 @ s1)
    return float((mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace() - 2 * cross.trace())


def grain(x: torch.Tensor, real: torch.Tensor) -> float:
    """Noise where the picture should be flat: the RMS of the samples' Laplacian, every colour channel,
    over the pixels where the real render of the same prompt has no edge within 2 px (0 for the renders
    themselves). Sharpness (gray, whole image) mixes blur (lower) and grain (higher) and reads colour
    noise only through the gray mean; this reads the noise alone."""
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    lx, lr = F.conv2d(x, k, groups=3), F.conv2d(real.to(x.dtype), k, groups=3)
    edge = F.max_pool2d((lr.abs() > 1e-6).any(1, keepdim=True).to(x.dtype), 5, stride=1, padding=2) > 0
    flat = (~edge).expand_as(lx)
    return float(lx[flat].pow(2).mean().sqrt()) if flat.any() else 0.0


def laplacian_var(x: torch.Tensor) -> float:
    g = x.mean(1, keepdim=True)
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=g.dtype).view(1, 1, 3, 3)
    return float(F.conv2d(g, k).flatten(1).var(1).mean())


@torch.no_grad()
def classify(clf, x: torch.Tensor):
    f = clf.features(x)
    return f, {k: h(f).argmax(1) for k, h in clf.heads.items()}


def accuracy(pred: dict, scenes: list[world.Scene], heads=tuple(HEADS)) -> dict[str, float]:
    out = {}
    ok_all = torch.ones(len(scenes), dtype=torch.bool)
    for k in heads:
        truth = torch.tensor([HEADS[k].index(getattr(s, k)) for s in scenes])
        ok = pred[k] == truth
        out[k] = float(ok.float().mean())
        ok_all &= ok
    out["all"] = float(ok_all.float().mean())
    return out


@torch.no_grad()
def quality(generate, clf, prior: list[world.Scene], seed: int) -> dict[str, float]:
    """The prompts-without-the-trigger half of `evaluate`: prior_* accuracies, prior_ring, fd, sharpness."""
    real_p = world.to_tensor([world.render(s) for s in prior])
    gen_p = generate([s.caption() for s in prior], seed)
    fr, _ = classify(clf, real_p)
    fg, pred = classify(clf, gen_p)
    res = {f"prior_{k}": v for k, v in accuracy(pred, prior).items()}
    ring = HEADS["shape"].index(world.CONCEPT_SHAPE)
    res["prior_ring"] = float((pred["shape"] == ring).float().mean())  # the concept bleeding into other prompts
    res["fd"] = frechet(fg, fr)
    res["sharpness"] = laplacian_var(gen_p) / laplacian_var(real_p)
    res["grain"] = grain(gen_p, real_p)
    return res


@torch.no_grad()
def evaluate(generate, clf, prior: list[world.Scene], concept: list[world.Scene], seed: int) -> dict[str, float]:
    """`generate(captions, seed) -> images [-1, 1]` at the model's 4 steps."""
    res = quality(generate, clf, prior, seed)
    ring = HEADS["shape"].index(world.CONCEPT_SHAPE)
    real_c = world.to_tensor([world.render(s) for s in concept])
    gen_c = generate([s.caption(world.TRIGGER) for s in concept], seed + 1)
    fcr, _ = classify(clf, real_c)
    fcg, pred_c = classify(clf, gen_c)
    res["concept"] = float((pred_c["shape"] == ring).float().mean())
    res["concept_colour"] = accuracy(pred_c, concept, heads=("colour",))["colour"]
    res["concept_fd"] = frechet(fcg, fcr)
    return res


def grid(rows: list[torch.Tensor], path, scale: int = 3) -> None:
    from PIL import Image

    n = max(len(r) for r in rows)
    rows = [torch.cat([r, torch.full((n - len(r), *r.shape[1:]), -1.0)]) if len(r) < n else r for r in rows]
    img = np.concatenate([np.concatenate(list(world.to_uint8(r)), 1) for r in rows], 0)
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


@torch.no_grad()
def teacher_gate(encode, dit, clf, sigmas, n: int = 96, seed: int = 4321) -> dict[str, float]:
    """What the model reads from text and from a reference image in context, at `sigmas` (4 steps).

    `encode(captions, refs or None) -> (hidden, mask)`. Shape accuracy with the classifier on:
      text_shape    named shapes, text only (the prior the base starts from);
      copy_same     named-shape reference + caption whose shape word is "object" (same scene);
      copy_moved    the same object asked for at another position / on another background;
      ring_context  THE GATE: a ring reference + its trigger caption (what the D-OPSD teacher sees),
                    rate of samples the classifier calls "ring";
      ring_text     the same trigger captions without the image (what the student starts from);
      ref_gain      how much the reference lowers the error of the x0 prediction at sigma = 1 (pure
                    noise in, caption with "object"): 1 - err(with image) / err(text only); 0 = the
                    image is ignored, 1 = it is copied exactly.
    The ring and the trigger word never occur in the base's training, so ring_context measures a
    transfer the model was never shown. D-OPSD can only pass on what ring_context says it reads.
    """
    from .pipeline import sample as euler

    rng = random.Random(seed)
    named = [world.random_scene(rng) for _ in range(n)]
    moved = [world.Scene(s.shape, s.colour, s.size, o.position, o.background, o.jitter)
             for s, o in zip(named, (world.random_scene(rng) for _ in range(n)))]
    rings = [world.random_scene(rng, shapes=(world.CONCEPT_SHAPE,)) for _ in range(n)]
    ref_named = world.to_tensor([world.render(s) for s in named])
    ref_rings = world.to_tensor([world.render(s) for s in rings])
    shape_i = {s: i for i, s in enumerate(HEADS["shape"])}

    def run(caps, refs):
        h, m = encode(caps, refs)
        noise = torch.randn((len(caps), 3, world.IMAGE_SIZE, world.IMAGE_SIZE),
                            generator=torch.Generator().manual_seed(seed))
        return classify(clf, euler(dit, h, m, noise, sigmas))[1]["shape"]

    def acc(pred, scenes):
        return float((pred == torch.tensor([shape_i[s.shape] for s in scenes])).float().mean())

    caps = [s.caption("object") for s in named]
    noise = torch.randn(ref_named.shape, generator=torch.Generator().manual_seed(seed))
    one = torch.ones(n)
    err = [float((noise - dit(noise, one, *encode(caps, r)) - ref_named).pow(2).mean()) for r in (None, ref_named)]
    return {"text_shape": acc(run([s.caption() for s in named], None), named),
            "copy_same": acc(run([s.caption("object") for s in named], ref_named), named),
            "copy_moved": acc(run([s.caption("object") for s in moved], ref_named), moved),
            "ring_context": acc(run([s.caption(world.TRIGGER) for s in rings], ref_rings), rings),
            "ring_text": acc(run([s.caption(world.TRIGGER) for s in rings], None), rings),
            "ref_gain": 1.0 - err[1] / err[0]}
