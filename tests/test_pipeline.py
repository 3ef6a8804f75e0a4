"""The whole pipeline through the real `dvc repro`, in a scratch copy of the project."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import TINY, make_project, project_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def dvc(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", *args], cwd=project, env=project_env(PYTHONPATH=str(project)), capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A scratch project after one full `dvc repro` of the shrunk default pipeline."""
    root = make_project(tmp_path_factory.mktemp("pipeline") / "project", TINY)
    result = dvc(root, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def test_repro_writes_every_stage_output(project):
    for path in (
        "data/processed/meta.json",
        "data/processed/samples.png",
        "models/model.pt",
        "models/run.json",
        "metrics/train.json",
        "metrics/evaluate.json",
        "plots/evaluate/confusion.json",
        "reports/registry.json",
    ):
        assert (project / path).exists(), path
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert {"accuracy", "macro_f1", "loss"} <= metrics.keys()
    assert 0.0 <= metrics["accuracy"] <= 1.0
    decision = json.loads((project / "reports/registry.json").read_text())
    assert decision["decision"]["promoted"] is True  # the first model becomes the champion


def test_second_repro_runs_nothing(project):
    result = dvc(project, "repro")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Running stage" not in result.stdout, result.stdout
    status = dvc(project, "status")
    assert "up to date" in status.stdout, status.stdout


def test_param_change_reruns_only_downstream(project):
    result = dvc(project, "repro", "--dry")  # nothing changed: nothing would run
    assert "Running stage" not in result.stdout
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("misclassified: 36", "misclassified: 9"))
    result = dvc(project, "repro", "--dry")
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran and all("'evaluate'" in line or "'register'" in line for line in ran), ran
    (project / "params.yaml").write_text(params)
