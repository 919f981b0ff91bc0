import torch
from safetensors.torch import load_file

from lowvram_dopsd.cache import FeatureCache, atomic_save_safetensors, key_for


def test_key_changes_with_every_input():
    base = key_for("student", {"enc": 1}, "a dog", None)
    assert base == key_for("student", {"enc": 1}, "a dog", None)
    assert len({base, key_for("teacher", {"enc": 1}, "a dog", None), key_for("student", {"enc": 2}, "a dog", None),
                key_for("student", {"enc": 1}, "a cat", None), key_for("student", {"enc": 1}, "a dog", "ab")}) == 5


def test_second_lookup_hits_and_only_missing_are_computed(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return [{"cap": torch.full((2, 3), float(i))} for i in idx]

    keys = [key_for("s", {}, c, None) for c in ("a", "b", "c")]
    first = cache.get_or_compute(keys, compute)
    assert calls == [[0, 1, 2]] and torch.equal(first[2]["cap"], torch.full((2, 3), 2.0))
    again = cache.get_or_compute(keys, compute)
    assert calls == [[0, 1, 2]] and torch.equal(again[1]["cap"], first[1]["cap"])
    keys[1] = key_for("s", {}, "b changed", None)
    cache.get_or_compute(keys, compute)
    assert calls[-1] == [1]


def test_damaged_cache_file_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    key = key_for("s", {}, "a", None)
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(b"not safetensors")
    out = cache.get_or_compute([key], lambda idx: [{"cap": torch.ones(1)}])
    assert torch.equal(out[0]["cap"], torch.ones(1))


def test_atomic_save_leaves_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    atomic_save_safetensors({"a": torch.ones(2)}, path)
    import lowvram_dopsd.cache as cache_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "save_file", boom)
    try:
        atomic_save_safetensors({"a": torch.zeros(2)}, path)
    except OSError:
        pass
    from safetensors.torch import load_file
    assert torch.equal(load_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left behind


def test_a_real_failed_write_is_an_oserror(tmp_path):
    """safetensors (0.8) reports a failed write as its own SafetensorError: callers catch OSError (and
    say "free some space", or skip a step LoRA and go on), so it must arrive as one. The write fails
    for real here: a file-size limit makes the kernel refuse it (EFBIG), as a full disk would (ENOSPC)."""
    import errno
    import resource
    import signal

    import pytest

    path = tmp_path / "x.safetensors"
    atomic_save_safetensors({"a": torch.ones(2)}, path)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))
    try:
        with pytest.raises(OSError) as exc:
            atomic_save_safetensors({"a": torch.zeros(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    assert exc.value.errno == errno.EFBIG
    assert torch.equal(load_file(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_a_large_precompute_is_cached_chunk_by_chunk_and_continues_where_it_stopped(tmp_path):
    """A stopped precompute (here: the encoder fails in the third chunk) keeps what it encoded; the next run
    encodes only the rest, and says how far it is."""
    import pytest

    from lowvram_dopsd import conditions

    cache, calls, done = FeatureCache(tmp_path), [], []
    keys = [key_for("student", {}, f"caption {i}", None) for i in range(5)]

    def encode(idx, fail_at=None):
        calls.append(list(idx))
        if fail_at in idx:
            raise RuntimeError("the encoder died")
        return [{"cap": torch.full((2,), float(i))} for i in idx]

    with pytest.raises(RuntimeError):
        cache.get_or_compute(keys, lambda idx: encode(idx, fail_at=4), chunk=2,
                             progress=lambda d, n: done.append((d, n)))
    assert calls == [[0, 1], [2, 3], [4]] and done == [(2, 5), (4, 5)]
    calls.clear()
    again = FeatureCache(tmp_path)
    out = again.get_or_compute(keys, encode, chunk=2)
    assert calls == [[4]] and (again.hits, again.misses) == (4, 1)
    assert [float(c["cap"][0]) for c in out] == [0, 1, 2, 3, 4]
    notes = []
    conditions.Progress("teacher conditions", notes.append)(conditions.ENCODE_CHUNK, 3 * conditions.ENCODE_CHUNK)
    assert notes and notes[0].startswith(f"encoded {conditions.ENCODE_CHUNK}/{3 * conditions.ENCODE_CHUNK} teacher")
