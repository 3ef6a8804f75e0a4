"""Item 6: the GPU path, one call on a CUDA machine: `python -m bench.gpu` (from the repository
root; Fashion-MNIST IDX .gz files in ../shared/data/fashion-mnist/, or `--data DIR`).

It needs torch and numpy, plus pyyaml and pydantic (`src.loop` imports `src.config`); no Ray,
MLflow, DVC, albumentations or PIL. It runs the per-worker loop of the pipeline
(`src.loop.make_loop` + `train_epoch`, what a Ray worker runs; the uint8 split is copied to the
device once and batches are gathered there, see `src.loop.DeviceData`) with the model and train
section of configs/fashion-mnist.yaml, and measures:
  throughput      images/s in fp32 and in bf16 autocast, channels_last, per batch size: the
                  median of the epochs after the first
  GPU busy        the union of the kernel, memcpy and memset intervals of `steps` profiled
                  training steps over their wall window (torch.profiler trace)
  peak memory     torch.cuda.max_memory_allocated over each configuration
  time to 0.935   wall time of the config's schedule (bf16) until the test accuracy (the 10,000
                  test images, evaluated after each epoch, not counted) reaches 0.935, on the
                  un-augmented training split (augmented copies need albumentations)
  2 ranks         2 processes sharing the GPU (torch.distributed, gloo, started here): each
                  rank's device, disjoint batches, and a DDP step's CUDA gradients all-reduced
Results: JSON on stdout (and bench/results/gpu.json through `python -m bench.run --only gpu`).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"
CONFIG = REPO / "configs" / "fashion-mnist.yaml"
BUSY_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
TARGET_ACCURACY = 0.935


@dataclass
class Images:
    """uint8 NHWC train/test arrays and the meta that `src.loop.loop_spec` reads."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    meta: dict[str, Any]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array (the format's own header: dims, sizes)."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(folder: Path = FASHION) -> Images:
    """Fashion-MNIST as 28x28x1 uint8 with the training split's mean and std (0-1 scale)."""

    def part(name: str) -> np.ndarray:
        found = sorted(folder.glob(f"{name}*"))
        if not found:
            raise FileNotFoundError(f"{folder}/{name}[.gz] not found")
        return read_idx(found[0])

    train = part("train-images-idx3-ubyte")[..., None]
    scaled = train.astype(np.float64) / 255
    meta = {
        "channels": 1, "image_size": 28, "class_names": [str(i) for i in range(10)],
        "mean": [float(scaled.mean())], "std": [float(scaled.std())],
        "num_originals": len(train), "augment_copies": 0,
    }  # fmt: skip
    return Images(
        train, part("train-labels-idx1-ubyte").astype(np.int64),
        part("t10k-images-idx3-ubyte")[..., None], part("t10k-labels-idx1-ubyte").astype(np.int64),
        meta,
    )  # fmt: skip


