"""Shared fixtures: the real params.yaml, shrunk, and a scratch project folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("CNN_QUIET", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"


@pytest.fixture
def raw_params() -> dict:
    """The repository's params.yaml as a dict, to shrink or break in a test."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> tuple[Path, dict]:
    """One `dvc repro` of the shrunk default pipeline (TINY) in a fresh project, measured as
    `make bench` measures item 4 (bench.overheads, once, tiny): (the project, the figures).
    The pipeline tests and the benchmark's smoke test share it: a full repro costs a minute."""
    from bench import overheads

    out = tmp_path_factory.mktemp("reproduced")
    result = overheads.measure(
        out, params=tiny_raw(), rounds=1, stages=("evaluate",), train_rounds=0, noise_limit=1.0
    )
    return out / "default", result


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FASHION} not found")
    return FASHION


def deep_update(base: dict, overrides: dict) -> dict:
    """Merge `overrides` into `base` section by section (in place) and return it."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def make_project(dest: Path, overrides: dict | None = None, *, dvc: bool = True) -> Path:
    """A scratch copy of the project in `dest`: its own git + DVC repo, params shrunk by `overrides`.

    Stages run there write their data, models and MLflow store inside `dest`, never in the repo.
    """
    from bench.common import make_project as fresh_project

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, overrides or {})
    return fresh_project(dest, params, dvc=dvc, env=project_env())


def project_env(**extra: str) -> dict:
    """The environment stage subprocesses run with: the venv first on PATH, no update checks,
    and no SHELL, as in CI: DVC then runs stages through /bin/sh, which may (dash) keep a shell
    between dvc and the stage."""
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SHELL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def tiny_raw() -> dict:
    """The repository's params.yaml as a dict, shrunk by TINY."""
    import copy

    return deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), copy.deepcopy(TINY))


# Small enough for a 2-worker Ray run in well under a minute, big enough to learn something.
TINY = {
    "preprocess": {"image_size": 8, "pad": 0, "augment_copies": 1},
    "model": {
        "layers": [
            {"conv": 8, "kernel": 3, "padding": "same", "batch_norm": True},
            {"pool": "max", "size": 2},
            {"fc": 32},
        ]
    },
    "train": {"epochs": 2, "num_workers": 2, "batch_size": 64},
}
