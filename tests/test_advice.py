"""advice.py: what a run tells its user before it starts."""
from pathlib import Path
from types import SimpleNamespace

import torch

from lowvram_dopsd.advice import run_header
from lowvram_dopsd.config import load_config


def test_the_header_says_host_ram_only_for_an_ema_teacher_moved_off_the_gpu():
    """teacher_ema_on = "cpu" moves the teacher's EMA state from the GPU to host RAM; on a CPU run
    everything is in host RAM already, and saying so of the teacher alone would mislead."""
    cfg = load_config("12gb", {})
    assert cfg.teacher_ema_on == "cpu"
    family = SimpleNamespace(name="zimage", transformer_file=None)
    ds = type("DS", (), {"__len__": lambda self: 6, "source": "./my_dog", "skipped": [],
                         "caption_rule": "the trigger alone"})()

    def compute(device: str) -> str:
        return run_header(cfg, "12gb", family, ds, "vlm", (8, 8), 4e-5, torch.device(device), {},
                          Path("out"), None)["compute"]

    assert "EMA teacher in host RAM" in compute("cuda")
    assert "host RAM" not in compute("cpu")
