"""lowvram_dopsd.distributed on two forked gloo ranks: the collectives the trainer uses, the start-up
agreement, the drift check and the watchdog. The trainer's own multi-process runs: test_train_distributed.py."""
import json
import os
import sys
import signal
import time

import pytest
import torch

from lowvram_dopsd import distributed
from lowvram_dopsd.distributed import World
from lowvram_dopsd.errors import EXIT_RANK_LOST, EXIT_USER_ERROR, UserError

from dist_helpers import fork_job


@pytest.mark.parametrize("n, size, shares", [
    (4, 2, [[0, 1], [2, 3]]),
    (5, 2, [[0, 1], [2, 3, 4]]),          # 4 image micro-batches + a prior one: the extra to the last rank
    (4, 3, [[0], [1], [2, 3]]),
    (4, 1, [[0, 1, 2, 3]]),
])
def test_share_divides_micro_batches_contiguously_with_the_remainder_last(n, size, shares):
    assert [list(World(rank=r, size=size).share(n)) for r in range(size)] == shares


def _collectives(out: str) -> None:
    world = distributed.current()
    r = world.rank
    distributed.BUCKET_BYTES = 100  # several buckets, and a tensor bigger than one
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 4), (40,), (2,), (5,))]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(r + 1) * (i + 1))
    params[3].grad = None if r == 0 else params[3].grad  # rank 0 did not touch this one
    world.sum_grads(params)
    result = {
        "grads": [p.grad.tolist() for p in params],
        "means": world.means([1.0, 2.0] if r == 0 else [3.0], [] if r == 0 else [5.0], []),
        "step_end": world.step_end(r == 1, 1.5 + r),
        "from_main": world.from_main(lambda x: f"made on rank {distributed.current().rank} from {x}", "a"),
        "share": list(world.share(4)),
    }
    try:
        world.check_same("test", {"same": torch.arange(4), "other": torch.tensor([r])})
    except RuntimeError as exc:
        result["check_same"] = str(exc)
    world.check_same("test", {"same": [torch.ones(3), 2], "rng": (1, [2, 3])})  # equal: no error
    with open(f"{out}.{r}", "w") as fh:
        json.dump(result, fh)


def test_collectives_on_two_ranks(tmp_path):
    out = str(tmp_path / "result")
    assert fork_job(2, _collectives, out) == [0, 0]
    r0, r1 = (json.load(open(f"{out}.{r}")) for r in range(2))
    for i, grad in enumerate(r0["grads"]):  # every rank's gradient summed, on every rank
        want = (1 + 2) * (i + 1) if i < 3 else 2 * (i + 1)
        assert torch.equal(torch.tensor(grad), torch.full_like(torch.tensor(grad), float(want))), i
    assert r0["grads"] == r1["grads"]
    assert r0["means"] == r1["means"] == [2.0, 5.0, None]
    assert r0["step_end"] == r1["step_end"] == [True, [1.5, 2.5]]
    assert r0["from_main"] == r1["from_main"] == "made on rank 0 from a"
    assert (r0["share"], r1["share"]) == ([0, 1], [2, 3])
    assert "the same other (ranks [1] differ from rank 0)" in r0["check_same"] == r1["check_same"]


def _agree(out: str) -> int:
    world = distributed.current()
    facts = {"settings": {"rank": 4, "lr": 1e-4 * (1 + world.rank)}, "dataset": "abc"}
    try:
        world.agree(facts)
    except UserError as exc:
        with open(f"{out}.{world.rank}", "w") as fh:
            fh.write(str(exc))
        return exc.exit_code
    return 0


def test_ranks_that_disagree_stop_before_anything_runs(tmp_path):
    out = str(tmp_path / "msg")
    assert fork_job(2, _agree, out) == [EXIT_USER_ERROR, EXIT_USER_ERROR]
    msg = open(f"{out}.0").read()
    assert msg == open(f"{out}.1").read()
    assert "rank 1 differs from rank 0 in settings lr (0.0002 vs 0.0001)" in msg and "dataset" not in msg
    assert "same command" in msg


