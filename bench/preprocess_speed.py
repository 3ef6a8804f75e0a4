"""Item 3: preprocess throughput, the stage's own code (`src.preprocess.preprocess_dataset`):
resize + pad + the default augmentation policy of params.yaml (one augmented copy per image,
as `augment_copies: 1`), on 28x28 grayscale and 64x64 RGB inputs, with 1 and 2 processes.

images/s counts input images (train + test) over the stage's processing time (workers started,
chunks processed and written; not the source loading); per core = images/s / processes.
Two shapes of work per input size:
  pad+augment   the output side is the input side (image_size = input side, pad 2): the resize
                is an identity, which the stage skips (the Fashion-MNIST case)
  resize        inputs 1.25x larger (35x35 gray, 80x80 RGB) resized down to the same outputs
1 and 2 processes alternate, medians of `rounds`; the scaling is the median of the rounds' own
2/1 ratios (each round's two runs back to back), so a drift of this VM's speed between rounds
does not enter it. Grayscale cases get `images` inputs, RGB cases a sixth of that (a 64x64 RGB
image is ~16x the work of a 28x28 gray one): every run lasts several seconds.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, Alternation, cpu_scaling, median, stage_env
from src.config import parse_params
from src.data import Dataset

CASES = {  # name: (input side, output side before pad, channels)
    "28x28 gray, pad+augment": (28, 28, 1),
    "28x28 gray, resize": (35, 28, 1),
    "64x64 RGB, pad+augment": (64, 64, 3),
    "64x64 RGB, resize": (80, 64, 3),
}


def synthetic(base: np.ndarray | None, n: int, side: int, channels: int, seed: int = 0) -> Dataset:
    """n images of `side` (80% train, 20% test): `base` (e.g. Fashion-MNIST, gray) resized and
    tinted per channel when given, else smooth random images (content barely matters here)."""
    import cv2

    rng = np.random.default_rng(seed)
    if base is not None:
        picks = base[rng.integers(0, len(base), n)]
        gray = np.stack(
            [cv2.resize(im, (side, side), interpolation=cv2.INTER_LINEAR) for im in picks]
        )
    else:
        small = rng.integers(0, 256, (n, 7, 7), dtype=np.uint8)
        gray = np.stack(
            [cv2.resize(im, (side, side), interpolation=cv2.INTER_CUBIC) for im in small]
        )
    if channels == 3:
        tint = rng.uniform(0.5, 1.0, (n, 1, 1, 3))
        images = (gray[..., None] * tint).astype(np.uint8)
    else:
        images = gray
    labels = rng.integers(0, 10, n).astype(np.int64)
    cut = int(n * 0.8)
    return Dataset(
        images[:cut], labels[:cut], images[cut:], labels[cut:],
        [str(i) for i in range(10)], "synthetic", channels,
    )  # fmt: skip


def save_dataset(ds: Dataset, path: Path) -> Path:
    """`ds` as an .npz that `worker_main` reads."""
    np.savez(
        path, train_images=ds.train_images, train_labels=ds.train_labels,
        test_images=ds.test_images, test_labels=ds.test_labels, channels=ds.channels,
    )  # fmt: skip
    return path


def run_once(dataset: Path, raw: dict[str, Any], workers: int, out: Path) -> dict[str, Any]:
    """One preprocess of the saved dataset with `workers` processes, in a fresh process like
    the stage (a process with threads, such as this one, would start workers without fork)."""
    raw = copy.deepcopy(raw)
    raw["preprocess"]["workers"] = workers
    dest = Path(tempfile.mkdtemp(dir=out))
    try:
        (dest / "params.json").write_text(json.dumps(raw))
        proc = subprocess.run(
            [sys.executable, "-m", "bench.preprocess_speed", str(dataset), str(dest)],
            cwd=REPO, env=stage_env(), capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"preprocess benchmark failed:\n{proc.stderr[-3000:]}")
        meta = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    ips = meta["images"] / meta["seconds"]
    return {"images_per_s": ips, "per_core": ips / meta["workers"], "seconds": meta["seconds"]}


def worker_main(dataset: str, dest: str) -> None:
    """In the subprocess: preprocess the .npz with dest/params.json; print seconds as JSON."""
    from src.preprocess import preprocess_dataset

    arrays = np.load(dataset)
    ds = Dataset(
        arrays["train_images"], arrays["train_labels"], arrays["test_images"],
        arrays["test_labels"], [str(i) for i in range(10)], "synthetic", int(arrays["channels"]),
    )  # fmt: skip
    pre = parse_params(json.loads(Path(dest, "params.json").read_text())).preprocess
    meta = preprocess_dataset(ds, pre, 0, Path(dest) / "processed", quiet=True)
    n = len(ds.train_labels) + len(ds.test_labels)
    print(json.dumps({"images": n, "seconds": meta["seconds"], "workers": meta["workers"]}))


def measure(
    raw: dict[str, Any],
    out: Path,
    *,
    images: int = 20_000,
    rounds: int = 3,
    cases: dict[str, tuple[int, int, int]] = CASES,
    base: np.ndarray | None = None,
    noise_limit: float = 0.10,
    log: Any = print,
) -> dict[str, Any]:
    """Per case: 1 and 2 processes alternated; medians, per-core rates and the 2/1 scaling.

    Args:
        raw: params as a dict (its preprocess.augment policy and chunk_size are used).
        out: scratch folder.
        images: input images per gray case (RGB cases use a sixth).
        base: grayscale images to derive inputs from (Fashion-MNIST), or None for synthetic.
    """
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, (side, size, channels) in cases.items():
        n = images if channels == 1 else images // 6
        dataset = save_dataset(synthetic(base, n, side, channels), out / "inputs.npz")
        case_raw = copy.deepcopy(raw)
        case_raw["data"]["channels"] = channels
        case_raw["preprocess"].update(image_size=size, pad=2, augment_copies=1, resize="stretch")
        log(f" {name}: {n} images")
        alt = Alternation(
            {f"{w} process{'es' if w > 1 else ''}": (lambda w=w, d=dataset, c=case_raw: run_once(d, c, w, out))
             for w in (1, 2)},
            rounds=rounds, noise_limit=noise_limit, log=log,
        )  # fmt: skip
        runs = alt.run()
        ones = alt.values("1 process", "images_per_s")
        twos = alt.values("2 processes", "images_per_s")
        one, two = median(ones), median(twos)
        ratios = [b / a for a, b in zip(ones, twos, strict=True)]
        results[name] = {
            "images": n,
            "output_side": size + 4,
            "1 process images/s": one,
            "2 processes images/s": two,
            "per core (1 process)": one,
            "per core (2 processes)": two / 2,
            "scaling 2/1": median(ratios),
            "scaling per round": ratios,
            "foreign_share_max": max(m.foreign_share for m in runs),
        }
    ceiling = cpu_scaling()
    log(f" this machine's 2-process ceiling (pure compute loop): {ceiling['scaling']:.2f}")
    return {
        "augment": raw["preprocess"]["augment"],
        "rounds": rounds,
        "cases": results,
        "machine_scaling": ceiling,
    }


if __name__ == "__main__":
    worker_main(*sys.argv[1:3])
