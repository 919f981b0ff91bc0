"""Stop a run (Ctrl-C, CUDA out of memory, losses that stay NaN, a full disk) and resume it: the final
LoRA equals an uninterrupted run's. A single non-finite step, or a preview that cannot be written,
changes nothing and the run goes on.

All runs go through the command line, on the tiny Z-Image model, fp32 on the CPU (deterministic).
"""
import errno
import io
import json
import os
import pathlib
import shlex
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import lowvram_dopsd.train as train_mod
from lowvram_dopsd.cli import main
from lowvram_dopsd.errors import EXIT_STOPPED
from lowvram_dopsd.optim import lr_factor
from lowvram_dopsd.run import MAX_SKIPPED_IN_A_ROW


@pytest.fixture(scope="module")
def args(tiny_zimage_dir, tiny_vlm_dir, demo_images, tmp_path_factory):
    cache = tmp_path_factory.mktemp("resume-cache")

    def make(out, *extra):
        # save_every=100 unless a test sets its own (a setting given twice with two values is refused)
        save = [] if any(e.startswith("save_every=") for e in extra) else ["--set", "save_every=100"]
        return ["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder",
                str(tiny_vlm_dir), "--images", str(demo_images), "--cache-dir", str(cache), "--output", str(out),
                "--steps", "4", "--rollout-steps", "2", "--train-states", "1", "--lr", "5e-3",
                "--set", "warmup_steps=2", *save, *extra]
    return make


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    assert main(args(out)) == 0
    return out


