"""Checkpoints without a model: exact round trip, atomic writes, rotation, compatibility, no pickle."""
import errno
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from lowvram_dopsd import checkpoint
from lowvram_dopsd.checkpoint import RNGState
from lowvram_dopsd.config import TrainConfig
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.lora import DualLoRA

IDENTITY = {"model": "m", "dataset": "d", "conditions": "c"}


def tiny_run(seed=0, width=16):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("attention", nn.Module())
    model.attention.add_module("to_q", nn.Linear(width, width))
    model.attention.add_module("to_k", nn.Linear(width, width))
    lora = DualLoRA.attach(model, ("attention.to_q", "attention.to_k"), rank=4, alpha=8.0)
    opt = torch.optim.AdamW(lora.student_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, lora, opt, sched


def one_step(model, lora, opt, sched, gen):
    x = torch.randn(3, 16, generator=gen)
    model.attention.to_k(model.attention.to_q(x)).pow(2).mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    lora.ema_update(0.9)


def save(out, step, lora, opt, sched, gen, rng, order=(1, 0), keep=0, cfg=None, run_id=None):
    return checkpoint.save(out, step, lora, opt, sched, RNGState.capture(gen, rng, list(order)), cfg or TrainConfig(),
                           IDENTITY, {"base_model": "x", "family": "zimage"}, keep, run_id=run_id)


def test_round_trip_continues_exactly(tmp_path):
    model, lora, opt, sched = tiny_run()
    gen, rng = torch.Generator().manual_seed(5), random.Random(5)
    for _ in range(2):
        one_step(model, lora, opt, sched, gen)
    rng.random()
    path = save(tmp_path, 2, lora, opt, sched, gen, rng, order=[3, 1, 2])
    for _ in range(2):  # the uninterrupted continuation
        one_step(model, lora, opt, sched, gen)
    expected = {k: v.clone() for k, v in lora.tensors("student").items()}
    expected_teacher = {k: v.clone() for k, v in lora.tensors("teacher").items()}
    expected_draw = rng.random()

    ck = checkpoint.load(path)
    model2, lora2, opt2, sched2 = tiny_run()  # same frozen base; the LoRA must come from the file
    with torch.no_grad():
        for t in list(lora2.tensors("student").values()) + list(lora2.tensors("teacher").values()):
            t.normal_()
    lora2.load("student", ck.student)
    lora2.load("teacher", ck.teacher)
    opt2.load_state_dict(ck.optimizer)
    sched2.load_state_dict(ck.scheduler)
    gen2, rng2 = torch.Generator(), random.Random()
    assert ck.rng.restore(gen2, rng2) == [3, 1, 2] and ck.step == 2
    for _ in range(2):
        one_step(model2, lora2, opt2, sched2, gen2)
    for k, v in lora2.tensors("student").items():
        assert torch.equal(v, expected[k]), k
    for k, v in lora2.tensors("teacher").items():
        assert torch.equal(v, expected_teacher[k]), k
    assert rng2.random() == expected_draw
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_8bit_adamw_state_round_trips(tmp_path):
    """bitsandbytes' AdamW8bit (the 16gb preset) nests its quantized state: it must come back exactly."""
    bnb = pytest.importorskip("bitsandbytes")

    def run():
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(4096, 16))
        return p, bnb.optim.AdamW8bit([p], lr=1e-2)

    def steps(p, opt, n, gen):
        for _ in range(n):
            p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    p, opt = run()
    gen = torch.Generator().manual_seed(1)
    try:
        steps(p, opt, 2, gen)
    except (RuntimeError, NotImplementedError) as exc:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes 8-bit AdamW does not run on this CPU: {exc}")
    tensors, meta = checkpoint._optimizer_to_files(opt.state_dict())
    assert any(k.count("/") == 2 for k in tensors)  # the nested quantization state, flattened
    checkpoint.write_safetensors(tensors, tmp_path / "opt.safetensors")
    meta = json.loads(json.dumps(meta))  # plain JSON, no pickle
    p_at_2, gen_at_2 = p.detach().clone(), gen.get_state()
    steps(p, opt, 2, gen)  # the uninterrupted run

    p2, opt2 = run()
    with torch.no_grad():
        p2.copy_(p_at_2)
    opt2.load_state_dict(checkpoint._optimizer_from_files(checkpoint.load_file(str(tmp_path / "opt.safetensors")),
                                                          meta))
    steps(p2, opt2, 2, torch.Generator().set_state(gen_at_2))
    assert torch.equal(p2, p)


