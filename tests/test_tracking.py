"""log_with: what is checked before a run starts, and what W&B receives (its offline run files read back).
What TensorBoard gets, and how a resume purges the steps it redoes, is read back with TensorBoard's own
reader in test_resume.py."""
import sys

from lowvram_dopsd.cli import main


def test_a_missing_tensorboard_is_said_before_anything_is_loaded(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when the package is not installed
    out = tmp_path / "out"
    assert main(["train", "--preset", "cpu-demo", "--log-with", "tensorboard", "--images", str(tmp_path / "none"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and "log_with = 'none'" in err and "Traceback" not in err
    assert not out.exists()  # said before the model, the images or the output folder were touched


def test_a_missing_wandb_is_said_before_anything_is_loaded(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "out"
    assert main(["train", "--preset", "cpu-demo", "--log-with", "wandb", "--images", str(tmp_path / "none"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install wandb" in err and "lowvram-dopsd[wandb]" in err and "Traceback" not in err
    assert not out.exists()


def wandb_records(path):
    """The records of a W&B run file (run-<id>.wandb): LevelDB's log format (32 KiB blocks of chunks with a
    7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last) after W&B's 7-byte file header,
    each record a wandb_internal Record."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, part = open(path, "rb").read(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(part))
            part = b""
        elif kind == 0:
            break
    return records


def test_wandb_mirrors_the_run_and_a_resume_continues_the_same_run(tiny_zimage_dir, tiny_vlm_dir, demo_images,
                                                                   tmp_path, monkeypatch):
    """--log-with wandb, in W&B's offline mode: every step's numbers (those of metrics.jsonl) and the preview
    grids; --resume appends to the same run (the id kept in <output>/wandb)."""
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    args = ["train", "--preset", "cpu-demo", "--model", str(tiny_zimage_dir), "--teacher-encoder", str(tiny_vlm_dir),
            "--images", str(demo_images), "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
            "--rollout-steps", "2", "--train-states", "1", "--log-with", "wandb", "--set", "preview_every=2",
            "--set", "preview_prompts=sks ball"]
    assert main(args + ["--steps", "2"]) == 0
    assert main(args + ["--steps", "3", "--resume"]) == 0
    run_id = (out / "wandb" / "lowvram-dopsd-run-id").read_text()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {run.name.rsplit("-", 1)[1] for run in runs} == {run_id}  # one W&B run, resumed
    logged = {}
    for run in runs:
        for r in wandb_records(run / f"run-{run_id}.wandb"):
            if r.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                logged.setdefault(row["step"], {}).update(row)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(s for s in logged if any(k.startswith("loss/") for k in logged[s])) == [1, 2, 3]
    for m in metrics:
        assert logged[m["step"]]["loss/train"] == m["loss"] and logged[m["step"]]["train/lr"] == m["lr"]
    assert sorted(s for s in logged if "previews/path" in logged[s]) == [0, 2, 3]  # the grids, as previews/ holds them
