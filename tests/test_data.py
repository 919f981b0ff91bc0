import hashlib

import numpy as np
import pytest
from PIL import Image

from lowvram_dopsd.data import apply_trigger, bucket_size, load, load_rgb, scan
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


def test_a_folder_captioned_throughout_states_its_rule_without_a_fallback(tmp_path):
    """No --caption and no --trigger: every image has a .txt (else load refuses), so the rule the run prints
    is the .txt alone, not an "else ... an error" that reads like a problem."""
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red cube\n")
    assert scan(str(tmp_path), "", "", 64).caption_rule == "<stem>.txt"


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


# ----- a .toml dataset file: several folders, each with its own trigger, caption and repeats

def _folders(tmp_path, text):
    """dog/1.jpg, dog/2.jpg (2.txt has a [trigger] caption), cat/1.jpg (the same bytes as dog's), and the file."""
    for folder in ("dog", "cat"):
        (tmp_path / folder).mkdir(exist_ok=True)
    _img(tmp_path / "dog" / "1.jpg")
    _img(tmp_path / "dog" / "2.jpg", color=(10, 200, 10))
    (tmp_path / "dog" / "2.txt").write_text("a photo of [trigger] running")
    _img(tmp_path / "cat" / "1.jpg")
    (tmp_path / "set.toml").write_text(text)
    return str(tmp_path / "set.toml")


TWO = '''
[[folders]]
path = "dog"
trigger = "sks dog"
caption = "a photo of [trigger]"
repeats = 2

[[folders]]
path = "cat/"
trigger = "zxc cat"
'''


def test_dataset_file_gives_each_folder_its_trigger_caption_and_repeats(tmp_path):
    ds = load(_folders(tmp_path, TWO), caption="a picture", trigger="sks", resolution=64)
    caps = {ds.name(it.image_path): (it.caption, it.repeats) for it in ds.items}
    assert caps == {"dog/1.jpg": ("a photo of sks dog", 2), "dog/2.jpg": ("a photo of sks dog running", 2),
                    "cat/1.jpg": ("zxc cat, a picture", 1)}  # cat: the run's --caption, its own trigger
    assert ds.triggers == ["sks dog", "zxc cat"]
    assert ds.source == f"2 folders in {tmp_path / 'set.toml'} (repeats 2, 1)"
    assert ds.caption_rule.startswith("dog/: <stem>.txt if present; else 'a photo of [trigger]'")
    assert " | cat/: <stem>.txt if present; else 'a picture'; trigger 'zxc cat'" in ds.caption_rule
    # dog/1.jpg and cat/1.jpg are the same file name (and bytes): named apart, the repeats recorded
    assert [row[0] for row in ds.identity()] == ["dog/1.jpg", "dog/2.jpg", "cat/1.jpg"]
    assert [row[5:] for row in ds.identity()] == [[2], [2], []]


def test_dataset_file_defaults_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "sets").mkdir()
    _folders(tmp_path, "")
    toml = tmp_path / "sets" / "set.toml"
    toml.write_text('[[folders]]\npath = "../dog"\n[[folders]]\npath = "~/cat"\ntrigger = ""\ncaption = "a cat"\n')
    ds = load(str(toml), caption="", trigger="sks", resolution=64)
    assert [(ds.name(it.image_path), it.caption, it.repeats) for it in ds.items] == [
        ("../dog/1.jpg", "sks", 1), ("../dog/2.jpg", "a photo of sks running", 1),
        ("../cat/1.jpg", "a cat", 1)]  # trigger = "" turns the run's trigger off for that folder
    assert ds.triggers == ["sks"] and ds.source == f"2 folders in {toml}"


def test_a_folder_loads_exactly_as_before(tmp_path):
    """--images DIR: the same items and identity as ever, so existing checkpoints still resume."""
    _img(tmp_path / "b.png")
    _img(tmp_path / "a.jpg", size=(60, 80))
    (tmp_path / "a.txt").write_text("a photo")
    ds = load(str(tmp_path), "", "sks", 64)
    sha = {p: hashlib.sha256((tmp_path / p).read_bytes()).hexdigest() for p in ("a.jpg", "b.png")}
    assert ds.identity() == [["a.jpg", sha["a.jpg"], "sks, a photo", 48, 80], ["b.png", sha["b.png"], "sks", 80, 48]]
    assert ds.identity() == scan(str(tmp_path), "", "sks", 64).identity()
    assert ds.triggers == ["sks"] and ds.source == str(tmp_path) and [it.repeats for it in ds.items] == [1, 1]
    assert load(str(tmp_path), "a photo", "", 64).triggers == []


@pytest.mark.parametrize("changed", [TWO.replace("repeats = 2", "repeats = 3"), TWO.replace("repeats = 2\n", ""),
                                     TWO + "repeats = 2\n", TWO.replace('"sks dog"', '"sks pup"'),
                                     TWO + 'caption = "a cat"\n'])
def test_the_identity_changes_with_a_folders_repeats_trigger_or_caption(tmp_path, changed):
    """A resumed run compares identities: what changes the captions or the sampling order must show."""
    before = load(_folders(tmp_path, TWO), "", "", 64).identity()
    assert load(str(tmp_path / "set.toml"), "", "", 64).identity() == before
    (tmp_path / "set.toml").write_text(changed)
    assert load(str(tmp_path / "set.toml"), "", "", 64).identity() != before


TABLE = r"in its \[\[folders\]\] table"


