"""Data-parallel training on the CPU (gloo, 2 processes) against one process with the same global batch.

Two ranks are the one process up to the order in which the gradients add up: ((g1 + g2) + g3) + g4 in one
process, (g1 + g2) + (g3 + g4) on two. In fp32 that changes a gradient by ~1e-7 of itself; AdamW
divides it by the root of its second moment, which lets elements with a near-zero gradient move by up to
~1e-3 of a step's lr more or less. TOL is 1e-5 absolute: 0.2 % of one step's largest move at lr 5e-3, 4x
what was seen (2.6e-6 after 3 steps), and 500x below what an unequal batch or a lost micro-batch gives.
Adam does not see a gradient's scale, so the grad norms (metrics.jsonl) are compared too: a mean over
ranks where the sum belongs would halve them.

The runs go through the command line: `fork_job` forks ranks of this process (cheap); the kill -9 test runs
`train --gpus 2`, the real launcher (torchrun, whose agent plays its part there).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lowvram_dopsd.train as train_mod
from lowvram_dopsd import checkpoint
from lowvram_dopsd.cli import main
from lowvram_dopsd.distributed import current
from lowvram_dopsd.errors import EXIT_STOPPED, EXIT_USER_ERROR

from dist_helpers import REPO, fork_job

TOL = 1e-5
FILES = ("pytorch_lora_weights.safetensors", "teacher_ema_lora.safetensors")


def _rank_main(argv: list[str], record: str | None = None, act: tuple[int, int] | None = None) -> int:
    """One rank: the command line, counting its roll-outs; `act` = (rank, n): that rank gets Ctrl-C
    (SIGINT, to itself alone) at its n-th roll-out."""
    calls, real, rank = [0], train_mod.rollout_and_learn, current().rank

    def counted(*a, **k):
        calls[0] += 1
        if act and act == (rank, calls[0]):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    train_mod.rollout_and_learn = counted
    code = main(argv)
    if record:
        with open(f"{record}.{rank}", "w") as fh:
            json.dump({"rollouts": calls[0], "code": code}, fh)
    return code


@pytest.fixture(scope="module")
def zimage_args(tiny_zimage_dir, tiny_vlm_dir, demo_images, tmp_path_factory):
    cache = tmp_path_factory.mktemp("dist-cache")

    def make(out, *extra):
        return ["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder",
                str(tiny_vlm_dir), "--images", str(demo_images), "--cache-dir", str(cache), "--output", str(out),
                "--steps", "3", "--batch-size", "4", "--rollout-steps", "2", "--train-states", "1", "--lr", "5e-3",
                "--set", "save_every=2", *extra]
    return make


@pytest.fixture(scope="module")
def zimage_runs(zimage_args, tmp_path_factory):
    """One process with batch 4, and two ranks with the same global batch (each: its roll-out count)."""
    root = tmp_path_factory.mktemp("zimage-runs")
    one, two = root / "one", root / "two"
    assert _rank_main(zimage_args(one), str(root / "count-one")) == 0
    assert fork_job(2, _rank_main, zimage_args(two), str(root / "count-two")) == [0, 0]
    counts = {name: [json.load(open(p)) for p in sorted(root.glob(f"count-{name}.*"))] for name in ("one", "two")}
    return one, two, counts


def files_of(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def assert_same_lora(out, ref, step, exact=False):
    for name in FILES:
        a = load_file(str(out / "checkpoints" / f"step-{step:06d}" / name))
        b = load_file(str(ref / "checkpoints" / f"step-{step:06d}" / name))
        assert a.keys() == b.keys()
        for k in a:
            if exact:
                assert torch.equal(a[k], b[k]), k
            else:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=TOL)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_the_lora_of_one_process_each_doing_half_the_rollouts(zimage_runs):
    one, two, counts = zimage_runs
    for step in (2, 3):
        assert_same_lora(two, one, step)
    start = load_file(str(one / "checkpoints" / "step-000002" / FILES[0]))
    moved = max((load_file(str(one / FILES[0]))[k].float() - v).abs().max().item() for k, v in start.items())
    assert moved > 500 * TOL  # the last step's own change: the tolerance is far below it
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # summed, not averaged
    # the work is divided, not repeated: each rank rolled out half of the global batch
    assert [c["rollouts"] for c in counts["one"]] == [3 * 4]
    assert [c["rollouts"] for c in counts["two"]] == [3 * 2, 3 * 2]
    assert files_of(two) == files_of(one)  # rank 0 wrote the same files, the other rank none


def test_ctrl_c_on_one_rank_stops_both_after_the_same_step_and_resume_is_exact(zimage_args, zimage_runs, tmp_path):
    """Ctrl-C reaches one rank only (rank 1, in step 2): both finish step 2, rank 0 saves, both exit 75;
    --resume on two ranks then gives the uninterrupted two-rank run bit for bit."""
    _, reference, _ = zimage_runs
    out, record = tmp_path / "run", str(tmp_path / "stop")
    assert fork_job(2, _rank_main, zimage_args(out), record, (1, 3)) == [EXIT_STOPPED, EXIT_STOPPED]
    assert [json.load(open(f"{record}.{r}"))["code"] for r in (0, 1)] == [EXIT_STOPPED, EXIT_STOPPED]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert fork_job(2, _rank_main, zimage_args(out, "--resume")) == [0, 0]
    assert_same_lora(out, reference, 3, exact=True)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(reference)]


def test_another_world_size_resumes_with_a_note(zimage_args, zimage_runs, tmp_path, capsys):
    """A two-rank checkpoint continued by one process: the same batches and noise (every rank draws them
    all), so the one-process run within TOL; the note says why not bit for bit."""
    import shutil

    one, two, _ = zimage_runs
    out = tmp_path / "run"
    shutil.copytree(two / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    assert main(zimage_args(out, "--resume")) == 0
    assert "trained by 2 processes and continues on 1" in " ".join(capsys.readouterr().out.split())
    assert_same_lora(out, one, 3)


def test_ranks_with_different_settings_stop_before_anything_is_computed(zimage_args, tmp_path, capfd):
    def rank_main(argv):
        return main(argv + (["--lr", "1e-3"] if current().rank == 1 else []))

    out = tmp_path / "run"
    assert fork_job(2, rank_main, zimage_args(out)) == [EXIT_USER_ERROR] * 2  # rank 1: --lr twice, the last counts
    captured = capfd.readouterr()
    assert "rank 1 differs from rank 0 in settings lr (0.001 vs 0.005)" in " ".join(captured.err.split())
    assert "conditions:" not in captured.out and not (out / "checkpoints").exists()


def test_klein_with_the_edit_teacher(tiny_klein_dir, demo_images, tmp_path):
    """The edit teacher's reference latents travel with the conditions from rank 0. Same LoRA as one process
    with the same global batch; rank 0's LoRA file records the two processes; rank 1 needs neither rank 0's
    cache nor its output folder."""
    from lowvram_dopsd.output import read_info

    def args(out):
        return ["train", "--preset", "cpu-demo", "--model", str(tiny_klein_dir), "--images", str(demo_images),
                "--cache-dir", str(tmp_path / "cache"), "--steps", "2", "--batch-size", "4", "--lr", "5e-3",
                "--set", "save_every=2", "--output", str(out)]
    def rank_main(argv):  # rank 1 as on a machine of its own: another cache and output folder (unused)
        return main(argv + (["--cache-dir", str(elsewhere / "cache"), "--output", str(elsewhere / "out")]
                            if current().rank == 1 else []))

    elsewhere = tmp_path / "rank-1"
    assert main(args(tmp_path / "one")) == 0
    assert fork_job(2, rank_main, args(tmp_path / "two")) == [0, 0]
    assert_same_lora(tmp_path / "two", tmp_path / "one", 2)
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")
    assert read_info(tmp_path / "two" / FILES[0])["processes"] == 2
    assert not elsewhere.exists()  # rank 1 read no cache, wrote nothing: no shared filesystem needed


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """The ranks torchrun started: {rank: pid}, from their environment."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_text().split("\0") if "=" in kv)
            found[int(env["RANK"])] = int(stat.parent.name)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return found


