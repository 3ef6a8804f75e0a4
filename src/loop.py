"""The epoch loop in plain torch: what each Ray Train worker runs, and the plain baseline too.

Nothing here knows Ray, MLflow or DVC: a worker calls `make_loop` + `run_epochs` with its rank,
world size and device; `run_local` runs the same code in one process (world size 1).

  split_indices      validation held out by ORIGINAL image, stratified and seeded
  epoch_batches      the seeded order of an epoch; rank r takes every world_size-th row
  train_epoch        one pass of SGD; evaluate: loss/correct/count sums over some rows
  make_loop          model, optimizer, schedule and data on a device, optionally from a state
  run_epochs         the epoch loop over a Comm (sums across ranks, or nothing in one process)
  run_local          the plain single-process loop (no Ray): returns the per-epoch history

Decisions (and why):
* Data: the uint8 NHWC arrays are held whole by each process, and each batch is gathered from
  them by row (DeviceData). On a GPU the whole split is copied to the device once and batches
  are gathered there, so the input path cannot starve the GPU.
* Validation: rows of original images held out (with all their augmented copies), evaluated on
  the un-augmented originals, sharded across ranks and summed with all_reduce: the metric covers
  the whole validation split. Rank 0's BatchNorm buffers are broadcast first, so every rank
  evaluates the very model rank 0 checkpoints.
* Determinism: the same seed gives the same initial weights on every rank, and each epoch
  reseeds torch from (seed, epoch, rank) and draws its order from (seed, epoch). A resumed run
  therefore continues exactly as an uninterrupted one (no RNG state to save), and a 2-worker
  epoch sees the same global batches as a 1-worker one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.errors import PipelineError
from src.model import CNN, CNNConfig, SpecError, build_config

if TYPE_CHECKING:  # only for annotations: the loop itself needs torch and numpy alone
    from src.config import Params

# Validation rows per pass: bigger passes gain little on CPU.
EVAL_BATCH = 256
# /proc/cpuinfo flags of the x86 CPUs whose bf16 oneDNN computes in hardware (AMX, AVX-512 BF16);
# elsewhere CPU bf16 is emulated and slower than fp32.
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


class Diverged(PipelineError):
    """The loss became NaN or infinite: training stops at that epoch (a model it is not)."""


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


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere, or when unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or an x86 CPU
    with AMX or AVX-512 BF16 by its /proc/cpuinfo flags (public and stable, unlike torch's own
    CPU probes). Elsewhere CPU bf16 is emulated and slower than fp32, so no."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & CPU_BF16_FLAGS)
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


def ddp_backend(model: nn.Module) -> str:
    """How `model` sums its gradients: "none" (not DDP), else its process group's backend
    (gloo on CPU, nccl on GPUs)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return "none"
    import torch.distributed as dist

    return str(dist.get_backend(model.process_group))


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
    allreduce: str  # how DDP sums gradients: "none" (not DDP) or the process group's backend

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
    prepare_model (DDP when world size > 1)."""
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
    allreduce = ddp_backend(model)
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
        check_finite(entry)
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry, loop, history)
    return history


def check_finite(entry: dict[str, Any]) -> None:
    """Raise Diverged, naming the epoch and the loss, when either loss of `entry` is NaN or
    infinite: every rank sees the same summed losses, so every rank stops at the same epoch."""
    for key in ("train_loss", "val_loss"):
        if not math.isfinite(entry[key]):
            raise Diverged(
                f"train: {key.replace('_', ' ')} became {entry[key]} at epoch {entry['epoch']}; "
                f"nothing was registered (lower train.lr)"
            )


def format_epoch(entry: dict[str, Any], epochs: int) -> str:
    """The one line printed per epoch."""
    return (
        f"epoch {entry['epoch']}/{epochs}  "
        f"train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f}  "
        f"val loss {entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f}  "
        f"{entry['images_per_sec']:,.0f} images/s  lr {entry['lr']:.2e}"
    )


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
