"""The whole pipeline through the real `dvc repro`, in a scratch copy of the project."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import REPO, project_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def dvc(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", *args],
        cwd=project,
        env=project_env(PYTHONPATH=str(project)),
        capture_output=True,
        text=True,
    )


@pytest.fixture
def project(reproduced):
    """A scratch project after one full `dvc repro` of the shrunk default pipeline."""
    return reproduced[0]


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


# README commands that start servers, need a cluster, or are the two top-level make targets
# (which this suite is itself part of) are not run here; the rest run as a newcomer would.
SKIP = (
    "make ",
    "source ",
    "export ",
    "curl ",
    "MLFLOW_TRACKING_URI=",
    "mlflow models serve",
    "ray job submit",
    "dvc queue ",
    "dvc exp run",  # one experiment: test_reliability.test_experiment_after_it_is_a_distinct_run_...
    "cp params.yaml params.yaml.mine",  # the 5-minute Fashion-MNIST pipeline: bench/fashion.py
)


def readme_commands() -> list[str]:
    """The shell commands in README.md's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.split(r"\s#\s|^#", command)[0].strip()
            if command:
                commands.append(command)
    return commands


def test_readme_fast_commands_work(project):
    commands = [c for c in readme_commands() if not c.startswith(SKIP)]
    assert any(c.startswith("python -m src.predict") for c in commands)
    for command in commands:
        result = subprocess.run(
            command,
            shell=True,
            cwd=project,
            env=project_env(PYTHONPATH=str(project)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"README command failed: {command}\n{result.stderr[-2000:]}"
