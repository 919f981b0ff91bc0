"""Bad input: a clear one-paragraph error (exit 2) or a listed warning, never a crash, nothing lost.

Covered elsewhere: missing/empty folder, corrupt images skipped, RGBA/P/L/I;16/CMYK/EXIF (test_data.py);
unknown preset and unknown key (test_config.py, test_cli.py); disk full during a save
(test_checkpoint.py); CUDA out of memory in a step (test_resume.py).
"""
import shutil

import pytest
import PIL
from PIL import Image

from lowvram_dopsd import data
from lowvram_dopsd.cli import main
from lowvram_dopsd.config import load_config
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.families import load_family
from lowvram_dopsd.advice import oom_advice
from lowvram_dopsd.preflight import prepare_output


def img(path, size=(80, 60), mode="RGB"):
    Image.new("RGB", size, (200, 30, 30)).convert(mode).save(path)
    return path


def test_images_path_is_a_file_or_has_images_only_in_subfolders(tmp_path):
    img(tmp_path / "a.png")
    with pytest.raises(UserError, match="is a file, not a folder"):
        data.scan(str(tmp_path / "a.png"), "", "sks", 64)
    (tmp_path / "set" / "dog").mkdir(parents=True)
    img(tmp_path / "set" / "dog" / "1.jpg")
    with pytest.raises(UserError, match=r"subfolders dog/"):
        data.scan(str(tmp_path / "set"), "", "sks", 64)


def test_bad_images_stop_the_run_when_asked(tmp_path, tiny_zimage_dir, capsys):
    img(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = data.scan(str(tmp_path), "", "sks", 64)  # default: skip and list
    assert [p.name for p, _ in ds.skipped] == ["broken.jpg"] and len(ds) == 1
    code = main(["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--images", str(tmp_path),
                 "--trigger", "sks", "--output", str(tmp_path / "out"), "--set", "on_bad_image=stop"])
    err = capsys.readouterr().err
    assert code == 2 and "broken.jpg" in err and "on_bad_image" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_tiny_images_are_skipped_and_small_ones_warned(tmp_path):
    img(tmp_path / "ok.png", (256, 256))
    img(tmp_path / "small.png", (40, 50))
    img(tmp_path / "speck.png", (10, 300))
    ds = data.scan(str(tmp_path), "", "sks", 256)
    assert [it.image_path.name for it in ds.items] == ["ok.png", "small.png"]
    assert ds.skipped[0][0].name == "speck.png" and "too small" in ds.skipped[0][1]
    (path, why), = ds.warnings
    assert path.name == "small.png" and "upscaled" in why


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above this, refuses above twice this
    img(tmp_path / "big.png", (40, 40))     # 1600 px: huge but legitimate -> used, with a warning
    img(tmp_path / "bomb.png", (50, 50))    # 2500 px: over the limit -> skipped with the reason
    ds = data.scan(str(tmp_path), "", "sks", 64)
    assert [it.image_path.name for it in ds.items] == ["big.png"]
    assert "very large" in ds.warnings[0][1]
    assert ds.skipped[0][0].name == "bomb.png" and "decompression-bomb limit" in ds.skipped[0][1]


# Pillow before 13 cannot read back the uncompressed YCbCr TIFF it writes ("image file is truncated"):
# such a file is then skipped with that reason (pyproject allows Pillow 11; docs/compat.md).
OLD_PILLOW_TIFF = pytest.mark.xfail(int(PIL.__version__.split(".")[0]) < 13, raises=OSError, strict=True,
                                    reason="Pillow < 13 reads an uncompressed YCbCr TIFF as truncated")


@pytest.mark.parametrize("mode", ["LA", "I", "F", "1", pytest.param("YCbCr", marks=OLD_PILLOW_TIFF)])
def test_more_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("I", "F", "YCbCr") else "x.png")
    Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode).save(path)
    im = data.load_rgb(path)
    assert im.mode == "RGB" and im.size == (20, 10)


