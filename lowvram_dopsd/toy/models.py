"""The toy world's networks. All tiny (tens to hundreds of thousands of parameters), CPU-trainable.

ToyEncoder   one shared transformer; input [caption tokens] (the student's, text-only reading) or
             [reference-image patch tokens + caption tokens] (the teacher's, in-context reading),
             output: the hidden states of every input token, in ONE feature space (like the grafted VLM).
ToyDiT       pixel-space flow-matching DiT on 32x32x3, patch 4 (64 image tokens), single-stream joint
             attention over [condition tokens; image tokens] (like Z-Image), adaLN from sigma.
             Predicts v = noise - x0, so x_next = x + (sigma_next - sigma)·v and x0 = x - sigma·v.
ToyClassifier  small CNN with attribute heads (shape incl. the concept, colour, size, position,
             background); its penultimate features are the evaluation's feature space.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import world


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.attn_qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        m = key_mask[:, None, None, :] if key_mask is not None else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return self.attn_out(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp_in = nn.Linear(dim, hidden)
        self.mlp_out = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.mlp_out(F.gelu(self.mlp_in(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim, 2 * dim)

    def forward(self, x, mask):
        x = x + self.attn(self.n1(x), mask)
        return x + self.mlp(self.n2(x))


def sincos_2d(n_side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [n_side², dim] (as in DiT/MAE), unit scale."""
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(n_side, dtype=torch.float32), torch.arange(n_side, dtype=torch.float32),
                            indexing="ij")
    out = [torch.sin(xs.flatten()[:, None] * omega), torch.cos(xs.flatten()[:, None] * omega),
           torch.sin(ys.flatten()[:, None] * omega), torch.cos(ys.flatten()[:, None] * omega)]
    return torch.cat(out, 1)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = img.shape
    return img.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tok: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    B = tok.shape[0]
    return tok.view(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


class ToyEncoder(nn.Module):
    def __init__(self, vocab_size: int = len(world.VOCAB), dim: int = 64, layers: int = 2, heads: int = 4,
                 max_tokens: int = world.MAX_TOKENS, image_patch: int = 8):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, dim=dim, layers=layers, heads=heads, max_tokens=max_tokens,
                           image_patch=image_patch)
        self.image_patch = image_patch
        self.tok = nn.Embedding(vocab_size, dim)
        self.patch = nn.Linear(3 * image_patch * image_patch, dim)
        self.pos_text = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.register_buffer("pos_img", sincos_2d(world.IMAGE_SIZE // image_patch, dim), persistent=False)
        self.blocks = nn.ModuleList([EncoderBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor | None = None):
        """ids/mask [B, T]; image [B,3,32,32] in [-1,1] or None. Returns hidden [B, L, D] and mask [B, L]."""
        h = self.tok(ids) + self.pos_text[: ids.shape[1]]
        if image is not None:
            hi = self.patch(patchify(image, self.image_patch)) + self.pos_img
            h = torch.cat([hi, h], 1)
            mask = torch.cat([torch.ones(hi.shape[:2], dtype=torch.bool, device=mask.device), mask], 1)
        for blk in self.blocks:
            h = blk(h, mask)
        return self.norm(h), mask


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    a = (sigma.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], -1)


class DiTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.n2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim, 2 * dim)
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, mask):
        s1, b1, g1, s2, b2, g2 = self.ada(c)[:, None].chunk(6, -1)
        x = x + g1 * self.attn(self.n1(x) * (1 + s1) + b1, mask)
        return x + g2 * self.mlp(self.n2(x) * (1 + s2) + b2)


