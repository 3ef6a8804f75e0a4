"""Item 1: the training loop through Ray Train (the train stage's own code: `src.ray_driver.run_ray`,
TorchTrainer + per-epoch report and checkpoint) against the plain single-process loop
(`src.loop.run_local`) on the same model, data, global batch and thread count; and 2 workers x
1 thread against 1 worker x 2 threads. plain2 runs the 2 workers' DDP loop without Ray (2 processes
joined by torch.distributed alone): ray2/plain2 is what Ray costs 2 workers, plain2/plain what
DDP over 2 processes gains or loses on its own.

Throughput is per epoch, excluding Ray's start-up (reported separately):
  epoch_ips  training images / wall time between consecutive epoch ends (epochs 2..E), i.e. the
             training pass + validation + (Ray) report and checkpoint. Plain: the time of each
             on_epoch call; Ray: the modification time of each epoch's persisted checkpoint.
  loop_ips   the training pass alone (history's images_per_sec, epochs 2..E).
  fixed_s    fit wall time minus E epochs at the median epoch time (start-up and shutdown).
Variants run in turn, plain ray1 ray2 plain2 plain2 ray2 ray1 plain ... (every other round
reversed), each in a fresh Ray instance (`ray_session`; the plain loops beside an idle one), as
each train stage starts its own: a long-lived instance grows busier with every fit (its log
monitor scans every finished worker's log files, and Train's autoscaling coordinator, a detached
actor, stays).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Alternation, CpuTimeline, cpu_scaling, cpus, median
from bench.ranks import run_ranks
from src.config import Params, parse_params
from src.preprocess import Processed

VARIANTS = {  # name: (workers, threads per worker)
    "plain": (1, 2),
    "ray1": (1, 2),
    "ray2": (2, 1),
    "plain2": (2, 1),  # ray2's DDP loop in 2 processes of torch.distributed (gloo), no Ray
}
PLAIN_DDP = "plain-ddp"  # the process name of plain2's processes (at most 15 characters)


def subset(processed: Processed, n: int) -> Processed:
    """The first n training rows (of data preprocessed with augment_copies 0) as a Processed."""
    if processed.meta["augment_copies"] != 0:
        raise ValueError("subset needs data preprocessed with augment_copies 0")
    n = min(n, len(processed.train_labels))
    meta = dict(processed.meta, num_train=n, num_originals=n)
    return Processed(
        np.array(processed.train_images[:n]), np.array(processed.train_labels[:n]),
        processed.test_images, processed.test_labels, meta,
    )  # fmt: skip


def variant_params(raw: dict[str, Any], workers: int, threads: int, epochs: int) -> Params:
    """`raw` params with the variant's scaling; every checkpoint kept (their times are read)."""
    raw = copy.deepcopy(raw)
    raw["train"].update(num_workers=workers, cpus_per_worker=threads, epochs=epochs, use_gpu=False)
    raw["run"].update(keep_checkpoints=epochs, max_failures=0)
    return parse_params(raw)


def _rates(history: list[dict[str, Any]], ends: list[float], wall: float) -> dict[str, Any]:
    images = [e["images_per_sec"] * e["epoch_seconds"] for e in history]
    intervals = np.diff(ends).tolist()  # epoch 2..E
    per_epoch = median(intervals)
    return {
        "epoch_ips": median(images[1:]) / per_epoch,
        "loop_ips": median([e["images_per_sec"] for e in history[1:]]),
        "epoch_s": per_epoch,
        "train_pass_s": median([e["epoch_seconds"] for e in history[1:]]),
        "fixed_s": wall - len(history) * per_epoch,
        "wall_s": wall,
        "val_accuracy": history[-1]["val_accuracy"],
    }


