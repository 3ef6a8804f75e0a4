"""Item 2 (time to accuracy on Fashion-MNIST) and item 5 (memory), through the real pipeline:
a fresh copy of the project with configs/fashion-mnist.yaml as its params.yaml (data.path made
absolute), then `dvc repro`, timed stage by stage (`common.measure_repro`):

  test accuracy   metrics/evaluate.json (the evaluate stage, on the 10,000 test images)
  training time   the train stage from its first batch to its last epoch's report
                  (`common.training_time`); the train stage's whole wall time (Python and Ray
                  start-up, MLflow logging) is reported beside it
  memory          peaks of the stage's process tree, sampled every 0.5 s (`common.tree_memory`):
                  sum of RSS, of PSS (pages shared by processes, e.g. Ray's object store, count
                  once), of anonymous memory, and the largest single process

Runs use seeds base.seed, base.seed + 1, ...: the same seed gives the same model.

Item 2b runs the same config in fp32 on the x86-64 baseline that every user's CPU has (AVX2,
no bf16): train.precision fp32, and the stages' kernels capped at AVX2 through the libraries'
documented dispatch controls (oneDNN's ONEDNN_MAX_CPU_ISA, ATen's ATEN_CPU_CAPABILITY), so a
machine with AVX-512 or AMX measures what one without them does.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import (
    FASHION,
    REPO,
    Noise,
    load_yaml,
    make_project,
    measure_repro,
    median,
    wait_quiet,
)

CONFIG = REPO / "configs" / "fashion-mnist.yaml"


def fashion_params(config: Path = CONFIG, data: Path = FASHION) -> dict[str, Any]:
    """The config as params, with data.path absolute (the copy lives elsewhere)."""
    params = load_yaml(config)
    params["data"]["path"] = str(data.resolve())
    return params


BASELINE_ISA = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def fp32_params(config: Path = CONFIG, data: Path = FASHION) -> dict[str, Any]:
    """Item 2b's params: the config in fp32 whatever the CPU has."""
    params = fashion_params(config, data)
    params["train"]["precision"] = "fp32"
    return params


@contextlib.contextmanager
def baseline_isa() -> Iterator[dict[str, str]]:
    """The stages started inside run with their kernels capped at AVX2 (`BASELINE_ISA`)."""
    with mock.patch.dict(os.environ, BASELINE_ISA):  # restored as it was on the way out
        yield dict(BASELINE_ISA)


def preprocess_bound(params: dict[str, Any]) -> dict[str, Any]:
    """What one preprocess worker process holds at most (src/preprocess.py): one chunk of
    chunk_size inputs and its chunk_size x (1 + augment_copies) outputs; the parent queues at
    most 2 x workers chunks of inputs."""
    pre = params["preprocess"]
    chunk, copies = pre["chunk_size"], pre["augment_copies"]
    side = pre["image_size"] + 2 * pre["pad"]
    images = chunk * (2 + copies)
    return {
        "chunk_size": chunk,
        "augment_copies": copies,
        "images_per_worker": images,
        "bytes_per_worker": images * side * side * params["data"]["channels"],
    }


def summarize(run: dict[str, Any], project: Path) -> dict[str, Any]:
    """One `measure_repro` result of the pipeline in `project`: accuracy, times, memory."""
    params = load_yaml(project / "params.yaml")
    paths = params["paths"]
    evaluation = json.loads((project / paths["metrics"] / "evaluate.json").read_text())
    train = json.loads((project / paths["metrics"] / "train.json").read_text())
    stages = run["stages"]
    return {
        "seed": params["base"]["seed"],
        "test_accuracy": evaluation["accuracy"],
        "val_accuracy": train["val_accuracy"],
        "best_epoch": train["best_epoch"],
        "epochs": train["epochs"],
        "images_per_sec": train["images_per_sec"],
        "training_s": (run["training"] or {}).get("training_s"),
        "train_stage_s": stages.get("train", {}).get("seconds"),
        "repro_s": run["seconds"],
        "stages": stages,
    }


def measure(
    out: Path,
    *,
    params: dict[str, Any] | None = None,
    runs: int = 1,
    noise_limit: float = 0.10,
    log: Any = print,
) -> dict[str, Any]:
    """`runs` fresh pipelines (seeds base.seed + r) on Fashion-MNIST; medians and each run.

    Args:
        out: scratch folder for the project copies.
        params: the params to run (default: configs/fashion-mnist.yaml with data.path absolute).
    """
    params = params or fashion_params()
    seed = params["base"]["seed"]
    results = []
    for r in range(runs):
        run_params = json.loads(json.dumps(params))
        run_params["base"]["seed"] = seed + r
        wait_quiet(noise_limit)
        project = make_project(out / f"fashion-{r}", run_params)
        with Noise() as noise:
            run = measure_repro(project)
        result = {**summarize(run, project), "foreign_share": noise.foreign_share()}
        log(
            f"  run {r + 1}/{runs} (seed {result['seed']}): test accuracy "
            f"{result['test_accuracy']:.4f}, training {result['training_s']:.0f} s, train stage "
            f"{result['train_stage_s']:.0f} s (others used {result['foreign_share']:.0%} of the CPUs)"
        )
        results.append(result)
    accs = [r["test_accuracy"] for r in results]
    return {
        "params": {k: params[k] for k in ("preprocess", "model", "train")},
        "runs": results,
        "summary": {
            "runs": len(results),
            "test_accuracy_median": median(accs),
            "test_accuracy_min": min(accs),
            "test_accuracy_max": max(accs),
            "training_s_median": median([r["training_s"] for r in results]),
            "train_stage_s_median": median([r["train_stage_s"] for r in results]),
        },
        "memory": {
            stage: {
                key: max(r["stages"][stage][key] for r in results)
                for key in ("rss_mib", "pss_mib", "anon_mib", "largest_rss_mib")
            }
            for stage in ("preprocess", "train", "evaluate")
            if all(stage in r["stages"] for r in results)
        },
        "preprocess_bound": preprocess_bound(params),
    }
