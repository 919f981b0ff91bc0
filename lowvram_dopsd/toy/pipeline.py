"""ToyDiTPipeline: the toy world's "diffusers pipeline" (what `model_index.json` names).

    pipe = ToyDiTPipeline.from_pretrained("lowvram_dopsd/assets/toy/model")
    pipe.load_lora_weights("out/")                      # the trainer's pytorch_lora_weights.safetensors
    images = pipe(["a large red sks at the left on gray background"], seed=0)   # [-1, 1], [B,3,32,32]

Sampling = Euler over the scheduler's sigmas (4 steps), noise drawn like the trainer draws it
(`torch.randn((B, 3, 32, 32), generator=torch.Generator().manual_seed(seed))`).
LoRA loading reads the trainer's file format (keys `transformer.<module>.lora_A.weight` [r, in] /
`lora_B.weight` [out, r], scale lora_alpha / r from `lora_adapter_metadata`) and merges it into
the weights, as `pipe.fuse_lora()` would.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import world
from .models import load_module


class ToyDiTPipeline:
    def __init__(self, transformer, text_encoder, tokenizer: world.Tokenizer, sigmas: list[float]):
        self.transformer, self.text_encoder, self.tokenizer = transformer, text_encoder, tokenizer
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)
        self._pristine = copy.deepcopy(transformer.state_dict())

    @classmethod
    def from_pretrained(cls, folder, transformer_subfolder: str = "transformer") -> "ToyDiTPipeline":
        folder = Path(folder)
        vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        return cls(load_module(folder / transformer_subfolder), load_module(folder / "text_encoder"),
                   world.Tokenizer(vocab["vocab"], vocab["max_tokens"]), sched["sigmas"])

    # ------------------------------------------------------------------ conditions
    @torch.no_grad()
    def encode(self, captions: list[str], images: torch.Tensor | None = None):
        ids, mask = self.tokenizer(captions)
        return self.text_encoder(ids, mask, images)

    # ------------------------------------------------------------------ LoRA
    @torch.no_grad()
    def load_lora_weights(self, path, scale: float = 1.0) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "pytorch_lora_weights.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("lora_adapter_metadata", "{}"))
        tensors = load_file(str(path))
        r = meta.get("transformer.r")
        alpha = meta.get("transformer.lora_alpha", r)
        params = dict(self.transformer.named_parameters())
        for key, A in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len("transformer."):-len(".lora_A.weight")]
            B = tensors[key.replace("lora_A", "lora_B")]
            s = scale * (alpha if alpha is not None else A.shape[0]) / (r if r is not None else A.shape[0])
            params[f"{module}.weight"].add_(s * (B.float() @ A.float()))

    def unload_lora_weights(self) -> None:
        self.transformer.load_state_dict(self._pristine)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompts: list[str], seed: int = 0, num_inference_steps: int | None = None,
                 reference_images: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        h, m = self.encode(prompts, reference_images)
        sigmas = self.sigmas if num_inference_steps in (None, len(self.sigmas) - 1) else \
            torch.linspace(1, 0, num_inference_steps + 1)
        if noise is None:
            noise = torch.randn((len(prompts), 3, world.IMAGE_SIZE, world.IMAGE_SIZE),
                                generator=torch.Generator().manual_seed(seed))
        return sample(self.transformer, h, m, noise, sigmas)


@torch.no_grad()
def sample(dit, h, m, noise, sigmas) -> torch.Tensor:
    x = noise
    for k in range(len(sigmas) - 1):
        s = torch.full((x.shape[0],), float(sigmas[k]))
        x = x + (float(sigmas[k + 1]) - float(sigmas[k])) * dit(x, s, h, m).float()
    return x
