"""Helpers for the checkpoint / sample / export / preview tests: a LoRA file without a training run."""
from pathlib import Path

import torch

from lowvram_dopsd.config import load_config
from lowvram_dopsd.families import load_family
from lowvram_dopsd.lora import DualLoRA
from lowvram_dopsd.output import LORA_FILE, save_lora

CPU = torch.device("cpu")


def random_lora(model_dir: Path, out_dir: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0, std: float = 0.3):
    """The tiny Z-Image with a non-trivial student and teacher LoRA, saved as the trainer saves it."""
    cfg = load_config("cpu-demo", {"model": str(model_dir)})
    family = load_family(str(model_dir))
    model = family.load_transformer(cfg, CPU, torch.float32)
    torch.manual_seed(seed)
    lora = DualLoRA.attach(model, family.lora_targets, rank, alpha)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.student_B.normal_(std=std)
            layer.teacher_B.normal_(std=std)
    info = {"base_model": str(model_dir), "family": family.name, "teacher": "vlm", "caption_rule": "test",
            "trigger": "sks", "steps": 3, "resolution": 64}
    path = save_lora(Path(out_dir) / LORA_FILE, lora, "student", info, dtype=torch.float32)
    save_lora(Path(out_dir) / "teacher_ema_lora.safetensors", lora, "teacher", info, dtype=torch.float32)
    return cfg, family, model, lora, path
