"""Jobs of several processes on the CPU (gloo) for the tests, without torchrun's start-up (~10 s here):

    fork_job(2, fn, *args)   forks this process: each child gets the environment torchrun gives a rank
                             (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and runs fn(*args)
                             inside distributed.launched(); the children share the parent's imports

As under torchrun, the job's store is served by the launcher (this process), not by rank 0: it is bound to a
port the system picks (no free port guessed, then taken by another test job before rank 0 binds it), and it
outlives rank 0, so a rank that fails after rank 0 has exited still reads rank 0's exit code from it.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(rank: int, size: int, port: int, fn, args) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "TORCHELASTIC_USE_AGENT_STORE": "True",  # every rank a client of the launcher's store
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
    import torch.distributed as dist

    ctx = multiprocessing.get_context("fork")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    procs = [ctx.Process(target=_child, args=(r, size, store.port, fn, args)) for r in range(size)]
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
    del store  # every rank has exited: the job's store closes
    return codes