def busy_fraction(trace: dict[str, Any]) -> dict[str, float] | None:
    """From a chrome trace (torch.profiler's export): device-busy time over the wall window
    (first to last event of any kind). None when the trace has no device activity (CPU)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    busy = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("cat") in BUSY_CATEGORIES
    )
    if not busy:
        return None
    start = min(float(e["ts"]) for e in events)
    end = max(float(e["ts"]) + float(e["dur"]) for e in events)
    total, cur_start, cur_end = 0.0, *busy[0]
    for s, e in busy[1:]:
        if s > cur_end:
            total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    total += cur_end - cur_start
    window = max(end - start, 1e-9)
    return {"busy_fraction": total / window, "busy_ms": total / 1e3, "window_ms": window / 1e3}


def params_for(raw: dict[str, Any], **train: Any) -> Any:
    """`raw` params (a dict) with `train` keys overridden, validated."""
    from src.config import parse_params

    raw = copy.deepcopy(raw)
    raw["train"].update(num_workers=1, **train)
    return parse_params(raw)


def new_loop(raw: dict[str, Any], data: Images, device: Any, comm: Any = None, wrap: Any = None,
             **train: Any) -> Any:  # fmt: skip
    """The per-worker loop (`src.loop.make_loop`) for `raw` params with `train` overrides."""
    from src.loop import Comm, loop_spec, make_loop

    spec = loop_spec(params_for(raw, **train), data.meta)
    comm = comm or Comm(0, 1, device)
    return make_loop(spec, data.train_images, data.train_labels, comm, device, wrap=wrap)


def _loss(loop: Any) -> Any:
    import torch.nn as nn

    return nn.CrossEntropyLoss(label_smoothing=loop.spec.train["label_smoothing"])


def _epoch(loop: Any, epoch: int, rank: int = 0, world: int = 1) -> tuple[float, float, int, float]:
    """One training epoch of `loop` (rank's share): (loss sum, correct, images, seconds)."""
    from src.loop import epoch_batches, epoch_rows, train_epoch

    rows = epoch_rows(loop.train_rows, epoch, loop.spec)
    batches = epoch_batches(rows, epoch, loop.spec.seed, rank, world, loop.batch_size)
    return train_epoch(
        loop.model, loop.data, batches, loop.optimizer, loop.scheduler, _loss(loop),
        loop.autocast, loop.scaler,
    )  # fmt: skip


def profile_steps(loop: Any, batches: list[np.ndarray]) -> dict[str, Any]:
    """Training steps over `batches` under torch.profiler: the busy fraction (None on CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from src.loop import train_epoch

    cuda = loop.data.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # the schedule ended with the epochs: the profiled steps go on at a constant rate
    loop.scheduler = torch.optim.lr_scheduler.ConstantLR(loop.optimizer, factor=1.0, total_iters=0)
    with profile(activities=activities) as prof:
        train_epoch(
            loop.model, loop.data, batches, loop.optimizer, loop.scheduler, _loss(loop),
            loop.autocast, loop.scaler,
        )  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return busy_fraction(json.loads(path.read_text())) or {"busy_fraction": None}


def throughput(raw: dict[str, Any], data: Images, device: str, precision: str, batch_size: int,
               epochs: int, steps: int) -> dict[str, Any]:  # fmt: skip
    """images/s over `epochs` epochs, the busy fraction of `steps` profiled steps, peak memory."""
    import torch

    from src.loop import epoch_batches

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    loop = new_loop(raw, data, dev, precision=precision, batch_size=batch_size, epochs=epochs,
                    channels_last=True, use_gpu=dev.type == "cuda")  # fmt: skip
    rates = []
    for epoch in range(1, epochs + 1):
        _, _, count, seconds = _epoch(loop, epoch)
        rates.append(count / seconds)
    batches = epoch_batches(loop.train_rows, epochs + 1, loop.spec.seed, 0, 1, batch_size)[:steps]
    busy = profile_steps(loop, batches)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return {
        "precision": precision, "batch_size": batch_size,
        "images_per_sec": statistics.median(rates[1:] or rates), "epochs": epochs,
        "profiled_steps": len(batches), **busy, "peak_mib": peak,
    }  # fmt: skip


def time_to_accuracy(raw: dict[str, Any], data: Images, device: str, precision: str,
                     target: float = TARGET_ACCURACY) -> dict[str, Any]:  # fmt: skip
    """The config's schedule (its epochs, batch, optimizer) in `precision`, test accuracy after
    each epoch: training seconds until it first reaches `target` (None if it never does)."""
    import torch

    from src.loop import DeviceData, evaluate

    dev = torch.device(device)
    loop = new_loop(raw, data, dev, precision=precision, use_gpu=dev.type == "cuda")
    test = DeviceData(data.test_images, data.test_labels, loop.spec.mean, loop.spec.std, dev,
                      loop.spec.train["channels_last"])  # fmt: skip
    rows = np.arange(len(data.test_labels))
    trained, curve = 0.0, []
    for epoch in range(1, loop.spec.train["epochs"] + 1):
        trained += _epoch(loop, epoch)[3]
        _, correct, count = evaluate(loop.net, test, rows, loop.autocast)
        curve.append({"epoch": epoch, "seconds": trained, "test_accuracy": correct / count})
        if correct / count >= target:
            break
    reached = curve[-1]["test_accuracy"] >= target
    return {
        "target": target, "precision": precision, "reached": reached,
        "seconds": curve[-1]["seconds"] if reached else None,
        "accuracy": curve[-1]["test_accuracy"], "curve": curve,
    }  # fmt: skip


def _two_ranks_rank(rank: int, raw: dict[str, Any], data: Images, device: str, address: str,
                    out: Any) -> None:  # fmt: skip
    """One rank of `two_ranks`: both on `device` (one GPU shared), DDP over gloo."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from src.loop import Comm, epoch_batches, epoch_rows
    from src.ray_driver import ddp_options

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)

        def wrap(net: Any) -> Any:
            return DistributedDataParallel(net, **ddp_options())

        loop = new_loop(raw, data, dev, comm=Comm(rank, 2, dev), wrap=wrap, epochs=1,
                        use_gpu=dev.type == "cuda")  # fmt: skip
        rows = epoch_rows(loop.train_rows, 1, loop.spec)
        mine = epoch_batches(rows, 1, loop.spec.seed, rank, 2, loop.batch_size)
        seen: list[Any] = [None, None]
        dist.all_gather_object(seen, np.concatenate(mine).tolist())
        _epoch(loop, 1, rank, 2)  # DDP all-reduces the CUDA gradients at each step
        grads = torch.cat([p.grad.flatten() for p in loop.net.parameters()])
        weights = torch.cat([p.detach().flatten() for p in loop.net.parameters()])
        ones = torch.ones(4, device=dev)
        dist.all_reduce(ones)  # gloo on CUDA tensors
        both: list[Any] = [None, None]
        dist.all_gather_object(
            both, (str(weights.device), float(weights.sum()), float(grads.sum()))
        )
        if rank == 0:
            out.put({
                "devices": [b[0] for b in both],
                "disjoint_batches": not set(seen[0]) & set(seen[1]),
                "rows_per_rank": [len(s) for s in seen],
                "same_weights": both[0][1] == both[1][1],
                "same_gradients": both[0][2] == both[1][2],
                "all_reduce": ones.tolist(),
                "backend": loop.allreduce,
            })  # fmt: skip
    finally:
        dist.destroy_process_group()


