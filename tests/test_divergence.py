"""A diverged training (NaN or infinite loss) stops at the epoch where it appears, in the plain
loop and through the real train stage: one line naming the epoch and the loss, the MLflow run
FAILED, nothing written or registered."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from conftest import TINY, deep_update, make_project, project_env

from src.config import load_params
from src.errors import PipelineError
from src.loop import Diverged, check_finite

# SGD at lr 1e30 sends the weights to infinity in the first steps: NaN at epoch 1, every time.
DIVERGING = deep_update(
    copy.deepcopy(TINY), {"train": {"optimizer": "sgd", "lr": 1e30, "epochs": 3}}
)


def test_check_finite_names_the_epoch_and_the_loss():
    entry = {"epoch": 4, "train_loss": 0.3, "val_loss": float("inf")}
    with pytest.raises(Diverged, match=r"^train: val loss became inf at epoch 4; "):
        check_finite(entry)
    assert issubclass(Diverged, PipelineError)  # a one-line error at the stage's exit
    check_finite({"epoch": 1, "train_loss": 0.3, "val_loss": 0.4})


@pytest.fixture(scope="module")
def diverging_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("diverge") / "p", DIVERGING, dvc=False)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.preprocess"], cwd=root, env=project_env(),
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_the_plain_loop_stops_at_the_diverged_epoch(diverging_project):
    from src.loop import run_local
    from src.preprocess import load_processed

    params = load_params(diverging_project / "params.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={"num_workers": 1})})
    seen = []
    with pytest.raises(Diverged, match=r"train loss became nan at epoch 1;"):
        run_local(params, load_processed(diverging_project / "data/processed"),
                  on_epoch=lambda entry, loop, history: seen.append(entry["epoch"]))  # fmt: skip
    assert seen == []  # the diverged epoch is never handed on as a result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_train_stage_fails_at_once_and_registers_nothing(diverging_project):
    """Through Ray Train (2 workers): the workers stop together at epoch 1 and return, with no
    retry (train.max_failures would only diverge again), and the stage exits 2 in one line."""
    from mlflow import MlflowClient

    root = diverging_project
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train"], cwd=root, env=project_env(),
        capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: train: train loss became nan at epoch 1;"), lines[-5:]
    assert not (root / "models" / "model.pt").exists()
    assert not (root / "metrics" / "train.json").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED"
    assert client.get_metric_history(run.info.run_id, "train_loss") == []
    assert client.search_registered_models() == []
    assert "epoch 2/" not in done.stdout  # stopped where it diverged