def ray_cpu(timeline: CpuTimeline, ends: list[float], trainer: str) -> dict[str, Any]:
    """Who used the CPUs between the first and the last epoch end: the `trainer` processes
    (the RayTrainWorkers, or the driver for the plain loop) and Ray's own processes (raylet,
    GCS, the Train controller and its helper actors, idle workers), each as a share of the
    machine's CPUs; how often per second a trainer process was preempted (involuntary context
    switches, summed over its threads; per process), and how long its threads waited for a CPU
    while runnable (seconds per second, summed over its threads; per process); and how many CPUs
    its compute threads (those that ran over a quarter of the time: the training thread and its
    OpenMP partners) held, summed over the trainer processes; and the shares of the machine's
    CPU time that no process used (idle_share) or the hypervisor took (steal_share)."""
    wall, used, switches, waits = timeline.used(ends[0], ends[-1])
    wall = max(wall, 1e-9)
    compute = [c for c in timeline.thread_cpu(ends[0], ends[-1], trainer) if c > wall / 4]
    total = wall * cpus()
    workers = sum(v for k, v in used.items() if trainer in k)
    helpers = {
        k: v / total
        for k, v in used.items()
        if trainer not in k and k != CpuTimeline.DRIVER and v > 0
    }
    n = max(1, timeline.count(ends[-1], trainer))
    idle = timeline.idle(ends[0], ends[-1])
    return {
        "idle_share": idle["idle"],
        "steal_share": idle["steal"],
        "worker_share": workers / total,
        "ray_share": sum(helpers.values()),
        "ray_processes": dict(sorted(helpers.items(), key=lambda kv: -kv[1])),
        "preemptions_per_s": sum(v for k, v in switches.items() if trainer in k) / n / wall,
        "waiting_s_per_s": sum(v for k, v in waits.items() if trainer in k) / n / wall,
        "compute_cpus": sum(compute) / wall,
    }


def _with_cpu(rates: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """A run's rates and CPU use, and its epoch images per second of its compute threads' CPU
    time (0 where the kernel keeps no per-thread run times)."""
    per_cpu = rates["epoch_ips"] / cpu["compute_cpus"] if cpu["compute_cpus"] else 0.0
    return {**rates, **cpu, "ips_per_cpu": per_cpu}


def _measured(
    trainer: str, train: Callable[[], tuple[list[dict[str, Any]], list[float]]]
) -> dict[str, Any]:
    """One run in a Ray instance of its own, started as the stage starts one (`ray_session`):
    `train()` returns (history, epoch end times); its rates (see the module docstring), who used
    the CPUs meanwhile (`ray_cpu`, the `trainer` processes against the rest) and the instance's
    start-up time (ray_init_s, not in the rates)."""
    from src.ray_driver import ray_session

    start = time.time()
    with ray_session():
        ray_init_s = time.time() - start
        start = time.time()
        with CpuTimeline(threads_of=trainer) as timeline:
            history, ends = train()
        wall = time.time() - start
    cpu = ray_cpu(timeline, ends, trainer)
    return {**_with_cpu(_rates(history, ends, wall), cpu), "ray_init_s": ray_init_s}


def run_plain(params: Params, data: Processed) -> dict[str, Any]:
    """One plain-loop run beside a fresh, idle Ray instance (`_measured`)."""
    from src.loop import run_local

    def train() -> tuple[list[dict[str, Any]], list[float]]:
        ends: list[float] = []
        history = run_local(params, data, on_epoch=lambda *a: ends.append(time.time()))
        return history, ends

    return _measured(CpuTimeline.DRIVER, train)


def model_parameters(params: Params, data: Processed) -> int:
    """How many parameters (and so gradient values each DDP step all-reduces) the model has."""
    from src.loop import loop_spec
    from src.model import CNN, CNNConfig

    net = CNN(CNNConfig(**loop_spec(params, data.meta).model))
    return sum(p.numel() for p in net.parameters())


def _set_process_name(name: str) -> None:
    """This process's name as ps and psutil show it (Linux; elsewhere nothing changes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _plain_ddp_rank(rank: int, params: Params, data: Processed, address: str, out: Any) -> None:
    """One rank of plain2: the Ray worker's loop (`run_epochs` over DDP with the same options,
    `src.ray_driver.ddp_options`) in a process of its own, joined by torch.distributed (gloo) alone.
    Rank 0 puts (history, epoch end times) on `out`."""
    import functools

    import torch
    import torch.distributed as dist

    from src.loop import Comm, loop_spec, make_loop, run_epochs
    from src.ray_driver import ddp_options

    _set_process_name(PLAIN_DDP)
    world, device = params.train.num_workers, torch.device("cpu")
    torch.set_num_threads(params.train.cpus_per_worker)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        comm = Comm(rank, world, device)
        wrap = functools.partial(torch.nn.parallel.DistributedDataParallel, **ddp_options())
        images, labels = np.array(data.train_images), np.array(data.train_labels)
        loop = make_loop(loop_spec(params, data.meta), images, labels, comm, device, wrap=wrap)
        ends: list[float] = []
        history = run_epochs(loop, comm, on_epoch=lambda *a: ends.append(time.time()))
        if rank == 0:
            out.put((history, ends))
    finally:
        dist.destroy_process_group()


def run_plain_ddp(params: Params, data: Processed) -> dict[str, Any]:
    """One plain2 run (train.num_workers processes, spawned) beside a fresh, idle Ray instance
    (`_measured`); its fixed time includes the processes' start."""
    return _measured(
        PLAIN_DDP, lambda: run_ranks(_plain_ddp_rank, params.train.num_workers, params, data)
    )


