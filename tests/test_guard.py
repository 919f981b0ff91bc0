"""A run's life: one run per output folder, and what a run stopped at once says, each message followed.

On the toy world (a trained 32x32 model, about half a second a step): real runs through the CLI, one of
them in a second process.
"""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

from lowvram_dopsd.cli import main
from lowvram_dopsd.errors import EXIT_STOPPED
from lowvram_dopsd.runlock import LOCK_FILE

TOY = Path(str(resources.files("lowvram_dopsd") / "assets" / "toy"))


@pytest.fixture
def toy(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "guard-cache"  # shared: later runs load the conditions

    def args(out, *extra):
        return ["train", "--preset", "toy", "--model", str(TOY / "model"), "--images", str(TOY / "concept"),
                "--trigger", "sks", "--output", str(out), "--cache-dir", str(cache), "--steps", "2",
                "--preview-every", "0", *extra]
    return args


def after(err: str, marker: str) -> list[str]:
    """The command a message says to run (after `marker`), as arguments of main()."""
    words = shlex.split(" ".join(err.split()).split(marker, 1)[1])
    assert words[0] == "lowvram-dopsd"
    return words[1:]


def test_a_second_run_in_a_folder_in_use_stops_at_once_naming_the_first(toy, tmp_path, capsys):
    out = tmp_path / "my [out]"
    first = toy(out, "--steps", "100000", "--set", "save_every=1")
    child = subprocess.Popen([sys.executable, "-m", "lowvram_dopsd", *first], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # its lock, then its first checkpoint
            if (out / "checkpoints" / "step-000001" / "state.json").is_file():
                break
            assert child.poll() is None, child.stderr.read()
            time.sleep(0.1)
        assert main(toy(out)) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"The output folder '{out}' is in use by another run: PID {child.pid} on {socket.gethostname()}, " \
               f"started {time.strftime('%Y-%m-%d')}" in err
        assert shlex.join(first) in err and f"`kill {child.pid}`" in err and "Traceback" not in err
        # what it says: stop the other run; it saves a checkpoint and frees the folder
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=120) == EXIT_STOPPED
    finally:
        child.kill()
    assert not (out / LOCK_FILE).exists()
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert main(toy(out, "--steps", str(step + 1), "--set", "save_every=1", "--resume")) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step + 1


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(toy, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "started": 0,
                                             "command": "lowvram-dopsd train --output run", "process_start": "ended",
                                             "torchrun": {}}))
    assert main(toy(out)) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"note: the output folder was locked by a run that is no longer running (PID {gone.stdout.strip()}" in printed
    assert not (out / LOCK_FILE).exists()


def signal_during(monkeypatch, where: str, *signals):
    """Send `signals` to this process the first time the function `where` ("module.name", as the trainer
    calls it) is called."""
    import importlib

    module, name = where.rsplit(".", 1)
    module = importlib.import_module(f"lowvram_dopsd.{module}")
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_says_nothing_was_saved_and_running_again_works(toy, tmp_path, capsys, monkeypatch,
                                                                                 sig):
    """It used to say 'continue with --resume' (Ctrl-C) or die without a word, leaving its lock (SIGTERM)."""
    out = tmp_path / "run"
    signal_during(monkeypatch, "train.encode_conditions", sig)
    assert main(toy(out)) == 128 + sig
    err = capsys.readouterr().err
    assert "Stopped at once before training began: no checkpoint of this run was saved, nothing to resume" in err
    assert "--resume" not in err and not (out / LOCK_FILE).exists()
    monkeypatch.undo()
    assert main(after(err, "Start it again: ")) == 0


def test_ctrl_c_while_a_resumed_run_starts_keeps_its_checkpoint(toy, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(toy(out, "--steps", "1")) == 0
    signal_during(monkeypatch, "train.encode_conditions", signal.SIGINT)
    assert main(toy(out, "--resume")) == 130
    err = capsys.readouterr().err
    assert "Stopped at once before training began; nothing was changed. Continue with the same command: " in err
    assert err.rstrip().endswith("--resume")
    monkeypatch.undo()
    assert main(after(err, "Continue with the same command: ")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_and_names_the_last_checkpoint(toy, tmp_path, capsys, monkeypatch, sig):
    out = tmp_path / "run"
    signal_during(monkeypatch, "train.draw_batch", sig, sig)  # both during step 1: its checkpoint is never written
    assert main(toy(out, "--steps", "3")) == 128 + sig
    err = capsys.readouterr().err
    assert "Stopped at once before training began: no checkpoint of this run was saved" in err
    monkeypatch.undo()
    assert main(after(err, "Start it again: ")) == 0

    signal_during(monkeypatch, "run.write_step_lora", sig, sig)  # after step 1 and its checkpoint
    assert main(toy(out, "--steps", "3", "--set", "save_every=1", "--lora-every", "1")) == 128 + sig
    err = capsys.readouterr().err
    assert "Stopped at once after step 1. The last checkpoint, " in err and "--resume" in err
    monkeypatch.undo()
    assert main(after(err, "continue with: ")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_file_where_the_output_folder_should_be(toy, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert main(toy(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"Cannot write to the output folder '{tmp_path / 'out'}': it is a file. Pass --output a folder" in err
    assert "File exists" not in err
    assert main(toy(tmp_path / "out-2")) == 0  # what it says


def test_a_lora_that_cannot_be_written_is_written_by_the_resume_the_message_names(toy, tmp_path, capsys, monkeypatch):
    import errno

    from lowvram_dopsd import output
    from lowvram_dopsd.output import read_info

    out, real = tmp_path / "run", output.save_lora

    def save_lora(path, *a, **k):
        if path.parent == out:  # the run's LoRA files, not the checkpoint's
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(output, "save_lora", save_lora)
    assert main(toy(out)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Could not write the LoRA" in err and "step-000002 holds it" in err and "run again with --resume" in err
    monkeypatch.undo()  # space freed
    assert main(toy(out, "--resume")) == 0
    assert read_info(out / "pytorch_lora_weights.safetensors")["steps"] == 2
