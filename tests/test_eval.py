"""`lowvram-dopsd eval`: the images are `sample`'s, the sheet and eval.json say what they should, and LoRAs that
do not belong to the base are refused before anything loads. Tiny Z-Image, tiny DINOv3 and CLIP (conftest)."""
import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchmetrics.functional.multimodal.clip_iqa import clip_image_quality_assessment
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from transformers import CLIPProcessor
from test_metrics import TensorFeatures
from trust_helpers import random_lora

from lowvram_dopsd import eval as ev
from lowvram_dopsd import metrics
from lowvram_dopsd.cli import main
from lowvram_dopsd.output import LORA_FILE

TRIGGER = "sks ball"


def step_lora(src, dest, step: int, **info):
    """`src` saved as a step LoRA of step `step` (metadata `steps`, as train writes out/loras/step-N)."""
    with safe_open(str(src), framework="pt") as fh:
        meta = fh.metadata()
    meta["lowvram_dopsd"] = json.dumps({**json.loads(meta["lowvram_dopsd"]), "steps": step, **info})
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(src)), str(dest), metadata=meta)
    return dest


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_zimage_dir):
    root = tmp_path_factory.mktemp("eval-loras")
    random_lora(tiny_zimage_dir, root / "a", seed=1)
    random_lora(tiny_zimage_dir, root / "b", seed=2, std=0.6)
    return [step_lora(root / "a" / LORA_FILE, root / "run" / "loras" / "step-000100.safetensors", 100),
            step_lora(root / "b" / LORA_FILE, root / "run" / "loras" / "step-000200.safetensors", 200)]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-prompts")
    (root / "unseen.txt").write_text("# new scenes\n[trigger] on the moon\n\na watercolor of sks ball\n")
    (root / "prior.txt").write_text("a lighthouse at night\na red apple\n")
    return root


def eval_args(loras, demo_images, tiny_dino_dir, tiny_clip_dir, prompt_files, out):
    return ["eval", *[a for lora in loras for a in ("--lora", str(lora))], "--images", str(demo_images),
            "--trigger", TRIGGER, "--subject", "ball", "--captions", "2", "--output", str(out),
            "--prompts", str(prompt_files / "unseen.txt"), "--prior-prompts", str(prompt_files / "prior.txt"),
            "--dino-model", str(tiny_dino_dir), "--clip-model", str(tiny_clip_dir), "--seed", "3"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, loras, demo_images, tiny_dino_dir, tiny_clip_dir, prompt_files):
    """One eval of two step LoRAs, watched: at each metric model's load, is the pipeline still alive, and is the
    model before it released?"""
    out = tmp_path_factory.mktemp("eval") / "eval"
    pipe, loaded, seen = [], [], []
    opened, load = ev.StockPipeline.open, metrics.load

    def watch_open(*args, **kwargs):
        stock = opened(*args, **kwargs)
        pipe.append(weakref.ref(stock.pipe))
        return stock

    def watch_load(*args, **kwargs):
        gc.collect()
        seen.append((pipe[0]() is None, [next(m.parameters()).is_meta for m in loaded]))
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev.StockPipeline, "open", watch_open)
        mp.setattr(metrics, "load", watch_load)
        assert main(eval_args(loras, demo_images, tiny_dino_dir, tiny_clip_dir, prompt_files, out)) == 0
    return out, json.loads((out / "eval.json").read_text()), seen


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_metric_models_load_after_sampling_one_at_a_time(evaluated):
    """DINO, then CLIP: each after the pipeline was freed, CLIP after DINO's weights were released."""
    _, _, seen = evaluated
    assert seen == [(True, []), (True, [True])]


