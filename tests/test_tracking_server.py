"""The train stage against a real `mlflow server` on 127.0.0.1, with credentials in the URI:
rank 0 logs each epoch as it ends (the workers find the store in their environment), and the
credentials never reach the workers' config, which Ray keeps in its object store."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from conftest import TINY, deep_update, make_project, project_env
from servers import mlflow_server

from src.config import load_params

SECRET = "s3cr3t-Pa55"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def test_train_stage_logs_to_a_server_and_keeps_credentials_out_of_the_config(
    server, tmp_path, monkeypatch
):
    import ray.train.torch
    from mlflow import MlflowClient

    root = make_project(tmp_path / "p", deep_update(copy.deepcopy(TINY), {"train": {"epochs": 2}}),
                        dvc=False)  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "pipeline.preprocess"], cwd=root,
                          env=project_env(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    configs = []  # what the stage hands Ray for its workers
    real = ray.train.torch.TorchTrainer

    def recording(*args, **kwargs):
        configs.append(kwargs.get("train_loop_config"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", recording)
    uri = server.replace("http://", f"http://user:{SECRET}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(root)
    from src.train import train_stage

    metrics = train_stage(load_params(root / "params.yaml"), root)

    assert len(configs) == 1 and configs[0]["tracking"] == {"run_id": metrics["run_id"]}
    assert SECRET not in repr(configs[0])
    client = MlflowClient(tracking_uri=server)  # the server ignores the credentials
    run = client.get_run(metrics["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_accuracy"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2]
    assert SECRET not in repr(run.data.params) + repr(run.data.tags)
    assert SECRET not in (root / "models" / "run.json").read_text()
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.name for m in logged] == ["model"]  # one model per run: the pyfunc
