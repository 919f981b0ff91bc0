"""The progress display: plain lines without a terminal, and the note a long run gets."""
import io

import pytest
from rich.console import Console

from lowvram_dopsd import progress
from lowvram_dopsd.config import load_config
from lowvram_dopsd.progress import Display
from lowvram_dopsd.advice import shorter_run_advice


def test_plain_progress_lines_without_a_terminal():
    buf = io.StringIO()
    display = Display(Console(file=buf, force_terminal=False, width=60), total_steps=3)
    assert not display.live
    with display:
        display.preview(tmp := __import__("pathlib").Path("out/previews/step-000000.png"))
        for step in (1, 2, 3):
            display.step(step, {"loss": 0.5, "lr": 1e-4, "sec": 2.0, "vram_gb": 11.2})
    text = buf.getvalue()
    assert "preview: out/previews/step-000000.png" in text
    first = next(line for line in text.splitlines() if line.startswith("step 1/3"))
    assert "loss 0.5" in first and "2.00 s/it" in first and "peak 11.2 GB" in first and tmp.name in first
    assert "eta 0.1 min" in first and "step 3/3" in text  # one line per line, no wrapping at 60 columns


def run_steps(secs: list[float], total: int = 1000) -> str:
    buf = io.StringIO()
    with Display(Console(file=buf, force_terminal=False, width=400), total_steps=total, shorten="LEVERS") as display:
        for step, sec in enumerate(secs, start=1):
            display.step(step, {"loss": 0.5, "lr": 1e-4, "sec": sec})
    return buf.getvalue()


def test_a_long_run_is_told_once_what_shortens_it():
    """At 60 s per step (a 16 GB card at the paper's settings is slower still) the 997 steps left take
    17 h: one note after step 3, with what shortens it. The pace skips step 1 (Triton compiles there)."""
    text = run_steps([300.0, 60.0, 60.0, 60.0, 60.0])
    notes = [line for line in text.splitlines() if "What shortens it" in line]
    assert len(notes) == 1
    assert "at 60 s per step, the 997 steps left take about 17 h. What shortens it: LEVERS" in notes[0]
    assert text.index("step 1/1000") < text.index("What shortens it")


@pytest.mark.parametrize("secs", [[300.0, 40.0, 40.0], [5000.0, 10.0, 10.0], [60.0, 60.0]])
def test_no_note_for_a_run_shorter_than_the_threshold(secs):
    """40 s x 997 = 11 h is under LONG_RUN_S; a slow first step alone (compile, autotune) says nothing;
    nothing is said before the third step."""
    assert progress.LONG_RUN_S == 12 * 3600
    assert "What shortens it" not in run_steps(secs)


def test_shorter_run_advice_names_only_the_levers_this_config_has_left():
    paper = load_config("16gb", {})  # 8 Z-Image states, batch 4, 1024²
    advice = shorter_run_advice(paper, rollout_steps=8)
    assert "--train-states 2" in advice and "not 8" in advice
    assert "--batch-size 2" in advice and "--resolution 768" in advice and "prior" not in advice
    lean = load_config("16gb", {"train_states": 2, "batch_size": 1, "resolution": 768,
                                "prior_prompts": ["a photo of a dog"]})
    advice = shorter_run_advice(lean, rollout_steps=8)
    assert "--train-states" not in advice and "--batch-size" not in advice and "--resolution" not in advice
    assert advice.startswith("fewer --steps") and "no prior_prompts" in advice
    odd = load_config("16gb", {"micro_batch": 2, "batch_size": 2})  # half of 2 is under one micro-batch
    assert "--batch-size" not in shorter_run_advice(odd, rollout_steps=4)


def test_plain_console_prints_user_text_as_typed():
    buf = io.StringIO()
    console = progress.make_console()
    console.file = buf
    text = "a photo of [trigger] in 'shots [v2]/[bold]x[/]' :smile: [[folders]] \\[x]"
    console.print(progress.styled("warning", text))
    console.print(text)
    assert buf.getvalue().splitlines() == ["warning " + text, text]


def test_streams_never_fail_on_a_character(tmp_path):
    """A Latin-1 terminal gets \\U escapes for what it cannot show; a file name's undecodable bytes (held by
    Python as surrogates) come out as those very bytes."""
    import subprocess
    import sys

    code = ("from lowvram_dopsd.progress import safe_streams; import os; safe_streams(); "
            "print('caf\\u00e9 \\U0001f436 ' + os.fsdecode(b'photo-\\xff.png'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env={"PYTHONIOENCODING": "latin-1",
                                                                                 "PATH": ""}).stdout
    assert out == b"caf\xe9 \\U0001f436 photo-\xff.png\n"


def test_every_label_ends_like_error_does():
    """'note steps changed (40 -> 22)' beside 'error: ...' and 'note: ...': without colour (a log file, a pipe)
    a label without its colon runs into the message. Every styled() label ends in ':' or '.'."""
    import re
    from pathlib import Path

    package = Path(progress.__file__).parent
    labels = {m for f in package.rglob("*.py") for m in re.findall(r'styled\("([^"]*)"', f.read_text())}
    assert labels and all(label.endswith((":", ".")) for label in labels), sorted(labels)
