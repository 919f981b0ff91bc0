"""The toy world: procedurally drawn 32x32 scenes and captions generated from their attributes.

A scene is one shape on a flat background. Attributes:
  shape      circle | square | triangle | cross            (the base model's named shapes)
             ring                                          (the NEW concept: never seen by the base;
                                                            bound to the trigger word at fine-tune time)
             blob                                          (random star-shaped polygons, never named:
                                                            only used to teach the in-context reading;
                                                            optionally with a hole that follows the outline)
  colour     red | green | blue | yellow | purple
  size       small | large
  position   center | left | right | top | bottom        (+-1 px jitter)
  background black | gray | white

Caption: "a {size} {colour} {shape} at the {position} on {background} background" (10 words).
Rendering is anti-aliased (4x supersampling), deterministic given the scene (jitter and blob
geometry are part of the scene).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross")
CONCEPT_SHAPE = "ring"
ALL_SHAPES = SHAPES + (CONCEPT_SHAPE,)          # classifier's shape head
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 225),
           "yellow": (235, 210, 40), "purple": (150, 60, 200)}
SIZES = {"small": 5.0, "large": 9.0}
POSITIONS = {"center": (16, 16), "left": (9.5, 16), "right": (22.5, 16), "top": (16, 9.5), "bottom": (16, 22.5)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
TRIGGER = "sks"
IMAGE_SIZE = 32
SS = 4  # supersampling


@dataclass
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    jitter: tuple[float, float] = (0.0, 0.0)
    blob: tuple[float, ...] = field(default_factory=tuple)  # radial profile of a blob (8..12 values)
    hole: float = 0.0  # a blob's hole: radius as a share of its outline (0 = solid)

    def caption(self, shape_word: str | None = None) -> str:
        word = shape_word or self.shape
        return f"a {self.size} {self.colour} {word} at the {self.position} on {self.background} background"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_caption(caption: str) -> dict[str, str]:
    """Attributes back from a caption (inverse of Scene.caption)."""
    w = caption.replace(",", " ").split()
    if len(w) != 10 or w[0] != "a" or w[4:6] != ["at", "the"] or w[7] != "on" or w[9] != "background":
        raise ValueError(f"not a toy-world caption: {caption!r}")
    return {"size": w[1], "colour": w[2], "shape": w[3], "position": w[6], "background": w[8]}


def random_scene(rng: random.Random, shapes=SHAPES, colours=None, sizes=None, positions=None,
                 backgrounds=None, blob_holes: float = 0.0) -> Scene:
    shape = rng.choice(list(shapes))
    blob, hole = (), 0.0
    if shape == "blob":
        n = rng.randint(5, 9)
        blob = tuple(rng.uniform(0.45, 1.0) for _ in range(n))
        if blob_holes and rng.random() < blob_holes:  # no draw at 0: v1's data stream unchanged
            hole = rng.uniform(0.35, 0.65)
    return Scene(shape=shape, colour=rng.choice(list(colours or COLOURS)), size=rng.choice(list(sizes or SIZES)),
                 position=rng.choice(list(positions or POSITIONS)),
                 background=rng.choice(list(backgrounds or BACKGROUNDS)),
                 jitter=(rng.uniform(-1, 1), rng.uniform(-1, 1)), blob=blob, hole=hole)


_grid_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid() -> tuple[np.ndarray, np.ndarray]:
    if SS not in _grid_cache:
        c = (np.arange(IMAGE_SIZE * SS) + 0.5) / SS
        _grid_cache[SS] = np.meshgrid(c, c, indexing="xy")
    return _grid_cache[SS]


def shape_mask(scene: Scene) -> np.ndarray:
    """Coverage in [0, 1] of the shape at 32x32 (anti-aliased)."""
    X, Y = _grid()
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.jitter[0], cy + scene.jitter[1]
    r = SIZES[scene.size]
    dx, dy = X - cx, Y - cy
    d = np.sqrt(dx * dx + dy * dy)
    s = scene.shape
    if s == "circle":
        m = d <= r
    elif s == "ring":
        m = (d <= r) & (d >= 0.5 * r)
    elif s == "square":
        m = np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    elif s == "triangle":  # pointing up, centroid at the centre
        h = 1.5 * r
        top, base = -r, 0.5 * r
        m = (dy >= top) & (dy <= base) & (np.abs(dx) <= (dy - top) / h * (0.87 * r))
    elif s == "cross":
        t = 0.33 * r
        m = ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    elif s == "blob":
        prof = np.asarray(scene.blob + scene.blob[:1])
        ang = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * (len(prof) - 1)
        i = np.floor(ang).astype(int).clip(0, len(prof) - 2)
        f = ang - i
        rho = (prof[i] * (1 - f) + prof[i + 1] * f) * r * 1.1
        m = (d <= rho) & (d >= scene.hole * rho)
    else:
        raise ValueError(f"unknown shape {s!r}")
    m = m.astype(np.float32).reshape(IMAGE_SIZE, SS, IMAGE_SIZE, SS).mean(axis=(1, 3))
    return m


def render(scene: Scene) -> np.ndarray:
    """uint8 HxWx3."""
    m = shape_mask(scene)[..., None]
    fg = np.asarray(COLOURS[scene.colour], np.float32)
    bg = np.asarray(BACKGROUNDS[scene.background], np.float32)
    return np.round(bg * (1 - m) + fg * m).astype(np.uint8)


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    a = np.stack(images) if isinstance(images, list) else images
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,3,H,W] in [-1, 1] -> uint8 [N,H,W,3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def batch(rng: random.Random, n: int, **kw) -> tuple[list[Scene], torch.Tensor]:
    scenes = [random_scene(rng, **kw) for _ in range(n)]
    return scenes, to_tensor([render(s) for s in scenes])


# ------------------------------------------------------------------------------------------- tokenizer
PLACEHOLDERS = tuple(f"w{i}" for i in range(32))  # rare words: shape slot of in-context blobs
VOCAB = (("[pad]", "[unk]", "a", "at", "the", "on", "background", "object")
         + SHAPES + (CONCEPT_SHAPE,) + tuple(COLOURS) + tuple(SIZES) + tuple(POSITIONS) + tuple(BACKGROUNDS)
         + PLACEHOLDERS + (TRIGGER,))
MAX_TOKENS = 12


class Tokenizer:
    """Word-level, fixed vocabulary (written to tokenizer/vocab.json). Unknown words -> [unk]."""

    def __init__(self, vocab: list[str] | tuple[str, ...] = VOCAB, max_tokens: int = MAX_TOKENS):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(captions), self.max_tokens, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.bool)
        for b, c in enumerate(captions):
            words = c.lower().replace(",", " ").split()[: self.max_tokens]
            for j, w in enumerate(words):
                ids[b, j] = self.index.get(w, 1)
                mask[b, j] = True
        return ids, mask


def render_file(path) -> np.ndarray:
    """A concept-set image back from disk as uint8 HxWx3 at 32x32."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)))