def test_checkpoint_lora_is_a_loadable_fp32_diffusers_file(tmp_path):
    from lowvram_dopsd.output import read_info

    model, lora, opt, sched = tiny_run()
    path = save(tmp_path, 7, lora, opt, sched, torch.Generator(), random.Random())
    from safetensors.torch import load_file
    tensors = load_file(str(path / checkpoint.STUDENT_FILE))
    assert all(k.startswith("transformer.") and v.dtype == torch.float32 for k, v in tensors.items())
    assert read_info(path / checkpoint.STUDENT_FILE)["steps"] == 7
    state = json.loads((path / "state.json").read_text())
    assert state["config"]["rank"] == 64 and state["identity"] == IDENTITY


def test_rotation_keeps_the_last_k_and_cleans_leftovers(tmp_path):
    model, lora, opt, sched = tiny_run()
    stale = tmp_path / "checkpoints" / ".tmp-step-000001-abc"
    stale.mkdir(parents=True)
    (stale / "pytorch_lora_weights.safetensors").write_bytes(b"half")
    for step in (1, 2, 3, 4):
        save(tmp_path, step, lora, opt, sched, torch.Generator(), random.Random(), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000004"]
    assert checkpoint.latest(tmp_path).name == "step-000004"


def test_disk_full_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, lora, opt, sched = tiny_run()
    first = save(tmp_path, 1, lora, opt, sched, torch.Generator(), random.Random())
    before = sorted(p.name for p in first.iterdir())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", full)  # the LoRA files are written, then the disk fills
    with pytest.raises(UserError) as err:
        save(tmp_path, 2, lora, opt, sched, torch.Generator(), random.Random())
    msg = str(err.value)
    assert "disk is full" in msg and "step-000001" in msg and "intact" in msg and "--resume" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]  # no half folder
    assert sorted(p.name for p in first.iterdir()) == before
    assert checkpoint.load(checkpoint.latest(tmp_path)).step == 1


def test_a_full_disk_names_what_can_go_and_what_to_run(tmp_path, monkeypatch):
    """Old checkpoints are pruned only after a save succeeds, so 'lower keep_checkpoints' freed nothing:
    the message names the older checkpoints that can go, and says --resume only where there is one."""
    model, lora, opt, sched = tiny_run()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "write_safetensors", full)
        with pytest.raises(UserError) as err:
            save(tmp_path, 1, lora, opt, sched, torch.Generator(), random.Random(), keep=2)
    msg = str(err.value)
    assert "No checkpoint of this run was written yet" in msg and "run the same command again (without --resume" in msg
    for step in (1, 2, 3):
        save(tmp_path, step, lora, opt, sched, torch.Generator(), random.Random(), keep=0)
    monkeypatch.setattr(checkpoint, "write_safetensors", full)
    with pytest.raises(UserError) as err:
        save(tmp_path, 4, lora, opt, sched, torch.Generator(), random.Random(), keep=2)
    msg = str(err.value)
    assert f"The previous checkpoint, {tmp_path / 'checkpoints' / 'step-000003'}, is intact" in msg
    assert "step-000001, step-000002, can be deleted" in msg and "with --resume" in msg
    assert "keep_checkpoints" not in msg


