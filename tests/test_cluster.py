"""The cluster path with real parts, as the README's "Scale out" recipe runs it.

One stack per module, started and stopped here: a Ray cluster of a head and a worker node
started with `ray start` (1 CPU each, each its own --temp-dir and process group, token
authentication on, stopped by their pids, never `ray stop`), an S3-compatible server (moto's
server mode) on 127.0.0.1 as run.storage_path, and `mlflow server` on 127.0.0.1 as
MLFLOW_TRACKING_URI. The pipeline runs as a Ray job (`ray job submit ... -- python -m
pipeline.cluster_job`); the 2 training workers (1 CPU each) can only run one per node.

What one machine cannot show, and how it is simulated: both nodes share one disk, so "storage
the nodes do not share" is a folder mounted (tmpfs) in the driver's own mount namespace
(`unshare -m`), which the nodes' processes do not see; the test is skipped where unshare is not
permitted.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import faults
import pytest
from conftest import TINY, deep_update, make_project, project_env
from servers import mlflow_server, model_server, ray_cluster, s3_server

pytestmark = pytest.mark.slow

EPOCHS = 4  # a kill after epoch 1, a stop after the next: the rest is resumed
BUCKET = "ckpt"
STORAGE = f"s3://{BUCKET}/runs"
TOKEN = secrets.token_hex(32)
# TINY, with epochs long enough (~1 s) to kill a worker between two checkpoints
OVERRIDES = deep_update(
    copy.deepcopy(TINY),
    {
        "preprocess": {"image_size": 16},
        "model": {
            "layers": [
                {"conv": 32, "kernel": 3, "padding": "same", "batch_norm": True},
                {"pool": "max", "size": 2},
                {"fc": 32},
            ]
        },  # fmt: skip
        "train": {"epochs": EPOCHS, "cpus_per_worker": 1},
        "run": {"max_failures": 1, "storage_path": STORAGE},
    },
)
PER_EPOCH = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto + mlflow server + a 2-node `ray start` cluster (token auth) + a scratch project."""
    import boto3

    folder = tmp_path_factory.mktemp("cluster")
    with s3_server() as s3, mlflow_server(folder / "mlflow") as url:
        boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing",
                     ).create_bucket(Bucket=BUCKET)  # fmt: skip
        env = {**project_env(), **s3, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
        project = make_project(folder / "project", OVERRIDES)
        with ray_cluster(folder / "ray", env, cpus=(1, 1)) as nodes:
            yield {"nodes": nodes, "env": env, "url": url, "s3": s3, "project": project,
                   "folder": folder}  # fmt: skip


def submit(
    stack, *entrypoint: str, env_vars: dict | None = None, sid: str | None = None, **kw
) -> subprocess.Popen:
    """`ray job submit` of the stack's project, as the README says (submission id `sid`); the
    running submitter."""
    runtime = json.dumps({"env_vars": env_vars if env_vars is not None else
                          {"MLFLOW_TRACKING_URI": stack["url"]}})  # fmt: skip
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "job", "submit", "--address", stack["nodes"].dashboard,
           "--working-dir", str(stack["project"]), "--runtime-env-json", runtime,
           *(["--submission-id", sid] if sid else []), "--", *entrypoint]  # fmt: skip
    return subprocess.Popen(cmd, env=stack["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


def s3_client(stack):
    import boto3

    s3 = stack["s3"]
    return boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


def bucket_keys(stack) -> list[str]:
    pages = s3_client(stack).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def bucket_checkpointed_epoch(stack) -> int | None:
    """The latest epoch Ray registered in the bucket (its checkpoint manager snapshot)."""
    latest = None
    for key in bucket_keys(stack):
        if key.endswith(faults.SNAPSHOT):
            try:
                body = s3_client(stack).get_object(Bucket=BUCKET, Key=key)["Body"].read()
                result = json.loads(body).get("latest_checkpoint_result")
            except Exception:  # noqa: BLE001 (being rewritten)
                continue
            if result:
                latest = max(latest or 0, int(result["metrics"]["epoch"]))
    return latest


def client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack["url"])


def train_runs(stack) -> list:
    c = client(stack)
    exps = [e.experiment_id for e in c.search_experiments()]
    return [r for r in c.search_runs(exps) if r.data.tags.get("stage") == "train"]


def cluster_workers(stack) -> list[int]:
    return sorted(p for pid in stack["nodes"].pids() for p in faults.train_workers(pid))


class Job:
    """One `ray job submit` of the pipeline (submission id `sid`), its output read as it comes."""

    def __init__(self, stack, sid: str) -> None:
        self.sid, self.out = sid, []
        self.proc = submit(stack, "python", "-m", "pipeline.cluster_job", sid=sid)
        self.reader = threading.Thread(target=lambda: self.out.extend(self.proc.stdout),
                                       daemon=True)  # fmt: skip
        self.reader.start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 500) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        return code

    def text(self) -> str:
        return "".join(self.out)


