"""A .toml dataset file with several folders: the sampler's repeats, the triggers in previews and prior
prompts, and a run on the tiny Z-Image model that records, resumes and refuses changes. The file's
parsing and its errors are in test_data.py."""
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowvram_dopsd.cli import main
from lowvram_dopsd.config import TrainConfig
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.families.base import Item
from lowvram_dopsd.preview import UNSEEN_SCENES, default_prompts
from lowvram_dopsd.data import BucketSampler
from lowvram_dopsd.preflight import check_prior_prompts


def items(sizes, repeats=()):
    out = [Item(Path(f"{i}.png"), "", "", w, h) for i, (w, h) in enumerate(sizes)]
    for it, n in zip(out, repeats):
        it.repeats = n
    return out


class OldBucketSampler:
    """train.BucketSampler as it was before dataset files (commit d313188), verbatim: a single folder's
    runs must draw exactly this sequence, or their checkpoints would not resume the same run."""

    def __init__(self, items, micro_batch, rng):
        self.items, self.micro_batch, self.rng = items, micro_batch, rng
        self.order = []

    def next(self):
        if not self.order:
            self.order = list(range(len(self.items)))
            self.rng.shuffle(self.order)
        first = self.order.pop()
        size = (self.items[first].width, self.items[first].height)
        same = [i for i in self.order if (self.items[i].width, self.items[i].height) == size]
        batch = [first] + same[: self.micro_batch - 1]
        for i in batch[1:]:
            self.order.remove(i)
        while len(batch) < self.micro_batch:
            batch.append(self.rng.choice([i for i, it in enumerate(self.items) if (it.width, it.height) == size]))
        return batch


SIZES = [(64, 64), (80, 48), (64, 64), (48, 80), (64, 64), (80, 48), (64, 64)]


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_a_single_folders_sampler_draws_exactly_as_before(micro_batch):
    new, old = BucketSampler(items(SIZES), micro_batch, random.Random(7)), OldBucketSampler(items(SIZES), micro_batch,
                                                                                           random.Random(7))
    assert [new.next() for _ in range(40)] == [old.next() for _ in range(40)]
    assert new.order == old.order and new.rng.getstate() == old.rng.getstate()


def test_repeats_are_how_often_an_item_is_drawn_per_epoch():
    repeats = [3, 1, 2, 1, 1, 4, 1]
    sampler = BucketSampler(items(SIZES, repeats), 1, random.Random(0))
    for _ in range(2):  # two epochs, each the sum of the repeats long
        assert Counter(sampler.next()[0] for _ in range(sum(repeats))) == dict(enumerate(repeats))
        assert sampler.order == []


def test_a_micro_batch_takes_other_images_before_a_repeated_ones_copies():
    sampler = BucketSampler(items([(64, 64)] * 3, [4, 4, 4]), 3, random.Random(1))
    batches = [sampler.next() for _ in range(4)]
    assert all(sorted(b) == [0, 1, 2] for b in batches) and sampler.order == []


def test_default_preview_prompts_show_each_trigger():
    caps = ["sks dog, on grass", "sks dog, on sand", "zxc cat, asleep", "qqq bird"]
    assert default_prompts(caps, ["sks dog"]) == default_prompts(caps, "sks dog")  # one trigger: as before
    assert default_prompts(caps, ["sks dog"])[2:] == [s.format(trigger="sks dog") for s in UNSEEN_SCENES]
    two = default_prompts(caps, ["sks dog", "zxc cat"])
    assert two == ["sks dog, on grass", "zxc cat, asleep"] + [UNSEEN_SCENES[0].format(trigger="sks dog"),
                                                                UNSEEN_SCENES[1].format(trigger="zxc cat")]
    many = default_prompts(caps, ["sks dog", "zxc cat", "qqq bird", "a", "b"])
    assert len(many) == 6 and sum("qqq bird" in p for p in many[2:]) == 1  # small: each prompt is sampled


def test_a_prior_prompt_naming_any_trigger_is_refused():
    cfg = TrainConfig(prior_prompts=["a photo of a cat", "zxc cat on a sofa"])
    check_prior_prompts(cfg, ["sks dog"])
    with pytest.raises(UserError, match="'zxc cat on a sofa' contains the trigger 'zxc cat'"):
        check_prior_prompts(cfg, ["sks dog", "zxc cat"])


