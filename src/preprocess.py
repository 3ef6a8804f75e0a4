"""The preprocess stage over a dataset: chunks in worker processes; the processed-data writer and
reader. What is done to each image (albumentations resize, pad, augment) is src.transforms.

Processed data (one folder, `paths.processed`):
    train_images.npy  uint8 (N, S, S, C): the N0 originals (resized + padded, not augmented) in
                      rows 0..N0-1, then `augment_copies` blocks of N0 augmented copies in the
                      same order, so row r comes from original r % N0.
    train_labels.npy  int64 (N,);  test_images.npy / test_labels.npy likewise (no augmentation).
    meta.json         class names, channels, final side S, counts, per-channel mean/std (0-1
                      scale, training originals), source, and the `preprocess` dict that
                      `prepare_images` needs to treat new images like the test split.
    samples.png       originals beside their augmented copies, to see what the policy does.

Determinism: the augmentation of chunk i (copy c) draws from a generator seeded with
(base.seed, i, c); chunks are cut by `preprocess.chunk_size` alone, so the outputs are
byte-identical across runs and across `preprocess.workers`. (Changing chunk_size changes which
random draws an image gets; it is a param, so DVC reruns the stage.)

albumentations is imported on first use (it takes ~2.5 s), so `load_processed` stays cheap for
the stages that only read processed data.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from src.data import Dataset, load_source
from src.errors import PipelineError
from src.files import atomic_dir, read_json, write_json
from src.transforms import (
    build_augment,
    make_eval_transform,
    preprocess_meta,
    resize_pad,
    step_dict,
)

ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
SAMPLE_ORIGINALS, SAMPLE_COPIES = 12, 5  # samples.png: originals shown, augmented copies of each


def chunk_rng(seed: int, chunk: int, copy: int) -> tuple[np.random.Generator, random.Random]:
    """The random state for augmented copy `copy` of chunk `chunk`: a function of these alone."""
    rng = np.random.default_rng([seed % 2**64, chunk, copy])  # seed sequences take no negatives
    return rng, random.Random(int(rng.integers(2**63)))


_WORKER: dict[str, Any] = {}  # per process: transforms and output maps, set up by _init_worker


def _init_worker(
    preprocess: dict, augment: list, seed: int, source: str, out_dir: str, num_originals: int
) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would oversubscribe
    _WORKER.clear()
    try:
        out = Path(out_dir)
        _WORKER.update(
            preprocess=preprocess,
            seed=seed,
            source=source,
            num_originals=num_originals,
            eval=make_eval_transform(preprocess),
            augment=build_augment(augment, source),
            # each worker writes its rows straight into the output files: no pixels travel back
            train=np.load(out / "train_images.npy", mmap_mode="r+"),
            test=np.load(out / "test_images.npy", mmap_mode="r+"),
        )
    except Exception as e:  # raised by the first task instead: a Pool whose initializer
        _WORKER["error"] = e  # raises restarts the worker forever, and the stage would hang


def _augment_block(originals: np.ndarray, index: int, copy: int) -> np.ndarray:
    """Augmented copy `copy` of chunk `index` (seeded by base.seed, index, copy alone)."""
    policy, source = _WORKER["augment"], _WORKER["source"]
    policy.set_random_state(*chunk_rng(_WORKER["seed"], index, copy))
    gray = originals.shape[-1] == 1
    block = np.empty_like(originals)
    for i, image in enumerate(originals):
        image = image[:, :, 0] if gray else image  # albumentations keeps gray images 2-D
        try:
            result = policy(image=image)["image"]
        except PipelineError:
            raise
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise PipelineError(
                f"{source}: preprocess.augment failed: {type(e).__name__}: {first}"
            ) from None
        if result.shape != image.shape:
            raise PipelineError(
                f"{source}: preprocess.augment changes the image shape from {image.shape} to "
                f"{result.shape}; the policy must keep the size"
            )
        block[i] = result.reshape(block.shape[1:])
    return block


def _process_chunk(task: tuple) -> tuple:
    """Worker: resize+pad one chunk and write it; for training chunks also its augmented copies.

    Returns (split, per-channel pixel sums, sums of squares) of the originals (None for test):
    exact integers, so their total does not depend on the order chunks finish in.
    """
    if "error" in _WORKER:
        raise _WORKER["error"]
    split, index, start, images, copies = task
    originals = resize_pad(images, _WORKER["eval"], _WORKER["preprocess"])
    stop = start + len(originals)
    out = _WORKER[split]
    out[start:stop] = originals
    if split == "test":
        return split, None, None
    n0 = _WORKER["num_originals"]
    for copy in range(1, copies + 1):
        out[copy * n0 + start : copy * n0 + stop] = _augment_block(originals, index, copy)
    flat = originals.reshape(-1, originals.shape[-1])
    sums = flat.sum(axis=0, dtype=np.uint64)
    squares = np.square(flat, dtype=np.uint32).sum(axis=0, dtype=np.uint64)
    return split, sums, squares


_FORKED_TASKS: list[tuple] = []  # the tasks, set before a fork: workers read them from there


def _process_forked(k: int) -> tuple:
    """Worker (forked): task `k`, whose pixels are the parent's, shared copy-on-write: nothing
    is pickled or copied to reach the worker."""
    return _process_chunk(_FORKED_TASKS[k])


def _mp_context():
    """How to start workers: fork where it is safe, else a clean single-threaded start.

    fork (Linux, and no other thread in this process: the pool is made before tqdm's monitor)
    gives workers the imported albumentations in milliseconds. A process with threads (e.g. a
    test session that started Ray or MLflow) could deadlock a forked child on a lock held at
    fork time, so it uses forkserver (spawn where that is missing, e.g. Windows).
    """
    import multiprocessing as mp
    import threading

    if sys.platform == "linux" and threading.active_count() == 1:
        return mp.get_context("fork")
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["albumentations", "src.preprocess"])
        return ctx
    return mp.get_context("spawn")


@contextlib.contextmanager
def _cv2_threads(n: int) -> Iterator[None]:
    import cv2

    old = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(old)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(total: int, quiet: bool):
    """A tqdm bar, or a stand-in when quiet: even a disabled tqdm starts a monitor thread,
    which would make the next pool in this process start without fork."""
    if quiet:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="preprocess")


def run_chunks(
    tasks: list[tuple],
    workers: int,
    initargs: tuple,
    on_result: Callable[[tuple], None],
    *,
    quiet: bool,
    total: int,
) -> None:
    """Run `_process_chunk` over `tasks` on `workers` processes; call `on_result` in task order.

    At most 2 x workers chunks are in flight, so the queues never hold more than that many
    chunks' input pixels; forked workers read theirs from this process's memory instead (shared,
    never copied). One worker runs in this process (no pool).
    """
    if workers <= 1:
        with _cv2_threads(1), _progress(total, quiet) as bar:
            _init_worker(*initargs)
            try:
                for task in tasks:
                    on_result(_process_chunk(task))
                    bar.update(len(task[3]))
            finally:
                _WORKER.clear()  # drop this process's maps of the output files
        return
    ctx = _mp_context()
    forked = ctx.get_start_method() == "fork"
    _FORKED_TASKS[:] = tasks if forked else []
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
            pending: deque = deque()
            with _progress(total, quiet) as bar:
                for k, task in enumerate(tasks):
                    call = (_process_forked, (k,)) if forked else (_process_chunk, (task,))
                    pending.append((len(task[3]), pool.apply_async(*call)))
                    while len(pending) >= 2 * workers:
                        n, result = pending.popleft()
                        on_result(result.get())
                        bar.update(n)
                while pending:
                    n, result = pending.popleft()
                    on_result(result.get())
                    bar.update(n)
    finally:
        _FORKED_TASKS.clear()


# ---------------------------------------------------------------------------------------------
# The stage


def _samples_png(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    num_originals: int,
    copies: int,
    class_names: list[str],
) -> None:
    """A grid of up to 12 originals (one class after another), each followed by up to 5 of its
    augmented copies; short groups are set side by side (up to 4 per row)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = labels[:num_originals]
    picks: list[int] = []
    queues = [list(np.flatnonzero(first == c)[:SAMPLE_ORIGINALS]) for c in range(len(class_names))]
    while len(picks) < min(SAMPLE_ORIGINALS, num_originals) and any(queues):
        for q in queues:
            if q and len(picks) < SAMPLE_ORIGINALS:
                picks.append(int(q.pop(0)))
    group = 1 + min(copies, SAMPLE_COPIES)  # an original and its copies
    per_row = min(4, max(1, 8 // group), len(picks))
    rows, cols = math.ceil(len(picks) / per_row), per_row * group
    fig = Figure(figsize=(1.1 * cols + 0.3, 1.25 * rows + 0.2), dpi=100)
    FigureCanvasAgg(fig)
    gray = images.shape[-1] == 1
    for n, index in enumerate(picks):
        row, slot = divmod(n, per_row)
        for k in range(group):
            ax = fig.add_subplot(rows, cols, row * cols + slot * group + k + 1)
            image = images[index + k * num_originals]
            ax.imshow(
                image[:, :, 0] if gray else image,
                cmap="gray" if gray else None,
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            name = class_names[int(labels[index])]
            ax.set_title(
                name if k == 0 else f"aug {k}",
                fontsize=8,
                fontweight="bold" if k == 0 else "normal",
            )
    fig.tight_layout()
    fig.savefig(path)


def preprocess_dataset(
    ds: Dataset,
    pre,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    quiet: bool = True,
    source: str = "params.yaml",
) -> dict[str, Any]:
    """Resize, pad and augment a Dataset into the processed-data layout, atomically.

    Args:
        ds: from `src.data.load_source`.
        pre: the `preprocess` params section (src.config.PreprocessParams).
        seed: base.seed.
        out_dir: the folder to write (replaced whole, only once complete).
        quiet: no progress bar.
        source: the params file, for error messages.
    Returns:
        The meta dict written to meta.json, plus "seconds" and "workers" (not written).
    Memory: each worker process holds at most one chunk: `chunk_size` input images (decoded at
    full size for image folders, each at most data.max_image_pixels) plus chunk_size x
    (1 + augment_copies) output images; at most 2 x workers chunks are in flight. The outputs
    are written through memory maps, so this process does not hold them either.
    """
    augment = [step_dict(s) for s in pre.augment]  # plain dicts: they travel to the workers
    copies = pre.augment_copies
    if copies and not augment:
        raise PipelineError(
            f"{source}: preprocess.augment_copies is {copies} but preprocess.augment is empty "
            "(the copies would equal the originals); set augment_copies: 0"
        )
    meta_pre = preprocess_meta(pre)
    make_eval_transform(meta_pre)
    build_augment(augment, source)  # fail on a bad policy here, before any worker starts
    side, channels = pre.output_size, ds.channels
    n0, m = len(ds.train_labels), len(ds.test_labels)
    tasks = [
        (split, i, start, images[start : start + pre.chunk_size], copies)
        for split, images in (("train", ds.train_images), ("test", ds.test_images))
        for i, start in enumerate(range(0, len(images), pre.chunk_size))
    ]
    workers = max(1, min(pre.workers or os.cpu_count() or 1, len(tasks)))
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        train = np.lib.format.open_memmap(
            tmp / "train_images.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(n0 * (1 + copies), side, side, channels),
        )
        test = np.lib.format.open_memmap(
            tmp / "test_images.npy", mode="w+", dtype=np.uint8, shape=(m, side, side, channels)
        )
        test.flush()
        train.flush()  # the headers are on disk: the workers open these files by name
        sums = np.zeros(channels, np.uint64)
        squares = np.zeros(channels, np.uint64)

        def add(result: tuple) -> None:
            if result[0] == "train":
                sums[:] += result[1]
                squares[:] += result[2]

        initargs = (meta_pre, augment, seed, source, str(tmp), n0)
        run_chunks(tasks, workers, initargs, add, quiet=quiet, total=n0 + m)
        seconds = time.perf_counter() - t0
        labels = np.tile(ds.train_labels.astype(np.int64), 1 + copies)
        np.save(tmp / "train_labels.npy", labels)
        np.save(tmp / "test_labels.npy", ds.test_labels.astype(np.int64))
        count = float(n0 * side * side)
        mean = [float(s) / count / 255.0 for s in sums]
        std = [
            math.sqrt(max(float(q) / count / 255.0**2 - mu**2, 0.0))
            for q, mu in zip(squares, mean, strict=True)
        ]
        std = [s if s > 1e-6 else 1.0 for s in std]  # a constant channel: leave it unscaled
        meta = {
            "class_names": list(ds.class_names),
            "channels": channels,
            "image_size": side,
            "num_train": len(labels),
            "num_originals": n0,
            "augment_copies": copies,
            "num_test": m,
            "mean": mean,
            "std": std,
            "source": ds.source,
            "preprocess": meta_pre,
        }
        write_json(tmp / "meta.json", meta)
        _samples_png(tmp / "samples.png", train, labels, n0, copies, ds.class_names)
        train.flush()
        test.flush()
        del train, test  # close the memory maps before the folder is renamed
    return {**meta, "seconds": seconds, "workers": workers}


def run(params, *, quiet: bool = False, source: str = "params.yaml") -> dict[str, Any]:
    """The preprocess stage: load `params.data`'s source and write `params.paths.processed`.

    Returns the meta dict plus "seconds" (resize/pad/augment time) and "workers".
    """
    ds = load_source(params.data, seed=params.base.seed)
    return preprocess_dataset(
        ds, params.preprocess, params.base.seed, params.paths.processed, quiet=quiet, source=source
    )


# ---------------------------------------------------------------------------------------------
# Readers, for train / evaluate / the served model


@dataclass(frozen=True)
class Processed:
    """The preprocess stage's outputs: uint8 NHWC images (memory-mapped), int64 labels, meta."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    meta: dict[str, Any]


def load_processed(folder: str | os.PathLike, mmap: bool = True) -> Processed:
    """Open the processed-data folder (arrays memory-mapped unless mmap=False).

    A missing or inconsistent file is a PipelineError naming it.
    """
    folder = Path(folder)
    meta = read_json(folder / "meta.json", "preprocess output")
    arrays = {}
    for name in ARRAYS:
        path = folder / f"{name}.npy"
        if not path.exists():
            raise PipelineError(
                f"{path}: not found (preprocess output); run `dvc repro preprocess` first"
            )
        try:
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise PipelineError(f"{path}: not a readable .npy array ({e})") from None
    side, channels = meta["image_size"], meta["channels"]
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape != (meta[f"num_{split}"], side, side, channels) or labels.shape != (
            len(images),
        ):
            raise PipelineError(
                f"{folder / f'{split}_images.npy'}: shape {images.shape} (labels {labels.shape}) does not "
                f"match meta.json ({meta[f'num_{split}']}, {side}, {side}, {channels}); rerun preprocess"
            )
    return Processed(meta=meta, **arrays)
