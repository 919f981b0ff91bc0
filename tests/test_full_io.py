"""A full fine-tune's checkpoints (full_io.py): a kill during a save, an unsafe metadata file, 8-bit AdamW's
per-rank state; and the EMA's stochastic rounding (full.py). One process each (a group of one, forked)."""
import io
import json
import os
import pickle
import random
import re

import pytest
import torch
from safetensors.torch import load_file

from lowvram_dopsd import checkpoint, full_io
from lowvram_dopsd.config import load_config
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.full import stochastic_round

from dist_helpers import fork_job


def _run(over: dict, resume: str | None = None, die_at_publish: int = 0) -> int:
    """One rank: train `over`; `die_at_publish`: the process is killed (os._exit, no cleanup) when the save of
    that step is about to be renamed into place, after every shard and state.json are written."""
    from lowvram_dopsd.train import train

    if die_at_publish:
        real = checkpoint.publish

        def killed(tmp, final):
            if final.name == f"step-{die_at_publish:06d}":
                os._exit(9)
            real(tmp, final)
        checkpoint.publish = killed
    train(load_config("cpu-demo", over), "cpu-demo", resume=resume, command=["train"])
    return 0


def _run_out_of_space(over: dict) -> int:
    """One rank: train `over`, the disk full (ENOSPC from DCP's writes) once the first checkpoint is saved."""
    import errno
    from pathlib import Path

    from torch.distributed.checkpoint import filesystem

    real, first = filesystem._write_item, Path(over["output"]) / "checkpoints" / "step-000001"

    def write_item(*args, **kwargs):
        if first.is_dir():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    filesystem._write_item = write_item
    return _run(over)


def _run_transformer_out_of_space(over: dict) -> int:
    """One rank: train `over`, the disk full (ENOSPC) while the trained transformer's first file is written."""
    import errno

    real = full_io._stream_file

    def stream_file(path, *args):
        if path.parent.name.startswith(f".tmp-{full_io.TRANSFORMER_DIR}-"):
            path.with_name(f".tmp-{path.name}").write_bytes(b"cut short")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args)
    full_io._stream_file = stream_file
    return _run(over)


