"""Distribution-matching distillation of the toy base into its 4-step model: DMD2 (issue #36).

    python -m experiments.toy.build --stage dmd          # after classifier, base and distill; resumable

Method: DMD2, Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"
(arXiv 2405.14867): the distribution-matching gradient against a fake score trained on the
generator's samples (two time-scale updates), plus a GAN term on real images, no regression loss.
- generator G: the 4-step model, initialised from the ODE-map distilled one (kd_transformer/). A step
  predicts x0 = x_k - sigma_k·G(x_k); the Euler step x_{k+1} = x_k + (sigma_{k+1} - sigma_k)·G(x_k) is
  DDIM's deterministic re-noising of that x0, i.e. exactly the sampler the pipeline and the trainer
  run. Training states x_k come from G's own roll-out (DMD2's backward simulation).
- real score: the frozen undistilled base (base_transformer/); fake score: a copy of it trained with
  the flow-matching loss on G's x0, updated `ratio` times per generator update.
- DMD gradient on x0: (x0_fake(x_t) - x0_real(x_t)) / mean|x0 - x0_real(x_t)| at t ~ U[dmd_t_min, 0.98].
- GAN term (non-saturating, R1 on the real side): real = renders of the captioned scenes, fake = G's
  x0, both noised at t ~ U[0, gan_t_max]; weighted by gan_g in G's loss.
Where this differs from DMD2, each measured while building this stage (docs/toy.md, "The sharp base"):
- the base's own samples are grainy (flat regions carry noise of std 0.11; Laplacian variance
  2.2-2.5x the renders' at 32-64 Euler steps): its score below t ~ 0.3 is what puts the grain there,
  so the DMD term starts at t = 0.3 (`dmd_t_min`; DMD2: 0.02), where the base is right, and the
  fine detail is the GAN's. With DMD2's range, and with it at every step, every run grew grainier
  (sharpness 2.26 -> 2.7-3.1 within 100 generator updates);
- G learns at its last step only (`k_min = 3`: sigma 0.5 -> 0, the step that makes the image; the
  first three keep the ODE map's trajectory, which decides shape and layout). DMD2 trains every step;
- the discriminator is a small conv net of its own on the pixels (a projection discriminator on the
  pooled condition), not a head on the fake score: a head on the fake score's image tokens stayed at
  chance (D loss 2·ln 2) against the grainy samples (the toy DiT reads fine detail through its conv
  output head, not its tokens), and a pixel net costs a fraction of a DiT pass;
- the GAN alone (no DMD term) collapsed within 70 generator updates (FD 7300, attributes 0.16).
Why DMD2 and not DMD: DMD's regression loss pulls toward the base's own (grainy) ODE outputs; the GAN
term on real renders is what lets a student be sharper than its teacher.
Conditions: text-only scenes and in-context items (make_batch), as the base was trained, so the
distilled model keeps the teacher's in-context reading (evaluate.teacher_gate).
"""
from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowvram_dopsd.toy.models import ToyDiT

T_MIN, T_MAX = 0.02, 0.98  # DMD2's noise range for the DMD loss (its min/max step percent)