def two_ranks(raw: dict[str, Any], data: Images, device: str, rows: int = 4096) -> dict[str, Any]:
    """2 processes on `device` (a GPU shared) running one DDP epoch over `rows` training rows:
    each rank's device, disjoint batches, the same weights and gradients after all-reduce."""
    from bench.ranks import run_ranks

    small = Images(data.train_images[:rows], data.train_labels[:rows], data.test_images,
                   data.test_labels, {**data.meta, "num_originals": min(rows, len(data.train_labels))})  # fmt: skip
    r = run_ranks(_two_ranks_rank, 2, raw, small, device, timeout=600)
    r["ok"] = (
        all(d.startswith(device) for d in r["devices"]) and r["disjoint_batches"]
        and r["same_weights"] and r["same_gradients"] and r["all_reduce"] == [2.0] * 4
        and r["backend"] == "gloo"
    )  # fmt: skip
    return r


def measure(
    raw: dict[str, Any],
    data: Images | Any,
    *,
    batch_sizes: tuple[int, ...] = (256, 1024, 4096),
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    epochs: int = 3,
    steps: int = 50,
    device: str | None = None,
    accuracy: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Every figure of item 6, or {"available": False, ...} without CUDA.

    Args:
        raw: params as a dict (model and train sections; precision, batch and epochs are set).
        data: uint8 NHWC train/test arrays with meta (`load_fashion`, or a Processed).
        device: force a device ("cpu" runs the code path in tests); default cuda if any.
        accuracy: also train the config to the target accuracy.
    """
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return {"available": False, "reason": "no CUDA device (torch.cuda.is_available())"}
        device = "cuda"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    results = []
    for precision in precisions:
        for bs in batch_sizes:
            r = throughput(raw, data, device, precision, bs, epochs, steps)
            busy = "n/a" if r["busy_fraction"] is None else format(r["busy_fraction"], ".1%")
            log(f"  {precision} batch {bs}: {r['images_per_sec']:,.0f} images/s, busy {busy}")
            results.append(r)
    tta = time_to_accuracy(raw, data, device, "bf16") if accuracy else None
    ranks = two_ranks(raw, data, device)
    log(f"  time to {TARGET_ACCURACY}: {tta and tta['seconds']}; 2 ranks: {ranks['ok']}")
    return {"available": device == "cuda", "device": name, "results": results,
            "time_to_accuracy": tta, "two_ranks": ranks}  # fmt: skip


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, default=FASHION, help="folder of the Fashion-MNIST IDX files"
    )
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    args = p.parse_args(argv)
    from bench import gpu  # by its module name: the 2 ranks' processes import it so

    raw = yaml.safe_load(CONFIG.read_text())
    result = gpu.measure(raw, gpu.load_fashion(args.data), device=args.device, log=gpu.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