def printed_epochs(out: str) -> list[int]:
    """The epochs a job's output shows trained (rank 0's "epoch N/EPOCHS  train loss" lines)."""
    found = re.findall(rf"\bepoch (\d+)/{EPOCHS}  train loss ", out)
    return list(dict.fromkeys(int(n) for n in found))


@pytest.fixture(scope="module")
def job(stack):
    """The pipeline submitted as a Ray job and, on its way, hit twice: a worker SIGKILLed once
    epoch 1's checkpoint is in the bucket (Ray replaces it), then, once the replacement has
    checkpointed an epoch of its own, the job stopped (`ray job stop`: its `dvc repro` is
    interrupted) with the workers frozen; a second submission of the same checkout reruns
    `dvc repro`, which resumes from the bucket. Both jobs' output and exit status, and what the
    faults saw."""
    seen: dict = {"error": None}
    ray = str(Path(sys.executable).parent / "ray")
    first = Job(stack, "cnn-1")
    try:
        faults.wait_until(lambda: (bucket_checkpointed_epoch(stack) or 0) >= 1,
                          "epoch 1's checkpoint in the bucket", timeout=400,
                          alive=first.alive, every=0.2)  # fmt: skip
        before = cluster_workers(stack)
        faults.signal_all(before, signal.SIGSTOP)  # training stops where it is
        at = bucket_checkpointed_epoch(stack)
        victim = before[0]
        faults.kill_worker(victim)
        faults.signal_all(before, signal.SIGCONT)
        seen.update(victim=victim, before=before, at=at)
        faults.wait_until(lambda: set(cluster_workers(stack)) - set(before),
                          "a replacement worker", timeout=300, alive=first.alive,
                          every=0.1)  # fmt: skip
        faults.wait_until(lambda: (bucket_checkpointed_epoch(stack) or 0) > at,
                          f"a checkpoint after epoch {at}", timeout=300, alive=first.alive,
                          every=0.1)  # fmt: skip
        frozen = cluster_workers(stack)
        faults.signal_all(frozen, signal.SIGSTOP)
        subprocess.run([ray, "job", "stop", "--address", stack["nodes"].dashboard, first.sid],
                       env=stack["env"], capture_output=True, timeout=120)  # fmt: skip
        faults.signal_all(frozen, signal.SIGKILL)  # none outlives its job, frozen
    except BaseException as e:  # reported by the tests, with the job's output
        seen["error"] = e
    seen.update(first_code=first.wait(), first_out=first.text())
    seen["stopped_at"] = bucket_checkpointed_epoch(stack)  # once gone: what a rerun resumes after
    status = subprocess.run([ray, "job", "status", "--address", stack["nodes"].dashboard,
                             first.sid], env=stack["env"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    seen["first_status"] = status.stdout + status.stderr
    if seen["error"] is None:
        second = Job(stack, "cnn-2")
        seen.update(code=second.wait(), out=second.text())
    return seen


@pytest.mark.timeout(600)
def test_pipeline_as_a_ray_job_tracks_registers_and_resumes_from_the_bucket(stack, job):
    """The whole pipeline through `ray job submit`: the run, each epoch step once, the test
    metrics, the registered model and its champion alias are on the tracking server; the
    checkpoints are in the bucket; a worker SIGKILLed mid-run was replaced and training went on
    from the last checkpoint in the bucket; the job stopped later (its `dvc repro` interrupted)
    and submitted again resumed at the next epoch from the bucket, in the same MLflow run; the
    head's unpacked working dir is left as Ray unpacked it (no dvc.lock, no outputs)."""
    assert job["error"] is None, (job["error"], job["first_out"][-5000:])
    assert 1 <= job["at"] < job["stopped_at"] < EPOCHS, job  # both faults mid-run
    assert "was stopped" in job["first_status"], job["first_status"]  # stopped, not finished
    assert "error: dvc repro failed" in job["first_out"], job["first_out"][-3000:]
    assert job["code"] == 0, job["out"][-5000:]
    # the rerun resumed after the last epoch in the bucket, not from scratch
    assert "resuming train-" in job["out"], job["out"][-5000:]
    assert printed_epochs(job["out"]) == list(range(job["stopped_at"] + 1, EPOCHS + 1)), (
        job["stopped_at"], job["out"][-5000:])  # fmt: skip
    runs = train_runs(stack)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    c = client(stack)
    for key in PER_EPOCH:
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, key)) == list(
            range(1, EPOCHS + 1)
        ), key
    assert "test_accuracy" in run.data.metrics
    tag = run.data.tags["ray_run"]
    assert tag.startswith(f"{STORAGE}/train-") and "?" not in tag, tag
    champion = c.get_model_version_by_alias("cnn", "champion")
    assert champion.run_id == run.info.run_id
    artifacts = [a.path for a in c.list_artifacts(run.info.run_id, "dvc")]
    assert artifacts == ["dvc/dvc.lock"], artifacts
    keys = bucket_keys(stack)
    prefix = tag.removeprefix(f"s3://{BUCKET}/")
    assert any(k.startswith(f"{prefix}/checkpoint_epoch_{EPOCHS:04d}/") for k in keys), keys
    assert not any(".storage-check-" in k for k in keys), keys  # the check cleans up
    unpacked = list(stack["nodes"].temp_dir("head").glob(
        "session_*/runtime_resources/working_dir_files/_ray_pkg_*"))  # fmt: skip
    assert unpacked, "no unpacked working dir on the head"
    for folder in unpacked:
        assert not (folder / "dvc.lock").exists() and not (folder / "models").exists(), folder