class Discriminator(nn.Module):
    """Conv net on (noisy) 32x32 images giving a logit per 8x8 patch (a PatchGAN, Isola et al. 2017: the
    loss is taken per patch, so an edge is judged where it is and not averaged away by the flat
    background); the condition enters as a projection (Miyato & Koyama 2018): logit = w·f(x) +
    <P·mean(h), f(x)> at each patch, h the encoder's hidden states (caption, or image + caption)."""

    def __init__(self, cond_dim: int = 64, width: int = 64, patch: bool = True):
        super().__init__()
        self.patch = patch
        self.body = nn.Sequential(nn.Conv2d(3, width // 2, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width // 2, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(width, 1, 1)
        self.proj = nn.Linear(cond_dim, width, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Logits [B, 8, 8] (one per patch), or [B] pooled when patch = False."""
        f = self.body(x)
        if not self.patch:
            f = f.mean((2, 3), keepdim=True)
        w = m.to(h.dtype)[..., None]
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
        return (self.out(f) + (self.proj(pooled)[:, :, None, None] * f).sum(1, keepdim=True)).flatten(1).squeeze(1)


def noised(x0: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn(x0.shape, generator=gen)
    tt = t[:, None, None, None]
    return (1 - tt) * x0 + tt * eps, eps


def uniform_t(n: int, gen: torch.Generator, t_max: float = T_MAX, t_min: float = T_MIN) -> torch.Tensor:
    return t_min + (t_max - t_min) * torch.rand(n, generator=gen)


def rollout_to(g: ToyDiT, h, m, noise: torch.Tensor, sigmas, k: int) -> torch.Tensor:
    """Backward simulation: G's own Euler steps from noise to the state at sigmas[k] (no grad)."""
    x = noise
    with torch.no_grad():
        for j in range(k):
            s = torch.full((x.shape[0],), float(sigmas[j]))
            x = x + (float(sigmas[j + 1]) - float(sigmas[j])) * g(x, s, h, m)
    return x


def dmd_loss(x0: torch.Tensor, real: ToyDiT, fake: ToyDiT, h, m, gen: torch.Generator,
             t_min: float = T_MIN) -> torch.Tensor:
    """DMD's distribution-matching loss on x0 (grad = the normalised difference of the two scores),
    at t ~ U[t_min, 0.98]."""
    with torch.no_grad():
        t = uniform_t(x0.shape[0], gen, T_MAX, t_min)
        xt, _ = noised(x0, t, gen)
        tt = t[:, None, None, None]
        x0_real = xt - tt * real(xt, t, h, m)
        x0_fake = xt - tt * fake(xt, t, h, m)
        norm = (x0 - x0_real).abs().mean((1, 2, 3), keepdim=True).clamp(min=1e-6)
        grad = torch.nan_to_num((x0_fake - x0_real) / norm)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def fake_score_loss(fake: ToyDiT, x0: torch.Tensor, h, m, gen: torch.Generator) -> torch.Tensor:
    """The fake score learns G's distribution: the flow-matching loss on G's x0."""
    t = uniform_t(x0.shape[0], gen)
    xt, eps = noised(x0, t, gen)
    return F.mse_loss(fake(xt, t, h, m), eps - x0)


def disc_loss(d: Discriminator, x0_fake: torch.Tensor, x_real: torch.Tensor, h, m, gen: torch.Generator,
              t_max: float, r1: float = 0.0) -> torch.Tensor:
    """The discriminator's non-saturating loss, plus `r1` times the R1 penalty (Mescheder et al. 2018:
    the squared gradient on real inputs, which keeps the discriminator from growing the high-frequency
    edges a generator then learns to paint)."""
    tf, tr = uniform_t(len(x0_fake), gen, t_max, 0.0), uniform_t(len(x_real), gen, t_max, 0.0)
    xr = noised(x_real, tr, gen)[0].requires_grad_(r1 > 0)
    logit_real = d(xr, h, m)
    loss = F.softplus(d(noised(x0_fake, tf, gen)[0], h, m)).mean() + F.softplus(-logit_real).mean()
    if r1:
        (grad,) = torch.autograd.grad(logit_real.sum(), xr, create_graph=True)
        loss = loss + r1 / 2 * grad.pow(2).sum((1, 2, 3)).mean()
    return loss


def generator_loss(g: ToyDiT, real: ToyDiT, fake: ToyDiT, d: Discriminator, xk, sigma: float, h, m,
                   gen: torch.Generator, gan_weight: float, t_max: float,
                   dmd_t_min: float = T_MIN, dmd_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """G's x0 at its own state x_k, its DMD loss and the non-saturating GAN loss (the fake score and
    the discriminator are frozen for this pass). Returns (loss, x0 detached, GAN loss)."""
    x0 = xk - sigma * g(xk, torch.full((xk.shape[0],), sigma), h, m)
    loss = dmd_loss(x0, real, fake, h, m, gen, dmd_t_min) * dmd_weight
    gan = torch.zeros(())
    if gan_weight:
        t = uniform_t(x0.shape[0], gen, t_max, 0.0)
        gan = F.softplus(-d(noised(x0, t, gen)[0], h, m)).mean()
        loss = loss + gan_weight * gan
    return loss, x0.detach(), gan.item()


def train_dmd(g: ToyDiT, real: ToyDiT, encode, sigmas, batches, iters: int, log, *, seed: int = 0,
              ratio: int = 5, lr_g: float = 1e-4, lr_c: float = 1e-4, lr_d: float = 1e-3, gan_g: float = 0.0,
              gan_t_max: float = 0.1, r1: float = 0.0, dmd_t_min: float = T_MIN, dmd_weight: float = 1.0,
              k_min: int = 0, patch_gan: bool = True, ema: float = 0.99, state_path: Path | None = None,
              save_every: int = 100, check=None, check_every: int = 0, stop=None,
              settings: dict | None = None) -> tuple[ToyDiT, list[dict], float]:
    """The DMD2 loop. `batches(rng)` yields the parts of one batch: (captions, real images, refs or None);
    `encode(captions, refs)` -> (hidden, mask), frozen. G is updated every `ratio`-th iteration, the
    fake score and the discriminator every iteration. `state_path`: the whole loop state is saved
    there every `save_every` iterations and picked up again (resumable; a longer `iters` continues);
    it must have been made with the same `settings`. `check(g_ema)` runs every `check_every`
    iterations; `stop(result)` (a rule fixed before the run) ends the loop early after a check. Returns
    G's EMA, the log of `check(g_ema)` results and the loop's CPU seconds (over resumes too). `g` is
    trained in place."""
    g.train()
    fake = copy.deepcopy(real).train().requires_grad_(True)
    real = real.eval().requires_grad_(False)
    with torch.random.fork_rng():  # the discriminator's initial weights: a function of the seed alone
        torch.manual_seed(seed)
        d = Discriminator(cond_dim=real.cond_embed[1].in_features, patch=patch_gan)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    opt_g = torch.optim.AdamW(g.parameters(), lr=lr_g, weight_decay=0.0)
    opt_c = torch.optim.AdamW(fake.parameters(), lr=lr_c, weight_decay=0.0)
    opt_d = torch.optim.AdamW(d.parameters(), lr=lr_d, betas=(0.5, 0.999), weight_decay=0.0)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    start, history, cpu_before = 0, [], 0.0
    settings = dict(settings or {}, seed=seed, ratio=ratio, lr_g=lr_g, lr_c=lr_c, lr_d=lr_d, gan_g=gan_g,
                    gan_t_max=gan_t_max, r1=r1, dmd_t_min=dmd_t_min, dmd_weight=dmd_weight, k_min=k_min,
                    patch_gan=patch_gan, ema=ema)
    parts_of = {"g": g, "g_ema": g_ema, "fake": fake, "d": d, "opt_g": opt_g, "opt_c": opt_c, "opt_d": opt_d}
    if state_path is not None and Path(state_path).is_file():
        st = torch.load(state_path, weights_only=False)
        if st["settings"] != settings:
            raise SystemExit(f"{state_path} was made with other settings ({st['settings']}); delete it to start over")
        for key, obj in parts_of.items():
            obj.load_state_dict(st[key])
        rng.setstate(st["rng"])
        gen.set_state(st["gen"])
        start, history, cpu_before = st["it"], st["history"], st["cpu_s"]
        log(f"dmd: resuming at iteration {start}/{iters} from {state_path}")
    t0, cpu0, n_sig = time.time(), time.process_time(), len(sigmas) - 1
    for it in range(start, iters):
        gen_turn = it % ratio == 0
        k = rng.randrange(k_min, n_sig)  # backward simulation: train at the state G itself reaches after k steps
        parts = list(batches(rng))
        n = sum(len(p[0]) for p in parts)
        for opt in (opt_g, opt_c, opt_d):
            opt.zero_grad(set_to_none=True)
        stats = {"gan": 0.0, "d": 0.0, "fake": 0.0}
        for caps, x_real, refs in parts:
            w = len(caps) / n
            with torch.no_grad():
                h, m = encode(caps, refs)
            xk = rollout_to(g, h, m, torch.randn(x_real.shape, generator=gen), sigmas, k)
            sigma = float(sigmas[k])
            if gen_turn:
                fake.requires_grad_(False)
                d.requires_grad_(False)
                loss, x0, gan = generator_loss(g, real, fake, d, xk, sigma, h, m, gen, gan_g, gan_t_max, dmd_t_min,
                                                 dmd_weight)
                (loss * w).backward()
                fake.requires_grad_(True)
                d.requires_grad_(True)
                stats["gan"] += gan * w
            else:
                with torch.no_grad():
                    x0 = xk - sigma * g(xk, torch.full((len(caps),), sigma), h, m)
            loss_c = fake_score_loss(fake, x0, h, m, gen)
            (loss_c * w).backward()
            stats["fake"] += loss_c.item() * w
            if gan_g:
                loss_d = disc_loss(d, x0, x_real, h, m, gen, gan_t_max, r1)
                (loss_d * w).backward()
                stats["d"] += loss_d.item() * w
        if gen_turn:
            torch.nn.utils.clip_grad_norm_(g.parameters(), 1.0)
            opt_g.step()
            with torch.no_grad():
                for pe, p in zip(g_ema.parameters(), g.parameters()):
                    pe.lerp_(p, 1 - ema)
        torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
        opt_c.step()
        opt_d.step()
        done = it + 1
        if it % 50 == 0 or done == iters:
            rate = (time.time() - t0) / (done - start)
            log(f"dmd {done}/{iters} fake-score {stats['fake']:.4f} D {stats['d']:.3f} G-gan {stats['gan']:.3f} "
                f"({time.time() - t0:.0f}s, ~{rate * (iters - done) / 60:.0f} min left)")
        if check is not None and check_every and (done % check_every == 0 or done == iters):
            history.append({"it": done, **check(g_ema)})
            log(f"dmd {done}/{iters} check: " + " ".join(f"{k2} {v:.3f}" for k2, v in history[-1].items()
                                                         if k2 != "it"))
            if stop is not None and stop(history[-1]):
                log(f"dmd: the stopping rule holds at iteration {done}; stopping")
                break
        if state_path is not None and (done % save_every == 0 and done < iters):
            torch.save({"settings": settings, "it": done, "history": history,
                        "cpu_s": cpu_before + time.process_time() - cpu0, "rng": rng.getstate(),
                        "gen": gen.get_state(), **{key: obj.state_dict() for key, obj in parts_of.items()}},
                       state_path)
    return g_ema, history, cpu_before + time.process_time() - cpu0
