"""Shared fixtures: tiny Hugging Face-layout checkpoints built once per test session.

    tiny_zimage_dir   ZImagePipeline folder (Tongyi-MAI/Z-Image-Turbo layout)
    tiny_klein_dir    Flux2KleinPipeline folder (black-forest-labs/FLUX.2-klein-4B layout)
    tiny_klein9b_dir  the same for FLUX.2-klein-9B (Qwen3-8B-shaped, untied text encoder)
    tiny_flux3_dir    Flux3DistilledModularPipeline folder (FLUX.3 Image Klein distilled)
    tiny_vlm_dir      Qwen3VLForConditionalGeneration folder (Qwen/Qwen3-VL-4B-Instruct layout)
                      whose language model has the dims of tiny_zimage_dir/text_encoder
    tiny_dino_dir     DINOv3ViTModel folder (facebook/dinov3-vits16plus-pretrain-lvd1689m layout), eval's DINO
    tiny_clip_dir     CLIPModel + CLIPProcessor folder (laion/CLIP-ViT-H-14-laion2B-s32B-b79K layout), eval's CLIP
    demo_images       the bundled demo images with their captions
    fake_gpu          fake_gpu((7, 5)): torch sees one CUDA GPU of that compute capability (no GPU needed)
    timed_on_4090     `train` on the CPU times itself as if on an RTX 4090 (the time planner's note)

Treat them as read-only: they are shared by every test of the session.

`tiny_demo_root` holds `tiny-zimage/` and `tiny-qwen3vl/` exactly as `lowvram-dopsd demo` lays
them out, so the demo test reuses the same folders instead of building its own.
"""
import os
from importlib import resources
from pathlib import Path

import pytest
import torch

# The tiny models are latency-bound: one thread is ~400x faster per small op than two fighting
# threads on a 2-core machine (11 ms vs 26 µs for a small bf16 op, measured here).
torch.set_num_threads(1)

# Triton decides at decoration time whether to interpret: set it before any kernel module is
# imported, so every test (not only tests/kernels) runs the kernels on the CPU through it.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("LOWVRAM_DOPSD_TEST_GPU") == "1" else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory) -> Path:
    from lowvram_dopsd.tiny import make_tiny_qwen3vl, make_tiny_zimage

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_zimage(root / "tiny-zimage")
    make_tiny_qwen3vl(root / "tiny-qwen3vl", text_encoder_dir=root / "tiny-zimage" / "text_encoder")
    return root


@pytest.fixture(scope="session")
def tiny_zimage_dir(tiny_demo_root) -> Path:
    return tiny_demo_root / "tiny-zimage"


@pytest.fixture(scope="session")
def tiny_vlm_dir(tiny_demo_root) -> Path:
    return tiny_demo_root / "tiny-qwen3vl"


@pytest.fixture(scope="session")
def tiny_klein_dir(tmp_path_factory) -> Path:
    from lowvram_dopsd.tiny import make_tiny_klein

    return make_tiny_klein(tmp_path_factory.mktemp("tiny-klein") / "tiny-klein")


@pytest.fixture(scope="session")
def tiny_dino_dir(tmp_path_factory) -> Path:
    from lowvram_dopsd.tiny import make_tiny_dino

    return make_tiny_dino(tmp_path_factory.mktemp("tiny-dino") / "dino")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from lowvram_dopsd.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


@pytest.fixture(scope="session")
def tiny_klein9b_dir(tmp_path_factory) -> Path:
    from lowvram_dopsd.tiny import make_tiny_klein

    return make_tiny_klein(tmp_path_factory.mktemp("tiny-klein9b") / "tiny-klein-9b", size="9b")


@pytest.fixture(scope="session")
def tiny_flux3_dir(tmp_path_factory) -> Path:
    from lowvram_dopsd.tiny import make_tiny_flux3

    return make_tiny_flux3(tmp_path_factory.mktemp("tiny-flux3") / "tiny-flux3")


@pytest.fixture(scope="session")
def demo_images() -> Path:
    return Path(str(resources.files("lowvram_dopsd") / "assets" / "demo"))


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees one CUDA GPU of the given compute capability. The kernels look a GPU's capability up
    once (kernels.utils.capability), so the made-up one is dropped from that cache before and after."""
    from lowvram_dopsd.kernels import utils

    def make(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        utils.capability.cache_clear()
    yield make
    utils.capability.cache_clear()


@pytest.fixture
def timed_on_4090(monkeypatch, tmp_path):
    """The time planner takes the run's device for an RTX 4090, so `train` on the CPU prints its time note;
    asking after a step was written (metrics.jsonl under tmp_path) fails the run: the note comes first."""
    from lowvram_dopsd import timeplan
    from lowvram_dopsd.gpus import gpu_named

    def this_gpu(device):
        assert not list(tmp_path.rglob("metrics.jsonl")), "the time note came after the first step"
        return gpu_named("RTX 4090")
    monkeypatch.setattr(timeplan, "this_gpu", this_gpu)
