"""Item 6: the GPU path, where CUDA is available (skipped otherwise, and the report says so).

The training loop of the pipeline (`src.train.make_loop` + `train_epoch`, the code a Ray worker
runs) on one GPU with bf16 autocast and channels_last, on Fashion-MNIST (the uint8 training split
is copied to the device once and batches are gathered there, see `src.train.DeviceData`):
  images/s    training images over the epoch's wall time (median of epochs after the first)
  GPU busy    the union of the intervals in which a kernel, memcpy or memset ran on the device,
              over the profiled wall window of `steps` training steps (torch.profiler trace)
for several batch sizes (a small CNN at batch 128 launches kernels faster than it fills a GPU).

Run it on a CUDA machine: `python -m bench.run --only gpu`.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import median
from src.config import parse_params

BUSY_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


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


def profile_steps(loop: Any, rows: list[np.ndarray], loss_fn: Any) -> dict[str, Any]:
    """Profile training steps over `rows` (batches) with torch.profiler; the busy fraction (None
    on CPU) and the wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from src.train import train_epoch

    activities = [ProfilerActivity.CPU]
    if loop.data.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        train_epoch(
            loop.model, loop.data, rows, loop.optimizer, loop.scheduler, loss_fn,
            loop.autocast, loop.scaler,
        )  # fmt: skip
        if loop.data.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    images = sum(len(r) for r in rows)
    return {"busy": busy_fraction(trace), "wall_s": wall, "images_per_sec": images / wall}


def measure_batch(
    raw: dict[str, Any], data: Any, batch_size: int, device: str, epochs: int, steps: int
) -> dict[str, Any]:
    """images/s over `epochs` epochs and the busy fraction of `steps` profiled steps."""
    import torch
    import torch.nn as nn

    from src.train import Comm, epoch_batches, loop_spec, make_loop, run_epochs

    raw = copy.deepcopy(raw)
    raw["train"].update(
        batch_size=batch_size, epochs=epochs, num_workers=1, precision="bf16",
        channels_last=True, use_gpu=device == "cuda",
    )  # fmt: skip
    params = parse_params(raw)
    spec = loop_spec(params, data.meta)
    dev = torch.device(device)
    images, labels = np.array(data.train_images), np.array(data.train_labels)
    loop = make_loop(spec, images, labels, Comm(0, 1, dev), dev)
    history = run_epochs(loop, Comm(0, 1, dev))
    ips = median([e["images_per_sec"] for e in history[1:]] or [history[0]["images_per_sec"]])
    batches = epoch_batches(loop.train_rows, epochs + 1, spec.seed, 0, 1, batch_size)[:steps]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.train["label_smoothing"])
    # the schedule ended with the epochs: the profiled steps go on at the last rate
    loop.scheduler = torch.optim.lr_scheduler.ConstantLR(loop.optimizer, factor=1.0, total_iters=0)
    profiled = profile_steps(loop, batches, loss_fn)
    return {
        "batch_size": batch_size,
        "images_per_sec": ips,
        "val_accuracy": history[-1]["val_accuracy"],
        "profiled_steps": len(batches),
        "profiled_images_per_sec": profiled["images_per_sec"],
        **(profiled["busy"] or {"busy_fraction": None}),
    }


def measure(
    raw: dict[str, Any],
    data: Any,
    *,
    batch_sizes: tuple[int, ...] = (256, 1024, 4096),
    epochs: int = 3,
    steps: int = 50,
    device: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """The GPU path for each batch size, or {"available": False} without CUDA.

    Args:
        raw: params as a dict (model and train sections; precision/channels_last are set).
        data: processed data (Fashion-MNIST).
        device: force a device ("cpu" exercises the code path in tests); default cuda if any.
    """
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return {
                "available": False,
                "reason": "no CUDA device (torch.cuda.is_available() is False)",
            }
        device = "cuda"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    results = []
    for bs in batch_sizes:
        r = measure_batch(raw, data, bs, device, epochs, steps)
        busy = r["busy_fraction"]
        log(
            f"  batch {bs}: {r['images_per_sec']:,.0f} images/s, GPU busy "
            f"{'n/a' if busy is None else f'{busy:.1%}'}"
        )
        results.append(r)
    return {"available": device == "cuda", "device": name, "results": results}
