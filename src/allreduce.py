"""Same-host all-reduce through shared memory: a DDP communication hook for CPU workers.

When every DDP rank runs on one host, gloo still sums the gradients over TCP loopback: each
step's 1.6 MiB of the default network costs about 2.5 ms alone and 6.7 ms in place on 2 cores
(BENCHMARKS.md). Here each rank copies its share into a file in /dev/shm that all ranks map,
raises a flag, waits for the others' flags, and sums the slots itself: one copy in, one pass
out, no sockets.

- Every rank adds the slots in the same order (rank 0 first), so all ranks get the same bits.
  With 2 ranks the sum is gloo's, bit for bit (a + b = b + a); with more, the order may round
  differently from gloo's ring, never differently between ranks.
- Memory is bounded: tensors go through in chunks of `CHUNK_BYTES`, two slots per rank (calls
  alternate, so a rank may write call n+1 while another still reads call n).
- `connect` is collective and falls back (returns None on every rank) where the ranks cannot
  all map one file: ranks on several hosts, no /dev/shm (not Linux), or too little room in it.
  The file is unlinked as soon as every rank has it mapped, so nothing is left behind.
- x86-64 only: a rank raises its flag (an aligned 8-byte word) after its copy has returned,
  and x86 makes stores visible in program order, so a raised flag means the data is there.
  Weakly ordered CPUs (ARM) would need fences that Python does not offer: they fall back.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import time
import uuid
from typing import Any

import numpy as np
import torch

SHM_DIR = "/dev/shm"
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")
CHUNK_BYTES = 4 << 20  # per slot: 2 x world x this much shared memory in all
LINE = 64  # bytes per rank's flag: one cache line each, so ranks do not share a line
TIMEOUT_S = 1800.0  # as torch.distributed's default: a rank that never arrives is an error
SPIN_S = 0.002  # busy-wait this long (yielding the core), then sleep between checks


class SharedMemoryAllReduce:
    """Sum tensors over the ranks of one host through a shared memory map.

    Build it with `connect` (collective); `all_reduce` sums a tensor in place, and `hook` is
    the DDP communication hook (`ddp.register_comm_hook(reducer, reducer.hook)`).
    """

    def __init__(
        self,
        mapped: mmap.mmap,
        rank: int,
        world: int,
        chunk_bytes: int = CHUNK_BYTES,
        timeout: float = TIMEOUT_S,
    ) -> None:
        self.rank, self.world = rank, world
        self.chunk_bytes, self.timeout = chunk_bytes, timeout
        self._mapped = mapped
        words = np.frombuffer(mapped, dtype=np.int64, count=world * LINE // 8)
        self._flags = words.reshape(world, LINE // 8)[:, 0]  # a view: reads see other ranks
        data = np.frombuffer(mapped, dtype=np.uint8, offset=world * LINE)
        self._slots = torch.from_numpy(data).view(2, world, chunk_bytes)  # [call % 2][rank]
        self._calls = 0

    @staticmethod
    def size(world: int, chunk_bytes: int = CHUNK_BYTES) -> int:
        """Bytes of shared memory for `world` ranks."""
        return world * LINE + 2 * world * chunk_bytes

    @classmethod
    def connect(
        cls,
        group: Any = None,
        chunk_bytes: int = CHUNK_BYTES,
        folder: str = SHM_DIR,
        timeout: float = TIMEOUT_S,
    ) -> SharedMemoryAllReduce | None:
        """Collective over `group` (default: the whole world): map one shared file on every rank,
        or return None on every rank when any of them cannot (then keep the process group's):
        ranks on other hosts, no `folder` or too little room in it, or not an x86-64 CPU."""
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        size = cls.size(world, chunk_bytes)
        path = [_create(folder, size) if rank == 0 and ORDERED_STORES else None]
        dist.broadcast_object_list(path, group=group, group_src=0)
        mapped = _map(path[0], size) if path[0] and ORDERED_STORES else None
        ok: list[Any] = [None] * world
        dist.all_gather_object(ok, mapped is not None, group=group)  # also: all ranks have mapped
        if rank == 0 and path[0]:
            with contextlib.suppress(OSError):
                os.unlink(path[0])
        if not all(ok):
            if mapped is not None:
                mapped.close()
            return None
        return cls(mapped, rank, world, chunk_bytes, timeout)

    def all_reduce(self, tensor: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        """Sum a contiguous CPU tensor over all ranks, in place; every rank calls it in turn.
        With a `divisor`, each rank's tensor is divided by it on its way into the shared slot
        (the sum of the quotients, in one pass over the tensor instead of two)."""
        if self.world == 1:
            return tensor.div_(divisor) if divisor != 1 else tensor
        flat = tensor.view(-1)
        step = self.chunk_bytes // flat.element_size()
        for start in range(0, flat.numel(), step):
            part = flat[start : start + step]
            self._calls += 1
            nbytes = part.numel() * part.element_size()
            slots = self._slots[self._calls % 2, :, :nbytes].view(part.dtype)  # (world, n)
            if divisor != 1:
                torch.div(part, divisor, out=slots[self.rank])
            else:
                slots[self.rank].copy_(part)
            self._flags[self.rank] = self._calls
            self._wait(self._calls)
            torch.add(slots[0], slots[1], out=part)
            for k in range(2, self.world):
                part.add_(slots[k])
        return tensor

    def hook(self, state, bucket):  # unannotated: DDP rejects string annotations on a hook
        """DDP communication hook: average the bucket's gradients as DDP's default does (divide
        by the world size, then sum), synchronously; `state` is unused (the reducer is bound).
        Returns a completed torch.futures.Future of the bucket's buffer."""
        buffer = bucket.buffer()
        self.all_reduce(buffer, divisor=self.world)
        future = torch.futures.Future()
        future.set_result(buffer)
        return future

    def _wait(self, call: int) -> None:
        """Until every rank has raised its flag to `call`: spin (yielding) briefly, then sleep."""
        start = time.monotonic()
        pause = 0.0
        while not (self._flags >= call).all():
            now = time.monotonic()
            if now - start > self.timeout:
                late = [k for k in range(self.world) if self._flags[k] < call]
                raise RuntimeError(
                    f"shared-memory all-reduce: rank(s) {late} did not arrive within "
                    f"{self.timeout:g} s (call {call})"
                )
            if now - start < SPIN_S:
                os.sched_yield()
            else:
                pause = min(max(pause * 2, 5e-5), 1e-3)
                time.sleep(pause)

    def close(self) -> None:
        """Unmap the shared memory (tensors from `all_reduce` are the callers' own)."""
        self._slots = None  # type: ignore[assignment]
        self._flags = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):
            self._mapped.close()


def _create(folder: str, size: int) -> str | None:
    """A new file of `size` bytes in `folder` with its room reserved (so writing to the map
    cannot fail later with SIGBUS on a full tmpfs); None where that is not possible."""
    path = os.path.join(folder, f"cnn-allreduce-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, size)
    except (OSError, AttributeError):
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None
    os.close(fd)
    return path


def _map(path: str, size: int) -> mmap.mmap | None:
    """Map `path` (made by rank 0) read-write, or None where this rank cannot see it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        return mmap.mmap(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)