def _rank_0_fails_first() -> None:
    if distributed.current().rank == 1:
        time.sleep(3 * distributed.BEAT_S)  # rank 0 has exited by then
    raise UserError("the same refusal on every rank")


def test_a_rank_failing_after_rank_0_exited_ends_with_its_code_as_under_torchrun():
    """fork_job serves the job's store as torchrun's agent does (not rank 0, on a port the system picks): a
    rank still running when rank 0 has exited reads rank 0's exit code from it. When rank 0 served it, rank 1
    found it gone and exited 69 (rank lost) for a setting every rank refused."""
    assert fork_job(2, _rank_0_fails_first, timeout=60) == [EXIT_USER_ERROR, EXIT_USER_ERROR]


def _rank_0_refuses_alone() -> None:
    """Rank 0 alone refuses (as it alone takes the output folder's lock); rank 1 waits in a collective."""
    world = distributed.current()
    if world.rank == 0:
        print("error: rank 0's own paragraph", file=sys.stderr, flush=True)  # as cli.main prints it
        raise UserError("the output folder is in use by another run")
    world.sum([1.0])


def test_a_refusal_of_rank_0_alone_is_said_once_without_resume_advice(capfd):
    """Rank 1 used to repeat rank 0's paragraph with 'run the same command with --resume', which a folder
    in use (or a fresh run) does not take; on rank 0's host it now exits with rank 0's code, quietly."""
    assert fork_job(2, _rank_0_refuses_alone, timeout=60) == [EXIT_USER_ERROR, EXIT_USER_ERROR]
    err = capfd.readouterr().err
    assert err.count("error:") == 1 and "--resume" not in err, err


def _rank_1_dies(how: str, out: str) -> None:
    world = distributed.current()
    t = torch.ones(3)
    world.sum_grads([torch.nn.Parameter(t)])  # both alive
    if world.rank == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise UserError("rank 1 ran out of memory (made up)")
    open(out, "w").write(str(time.monotonic()))
    world.sum([1.0])  # would wait for rank 1 until the collective's timeout (2 h)


@pytest.mark.parametrize("how, code", [("kill", EXIT_RANK_LOST), ("error", EXIT_USER_ERROR)])
def test_a_rank_that_dies_stops_the_others_at_once_naming_it(tmp_path, capfd, how, code):
    out = str(tmp_path / "t")
    codes = fork_job(2, _rank_1_dies, how, out, timeout=60)
    took = time.monotonic() - float(open(out).read())
    assert codes == [code, -signal.SIGKILL if how == "kill" else code]
    assert took < 10, took  # the same host: the process is seen gone at once (another host: DEAD_AFTER_S)
    err = capfd.readouterr().err
    assert f"error: rank 1 " in err and f"Rank 0 stops too (exit {code})" in err and "--resume" in err
    if how == "error":
        assert "ran out of memory (made up)" in err


def test_a_job_refuses_what_it_cannot_run_before_anything_loads(monkeypatch):
    world = World(rank=0, size=2)
    world.check_job("auto", 2)  # fine
    with pytest.raises(UserError, match="device = 'cuda:1': in a job of 2 processes"):
        world.check_job("cuda:1", 2)
    with pytest.raises(UserError, match="a step has only 1 micro-batches"):
        world.check_job("auto", 1)
    with pytest.raises(UserError, match="Raise --batch-size to 4 or a multiple"):  # 2 processes x micro_batch 2
        world.check_job("auto", 1, micro_batch=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="2 processes were started on this machine, but it has 1 GPU"):
        world.check_job("auto", 4)
    world.check_job("cpu", 4)  # CPU processes share no GPU
    assert world.division_note(4) == ""
    assert "busy 75%" in World(rank=0, size=4).division_note(6)  # 2, 2, 1, 1 micro-batches
