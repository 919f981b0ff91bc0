"""Preview grids: default prompts, the grid file, the teacher row."""
from PIL import Image
from trust_helpers import CPU, random_lora

from lowvram_dopsd.preview import Previewer, default_prompts


def test_default_prompts_are_training_captions_plus_new_scenes():
    caps = ["sks, a ball on grass", "sks, a ball on grass", "sks, a ball on sand", "sks, a ball in snow"]
    prompts = default_prompts(caps, "sks")
    assert prompts[:2] == ["sks, a ball on grass", "sks, a ball on sand"]
    assert len(prompts) == 4 and all("sks" in p for p in prompts[2:]) and not set(prompts[2:]) & set(caps)
    assert default_prompts(caps, "") == prompts[:2]  # no trigger: no subject to put in a new scene


def test_grid_has_student_and_teacher_rows_and_its_step(tmp_path, tiny_zimage_dir):
    cfg, family, model, lora, _ = random_lora(tiny_zimage_dir, tmp_path / "lora")
    prompts = ["sks ball on grass", "sks ball on the moon"]
    conds = family.encode_student(prompts, cfg, CPU)
    previewer = Previewer(family, model, lora, tmp_path, prompts, conds, [conds[0], None], 64, 64, seed=10,
                          device=CPU)
    path = previewer.write(12)
    assert path == tmp_path / "previews" / "step-000012.png"
    grid = Image.open(path)
    assert grid.width == 2 * 64 and grid.height > 2 * 64  # 2 columns, student row + teacher row + labels
    assert grid.text["step"] == "12" and grid.text["seeds"] == "10,11" and grid.text["steps"] == "8"
    assert grid.text["prompts"].splitlines() == prompts
    row2 = grid.height - 28 - 64  # above the two label lines (font 10 px at 64 px cells)
    white = ((255, 255),) * 3
    assert grid.crop((0, row2, 64, row2 + 64)).getextrema() != white     # the teacher's sample of prompt 0
    assert grid.crop((64, row2, 128, row2 + 64)).getextrema() == white   # prompt 1 is no training caption
    assert grid.crop((64, row2 - 64, 128, row2)).getextrema() != white   # the student's sample of prompt 1