def test_rotation_never_deletes_another_runs_checkpoints(tmp_path):
    model, lora, opt, sched = tiny_run()
    for step in (5, 10, 15):  # run A
        save(tmp_path, step, lora, opt, sched, torch.Generator(), random.Random(), run_id="A")
    for step in (1, 2, 3):  # run B, in the same folder (the lock forbids it; rotation still keeps to its own)
        save(tmp_path, step, lora, opt, sched, torch.Generator(), random.Random(), keep=1, run_id="B")
    names = lambda: sorted(p.name for _, p in checkpoint.list_checkpoints(tmp_path))  # noqa: E731
    assert names() == ["step-000003", "step-000005", "step-000010", "step-000015"]
    # A resumed from its step 5 (a branch): its later checkpoints 10 and 15 stay, its older ones rotate
    for step in (6, 7):
        save(tmp_path, step, lora, opt, sched, torch.Generator(), random.Random(), keep=2, run_id="A")
    assert names() == ["step-000003", "step-000006", "step-000007", "step-000010", "step-000015"]
    assert checkpoint.load(tmp_path / "checkpoints" / "step-000007").run_id == "A"


def test_rotation_leaves_a_live_writers_temporary_folder(tmp_path):
    model, lora, opt, sched = tiny_run()
    root = tmp_path / "checkpoints"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = root / f".tmp-step-000009-{os.getppid()}-x"  # our parent runs: another run's save in progress
    dead = root / f".tmp-step-000009-{gone.stdout.strip()}-x"
    for p in (alive, dead):
        p.mkdir(parents=True)
    save(tmp_path, 1, lora, opt, sched, torch.Generator(), random.Random(), keep=2)
    assert alive.is_dir() and not dead.exists()


KILL_CHILD = textwrap.dedent("""
    import random, sys, time, torch
    sys.path.insert(0, {tests!r})
    from lowvram_dopsd import checkpoint
    from test_checkpoint import tiny_run, save
    real_write_json = checkpoint._write_json

    def stall_before_state_json(path, obj):  # step 2: every other file is in the .tmp folder
        if obj.get("step") == 2:
            print("saving", flush=True)
            time.sleep(60)
        real_write_json(path, obj)

    checkpoint._write_json = stall_before_state_json
    model, lora, opt, sched = tiny_run(width=256)
    for step in (1, 2):
        save({out!r}, step, lora, opt, sched, torch.Generator(), random.Random(), keep=2)
        print(step, flush=True)
""")