# ----- a run on the tiny Z-Image model (fp32 on the CPU)

DATASET = '''
[[folders]]
path = "one"
trigger = "sks ball"
repeats = 2

[[folders]]
path = "two"
trigger = "zxc ball"
'''


@pytest.fixture(scope="module")
def run(tiny_zimage_dir, tiny_vlm_dir, demo_images, tmp_path_factory):
    """The demo's six images in two folders, both named 1.png .. 3.png (they must not collide)."""
    root = tmp_path_factory.mktemp("dataset-file")
    for n, src in enumerate(sorted(demo_images.glob("*.png"))):
        folder = root / ("one" if n < 3 else "two")
        folder.mkdir(exist_ok=True)
        shutil.copy(src, folder / f"{n % 3 + 1}.png")
        shutil.copy(src.with_suffix(".txt"), folder / f"{n % 3 + 1}.txt")
    (root / "set.toml").write_text(DATASET)

    def args(out, *extra):
        return ["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder",
                str(tiny_vlm_dir), "--images", str(root / "set.toml"), "--cache-dir", str(root / "cache"),
                "--output", str(out), "--rollout-steps", "2", "--train-states", "1", "--set", "save_every=100", *extra]
    return root, args


def test_a_run_on_a_dataset_file_records_it_and_resumes_only_the_same_one(run, tmp_path, capsys, monkeypatch):
    root, args = run
    monkeypatch.setenv("COLUMNS", "400")  # the run's summary box on one line per row
    (root / "set.toml").write_text(DATASET)
    out = tmp_path / "out"
    assert main(args(out, "--steps", "2")) == 0
    printed = capsys.readouterr().out
    assert f"6 images from 2 folders in {root / 'set.toml'} (repeats 2, 1)" in printed
    assert "one/: <stem>.txt if present" in printed and "two/: <stem>.txt if present" in printed
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["lowvram_dopsd"])["trigger"] == "sks ball, zxc ball"
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert len(state["sampler_order"]) == 2 * 3 + 3 - 4  # an epoch of 9 draws (repeats 2, 1), 4 drawn

    for changed in (DATASET.replace("repeats = 2", "repeats = 3"), DATASET.replace('"zxc ball"', '"qqq ball"')):
        (root / "set.toml").write_text(changed)
        assert main(args(out, "--steps", "3", "--resume")) == 2
        assert "the training set" in capsys.readouterr().err
    (root / "set.toml").write_text(DATASET)
    assert main(args(out, "--steps", "3", "--resume")) == 0
    assert main(args(tmp_path / "straight", "--steps", "3")) == 0  # the resumed run is the same run
    loras = [load_file(str(o / "pytorch_lora_weights.safetensors")) for o in (out, tmp_path / "straight")]
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[1])


def test_a_prior_prompt_naming_a_folders_trigger_stops_the_run(run, tmp_path, capsys):
    (run[0] / "set.toml").write_text(DATASET)
    assert main(run[1](tmp_path / "out", "--set", "prior_prompts=a ball|a photo of zxc ball")) == 2
    assert "contains the trigger 'zxc ball'" in capsys.readouterr().err


def test_a_nan_teacher_condition_names_the_image_by_its_folder(run, tmp_path, capsys, monkeypatch):
    """Both folders hold 2.png: the error must say which one (it used to print the bare file name)."""
    from lowvram_dopsd.families.zimage import ZImage

    real = ZImage.encode_teacher

    def nan_for_two(self, items, teacher, cfg, device):
        conds = real(self, items, teacher, cfg, device)
        for item, cond in zip(items, conds):
            if item.image_path.parent.name == "two" and item.image_path.name == "2.png":
                cond["cap"] = cond["cap"].clone()  # an inference tensor
                cond["cap"][0, 0] = float("nan")
        return conds
    monkeypatch.setattr(ZImage, "encode_teacher", nan_for_two)
    (run[0] / "set.toml").write_text(DATASET)
    assert main(run[1](tmp_path / "out", "--cache-dir", str(tmp_path / "cache"))) == 2
    assert "non-finite values (NaN or inf, in cap) for two/2.png" in capsys.readouterr().err