@pytest.mark.parametrize("text,match", [
    ("[[folders]\npath = 'dog'", "is not valid TOML"),
    ("[[folder]]\npath = 'dog'", "unknown key 'folder' at the top level. Did you mean 'folders'"),
    ("[[folders]]\npath = 'dog'\ntriger = 'sks'", f"unknown key 'triger' {TABLE} 1. Did you mean 'trigger'"),
    ("", "lists no folders"),
    ("folders = []", "lists no folders"),
    ("folders = 'dog'", "plain value"),
    ("[[folders]]\ntrigger = 'sks'", f"has no path {TABLE} 1"),
    ("[[folders]]\npath = ''", f"has no path {TABLE} 1"),
    ("[[folders]]\npath = 'dog'\n[[folders]]\npath = 'bird'", f"folder 'bird' {TABLE} 2, which does not exist"),
    ("[[folders]]\npath = 'dog/1.jpg'", "which is a file, not a folder"),
    ("[[folders]]\npath = 'dog'\n[[folders]]\npath = './dog/'", r"twice \(tables 1 and 2\)"),
    ("[[folders]]\npath = 'dog'\nrepeats = 0", f"repeats = 0 {TABLE} 1: it must be 1 or more"),
    ("[[folders]]\npath = 'dog'\nrepeats = 1.5", "repeats = 1.5 .*whole number"),
    ("[[folders]]\npath = 'dog'\nrepeats = true", "repeats = True .*whole number"),
    ("[[folders]]\npath = 'dog'\nrepeats = '2'", "repeats = '2' .*whole number"),
    ("[[folders]]\npath = 'dog'\ntrigger = 3", "trigger = 3 .*a string"),
    ("[[folders]]\npath = 7", "path = 7 .*a string"),
])
def test_dataset_file_mistakes_are_one_paragraph_naming_the_file(tmp_path, text, match):
    with pytest.raises(UserError, match=match) as err:
        load(_folders(tmp_path, text), "", "sks", 64)
    assert str(tmp_path / "set.toml") in str(err.value) and "\n" not in str(err.value)


def test_a_missing_dataset_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"dataset file '.*nope.toml' does not exist"):
        load(str(tmp_path / "nope.toml"), "", "sks", 64)


def test_a_folders_own_errors_name_the_folder_and_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"set.toml', folder 'empty': No images in '.*empty'"):
        load(_folders(tmp_path, "[[folders]]\npath = 'dog'\n[[folders]]\npath = 'empty'"), "", "sks", 64)
    (tmp_path / "set.toml").write_text("[[folders]]\npath = 'dog'\n[[folders]]\npath = 'cat'\ntrigger = ''")
    with pytest.raises(UserError, match=r"folder 'cat': '1.jpg' has no caption.*set in its \[\[folders\]\] table"):
        load(str(tmp_path / "set.toml"), "", "sks", 64)


def test_bad_images_are_listed_across_folders(tmp_path):
    toml = _folders(tmp_path, TWO)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\x00" * 100)
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\x00" * 100)
    ds = load(toml, "", "", 64)  # skip (the default): each folder's bad files listed, the rest used
    assert [ds.name(p) for p, _ in ds.skipped] == ["dog/broken.jpg", "cat/broken.jpg"] and len(ds) == 3
    with pytest.raises(UserError, match=r"2 of the 5 images in the folders of '.*set.toml' cannot be used "
                                        r"\(dog/broken.jpg: .*; cat/broken.jpg: .*on_bad_image = 'stop'"):
        load(toml, "", "", 64, on_bad_image="stop")


@pytest.mark.parametrize("size", [(40, 20), (20, 40), (33, 33), (50, 31)])
def test_training_crop_is_the_pipelines_crop(size):
    """The vlm teacher reads the image as training crops it: the same pixels as the diffusers image
    processor's resize_mode="crop" (what klein's edit teacher and the pipelines use), at the bucket."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from lowvram_dopsd.data import training_crop

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    for width, height in [(32, 16), (16, 32), (16, 16)]:
        theirs = VaeImageProcessor(resample="lanczos").resize(image, height, width, resize_mode="crop")
        mine = training_crop(image, width, height)
        assert mine.size == (width, height) and np.array_equal(np.asarray(mine), np.asarray(theirs))


def test_a_caption_file_of_several_lines_holds_caption_variants(tmp_path):
    """One caption per line (blank lines skipped), the trigger rule applied to each; the first is the
    item's caption, the others are drawn per roll-out, and they are part of the resume identity."""
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a [trigger] dog\n\n  sks dog on grass  \r\nun chien\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("a dog\n", encoding="utf-8")
    ds = scan(str(tmp_path), "", "sks", 64)
    a, b = ds.items
    assert a.caption == "a sks dog" and a.other_captions == ("sks dog on grass", "sks, un chien")
    assert a.captions == ("a sks dog", "sks dog on grass", "sks, un chien")
    assert b.caption == "sks, a dog" and b.other_captions == ()
    assert "one caption per line" in ds.caption_rule
    ident = ds.identity()
    assert ident[0][-1] == {"other_captions": ["sks dog on grass", "sks, un chien"]} and len(ident[1]) == 5
    (tmp_path / "a.txt").write_text("a [trigger] dog\nsks dog on sand\n", encoding="utf-8")
    assert scan(str(tmp_path), "", "sks", 64).identity() != ident
    (tmp_path / "a.txt").write_text("a dog\n[trigger] on grass\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"'\[trigger\] on grass'"):  # the line that holds it
        scan(str(tmp_path), "", "", 64)
