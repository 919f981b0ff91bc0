"""Every command given every kind of wrong file: exit 2, one paragraph naming the file, no traceback.

The kinds: not safetensors, garbage, empty, cut short, another model's LoRA, a transformer checkpoint,
other trainers' LoRAs (for another model; for this one), a folder without the expected files. Where a
file is in fact usable (a klein LoRA sampled on its own klein base) the command must work instead.
"""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowvram_dopsd.cli import main
from trust_helpers import random_lora


@pytest.fixture(scope="module")
def wrong(tmp_path_factory, tiny_zimage_dir, tiny_klein_dir):
    """One file (or folder) of each kind, and a LoRA of ours for the tiny Z-Image."""
    root = tmp_path_factory.mktemp("wrong")
    ours = random_lora(tiny_zimage_dir, root / "ours")[-1]
    klein = random_lora(tiny_klein_dir, root / "klein")[-1]
    raw = ours.read_bytes()
    (root / "text.bin").write_bytes(b"not a LoRA")
    (root / "garbage.safetensors").write_text("this is not a safetensors file")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    shutil.copy(klein, root / "klein-lora.safetensors")
    shutil.copy(tiny_zimage_dir / "transformer" / "diffusion_pytorch_model.safetensors", root / "transformer.safetensors")
    save_file(load_file(str(ours)), str(root / "peft-no-metadata.safetensors"))  # another trainer's, this model
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),  # ... for SDXL
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)},
              str(root / "kohya-sdxl.safetensors"))
    (root / "empty folder").mkdir()
    (root / "bad.toml").write_bytes(b"\xff\xfe\x00 not text")
    (root / "empty.toml").write_text("")
    (root / "plain.toml").write_text("folders = 3\n")
    return root


KINDS = ["text.bin", "garbage.safetensors", "empty.safetensors", "cut.safetensors", "klein-lora.safetensors",
         "transformer.safetensors", "peft-no-metadata.safetensors", "kohya-sdxl.safetensors", "empty folder"]
UNREADABLE = "is not a readable safetensors file"
# what each command says of each kind (0: the file is fine there and the command works; None: fine there, and
# tested elsewhere: test_single_file.py)
SAYS = {
    "init-lora": {"text.bin": "is not a .safetensors file", "garbage.safetensors": UNREADABLE,
                  "empty.safetensors": UNREADABLE, "cut.safetensors": UNREADABLE,
                  "klein-lora.safetensors": "is a LoRA of a klein model", "transformer.safetensors": "is not a LoRA",
                  "peft-no-metadata.safetensors": "not written by lowvram-dopsd",
                  "kohya-sdxl.safetensors": "not written by lowvram-dopsd", "empty folder": "holds no LoRA"},
    "sample": {"text.bin": "is not a .safetensors file", "garbage.safetensors": UNREADABLE,
               "empty.safetensors": UNREADABLE, "cut.safetensors": UNREADABLE, "klein-lora.safetensors": 0,
               "transformer.safetensors": "is not a LoRA", "peft-no-metadata.safetensors": "Pass --model",
               "kohya-sdxl.safetensors": "Pass --model", "empty folder": "holds no LoRA"},
    "sample --model": {"text.bin": "is not a .safetensors file", "garbage.safetensors": UNREADABLE,
                       "empty.safetensors": UNREADABLE, "cut.safetensors": UNREADABLE,
                       "klein-lora.safetensors": "was trained on a klein model", "transformer.safetensors":
                       "is not a LoRA", "peft-no-metadata.safetensors": 0,
                       "kohya-sdxl.safetensors": "diffusers could not load the LoRA", "empty folder": "holds no LoRA"},
    "export": {"text.bin": "is not a .safetensors file", "garbage.safetensors": UNREADABLE,
               "empty.safetensors": UNREADABLE, "cut.safetensors": UNREADABLE, "klein-lora.safetensors": 0,
               "transformer.safetensors": "is not a LoRA", "peft-no-metadata.safetensors": "not written by lowvram-dopsd",
               "kohya-sdxl.safetensors": "not written by lowvram-dopsd", "empty folder": "holds no LoRA"},
    "--transformer-file": {"text.bin": "is not a .safetensors file", "garbage.safetensors": UNREADABLE,
                           "empty.safetensors": UNREADABLE, "cut.safetensors": UNREADABLE,
                           "klein-lora.safetensors": "is a LoRA, not a transformer", "transformer.safetensors": None,
                           "peft-no-metadata.safetensors": "is a LoRA, not a transformer",
                           "kohya-sdxl.safetensors": "is a LoRA, not a transformer", "empty folder": "(it is a folder)"},
}


