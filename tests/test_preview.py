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
    layout = previewer.layout
    assert grid.width == layout.margin + 2 * layout.tile_w and grid.height == layout.box(2, 0)[1]  # 2 rows
    assert grid.text["step"] == "12" and grid.text["seeds"] == "10,11" and grid.text["steps"] == "8"
    assert grid.text["prompts"].splitlines() == prompts
    assert grid.text["rows"].splitlines() == ["LoRA at step 12", "EMA teacher, reading your image"]
    white = ((255, 255),) * 3
    assert grid.crop(layout.box(1, 0)).getextrema() != white  # the teacher's sample of prompt 0
    assert grid.crop(layout.box(1, 1)).getextrema() == white  # prompt 1 is no training caption
    assert grid.crop(layout.box(0, 1)).getextrema() != white  # the student's sample of prompt 1


def test_the_last_grid_reads_at_a_glance(tmp_path, tiny_zimage_dir, demo_images):
    """Your images on top with a legend (what the trigger should draw), the base model beside the last step,
    small samples enlarged: 64 px cells become MIN_TILE wide, each pixel a block (nearest neighbour)."""
    from lowvram_dopsd.data import load_rgb
    from lowvram_dopsd.preview import MIN_TILE, few_step_sample

    cfg, family, model, lora, _ = random_lora(tiny_zimage_dir, tmp_path / "lora")
    prompts = ["sks ball on grass", "a [bold] photo of [trigger] with a caption far too long to fit on three lines "
               "under a tile of this width, so its end is cut"]
    conds = family.encode_student(prompts, cfg, CPU)
    images = [load_rgb(p) for p in sorted(demo_images.glob("*.png"))[:2]]
    previewer = Previewer(family, model, lora, tmp_path, prompts, conds, [None, None], 64, 64, seed=3, device=CPU,
                          references=images, triggers=["sks ball"], last_step=20)
    grid = Image.open(previewer.write(20))
    layout = previewer.layout
    assert grid.text["rows"].splitlines() == ["your images", "base model (no LoRA)", "LoRA at step 20"]
    assert layout.tile_w == MIN_TILE and layout.tile_w % 64 == 0
    base = few_step_sample(family, model, lora, None, previewer.noise(0),
                           family.sigmas(64, 64, family.default_rollout_steps), [conds[0]])
    expected = family.decode_latents(base)[0].resize((layout.tile_w, layout.tile_h), Image.NEAREST)
    assert grid.crop(layout.box(0, 0)).tobytes() == expected.tobytes()  # the base model, from prompt 0's noise
    # a 64 px training image in its tile, pixel for pixel
    assert grid.crop(layout.box(-1, 1)).tobytes() == images[1].resize((MIN_TILE, MIN_TILE), Image.NEAREST).tobytes()
    assert Image.open(previewer.write(10)).text["rows"].splitlines()[1] == "LoRA at step 10"  # no base row before