def _allreduce_rank(rank: int, numel: int, calls: int, address: str, out: Any) -> None:
    """One rank of `allreduce_seconds`; rank 0 puts the median seconds of a call on `out`."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    try:
        grads = torch.ones(numel)
        for _ in range(10):  # warm-up: connections, buffers
            dist.all_reduce(grads)
        seconds = []
        for _ in range(calls):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(grads)
            seconds.append(time.perf_counter() - start)
        if rank == 0:
            out.put(median(seconds))
    finally:
        dist.destroy_process_group()


def allreduce_seconds(numel: int, calls: int = 200) -> float:
    """Median seconds of one gloo all-reduce (TCP loopback) of `numel` float32 (a step's
    gradients) between 2 processes on this machine (1 thread each, nothing else running)."""
    return run_ranks(_allreduce_rank, 2, numel, calls)


def _steps_rank(
    rank: int, params: Params, data: Processed, steps: int, address: str, out: Any
) -> None:
    """One of `lockstep_cost`'s 2 processes: `steps` training steps of the loop's code (1
    thread, `params`' batch, no DDP), timed one by one after 5 to warm up; rank 0 puts both
    ranks' step seconds on `out`."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from src.loop import Comm, epoch_batches, epoch_rows, loop_spec, make_loop, train_epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    try:
        device, spec = torch.device("cpu"), loop_spec(params, data.meta)
        images, labels = np.array(data.train_images), np.array(data.train_labels)
        loop = make_loop(spec, images, labels, Comm(0, 1, device), device)
        batches: list[np.ndarray] = []
        for epoch in range(1, spec.train["epochs"] + 1):
            rows = epoch_rows(loop.train_rows, epoch, spec)
            batches += epoch_batches(rows, epoch, spec.seed, 0, 1, loop.batch_size)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.train["label_smoothing"])
        args = (loop.optimizer, loop.scheduler, loss_fn, loop.autocast, loop.scaler)
        train_epoch(loop.model, loop.data, batches[:5], *args)
        dist.barrier()  # both start together, then run free: nothing is exchanged
        marks = [time.perf_counter()]
        hook = lambda _: marks.append(time.perf_counter())  # noqa: E731
        train_epoch(loop.model, loop.data, batches[5 : 5 + steps], *args, on_step=hook)
        both: list[Any] = [None, None]
        dist.all_gather_object(both, np.diff(marks).tolist())
        if rank == 0:
            out.put(both)
    finally:
        dist.destroy_process_group()