def test_transparency_is_flattened_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert data.load_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_caption_encodings(tmp_path, monkeypatch):
    for name in ("a", "b", "c", "d", "e"):
        img(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_bytes("une photo de sks au café".encode("cp1252"))
    (tmp_path / "b.txt").write_text("sks im Schnee, Grüße", encoding="utf-16")  # with BOM
    (tmp_path / "c.txt").write_bytes("sks at night".encode("utf-16-le"))        # no BOM: NUL bytes
    (tmp_path / "d.txt").write_text("  \n")
    (tmp_path / "e.txt").write_text("unreadable")
    real = data.read_caption_checked

    def read(path):
        if path.name == "e.txt":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(data, "read_caption_checked", read)
    ds = data.scan(str(tmp_path), "a photo", "sks", 64)
    caps = {it.image_path.name: it.caption for it in ds.items}
    assert caps["a.png"] == "une photo de sks au café" and caps["b.png"] == "sks im Schnee, Grüße"
    assert caps["c.png"] == "sks at night" and caps["d.png"] == "sks, a photo"
    notes = {p.name: why for p, why in ds.warnings}
    assert "not UTF-8" in notes["a.txt"] and "NUL" in notes["c.txt"] and "empty caption" in notes["d.txt"]
    assert ds.skipped == [(tmp_path / "e.png", "its caption e.txt cannot be read (Permission denied)")]


def test_config_values_and_list_separators():
    with pytest.raises(UserError, match="'skip', 'stop'"):
        load_config("cpu-demo", {"on_bad_image": "ignore"})
    cfg = load_config("cpu-demo", {"preview_prompts": "sks, on a beach | a watercolor of sks"})
    assert cfg.preview_prompts == ["sks, on a beach", "a watercolor of sks"]  # commas stay inside a prompt
    with pytest.raises(UserError, match="keep_checkpoints"):
        load_config("cpu-demo", {"keep_checkpoints": "-1"})


def test_model_folder_missing_a_component(tmp_path, tiny_zimage_dir):
    broken = tmp_path / "model"
    broken.mkdir()
    shutil.copy(tiny_zimage_dir / "model_index.json", broken)
    for part in ("transformer", "text_encoder", "tokenizer", "scheduler"):  # no vae/
        (broken / part).symlink_to(tiny_zimage_dir / part)
    with pytest.raises(UserError, match=r"missing vae/.*download the model again"):
        load_family(str(broken))


def _model_copy(src, dst):
    """A copy of a tiny model folder whose files can be broken one at a time."""
    shutil.copytree(src, dst)
    return dst


def test_model_folder_with_missing_or_pickled_weights(tmp_path, tiny_zimage_dir, tiny_vlm_dir):
    broken = _model_copy(tiny_zimage_dir, tmp_path / "model")
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    with pytest.raises(UserError, match=r"vae/ has no weights \(\*\.safetensors\).*download the model again"):
        load_family(str(broken))
    (broken / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")  # safetensors only: never unpickled
    with pytest.raises(UserError, match=r"vae/ has its weights only as diffusion_pytorch_model\.bin.*safetensors only"):
        load_family(str(broken))
    (broken / "vae" / "diffusion_pytorch_model.bin").unlink()
    shutil.copy(tiny_zimage_dir / "vae" / "diffusion_pytorch_model.safetensors",  # a '--include *fp16*' download
                broken / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(UserError, match=r"vae/ has its weights only under other names \(diffusion_pytorch_model\.fp16"
                                        r"\.safetensors\).*variant"):
        load_family(str(broken))
    (broken / "vae" / "diffusion_pytorch_model.fp16.safetensors").rename(weights)
    (broken / "text_encoder" / "model.safetensors").rename(broken / "text_encoder" / "model-00001-of-00002.safetensors")
    (broken / "text_encoder" / "model.safetensors.index.json").write_text(  # an interrupted sharded download
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(UserError, match=r"text_encoder/ lacks 1 of its 2 weight shards \(model-00002-of-00002"):
        load_family(str(broken))
    (broken / "text_encoder" / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "gone")  # dangling link
    with pytest.raises(UserError, match="lacks 1 of its 2"):
        load_family(str(broken))
    shutil.rmtree(broken / "text_encoder")
    (broken / "text_encoder").mkdir()
    with pytest.raises(UserError, match=r"text_encoder/ is empty"):
        load_family(str(broken))
    shutil.copytree(tiny_zimage_dir / "text_encoder", broken / "text_encoder", dirs_exist_ok=True)
    (broken / "transformer" / "config.json").unlink()
    with pytest.raises(UserError, match=r"transformer/ has no config\.json"):
        load_family(str(broken))
    assert load_family(str(tiny_zimage_dir)).name == "zimage"  # the complete folder passes

    vlm = _model_copy(tiny_vlm_dir, tmp_path / "vlm")
    (vlm / "model.safetensors").unlink()
    family = load_family(str(tiny_zimage_dir))
    with pytest.raises(UserError, match=r"teacher encoder \(Qwen3-VL\) folder .* has no weights"):
        family.vlm_dir(load_config("cpu-demo", {"teacher_encoder": str(vlm)}))


def test_output_folder_not_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="Cannot write to the output folder"):
        prepare_output(str(tmp_path / "file" / "out"))


def test_out_of_memory_advice_names_the_levers_left():
    advice = oom_advice(load_config("24gb"), "24gb")
    assert "--preset 16gb" in advice and "--quant qint8" in advice and "--resolution 768" in advice
    advice = oom_advice(load_config("16gb"), "16gb")
    assert "--quant" not in advice and "adamw8bit" not in advice and "--resolution 768" in advice
    assert "--rank 32" in advice and "--preview-every 0" in advice
    # a full fine-tune has no base to make 8-bit and no rank: only levers its settings accept
    full = load_config("full-8x24gb")
    advice = oom_advice(full, "full-8x24gb")
    assert "--preset 16gb" not in advice and "--quant" not in advice and "--rank" not in advice
    assert "teacher_ema_on=cpu" in advice and "ema_dtype=bf16" in advice and "adamw8bit" in advice
    load_config("full-8x24gb", {"teacher_ema_on": "cpu", "ema_dtype": "bf16", "optimizer": "adamw8bit"})  # accepted


def _earlier_run(out):
    """An output folder that holds a run: the checks below must stop before it is moved aside."""
    (out / "checkpoints" / "step-000005").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')


@pytest.mark.parametrize("flags, says", [
    ([], "PyTorch sees no CUDA GPU"),                                          # device auto (a GPU preset, or none)
    (["--device", "cpu", "--optimizer", "adamw8bit"], "needs a CUDA GPU"),
    (["--device", "cpu", "--kernels", "on"], "kernels = 'on'"),
])
def test_what_the_cpu_cannot_run_stops_before_anything_is_touched(tmp_path, tiny_zimage_dir, capsys, monkeypatch,
                                                                  flags, says):
    """A machine whose torch sees no GPU: a GPU run used to train on the CPU without a word (396 s a
    step on the tiny model at 1024²), and adamw8bit / kernels=on failed only after the conditions were
    encoded and the earlier run in --output had been moved to previous-runs/."""
    import torch

    import lowvram_dopsd.kernels.utils as kutils
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kutils, "is_interpret", lambda: False)  # the suite interprets Triton; a user does not
    img(tmp_path / "a.png")
    out = tmp_path / "out"
    _earlier_run(out)
    code = main(["train", "--model", str(tiny_zimage_dir), "--images", str(tmp_path), "--trigger", "sks",
                 "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-000005").is_dir() and not (out / "previous-runs").exists()
    assert not (tmp_path / "cache").exists()  # nothing encoded


def test_a_run_that_fails_at_load_leaves_the_earlier_run_in_place(tmp_path, tiny_zimage_dir, tiny_vlm_dir, capsys):
    """The earlier run in --output is moved aside only once this one has loaded: a transformer file
    that does not match its config (a wrong or corrupt download) stops the run with the folder as it was."""
    from safetensors.torch import load_file, save_file

    model = _model_copy(tiny_zimage_dir, tmp_path / "model")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file(dict(list(tensors.items())[1:]), weights)  # one tensor short
    img(tmp_path / "a.png")
    out = tmp_path / "out"
    _earlier_run(out)
    code = main(["train", "--preset", "cpu-demo", "--model", str(model), "--images", str(tmp_path),
                 "--teacher-encoder", str(tiny_vlm_dir), "--trigger", "sks", "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "has no tensor" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-000005").is_dir() and not (out / "previous-runs").exists()


def test_a_trigger_placeholder_without_a_trigger_is_refused(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of [trigger] on grass")
    with pytest.raises(UserError, match=r"a\.png.*\[trigger\] placeholder.*--trigger"):
        data.scan(str(tmp_path), "", "", 64)
    assert data.scan(str(tmp_path), "", "sks dog", 64).items[0].caption == "a photo of sks dog on grass"


def test_the_advice_for_unusable_images_works_when_followed(tmp_path):
    """A 1x1 image used to get 'Re-export them as PNG or JPEG', which changes nothing; each image's own
    reason now says what to do, and doing it makes the folder usable."""
    img(tmp_path / "dot.png", (1, 1))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError) as err:
        data.scan(str(tmp_path), "", "sks", 64)
    msg = str(err.value)
    assert "dot.png: too small (1x1)" in msg and "use a larger version of it" in msg
    assert "broken.jpg: not a readable image" in msg and "re-export it as PNG or JPEG" in msg
    img(tmp_path / "dot.png", (64, 64))  # a larger version
    img(tmp_path / "broken.jpg")         # re-exported
    assert len(data.scan(str(tmp_path), "", "sks", 64)) == 2
