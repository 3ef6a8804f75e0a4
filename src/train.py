"""Training: one model-agnostic epoch loop, run by Ray Train workers (DDP) or in one process.

Usable without Ray (the benchmark's plain loop runs exactly this code with world size 1):
  split_indices      validation held out by ORIGINAL image, stratified and seeded
  epoch_batches      the seeded order of an epoch; rank r takes every world_size-th row
  train_epoch        one pass of SGD; evaluate: loss/correct/count sums over some rows
  make_loop          model, optimizer, schedule and data on a device, optionally from a state
  run_epochs         the epoch loop over a Comm (sums across ranks, or nothing in one process)
  run_local          the plain single-process loop (no Ray): returns the per-epoch history

Ray (only this module imports ray):
  train_loop_per_worker(config)  run_epochs inside a TorchTrainer worker; a checkpoint per epoch
  fit(...)                       TorchTrainer.fit on a local or remote cluster
  lean_trainer(TorchTrainer)     without the Ray Train helper actors the stage does not need
  run_ray(params, processed, d)  fit from scratch, no MLflow/outputs: the benchmark's Ray path
  train_stage(params, root)      the stage: cluster, MLflow run, fit, outputs

Decisions (and why):
* Data path: the driver puts the uint8 training arrays in Ray's object store once (ray.put); each
  worker ray.get()s them (one shared-memory copy per node, zero-copy reads) and gathers its own
  rows per batch in memory. It needs no shared file system (the object store moves the arrays
  between nodes) and the epoch order is a seeded permutation, so runs are bit-identical. Ray Data
  was measured at 0.79-0.87x the plain loop on 2 cores (per-epoch streaming cost; FINDINGS.md)
  against a 0.98x target, and a lazily read dataset can hang fit() when workers hold every CPU.
  Limit: the training split must fit in each node's object store (Fashion-MNIST with one augmented
  copy: 94 MB). On a GPU the whole uint8 split is copied to the device once and batches are
  gathered there, so the input pipeline cannot starve the GPU.
* Validation: rows of original images held out (with all their augmented copies), evaluated on
  the un-augmented originals, sharded across ranks and summed with all_reduce: the metric covers
  the whole validation split. Rank 0's BatchNorm buffers are broadcast first, so every rank
  evaluates the very model rank 0 checkpoints.
* Determinism: the same seed gives the same initial weights on every rank, and each epoch
  reseeds torch from (seed, epoch, rank) and draws its order from (seed, epoch). A resumed run
  therefore continues exactly as an uninterrupted one (no RNG state to save), and a 2-worker
  epoch sees the same global batches as a 1-worker one.
* Resume: the Ray run's name is a hash of the model/train params, the seed and the data, under
  train.storage_path. Re-running after an interruption finds its checkpoints there (Ray restores
  the checkpoint manager from storage; ray.train.get_checkpoint() returns the latest) and goes on
  at the next epoch; a run that finished is marked done and a re-run (dvc repro -f) starts anew.
  The MLflow run id is kept in the same folder, so a resumed run logs into the same MLflow run.
  Steps already in MLflow are never logged again (tracking.log_epochs is idempotent).
* The final model (models/model.pt) is the best checkpoint by validation accuracy (ties: the
  later epoch), as CheckpointConfig keeps the best k by that metric; metrics/train.json describes
  that epoch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from src import tracking
from src.config import Params, TrainParams
from src.errors import PipelineError
from src.files import atomic_dir, shared_root, write_json
from src.model import CNN, CNNConfig, SpecError, build_config, save_checkpoint

CODE_ROOT = Path(__file__).resolve().parents[1]  # shipped to a remote cluster's workers
STATE_FILE = "state.pt"  # inside each Ray checkpoint
MLFLOW_RUN_FILE = "mlflow_run.json"  # in the Ray run folder: the MLflow run a resume reuses
DONE_FILE = "stage_done.json"  # in the Ray run folder: the stage finished; a re-run starts anew
FAULT_ENV = "CNN_TRAIN_FAULT"  # test hook, see _Fault
# Validation rows per pass: bigger passes gain little on CPU, and their activations (100 MB at
# 1024 rows of 28x28) outgrow a thread's malloc arena (64 MB heaps), so each is mmapped anew.
EVAL_BATCH = 256
CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's
# Train params that change no number the run computes: left out of the run's identity, so e.g.
# raising max_failures still resumes the interrupted run.
NOT_IN_RUN_KEY = ("max_failures", "keep_checkpoints", "keep_runs", "storage_path", "experiment")
# Never shipped to a remote cluster: environments, data, stores and outputs.
RUNTIME_EXCLUDES = [
    ".venv/", ".git/", ".dvc/cache/", ".dvc/tmp/", "data/", "models/", "metrics/", "plots/",
    "reports/", "mlflow.db", "mlartifacts/", "mlruns/", "ray_results/", "bench/out/",
    "__pycache__/", ".pytest_cache/", ".ruff_cache/",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The loop's inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopSpec:
    """What the epoch loop needs, as plain values: it is sent to Ray workers.

    model: asdict(CNNConfig); train: TrainParams.model_dump(); mean/std: per channel, 0-1 scale;
    num_originals: un-augmented training images (rows 0..N0-1; row r comes from r % N0).
    copies: augmented copies of each original (preprocess.augment_copies): row r is copy r // N0.
    """

    model: dict[str, Any]
    train: dict[str, Any]
    seed: int
    mean: list[float]
    std: list[float]
    num_originals: int
    copies: int


def loop_spec(params: Params, meta: dict[str, Any]) -> LoopSpec:
    """The LoopSpec for `params` on the processed data described by `meta` (meta.json)."""
    try:
        cfg = build_config(
            params.model.model_dump(),
            in_channels=int(meta["channels"]),
            image_size=int(meta["image_size"]),
            num_classes=len(meta["class_names"]),
        )
    except SpecError as e:
        raise PipelineError(f"params.yaml: model.{e}") from None
    return LoopSpec(
        model=asdict(cfg),
        train=params.train.model_dump(mode="json"),
        seed=params.base.seed,
        mean=[float(v) for v in meta["mean"]],
        std=[float(v) for v in meta["std"]],
        num_originals=int(meta["num_originals"]),
        copies=int(meta["augment_copies"]),
    )


def split_indices(
    labels: np.ndarray, num_originals: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `val_fraction` of the ORIGINAL images, stratified by class and seeded.

    Args:
        labels: the training labels, N = num_originals * (1 + augment_copies) rows.
        num_originals: N0; row r is (a copy of) original r % N0.
    Returns:
        (train_rows, val_rows): train_rows are every row (original or augmented copy) of the
        originals kept for training; val_rows are the held-out originals themselves (rows < N0,
        un-augmented), so no copy of a validation image is ever trained on.
    """
    n = len(labels)
    if num_originals <= 0 or n % num_originals:
        raise PipelineError(
            f"meta.json: num_originals {num_originals} does not divide the {n} training rows"
        )
    originals = np.asarray(labels[:num_originals])
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(originals):
        members = np.flatnonzero(originals == c)
        # at least one per class in each part when the class has two images or more
        k = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        held.append(rng.permutation(members)[:k])
    val_rows = np.sort(np.concatenate(held)).astype(np.int64)
    is_val = np.zeros(num_originals, dtype=bool)
    is_val[val_rows] = True
    rows = np.arange(n, dtype=np.int64)
    return rows[~is_val[rows % num_originals]], val_rows


