"""Shared fixtures: tiny model folders in the real Hugging Face layouts, built once per session.

    tiny_zimage_dir   ZImagePipeline folder (Tongyi-MAI/Z-Image-Turbo layout)
    tiny_klein_dir    Flux2KleinPipeline folder (black-forest-labs/FLUX.2-klein-4B layout)
    tiny_vlm_dir      Qwen3VLForConditionalGeneration folder (Qwen/Qwen3-VL-4B-Instruct layout)
                      whose language model has the dims of tiny_zimage_dir/text_encoder

Treat them as read-only: they are shared by every test of the session.
"""
import pytest

from lowvram_dopsd import tiny


@pytest.fixture(scope="session")
def tiny_zimage_dir(tmp_path_factory):
    return tiny.make_tiny_zimage(tmp_path_factory.mktemp("tiny") / "z-image-turbo", seed=0)


@pytest.fixture(scope="session")
def tiny_klein_dir(tmp_path_factory):
    return tiny.make_tiny_klein(tmp_path_factory.mktemp("tiny") / "flux2-klein", seed=0)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, tiny_zimage_dir):
    return tiny.make_tiny_qwen3vl(tmp_path_factory.mktemp("tiny") / "qwen3-vl",
                                  tiny_zimage_dir / "text_encoder", seed=0)
