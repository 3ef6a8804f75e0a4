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
    try:
        result = dvc(project, "repro", "--dry")
    finally:
        (project / "params.yaml").write_text(params)
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    # check_params tracks the whole file; of the others, only what reads evaluate's params
    assert ran and all(f"'{s}'" in " ".join(ran) for s in ("check_params", "evaluate")), ran
    assert all(any(f"'{s}'" in line for s in ("check_params", "evaluate", "register"))
               for line in ran), ran  # fmt: skip


# README commands that start servers, need a cluster, or are the two top-level make targets
# (which this suite is itself part of) are not run here; the rest run as a newcomer would.
SKIP = (
    "make ",
    "source ",
    "export ",
    "curl ",
    "MLFLOW_TRACKING_URI=",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=",  # the Scale-out tracking server: tests/test_cluster.py
    "mlflow models serve",
    "ray job submit",
    "ray start",  # a long-lived instance for sweeps (the cluster tests start theirs)
    "ray stop",
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


def test_a_queued_experiment_runs_its_own_code(project, tmp_path):
    """`dvc exp run --queue` snapshots the workspace, src/ included; the queue later runs that
    snapshot in a copy. The copy's code must be what runs, in the stage (the driver) and in
    the Ray workers, even after the workspace's src/ was restored: the stages run as
    `python -m pipeline.<stage>` from the copy's root, and a local Ray instance's workers put
    the driver's working directory first on their sys.path."""
    import shutil
    import time
    import uuid

    root = tmp_path / "queued"
    shutil.copytree(project, root, symlinks=True)
    driver, worker = f"DRIVER-{uuid.uuid4().hex[:8]}", f"WORKER-{uuid.uuid4().hex[:8]}"
    train, loop = root / "src" / "train.py", root / "src" / "loop.py"
    original = {p: p.read_text() for p in (train, loop)}
    train.write_text(original[train].replace(
        "    root = Path(root).resolve()\n",
        f"    root = Path(root).resolve()\n    print('{driver}', flush=True)\n", 1))  # fmt: skip
    loop.write_text(original[loop].replace(
        '        f"epoch {entry[\'epoch\']}/{epochs}  "',
        f'        f"{worker} epoch {{entry[\'epoch\']}}/{{epochs}}  "', 1))  # fmt: skip
    assert driver in train.read_text() and worker in loop.read_text()

    queued = dvc(root, "exp", "run", "--queue", "-n", "marked")
    assert queued.returncode == 0, queued.stderr[-3000:]
    for path, text in original.items():  # the workspace gets its own code back
        path.write_text(text)
    assert dvc(root, "status").stdout.strip().endswith("up to date."), "workspace not restored"

    started = dvc(root, "queue", "start")
    assert started.returncode == 0, started.stderr[-3000:]
    deadline = time.monotonic() + 600
    while True:
        status = dvc(root, "queue", "status").stdout
        if "marked" in status and re.search(r"marked\s.*\b(Success|Failed)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    logs = dvc(root, "queue", "logs", "marked").stdout
    dvc(root, "queue", "stop", "--kill")
    assert re.search(r"marked\s.*\bSuccess\b", status), status + logs[-3000:]
    assert driver in logs, logs[-3000:]  # the stage ran the experiment's src/train.py
    assert f"{worker} epoch 1/" in logs, logs[-3000:]  # and the workers its src/loop.py
    for path, text in original.items():
        assert path.read_text() == text  # the workspace was not touched


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda text: re.sub(r"^train:\n", "trian:\n", text, count=1, flags=re.M),
         "trian: unknown key"),
        (lambda text: re.sub(r"^base:\n", "base:\n  bogus_key: 1\n", text, count=1, flags=re.M),
         "base.bogus_key: unknown key"),
        (lambda text: re.sub(r"^paths:\n", "paths:\n  modles: elsewhere\n", text, count=1,
                             flags=re.M), "paths.modles: unknown key"),
        (lambda text: re.sub(r"^run:\n", "run:\n  keep_run: 3\n", text, count=1, flags=re.M),
         "run.keep_run: unknown key"),
    ],
    ids=["misspelled-section", "base-key", "paths-key", "untracked-run-key"],
)  # fmt: skip
def test_a_params_typo_anywhere_fails_dvc_repro(project, edit, key):
    """A typo in a key that no training stage tracks would leave every stage 'up to date'; the
    check_params stage tracks the whole file, so `dvc repro` fails on it in one line naming the
    key, and leaves every output as it was."""
    path = project / "params.yaml"
    params = path.read_text()
    edited = edit(params)
    assert edited != params
    before = (project / "models/model.pt").read_bytes()
    path.write_text(edited)
    try:
        result = dvc(project, "repro")
    finally:
        path.write_text(params)
    assert result.returncode != 0, result.stdout[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: params.yaml: {key}"], result.stderr[-3000:]
    assert "Running stage 'train'" not in result.stdout
    assert (project / "models/model.pt").read_bytes() == before
    assert dvc(project, "repro").returncode == 0  # the file back as it was: valid again