def test_kill_9_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    """A real process is SIGKILLed while writing checkpoint 2 (its LoRA and optimizer files already in
    the .tmp folder): checkpoint 1 is still the latest and loads, and the next save cleans up."""
    out = tmp_path / "out"
    code = KILL_CHILD.format(tests=str(Path(__file__).parent), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"
        assert child.stdout.readline().strip() == "saving"
    finally:
        child.kill()  # SIGKILL: no cleanup code runs
        child.wait()
    left = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-step-000002")]
    assert left and (left[0] / "optimizer.safetensors").is_file()  # it died mid-save
    ck = checkpoint.load(checkpoint.latest(out))
    assert ck.step == 1 and ck.student
    model, lora, opt, sched = tiny_run(width=256)
    save(out, 2, lora, opt, sched, torch.Generator(), random.Random(), keep=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_compatibility_errors_and_warnings(tmp_path):
    model, lora, opt, sched = tiny_run()
    cfg = TrainConfig(steps=10, rank=4, lr=1e-3)
    ck = checkpoint.load(save(tmp_path, 5, lora, opt, sched, torch.Generator(), random.Random(), cfg=cfg))
    assert checkpoint.check_compatible(ck, TrainConfig(steps=10, rank=4, lr=1e-3), IDENTITY) == []
    notes = checkpoint.check_compatible(ck, TrainConfig(steps=20, rank=4, lr=1e-3, preview_every=5), IDENTITY)
    assert any("steps" in n for n in notes) and any("preview_every" in n for n in notes)
    moved = TrainConfig(steps=10, rank=4, lr=1e-3, model="/elsewhere/Z-Image-Turbo", output="other")
    assert not [n for n in checkpoint.check_compatible(ck, moved, IDENTITY) if "model" in n]
    # the fix names each setting by its flag, to change in the command (a --set after --rank 8 would be refused)
    # (--set for a setting without one, shell-quoted)
    with pytest.raises(UserError, match=r"rank = 8 \(the run used 4\).*alpha = 16.0 \(the run used 128.0\). "
                                        r"Run with the original settings \(change these in your command: "
                                        r"--set 'edit_instruction=Make the main subject .* image\.' "
                                        r"--rank 4 --alpha 128.0\), or start a new run"):
        checkpoint.check_compatible(ck, TrainConfig(steps=10, rank=8, alpha=16.0, lr=1e-3, edit_instruction="x"),
                                    IDENTITY)
    with pytest.raises(UserError, match="lr = 0.01"):
        checkpoint.check_compatible(ck, TrainConfig(steps=10, rank=4, lr=1e-2), IDENTITY)
    with pytest.raises(UserError, match="loss"):
        checkpoint.check_compatible(ck, TrainConfig(steps=10, rank=4, lr=1e-3, loss="velocity"), IDENTITY)
    with pytest.raises(UserError, match="at step 5, but steps = 3"):
        checkpoint.check_compatible(ck, TrainConfig(steps=3, rank=4, lr=1e-3), IDENTITY)
    with pytest.raises(UserError, match="training set"):
        checkpoint.check_compatible(ck, TrainConfig(steps=10, rank=4, lr=1e-3), {**IDENTITY, "dataset": "other"})
    with pytest.raises(UserError, match="base model"):
        checkpoint.check_compatible(ck, TrainConfig(steps=10, rank=4, lr=1e-3), {**IDENTITY, "model": "other"})


def test_resolve_latest_path_and_errors(tmp_path):
    model, lora, opt, sched = tiny_run()
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.resolve("latest", tmp_path)
    for step in (3, 12):
        save(tmp_path, step, lora, opt, sched, torch.Generator(), random.Random())
    assert checkpoint.resolve("latest", tmp_path).name == "step-000012"
    assert checkpoint.resolve(str(tmp_path), tmp_path / "x").name == "step-000012"  # an output folder
    assert checkpoint.resolve(str(tmp_path / "checkpoints" / "step-000003"), tmp_path).name == "step-000003"
    with pytest.raises(UserError, match="not a checkpoint"):
        checkpoint.resolve(str(tmp_path / "nothing"), tmp_path)
    (tmp_path / "checkpoints" / "step-000012" / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        checkpoint.load(tmp_path / "checkpoints" / "step-000012")


def test_metrics_trimmed_and_previous_run_archived(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    checkpoint.trim_metrics(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "my_notes.txt").write_text("mine")
    dest = checkpoint.archive_previous_run(tmp_path)
    assert dest.parent == tmp_path / "previous-runs"
    assert (dest / "checkpoints" / "step-000002").is_dir() and (dest / "metrics.jsonl").is_file()
    assert (dest / "pytorch_lora_weights.safetensors").read_bytes() == b"lora" and (dest / "tensorboard").is_dir()
    assert (tmp_path / "my_notes.txt").is_file() and not (tmp_path / "metrics.jsonl").exists()
    assert checkpoint.archive_previous_run(tmp_path) is None  # nothing left to move


def test_resume_after_a_new_run_moved_the_old_one_names_where_it_went(tmp_path):
    model, lora, opt, sched = tiny_run()
    save(tmp_path, 3, lora, opt, sched, torch.Generator(), random.Random())
    dest = checkpoint.archive_previous_run(tmp_path)  # a new run started here (without --resume)
    with pytest.raises(UserError, match=f"moved to '{dest}'.*--resume {dest} continues it"):
        checkpoint.resolve("latest", tmp_path)
    assert checkpoint.resolve(str(dest), tmp_path).name == "step-000003"


def test_saved_files_and_folders_follow_the_umask(tmp_path):
    """mkstemp / mkdtemp make 0600 / 0700: a LoRA a ComfyUI service running as another user (or a
    container with another uid) could not read. They get what any file the user writes gets."""
    import os
    import stat

    model, lora, opt, sched = tiny_run()
    old = os.umask(0o022)
    try:
        path = save(tmp_path, 7, lora, opt, sched, torch.Generator(), random.Random())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / checkpoint.STUDENT_FILE).stat().st_mode) == 0o644

