"""A small torchrun for tests and checks: start `world` processes on this machine, fail fast, never hang.

    spawn("nanoseek.parallel.selfcheck:check_dispatch", world=2, args=(...,), timeout_s=60)

Each process gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (a free port) and
NCCL_NVLS_ENABLE=0, then calls the function by its "module:name". The parent waits at most
`timeout_s`; as soon as one process fails, the others get `grace_s` to end on their own (their
collectives time out naming the failed peer) and are then killed. The error names each failed rank.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(target: str, rank: int, world: int, port: int, args: tuple, env: dict[str, str], errors: str) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
    module, _, name = target.partition(":")
    try:
        getattr(importlib.import_module(module), name)(*args)
    except BaseException as e:
        Path(errors, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(target: str, world: int, args: tuple = (), *, timeout_s: float = 120.0, grace_s: float = 20.0,
          env: dict[str, str] | None = None) -> None:
    """Run target(*args) in `world` processes; raise RuntimeError naming the ranks that failed or hung."""
    ctx = mp.get_context("spawn")
    errors = tempfile.mkdtemp(prefix="nanoseek-spawn-")  # one file per failed rank (a queue can be left
    # half-written by a killed process and block its reader)
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(target, r, world, port, args, env or {}, errors), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline, failed_at = time.time() + timeout_s, None
    while any(p.is_alive() for p in procs):
        now = time.time()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace_s):
            break
        time.sleep(0.05)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    messages = {int(f.stem[4:]): f.read_text() for f in Path(errors).glob("rank*.txt")}
    shutil.rmtree(errors, ignore_errors=True)
    bad = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if bad or hung:
        lines = [f"{target} on {world} processes failed: exit codes {bad}"
                 + (f"; ranks {hung} still running after the timeout were killed" if hung else "")]
        lines += [f"--- rank {r}:\n{text[-4000:]}" for r, text in sorted(messages.items())]
        raise RuntimeError("\n".join(lines))


def run_local(target: str, args: tuple[Any, ...] = ()) -> None:
    """Call target(*args) in this process as rank 0 of 1 (same environment as `spawn`)."""
    spawn(target, 1, args)