class ToyDiT(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 4, heads: int = 4, patch: int = 4, cond_dim: int = 64,
                 ref_grid: bool = False, ref_add: bool = False, text_tokens: int = world.MAX_TOKENS):
        super().__init__()
        self.config = dict(dim=dim, layers=layers, heads=heads, patch=patch, cond_dim=cond_dim, ref_grid=ref_grid,
                           ref_add=ref_add, text_tokens=text_tokens)
        # ref_grid: a condition longer than the caption holds a reference image's patch tokens first
        # (ToyEncoder's layout); they get the DiT's own 2-D positions, so "the patch of the reference
        # at my position" is one attention lookup. FLUX.2 does the same for its reference latents
        # (they share the image's position grid). Needs the encoder's patch = the DiT's patch.
        # ref_add: each reference token is also added to the image token at its grid position (the
        # aligned reference conditioning of image-edit models): attention averages neighbouring
        # patches and blurs a copied shape; this path keeps it sharp where it stands (docs/toy.md).
        self.ref_grid, self.text_tokens = ref_grid or ref_add, text_tokens
        self.ref_in = nn.Linear(dim, dim) if ref_add else None
        self.patch, self.dim = patch, dim
        self.x_embed = nn.Linear(3 * patch * patch, dim)
        self.register_buffer("pos", sincos_2d(world.IMAGE_SIZE // patch, dim), persistent=False)
        self.cond_embed = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, dim))
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([DiTBlock(dim, heads) for _ in range(layers)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.final_ada = nn.Linear(dim, 2 * dim)
        # Tokens -> an 8-channel 32x32 feature map -> a small conv head that sees the noisy input too
        # (smooths across patch borders: pixel-space patch DiTs this small otherwise render blocks).
        self.final = nn.Linear(dim, 8 * patch * patch)
        self.head_in = nn.Conv2d(8 + 3, 32, 3, padding=1)
        self.head_out = nn.Conv2d(32, 3, 3, padding=1)
        for m in (self.final_ada, self.head_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def dtype(self):
        return self.x_embed.weight.dtype

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor):
        """x [B,3,32,32], sigma [B], cond [B,L,cond_dim], cond_mask [B,L] -> v [B,3,32,32]."""
        B, C, H, W = x.shape
        h = self.x_embed(patchify(x, self.patch)) + self.pos
        c = self.cond_embed(cond)
        L = c.shape[1]
        if self.ref_grid and L > self.text_tokens:
            n_ref = L - self.text_tokens
            if n_ref != self.pos.shape[0]:
                raise ValueError(f"reference tokens ({n_ref}) must match the DiT's grid ({self.pos.shape[0]}): "
                                 "the encoder's image patch must equal the DiT's patch")
            if self.ref_in is not None:
                h = h + self.ref_in(c[:, :n_ref])
            c = torch.cat([c[:, :n_ref] + self.pos, c[:, n_ref:]], 1)
        seq = torch.cat([c, h], 1)
        mask = torch.cat([cond_mask, torch.ones(B, h.shape[1], dtype=torch.bool, device=x.device)], 1)
        t = self.t_embed(timestep_embedding(sigma, self.dim))
        for blk in self.blocks:
            seq = blk(seq, t, mask)
        h = seq[:, L:]
        shift, scale = self.final_ada(t)[:, None].chunk(2, -1)
        h = self.final(self.final_norm(h) * (1 + scale) + shift)
        f = unpatchify(h, self.patch, 8, H, W)
        return self.head_out(F.gelu(self.head_in(torch.cat([f, x.to(f.dtype)], 1))))


HEADS = {"shape": world.ALL_SHAPES, "colour": tuple(world.COLOURS), "size": tuple(world.SIZES),
         "position": tuple(world.POSITIONS), "background": tuple(world.BACKGROUNDS)}


class ToyClassifier(nn.Module):
    def __init__(self, width: int = 32, feat: int = 128):
        super().__init__()
        self.config = dict(width=width, feat=feat)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),   # 16
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 8
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),  # 4
            nn.Flatten(), nn.Linear(4 * w * 16, feat), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(feat, len(v)) for k, v in HEADS.items()})

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        f = self.body(x)
        return {k: h(f) for k, h in self.heads.items()}


# ------------------------------------------------------------------------------------ save / load
def save_module(module: nn.Module, folder: Path, kind: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": kind, **module.config}, indent=2))
    save_file({k: v.detach().contiguous().float() for k, v in module.state_dict().items()},
              str(folder / "model.safetensors"))


CLASSES = {"ToyEncoder": ToyEncoder, "ToyDiT": ToyDiT, "ToyClassifier": ToyClassifier}


def load_module(folder: Path) -> nn.Module:
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cls = CLASSES[cfg.pop("_class_name")]
    m = cls(**cfg)
    m.load_state_dict(load_file(str(folder / "model.safetensors")))
    return m.eval()