@pytest.fixture(scope="module")
def over(tiny_zimage_dir, tiny_vlm_dir, demo_images, tmp_path_factory):
    cache = tmp_path_factory.mktemp("full-io-cache")
    return lambda out, **kw: {"model": str(tiny_zimage_dir), "teacher_encoder": str(tiny_vlm_dir),
                              "images": str(demo_images), "cache_dir": str(cache), "output": str(out),
                              "train_mode": "full", "steps": "2", "rollout_steps": "2", "train_states": "1",
                              "lr": "1e-3", "save_every": "1", **{k: str(v) for k, v in kw.items()}}


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(over, tmp_path):
    out = tmp_path / "out"
    assert fork_job(1, _run, over(out), None, 2) == [9]
    assert [p.name for _, p in checkpoint.list_checkpoints(out)] == ["step-000001"]
    assert any(p.name.startswith(".tmp-step-000002-") for p in (out / "checkpoints").iterdir())  # what it left
    assert full_io.load(out / "checkpoints" / "step-000001").step == 1
    assert fork_job(1, _run, over(out), "latest") == [0]  # --resume continues from step 1; the leftover goes
    assert [p.name for _, p in checkpoint.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_full_disk_during_a_save_and_a_missing_shard_say_what_to_do(over, tmp_path, capfd):
    """DCP wraps a rank's OSError in its CheckpointException (a BaseException): the full disk is still the
    save-failed advice (exit 2, the half-written folder gone), and following it continues the run. A checkpoint
    whose shard is gone is refused as damaged, naming the older one to resume from; that works too."""
    out = tmp_path / "out"
    assert fork_job(1, _run_out_of_space, over(out)) == [2]
    err = " ".join(capfd.readouterr().err.split())
    assert "Could not save the checkpoint of step 2" in err and "the disk is full" in err, err
    assert "run the same command with --resume" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # no .tmp left
    assert fork_job(1, _run, over(out), "latest") == [0]
    assert [p.name for _, p in checkpoint.list_checkpoints(out)] == ["step-000001", "step-000002"]
    (out / "checkpoints" / "step-000002" / full_io.WEIGHTS_DIR / "__0_0.distcp").unlink()
    assert fork_job(1, _run, over(out), "latest") == [2]
    err = " ".join(capfd.readouterr().err.split())
    assert "step-000002' is damaged or incomplete" in err and "__0_0.distcp" in err, err
    advised = re.search(r"--resume (\S+)", err)[1].replace("step-XXXXXX", "step-000001")
    assert fork_job(1, _run, over(out), advised) == [0]


def test_a_full_disk_while_writing_the_transformer_names_the_checkpoint_and_resume_writes_it(over, tmp_path,
                                                                                            capfd):
    """On 2 ranks: rank 0's write fails on the folder's first file; rank 1, gathering with it, is not left waiting
    (rank 0 finishes the gathers, the folder's and the single file's), and both say what to do."""
    out = tmp_path / "out"
    assert fork_job(2, _run_transformer_out_of_space, over(out, batch_size=2), timeout=60) == [2, 2]
    err = " ".join(capfd.readouterr().err.split())
    assert "Could not write the trained transformer" in err and "No space left on device" in err, err
    ckpt = out / "checkpoints" / "step-000002"
    assert f"The checkpoint {ckpt} holds it" in err and "run the same command with --resume" in err
    assert not list(out.glob(".tmp-*")) and not (out / full_io.TRANSFORMER_DIR).exists()  # nothing half-written
    assert not list((out / "comfyui").glob(".tmp-*"))
    assert fork_job(2, _run, over(out, batch_size=2), "latest") == [0, 0]
    written = load_file(out / full_io.TRANSFORMER_DIR / "diffusion_pytorch_model.safetensors")
    assert written and not list(out.glob(".tmp-*"))


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_no_checkpoint_file_is_a_pickle_nor_read_as_one(over, tmp_path, monkeypatch):
    """DCP writes its metadata as a pickle: ours is JSON, rebuilt from DCP's classes by name. A folder holding
    DCP's pickle instead (or JSON naming any other class) is refused as damaged, and nothing runs."""
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "checkpoints" / "step-000001"
    weights = step / full_io.WEIGHTS_DIR
    weights.mkdir(parents=True)
    checkpoint.write_state(step, 1, checkpoint.RNGState.capture(torch.Generator(), random.Random(0), []),
                           load_config("cpu-demo", over(tmp_path)), {}, {}, None,
                           {"train_mode": "full", "world_size": 1, "ema_updates": 1, "scheduler": {}, "optimizer": {}})
    (weights / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UserError, match=r"is damaged or incomplete .*\.metadata\.json"):
        full_io.load(step)
    (weights / full_io.META_FILE).write_text(json.dumps({"class": "Popen", "args": ["touch", "pwned"]}))
    with pytest.raises(UserError, match="Popen is not part of a checkpoint's metadata"):
        full_io.load(step)
    assert not (tmp_path / "pwned").exists()
    # the values DCP stores pickled beside the tensors (AdamW's hyper-parameters) are read weights-only
    data = io.BytesIO()
    torch.save(Boom(), data)
    data.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        full_io.SafeLoadPlanner().load_bytes(None, data)
    assert not (tmp_path / "pwned").exists()


def _weights(step_dir, cfg) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's student (fp32) and bf16 EMA teacher, read whole in this process."""
    import torch.distributed.checkpoint as dcp

    from lowvram_dopsd.families import load_family

    model = load_family(cfg.model).load_transformer(cfg, torch.device("cpu"), torch.float32).state_dict()
    state = {"student": {k: torch.empty_like(v) for k, v in model.items()},
             "teacher": {k: torch.empty_like(v, dtype=torch.bfloat16) for k, v in model.items()}}
    dcp.load(state, storage_reader=full_io.SafeReader(step_dir / full_io.WEIGHTS_DIR), no_dist=True)
    return state


def test_8bit_adamw_and_a_bf16_ema_resume_exactly_and_only_on_as_many_gpus(over, tmp_path):
    """8-bit AdamW's state and the bf16 EMA's stochastic rounding (its stream: the update count) resume bit for
    bit; each EMA update is the formula rounded to one of its two bf16 neighbours, not always the nearest."""
    ref, part = tmp_path / "ref", tmp_path / "part"
    eight = {"optimizer": "adamw8bit", "ema_dtype": "bf16"}
    assert fork_job(1, _run, over(ref, **eight)) == [0]
    assert fork_job(1, _run, over(part, steps=1, **eight)) == [0]
    assert fork_job(1, _run, over(part, **eight), "latest") == [0]
    ckpt = part / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer-rank0.safetensors", "rng.safetensors", "state.json",
                                                      "weights"]
    assert sorted(p.name for p in (ckpt / "weights").iterdir()) == [".metadata.json", "__0_0.distcp"]  # no pickle
    a = (ref / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == (part / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    cfg = load_config("cpu-demo", over(ref, **eight))
    first, last = (_weights(ref / "checkpoints" / f"step-{n:06d}", cfg) for n in (1, 2))
    assert all(torch.equal(t, _weights(ckpt, cfg)["teacher"][k]) for k, t in last["teacher"].items())
    for k, t in last["teacher"].items():
        x = torch.lerp(first["teacher"][k].float(), last["student"][k], 1 - cfg.ema_decay)
        assert ((t.float() - x).abs() <= x.abs() * 2**-7).all(), k  # within bf16's spacing of the formula
    assert any(not torch.equal(t, torch.lerp(first["teacher"][k].float(), last["student"][k], 1 - cfg.ema_decay)
                               .bfloat16()) for k, t in last["teacher"].items())  # rounded stochastically
    # its state is quantized per GPU: another number of them is refused, with what to do
    codes = fork_job(2, _run, over(tmp_path / "two", steps=3, batch_size=2, **eight),
                     str(part / "checkpoints" / "step-000002"))
    assert codes == [2, 2]


def test_stochastic_rounding_is_unbiased_and_exact_where_bf16_is():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(1000).bfloat16().float()
    assert torch.equal(stochastic_round(exact, torch.bfloat16, gen).float(), exact)
    # an EMA step: 1e-4 of a change of 0.1, a tenth of bf16's spacing at 0.02 (1.2e-4): rounded to nearest, the
    # weight never moves; rounded stochastically, its mean moves by the right amount (the noise of the mean over
    # 200k weights: spacing / 2 / sqrt(200k) = 1.4e-7; the tolerance is 5 of those, the shift 1e-5)
    w = torch.full((200_000,), 0.02)
    target = w + 1e-4 * 0.1
    assert torch.equal(target.bfloat16(), w.bfloat16())
    for sign in (1, -1):
        got = stochastic_round(sign * target, torch.bfloat16, gen).float()
        assert got.mean().item() == pytest.approx(sign * target.mean().item(), abs=7e-7)
        cut = (sign * target[:1]).view(torch.int32) & -65536  # the bf16 below (in magnitude) and the one above
        neighbours = {cut.view(torch.float32).item(), (cut + 65536).view(torch.float32).item()}
        assert set(got.unique().tolist()) == neighbours
