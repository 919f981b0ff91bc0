import hashlib

import pytest
from PIL import Image

from lowvram_dopsd.data import apply_trigger, bucket_size, load_rgb, scan
from lowvram_dopsd.errors import UserError


def _img(path, size=(80, 60), mode="RGB", color=(200, 30, 30)):
    Image.new(mode, size, color if mode in ("RGB", "RGBA") else 0).save(path)
    return path


def test_caption_rule_txt_then_caption_then_trigger(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of [trigger] on grass\n")
    _img(tmp_path / "b.jpg")
    _img(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("   ")  # empty caption falls through to --caption
    ds = scan(str(tmp_path), caption="a photo", trigger="sks dog", resolution=64)
    caps = {it.image_path.name: it.caption for it in ds.items}
    assert caps == {"a.png": "a photo of sks dog on grass", "b.jpg": "sks dog, a photo", "c.webp": "sks dog, a photo"}
    assert "trigger 'sks dog'" in ds.caption_rule


def test_trigger_alone_when_no_caption_anywhere(tmp_path):
    _img(tmp_path / "a.png")
    assert scan(str(tmp_path), "", "sks", 64).items[0].caption == "sks"


def test_no_caption_at_all_is_a_clear_error(tmp_path):
    _img(tmp_path / "a.png")
    with pytest.raises(UserError, match="--trigger"):
        scan(str(tmp_path), "", "", 64)


def test_trigger_not_duplicated():
    assert apply_trigger("sks dog in snow", "sks") == "sks dog in snow"
    assert apply_trigger("asks nothing", "sks") == "sks, asks nothing"


@pytest.mark.parametrize("make", ["missing", "empty", "only_text"])
def test_missing_or_empty_folder(tmp_path, make):
    folder = tmp_path / "imgs"
    if make != "missing":
        folder.mkdir()
    if make == "only_text":
        (folder / "notes.txt").write_text("hi")
    with pytest.raises(UserError):
        scan(str(folder), "", "sks", 64)


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    _img(tmp_path / "good.png")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\x00" * 100)
    ds = scan(str(tmp_path), "", "sks", 64)
    assert [it.image_path.name for it in ds.items] == ["good.png"]
    assert sorted(p.name for p, _ in ds.skipped) == ["garbage.jpg", "truncated.png"]
    assert ds.items[0].image_sha256 == hashlib.sha256(good).hexdigest()


def test_formats_not_read_are_listed_not_passed_over(tmp_path):
    _img(tmp_path / "good.png")
    Image.new("P", (80, 60)).save(tmp_path / "dog.gif")
    (tmp_path / "phone.HEIC").write_bytes(b"\x00" * 100)
    ds = scan(str(tmp_path), "", "sks", 64)
    assert [it.image_path.name for it in ds.items] == ["good.png"]
    why = dict((p.name, w) for p, w in ds.skipped)
    assert "256 colours" in why["dog.gif"] and "convert it to PNG" in why["phone.HEIC"]
    with pytest.raises(UserError, match=r"2 of the 3 images .* on_bad_image = 'stop'"):
        scan(str(tmp_path), "", "sks", 64, on_bad_image="stop")
    (tmp_path / "good.png").unlink()
    with pytest.raises(UserError, match=r"No images .* dog\.gif, phone\.HEIC are in a format this tool does not read"):
        scan(str(tmp_path), "", "sks", 64)


def test_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="could be read"):
        scan(str(tmp_path), "", "sks", 64)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "CMYK"])
def test_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode).save(path)
    im = load_rgb(path)
    assert im.mode == "RGB" and im.size == (20, 10)


def test_exif_rotation_applied(tmp_path):
    im = Image.new("RGB", (40, 20))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_buckets_keep_area_and_aspect():
    assert bucket_size(1000, 1000, 1024) == (1024, 1024)
    w, h = bucket_size(1600, 900, 1024)
    assert w % 64 == 0 and h % 64 == 0 and w > h
    assert abs(w * h / 1024**2 - 1) < 0.1
    assert bucket_size(10, 4000, 64)[1] <= 4 * bucket_size(10, 4000, 64)[0]  # clamp to 4:1
