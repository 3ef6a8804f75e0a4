"""The same-host shared-memory all-reduce (src/allreduce.py): real processes joined by
torch.distributed (gloo), its sums against gloo's, DDP training through it, and its fallbacks."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from bench.common import run_ranks
from src.allreduce import ORDERED_STORES, SharedMemoryAllReduce
from src.config import parse_params
from src.train import Comm, ddp_options, loop_spec, make_loop, run_epochs

needs_x86 = pytest.mark.skipif(not ORDERED_STORES, reason="shared-memory all-reduce: x86-64 only")
SIZES = (1, 1000, 70_001, 421_738)  # 70,001 floats: 3 chunks of 128 KiB (2 slots reused)
CHUNK = 128 << 10


def _join(rank: int, world: int, address: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)


def _sums_rank(rank: int, world: int, folder: str, address: str, out) -> None:
    """Each size: gloo's sum, the shared-memory sum, the latter as every rank got it."""
    _join(rank, world, address)
    try:
        shared = SharedMemoryAllReduce.connect(chunk_bytes=CHUNK, folder=folder)
        left = os.listdir(folder)  # after connect: the file is already unlinked
        results = []
        for n in SIZES:
            x = torch.randn(n, generator=torch.Generator().manual_seed(1000 * rank + n))
            by_gloo = x.clone()
            dist.all_reduce(by_gloo)
            mine = shared.all_reduce(x.clone())
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            inputs = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(inputs, x)
            results.append(
                (by_gloo.numpy(), [t.numpy() for t in every], [t.numpy() for t in inputs])
            )
        shared.close()
        if rank == 0:
            out.put((results, left))
    finally:
        dist.destroy_process_group()


@needs_x86
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_sums_are_gloos_and_the_same_on_every_rank(world, tmp_path):
    results, left = run_ranks(_sums_rank, world, world, str(tmp_path), timeout=240)
    assert left == []  # nothing left behind once every rank has mapped it
    for (by_gloo, every, inputs), n in zip(results, SIZES, strict=True):
        for got in every[1:]:
            np.testing.assert_array_equal(got, every[0], err_msg=str(n))  # same bits on all ranks
        ordered = inputs[0].copy()
        for x in inputs[1:]:
            ordered += x  # rank 0's first, as every rank adds them
        np.testing.assert_array_equal(every[0], ordered)
        if world == 2:
            np.testing.assert_array_equal(every[0], by_gloo)  # a + b = b + a: gloo's exactly
        else:
            np.testing.assert_allclose(every[0], by_gloo, rtol=1e-5, atol=1e-6)  # rounding only


def _fallback_rank(rank: int, folder: str, address: str, out) -> None:
    _join(rank, 2, address)
    try:
        shared = SharedMemoryAllReduce.connect(folder=folder)
        if rank == 0:
            out.put(shared is None)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_connect_falls_back_on_every_rank_where_there_is_no_shared_folder(tmp_path):
    assert run_ranks(_fallback_rank, 2, str(tmp_path / "missing"), timeout=100)


def test_a_rank_that_never_arrives_is_a_clear_error(tmp_path):
    size = SharedMemoryAllReduce.size(2, CHUNK)
    path = tmp_path / "map"
    path.write_bytes(bytes(size))
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), size)
    shared = SharedMemoryAllReduce(mapped, rank=0, world=2, chunk_bytes=CHUNK, timeout=0.2)
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not arrive within 0.2 s"):
        shared.all_reduce(torch.ones(10))


def test_one_bucket_only_for_cpu_ranks_that_share_a_host_and_its_memory():
    cpu = torch.device("cpu")
    assert ddp_options(cpu, shared_memory=True, one_host=True)["bucket_cap_mb"] == 25
    for device, shared, one_host in ((cpu, False, True), (cpu, True, False), ("cuda", True, True)):
        options = ddp_options(torch.device(device), shared_memory=shared, one_host=one_host)
        assert "bucket_cap_mb" not in options  # DDP's default buckets: 1 MiB first, then 25 MiB
        assert options["gradient_as_bucket_view"]


def _train_rank(rank: int, raw: dict, images, labels, address: str, out) -> None:
    """The workers' loop (make_loop + run_epochs, DDP with the stage's options) for 2 epochs."""
    _join(rank, 2, address)
    try:
        params = parse_params(raw)
        meta = {"num_originals": len(labels), "num_train": len(labels), "augment_copies": 0,
                "channels": 1, "image_size": images.shape[1], "num_classes": 10,
                "class_names": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}  # fmt: skip
        comm = Comm(rank, 2, torch.device("cpu"))
        cpu = torch.device("cpu")
        options = ddp_options(cpu, params.train.shared_memory_allreduce, one_host=True)
        wrap = lambda net: torch.nn.parallel.DistributedDataParallel(net, **options)  # noqa: E731
        loop = make_loop(loop_spec(params, meta), images, labels, comm, cpu, wrap=wrap)
        history = run_epochs(loop, comm)
        if rank == 0:
            weights = {k: v.numpy() for k, v in loop.net.state_dict().items()}
            hooks = loop.model._comm_hooks  # [(SharedMemoryAllReduce.hook, state)] or []
            exchanges = hooks[0][0].__self__._calls if hooks else None
            steps = loop.scheduler.last_epoch  # stepped once a batch
            out.put((loop.allreduce, (exchanges, steps), history, weights))  # numpy: not shared
    finally:
        dist.destroy_process_group()


@needs_x86
@pytest.mark.timeout(300)
def test_ddp_trains_through_shared_memory_exactly_as_through_gloo(raw_params):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (512, 12, 12, 1), dtype=np.uint8)  # NHWC, as preprocess writes
    labels = rng.integers(0, 10, 512).astype(np.int64)
    # fc 4096: 455k gradients (1.8 MB), more than DDP's default first bucket (1 MiB) holds,
    # less than a chunk of the shared-memory slots (so one bucket is one exchange)
    raw_params["model"]["layers"] = [{"conv": 4, "kernel": 3, "batch_norm": True},
                                     {"pool": "max", "size": 2}, {"fc": 4096}]  # fmt: skip
    runs = {}
    for shared in (True, False):
        raw_params["train"].update(
            num_workers=2, epochs=2, batch_size=64, shared_memory_allreduce=shared
        )
        runs[shared] = run_ranks(_train_rank, 2, raw_params, images, labels, timeout=240)
    (way, counts, history, weights), (gloo_way, _, gloo_history, gloo_weights) = runs.values()
    assert (way, gloo_way) == ("shared memory", "gloo")
    exchanges, steps = counts
    # one bucket: one exchange (one wait) a step, where DDP's default buckets make 2
    assert steps > 1 and exchanges == steps
    numbers = [{k: v for k, v in e.items() if "sec" not in k} for e in history]
    assert numbers == [{k: v for k, v in e.items() if "sec" not in k} for e in gloo_history]
    for key, value in weights.items():
        np.testing.assert_array_equal(value, gloo_weights[key], err_msg=key)  # after 2 epochs
