"""Reliability (issue 6): bad input through the real stage commands, atomic outputs, faults,
concurrency, determinism, safe loading, exposure, secrets.

What this file adds to the tests of each module (which already cover much of the issue):
  * bad inputs through the real commands (`python -m pipeline.<stage>` in a scratch project):
    exit 2, ONE line on stderr naming the file, key or service, no traceback unless --debug or
    CNN_DEBUG=1, and no output written (or the previous one kept whole);
  * `dvc repro` interrupted twice, by SIGTERM to dvc alone and by Ctrl-C (SIGINT to its process
    group), each while its Ray Train workers are frozen (SIGSTOP, tests/faults.py) past a
    checkpoint, resumes each time at the epoch after the last checkpoint, in the same MLflow
    run, each step once;
  * the run section of params.yaml is operational: changing it retrains nothing (DVC does not
    track it), while a train key does; retired keys are one line naming them;
  * a DVC experiment right after it is a second, distinct MLflow run, and its 1-worker Ray run
    computes exactly what the plain single-process loop computes (determinism);
  * checkpoints only ever loaded with weights_only=True, servers bound to 127.0.0.1, secrets
    (fake credentials in the environment, a password in the tracking URI) nowhere in MLflow.

Covered elsewhere: test_config (unknown key, wrong type, zero or negative size, unknown pool
kind, activation, optimizer, collapsing layer), test_preprocess (unknown augmentation; outputs
byte-identical across runs and process counts), test_data (each bad image folder, in-process),
test_train (SIGKILL of a worker mid-run, 2-worker determinism,
two processes writing one SQLite store at once, more workers than CPUs), test_registry
(registering without a run or a model, no champion), test_serve (HTTP 400 with the reason,
predict on a file that is not an image).

Ray fits are expensive (~30-60 s each here), so the slow part is one scratch DVC project and
five fits: two interrupted, the resumed one, an uninterrupted reference and the experiment.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faults
import numpy as np
import pytest
import yaml
from conftest import REPO, TINY, deep_update, make_project, project_env
from PIL import Image

from src import tracking
from src.cli import run_stage
from src.errors import PipelineError
from src.files import atomic_dir, atomic_path

NO_SERVER = "http://127.0.0.1:1"  # nothing listens on port 1


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def stage(
    root: Path, name: str, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    """`python -m pipeline.<name> ARGS` of project `root`, run in `cwd` (default `root`, whose
    code `-m` then imports; elsewhere with `root` on PYTHONPATH)."""
    if cwd is not None and Path(cwd).resolve() != Path(root).resolve():
        env = {"PYTHONPATH": str(root), **env}
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.{name}", *args],
        cwd=cwd or root,
        env=project_env(**env),
        capture_output=True,
        text=True,
        timeout=300,  # MLflow's or Ray's own retries would take many minutes: a hang fails here
    )


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Assert exit 2 and exactly one line on stderr, 'error: ...', holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write_params(root: Path, dest: Path, overrides: dict) -> Path:
    """`root`/params.yaml with `overrides` merged in, written to `dest`."""
    raw = deep_update(yaml.safe_load((root / "params.yaml").read_text()), overrides)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def image_folder(root: Path, classes=("a", "b"), n: int = 5, side: int = 12) -> Path:
    """A small image folder: class sub-folders of `n` random gray PNGs each."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    return root


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256, for every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    """The atomic writers' temporary names (.NAME.XXXX.tmp, .NAME.old) left under `folder`."""
    if not folder.exists():
        return []
    return [str(p) for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


# ---------------------------------------------------------------------------------------------
# The commands on bad input (no Ray fit): a scratch project with preprocessed data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project (TINY params) after a real preprocess run; no DVC, no store."""
    root = make_project(tmp_path_factory.mktemp("rel") / "p", TINY, dvc=False)
    done = stage(root, "preprocess")
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def imagefolder_params(project: Path, tmp_path: Path, data: Path) -> Path:
    """Params for an imagefolder source at `data`, every output under `tmp_path`."""
    paths = {k: str(tmp_path / k) for k in ("processed", "models", "metrics", "plots", "reports")}
    overrides = {
        "data": {"source": "imagefolder", "path": str(data)},
        "paths": paths,
        "preprocess": {"workers": 1},
    }
    return write_params(project, tmp_path / "params.yaml", overrides)


# case -> what the one line must say (test_data has every case in-process, the single-class
# folder and the too small image included; here one of each item goes through the command)
BAD_FOLDERS = {
    "corrupt image": "broken.png: not a readable image file",
    "empty class folder": "empty: class folder has no image files",
    "missing data path": "does not exist",
    "decompression bomb": "bomb.png: image is 8000x8000 = 64000000 pixels, "
    "over data.max_image_pixels 40000000",
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_image_folder_is_one_line_and_writes_nothing(project, tmp_path, case):
    """Items 1-4 through `python -m pipeline.preprocess`: the file, folder or key is named."""
    folder = image_folder(tmp_path / "images")
    data = folder
    if case == "corrupt image":
        (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and then nothing sensible")
    elif case == "empty class folder":
        (folder / "empty").mkdir()
        (folder / "empty" / "notes.txt").write_text("no images here")
    elif case == "missing data path":
        data = tmp_path / "nowhere"
    elif case == "decompression bomb":  # 64 M pixels in a few KB: refused from the header
        Image.new("1", (8000, 8000)).save(folder / "b" / "bomb.png")
    params = imagefolder_params(project, tmp_path, data)
    line = one_line_error(stage(project, "preprocess", "--params", str(params)), BAD_FOLDERS[case])
    assert str(data) in line  # the full path of the file or folder at fault (or data.path's)
    assert not (tmp_path / "processed").exists() and leftovers(tmp_path) == []


@pytest.mark.slow  # two preprocess runs
def test_failed_preprocess_keeps_the_previous_output_whole(project, tmp_path):
    """A failure while the new output is being written (a truncated image passes the header
    check and fails to decode) leaves the previous output exactly as it was."""
    folder = image_folder(tmp_path / "images")
    params = imagefolder_params(project, tmp_path, folder)
    first = stage(project, "preprocess", "--params", str(params))
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(tmp_path / "processed")
    assert "meta.json" in before
    bad = folder / "b" / "zz_truncated.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])  # the header survives, the pixels do not
    line = one_line_error(stage(project, "preprocess", "--params", str(params)))
    assert f"{bad}: cannot decode image" in line
    assert snapshot(tmp_path / "processed") == before
    assert leftovers(tmp_path) == []


def test_debug_flag_or_variable_shows_the_traceback(project, tmp_path):
    params = imagefolder_params(project, tmp_path, tmp_path / "nowhere")
    for args, env in (
        (["--params", str(params), "--debug"], {}),
        (["--params", str(params)], {"CNN_DEBUG": "1"}),
    ):
        r = stage(project, "preprocess", *args, **env)
        assert r.returncode == 2
        assert "Traceback" in r.stderr and "PipelineError" in r.stderr
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: data.path: {tmp_path / 'nowhere'} does not exist"
        )


# (stage, override, the line after "error: <params file>: "); test_config has every kind of
# bad value in-process, test_model and test_preprocess a pool kind and an augmentation by CLI
PARAM_ERRORS = [
    ("preprocess", {"train": {"epoch": 3}}, "train.epoch: unknown key"),
    (
        "train",
        {
            "model": {
                "layers": [
                    {"conv": 8, "kernel": 5},
                    {"pool": "max", "size": 2},
                    {"conv": 8, "kernel": 3},
                    {"fc": 4},
                ]
            }
        },
        "model.layers[2]: feature map collapses to 0x0 (input 2x2, kernel 3, stride 1, padding 0)",
    ),
    ("evaluate", {"train": {"optimizer": "adam2"}}, "train.optimizer: unknown value 'adam2'"),
    (
        "register",
        {"preprocess": {"image_size": 0}},
        "preprocess.image_size: input should be greater than 0 (got 0)",
    ),
    # retired keys (test_config has the rest): what became of them, not a bare "unknown key"
    (
        "train",
        {"train": {"shared_memory_allreduce": True}},
        "train.shared_memory_allreduce: removed: CPU workers sum gradients through "
        "torch.distributed's own backend (gloo); delete the key",
    ),
    (
        "train",
        {"train": {"storage_path": "elsewhere"}},
        "train.storage_path: moved to run.storage_path",
    ),
]


@pytest.mark.parametrize("stage_name, override, message", PARAM_ERRORS)
def test_every_stage_rejects_bad_params_before_any_work(
    project, tmp_path, stage_name, override, message
):
    """Items 5-7 through each stage command: one line naming the key, nothing written."""
    paths = {k: str(tmp_path / k) for k in ("processed", "models", "metrics", "plots", "reports")}
    params = write_params(project, tmp_path / "bad.yaml", {**override, "paths": paths})
    one_line_error(stage(project, stage_name, "--params", str(params)), f"{params}: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_an_os_error_is_one_line_naming_the_path(project, tmp_path):
    """An output path that cannot be created (its parent is a file) is the environment's
    fault, not a bug: one line naming the path, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    params = write_params(
        project, tmp_path / "params.yaml", {"paths": {"processed": str(blocker / "processed")}}
    )
    one_line_error(stage(project, "preprocess", "--params", str(params)), str(blocker))


def test_run_stage_keeps_tracebacks_for_bugs(capsys, monkeypatch):
    """run_stage: PipelineError and OSError -> one line + exit 2; Ctrl-C -> exit 130; any other
    exception (a bug) propagates with its traceback."""
    monkeypatch.delenv("CNN_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["stage"])

    def raises(exc):
        def main():
            raise exc

        return main

    for exc, code, line in (
        (PipelineError("params.yaml: train.lr: bad"), 2, "error: params.yaml: train.lr: bad"),
        (
            PermissionError(13, "Permission denied", "/data/x"),
            2,
            "error: /data/x: Permission denied",
        ),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ):
        with pytest.raises(SystemExit) as e:
            run_stage(raises(exc))
        assert e.value.code == code
        assert capsys.readouterr().err.splitlines() == [line]
    with pytest.raises(ZeroDivisionError):
        run_stage(raises(ZeroDivisionError("a bug")))


@pytest.mark.slow  # three commands that import torch, ray and mlflow
def test_train_fails_fast_on_unreachable_services_and_missing_gpus(project):
    """Items 9-11 through `python -m pipeline.train`: an unreachable RAY_ADDRESS or tracking
    server, or GPUs the machine lacks, is one line naming it; nothing is started or written."""
    from src.ray_driver import check_ray_address

    one_line_error(
        stage(project, "train", RAY_ADDRESS="127.0.0.1:1"),
        "RAY_ADDRESS=127.0.0.1:1: Ray cluster unreachable",
    )
    with pytest.raises(PipelineError, match=r"^RAY_ADDRESS=ray://127.0.0.1:1: Ray cluster unr"):
        check_ray_address("ray://127.0.0.1:1")  # the client-server form, parsed the same way
    one_line_error(
        stage(project, "train", MLFLOW_TRACKING_URI=NO_SERVER),
        f"MLFLOW_TRACKING_URI={NO_SERVER}: tracking server unreachable",
    )
    import torch

    if torch.cuda.device_count() < 2:
        gpu = write_params(project, project / "gpu.yaml", {"train": {"use_gpu": True}})
        one_line_error(
            stage(project, "train", "--params", str(gpu)),
            "train.use_gpu: true needs 2 GPUs (one per worker, train.num_workers) but this "
            "machine has",
        )
    for name in ("models", "metrics", "plots", "mlflow.db", "mlartifacts", "ray_results"):
        assert not (project / name).exists(), name


def test_evaluate_and_register_fail_fast_on_an_unreachable_tracking_server(project, tmp_path):
    """Item 11 for evaluate and register: named (without the URI's password), before any output."""
    paths = {k: str(tmp_path / k) for k in ("models", "metrics", "plots", "reports")}
    params = write_params(project, tmp_path / "params.yaml", {"paths": paths})
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    one_line_error(
        stage(project, "evaluate", "--params", str(params), MLFLOW_TRACKING_URI=NO_SERVER),
        f"MLFLOW_TRACKING_URI={NO_SERVER}: tracking server unreachable",
    )
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "plots").exists()

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({"accuracy": 0.9}))
    secret = "http://alice:s3cret-pw@127.0.0.1:1"
    r = stage(project, "register", "--params", str(params), MLFLOW_TRACKING_URI=secret)
    one_line_error(r, "MLFLOW_TRACKING_URI=http://***@127.0.0.1:1: tracking server unreachable")
    assert "s3cret" not in r.stderr + r.stdout and "alice" not in r.stderr
    assert not (tmp_path / "reports").exists()


def test_register_without_a_run_is_one_line(project, tmp_path):
    """Item 12 through `python -m pipeline.register` (run from another folder): run.json names
    a run the store lacks
    (test_registry: no run.json, a run without a model, in-process)."""
    paths = {k: str(tmp_path / k) for k in ("models", "metrics", "reports")}
    params = write_params(project, tmp_path / "params.yaml", {"paths": paths})
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    one_line_error(
        stage(project, "register", "--params", str(params), cwd=tmp_path),
        f"run {'0' * 32} not found in the tracking store",
    )
    assert not (tmp_path / "reports").exists()


def test_a_tracking_store_mlflow_cannot_use_is_one_line(tmp_path, monkeypatch):
    """The disabled file store, or a file that is not a database: named, before any work."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with pytest.raises(
        PipelineError, match=r"^MLFLOW_TRACKING_URI=file://.*cannot use the tracking store"
    ):
        tracking.setup(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "mlflow.db").write_text("not a database")
    with pytest.raises(PipelineError, match=r"^tracking store sqlite:////.*cannot use") as e:
        tracking.setup(tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# predict / the registry: a name holding another kind of model (item 13)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # logs and registers a model, runs the predict command
def test_a_foreign_model_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    """models:/NAME@champion of another kind: one line from load_model and from
    `python -m src.predict`, and the model's own code never runs (it is not unpickled)."""
    import mlflow

    from src import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    marker = tmp_path / "foreign-code-ran"

    class Model(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            marker.write_text("loaded")

        def predict(self, context, model_input, params=None):
            return model_input

    monkeypatch.chdir(tmp_path)  # nothing of MLflow's may land in the repository
    uri = tracking.setup(tmp_path)
    exp = tracking.get_or_create_experiment("foreign", tmp_path)  # artifacts under tmp_path
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(name="m", python_model=Model(), pip_requirements=[])
    version = mlflow.register_model(info.model_uri, "foreign")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("foreign", "champion", version.version)
    client.create_registered_model("no-champion")

    with pytest.raises(PipelineError, match=r"^models:/foreign@champion: not an image classifier"):
        registry.load_model("models:/foreign@champion", tmp_path)
    with pytest.raises(PipelineError, match=r"^models:/no-champion@champion: cannot load"):
        registry.load_model("models:/no-champion@champion", tmp_path)
    assert not marker.exists()

    image = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    r = subprocess.run(
        [sys.executable, "-m", "src.predict", "--model", "models:/foreign@champion", str(image)],
        cwd=REPO, env=project_env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    one_line_error(r, "models:/foreign@champion: not an image classifier")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Atomic outputs
# ---------------------------------------------------------------------------------------------


def test_atomic_writers_replace_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "model.pt"
    with atomic_path(target) as tmp:
        tmp.write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of v2")
            raise RuntimeError("interrupted")
    assert target.read_text() == "v1" and leftovers(tmp_path) == []

    folder = tmp_path / "processed"
    with atomic_dir(folder) as tmp:
        (tmp / "a.npy").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(folder) as tmp:
            (tmp / "a.npy").write_text("half of v2")
            (tmp / "b.npy").write_text("v2")
            raise KeyboardInterrupt
    assert snapshot(folder) == {"a.npy": hashlib.sha256(b"v1").hexdigest()}
    with atomic_dir(folder) as tmp:
        (tmp / "b.npy").write_text("v3")
    assert sorted(snapshot(folder)) == ["b.npy"]  # replaced whole: no stale a.npy
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Concurrency: the SQLite lock retry (the real two-process race is in test_train)
# ---------------------------------------------------------------------------------------------


def test_lock_retry_backs_off_then_succeeds_and_other_errors_pass(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return x * 2

    assert tracking.with_retry(flaky, 21) == 42 and len(calls) == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0] / 2  # backs off (jittered doubling)

    def broken():
        calls.append("broken")
        raise ValueError("no such table")

    calls.clear()
    with pytest.raises(ValueError):
        tracking.with_retry(broken)
    assert calls == ["broken"]  # not retried


# ---------------------------------------------------------------------------------------------
# Safe loading, exposure, secrets
# ---------------------------------------------------------------------------------------------


def python_sources() -> list[Path]:
    return [
        p
        for folder in ("src", "pipeline", "bench")
        if (REPO / folder).is_dir()
        for p in sorted((REPO / folder).rglob("*.py"))
    ]


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    """Checkpoints are loaded with weights_only=True; no pickle.load, no np.load(allow_pickle)."""
    loads = 0
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                loads += 1
                flag = kwargs.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, where
            assert (owner, node.func.attr) not in {("pickle", "load"), ("pickle", "loads")}, where
            if (owner, node.func.attr) == ("np", "load"):
                flag = kwargs.get("allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and not flag.value), where
    assert loads >= 2  # src/model.py and src/loop.py: the check looked at the real calls


def test_servers_bind_to_localhost():
    """What the project starts for the UI or serving listens on 127.0.0.1: the Makefile's `ui`
    target, every documented `mlflow ui|server|models serve`, and MLflow's own defaults."""
    texts = {"Makefile": (REPO / "Makefile").read_text()}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if doc.exists():
            texts[doc.name] = doc.read_text()
    commands = 0
    for name, text in texts.items():
        joined = text.replace("\\\n", " ")
        assert "0.0.0.0" not in joined, name
        for line in joined.splitlines():
            if re.search(r"mlflow (ui|server|models serve) -", line):  # a command, not prose
                commands += 1
                assert re.search(r"(--host|-h) 127\.0\.0\.1\b", line), f"{name}: {line.strip()}"
    assert commands >= 2
    from mlflow.cli import server
    from mlflow.models.cli import serve

    for command in (server, serve):
        (host,) = [p for p in command.params if p.name == "host"]
        assert host.default == "127.0.0.1", command.name


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("sqlite:////abs/path/mlflow.db", "sqlite:////abs/path/mlflow.db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("http://alice:s3cret@mlflow.internal:5000/", "http://***@mlflow.internal:5000/"),
        ("https://tok3n@host/path?x=1", "https://***@host/path?x=1"),
        ("https://host/?token=s3cret&x=1", "https://host/?token=***&x=1"),
        ("databricks", "databricks"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_redacted_hides_credentials_and_keeps_everything_else(uri, shown):
    assert tracking.redacted(uri) == shown


def test_secret_looking_params_and_tags_are_never_logged(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    tracking.setup(tmp_path)
    exp = tracking.get_or_create_experiment("secrets", tmp_path)
    tags = {"ok": "1", "aws_secret_access_key": "x", "uri": "s3://AKIA:secret@bucket/x"}
    run_id, _ = tracking.open_run(exp, "r", tags)
    tracking.log_params(
        run_id,
        {"a.n": 3, "a.api_key": "k", "a.password": "p", "a.token": "t",
         "a.store": "http://u:pw@host/"},
    )  # fmt: skip
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params == {"a.n": "3"}
    assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} == {"ok": "1"}


# ---------------------------------------------------------------------------------------------
# Faults and determinism through `dvc repro` (slow: four Ray fits)
# ---------------------------------------------------------------------------------------------

EPOCHS = 5  # an interrupt after epoch 1's checkpoint cannot land after the last epoch
SECRETS = {  # fake credentials in the environment of every stage: never logged anywhere
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-7c1e",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-93ab",
    "HF_TOKEN": "fake-hf-token-55d0",
}
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Path:
    """A scratch git + DVC project (TINY params, 5 epochs, 2 workers) with the repo's .gitignore
    (make_project commits it)."""
    overrides = deep_update(
        copy.deepcopy(TINY), {"train": {"epochs": EPOCHS}, "run": {"max_failures": 1}}
    )
    root = make_project(tmp_path_factory.mktemp("rel-dvc") / "p", overrides)
    return root


def start_dvc(root: Path, log: Path, *args: str) -> subprocess.Popen:
    """`dvc ARGS` in its own process group (as a terminal runs it), output to `log`."""
    env = project_env(**SECRETS)
    with open(log, "w") as out:
        return subprocess.Popen(
            ["dvc", *args], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def checkpointed_epoch(root: Path) -> int | None:
    """The latest epoch Ray registered as checkpointed in the project's run folder, or None."""
    return faults.checkpointed_epoch(root / "ray_results")


def stage_pid(dvc_pid: int, module: str) -> int | None:
    """The pid of the stage `python -m MODULE` that process `dvc_pid` runs (through a shell that
    may stay between them), or None."""
    import psutil

    from src.supervise import SHELLS

    for child in psutil.Process(dvc_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name() not in SHELLS and module in child.cmdline():
                return child.pid
    return None


def gone(pid: int) -> bool:
    """The process has exited (absent, or a zombie nobody reaped yet)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for the process to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return gone(pid)


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def all_runs(root: Path) -> list:
    client = mlflow_client(root)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def steps(root: Path, run_id: str, key: str = "val_accuracy") -> list[int]:
    return sorted(m.step for m in mlflow_client(root).get_metric_history(run_id, key))


def logged_history(root: Path, run_id: str) -> list[dict]:
    """The per-epoch metrics as MLflow holds them, shaped like a training history."""
    client = mlflow_client(root)
    by_step: dict[int, dict] = {}
    for key in METRICS:
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [by_step[s] for s in sorted(by_step)]


STUCK_STAGE = """
import ctypes, os, sys, threading, time
import src.supervise as t
t.ABANDON_GRACE, t.ABANDON_HOOK_WAIT = 2.0, 1.0
mark, how = sys.argv[1:]
def abandon():
    open(mark, "w").write("killed")
with t.sigterm_as_interrupt(abandon):
    print("ready", flush=True)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        if how == "stops":  # a stage that stops cleanly
            raise
        if how == "clean-up":  # a clean-up that never ends
            while True:
                time.sleep(1)
        if how == "gil":  # a C call that never returns and never lets go of the GIL
            ctypes.PyDLL(None).sleep(600)
# how == "exit": the stage stopped, but its exit waits forever on a non-daemon thread
threading.Thread(target=time.sleep, args=(600,)).start()
"""


@pytest.mark.parametrize("how", ["clean-up", "exit", "gil"])
def test_an_orphaned_stage_stuck_on_its_way_out_exits_hard(tmp_path, how):
    """The parent-watch's last resort: the dvc process is gone and the stage hangs in its
    clean-up, in its exit, or in a C call holding the GIL; after the grace period it prints
    every thread's stack and exits instead of living on as an orphan. A stage that never
    stopped also runs its abandon hook (the MLflow run marked KILLED) first, when Python can."""
    mark = tmp_path / "abandoned"
    env = {**os.environ, "DVC_STAGE": "train", "PYTHONPATH": str(REPO)}
    # sh starts the stage in the background and exits once it is ready: its parent is gone
    log = tmp_path / "log"
    script = (
        f"{sys.executable} -c '{STUCK_STAGE}' {mark} {how} > {log} 2>&1 & echo $!; "
        f"until grep -q ready {log}; do sleep 0.1; done"
    )
    pid = int(subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                             check=True).stdout)  # fmt: skip
    if not wait_gone(pid, 60):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the orphaned stage went on: {log.read_text()}")
    out = log.read_text()
    assert "Thread 0x" in out and "most recent call first" in out, out
    if how == "gil":  # only faulthandler's C thread could still act
        assert not mark.exists(), out
    else:
        assert "stopping hard" in out, out
        assert mark.exists() == (how == "clean-up"), out


def test_a_stage_behind_a_shell_stops_when_dvc_is_gone(tmp_path):
    """DVC runs a stage as `$SHELL -c CMD`; /bin/sh as dash (SHELL unset, as in CI) does not
    exec CMD but waits for it, so the stage's parent is a shell that outlives dvc. The stage
    watches the process above the shell and stops (cleanly, through its interrupt) when it
    dies."""
    env = {**os.environ, "DVC_STAGE": "train", "PYTHONPATH": str(REPO)}
    log = tmp_path / "log"
    # the stand-in for dvc: starts the stage through a shell that cannot exec it (`; exit`),
    # prints the stage's pid once it is ready (the shell's child: the shell did not exec it), and
    # dies without a word to it
    launcher = f"""
import os, subprocess, sys, time
shell = subprocess.Popen(["/bin/sh", "-c", sys.argv[1] + "; exit $?"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while "ready" not in open({str(log)!r}).read():
    time.sleep(0.1)
print(subprocess.check_output(["pgrep", "-P", str(shell.pid)], text=True).strip(), flush=True)
os._exit(0)
"""
    stage = f"{sys.executable} -c '{STUCK_STAGE}' {tmp_path / 'abandoned'} stops > {log} 2>&1"
    log.write_text("")
    pid = int(subprocess.run([sys.executable, "-c", launcher, stage], env=env,
                             capture_output=True, text=True, check=True, timeout=60).stdout)  # fmt: skip
    if not wait_gone(pid, 30):
        os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the stage outlived dvc behind its shell: {log.read_text()}")
    assert "KeyboardInterrupt" in log.read_text() and "stopping hard" not in log.read_text()


def test_a_run_is_held_by_one_train_stage_at_a_time(tmp_path, capsys):
    """RunFolder.claim: while a stage holds a run, a second one of the same run waits for it,
    and fails in one line (naming the holder's pid) if it does not end in time; another run is
    free meanwhile."""
    from src.errors import PipelineError
    from src.runstore import RunFolder

    storage = str(tmp_path / "ray_results")
    hold = (
        "import sys, time\nfrom src.runstore import RunFolder\n"
        "with RunFolder(sys.argv[1], 'train-abc').claim():\n"
        "    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", hold, storage, "60"], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match=rf"run.storage_path: .*pid {holder.pid}\b"):
            with RunFolder(storage, "train-abc").claim(wait=1.0):
                pass
        with RunFolder(storage, "train-other").claim(wait=0.0):
            pass
    finally:
        holder.kill()
        holder.wait()
    short = subprocess.Popen([sys.executable, "-c", hold, storage, "1"], env=env,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert short.stdout.readline().strip() == "held"
    capsys.readouterr()
    with RunFolder(storage, "train-abc").claim(wait=60.0):  # once the holder lets go
        pass
    assert f"waiting for the train stage (pid {short.pid})" in capsys.readouterr().out
    short.wait()


def stage_report(pid: int, log: Path) -> str:
    """What a test can say about a stage process that would not go: its threads, what each
    waits on in the kernel, and the end of its log."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            comm = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        lines.append(f"  thread {task.name} {comm}: {state} {wchan}")
    return "\n".join([f"process {pid}:", *lines, log.read_text()[-6000:]])


def printed_epochs(out: str) -> list[int]:
    """The epochs a stage's output shows trained (rank 0's "epoch N/EPOCHS  train loss" lines),
    in order, each once: Ray forwards a worker's line both to the driver's stdout and stderr."""
    found = re.findall(rf"\bepoch (\d+)/{EPOCHS}  train loss ", out)
    return list(dict.fromkeys(int(n) for n in found))


def interrupted_repro(
    root: Path, log: Path, after: int, interrupt: Callable[[subprocess.Popen], None]
) -> tuple[subprocess.Popen, int | None]:
    """`dvc repro train`, interrupted by `interrupt(proc)` while its Ray Train workers are frozen
    (SIGSTOP) once an epoch later than `after` is checkpointed: the interrupt lands mid-run
    whatever the machine's speed. Returns dvc's process, ended, and the epoch checkpointed once
    the stage is gone (what the next repro resumes after). No frozen worker outlives it."""
    proc = start_dvc(root, log, "repro", "train")
    try:
        faults.wait_until(
            lambda: (checkpointed_epoch(root) or 0) > after,
            f"a checkpoint after epoch {after}",
            alive=lambda: proc.poll() is None,
        )
        train_pid = stage_pid(proc.pid, "pipeline.train")
        assert train_pid is not None, log.read_text()[-3000:]
        with faults.frozen(proc.pid, 2):
            assert (checkpointed_epoch(root) or 0) < EPOCHS, "finished before the freeze"
            interrupt(proc)
            proc.wait(timeout=180)
            # dvc may return while its stage still cleans up (its shell died, or it was killed)
            assert wait_gone(train_pid, 180), (
                "the train stage went on after the interrupt\n" + stage_report(train_pid, log)
            )
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group outlives dvc: the stage
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return proc, checkpointed_epoch(root)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_interrupted_dvc_repro_resumes_at_the_next_epoch(dvc_project, tmp_path):
    """SIGTERM to `dvc repro` alone (dvc does not pass it on: the stage notices its parent is
    gone), then Ctrl-C (SIGINT to the process group), each landing while the Ray Train workers
    are frozen past a checkpoint: each time the next `dvc repro` resumes at the epoch after the
    last checkpoint, in the same MLflow run (KILLED in between), an interrupted run writes no
    output, and the numbers equal an uninterrupted run's, each epoch logged once."""
    root = dvc_project

    # 1. SIGTERM to the dvc process only, once epoch 1 (or later) is checkpointed
    log1 = tmp_path / "repro-1.log"
    proc, k1 = interrupted_repro(root, log1, 0, lambda p: p.send_signal(signal.SIGTERM))
    out1 = log1.read_text()
    assert "error: interrupted" in out1, out1[-3000:]
    assert k1 is not None and 1 <= k1 < EPOCHS, (k1, out1[-3000:])
    assert not (root / "models" / "model.pt").exists() and leftovers(root / "models") == []
    assert not (root / "metrics" / "train.json").exists()
    (run,) = all_runs(root)
    assert run.info.status == "KILLED"
    # rank 0 logs an epoch just before reporting its checkpoint: the frozen one may be logged
    assert steps(root, run.info.run_id) in (list(range(1, k1 + 1)), list(range(1, k1 + 2)))

    # 2. resumes after epoch k1; Ctrl-C once a later epoch is checkpointed
    log2 = tmp_path / "repro-2.log"
    proc, k2 = interrupted_repro(root, log2, k1, lambda p: os.killpg(p.pid, signal.SIGINT))
    out2 = log2.read_text()
    assert proc.returncode != 0, out2[-3000:]
    assert "resuming train-" in out2 and "error: interrupted" in out2, out2[-3000:]
    # an interrupt, not a success or a crash: the stage's own 130 (a shell that exec'd it, e.g.
    # bash) or its shell killed by the SIGINT (dash, where SHELL is unset)
    assert re.search(r"exited with (130|-2)\b", out2), out2[-3000:]
    assert k2 is not None and k1 < k2 < EPOCHS, (k1, k2, out2[-3000:])
    printed = printed_epochs(out2)
    assert printed and min(printed) == k1 + 1, (k1, printed, out2[-3000:])  # not from scratch
    (again,) = all_runs(root)
    assert again.info.run_id == run.info.run_id and again.info.status == "KILLED"
    assert steps(root, run.info.run_id) in (list(range(1, k2 + 1)), list(range(1, k2 + 2)))
    assert not (root / "models" / "model.pt").exists()

    # 3. resumes after epoch k2 and finishes: one MLflow run, each epoch step exactly once
    done = subprocess.run(
        ["dvc", "repro", "train"], cwd=root, env=project_env(**SECRETS),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out3 = done.stdout + done.stderr
    assert done.returncode == 0, out3[-3000:]
    assert "resuming train-" in out3, out3[-3000:]
    assert printed_epochs(out3) == list(range(k2 + 1, EPOCHS + 1)), (k2, out3[-3000:])
    (final,) = all_runs(root)
    assert final.info.run_id == run.info.run_id and final.info.status == "FINISHED"
    for key in (*METRICS, "images_per_sec"):
        assert steps(root, run.info.run_id, key) == list(range(1, EPOCHS + 1)), key
    info = json.loads((root / "models" / "run.json").read_text())
    assert info["run_id"] == run.info.run_id
    assert info["tracking_uri"] == f"sqlite:///{root.resolve() / 'mlflow.db'}"  # not mangled
    assert json.loads((root / "metrics" / "train.json").read_text())["epochs"] == EPOCHS

    # a later failure keeps the finished outputs (and the finished run's checkpoints) whole
    before = snapshot(root / "models")
    r = stage(root, "train", MLFLOW_TRACKING_URI=NO_SERVER)
    one_line_error(r, "MLFLOW_TRACKING_URI")
    assert snapshot(root / "models") == before and checkpointed_epoch(root) == EPOCHS

    # interrupted twice and resumed, the run computed exactly what an uninterrupted one does
    fresh = subprocess.run(
        ["dvc", "exp", "run", "--temp", "--force", "train", "-n", "uninterrupted"],
        cwd=root, env=project_env(**SECRETS), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-3000:]
    (reference,) = [r for r in all_runs(root) if r.info.run_name == "uninterrupted"]
    assert logged_history(root, run.info.run_id) == logged_history(root, reference.info.run_id)
    assert_no_secrets(root)


def dvc(root: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `root`; its output (stdout + stderr) in .stdout; fails on a non-zero exit."""
    done = subprocess.run(
        ["dvc", *args], cwd=root, env=project_env(**SECRETS), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, (args, done.stdout[-3000:])
    return done


def train_status(root: Path) -> dict:
    """`dvc status --json train`: {} when the train stage (and what it depends on) is up to date."""
    return json.loads(dvc(root, "status", "--json", "train").stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_run_section_retrains_nothing_and_a_train_key_does(dvc_project):
    """run.* (experiment, storage_path, keep_runs, keep_checkpoints, max_failures) is how a run
    is kept and tracked, not what it computes: DVC does not track it, so after a finished repro
    changing any of it leaves the train stage up to date and `dvc repro` skips it; changing
    train.lr makes it stale."""
    root = dvc_project
    params = root / "params.yaml"
    original = params.read_text()
    if train_status(root):  # run alone: nothing reproduced yet in this project
        dvc(root, "repro", "train")
    models, runs = snapshot(root / "models"), len(all_runs(root))
    operational = {
        "experiment": "another-experiment",
        "storage_path": "other_results",
        "keep_runs": 1,
        "keep_checkpoints": 1,
        "max_failures": 3,
    }
    try:
        for key, value in operational.items():
            write_params(root, params, {"run": {key: value}})  # each on top of the last
            assert train_status(root) == {}, f"run.{key} made the train stage stale"
        out = dvc(root, "repro", "train").stdout
        assert "Stage 'train' didn't change, skipping" in out, out[-3000:]
        assert "Running stage 'train'" not in out, out[-3000:]
        assert snapshot(root / "models") == models and len(all_runs(root)) == runs
        assert not (root / "other_results").exists()  # no training ran under the new settings

        write_params(root, params, {"train": {"lr": 0.002}})
        # DVC tracks the train section whole (dvc.yaml: params: train)
        stale = train_status(root)
        assert stale == {"train": [{"changed deps": {"params.yaml": {"train": "modified"}}}]}
        dry = dvc(root, "repro", "--dry", "train").stdout
        assert "Running stage 'train'" in dry, dry[-3000:]
    finally:
        params.write_text(original)
    assert train_status(root) == {}


def assert_no_secrets(root: Path) -> None:
    """No fake credential of SECRETS in the store, its artifacts, run.json or checkpoints."""
    files = [root / "mlflow.db", root / "models" / "run.json"]
    for folder in ("mlartifacts", "ray_results"):
        files += [p for p in (root / folder).rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        blob = path.read_bytes()
        for value in SECRETS.values():
            assert value.encode() not in blob, f"{value} found in {path}"
    for run in all_runs(root):
        logged = json.dumps([run.data.params, run.data.tags])
        assert not any(v in logged for v in SECRETS.values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_experiment_after_it_is_a_distinct_run_that_the_plain_loop_reproduces(dvc_project):
    """`dvc exp run --temp -S` right after another run in the same store: run in a temporary
    copy, it logs into the project's store (not the copy's), as a second MLflow run named after
    the experiment, none lost, each step once; `dvc exp show` lists it; with 1 worker the Ray
    run's numbers equal the plain loop's (same seed)."""
    import torch

    from src.config import load_params
    from src.loop import run_local
    from src.preprocess import load_processed

    root = dvc_project
    before = {r.info.run_id for r in all_runs(root)}
    done = subprocess.run(
        ["dvc", "exp", "run", "--temp", "train", "-n", "one-worker",
         "-S", "train.num_workers=1"],
        cwd=root, env=project_env(**SECRETS), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    runs = all_runs(root)
    new = [r for r in runs if r.info.run_id not in before]
    assert len(runs) == len(before) + 1 and len(new) == 1  # a new run; the earlier ones kept
    (run,) = new
    assert run.info.status == "FINISHED" and run.info.run_name == "one-worker"
    assert run.data.params["train.num_workers"] == "1"
    for key in METRICS:
        assert steps(root, run.info.run_id, key) == list(range(1, EPOCHS + 1)), key
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"], cwd=root, env=project_env(), capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert "one-worker" in shown.stdout

    params = load_params(root / "params.yaml")  # the workspace's: the experiment ran with
    params = params.model_copy(update={"train": params.train.model_copy(update={"num_workers": 1})})
    threads = torch.get_num_threads()
    try:
        plain = run_local(params, load_processed(root / "data" / "processed"))
    finally:
        torch.set_num_threads(threads)  # run_local sets the worker's thread count
    expected = [{k: e[k] for k in ("epoch", *METRICS)} for e in plain]
    assert logged_history(root, run.info.run_id) == expected
    assert_no_secrets(root)
