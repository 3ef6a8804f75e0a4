"""Processes joined by torch.distributed, started here (no launcher): standard library only, so
that bench/gpu.py runs on a machine with torch alone."""

from __future__ import annotations

import multiprocessing
import socket
from typing import Any


def run_ranks(target: Any, world: int, *args: Any, timeout: float = 3600) -> Any:
    """Run `target(rank, *args, address, out)` in `world` spawned processes that meet at a free
    local port (`address`, for torch.distributed); return what rank 0 puts on `out` (within
    `timeout` seconds). `target` must be importable (a module's top-level function)."""
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, address, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        result = out.get(timeout=timeout)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError(f"{target.__name__}: exit codes {[p.exitcode for p in procs]}")
    return result
