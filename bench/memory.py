"""Item 5: memory. The pipeline's peaks on Fashion-MNIST come with item 2's `dvc repro` runs
(bench/fashion.py); this module checks the preprocess bound empirically.

src/preprocess.py bounds what each worker process holds: one chunk of `chunk_size` inputs and
its chunk_size x (1 + augment_copies) outputs (written through memory maps, so they leave the
process's anonymous memory); the parent queues at most 2 x workers chunks of inputs. The check:
preprocess the same images repeated 1x and 4x (the stage's code, in a fresh process, 2 workers)
and compare each process's peak anonymous memory. A bounded worker stays flat as the data grows;
the parent grows by the source arrays it was given (idx and digits sources are loaded whole;
image folders are decoded by the workers, chunk by chunk).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, check, run_timed
from bench.preprocess_speed import save_dataset
from src.data import Dataset


def repeated(ds: Dataset, factor: int) -> Dataset:
    """`ds` with each split repeated `factor` times."""
    return Dataset(
        np.concatenate([ds.train_images] * factor), np.concatenate([ds.train_labels] * factor),
        np.concatenate([ds.test_images] * factor), np.concatenate([ds.test_labels] * factor),
        ds.class_names, ds.source, ds.channels,
    )  # fmt: skip


def head(ds: Dataset, n: int) -> Dataset:
    """The first n training and n // 5 test images of `ds`."""
    return Dataset(
        ds.train_images[:n], ds.train_labels[:n], ds.test_images[: n // 5],
        ds.test_labels[: n // 5], ds.class_names, ds.source, ds.channels,
    )  # fmt: skip


def preprocess_peaks(
    ds: Dataset, raw: dict[str, Any], out: Path, workers: int = 2
) -> dict[str, Any]:
    """Peak anonymous memory of the preprocess parent and its largest worker (MiB)."""
    raw = copy.deepcopy(raw)
    raw["preprocess"]["workers"] = workers
    dest = Path(tempfile.mkdtemp(dir=out))
    try:
        dataset = save_dataset(ds, dest / "inputs.npz")
        (dest / "params.json").write_text(json.dumps(raw))
        timed = check(
            run_timed(
                [sys.executable, "-m", "bench.preprocess_speed", str(dataset), str(dest)],
                cwd=REPO, sample=0.1, pss_every=1, private=True,
            ),
            "preprocess",
        )  # fmt: skip
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    peak = timed.peak()
    n = len(ds.train_labels) + len(ds.test_labels)
    side = ds.train_images.shape[1]
    return {
        "images": n,
        "source_mib": (ds.train_images.nbytes + ds.test_images.nbytes) / 2**20,
        "output_mib": (
            len(ds.train_labels) * (1 + raw["preprocess"]["augment_copies"]) + len(ds.test_labels)
        )
        * side
        * side
        * ds.channels
        / 2**20,
        "parent_anon_mib": peak["root_anon_mib"],
        "largest_worker_anon_mib": peak["largest_child_anon_mib"],
        # a forked worker's anon includes the parent's source arrays it shares (copy-on-write)
        "largest_worker_private_mib": peak["largest_child_private_mib"],
        "seconds": timed.seconds,
    }


def measure(ds: Dataset, raw: dict[str, Any], out: Path, *, factors: tuple[int, ...] = (1, 4),
            log: Any = print) -> dict[str, Any]:  # fmt: skip
    """The bound check on `ds` (e.g. Fashion-MNIST) with the params `raw` (preprocess section)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for f in factors:
        rows[f] = preprocess_peaks(repeated(ds, f), raw, out)
        log(
            f"  {f}x ({rows[f]['images']} images): parent {rows[f]['parent_anon_mib']:.0f} MiB, "
            f"largest worker {rows[f]['largest_worker_anon_mib']:.0f} MiB anonymous, "
            f"{rows[f]['largest_worker_private_mib']:.0f} MiB of it its own"
        )
    pre = raw["preprocess"]
    chunk, copies = pre["chunk_size"], pre["augment_copies"]
    side = ds.train_images.shape[1] + 2 * pre["pad"]
    lo, hi = rows[min(factors)], rows[max(factors)]
    return {
        "factors": {str(f): r for f, r in rows.items()},
        "bound_images_per_worker": chunk * (2 + copies),
        "bound_mib_per_worker": chunk * (2 + copies) * side * side * ds.channels / 2**20,
        "worker_growth_mib": hi["largest_worker_private_mib"] - lo["largest_worker_private_mib"],
        "parent_growth_mib": hi["parent_anon_mib"] - lo["parent_anon_mib"],
        "source_growth_mib": hi["source_mib"] - lo["source_mib"],
        "output_growth_mib": hi["output_mib"] - lo["output_mib"],
    }
