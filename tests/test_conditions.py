"""conditions.py: every caption of an item is encoded (student and teacher), and each roll-out draws
one of them with the run's seed; on the toy world (the shipped model), where this takes seconds."""
import io
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from lowvram_dopsd.config import load_config
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.guard import RunGuard
from lowvram_dopsd.train import draw_batch, setup, train

TOY = Path(__file__).resolve().parent.parent / "lowvram_dopsd" / "assets" / "toy"


def _concept(tmp_path: Path, variants: dict[str, str]) -> Path:
    folder = tmp_path / "concept"
    shutil.copytree(TOY / "concept", folder)
    for stem, extra in variants.items():
        path = folder / f"{stem}.txt"
        path.write_text(path.read_text().strip() + "\n" + extra + "\n")
    return folder


def _cfg(tmp_path, images, out="out", **kw):
    return load_config("toy", {"model": str(TOY / "model"), "images": str(images), "output": str(tmp_path / out),
                               "cache_dir": str(tmp_path / "cache"), "seed": 0, "preview_every": 0, **kw})


def _quiet():
    return Console(file=io.StringIO(), width=120)


def test_each_caption_of_an_item_is_encoded_and_one_is_drawn_per_roll_out(tmp_path):
    images = _concept(tmp_path, {"00": "a small red sks at the top on black background",
                                 "01": "a large blue sks at the left on white background"})
    with RunGuard(None, None) as guard:  # setup takes the output folder's lock, as train() does
        run = setup(_cfg(tmp_path, images, steps=40), console=_quiet(), guard=guard)
    first = run.ds.items[0]
    assert first.other_captions == ("a small red sks at the top on black background",)
    (s1, t1), = run.conds.others[0]
    assert not torch.equal(s1["cap"], run.conds.student[0]["cap"])  # its own caption ...
    assert not torch.equal(t1["cap"], run.conds.teacher[0]["cap"])  # ... read beside the same image
    assert run.conds.others[2] == []  # one caption: nothing to draw
    assert run.cache.misses == 2 * (len(run.ds) + 2)  # student and teacher, every caption once

    def drawn(r):  # which caption each roll-out of items 0 and 1 used, over 30 steps
        seen = []
        for _ in range(30):
            for rollout in draw_batch(r):
                for c in rollout.c_s:
                    seen += [k for k, conds in enumerate((r.conds.student[:2], [o[0][0] for o in r.conds.others[:2]]))
                             if any(c is x for x in conds)]
        return seen

    seen = drawn(run)
    assert seen.count(0) > 5 and seen.count(1) > 5  # both captions of these items are drawn
    with RunGuard(None, None) as guard:
        again = setup(_cfg(tmp_path, images, out="out2", steps=40), console=_quiet(), guard=guard)
    assert again.cache.misses == 0 and drawn(again) == seen  # the run's seed decides the draws


def test_a_run_with_caption_variants_resumes_exactly_and_refuses_changed_ones(tmp_path):
    images = _concept(tmp_path, {"00": "a small red sks at the top on black background"})
    straight = train(_cfg(tmp_path, images, out="a", steps=4), console=_quiet())
    train(_cfg(tmp_path, images, out="b", steps=2, save_every=2), console=_quiet())
    resumed = train(_cfg(tmp_path, images, out="b", steps=4, save_every=2), console=_quiet(), resume="latest")
    a, b = straight.lora.tensors("student"), resumed.lora.tensors("student")
    assert all(torch.equal(a[k], b[k]) for k in a)
    (images / "00.txt").write_text((images / "00.txt").read_text().replace("red", "green"))
    with pytest.raises(UserError):
        train(_cfg(tmp_path, images, out="b", steps=6, save_every=2), console=_quiet(), resume="latest")


def test_a_large_precompute_is_cached_chunk_by_chunk_says_how_far_and_continues(tmp_path, monkeypatch):
    """conditions.ENCODE_CHUNK at a time (2 here), each chunk cached before the next is encoded: a precompute
    stopped in its second chunk keeps the first, the next run encodes only the rest, and the run says how far
    the encoding is after each chunk."""
    from lowvram_dopsd import conditions
    from lowvram_dopsd.families.toy import Toy

    monkeypatch.setattr(conditions, "ENCODE_CHUNK", 2)
    real, calls = Toy.encode_teacher, []

    def encode(self, items, *args, dies=False):
        calls.append(len(items))
        if dies and len(calls) == 2:
            raise RuntimeError("the encoder died")
        return real(self, items, *args)

    monkeypatch.setattr(Toy, "encode_teacher", lambda self, items, *a: encode(self, items, *a, dies=True))
    shown = io.StringIO()
    with pytest.raises(RuntimeError, match="the encoder died"), RunGuard(None, None) as guard:
        setup(_cfg(tmp_path, TOY / "concept", steps=1), console=Console(file=shown, width=200), guard=guard)
    assert calls == [2, 2]
    assert "encoded 2/6 vlm teacher conditions" in shown.getvalue()
    calls.clear()
    monkeypatch.setattr(Toy, "encode_teacher", encode)
    with RunGuard(None, None) as guard:
        run = setup(_cfg(tmp_path, TOY / "concept", steps=1), console=_quiet(), guard=guard)
    assert calls == [2, 2]  # the 4 the stopped precompute had not stored
    assert len(run.conds.teacher) == 6