def lockstep_cost(raw: dict[str, Any], data: Processed, steps: int = 400) -> dict[str, Any]:
    """What 2 DDP ranks lose to waiting for each other on this machine before any exchange:
    2 processes run ray2's per-rank step (1 thread, half the batch) side by side, each on its
    own (no DDP), timing every step. In lockstep each step would last as long as the slower
    rank's; `lockstep` = the mean of the per-step maximum over the mean step, minus 1. Also the
    steps' spread (`cv`: standard deviation over mean) and how slowly it moves (`lag1`: the
    correlation of consecutive steps), averaged over the 2 processes."""
    half = raw["train"]["batch_size"] // 2
    steps_per_epoch = max(1, len(data.train_labels) // half)
    epochs = -(-(steps + 5) // steps_per_epoch) + 1  # enough for the warm-up and the steps
    params = variant_params({**raw, "train": {**raw["train"], "batch_size": half}}, 1, 1, epochs)
    a, b = (np.array(x) for x in run_ranks(_steps_rank, 2, params, data, steps))
    mean = (a.mean() + b.mean()) / 2  # both ranks ran the same `steps` batches
    return {
        "steps": len(a),
        "batch_size": half,
        "step_s": float(mean),
        "cv": float((a.std() / a.mean() + b.std() / b.mean()) / 2),
        "lag1": float(np.mean([np.corrcoef(x[:-1], x[1:])[0, 1] for x in (a, b)])),
        "lockstep": float(np.maximum(a, b).mean() / mean - 1),
    }


def checkpoint_times(storage: Path) -> list[float]:
    """When each epoch's checkpoint was persisted (Ray reports them in epoch order)."""
    files = sorted(storage.glob("*/checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    return [p.stat().st_mtime for p in files]


def run_on_ray(params: Params, data: Processed, scratch: Path) -> dict[str, Any]:
    """One Ray Train run in a fresh Ray instance (fresh run folder under `scratch`): its
    rates; the instance's start-up is not in them."""
    from src.ray_driver import run_ray

    storage = Path(tempfile.mkdtemp(dir=scratch))

    def train() -> tuple[list[dict[str, Any]], list[float]]:
        history = run_ray(params, data, storage)
        ends = checkpoint_times(storage)
        if len(ends) != len(history):
            raise RuntimeError(
                f"expected {len(history)} checkpoints in {storage}, found {len(ends)}"
            )
        return history, ends

    return _measured("RayTrainWorker", train)


def measure(
    raw: dict[str, Any],
    data: Processed,
    scratch: Path,
    *,
    epochs: int = 4,
    rounds: int = 3,
    variants: tuple[str, ...] = tuple(VARIANTS),
    noise_limit: float = 0.10,
    lockstep_steps: int = 400,
    log: Any = print,
) -> dict[str, Any]:
    """Alternate the variants `rounds` times; medians and ratios against the plain loop. With
    a 2-process variant, also what lockstep costs on this machine (`lockstep_cost`).

    Args:
        raw: params as a dict (model and train sections are used; scaling is overridden).
        data: processed training data (e.g. `subset` of Fashion-MNIST).
        scratch: a folder for Ray's run folders.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    params = {name: variant_params(raw, w, t, epochs) for name, (w, t) in VARIANTS.items()}
    fns = {}
    for name in variants:
        if name == "plain":
            fns[name] = lambda p=params[name]: run_plain(p, data)
        elif name == "plain2":
            fns[name] = lambda p=params[name]: run_plain_ddp(p, data)
        else:
            fns[name] = lambda p=params[name]: run_on_ray(p, data, scratch)
    alt = Alternation(fns, rounds=rounds, noise_limit=noise_limit, log=log)
    runs = alt.run()
    ceiling = cpu_scaling()
    gradients = model_parameters(params["ray2"], data)
    allreduce = {"parameters": gradients, "seconds": allreduce_seconds(gradients)}
    two = "plain2" in variants or "ray2" in variants
    lockstep = lockstep_cost(raw, data, lockstep_steps) if two else None
    summary: dict[str, Any] = {}
    for name in variants:
        summary[name] = {
            key: median(alt.values(name, key))
            for key in ("epoch_ips", "loop_ips", "epoch_s", "train_pass_s", "fixed_s", "wall_s",
                        "worker_share", "ray_share", "preemptions_per_s", "waiting_s_per_s",
                        "compute_cpus", "ips_per_cpu", "idle_share", "steal_share")
        }  # fmt: skip
        procs = alt.values(name, "ray_processes")
        names = {k for p in procs for k in p}
        summary[name]["ray_processes"] = dict(
            sorted(((k, median([p.get(k, 0.0) for p in procs])) for k in names),
                   key=lambda kv: -kv[1])
        )  # fmt: skip
        summary[name]["threads"] = f"{VARIANTS[name][0]} x {VARIANTS[name][1]}"
    # each ratio is the median of the rounds' ratios: a variant is compared with its neighbour
    # in time, so a slow stretch of this shared machine weighs on both sides of a ratio
    round_ratios = {}
    for a, b in (("ray1", "plain"), ("ray2", "ray1"), ("plain2", "plain"), ("ray2", "plain2")):
        if a in summary and b in summary:
            for key in ("epoch_ips", "loop_ips", "compute_cpus", "ips_per_cpu"):
                pairs = zip(alt.values(a, key), alt.values(b, key), strict=False)
                values = [x / y for x, y in pairs if y]  # no CPU figures without schedstat
                if values:
                    round_ratios[f"{a}/{b} {key}"] = values
    ratios = {k: median(v) for k, v in round_ratios.items()}
    return {
        "setup": {
            "rows": len(data.train_labels),
            "image_size": data.meta["image_size"],
            "epochs": epochs,
            "rounds": rounds,
            "batch_size": raw["train"]["batch_size"],
            "model": raw["model"],
            "ray_init_s": median([m.result["ray_init_s"] for m in runs]),
            "order": "every other round reversed",
            "ray_instance": "fresh per run",
        },
        "summary": summary,
        "ratios": ratios,
        "round_ratios": round_ratios,
        "machine_scaling": ceiling,
        "allreduce": allreduce,
        "lockstep": lockstep,
        "runs": [
            {
                "variant": m.variant,
                **m.result,
                "foreign_share": m.foreign_share,
                "attempts": m.attempts,
                "load_before": m.load_before,
                "load_after": m.load_after,
            }
            for m in runs
        ],  # fmt: skip
    }
