"""Jobs of several processes on the CPU (gloo) for the tests, started two ways:

    fork_job(2, fn, *args)   forks this process: each child gets torchrun's environment (RANK, WORLD_SIZE,
                             LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and runs fn(*args) inside
                             distributed.launched(); cheap (the children share the parent's imports)
    torchrun(2, argv)        the real launcher, `python -m torch.distributed.run --standalone`, on
                             tests/dist_entry.py (what a user runs, signals and all; ~10 s to start here)
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, size: int, port: int, fn, args) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TORCHELASTIC_RUN_ID": f"test-{port}"})
    code = 0
    try:
        from lowvram_dopsd import distributed

        with distributed.launched():
            code = fn(*args) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        from lowvram_dopsd.distributed import exit_code_of

        traceback.print_exc()
        code = exit_code_of(exc)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fork_job(size: int, fn, *args, timeout: float = 120) -> list[int]:
    """Run fn(*args) on `size` forked ranks; their exit codes (a rank still running at `timeout`: None)."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, size, port, fn, args)) for r in range(size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def torchrun(nproc: int, argv: list[str], timeout: float = 120, env: dict | None = None, **kw
             ) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc tests/dist_entry.py argv` with its output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests" / "dist_entry.py"), *argv]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout, **kw)