def test_the_images_are_samples_images(evaluated, loras, tiny_zimage_dir, tmp_path):
    """Each LoRA's image is what `sample --lora L --prompt P --seed S` writes, pixel for pixel; the base's is the
    stock pipeline's with no LoRA at all."""
    out, result, _ = evaluated
    row = result["rows"][2]
    shot = result["prompt_sets"]["unseen"][1]
    assert main(["sample", "--lora", str(loras[1]), "--prompt", shot["prompt"], "--seed", str(shot["seed"]),
                 "--output", str(tmp_path / "s.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "s.png"), pixels(out / row["images"]["unseen"][1]["path"]))

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(tiny_zimage_dir, dtype=torch.float32)
    shot = result["prompt_sets"]["prior"][0]
    image = pipe(shot["prompt"], num_inference_steps=8, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(shot["seed"]), guidance_scale=0.0).images[0]
    assert np.array_equal(np.asarray(image), pixels(out / result["rows"][0]["images"]["prior"][0]["path"]))
    # the LoRA acts: its image of the same prompt and seed is not the base's
    assert not np.array_equal(pixels(out / result["rows"][1]["images"]["prior"][0]["path"]), np.asarray(image))


def test_eval_json_schema(evaluated, demo_images):
    out, result, _ = evaluated
    assert result["schema"] == ev.SCHEMA and result["family"] == "zimage"
    assert result["sampling"] == {"steps": 8, "width": 64, "height": 64, "seed": 3, "lora_scale": 1.0,
                                  "device": "cpu", "dtype": "fp32"}
    assert result["triggers"] == [TRIGGER] and result["subject"] == "ball"
    assert set(result["metrics"]) == set(ev.METRICS) == {"concept", "clip_s", "prior", "quality"}
    sets = result["prompt_sets"]
    # the [trigger] placeholder replaced; a prompt that names the trigger kept as it is
    assert [p["prompt"] for p in sets["unseen"]] == ["sks ball on the moon", "a watercolor of sks ball"]
    assert [p["clip_text"] for p in sets["unseen"]] == ["ball on the moon", "a watercolor of ball"]
    assert [p["prompt"] for p in sets["prior"]] == ["a lighthouse at night", "a red apple"]
    assert [p["seed"] for s in sets.values() for p in s] == [3, 4] * 3  # seed + column, in every set
    for p in sets["captions"]:  # training captions (the caption rule applied), each with its own image
        reference = ev.Path(p["reference"])
        caption = ev.data.apply_trigger(reference.with_suffix(".txt").read_text().strip(), TRIGGER)
        assert reference.parent == demo_images and p["prompt"] == caption and TRIGGER in caption
    assert [r["label"] for r in result["rows"]] == ["base", "step-000100", "step-000200"]
    assert [r["step"] for r in result["rows"]] == [None, 100, 200]
    assert result["rows"][0]["lora"] is None
    per_set = {"captions": {"path", "concept", "quality", "iqa_quality", "iqa_sharpness", "iqa_noisiness"},
               "unseen": {"path", "clip_s", "quality", "iqa_quality", "iqa_sharpness", "iqa_noisiness"},
               "prior": {"path", "prior", "quality", "iqa_quality", "iqa_sharpness", "iqa_noisiness"}}
    for row in result["rows"]:
        assert set(row["metrics"]) == set(ev.METRICS) and all(isinstance(v, float) for v in row["metrics"].values())
        for name, images in row["images"].items():
            assert len(images) == 2 and all(set(i) == per_set[name] for i in images)
            assert all((out / i["path"]).is_file() for i in images)
        assert row["metrics"]["concept"] == pytest.approx(np.mean([i["concept"] for i in row["images"]["captions"]]))
        assert row["metrics"]["quality"] == pytest.approx(np.mean([i["quality"] for s in row["images"].values()
                                                                   for i in s]))
    assert result["rows"][0]["metrics"]["prior"] == pytest.approx(0.0, abs=1e-6)  # the base against itself
    assert result["rows"][1]["metrics"]["prior"] > 1e-4
    for name in ("dino", "clip"):
        run = result["metric_models"][name]
        assert run["device"] == "cpu" and run["dtype"] == "float32" and run["peak_bytes"] is None
        assert run["planned_bytes"] > ev.Path(run["folder"], "model.safetensors").stat().st_size
    assert result["files"] == {"sheet": "sheet.png", "steps_plot": "steps.png"}


def test_the_clip_numbers_are_torchmetrics(evaluated, tiny_clip_dir):
    """eval.json's CLIP-S and CLIP-IQA of the saved images, recomputed by torchmetrics with the same model."""
    out, result, _ = evaluated
    model, processor = TensorFeatures.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    texts = [p["clip_text"] for p in result["prompt_sets"]["unseen"]]
    for row in result["rows"]:
        shots = row["images"]["unseen"]
        tensors = [torch.from_numpy(pixels(out / s["path"]).copy()).permute(2, 0, 1) for s in shots]
        with torch.no_grad():
            score, _ = _clip_score_update(tensors, texts, model, processor)
            iqa = clip_image_quality_assessment(torch.stack(tensors).float(), data_range=1.0,
                                                model_name_or_path=lambda: (model, processor),
                                                prompts=tuple(metrics.IQA_PAIRS))
        assert [s["clip_s"] for s in shots] == pytest.approx((score / 100).tolist(), abs=1e-5)
        for name in metrics.IQA_PAIRS:
            assert [s[f"iqa_{name}"] for s in shots] == pytest.approx(iqa[name].tolist(), rel=1e-3, abs=0)


def test_the_sheet_layout(evaluated, demo_images):
    """Rows: the base and each LoRA (the training images above the caption columns); columns: every prompt of the
    three sets with its seed; each cell holds that row's image of that column."""
    out, result, _ = evaluated
    sheet = Image.open(out / "sheet.png")
    layout = json.loads(sheet.text["layout"])
    assert layout["rows"] == ["base", "step-000100", "step-000200"] and layout["reference_row"] is True
    sets = result["prompt_sets"]
    assert layout["columns"] == [{"set": name, "prompt": p["prompt"], "seed": p["seed"]}
                                 for name in ("captions", "unseen", "prior") for p in sets[name]]
    grid = np.asarray(sheet.convert("RGB"))
    assert [len(cells) for cells in layout["cells"]] == [6, 6, 6]
    for k, row in enumerate(result["rows"]):
        shots = [shot for name in ("captions", "unseen", "prior") for shot in row["images"][name]]
        for (x, y, w, h), shot in zip(layout["cells"][k], shots):
            assert np.array_equal(grid[y:y + h, x:x + w], pixels(out / shot["path"]))  # 64 px: not resized
    # the training image of a caption column sits above the base's cell
    x, y, w, h = layout["cells"][0][0]
    reference = Image.open(sets["captions"][0]["reference"]).convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    assert np.array_equal(grid[y - h - 6:y - 6, x:x + w], np.asarray(reference))
    # labels are drawn: the strip left of each row and the table right of the grid are not blank
    for k in range(3):
        x, y, w, h = layout["cells"][k][0]
        assert (grid[y:y + h, :x] < 200).any()
        x, y, w, h = layout["cells"][k][-1]
        assert (grid[y:y + h, x + w + 8:] < 200).any()


def test_the_steps_plot(evaluated):
    out, result, _ = evaluated
    series = json.loads(Image.open(out / "steps.png").text["series"])
    assert set(series) == set(ev.METRICS)
    for name, s in series.items():
        assert s["steps"] == [100, 200]
        assert s["values"] == [result["rows"][1]["metrics"][name], result["rows"][2]["metrics"][name]]
        assert s["base"] == result["rows"][0]["metrics"][name]


def test_the_terminal_table(evaluated):
    out, result, _ = evaluated
    from rich.console import Console

    from lowvram_dopsd.report import print_table
    console = Console(width=160, record=True)
    print_table(console, result)
    text = console.export_text()
    for row in result["rows"]:
        assert row["label"] in text and f"{row['metrics']['quality']:.3f}" in text


@pytest.fixture
def nothing_loads(monkeypatch):
    """A refusal must come before the pipeline and before any metric model is looked up."""
    from diffusers import DiffusionPipeline

    def fail(*args, **kwargs):
        raise AssertionError("loaded before the bad input was refused")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", fail)
    monkeypatch.setattr(metrics, "locate", fail)


def test_a_lora_of_another_family_is_refused(loras, tiny_klein_dir, demo_images, tmp_path, capsys, nothing_loads):
    assert main(["eval", "--lora", str(loras[0]), "--images", str(demo_images), "--trigger", TRIGGER,
                 "--model", str(tiny_klein_dir), "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "trained on a zimage model" in err and "is a klein model" in err
    assert not (tmp_path / "e").exists()


def test_a_lora_of_another_base_is_refused(loras, tiny_zimage_dir, demo_images, tmp_path, capsys, nothing_loads):
    """Same family, another checkpoint (its transformer config differs): refused, the paths shown as typed."""
    other = tmp_path / "other [v2] zimage"
    shutil.copytree(tiny_zimage_dir, other)
    config = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**config, "rope_theta": 512}))
    lora = step_lora(loras[0], tmp_path / "[bold]mine.safetensors", 100, base_model=str(other))
    assert main(["eval", "--lora", str(loras[0]), "--lora", str(lora), "--images", str(demo_images),
                 "--trigger", TRIGGER, "--output", str(tmp_path / "e")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"'{lora}' was trained on {other}, which is not the base model of this evaluation ({tiny_zimage_dir})" \
        in err.replace("\n", "")
    assert not (tmp_path / "e").exists()
    # the same base under another name (a copy of the folder) is accepted: compared by config and weights
    assert ev.same_base(str(tiny_zimage_dir), "", str(shutil.copytree(tiny_zimage_dir, tmp_path / "copy")), "")


def test_prior_prompts_must_not_name_the_trigger(loras, demo_images, tmp_path, capsys, nothing_loads):
    (tmp_path / "prior.txt").write_text("a red apple\nsks ball in Bob's box at C:\\toys\n")
    assert main(["eval", "--lora", str(loras[0]), "--images", str(demo_images), "--trigger", TRIGGER,
                 "--prior-prompts", str(tmp_path / "prior.txt"), "--output", str(tmp_path / "e")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "names the trigger 'sks ball'" in err
    assert "The prior prompt 'sks ball in Bob's box at C:\\toys'" in err  # as typed: one backslash, no escape


def test_spread_and_clip_text():
    assert ev.spread(3, 6) == [0, 1, 2] and ev.spread(10, 3) == [0, 4, 9] and ev.spread(5, 1) == [0]
    assert ev.clip_text("sks ball, sks balls on sks ball", ["sks ball"], "ball") == "ball, sks balls on ball"
    assert ev.clip_text("sks ball", ["sks ball"], "") == "sks ball"  # no --subject: as typed
    assert ev.metric_device(2.0, torch.device("cuda"), 1.0) == torch.device("cpu")
    assert ev.metric_device(0.5, torch.device("cuda"), 1.0) == torch.device("cuda")
    assert ev.lora_step(ev.Path("out/checkpoints/step-000300/pytorch_lora_weights.safetensors"), {}) == 300
    assert ev.lora_step(ev.Path("x.safetensors"), {"steps": 7}) == 7


def test_a_toy_lora_is_refused_by_eval_itself_before_the_metric_models(tmp_path, capsys, nothing_loads):
    """The toy family's pipeline is not diffusers': eval says so in its own name, before looking for DINO/CLIP
    (which a user would otherwise download, gated, for nothing)."""
    from importlib import resources

    toy = Path(str(resources.files("lowvram_dopsd") / "assets" / "toy"))
    random_lora(toy / "model", tmp_path / "toy-lora")
    assert main(["eval", "--lora", str(tmp_path / "toy-lora"), "--images", str(toy / "concept"),
                 "--output", str(tmp_path / "e")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: `eval` runs the stock diffusers pipeline, and ToyDiTPipeline"), err
    assert "docs/toy.md" in err
    assert not (tmp_path / "e").exists()
