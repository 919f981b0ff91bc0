"""User text, whatever characters it holds, through the command line: never a traceback, always shown as typed.

A seeded generator (no extra dependency; each example is reproducible from its seed) makes printable strings
of the pieces that broke things: Rich markup ("[bold]", "[/]", our own "[trigger]" and "[[folders]]"),
quotes, backslashes, ':emoji:' codes, format fields, spaces, accents, CJK and emoji. They go into paths,
triggers, captions and prompts, through argument checking, a 1-step run (the toy world), `sample` and
`export` (the tiny Z-Image). Few examples, each a real command: the suite's time matters more than breadth.
"""
import random
import shutil
from importlib import resources
from pathlib import Path

import pytest

from lowvram_dopsd.cli import main
from trust_helpers import random_lora

PIECES = ["[", "]", "[/]", "[bold red]", "[[folders]]", "[trigger]", "'", '"', "\\", " ", "  ", ":smile:", "{0}",
          "%s", "$HOME", "*", "é", "ß", "Ωμ", "日本", "🐶", "a", "sks", "x-y", "#", "|", ";", "(", ")", "~"]
SEEDS = [3, 11]


def nasty(rng: random.Random, n: int = 6) -> str:
    """A printable string of `n` pieces that starts and ends with a visible character (argparse and file
    systems are fine with the rest: it never starts with '-', never holds '/')."""
    text = "".join(rng.choice(PIECES) for _ in range(n)).strip()
    return f"a{text}z" if text.startswith("-") or not text else text


def squash(text: str) -> str:
    return " ".join(text.split())  # the console may wrap a long line where a space was


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "4000")  # no box wraps a long path over two lines


TOY = Path(str(resources.files("lowvram_dopsd") / "assets" / "toy"))


@pytest.mark.parametrize("seed", SEEDS)
def test_argument_checking_shows_the_text_as_typed(seed, tmp_path, capsys, wide):
    rng = random.Random(seed)
    missing = tmp_path / nasty(rng) / nasty(rng)
    key = nasty(rng).replace("=", "")
    for argv, shown in [(["train", "--preset", "toy", "--model", str(TOY / "model"), f"--images={missing}"], missing),
                        (["train", "--preset", "toy", f"--set={key}=1"], key),
                        (["train", f"--preset={missing}.toml"], f"{missing}.toml"),
                        (["export", str(missing), "--format", "comfyui"], missing)]:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert squash(str(shown)) in squash(err), (shown, err)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_one_step_run_with_such_text_everywhere(seed, tmp_path, capsys, wide):
    rng = random.Random(seed)
    images = tmp_path / nasty(rng) / nasty(rng)
    shutil.copytree(TOY / "concept", images)
    caption, trigger, prompt = nasty(rng), nasty(rng).replace("|", ""), nasty(rng).replace("|", "")
    (images / "00.txt").write_text(f"{caption} [trigger]", encoding="utf-8")  # our placeholder in the user's text
    out = tmp_path / nasty(rng)
    code = main(["train", "--preset", "toy", "--model", str(TOY / "model"), f"--images={images}",
                 f"--trigger={trigger}", f"--output={out}", f"--cache-dir={tmp_path / 'cache'}", "--steps", "1",
                 "--preview-every", "1", f"--set=preview_prompts={prompt}"])
    printed = capsys.readouterr()
    assert code == 0 and "Traceback" not in printed.err, printed.err
    shown = squash(printed.out)
    for text in (str(images), str(out), trigger):
        assert squash(text) in shown, (text, printed.out)
    assert (out / "previews" / "step-000001.png").is_file()


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_and_export_with_such_text(seed, tmp_path, tiny_zimage_dir, capsys, wide):
    rng = random.Random(seed)
    run = tmp_path / nasty(rng)
    random_lora(tiny_zimage_dir, run)
    prompt, image = nasty(rng), tmp_path / nasty(rng) / f"{nasty(rng)}.png"
    code = main(["sample", f"--lora={run}", f"--prompt={prompt}", f"--output={image}", "--steps", "1",
                 "--width", "32", "--height", "32"])
    printed = capsys.readouterr()
    assert code == 0 and "Traceback" not in printed.err, printed.err
    assert image.is_file() and squash(f"wrote {image}") in squash(printed.out)
    assert squash(prompt) in squash(printed.out)
    dest = tmp_path / nasty(rng) / f"{nasty(rng)}.safetensors"
    assert main(["export", str(run), "--format", "comfyui", f"--output={dest}"]) == 0
    assert dest.is_file() and squash(f"wrote {dest}") in squash(capsys.readouterr().out)