def epoch_batches(
    train_rows: np.ndarray, epoch: int, seed: int, rank: int, world_size: int, batch_size: int
) -> list[np.ndarray]:
    """This rank's batches for `epoch`: a permutation seeded by (seed, epoch), cut to whole
    global batches (the last partial one is dropped, so every rank takes the same number of
    steps), and rank r's rows are every world_size-th from r. Global batch i is then the same
    set of rows for any world size. `batch_size` is per worker."""
    order = train_rows[np.random.default_rng([seed, epoch]).permutation(len(train_rows))]
    step = batch_size * world_size
    mine = order[: len(order) // step * step][rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def epoch_rows(train_rows: np.ndarray, epoch: int, spec: LoopSpec) -> np.ndarray:
    """The rows `epoch` trains on: all of `train_rows` or, with train.copies_per_epoch k, each
    original and k of its augmented copies, taken in turn (epoch 1 copies 1..k, epoch 2 the
    next k, wrapping round), so every epoch is the same size and sees fresh views."""
    k = spec.train.get("copies_per_epoch")
    if k is None or k >= spec.copies:
        return train_rows
    copy = train_rows // spec.num_originals  # 0: the original itself
    turn = (copy - 1 - (epoch - 1) * k) % spec.copies
    return train_rows[(copy == 0) | (turn < k)]


def training_split(spec: LoopSpec, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """split_indices for `spec`, checked: at least one full global batch to train on per epoch,
    and no more copies per epoch than preprocess made."""
    t = spec.train
    train_rows, val_rows = split_indices(labels, spec.num_originals, t["val_fraction"], spec.seed)
    k = t.get("copies_per_epoch")
    if k is not None and k > spec.copies:
        raise PipelineError(
            f"train.copies_per_epoch {k} is more than the {spec.copies} augmented copies of each "
            f"image in the processed data (preprocess.augment_copies)"
        )
    per_epoch = len(epoch_rows(train_rows, 1, spec))
    if per_epoch < t["batch_size"]:
        raise PipelineError(
            f"train.batch_size {t['batch_size']} is larger than the training split "
            f"({per_epoch} rows per epoch after holding out train.val_fraction)"
        )
    return train_rows, val_rows


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch (dropout) from (seed, epoch, rank): resumed epochs draw what they would have."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


class DeviceData:
    """The uint8 NHWC training arrays, served as normalised float batches on `device`.

    Normalisation is preprocess's ``(x / 255 - mean) / std`` done in torch on the device, so
    uint8 (4x smaller) is what moves. Permuting NHWC to NCHW yields channels_last strides, which
    the float conversion keeps (made contiguous when channels_last is off).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        channels_last: bool = True,
    ) -> None:
        self.device = device
        self.channels_last = channels_last
        self.on_device = device.type != "cpu"
        if self.on_device:  # the whole split once, instead of a host-to-device copy per batch
            self.images = torch.from_numpy(np.array(images)).to(device)
            self.labels = torch.from_numpy(np.array(labels, dtype=np.int64)).to(device)
        else:
            self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def get(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float N,C,H,W normalised, y int64 N) for the given rows."""
        if self.on_device:
            idx = torch.from_numpy(rows).to(self.device, non_blocking=True)
            x, y = self.images[idx], self.labels[idx]
        else:
            x = torch.from_numpy(self.images[rows])  # fancy indexing copies: writable
            y = torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)
        return (x if self.channels_last else x.contiguous()), y


# ---------------------------------------------------------------------------------------------
# One epoch
# ---------------------------------------------------------------------------------------------


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with AMX
    or AVX-512 BF16 (oneDNN's bf16 kernels; elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu  # these probes are private in torch 2.x: absent means no
        return any(getattr(cpu, f, lambda: False)() for f in CPU_BF16_PROBES)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as run on `device`: auto is bf16 where `bf16_native`, else fp32. Each worker
    resolves it on its own device."""
    if precision != "auto":
        return precision
    return "bf16" if bf16_native(device) else "fp32"


def autocast_for(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for train.precision on `device` (fp32: no autocast)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise PipelineError("train.precision: fp16 autocast needs a GPU; use bf16 or fp32 on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def train_epoch(
    model: nn.Module,
    data: DeviceData,
    batches: Sequence[np.ndarray],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[float, float, int, float]:
    """One pass over `batches` (row arrays), stepping the schedule per batch.

    Returns:
        (loss sum, correct predictions, images, seconds) for this process; sums, so that ranks
        can add them up. Per-batch values stay on the device (no sync per step).
    """
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    count = 0
    start = time.perf_counter()
    for i, rows in enumerate(batches):
        x, y = data.get(rows)
        with autocast():
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double() * len(rows)
        correct += (logits.detach().argmax(1) == y).sum()
        count += len(rows)
        if on_step is not None:
            on_step(i)
    totals = (loss_sum.item(), float(correct.item()), count)  # .item() waits for the device
    return *totals, time.perf_counter() - start


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: DeviceData,
    rows: np.ndarray,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    batch_size: int = EVAL_BATCH,
) -> tuple[float, float, int]:
    """(cross-entropy sum without label smoothing, correct, count) of `model` on `rows`."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    for i in range(0, len(rows), batch_size):
        x, y = data.get(rows[i : i + batch_size])
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    return loss_sum.item(), float(correct.item()), len(rows)


def make_optimizer(model: nn.Module, train: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; weight decay on weights only (not biases nor norm scales).

    Fused (one kernel over all parameters) where torch has it for the model's device (CPU and
    CUDA): on CPU the default loops over the parameters tensor by tensor, one thread, which
    took 1.6 ms a step against 0.8 ms fused for the default network (AMD EPYC, 1 or 2 threads):
    a training step 2% shorter, and every DDP rank runs the whole update."""
    params = list(model.parameters())
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": train["weight_decay"]},
        {"params": rest, "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=train["lr"], momentum=train["momentum"], fused=fused)
    return torch.optim.AdamW(groups, lr=train["lr"], fused=fused)


def make_scheduler(
    optimizer: torch.optim.Optimizer, train: dict[str, Any], steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped once per batch: one-cycle, cosine or constant."""
    total = train["epochs"] * steps_per_epoch
    if train["schedule"] == "onecycle":
        cycle = train["optimizer"] == "adamw" or train["momentum"] > 0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=train["lr"], total_steps=total, cycle_momentum=cycle
        )
    if train["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class Comm:
    """What ranks share: sums (all_reduce) and rank 0's buffers. With one process, nothing."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64: counts stay exact)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running stats) to every rank."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for buf in module.buffers():
            dist.broadcast(buf, 0)


@dataclass
class Loop:
    """Everything one process trains with; `model` may be a DDP wrapper around `net`."""

    spec: LoopSpec
    net: CNN
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    data: DeviceData
    train_rows: np.ndarray
    val_rows: np.ndarray
    batch_size: int  # per worker
    precision: str  # train.precision as resolved on this device (auto: bf16 or fp32)
    autocast: Callable[[], contextlib.AbstractContextManager]
    allreduce: str  # how DDP sums gradients: "none" (one process), "shared memory", or the backend

    def state(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint: weights, optimizer, schedule and the history so far (plain types and
        tensors only: it loads with torch.load(weights_only=True))."""
        return {
            "model_config": self.spec.model,
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": history,
        }


def make_loop(
    spec: LoopSpec,
    images: np.ndarray,
    labels: np.ndarray,
    comm: Comm,
    device: torch.device,
    *,
    state: dict[str, Any] | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> Loop:
    """Build the model (seeded: the same weights on every rank), optimizer and schedule, restore
    them from a checkpoint `state`, and put the data on `device`. `wrap` is e.g. Ray's
    prepare_model (DDP when world size > 1); a DDP model on CPU sums its gradients through
    shared memory where train.shared_memory_allreduce allows and every rank shares the host
    (collective: every rank comes through here). The process keeps freed memory from here on
    (keep_freed_memory): every process that trains comes through here."""
    keep_freed_memory()
    t = spec.train
    precision = resolve_precision(t["precision"], device)
    autocast = autocast_for(precision, device)
    train_rows, val_rows = training_split(spec, labels)
    batch = t["batch_size"] // comm.world_size
    steps = len(epoch_rows(train_rows, 1, spec)) // t["batch_size"]
    torch.manual_seed(spec.seed)
    net = CNN(CNNConfig(**spec.model))
    if state is not None:
        net.load_state_dict(state["model"])
    fmt = torch.channels_last if t["channels_last"] else torch.contiguous_format
    net.to(device=device, memory_format=fmt)
    model = wrap(net) if wrap is not None else net
    allreduce = ddp_allreduce(model, t["shared_memory_allreduce"])
    optimizer = make_optimizer(net, t)  # DDP shares net's parameters
    scheduler = make_scheduler(optimizer, t, steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    data = DeviceData(images, labels, spec.mean, spec.std, device, t["channels_last"])
    return Loop(
        spec, net, model, optimizer, scheduler, scaler, data, train_rows, val_rows, batch,
        precision, autocast, allreduce,
    )  # fmt: skip


EpochHook = Callable[[dict[str, Any], Loop, list[dict[str, Any]]], None]


def run_epochs(
    loop: Loop,
    comm: Comm,
    history: list[dict[str, Any]] | None = None,
    on_epoch: EpochHook | None = None,
    on_step: Callable[..., None] | None = None,
) -> list[dict[str, Any]]:
    """Train from epoch len(history)+1 to train.epochs; return the full history.

    Each entry: epoch, train_loss, train_accuracy, val_loss, val_accuracy (whole split, summed
    over ranks), lr (at the epoch's first step), images_per_sec (all ranks' training images over
    this rank's training time), epoch_seconds. `on_epoch(entry, loop, history)` runs after each
    epoch on every rank (Ray: report + checkpoint); `on_step(epoch, step, steps=n)` after each batch.
    """
    spec, t = loop.spec, loop.spec.train
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t["label_smoothing"])
    history = list(history or [])
    for epoch in range(len(history) + 1, t["epochs"] + 1):
        seed_epoch(spec.seed, epoch, comm.rank)
        rows = epoch_rows(loop.train_rows, epoch, spec)
        batches = epoch_batches(rows, epoch, spec.seed, comm.rank, comm.world_size, loop.batch_size)
        lr = loop.optimizer.param_groups[0]["lr"]
        hook = None if on_step is None else functools.partial(on_step, epoch, steps=len(batches))
        loss, correct, count, seconds = train_epoch(
            loop.model, loop.data, batches, loop.optimizer, loop.scheduler, loss_fn,
            loop.autocast, loop.scaler, hook,
        )  # fmt: skip
        comm.broadcast_buffers(loop.net)
        mine = loop.val_rows[comm.rank :: comm.world_size]
        vloss, vcorrect, vcount = evaluate(loop.net, loop.data, mine, loop.autocast)
        loss, correct, count, vloss, vcorrect, vcount = comm.sum(
            [loss, correct, count, vloss, vcorrect, vcount]
        )
        entry = {
            "epoch": epoch,
            "train_loss": loss / count,
            "train_accuracy": correct / count,
            "val_loss": vloss / vcount,
            "val_accuracy": vcorrect / vcount,
            "lr": lr,
            "images_per_sec": count / seconds,
            "epoch_seconds": seconds,
        }
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry, loop, history)
    return history


def format_epoch(entry: dict[str, Any], epochs: int) -> str:
    """The one line printed per epoch."""
    return (
        f"epoch {entry['epoch']}/{epochs}  "
        f"train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f}  "
        f"val loss {entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f}  "
        f"{entry['images_per_sec']:,.0f} images/s  lr {entry['lr']:.2e}"
    )


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next step.

    By default glibc serves each large tensor (a batch's activations and gradients, 1-13 MB at
    28x28) with a fresh mmap and unmaps it when freed, so every step page-faults its working set
    in again: 100-150 thousand faults a second in a Ray worker on 2 cores, in the training
    thread, while the other compute thread waits. (glibc raises its threshold as mmapped blocks
    are freed, so a long-lived process, like a benchmark's driver, suffers less than a fresh
    worker.) Here allocations up to 1 GiB come from the heap and freed heap memory is kept: the
    step's peak working set stays resident, and training runs without page faults. glibc only;
    elsewhere (or if refused) nothing changes. Returns whether it was applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # mallopt(int param, int value)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    ok = mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20)
    return bool(ok and mallopt(m_trim_threshold, 2**31 - 1) and mallopt(m_top_pad, 64 << 20))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint state written by Loop.state (torch.load with weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def run_local(
    params: Params,
    processed: Any,
    device: str | torch.device = "cpu",
    on_epoch: EpochHook | None = None,
) -> list[dict[str, Any]]:
    """The plain single-process loop: the same code as a Ray worker with world size 1, no Ray.

    Args:
        params: validated params (model, train, base.seed).
        processed: `src.preprocess.load_processed(...)` output (train arrays + meta).
        device: where to train.
        on_epoch: called after each epoch as in run_epochs.
    Returns:
        The per-epoch history (see run_epochs). Uses train.cpus_per_worker threads, like a worker.
    """
    spec = loop_spec(params, processed.meta)
    torch.set_num_threads(params.train.cpus_per_worker)
    device = torch.device(device)
    # in memory, as a worker holds them after ray.get (not a memory map)
    images, labels = np.array(processed.train_images), np.array(processed.train_labels)
    loop = make_loop(spec, images, labels, Comm(0, 1, device), device)
    return run_epochs(loop, Comm(0, 1, device), on_epoch=on_epoch)


# ---------------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fault:
    """Test hook, from env CNN_TRAIN_FAULT (JSON, read by the driver and sent to the workers):
    {"rank": 1, "epoch": 2, "at": "mid"|"end", "action": "kill"|"stall", "marker": "/path"}.
    Once (while `marker` does not exist; it is created first), on that rank and epoch, after half
    of its batches ("mid") or after its checkpoint was reported ("end"): SIGKILL this worker
    process, or stall it (for a test that then interrupts the stage)."""

    rank: int = -1
    epoch: int = -1
    at: str = "end"
    action: str = "kill"
    marker: str = ""

    def fire(self, rank: int, epoch: int, at: str) -> None:
        if (rank, epoch, at) != (self.rank, self.epoch, self.at) or not self.marker:
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.write_text(f"{self.action} rank {rank} epoch {epoch} {at}\n")
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # "stall": wait to be interrupted
            time.sleep(1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: run_epochs under DDP, a report + checkpoint per epoch.

    config: {"spec": asdict(LoopSpec), "data": [images_ref, labels_ref] (object store),
    "tracking": {"uri", "run_id"} or None, "fault": _Fault fields or None, "in_place": see
    report_epoch}. Rank 0 prints one line per epoch, logs the epoch to MLflow (step=epoch, never
    twice) and writes the checkpoint; every rank reports the epoch (`report_epoch`).
    """
    import ray
    import ray.train
    import ray.train.torch

    spec = LoopSpec(**config["spec"])
    torch.set_num_threads(spec.train["cpus_per_worker"])  # Ray sets OMP_NUM_THREADS=1
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    drop_lone_process_group()
    images, labels = ray.get(config["data"])
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder) / STATE_FILE)
    history = state["history"] if state is not None else []
    comm = Comm(rank, world, device)
    one_host = ctx.get_local_world_size() == world
    options = ddp_options(device, spec.train["shared_memory_allreduce"], one_host)
    wrap = functools.partial(ray.train.torch.prepare_model, parallel_strategy_kwargs=options)
    loop = make_loop(spec, images, labels, comm, device, state=state, wrap=wrap)
    if rank == 0:
        sums = "" if loop.allreduce == "none" else f", all-reduce: {loop.allreduce}"
        print(f"{world} worker(s) on {device.type}, precision {loop.precision}{sums}", flush=True)
    fault = _Fault(**(config.get("fault") or {}))
    track = config.get("tracking")
    if rank == 0 and track:
        tracking.set_tag(track["run_id"], "allreduce", loop.allreduce, uri=track["uri"])
        if history:  # epochs a previous attempt checkpointed, maybe unlogged
            tracking.log_epochs(track["uri"], track["run_id"], history)

    def on_epoch(entry: dict[str, Any], loop: Loop, history: list[dict[str, Any]]) -> None:
        if rank == 0:
            print(format_epoch(entry, spec.train["epochs"]), flush=True)
            if track:
                tracking.log_epochs(track["uri"], track["run_id"], history)
        state = loop.state(history) if rank == 0 else None
        report_epoch(entry, state, in_place=config.get("in_place", False))
        fault.fire(rank, entry["epoch"], "end")

    def on_step(epoch: int, step: int, *, steps: int) -> None:
        if step == steps // 2:
            fault.fire(rank, epoch, "mid")

    run_epochs(loop, comm, history, on_epoch=on_epoch, on_step=on_step)


def report_epoch(entry: dict[str, Any], state: dict[str, Any] | None, *, in_place: bool) -> None:
    """ray.train.report of one epoch (every rank: it is a barrier), with `state` (rank 0's; None
    on the other ranks) as the checkpoint `checkpoint_epoch_NNNN` of the run folder.

    in_place: rank 0 writes the state file straight into the run folder, where Ray Train keeps
    its checkpoints, and reports it there (CheckpointUploadMode.NO_UPLOAD); otherwise it saves
    the file in a temporary folder, which Ray copies into the run folder (pyarrow's copy_files,
    after checking that the storage is one every node sees), while the CPUs sit idle: an
    epoch's end took 10.5 ms in place against 15.4 ms with 1 worker, 12.9 ms against 32.8 ms
    with 2 (2 cores, BENCHMARKS.md item 1), and the copy grows with the model. For a local Ray
    instance only, whose run folder is on this machine: on a cluster, rank 0 may run on a node
    that does not share it.
    """
    import ray.train

    name = f"checkpoint_epoch_{entry['epoch']:04d}"  # the same on every rank, and after a retry
    if state is None:
        ray.train.report(dict(entry), checkpoint_dir_name=name)
    elif in_place:
        storage = ray.train.get_context().get_storage()
        fs, path = storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)
        fs.create_dir(path)
        with fs.open_output_stream(f"{path}/{STATE_FILE}") as out:
            torch.save(state, out)
        ray.train.report(
            dict(entry),
            checkpoint=ray.train.Checkpoint(path=path, filesystem=fs),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
    else:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(entry), checkpoint=checkpoint, checkpoint_dir_name=name)


def drop_lone_process_group() -> None:
    """Destroy torch.distributed's default process group where this process is its only rank.

    Ray Train sets one up for any number of workers; one has nothing to exchange (Comm and DDP
    are skipped at world size 1), and gloo's transport thread wakes 100 times a second, each
    wake-up taking a CPU from a compute thread. Ray Train destroys no group of 1 at shutdown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


def ddp_allreduce(model: nn.Module, shared_memory: bool) -> str:
    """How `model` sums gradients across ranks; for a CPU DDP model with `shared_memory`, first
    try the same-host shared-memory hook (collective: src.allreduce). Returns "none" (not DDP),
    "shared memory", or the process group's backend (gloo, nccl)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return "none"
    import torch.distributed as dist

    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if shared_memory and on_cpu:
        from src.allreduce import SharedMemoryAllReduce

        reducer = SharedMemoryAllReduce.connect(model.process_group)
        if reducer is not None:
            model.register_comm_hook(None, reducer.hook)
            return "shared memory"
    return str(dist.get_backend(model.process_group))


def ddp_options(device: torch.device, shared_memory: bool, one_host: bool) -> dict[str, Any]:
    """The workers' DistributedDataParallel options. DDP's per-step broadcast of rank 0's
    BatchNorm buffers is one more collective each step for nothing: only rank 0's buffers are
    ever used (validated and saved) and they are its own either way; run_epochs copies them to
    every rank once per epoch instead. Gradients are views into DDP's buckets (no copy).

    CPU ranks that all share a host (`one_host`) with `shared_memory` sum their gradients
    through src.allreduce, synchronously in the backward pass: nothing overlaps the exchange,
    and each exchange is a point where the faster rank waits for the slower. There the
    gradients go in one bucket (up to DDP's 25 MiB), not in DDP's default small first bucket
    (1 MiB, to start a GPU's or a network's transfer early) and then the rest: one wait a step
    instead of two (the default network's 421,738 gradients: 402,826 + 18,912 by default).
    With src.allreduce dividing in its copy, alternated with the former two buckets in 80
    rounds of 30 steps (2 ranks x 1 thread, 2026-12-02, AMD EPYC): each rank waited 1.60 ms
    a step instead of 1.69 and the pair trained 2.2% more images/s, faster in 51 rounds."""
    options: dict[str, Any] = {**no_buffer_sync(), "gradient_as_bucket_view": True}
    if device.type == "cpu" and shared_memory and one_host:
        options["bucket_cap_mb"] = 25  # DDP's default cap, given: no small first bucket
    return options


def no_buffer_sync() -> dict[str, bool]:
    """DDP's option to skip the per-step buffer broadcast: `forward_sync_buffers` from torch
    2.13 (`broadcast_buffers` is deprecated there), `broadcast_buffers` before it."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def machine_resources() -> dict[str, float]:
    """CPUs this process may use and visible GPUs: what a local Ray instance gets."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(
    train: TrainParams, resources: dict[str, float], where: str, node_cpus: float | None = None
) -> bool:
    """Fail fast (one line) when the workers cannot all be placed; return whether to use GPUs.

    Args:
        train: the train params (num_workers, cpus_per_worker, use_gpu, precision).
        resources: total CPU and GPU of the machine or cluster.
        where: how to name it in a message ("this machine", "the Ray cluster at ...").
        node_cpus: the most CPUs on one node, if known (a worker cannot span nodes).
    Returns:
        use_gpu: True for use_gpu=true, or auto with at least one GPU per worker.
    """
    n, c = train.num_workers, train.cpus_per_worker
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if train.use_gpu is True and gpus < n:
        raise PipelineError(
            f"train.use_gpu: true needs {n} GPUs (one per worker, train.num_workers) "
            f"but {where} has {gpus:g}"
        )
    use_gpu = train.use_gpu is True or (train.use_gpu == "auto" and gpus >= n)
    if n * c > cpus:
        raise PipelineError(
            f"train.num_workers {n} x train.cpus_per_worker {c} needs {n * c} CPUs "
            f"but {where} has {cpus:g}"
        )
    if node_cpus is not None and c > node_cpus:
        raise PipelineError(
            f"train.cpus_per_worker {c} is more than any node of {where} has ({node_cpus:g})"
        )
    if train.precision == "fp16" and not use_gpu:
        raise PipelineError("train.precision: fp16 autocast needs a GPU; use bf16 or fp32 on CPU")
    return use_gpu


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the cluster at RAY_ADDRESS does not answer (ray.init would
    otherwise retry for a long time)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"RAY_ADDRESS={address}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise PipelineError(
            f"RAY_ADDRESS={address}: Ray cluster unreachable ({type(e).__name__})"
        ) from None


@dataclass
class Cluster:
    """The Ray instance a stage uses: its resources, how to name it in messages, and whether it
    is local (started here or in this process, not a cluster at RAY_ADDRESS)."""

    resources: dict[str, float]
    node_cpus: float | None
    where: str
    local: bool


# Ray Train settings the driver passes on to the controller and the workers (Ray propagates
# these variables from the driver's environment, also on a remote cluster).
RAY_TRAIN_ENV = {
    # print() in workers goes straight to stdout: one line per epoch, not two via its logger
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # no INFO line per ray.train.report on the console (LoggingConfig does not reach it)
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    # the controller polls workers every 0.5 s instead of 2 s: fit() returns seconds sooner
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
# Locally only: nothing to preempt, and its actor logs a core-worker error line on every run.
RAY_TRAIN_LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# The workers' torch: CPU tensors of 2 MiB and more on transparent huge pages (madvise), fewer
# TLB misses in the convolutions: 3-11% more images/s on 2 cores, through Ray or not (6 paired
# rounds, BENCHMARKS.md). Torch reads it once per process, at its first CPU tensor, so it must be
# there from the start: locally the workers inherit it from the driver, on a cluster the runtime
# env carries it.
WORKER_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables that are not already set, and restore them afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def ray_address() -> str | None:
    """The Ray cluster the stage runs on ($RAY_ADDRESS), or None for a local instance."""
    return os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session() -> Iterator[Cluster]:
    """Connect to $RAY_ADDRESS (shipping this project's code as the workers' working dir) or
    start a local Ray sized to this machine (no dashboard); shut down (or disconnect) at the end.

    When Ray is already initialised in this process (a benchmark alternating runs), use that
    instance as it is and leave it running.
    """
    import logging

    import ray

    address = ray_address()
    kwargs: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        # Ray's own actors (e.g. Train's placement-group cleaner, which warns every few seconds
        # that the state API is off without the dashboard) log errors only; our workers print.
        "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
    }
    env = {**RAY_TRAIN_ENV, **WORKER_ENV}
    owned = not ray.is_initialized()
    if not owned:
        where = "the Ray instance of this process"
    elif address:
        check_ray_address(address)
        where = f"the Ray cluster at RAY_ADDRESS={address}"
        kwargs["runtime_env"] = {
            "working_dir": str(CODE_ROOT),
            "excludes": RUNTIME_EXCLUDES,
            "env_vars": {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()},
        }
    else:
        where = "this machine"
        env.update(RAY_TRAIN_LOCAL_ENV)
        res = machine_resources()
        kwargs.update(num_cpus=int(res["CPU"]), num_gpus=int(res["GPU"]), include_dashboard=False)
    with _environ(env):
        try:
            if owned:
                ray.init(address=address or None, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PipelineError(f"RAY_ADDRESS={address}: cannot connect to Ray ({first})") from None
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
            yield Cluster(dict(ray.cluster_resources()), node_cpus, where, local=not address)
        finally:
            if owned:
                ray.shutdown()


def _worker_error(e: BaseException) -> str:
    """One line for a failed fit: the first worker's error message, else the error's own."""
    failures = getattr(e, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", None) or failure
        lines = [s for s in str(cause).strip().splitlines() if s.strip()]
        if lines:
            return lines[-1].strip()
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def fit(
    spec: LoopSpec,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    storage: str,
    use_gpu: bool,
    train: TrainParams,
    local: bool,
    track: dict[str, str] | None = None,
) -> Any:
    """Run TorchTrainer.fit on the connected Ray instance; resume run `name` if it has checkpoints.

    Args:
        spec, images, labels: what the workers train on (arrays go through the object store).
        name, storage: the Ray run (folder `storage/name`): same name and storage = resume.
        use_gpu: one GPU per worker.
        train: scaling, checkpoint and failure settings.
        local: the Ray instance is local (Cluster.local): see lean_trainer.
        track: {"uri", "run_id"} of the MLflow run rank 0 logs epochs to, or None.
    Returns:
        Ray's Result (checkpoints kept: the best train.keep_checkpoints by val_accuracy + latest).
    Raises:
        PipelineError with the worker's error when training fails past train.max_failures.
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    fault = json.loads(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None
    per_worker = {"CPU": train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = lean_trainer(TorchTrainer, local=local)(
        train_loop_per_worker,
        train_loop_config={
            "spec": asdict(spec),
            "data": [ray.put(images), ray.put(labels)],
            "tracking": track,
            "fault": fault,
            "in_place": local,  # report_epoch: the run folder is on this machine
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.keep_checkpoints,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=train.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except TrainingFailedError as e:
        raise PipelineError(
            f"train: training failed (train.max_failures={train.max_failures}): {_worker_error(e)}"
        ) from None
    except SystemExit:
        # Ray Train's own Ctrl-C handler aborts the run, then calls sys.exit(0): an interrupted
        # training must not look like a finished one (exit 0 to DVC), so it is a Ctrl-C here.
        raise KeyboardInterrupt from None
    finally:
        if main:  # fit() leaves that handler installed, bound to a controller now gone
            signal.signal(signal.SIGINT, sigint)


def lean_trainer(base: type, *, local: bool) -> type:
    """`base` (Ray's TorchTrainer) without the helper actors of Ray Train v2 this stage does not
    need: the DatasetManager (it serves Ray Data shards; the stage passes arrays through the
    object store, never a Ray Dataset) and, on a local Ray instance (`local`: it ends with the
    stage, and its shutdown frees every placement group), the detached PlacementGroupCleaner
    (it frees the workers' placement group should the controller die on a long-lived cluster)
    and the AutoscalingCoordinator (it forwards the run's resource requests to a cluster
    autoscaler, which a local instance does not have: a fixed worker count is then run by a
    policy that sends none).

    Each Ray process wakes 100 times a second, and the cleaner also queries the actor state
    every second: on a machine whose cores all train, each wake-up preempts a compute thread
    whose partner then waits at the next barrier (4 idle Ray actors cost the plain loop 3.3% of
    its speed, 15 paired epochs). Without the first two, 1 worker through Ray Train trained at
    0.976 of the plain loop's speed instead of 0.932 (4 rounds, 2 Intel cores; see
    BENCHMARKS.md, item 1). Overrides the trainer's private `_create_default_callbacks` and
    `_initialize_and_run_controller` (ray is pinned in constraints.txt); where Ray has no such
    methods or classes, `base` is returned.
    """
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
    except ImportError:  # another Ray Train (v1, or v2 moved on): the trainer as it is
        return base
    if not all(
        callable(getattr(base, m, None))
        for m in ("_create_default_callbacks", "_initialize_and_run_controller")
    ):
        return base
    cleaner = (PlacementGroupCleanerCallback,) if local else ()

    class FixedWithoutAutoscaler(FixedScalingPolicy):  # type: ignore[misc, valid-type]
        """Ray's fixed worker count, sending no resource requests (so no coordinator actor)."""

        def after_controller_start(self, train_run_context: Any) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

    class LeanTrainer(base):  # type: ignore[misc, valid-type]
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            policy = kwargs.get("scaling_policy")
            if local and type(policy) is FixedScalingPolicy:
                kwargs["scaling_policy"] = FixedWithoutAutoscaler(policy.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

        def _create_default_callbacks(self) -> list[Any]:
            drop = cleaner + (() if self.datasets else (DatasetsCallback,))
            return [c for c in super()._create_default_callbacks() if not isinstance(c, drop)]

    LeanTrainer.__name__ = LeanTrainer.__qualname__ = base.__name__
    return LeanTrainer


def best_checkpoint(result: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(state of the best kept checkpoint by val_accuracy, ties to the later epoch; the full
    history from the latest checkpoint)."""
    kept = result.best_checkpoints or []
    if not kept or result.checkpoint is None:
        raise PipelineError("train: the Ray run reported no checkpoint")
    ckpt, _ = max(kept, key=lambda cm: (cm[1]["val_accuracy"], cm[1]["epoch"]))
    with ckpt.as_directory() as folder:
        best = load_state(Path(folder) / STATE_FILE)
    with result.checkpoint.as_directory() as folder:
        history = load_state(Path(folder) / STATE_FILE)["history"]
    return best, history


def run_ray(params: Params, processed: Any, storage: str | os.PathLike) -> list[dict[str, Any]]:
    """The Ray path of the stage without MLflow or outputs: TorchTrainer.fit on the processed
    data, from scratch, returning the per-epoch history (the benchmark's counterpart of
    run_local). Uses an already initialised Ray, else starts (and stops) one like the stage.

    Args:
        params: validated params (train.num_workers etc. as for the stage).
        processed: `src.preprocess.load_processed(...)` output.
        storage: a folder for the run's checkpoints (a fresh run folder is made in it).
    """
    spec = loop_spec(params, processed.meta)
    name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns()}"
    with ray_session() as cluster:
        use_gpu = check_resources(params.train, cluster.resources, cluster.where, cluster.node_cpus)
        result = fit(
            spec, np.asarray(processed.train_images), np.asarray(processed.train_labels),
            name=name, storage=str(Path(storage).resolve()), use_gpu=use_gpu, train=params.train,
            local=cluster.local,
        )  # fmt: skip
    return best_checkpoint(result)[1]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


class RunFolder:
    """Small JSON files in the Ray run's folder `storage/name` (local, NFS or s3:// alike)."""

    def __init__(self, storage: str, name: str) -> None:
        import pyarrow.fs

        self.storage, self.name = storage, name
        self.fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        self.path = f"{base.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def claim(self, wait: float | None = None) -> Iterator[None]:
        """Hold the run for this stage: an exclusive lock on `storage/.name.lock` (local or NFS
        storage; an object store has no locks, and then nothing is held). A second stage of
        the same run waits up to `wait` s (default: as long as an interrupted stage may take to
        stop) and then fails in one line: a queued twin experiment, or a `dvc repro` started
        while an interrupted stage still cleans up (at Ctrl-C, /bin/sh as dash dies at once
        and dvc returns before its stage has stopped)."""
        import pyarrow.fs

        try:
            import fcntl
        except ImportError:  # not POSIX
            fcntl = None
        if fcntl is None or not isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            yield
            return
        wait = ABANDON_GRACE + ABANDON_HOOK_WAIT + 15.0 if wait is None else wait
        lock = Path(self.path).parent / f".{self.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as f:  # not inherited by the processes the stage starts
            deadline, told = time.monotonic() + wait, False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    f.seek(0)
                    holder = f.read().strip() or "unknown"
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"train.storage_path: run {self.name} is in use by another train stage "
                        f"(pid {holder}, lock {lock}); wait for it to end or stop it"
                    )
                if not told:
                    print(f"waiting for the train stage (pid {holder}) that holds run "
                          f"{self.name} to end", flush=True)  # fmt: skip
                    told = True
                time.sleep(0.2)
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self, filename: str) -> dict[str, Any] | None:
        """The JSON in `filename`, or None when absent or unreadable."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{filename}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def write(self, filename: str, obj: dict[str, Any]) -> None:
        """Write `obj` as JSON to `filename` (the folder is created)."""
        self.fs.create_dir(self.path, recursive=True)
        tmp = f"{self.path}/.{filename}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, indent=2).encode())
        self.fs.move(tmp, f"{self.path}/{filename}")

    def delete(self) -> None:
        """Remove the whole run folder (its checkpoints too)."""
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self.path)


def storage_uri(storage_path: str, root: Path) -> str:
    """train.storage_path as Ray needs it: URIs as they are, local paths absolute (Ray changes
    the workers' working directory; relative ones under the DVC repository's root, so queued
    experiments share one checkpoint store)."""
    if "://" in storage_path:
        return storage_path
    return str((shared_root(root) / storage_path).resolve())


def data_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of the training split and meta.json: the data part of the run's identity."""
    h = hashlib.sha256()
    for name in ("meta.json", "train_images.npy", "train_labels.npy"):
        path = Path(folder) / name
        h.update(name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def run_key(params: Params, data_hash: str) -> str:
    """A short hash of everything that decides the numbers: model, train (but NOT_IN_RUN_KEY),
    seed and data. Same key = same run to resume."""
    train = {
        k: v for k, v in params.train.model_dump(mode="json").items() if k not in NOT_IN_RUN_KEY
    }
    blob = json.dumps(
        {"model": params.model.model_dump(mode="json"), "train": train,
         "seed": params.base.seed, "data": data_hash},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@contextlib.contextmanager
def sigterm_as_interrupt(on_abandon: Callable[[], None] | None = None) -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C (KeyboardInterrupt), so a killed stage still marks its MLflow
    run and shuts Ray down; the next run resumes from the last checkpoint.

    Run by DVC (DVC_STAGE set), the stage also stops this way when the dvc process that started
    it dies: `dvc repro` does not pass a SIGTERM on to its stage, and an orphaned training
    would go on alone, racing the next `dvc repro` for the same checkpoints. Should the stage
    still be alive ABANDON_GRACE s later (its clean-up stuck), it prints every thread's stack,
    calls `on_abandon` (e.g. mark the MLflow run KILLED) and exits at once; the processes of a
    Ray instance it started share its fate.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    done = threading.Event()
    if os.environ.get("DVC_STAGE"):
        watch = threading.Thread(
            target=_stop_with_parent,
            args=(launcher_chain(), done, on_abandon),
            name="parent-watch",
            daemon=True,
        )
        watch.start()
    try:
        yield
    finally:
        done.set()
        signal.signal(signal.SIGTERM, previous)


ABANDON_GRACE = 60.0
ABANDON_HOOK_WAIT = 15.0
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh"})


def launcher_chain(limit: int = 4) -> list[int]:
    """The pids from this process's parent up to the first one that is not a shell: the
    process that started the stage. DVC runs a stage as `$SHELL -c CMD`, and some shells
    (/bin/sh as dash, where SHELL is unset) do not exec CMD but wait for it: the stage's parent
    is then a shell that lives on when dvc dies."""
    import psutil

    chain = [os.getppid()]
    with contextlib.suppress(psutil.Error):
        while len(chain) < limit and psutil.Process(chain[-1]).name() in SHELLS:
            chain.append(psutil.Process(chain[-1]).ppid())
    return chain


def _chain_holds(chain: list[int]) -> bool:
    """Every process of `chain` is still the parent of the one before it (a process whose
    parent dies is re-parented, so a broken link means an ancestor is gone)."""
    import psutil

    if os.getppid() != chain[0]:
        return False
    try:
        return all(psutil.Process(c).ppid() == p for c, p in itertools.pairwise(chain))
    except psutil.Error:
        return False


def _stop_with_parent(
    chain: list[int],
    done: threading.Event,
    on_abandon: Callable[[], None] | None = None,
    every: float = 0.5,
) -> None:
    """SIGTERM this process once the process that started it is gone (`chain`: see
    launcher_chain), unless `done`; exit hard if it is still here ABANDON_GRACE s later,
    whether its clean-up or its exit hung."""
    import faulthandler

    while not done.wait(every):
        if not _chain_holds(chain):
            break
    else:
        return
    # The backstop needs no GIL: faulthandler's own C thread dumps the stacks and exits should
    # the Python below never run again (a C call that holds the GIL and hangs).
    faulthandler.dump_traceback_later(ABANDON_GRACE + ABANDON_HOOK_WAIT + 5.0, exit=True)
    deadline = time.monotonic() + ABANDON_GRACE
    # to the main thread itself: a signal another thread takes does not wake a blocked call
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    stopped = done.wait(ABANDON_GRACE)
    # after a clean stop the process exits by itself; its exit can hang too (a non-daemon
    # thread, an atexit hook), so the deadline holds either way
    time.sleep(max(0.0, deadline - time.monotonic()))
    print(
        f"error: interrupted: the dvc process that ran this stage is gone and the stage did not "
        f"{'exit' if stopped else 'stop'} within {ABANDON_GRACE:.0f} s; stopping hard "
        f"(stacks below)",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback(all_threads=True)
    if on_abandon is not None and not stopped:
        last = threading.Thread(target=on_abandon, name="abandon", daemon=True)
        last.start()
        last.join(ABANDON_HOOK_WAIT)
    os._exit(143)


def model_extra(meta: dict[str, Any]) -> dict[str, Any]:
    """What models/model.pt carries beside the weights: classes, normalisation, preprocessing."""
    return {
        "class_names": [str(c) for c in meta["class_names"]],
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "image_size": int(meta["image_size"]),
        "channels": int(meta["channels"]),
        "preprocess": dict(meta["preprocess"]),
    }


def summary_metrics(best: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics/train.json: the chosen epoch's numbers, and the median epoch throughput."""
    return {
        "best_epoch": int(best["epoch"]),
        "epochs": len(history),
        "train_loss": best["train_loss"],
        "train_accuracy": best["train_accuracy"],
        "val_loss": best["val_loss"],
        "val_accuracy": best["val_accuracy"],
        "images_per_sec": statistics.median(e["images_per_sec"] for e in history),
    }


def write_plots(folder: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """Per-epoch curves for DVC, written by DVCLive: `folder`/<metric>.tsv (columns step =
    epoch, value), and curves.png (loss and accuracy, train and validation). The folder appears whole (atomic); DVCLive's own params, dvc.yaml and summary
    are left out (params.yaml and metrics/train.json hold them)."""
    from dvclive import Live

    folder = Path(folder).resolve()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(folder) as tmp:
        # DVCLive looks for a repository from the working directory: it would `dvc init` a Git
        # repo without DVC and fails in one without commits. From a scratch folder it finds
        # none and only writes files (DVC reads them as plots of the stage).
        os.chdir(scratch)
        try:
            with Live(dir="live", save_dvc_exp=False, dvcyaml=None, report=None) as live:
                for entry in history:
                    live.step = int(entry["epoch"])
                    for key, value in entry.items():
                        if key != "epoch":
                            live.log_metric(key, value)
        finally:
            os.chdir(cwd)
        for tsv in (Path(scratch) / "live" / "plots" / "metrics").glob("*.tsv"):
            shutil.move(tsv, tmp / tsv.name)
        from src.evaluate import plot_curves

        plot_curves(history, tmp / "curves.png")


def train_stage(params: Params, root: str | os.PathLike = ".") -> dict[str, Any]:
    """The train stage: train with Ray Train, track in MLflow, write models/, metrics/, plots/.

    Args:
        params: validated params.
        root: the project folder (paths.* are relative to it; the SQLite store is there).
    Returns:
        metrics/train.json's content plus run_id.
    Raises:
        PipelineError (one line) for missing data, impossible resources, an unreachable
        RAY_ADDRESS or tracking server, or training that fails past train.max_failures.
    """
    from src.preprocess import load_processed

    root = Path(root).resolve()
    t, paths = params.train, params.paths
    processed_dir = root / paths.processed
    data = load_processed(processed_dir)
    spec = loop_spec(params, data.meta)
    training_split(spec, data.train_labels)  # before starting anything: fail in a second
    if address := ray_address():
        check_ray_address(address)
    else:
        check_resources(t, machine_resources(), "this machine")
    data_hash = data_fingerprint(processed_dir)
    key = run_key(params, data_hash)
    storage = storage_uri(t.storage_path, root)
    ray_name = f"train-{key}"
    folder = RunFolder(storage, ray_name)
    uri = tracking.setup(root)  # an unreachable store fails here, before anything is written
    with folder.claim():
        return _train_run(params, root, data, spec, folder, data_hash, uri)


def _train_run(
    params: Params,
    root: Path,
    data: Any,
    spec: LoopSpec,
    folder: RunFolder,
    data_hash: str,
    uri: str,
) -> dict[str, Any]:
    """train_stage's work once it holds the run's folder: see train_stage."""
    t, paths = params.train, params.paths
    storage, ray_name, key = folder.storage, folder.name, folder.name.removeprefix("train-")
    if folder.read(DONE_FILE) is not None:  # that run finished: train anew, don't "resume" it
        folder.delete()

    experiment_id = tracking.get_or_create_experiment(t.experiment, root)
    run_name = os.environ.get("DVC_EXP_NAME") or f"train-{key[:8]}"
    opened: dict[str, str] = {}  # the MLflow run once open: marked KILLED if the stage is abandoned

    def abandon() -> None:
        if "run_id" in opened:
            tracking.end_run(opened["run_id"], "KILLED")

    # SIGTERM handler after ray.init, which installs its own (exit without marking the run)
    with ray_session() as cluster, sigterm_as_interrupt(abandon):
        import ray

        use_gpu = check_resources(t, cluster.resources, cluster.where, cluster.node_cpus)
        tags = {
            "stage": "train",
            "git_commit": tracking.git_commit(root),
            "data_md5": tracking.lock_out_md5(root, "preprocess", paths.processed) or "absent",
            "data_sha256": data_hash,
            "ray_version": ray.__version__,
            "torch_version": torch.__version__,
            "num_workers": str(t.num_workers),
            "device": "cuda" if use_gpu else "cpu",
            "ray_run": f"{storage}/{ray_name}",
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        }
        previous = (folder.read(MLFLOW_RUN_FILE) or {}).get("run_id")
        run_id, resumed = tracking.open_run(experiment_id, run_name, tags, previous)
        opened["run_id"] = run_id
        folder.write(MLFLOW_RUN_FILE, {"run_id": run_id, "tracking_uri": tracking.redacted(uri)})
        if resumed:
            print(f"resuming {ray_name} (MLflow run {run_id})", flush=True)
        # Rank 0 logs each epoch as it ends, unless the store is a file on this machine and the
        # workers may run on others (RAY_ADDRESS): then the driver logs them all after fit.
        local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        track = None if local_store and not cluster.local else {"uri": uri, "run_id": run_id}
        try:
            tracking.log_params(run_id, params.flat())
            result = fit(
                spec, np.asarray(data.train_images), np.asarray(data.train_labels),
                name=ray_name, storage=storage, use_gpu=use_gpu, train=t,
                local=cluster.local, track=track,
            )  # fmt: skip
            best, history = best_checkpoint(result)
            _ensure_finite(history)
        except BaseException as e:
            tracking.end_run(run_id, _end_status(e))
            raise

    try:
        metrics = write_outputs(params, root, data.meta, best, history, run_id)
        tracking.write_run_file(
            root / paths.models / "run.json",
            {
                "run_id": run_id,
                "experiment_id": experiment_id,
                "experiment_name": t.experiment,
                "run_name": run_name,
                "tracking_uri": tracking.redacted(uri),
            },
        )
    except BaseException as e:
        tracking.end_run(run_id, _end_status(e))
        raise
    folder.write(DONE_FILE, {"run_id": run_id, "epochs": len(history)})
    if t.keep_runs is not None:
        removed = prune_runs(storage, t.keep_runs, ray_name)
        if removed:
            print(f"train.keep_runs {t.keep_runs}: removed the checkpoints of {len(removed)} "
                  f"older finished run(s): {', '.join(removed)}", flush=True)  # fmt: skip
    return {**metrics, "run_id": run_id}


def prune_runs(storage: str, keep: int, current: str) -> list[str]:
    """train.keep_runs: delete the run folders in `storage` of finished runs (those with a
    DONE_FILE) beyond the `keep` most recently finished, `current` always counted among them.

    Runs that did not finish (resumable) and runs a train stage holds are never touched; a
    finished run's model lives on in its models/model.pt and its MLflow run. Returns the names
    of the folders deleted, oldest first.
    """
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    base = base.rstrip("/")
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        runs = [e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory]
        done = fs.get_file_info([f"{base}/{n}/{DONE_FILE}" for n in runs])
    except OSError as e:
        print(f"train.keep_runs: could not list {storage} ({e}); nothing removed", flush=True)
        return []
    finished = sorted(
        (info.mtime, name)
        for name, info in zip(runs, done, strict=True)
        if name.startswith("train-") and name != current and info.type == pyarrow.fs.FileType.File
    )
    removed = []
    for _, name in finished[: max(len(finished) - (keep - 1), 0)]:
        folder = RunFolder(storage, name)
        try:
            with folder.claim(wait=0):  # held by a stage (re-training it): leave it to that one
                folder.delete()
        except PipelineError:
            continue
        removed.append(name)
    return removed


def write_outputs(
    params: Params,
    root: Path,
    meta: dict[str, Any],
    best: dict[str, Any],
    history: list[dict[str, Any]],
    run_id: str,
) -> dict[str, Any]:
    """Write model.pt, metrics/train.json and the plots (each atomically), complete the MLflow
    run's epochs, log the models into it and mark it FINISHED. Returns train.json's content.

    Args:
        best: the chosen checkpoint's state (weights, model config, history up to it).
        history: every epoch of the run.
    """
    paths = params.paths
    net = CNN(CNNConfig(**best["model_config"]))
    net.load_state_dict(best["model"])
    net.eval()
    model_path = root / paths.models / "model.pt"
    save_checkpoint(model_path, net, model_extra(meta))
    metrics = summary_metrics(best["history"][-1], history)
    write_json(root / paths.metrics / "train.json", metrics)
    write_plots(root / paths.plots / "train", history)
    tracking.log_epochs(tracking.setup(root), run_id, history)  # epochs rank 0 did not log
    with tracking.active_run(run_id):
        side, channels = int(meta["image_size"]), int(meta["channels"])
        # batch 2: an example batch of 1 would fix the exported model's batch size to 1
        example = np.zeros((2, channels, side, side), dtype=np.float32)
        tracking.log_torch_model(net, example)
        from src.registry import log_pyfunc_model

        log_pyfunc_model(model_path)
        tracking.set_tag(run_id, "best_epoch", str(metrics["best_epoch"]))
    tracking.log_to_run(run_id, {}, {"plots": [root / paths.plots / "train" / "curves.png"]})
    return metrics


def _end_status(e: BaseException) -> str:
    """The MLflow status of a run that stopped on `e`: interrupted (KILLED) or FAILED."""
    return "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"


def _ensure_finite(history: list[dict[str, Any]]) -> None:
    """A diverged run (NaN loss) is an error, not a model."""
    for e in history:
        if not math.isfinite(e["train_loss"]):
            raise PipelineError(
                f"train: loss became {e['train_loss']} at epoch {e['epoch']}; lower train.lr"
            )
