"""One small trained project shared by the evaluate, registry and serving tests.

Built once per test session (a module-level cache, since these fixtures are used from several
test modules): the real preprocess on scikit-learn's digits (12x12 + pad 2 = 16x16 gray), a
tiny CNN trained a few epochs in plain torch (no Ray: the train stage has its own tests),
`models/model.pt` saved with the contract's `extra`, and an MLflow run in a SQLite store in
the project folder holding the pyfunc model, recorded in `models/run.json`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import REPO

# MLflow's artifact download bars would fill the captured output of every failing test
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

PARAMS = {
    "data": {"source": "digits", "channels": 1},
    "preprocess": {"image_size": 12, "pad": 2, "augment_copies": 0, "augment": [], "workers": 1},
    "model": {
        "activation": "relu",
        "dropout": 0.0,
        "layers": [
            {"conv": 8, "kernel": 3, "padding": "same"},
            {"pool": "max", "size": 2},
            {"fc": 32},
        ],
    },
    "run": {"experiment": "evalkit"},
}


@dataclass
class Kit:
    """The shared project: its folder, params, run id and files."""

    root: Path
    params: object  # src.config.Params
    run_id: str
    model_pt: Path
    run_json: Path
    processed: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


_KIT: dict[str, Kit] = {}


def load_kit_params(root: Path):
    """The repository's params.yaml with PARAMS merged in, paths under `root`."""
    from conftest import deep_update

    from src.config import parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(raw, PARAMS)
    raw["paths"] = {k: str(root / v) for k, v in raw["paths"].items()}
    return parse_params(raw)


def train_checkpoint(params, path: Path, epochs: int = 6, seed: int = 0) -> None:
    """Train the tiny CNN on the processed train split and save it like the train stage does."""
    from src.model import CNN, build_config, save_checkpoint
    from src.preprocess import load_processed
    from src.transforms import normalize

    data = load_processed(params.paths.processed, mmap=False)
    meta = data.meta
    torch.manual_seed(seed)
    cfg = build_config(
        params.model.model_dump(),
        in_channels=meta["channels"],
        image_size=meta["image_size"],
        num_classes=len(meta["class_names"]),
    )
    model = CNN(cfg)
    x = torch.from_numpy(normalize(data.train_images, meta["mean"], meta["std"]))
    y = torch.from_numpy(np.asarray(data.train_labels))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    extra = {
        k: meta[k] for k in ("class_names", "mean", "std", "image_size", "channels", "preprocess")
    }
    save_checkpoint(path, model, extra)


def new_run(kit_root: Path, model_pt: Path, run_json: Path, experiment: str) -> str:
    """An MLflow run holding the pyfunc of `model_pt`, recorded in `run_json`; returns its id."""
    import mlflow

    from src import registry, tracking

    tracking.setup(kit_root)
    exp = tracking.get_or_create_experiment(experiment, kit_root)
    with mlflow.start_run(experiment_id=exp) as run:
        registry.log_pyfunc_model(model_pt)
    tracking.write_run_file(
        run_json,
        {
            "run_id": run.info.run_id,
            "experiment_id": exp,
            "experiment_name": experiment,
            "run_name": run.info.run_name,
            "tracking_uri": tracking.redacted(tracking.tracking_uri(kit_root)),
        },
    )
    return run.info.run_id


def get_kit(tmp_path_factory) -> Kit:
    """Build the shared project on first use; later calls return the same one."""
    if "kit" in _KIT:
        return _KIT["kit"]
    from src.data import load_source
    from src.preprocess import preprocess_dataset

    # the kit's own SQLite store, never a tracking server the caller's environment points to
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("evalkit")
    params = load_kit_params(root)
    ds = load_source(params.data, seed=params.base.seed)
    preprocess_dataset(ds, params.preprocess, params.base.seed, params.paths.processed)
    models = Path(params.paths.models)
    model_pt, run_json = models / "model.pt", models / "run.json"
    train_checkpoint(params, model_pt)
    run_id = new_run(root, model_pt, run_json, params.run.experiment)
    kit = Kit(root, params, run_id, model_pt, run_json, Path(params.paths.processed))
    _KIT["kit"] = kit
    return kit


def raw_test_images(params) -> tuple[list[np.ndarray], np.ndarray]:
    """The test split's images before preprocessing (8x8 digits) and their labels."""
    from src.data import load_source

    ds = load_source(params.data, seed=params.base.seed)
    return [np.asarray(im) for im in ds.test_images], np.asarray(ds.test_labels)
