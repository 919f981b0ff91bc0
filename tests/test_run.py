"""run.Run: what the loop's writers decide, rank by rank."""
from types import SimpleNamespace

import pytest

from lowvram_dopsd import checkpoint
from lowvram_dopsd.distributed import World
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.run import Run


class RankOfTwo(World):
    """Rank 1 of a job whose rank 0 answers `from_main` with `answer` (no process group needed)."""

    def __init__(self, answer):
        super().__init__(rank=1, size=2)
        self.answer = answer

    def from_main(self, fn, *args, **kwargs):
        return self.answer


def fake_run(out_dir, world, train_mode, step=0):
    written = []
    run = SimpleNamespace(previews=object(), step=step, out_dir=out_dir, world=world,
                          cfg=SimpleNamespace(train_mode=train_mode), write_preview=written.append)
    return run, written


def test_the_baseline_preview_is_rank_0s_decision_in_a_full_fine_tune(tmp_path):
    (tmp_path / "previews").mkdir()
    (tmp_path / "previews" / "step-000000.png").write_bytes(b"an earlier run's, not moved aside yet")
    # rank 1 still sees the earlier run's grid; rank 0 (which moves it aside) found none: rank 1 samples too
    run, written = fake_run(tmp_path, RankOfTwo(answer=False), "full")
    Run.write_baseline_preview(run)
    assert written == [0]
    # one process: the grid there (a run resumed at step 0) is kept; none there: it is drawn
    run, written = fake_run(tmp_path, World(), "lora")
    Run.write_baseline_preview(run)
    assert written == []
    run, written = fake_run(tmp_path / "new", World(), "lora")
    Run.write_baseline_preview(run)
    assert written == [0]
    run, written = fake_run(tmp_path / "new", World(), "lora", step=3)  # resumed past step 0: no baseline
    Run.write_baseline_preview(run)
    assert written == []


def test_every_rank_names_the_checkpoint_rank_0_wrote(tmp_path, monkeypatch):
    """A LoRA job's rank 0 writes the checkpoint; another rank that stops at once (a second Ctrl-C reaches
    every rank) must name it too, not say that nothing was saved."""
    world = RankOfTwo(answer=None)
    world.check_same = lambda what, values: None  # no process group here; test_train_distributed runs it
    monkeypatch.setattr(checkpoint, "shared_state", lambda lora, rng_state: {})
    run = SimpleNamespace(cfg=SimpleNamespace(train_mode="lora"), world=world, out_dir=tmp_path, lora=None,
                          last_ckpt=None, saved_step=0, rng_state=lambda: None,
                          display=SimpleNamespace(note=lambda text: None), tracker=SimpleNamespace(flush=lambda: None))
    assert Run.save_checkpoint(run, 5) == tmp_path / "checkpoints" / "step-000005" == run.last_ckpt
    assert run.saved_step == 5


class Previews:
    """A Previewer stand-in whose sampling (or drawing) fails as a GPU out of memory does."""

    def __init__(self, fails_in: str):
        self.fails_in = fails_in

    def sample(self, step):
        if self.fails_in == "sample":
            raise UserError("The GPU ran out of memory while sampling a preview.")
        return []

    def write(self, step, rows):
        raise UserError("The GPU ran out of memory while decoding a preview.")


def test_a_failed_preview_is_skipped_unless_other_ranks_sample_with_it(tmp_path):
    notes = []

    def run_of(world, train_mode, fails_in):
        return SimpleNamespace(cfg=SimpleNamespace(train_mode=train_mode), world=world, preset="",
                               previews=Previews(fails_in), display=SimpleNamespace(note=notes.append))

    Run.write_preview(run_of(World(), "full", "sample"), 3)  # one process: the run goes on
    Run.write_preview(run_of(RankOfTwo(answer=None), "lora", "sample"), 3)  # a LoRA job: rank 0 alone samples
    Run.write_preview(run_of(RankOfTwo(answer=None), "full", "write"), 3)  # failing after the samples (the drawing): no rank waits
    assert len(notes) == 3 and all("preview skipped:" in str(n) for n in notes)
    # a full fine-tune's rank that gave up alone would leave the others in the sampling's collectives
    with pytest.raises(UserError, match="while sampling a preview"):
        Run.write_preview(run_of(RankOfTwo(answer=None), "full", "sample"), 3)