def test_a_rank_killed_mid_run_ends_the_job_naming_it_and_the_last_checkpoint_loads(zimage_args, tmp_path):
    """`train --gpus 2` (torchrun, the real launcher); rank 1 is killed (kill -9) once the checkpoint of
    step 2 is written: the job ends within 60 s, non-zero, rank 0's message names rank 1."""
    out = tmp_path / "run"
    argv = zimage_args(out, "--steps", "40", "--gpus", "2")  # 40 steps: the kill comes mid-run
    job = subprocess.Popen([sys.executable, "-m", "lowvram_dopsd", *argv], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = {}
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000002").is_dir() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = rank_pids(job.pid)
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
        for pid in ranks.values():  # what is left if the test failed (the ranks run in sessions of their own)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert time.monotonic() - t0 < 60
    assert job.returncode != 0
    assert "error: rank 1 " in err and "kill -9" in err and "Rank 0 stops too" in err, err[-6000:]
    saved = checkpoint.latest(out)
    assert saved is not None and checkpoint.load(saved).step >= 2


def test_a_setting_refused_on_every_rank_is_said_once_with_its_exit_code(zimage_args, tmp_path):
    """`train --gpus 2` with a teacher encoder that is not there: both ranks refuse it; the job says it
    once and exits 2 (torchrun alone: each rank's copy, then its traceback and exit 1)."""
    missing = tmp_path / "no-such-vlm"
    argv = [*zimage_args(tmp_path / "run", "--gpus", "2"), "--teacher-encoder", str(missing)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # unset: torchrun's notice about it
    job = subprocess.run([sys.executable, "-m", "lowvram_dopsd", *argv], cwd=REPO, text=True, capture_output=True,
                         env=env, timeout=120)
    assert job.returncode == EXIT_USER_ERROR, job.stderr[-4000:]
    assert job.stderr.count("error:") == 1 and str(missing) in job.stderr, job.stderr[-4000:]
    assert "teacher encoder (--teacher-encoder)" in job.stderr  # the flag that sets it: the default is no flag
    assert "Traceback" not in job.stderr and "torch/distributed" not in job.stderr, job.stderr[-4000:]
