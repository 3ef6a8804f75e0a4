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
def fashion_dir() -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FASHION} not found")
    return FASHION
