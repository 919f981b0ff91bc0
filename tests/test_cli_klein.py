"""The command line on a tiny FLUX.2-klein folder: both teachers end to end, and a teacher a family lacks;
the vlm teacher's condition layout."""
import pytest
import torch
from diffusers import Flux2KleinPipeline

from lowvram_dopsd.cli import main
from lowvram_dopsd.config import DEFAULT_EDIT_INSTRUCTION
from lowvram_dopsd.output import read_info


@pytest.fixture(scope="module")
def klein_vlm_dir(tmp_path_factory, tiny_klein_dir):
    """A tiny Qwen3-VL whose language model has the dims of klein's text encoder (a Qwen3ForCausalLM)."""
    from lowvram_dopsd.tiny import make_tiny_qwen3vl

    return make_tiny_qwen3vl(tmp_path_factory.mktemp("klein-vlm") / "vlm",
                             text_encoder_dir=tiny_klein_dir / "text_encoder")


def train_args(tmp_path, model_dir, images, *extra):
    return ["train", "--preset", "cpu-demo", "--model", str(model_dir), "--images", str(images),
            "--output", str(tmp_path / "run"), "--steps", "2", "--cache-dir", str(tmp_path / "cache"), *extra]


def test_edit_teacher_is_klein_default_and_its_lora_loads(tmp_path, tiny_klein_dir, demo_images, capsys,
                                                          timed_on_4090):
    assert main(train_args(tmp_path, tiny_klein_dir, demo_images, "--set", "train_states=2")) == 0
    out = tmp_path / "run"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    info = read_info(out / "pytorch_lora_weights.safetensors")
    assert info["family"] == "klein" and info["teacher"] == "edit" and info["rollout_steps"] == 4
    assert info["edit_instruction"] == DEFAULT_EDIT_INSTRUCTION
    printed = capsys.readouterr().out
    assert "edit_instruction" in printed and "teacher edit" in printed and "Flux2KleinPipeline" in printed
    joined = " ".join(printed.split())  # before the first step: attention kernels, the time prediction
    assert "attention: native backend; teacher: " in joined and "time on the RTX 4090 (predicted" in joined
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein_dir, dtype=torch.float32)
    pipe.load_lora_weights(out)


def test_edit_instruction_is_a_setting(tmp_path, tiny_klein_dir, demo_images):
    code = main(train_args(tmp_path, tiny_klein_dir, demo_images, "--teacher", "edit", "--steps", "1",
                           "--set", "edit_instruction=Keep the ball from the reference image."))
    assert code == 0
    info = read_info(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert info["edit_instruction"] == "Keep the ball from the reference image."


def test_vlm_teacher_on_klein(tmp_path, tiny_klein_dir, klein_vlm_dir, demo_images, capsys):
    code = main(train_args(tmp_path, tiny_klein_dir, demo_images, "--teacher", "vlm", "--teacher-encoder",
                           str(klein_vlm_dir), "--loss", "velocity"))
    assert code == 0, capsys.readouterr().err
    info = read_info(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert info["teacher"] == "vlm" and info["loss"] == "velocity" and "edit_instruction" not in info


def test_vlm_condition_is_padded_like_the_caption(tiny_klein_dir, klein_vlm_dir, demo_images):
    """klein's pipeline gives the transformer every caption as max_sequence_length states, padding
    included; the vlm teacher's condition has the same layout (teacher_vlm.py tests the pad states)."""
    from lowvram_dopsd.config import load_config
    from lowvram_dopsd.data import scan
    from lowvram_dopsd.families import load_family

    cfg = load_config("cpu-demo", {"model": str(tiny_klein_dir), "images": str(demo_images), "teacher": "vlm",
                                   "teacher_encoder": str(klein_vlm_dir), "max_sequence_length": "96"})
    family, item = load_family(cfg.model), scan(cfg.images, "", "sks ball", cfg.resolution).items[0]
    (teacher,) = family.encode_teacher([item], "vlm", cfg, torch.device("cpu"))
    (student,) = family.encode_student([item.caption], cfg, torch.device("cpu"))
    assert teacher["cap"].shape == student["cap"].shape == (96, student["cap"].shape[1])
    assert family.encoder_identity("vlm", cfg)["padded_to"] == 96  # in the cache key: old features re-encode


def test_edit_teacher_on_zimage_is_a_clear_error(tmp_path, tiny_zimage_dir, tiny_vlm_dir, demo_images, capsys):
    code = main(train_args(tmp_path, tiny_zimage_dir, demo_images, "--teacher", "edit", "--teacher-encoder",
                           str(tiny_vlm_dir)))
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "Traceback" not in err
    assert "zimage" in err and "'edit'" in err and "vlm" in err  # which kinds the family does support
    assert not (tmp_path / "cache").exists()  # refused before any encoder ran
