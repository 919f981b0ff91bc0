"""Metrics of the toy world, all at the model's own 4 steps, all with the shipped classifier.

concept   trigger prompts ("a small blue sks at the top on white background") in scenes that are
          not in the training set: rate of samples whose shape head says `ring` (the concept), colour
          accuracy on those prompts, and the Frechet distance to real renders of the same scenes.
quality   prompts without the trigger: Frechet distance (FD) between the classifier's penultimate
          features (128-d) of the samples and of real renders of the same scenes (lower = better;
          not comparable to Inception FID), and sharpness = mean Laplacian variance of the samples /
          that of the real renders (1 = as sharp as real; blur < 1; grain/noise > 1).
prior     prompts without the trigger: attribute accuracy (shape, colour, size, position, background)
          with the classifier's heads, GenEval-like; `prior_all` = all five right.
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
def evaluate(generate, clf, prior: list[world.Scene], concept: list[world.Scene], seed: int) -> dict[str, float]:
    """`generate(captions, seed) -> images [-1, 1]` at the model's 4 steps."""
    res = {}
    real_p = world.to_tensor([world.render(s) for s in prior])
    gen_p = generate([s.caption() for s in prior], seed)
    fr, _ = classify(clf, real_p)
    fg, pred = classify(clf, gen_p)
    acc = accuracy(pred, prior)
    res.update({f"prior_{k}": v for k, v in acc.items()})
    res["fd"] = frechet(fg, fr)
    res["sharpness"] = laplacian_var(gen_p) / laplacian_var(real_p)
    real_c = world.to_tensor([world.render(s) for s in concept])
    gen_c = generate([s.caption(world.TRIGGER) for s in concept], seed + 1)
    fcr, _ = classify(clf, real_c)
    fcg, pred_c = classify(clf, gen_c)
    ring = HEADS["shape"].index(world.CONCEPT_SHAPE)
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