def command(kind: str, path, root, tiny_zimage_dir, tiny_vlm_dir, demo_images) -> list[str]:
    train = ["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder", str(tiny_vlm_dir),
             "--images", str(demo_images), "--trigger", "sks", "--output", str(root / "out"),
             "--cache-dir", str(root / "cache"), "--steps", "1"]
    sample = ["sample", "--lora", str(path), "--prompt", "sks", "--steps", "1", "--width", "32", "--height", "32",
              "--output", str(root / "images") + "/"]
    return {"init-lora": [*train, "--init-lora", str(path), "--rank", "4", "--alpha", "8"],
            "sample": sample,
            "sample --model": [*sample, "--model", str(tiny_zimage_dir)],
            "export": ["export", str(path), "--format", "comfyui", "--output", str(root / "export.safetensors")],
            "--transformer-file": [*train, "--transformer-file", str(path)]}[kind]


def assert_one_paragraph(err: str, says: str, path) -> None:
    """stderr ends with the error, one line that names the file as typed (progress bars may come before)."""
    assert "Traceback" not in err, err
    message = err[err.index("error: "):]
    assert message.count("\n") == 1 and message.endswith("\n"), message
    assert says in message and str(path) in message, message


@pytest.mark.parametrize("cmd", list(SAYS))
def test_every_command_given_every_wrong_file(cmd, wrong, tiny_zimage_dir, tiny_vlm_dir, demo_images, capsys):
    for kind in KINDS:
        says, path = SAYS[cmd][kind], wrong / kind
        if says is None:
            continue
        code = main(command(cmd, path, wrong, tiny_zimage_dir, tiny_vlm_dir, demo_images))
        err = capsys.readouterr().err
        if says == 0:
            assert code == 0, (kind, err)
            continue
        assert code == 2, (cmd, kind, err)
        assert_one_paragraph(err, says, path)


@pytest.mark.parametrize("name, says", [("bad.toml", "Check that it is a UTF-8 text file"),
                                        ("empty.toml", "lists no folders"),
                                        ("plain.toml", "has 'folders' as a plain value"),
                                        ("transformer.safetensors", "is a file, not a folder")])
def test_a_wrong_dataset_file(name, says, wrong, tiny_zimage_dir, capsys):
    code = main(["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--images", str(wrong / name),
                 "--trigger", "sks", "--output", str(wrong / "out")])
    assert code == 2
    assert_one_paragraph(capsys.readouterr().err, says, wrong / name)


@pytest.mark.parametrize("flag, name, says", [
    ("--preset", "bad.toml", "a preset is a UTF-8 TOML text file"),
    ("--model", "transformer.safetensors", "goes to --transformer-file"),
    ("--teacher-encoder", "transformer.safetensors", "is a file"),
    ("--resume", "ours", "not a checkpoint folder"),
])
def test_other_flags_given_a_wrong_file(flag, name, says, wrong, tiny_zimage_dir, tiny_vlm_dir, demo_images, capsys):
    value = str(wrong / name)
    assert main(["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder",
                 str(tiny_vlm_dir), "--images", str(demo_images), "--trigger", "sks", "--output", str(wrong / "out"),
                 "--cache-dir", str(wrong / "cache"), flag, value]) == 2  # the last --model, --preset is used
    assert_one_paragraph(capsys.readouterr().err, says, value)
