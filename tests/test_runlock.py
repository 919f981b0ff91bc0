"""runlock: one output folder, one run. Real processes hold and lose the lock (kill -9 included)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from lowvram_dopsd import runlock
from lowvram_dopsd.errors import UserError
from lowvram_dopsd.runlock import LOCK_FILE, hold

HOLDER = textwrap.dedent("""
    import sys, time
    from lowvram_dopsd.runlock import hold
    with hold(sys.argv[1], ["lowvram-dopsd", "train", "--images", "my [dog]", "--output", sys.argv[1]]):
        print("held", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of tmp_path/out: (process, folder)."""
    out = tmp_path / "out"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    yield child, out
    child.kill()
    child.wait()


def test_a_second_run_is_refused_naming_the_first(holder):
    child, out = holder
    with pytest.raises(UserError) as err:
        with hold(out, ["lowvram-dopsd", "train"]):
            pass
    msg = str(err.value)
    assert f"PID {child.pid} on {socket.gethostname()}" in msg and "started 20" in msg
    assert "lowvram-dopsd train --images 'my [dog]' --output" in msg  # its command, as typed
    assert f"kill {child.pid}" in msg and "--output" in msg and "\n" not in msg
    # following the advice: once that run has stopped, the folder is free
    child.terminate()
    child.wait()
    notes = []
    with hold(out, ["lowvram-dopsd", "train"], note=notes.append):
        pass
    assert len(notes) == 1 and f"no longer running (PID {child.pid} on {socket.gethostname()}, started" in notes[0]


def test_a_lock_left_by_kill_9_is_taken_over_with_a_note(holder):
    child, out = holder
    child.kill()  # SIGKILL: the record stays, the OS lock goes with the process
    child.wait()
    assert (out / LOCK_FILE).is_file()
    notes = []
    with hold(out, ["lowvram-dopsd", "train", "--resume"], note=notes.append) as lock:
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["command"] == "lowvram-dopsd train --resume"
        assert lock.holder.pid == os.getpid()
    assert len(notes) == 1 and f"PID {child.pid}" in notes[0] and "no longer running" in notes[0]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("how", ["returns", "raises", "ctrl-c"])
def test_the_lock_is_released_on_every_way_out(tmp_path, how):
    exc = {"returns": None, "raises": RuntimeError, "ctrl-c": KeyboardInterrupt}[how]
    try:
        with hold(tmp_path, ["x"]):
            assert (tmp_path / LOCK_FILE).is_file()
            if exc:
                raise exc
    except (RuntimeError, KeyboardInterrupt):
        pass
    assert not (tmp_path / LOCK_FILE).exists()
    notes = []
    with hold(tmp_path, ["y"], note=notes.append):  # no take-over note: it was released, not left behind
        pass
    assert notes == []


def _record(out, **changes):
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time() - 60,
              "command": "lowvram-dopsd train", "process_start": "", "torchrun": {}}
    record.update(changes)
    (out / LOCK_FILE).write_text(json.dumps(record))


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    parent = os.getppid()  # alive, but not the process that wrote the record: its start time differs
    _record(tmp_path, pid=parent, process_start="another boot:1")
    notes = []
    with hold(tmp_path, ["x"], note=notes.append):
        pass
    assert f"PID {parent}" in notes[0]


def test_without_an_os_lock_a_live_pid_keeps_the_folder(tmp_path, monkeypatch):
    """A file system without flock: the record alone decides, here naming a live process (our parent)."""
    monkeypatch.setattr(runlock, "fcntl", None)
    parent = os.getppid()
    _record(tmp_path, pid=parent, process_start=runlock._process_start(parent))
    with pytest.raises(UserError, match=f"in use by another run: PID {parent}"):
        with hold(tmp_path, ["x"]):
            pass
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _record(tmp_path, pid=int(gone.stdout), process_start="ended")  # a process that has ended (its PID reused or not)
    notes = []
    with hold(tmp_path, ["x"], note=notes.append):
        pass
    assert f"PID {gone.stdout.strip()}" in notes[0]


def test_a_lock_from_another_host_is_kept_while_it_beats_and_its_advice_works(tmp_path):
    _record(tmp_path, host="gpu-node-7", pid=4242, torchrun={"job": "j1", "world_size": 4})
    with pytest.raises(UserError) as err:
        with hold(tmp_path, ["x"]):
            pass
    msg = str(err.value)
    assert "PID 4242 on gpu-node-7 (torchrun job j1, 4 processes; rank 0)" in msg
    assert f"delete '{tmp_path / LOCK_FILE}'" in msg and "5 minutes" in msg
    (tmp_path / LOCK_FILE).unlink()  # what the message says to do
    with hold(tmp_path, ["x"]):
        pass
    _record(tmp_path, host="gpu-node-7", pid=4242)  # the other way out it names: a silent record goes stale
    old = time.time() - runlock.STALE_AFTER_S - 1
    os.utime(tmp_path / LOCK_FILE, (old, old))
    notes = []
    with hold(tmp_path, ["x"], note=notes.append):
        pass
    assert "PID 4242 on gpu-node-7" in notes[0]


def test_the_holder_beats_so_other_hosts_see_it_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with hold(tmp_path, ["x"]):
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_FILE, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 10


def test_only_rank_0_of_a_torchrun_job_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with hold(tmp_path, ["x"]) as lock:
        assert lock is None and not (tmp_path / LOCK_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    with hold(tmp_path, ["x"]) as lock:
        assert lock.holder.torchrun == {"job": "job42", "world_size": 2}
        assert "(torchrun job job42, 2 processes; rank 0)" in lock.holder.describe()


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="Cannot write to the output folder"):
        with hold(tmp_path / "missing", ["x"]):
            pass