def read_run(out):
    lora = load_file(str(out / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors"))
    teacher = load_file(str(out / "checkpoints" / "step-000004" / "teacher_ema_lora.safetensors"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lora, teacher, metrics


def assert_same_run(out, reference):
    lora, teacher, metrics = read_run(out)
    ref_lora, ref_teacher, ref_metrics = read_run(reference)
    assert set(lora) == set(ref_lora)
    for k in ref_lora:
        assert torch.equal(lora[k], ref_lora[k]), k          # bit for bit
        assert torch.equal(teacher[k], ref_teacher[k]), k
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]     # appended, no step twice
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics]
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained


def calls_that(monkeypatch, on_call, action):
    """Wrap rollout_and_learn (2 calls per step here: batch 2 as 2 micro-batches) to act on call `on_call`."""
    real, count = train_mod.rollout_and_learn, [0]

    def wrapped(*a, **k):
        count[0] += 1
        if count[0] == on_call:
            action()
        return real(*a, **k)
    monkeypatch.setattr(train_mod, "rollout_and_learn", wrapped)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # SIGTERM: kill, docker stop, preemption
def test_ctrl_c_or_sigterm_saves_and_resume_continues_exactly(args, reference, tmp_path, monkeypatch, capsys, sig):
    out = tmp_path / "run"
    # Ctrl-C (or SIGTERM) during step 2: the step finishes, a checkpoint is saved, exit 75 (stopped,
    # resumable: errors.py) where a finished run exits 0. Previews on:
    # they must not disturb the training randomness.
    calls_that(monkeypatch, 3, lambda: os.kill(os.getpid(), sig))
    assert main(args(out, "--set", "preview_every=3", "--set", "preview_prompts=sks ball in space")) == EXIT_STOPPED
    printed = capsys.readouterr().out
    assert train_mod.GracefulStop.SIGNALS[sig] in printed and "stopped" in printed
    assert "--resume" in printed and "lowvram-dopsd train" in printed
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    monkeypatch.undo()

    assert main(args(out, "--set", "preview_every=3", "--set", "preview_prompts=sks ball in space", "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(out, reference)
    assert sorted(p.name for p in (out / "previews").iterdir()) == \
        ["step-000000.png", "step-000003.png", "step-000004.png"]


def test_out_of_memory_keeps_the_state_before_the_step_and_resumes_exactly(args, reference, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "run"

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    calls_that(monkeypatch, 6, oom)  # in the second micro-batch of step 3
    assert main(args(out)) == 2
    err = capsys.readouterr().err
    assert "ran out of memory while training step 3" in err and "Traceback" not in err
    assert "step-000002" in err and "--quant qint8" in err and "--resolution" not in err  # 64 px: not a lever
    monkeypatch.undo()
    assert main(args(out, "--resume")) == 0
    assert_same_run(out, reference)


def test_previews_turned_on_at_resume_make_no_trained_baseline(args, tmp_path):
    """step-000000.png is the base model before training: a run resumed at step 2 with previews on
    writes its grids from step 2 on, not a 'step 0' sampled with the trained LoRA."""
    out = tmp_path / "out"
    assert main(args(out, "--steps", "2")) == 0
    assert main(args(out, "--resume", "--preview-every", "1")) == 0
    assert sorted(p.name for p in (out / "previews").glob("*.png")) == ["step-000003.png", "step-000004.png"]


def test_step_loras_are_the_lora_of_their_step_and_change_nothing(args, reference, tmp_path):
    """--lora-every 2: loras/step-000002.safetensors is the student of step 2 as the final LoRA is
    written (the step-2 checkpoint's, in the compute dtype), with its step in the metadata; the run
    is the reference run; a new run in the folder moves them aside with the rest of the run."""
    from lowvram_dopsd.output import read_info

    out = tmp_path / "run"
    assert main(args(out, "--lora-every", "2", "--set", "save_every=1", "--set", "keep_checkpoints=0")) == 0
    assert_same_run(out, reference)
    assert sorted(p.name for p in (out / "loras").iterdir()) == ["step-000002.safetensors", "step-000004.safetensors"]
    snap = out / "loras" / "step-000002.safetensors"
    ckpt = load_file(str(out / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"))
    snapped = load_file(str(snap))
    assert snapped.keys() == ckpt.keys() and all(torch.equal(snapped[k], v) for k, v in ckpt.items())  # fp32 run
    assert read_info(snap)["steps"] == 2 and read_info(out / "pytorch_lora_weights.safetensors")["steps"] == 4
    assert main(args(out, "--steps", "1")) == 0  # a new run here (no --resume)
    assert not (out / "loras").exists() and len(list((out / "previous-runs").glob("*/loras/*"))) == 2


def test_init_lora_starts_both_sets_from_it_in_either_layout(args, reference, tmp_path, monkeypatch, capsys):
    """--init-lora: at the first roll-out the student and the EMA teacher are the given LoRA exactly,
    whether it is our file or its ComfyUI export; a LoRA of another rank or family, or one this tool
    did not write, stops the run before anything is encoded."""
    from safetensors.torch import save_file

    from lowvram_dopsd.errors import UserError
    from lowvram_dopsd.export import export_comfyui, read_lora
    from lowvram_dopsd.output import read_info

    start = load_file(str(reference / "pytorch_lora_weights.safetensors"))  # fp32 run: the trained LoRA as is
    comfy = export_comfyui(str(reference), str(tmp_path / "comfy.safetensors"))
    real = train_mod.rollout_and_learn
    for i, source in enumerate((reference / "pytorch_lora_weights.safetensors", comfy)):
        seen = []

        def first(family, model, lora, *a, **k):
            if not seen:
                seen.append({role: {n: t.clone() for n, t in lora.tensors(role).items()}
                             for role in ("student", "teacher")})
            return real(family, model, lora, *a, **k)
        monkeypatch.setattr(train_mod, "rollout_and_learn", first)
        out = tmp_path / f"run{i}"
        assert main(args(out, "--init-lora", str(source), "--steps", "1")) == 0
        for role in ("student", "teacher"):
            assert seen[0][role].keys() == {k[len("transformer."):] for k in start}
            assert all(torch.equal(seen[0][role][k[len("transformer."):]], v) for k, v in start.items()), role
        assert read_info(out / "pytorch_lora_weights.safetensors")["init_lora"] == str(source.resolve())
    monkeypatch.undo()
    capsys.readouterr()
    out = tmp_path / "wrong-rank"
    assert main(args(out, "--init-lora", str(reference), "--rank", "2", "--alpha", "2")) == 2
    assert "has rank 4 and alpha 8; this run has rank 2 and alpha 2. Pass --rank 4 --alpha 8" in capsys.readouterr().err
    assert not out.exists()  # stopped before the output folder was made, let alone anything encoded
    out = tmp_path / "other-targets"  # trained on all default targets, run on the queries only
    assert main(args(out, "--init-lora", str(reference), "--set", "lora_targets=attention.to_q")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "its layers" in err and "are not among this run's lora_targets" in err and not out.exists()
    from lowvram_dopsd.families.zimage import ZImage
    suggested = err.split("--set lora_targets=")[1].split()[0].rstrip(".").split(",")
    assert set(suggested) == set(ZImage.lora_targets)  # the targets it was trained with
    with pytest.raises(UserError, match="is a LoRA of a zimage model"):
        read_lora(str(reference), "klein")
    save_file(start, str(tmp_path / "foreign.safetensors"))  # no metadata: another trainer's file
    with pytest.raises(UserError, match="not written by lowvram-dopsd"):
        read_lora(str(tmp_path / "foreign.safetensors"), "zimage")


def test_an_init_lora_from_the_same_output_folder_is_recorded_where_the_archive_moved_it(args, tmp_path, capsys):
    """--init-lora out --output out: the earlier run (its LoRA included) moves to previous-runs/ once this
    one has loaded; the new LoRA's metadata must name the file there, not out/, which now holds the new LoRA."""
    from lowvram_dopsd.output import read_info

    out = tmp_path / "out"
    assert main(args(out, "--steps", "1")) == 0
    first = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert main(args(out, "--init-lora", str(out), "--steps", "1")) == 0
    recorded = pathlib.Path(read_info(out / "pytorch_lora_weights.safetensors")["init_lora"])
    assert recorded.parent.parent == (out / "previous-runs").resolve()
    assert recorded.name == "pytorch_lora_weights.safetensors"
    moved = load_file(str(recorded))
    assert all(torch.equal(moved[k], v) for k, v in first.items())
    assert "the init LoRA was part of it: it is now" in " ".join(capsys.readouterr().out.split())


def test_resume_refuses_a_change_in_the_math(args, reference, capsys):
    assert main(args(reference, "--rank", "8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "rank = 8" in err and "(change these in your command: --rank 4)" in err


@pytest.mark.parametrize("first,second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGTERM),
                                          (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_stops_at_once_and_the_handlers_are_restored(first, second):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN under `nohup ... &`
    notes = []
    with pytest.raises(KeyboardInterrupt):
        with train_mod.GracefulStop(notes.append) as stop:
            os.kill(os.getpid(), first)
            assert stop.requested and f"{train_mod.GracefulStop.SIGNALS[first]} again" in notes[0]
            os.kill(os.getpid(), second)
    assert {s: signal.getsignal(s) for s in before} == before
    with train_mod.GracefulStop(notes.append):  # and after a run that was not interrupted
        pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_klein_edit_teacher_resumes_exactly_with_teacher_previews(tiny_klein_dir, demo_images, tmp_path,
                                                                  monkeypatch, capsys):
    """The same on the other family: klein's edit teacher (reference latents in its condition), and
    preview grids with the EMA teacher's row, decoded by klein's own decode_latents."""
    def run(out, *extra):
        return main(["train", "--preset", "cpu-demo", "--model", str(tiny_klein_dir), "--images", str(demo_images),
                     "--cache-dir", str(tmp_path / "cache"), "--output", str(out), "--steps", "2",
                     "--train-states", "1", "--lr", "5e-3", "--set", "save_every=100", *extra])

    assert run(tmp_path / "ref") == 0
    calls_that(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGINT))  # during step 1
    previews = ["--set", "preview_every=1", "--set", "preview_teacher=true",
                "--set", "preview_prompts=a photo of sks ball on grass|sks ball on the moon"]
    assert run(tmp_path / "run", *previews) == EXIT_STOPPED
    monkeypatch.undo()
    # the printed command is the one to run: on one line whatever the terminal width (here 80
    # columns, the command ~400 characters), quoted where needed ('|' and spaces in the prompts)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume with:")]
    assert len(printed) == 1
    again = shlex.split(printed[0].removeprefix("resume with:"))
    assert again[0] == "lowvram-dopsd" and again[-1] == "--resume"
    assert main(again[1:]) == 0
    ref = load_file(str(tmp_path / "ref" / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    grids = sorted((tmp_path / "run" / "previews").iterdir())
    assert [p.name for p in grids] == ["step-000000.png", "step-000002.png"]  # no grid on Ctrl-C
    from PIL import Image
    assert Image.open(grids[-1]).height > 2 * 64  # student row + teacher row


def test_teacher_ema_on_cpu_is_the_same_run(args, reference, tmp_path):
    """fp32 here, so the layers' copy is exact: same losses, same LoRAs, bit for bit. Stopped after
    step 2 and resumed, its checkpoint carries the fp32 EMA state from host RAM."""
    out = tmp_path / "ema-on-cpu"
    assert main(args(out, "--set", "teacher_ema_on=cpu", "--steps", "2")) == 0
    assert main(args(out, "--set", "teacher_ema_on=cpu", "--resume")) == 0
    assert_same_run(out, reference)


def test_teacher_ema_on_cpu_in_bf16_trains_as_on_the_device(args, tmp_path):
    """In bf16 the layers hold a bf16 copy, which the teacher passes would cast to anyway."""
    runs = {}
    for where in ("device", "cpu"):
        out = tmp_path / where
        assert main(args(out, "--dtype", "bf16", "--set", f"teacher_ema_on={where}")) == 0
        runs[where] = read_run(out)
    (lora, teacher, metrics), (ref_lora, ref_teacher, ref_metrics) = runs["cpu"], runs["device"]
    assert [m["loss"] for m in metrics] == [m["loss"] for m in ref_metrics]
    assert all(torch.equal(lora[k], ref_lora[k]) and torch.equal(teacher[k], ref_teacher[k]) for k in lora)


def nan_losses_from(monkeypatch, first_call, last_call=10**9):
    """The D-OPSD loss of calls first_call..last_call (one per micro-batch here) is NaN, as an fp16
    overflow in a forward makes it: the gradients it back-propagates are NaN too."""
    real, count = train_mod.dopsd_loss, [0]

    def wrapped(*a, **k):
        count[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if first_call <= count[0] <= last_call else loss
    monkeypatch.setattr(train_mod, "dopsd_loss", wrapped)


def checkpoint_loras(out, step):
    folder = out / "checkpoints" / f"step-{step:06d}"
    return (load_file(str(folder / "pytorch_lora_weights.safetensors")),
            load_file(str(folder / "teacher_ema_lora.safetensors")))


def test_a_nan_step_changes_nothing_and_the_run_goes_on(args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    nan_losses_from(monkeypatch, 3, 3)  # the first micro-batch of step 2
    assert main(args(out, "--set", "save_every=1", "--set", "keep_checkpoints=10")) == 0
    printed = capsys.readouterr().out
    assert "step 2:" in printed and "skipped" in printed and "skipped updates" in printed
    lines = (out / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert "NaN" not in "".join(lines)  # strict JSON: jq and pandas read it
    assert [m.get("skipped", False) for m in metrics] == [False, True, False, False]
    assert metrics[1]["loss"] is None and metrics[1]["grad_norm"] is None
    assert all(isinstance(m["loss"], float) for i, m in enumerate(metrics) if i != 1)
    (s1, t1), (s2, t2), (s3, _) = (checkpoint_loras(out, k) for k in (1, 2, 3))
    assert all(torch.equal(s1[k], s2[k]) and torch.equal(t1[k], t2[k]) for k in s1)  # no update, no EMA
    assert any(not torch.equal(s2[k], s3[k]) for k in s2)  # step 3 trains again
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_losses_that_stay_nan_stop_the_run_with_the_lora_as_it_was(args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    nan_losses_from(monkeypatch, 3)  # every micro-batch from step 2 on
    assert main(args(out, "--steps", "10", "--set", "save_every=1", "--set", "keep_checkpoints=10")) == 2
    err = capsys.readouterr().err
    assert f"Steps 2-{1 + MAX_SKIPPED_IN_A_ROW} all gave a non-finite loss" in err
    assert "trained up to step 1" in err and "lower --lr (now 0.005)" in err and "Traceback" not in err
    assert "--dtype bf16" not in err  # fp32 here: not a lever
    stop = 1 + MAX_SKIPPED_IN_A_ROW
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step-{stop:06d}"
    (s1, t1), (s_stop, t_stop) = checkpoint_loras(out, 1), checkpoint_loras(out, stop)
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(s1[k], s_stop[k]) and torch.equal(t1[k], t_stop[k]) for k in s1)
    assert all(torch.equal(s1[k], final[k]) for k in s1)


def test_a_nan_condition_stops_before_training_and_is_not_cached(args, tmp_path, monkeypatch, capsys):
    from lowvram_dopsd.families.zimage import ZImage

    real = ZImage.encode_student

    def nan_for_one(self, captions, cfg, device):
        conds = real(self, captions, cfg, device)
        conds[0]["cap"][0, 0] = float("inf")
        return conds
    monkeypatch.setattr(ZImage, "encode_student", nan_for_one)
    cache = tmp_path / "cache"
    assert main(args(tmp_path / "run", "--cache-dir", str(cache), "--dtype", "fp16")) == 2
    err = capsys.readouterr().err
    assert "text encoder gave non-finite values" in err and "--dtype bf16" in err and "Traceback" not in err
    assert not list(cache.rglob("*.safetensors"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class DiskFullAfter:
    """Stands in for metrics.jsonl opened for appending: the disk fills up at write number `n`."""

    def __init__(self, real, n):
        self.real, self.n, self.name = real, n, real.name

    def write(self, text):
        self.n -= 1
        if self.n == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(text)

    def __getattr__(self, attr):
        return getattr(self.real, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_a_full_disk_while_logging_keeps_the_last_checkpoint_and_resumes_exactly(args, reference, tmp_path,
                                                                              monkeypatch, capsys):
    out = tmp_path / "run"
    real_open = pathlib.Path.open

    def open_(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return DiskFullAfter(f, 3) if self.name == "metrics.jsonl" and "a" in mode else f
    monkeypatch.setattr(pathlib.Path, "open", open_)
    assert main(args(out, "--set", "save_every=1")) == 2
    err = capsys.readouterr().err
    assert "Could not append step 3" in err and "No space left" in err and "Traceback" not in err
    assert "step-000002) is intact" in err and "--resume" in err
    monkeypatch.undo()
    assert main(args(out, "--set", "save_every=1", "--resume")) == 0
    assert_same_run(out, reference)


@pytest.mark.parametrize("full_at", [1, 3])
def test_a_full_disk_during_a_save_then_its_advice_followed(args, reference, tmp_path, monkeypatch, capsys, full_at):
    """The disk fills while checkpoint `full_at` is written; doing what the message says finishes the run,
    with the LoRA of the run that was never interrupted."""
    from lowvram_dopsd import checkpoint

    out, real = tmp_path / "run", checkpoint.write_safetensors

    def write(tensors, path, *a, **k):
        if f".tmp-step-{full_at:06d}-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(checkpoint, "write_safetensors", write)
    assert main(args(out, "--set", "save_every=1")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the disk is full" in err and "Traceback" not in err
    monkeypatch.undo()  # "free some space"
    if full_at == 1:
        assert "run the same command again (without --resume" in err
        assert main(args(out, "--set", "save_every=1")) == 0
    else:
        assert "The previous checkpoint, " in err and "step-000002, is intact" in err
        assert "the older checkpoints beside it, step-000001, can be deleted" in err
        shutil.rmtree(out / "checkpoints" / "step-000001")
        assert main(args(out, "--set", "save_every=1", "--resume")) == 0
    assert_same_run(out, reference)


def test_a_preview_that_cannot_be_written_is_skipped_and_the_run_goes_on(args, reference, tmp_path, monkeypatch,
                                                                       capsys):
    from PIL import Image

    out, real_save, calls = tmp_path / "run", Image.Image.save, [0]

    def save(self, fp, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the grid of step 2
            real_save(self, fp, *a, **k)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", save)
    assert main(args(out, "--set", "preview_every=2", "--set", "preview_prompts=sks ball in space")) == 0
    assert "preview skipped" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step-000000.png", "step-000004.png"]
    assert_same_run(out, reference)


PRIOR = ("--set", "prior_prompts=a red ball in space|a ball, on grass", "--set", "prior_weight=2")


def test_a_run_with_prior_prompts_resumes_exactly_and_refuses_other_ones(args, tmp_path, monkeypatch, capsys):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(args(reference, *PRIOR)) == 0
    metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["prior_loss"] == 0.0  # step 1: the student is still the base (B = 0)
    assert all(m["prior_loss"] > 0 for m in metrics[1:])
    calls_that(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C during step 2
    assert main(args(out, *PRIOR)) == EXIT_STOPPED
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args(out, "--set", "prior_prompts=a dog", "--resume")) == 2
    err = capsys.readouterr().err
    assert "prior_prompts = ['a dog']" in err and "--set 'prior_prompts=a red ball in space|a ball, on grass'" in err
    assert main(args(out, *PRIOR, "--resume")) == 0
    assert_same_run(out, reference)


def test_a_prior_prompt_that_names_the_subject_is_refused(args, tmp_path, capsys):
    assert main(args(tmp_path / "run", "--trigger", "sks", "--set", "prior_prompts=a photo of sks ball")) == 2
    err = capsys.readouterr().err
    assert "contains the trigger 'sks'" in err and "remove the trigger" in err


def test_a_decaying_lr_schedule_resumes_exactly_and_fixes_its_steps(args, tmp_path, monkeypatch, capsys):
    """lr_schedule = "cosine": each step's learning rate comes from the schedule's checkpointed
    counter and `steps`. metrics.jsonl logs the rate the step used (warm-up 2, then the cosine over
    the last 2 of 4 steps). Stopped by Ctrl-C at step 2 and resumed, the run is the uninterrupted one;
    resuming with other `steps` would re-shape the decay, so it is refused with the flag to restore."""
    cosine = ("--set", "lr_schedule=cosine")
    ref = tmp_path / "ref"
    assert main(args(ref, *cosine)) == 0
    assert [m["lr"] for m in read_run(ref)[2]] == pytest.approx([2.5e-3, 5e-3, 5e-3, 2.5e-3])

    out = tmp_path / "run"
    calls_that(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))  # during step 2
    assert main(args(out, *cosine)) == EXIT_STOPPED
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args(out, *cosine, "--steps", "6", "--resume")) == 2
    err = capsys.readouterr().err
    assert "steps = 6 (the run used 4; with lr_schedule = 'cosine'" in err and "command: --steps 4)" in err
    assert main(args(out, *cosine, "--resume")) == 0
    assert_same_run(out, ref)


def test_lr_factor_shapes():
    """Warm-up, then constant / cosine / linear; the factor is for the step after `updates` updates."""
    from lowvram_dopsd.config import load_config

    def factors(schedule, warmup=2, steps=10):
        cfg = load_config(None, {"steps": steps, "warmup_steps": warmup, "lr_schedule": schedule})
        return [lr_factor(u, cfg) for u in range(steps)]

    assert factors("constant") == [0.5] + [1.0] * 9
    cos, lin = factors("cosine"), factors("linear")
    assert cos[:3] == lin[:3] == [0.5, 1.0, 1.0]                    # decay starts after the warm-up
    assert cos[6] == pytest.approx(0.5) and lin[6] == pytest.approx(0.5)  # half of the 8 decay steps done
    assert lin[9] == pytest.approx(1 / 8) and 0 < cos[9] < 0.04     # the last step still learns
    assert all(a > b for a, b in zip(cos[2:], cos[3:])) and all(a > b for a, b in zip(lin[2:], lin[3:]))
    assert factors("linear", warmup=0, steps=4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def tensorboard_events(out):
    """<out>/tensorboard as TensorBoard reads it (its own reader: purged steps are dropped as it shows them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()


def test_tensorboard_mirrors_the_run_and_a_resume_drops_the_steps_it_redoes(args, reference, tmp_path,
                                                                           monkeypatch, capsys):
    """--log-with tensorboard: a crash in step 4 after step 3 was logged (checkpoint at 2), then --resume.
    TensorBoard shows each step once, with the resumed run's numbers (those of metrics.jsonl and of the
    uninterrupted run), and every preview grid as its PNG; the training itself is unchanged."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "run"
    extra = ("--log-with", "tensorboard", "--set", "save_every=2", "--set", "preview_every=2",
             "--set", "preview_prompts=sks ball in space")

    def crash():
        raise RuntimeError("the machine went away")

    calls_that(monkeypatch, 7, crash)  # the first micro-batch of step 4
    with pytest.raises(RuntimeError, match="went away"):
        main(args(out, *extra))
    assert [e.step for e in tensorboard_events(out).Scalars("loss/train")] == [1, 2, 3]
    monkeypatch.undo()
    assert main(args(out, *extra, "--resume")) == 0
    assert f"tensorboard --logdir {out}" in capsys.readouterr().out
    assert_same_run(out, reference)
    assert not (reference / "tensorboard").exists()  # the default: metrics.jsonl only

    events = tensorboard_events(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key, tag in (("loss", "loss/train"), ("grad_norm", "train/grad_norm"), ("lr", "train/lr"),
                     ("sec", "speed/sec_per_step")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3, 4], tag
        # TensorBoard keeps float32: each value is the metrics.jsonl one, rounded once
        assert [e.value for e in logged] == [float(np.float32(m[key])) for m in metrics], tag
    assert "memory/peak_vram_gb" not in events.Tags()["scalars"]  # CPU run: no VRAM figure, not a 0
    grids = events.Images("previews")
    assert [e.step for e in grids] == [0, 2, 4]
    for e in grids:
        png = np.asarray(Image.open(out / "previews" / f"step-{e.step:06d}.png").convert("RGB"))
        logged = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert np.array_equal(logged, png)
    (settings,) = events.Tensors("run/text_summary")  # the run's settings, once (not again at the resume)
    table = settings.tensor_proto.string_val[0].decode()
    assert "| steps | 4 |" in table and "| lr | 0.005 |" in table  # every setting; lr as resolved


def test_a_tensorboard_write_that_fails_stops_that_log_not_the_run(args, reference, tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    real = SummaryWriter.add_scalar

    def add_scalar(self, tag, value, step, *a, **k):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tag, value, step, *a, **k)
    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    out = tmp_path / "run"
    assert main(args(out, "--log-with", "tensorboard")) == 0
    assert "TensorBoard log stopped: No space left on device (metrics.jsonl goes on)" in capsys.readouterr().out
    assert_same_run(out, reference)  # metrics.jsonl has all four steps
    assert [e.step for e in tensorboard_events(out).Scalars("loss/train")] == [1, 2]
