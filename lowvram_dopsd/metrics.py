"""The models `eval` scores images with: DINO features and CLIP, both transformers classes.

- DINO (default `facebook/dinov3-vits16plus-pretrain-lvd1689m`, DINOv3 ViT-S+/16 as the paper's DINO-D;
  any Dinov2/DINOv3 folder works): an image's feature is the mean of its patch tokens after the final
  norm, L2-normalised, the image fed whole at its own size with ImageNet's mean/std. Distance = 1 - cosine.
- CLIP (default `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, the ViT-H-14 of the authors' scoring script):
  CLIP-S = cosine of the normalised image and text embeddings (not x100, not clipped at 0: as the
  authors report it); the image goes through the model's own CLIPProcessor (224 px centre crop).
- CLIP-IQA (Wang, Chan & Loy, AAAI 2023; torchmetrics' CLIPImageQualityAssessment and pyiqa's `clipiqa`
  package it) with the same CLIP: the softmax of 100 x the cosine to two antonym prompts, the positive's
  share. No reference image and no prompt; its pairs "sharp / blurry" and "clean / noisy" name what a
  broken few-step model draws. tests/test_metrics.py checks CLIP-S and CLIP-IQA against torchmetrics.

Models come from a Hugging Face id (downloaded on first use, only the files `from_pretrained` reads:
the laion repo also holds two pickled copies of its weights) or a local folder, and are read from
safetensors only. Memory is planned from the config before any weight is read (`planned_bytes`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import UserError
from .files import component_problem

DINO_DEFAULT = "facebook/dinov3-vits16plus-pretrain-lvd1689m"
CLIP_DEFAULT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# what from_pretrained reads (configs, tokenizer, safetensors weights, sharded or not)
MODEL_FILES = ("*.json", "*.txt", "model.safetensors", "model-*.safetensors")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CLIP-IQA's antonym pairs (the paper's; torchmetrics' names): what few-step breakage looks like
IQA_PAIRS = {"quality": ("Good photo.", "Bad photo."), "sharpness": ("Sharp photo.", "Blurry photo."),
             "noisiness": ("Clean photo.", "Noisy photo.")}
IQA_LOGIT_SCALE = 100.0  # CLIP's trained temperature, fixed as in CLIP-IQA
GATED = {DINO_DEFAULT: "Meta's DINOv3 weights are gated: accept their license on "
                       f"https://huggingface.co/{DINO_DEFAULT} and log in (`hf auth login`) before downloading; "
                       "or pass --dino-model facebook/dinov2-small (not gated; its distances are not the paper's)."}


def locate(model: str, what: str) -> Path:
    """The folder of a metric model: local, cached, or downloaded now (only `MODEL_FILES`)."""
    from .files import resolve_dir

    try:
        folder = resolve_dir(model, what, needs="config.json", include=MODEL_FILES)
    except UserError as exc:
        raise UserError(f"{exc} {GATED.get(model, '')}".rstrip()) from exc
    if problem := component_problem(folder):  # safetensors only, every shard there
        raise UserError(f"The {what} folder '{folder}' {problem}")
    return folder


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def planned_bytes(folder: Path, dtype: torch.dtype, batch: int = 1, size: tuple[int, int] | None = None) -> int:
    """Peak memory of one no-grad forward, from the config alone: the weights (the model built on the meta
    device, every parameter counted) plus one layer's widest activations for `batch` images of `size` (w, h;
    None: the model's own image_size) through SDPA attention (no tokens² scores on a GPU), plus 20% for the
    allocator and the kernels' workspace."""
    from transformers import AutoModel

    config = _config(folder)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    vision = getattr(config, "vision_config", None) or config
    w, h = size or (vision.image_size, vision.image_size)
    tokens = (w // vision.patch_size) * (h // vision.patch_size) + 1 + getattr(vision, "num_register_tokens", 0)
    nbytes = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * nbytes
    activations = batch * tokens * (6 * vision.hidden_size + 2 * vision.intermediate_size) * nbytes
    return int(1.2 * (weights + activations))


def load(folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def _pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size[1], size[0], 3).permute(2, 0, 1)


@dataclass
class Dino:
    model: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def open(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> "Dino":
        model = load(folder, device, dtype)
        if not hasattr(model.config, "patch_size"):
            raise UserError(f"'{folder}' is a {type(model).__name__}, not a DINO vision transformer: pass a Dinov2 "
                            f"or DINOv3 ViT as --dino-model (default {DINO_DEFAULT}).")
        pre = folder / "preprocessor_config.json"
        stats = json.loads(pre.read_text()) if pre.is_file() else {}
        return cls(model, tuple(stats.get("image_mean", IMAGENET_MEAN)), tuple(stats.get("image_std", IMAGENET_STD)))

    @torch.no_grad()
    def features(self, images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """[N, D] unit vectors: each image resized to `size` (w, h) if it is not already (as the authors do
        with the training image: to the generated image's size), fed whole, its patch tokens averaged."""
        p = self.model.config.patch_size
        patches = (size[0] // p) * (size[1] // p)
        param = next(self.model.parameters())
        mean = torch.tensor(self.mean, device=param.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=param.device).view(1, 3, 1, 1)
        out = []
        for image in images:  # one at a time: 1024² is 4096 tokens
            x = _pixels(image, size).unsqueeze(0).to(param.device, torch.float32) / 255.0
            hidden = self.model(pixel_values=((x - mean) / std).to(param.dtype)).last_hidden_state
            out.append(F.normalize(hidden[:, -patches:].float().mean(dim=1), dim=-1).cpu())
        return torch.cat(out)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """1 - cosine of paired unit vectors (rows of a and b)."""
    return (1.0 - (a * b).sum(dim=-1)).tolist()


@dataclass
class Clip:
    model: torch.nn.Module
    processor: object
    batch: int = 8

    @classmethod
    def open(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> "Clip":
        from transformers import CLIPModel, CLIPProcessor

        model = load(folder, device, dtype)
        if not isinstance(model, CLIPModel):
            raise UserError(f"'{folder}' is a {type(model).__name__}, not a CLIP model (transformers' CLIPModel): "
                            f"pass one as --clip-model (default {CLIP_DEFAULT}).")
        return cls(model, CLIPProcessor.from_pretrained(folder))

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        param, out = next(self.model.parameters()), []
        for i in range(0, len(images), self.batch):
            pixels = self.processor(images=[im.convert("RGB") for im in images[i:i + self.batch]],
                                    return_tensors="pt")["pixel_values"]
            emb = self.model.get_image_features(pixel_values=pixels.to(param.device, param.dtype))
            out.append(F.normalize(_embeds(emb).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        param = next(self.model.parameters())
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)
        emb = self.model.get_text_features(input_ids=tokens["input_ids"].to(param.device),
                                           attention_mask=tokens["attention_mask"].to(param.device))
        return F.normalize(_embeds(emb).float(), dim=-1).cpu()

    def iqa(self, image_features: torch.Tensor) -> dict[str, list[float]]:
        """CLIP-IQA per antonym pair: the probability CLIP gives the positive prompt, per image."""
        anchors = self.text_features([p for pair in IQA_PAIRS.values() for p in pair])
        logits = IQA_LOGIT_SCALE * image_features @ anchors.T  # [N, 2 * pairs]
        probs = logits.view(len(image_features), len(IQA_PAIRS), 2).softmax(dim=-1)[..., 0]
        return {name: probs[:, k].tolist() for k, name in enumerate(IQA_PAIRS)}


def _embeds(out) -> torch.Tensor:
    """get_*_features returns the projected embeddings (a tensor; a model output with `pooler_output` in some
    transformers releases)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
