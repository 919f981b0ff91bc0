"""Jobs of several processes on the CPU (gloo) for the tests, without torchrun's start-up (~10 s here):

    fork_job(2, fn, *args)   forks this process: each child gets the environment torchrun gives a rank
                             (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and runs fn(*args)
                             inside distributed.launched(); the children share the parent's imports
"""
from __future__ import annotations

import multiprocessing
import os
import socket
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