@pytest.mark.timeout(300)
def test_the_champion_serves_over_http_from_the_tracking_server(stack, job, tmp_path, monkeypatch):
    """`mlflow models serve -m models:/cnn@champion` with MLFLOW_TRACKING_URI the tracking
    server (the model's files come through its served artifacts) answers raw images over HTTP
    as the champion loaded here does."""
    import mlflow
    import numpy as np
    import pandas as pd
    import requests
    from sklearn.datasets import load_digits

    assert job.get("code") == 0, "the pipeline job did not finish"
    uri = "models:/cnn@champion"
    images = [(im * 255 / 16).astype(np.uint8) for im in load_digits().images[:5]]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["url"])
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": images}))
    env = {**project_env(), "MLFLOW_TRACKING_URI": stack["url"]}
    with model_server(Path(sys.executable).parent / "mlflow", env, tmp_path, uri) as base:
        r = requests.post(f"{base}/invocations", json={"instances": [im.tolist() for im in images]},
                          timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text[:2000]
    rows = r.json()["predictions"]
    assert [row["label"] for row in rows] == list(expected["label"])
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def processed(stack, tmp_path_factory):
    """A copy of the project with its data preprocessed here, for stages run directly."""
    root = tmp_path_factory.mktemp("direct") / "project"
    shutil.copytree(stack["project"], root, ignore=shutil.ignore_patterns(".git", ".dvc"))
    done = subprocess.run([sys.executable, "-m", "pipeline.preprocess"], cwd=root,
                          env=project_env(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def stage(root: Path, env: dict, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "pipeline.train"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "auth, cause",
    [
        # one real refusal (ray.init retries 20 s); the other reasons: test_auth_failure_reasons
        ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE is disabled here"),
    ],
)
def test_a_stage_without_the_clusters_token_fails_in_one_line_naming_token_auth(
    stack, processed, auth, cause
):
    env = {**stack["env"], "RAY_ADDRESS": stack["nodes"].address, **auth}
    done = stage(processed, env)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: RAY_ADDRESS={stack['nodes'].address}: the Ray cluster "
                           "requires token authentication and "), last  # fmt: skip
    assert cause in last and "RAY_AUTH_MODE=token" in last and TOKEN not in done.stderr
    assert "InvalidAuthToken" not in done.stderr  # Ray's retries replaced by the one line


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.timeout(300)
@pytest.mark.skipif(not unshare_works(), reason="needs `unshare -m` (a private mount namespace)")
def test_storage_the_nodes_do_not_see_fails_before_training_naming_node_and_path(
    stack, processed, tmp_path
):
    """Simulated: run.storage_path is a tmpfs mounted in the stage's own mount namespace, so the
    driver writes there and the nodes (same machine, other namespace) see an empty folder."""
    import yaml

    private = tmp_path / "private"
    private.mkdir()
    params = yaml.safe_load((processed / "params.yaml").read_text())
    params["run"]["storage_path"] = str(private)
    (processed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**stack["env"], "RAY_ADDRESS": stack["nodes"].address}
    prefix = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{private}" && exec "$@"', "sh")
    try:
        done = stage(processed, env, prefix)
    finally:
        params["run"]["storage_path"] = STORAGE
        (processed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run.storage_path {private}: node "), last
    assert "does not see the marker the driver wrote there" in last, last
    assert "epoch 1" not in done.stdout  # nothing trained
    assert list(private.iterdir()) == []  # the nodes' view: nothing


@pytest.mark.timeout(300)
def test_a_stage_inside_a_job_with_its_own_runtime_env_names_the_conflict(stack):
    """`ray job submit --working-dir . -- python -m pipeline.train` (no cluster_job): the
    stage's runtime env clashes with the job's, one line saying how to submit instead."""
    code = ("from src.cli import run_stage; from src.ray_driver import ray_session; "
            "run_stage(lambda: ray_session().__enter__())")  # fmt: skip
    proc = submit(stack, "python", "-c", code)
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode != 0, out[-3000:]
    assert "this stage runs inside a Ray job whose runtime env clashes" in out, out[-3000:]
    assert "python -m pipeline.cluster_job" in out


def test_run_uri_puts_the_run_before_a_url_query():
    from src.runstore import run_uri

    assert run_uri("s3://b/p?endpoint_override=h:9000&scheme=http", "train-1") == (
        "s3://b/p/train-1?endpoint_override=h:9000&scheme=http"
    )
    assert run_uri("/data/ray/", "train-1") == "/data/ray/train-1"


@pytest.mark.timeout(120)
def test_run_folder_with_the_endpoint_in_the_url_query(stack, monkeypatch):
    """The other way to give the endpoint: in the URI's query, as pyarrow reads it."""
    from src.runstore import RunFolder

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, stack["s3"][key])
    host = stack["s3"]["AWS_ENDPOINT_URL"].removeprefix("http://")
    folder = RunFolder(f"s3://{BUCKET}/query?endpoint_override={host}&scheme=http", "train-q")
    folder.write("x.json", {"a": 1})
    assert folder.read("x.json") == {"a": 1}
    assert "query/train-q/x.json" in bucket_keys(stack)


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"}, "it refused the token from RAY_AUTH_TOKEN"),
        ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE is disabled here"),
        ({}, "RAY_AUTH_MODE is unset here"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent"}, "no token here"),
    ],
)  # fmt: skip
def test_auth_failure_reasons(monkeypatch, env, reason):
    """What Ray logged while connecting decides whether it was the token; the driver's own
    settings say why it was refused (no cluster needed)."""
    from src.cluster import auth_failure

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    logged = "gcs_client.cc:210: Failed to get cluster ID from GCS server: Unauthenticated: ..."
    line = auth_failure("10.0.0.1:6379", logged)
    assert line.startswith("RAY_ADDRESS=10.0.0.1:6379: the Ray cluster requires token "
                           "authentication and ") and reason in line, line  # fmt: skip
    assert auth_failure("10.0.0.1:6379", "some other failure") is None
