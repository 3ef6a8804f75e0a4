"""The train stage: the epoch loop, real Ray Train runs (2 CPU workers), resume, faults, errors.

Ray fits are expensive (~20-30 s of fixed cost each), so there are few in this file: a first
2-worker run (module fixture), a checkpoint-layout run and a re-run of the first project with a
worker killed from outside (SIGKILL, tests/faults.py). The train stage on an existing cluster
(`ray start` nodes, S3, a tracking server) is tests/test_cluster.py. All share one
preprocessed dataset and the same shrunk params, so their metrics must agree (determinism).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import faults
import numpy as np
import psutil
import pytest
import torch
import yaml
from conftest import TINY, deep_update, make_project, project_env

from src import tracking
from src.config import load_params, parse_params
from src.errors import PipelineError
from src.loop import (
    DeviceData,
    LoopSpec,
    autocast_for,
    epoch_batches,
    epoch_rows,
    evaluate,
    load_state,
    make_optimizer,
    resolve_precision,
    run_local,
    split_indices,
    training_split,
)
from src.model import load_checkpoint
from src.ray_driver import STATE_FILE, check_resources
from src.runstore import DONE_FILE, prune_runs
from src.train import train_stage

EPOCHS = 3
OVERRIDES = deep_update(
    copy.deepcopy(TINY), {"train": {"epochs": EPOCHS}, "run": {"max_failures": 1}}
)
METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")  # not timings


def numbers(history: list[dict]) -> list[dict]:
    """The deterministic part of a history (no throughput or seconds)."""
    return [{k: e[k] for k in ("epoch", *METRICS)} for e in history]


# ---------------------------------------------------------------------------------------------
# Fixtures: one preprocessed dataset, projects that copy it
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_project(tmp_path_factory) -> Path:
    """A scratch project with the shrunk params and the real preprocess output (digits)."""
    root = make_project(tmp_path_factory.mktemp("train") / "base", OVERRIDES, dvc=False)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.preprocess"],
        cwd=root, env=project_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def clone(base: Path, dest: Path, overrides: dict | None = None) -> Path:
    """A project beside `base` with its params (plus `overrides`) and processed data."""
    dest.mkdir(parents=True)
    params = deep_update(yaml.safe_load((base / "params.yaml").read_text()), overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(base / "data", dest / "data")
    return dest


@pytest.fixture
def clean_env(monkeypatch):
    """No tracking server or cluster from the caller's environment."""
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def store_runs(root: Path) -> list:
    """Every run in the project's SQLite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps])


def steps(root: Path, run_id: str, key: str = "val_accuracy") -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def checkpoint_folders(run: Path) -> list[Path]:
    """A Ray run folder's checkpoints (Ray keeps its snapshot file beside them), sorted."""
    return sorted(p for p in run.glob("checkpoint_*") if p.is_dir())


def logged_history(root: Path, run_id: str) -> list[dict]:
    """The per-epoch metrics as MLflow holds them, shaped like a history."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    by_step: dict[int, dict] = {}
    for key in METRICS:
        for m in client.get_metric_history(run_id, key):
            by_step.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def first_run(base_project, tmp_path_factory):
    """One real 2-worker TorchTrainer run of the train stage, in-process; the store as it was
    right after it (later tests add runs to the same project)."""
    root = base_project
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DVC_EXP_NAME", "DVC_ROOT"):
            mp.delenv(name, raising=False)
        mp.chdir(root)
        metrics = train_stage(load_params(root / "params.yaml"), root)
    runs = store_runs(root)
    run_id = metrics["run_id"]
    return {
        "root": root,
        "metrics": metrics,
        "runs": runs,
        "steps": {k: steps(root, run_id, k) for k in (*METRICS, "images_per_sec")},
        "history": logged_history(root, run_id),
    }


# ---------------------------------------------------------------------------------------------
# The loop, without Ray (fast)
# ---------------------------------------------------------------------------------------------


def test_validation_split_holds_out_originals_stratified():
    rng = np.random.default_rng(0)
    originals = np.repeat(np.arange(5), 20)[rng.permutation(100)]
    labels = np.concatenate([originals, originals, originals])  # two augmented copies
    train_rows, val_rows = split_indices(labels, 100, 0.2, seed=7)
    assert (val_rows < 100).all()  # validation = un-augmented originals only
    assert not set(train_rows % 100) & set(val_rows)  # no copy of a validation image trained on
    assert len(train_rows) + len(val_rows) * 3 == 300
    assert np.bincount(labels[val_rows]).tolist() == [4] * 5  # stratified
    again, _ = split_indices(labels, 100, 0.2, seed=7)
    assert np.array_equal(train_rows, again)
    with pytest.raises(PipelineError, match="num_originals"):
        split_indices(labels[:-1], 100, 0.2, seed=7)


def test_copies_per_epoch_takes_each_originals_copies_in_turn():
    """train.copies_per_epoch k: each epoch trains on every kept original and k of its copies,
    the copies taken in turn, so 4 copies at k=1 give 4 epochs 4 different views."""
    labels = np.tile(np.repeat(np.arange(5), 4), 5)  # 20 originals, 4 augmented copies
    spec = LoopSpec({}, {"val_fraction": 0.25, "batch_size": 8, "copies_per_epoch": 1}, 0,
                    [0.0], [1.0], num_originals=20, copies=4)  # fmt: skip
    train_rows, val_rows = training_split(spec, labels)
    kept = set(train_rows[train_rows < 20].tolist())
    seen = []
    for epoch in range(1, 6):
        rows = epoch_rows(train_rows, epoch, spec)
        copies = rows // 20
        assert set(rows[copies == 0].tolist()) == kept  # every original, every epoch
        assert len(rows) == 2 * len(kept) and len(set(copies[copies > 0].tolist())) == 1
        assert set((rows[copies > 0] % 20).tolist()) == kept  # one copy of each
        seen.append(int(copies[copies > 0][0]))
    assert seen == [1, 2, 3, 4, 1]
    both = LoopSpec({}, {**spec.train, "copies_per_epoch": 2}, 0, [0.0], [1.0], 20, 4)
    assert sorted(set((epoch_rows(train_rows, 2, both) // 20).tolist())) == [0, 3, 4]
    every = LoopSpec({}, {**spec.train, "copies_per_epoch": None}, 0, [0.0], [1.0], 20, 4)
    assert np.array_equal(epoch_rows(train_rows, 3, every), train_rows)
    too_many = LoopSpec({}, {**spec.train, "copies_per_epoch": 5}, 0, [0.0], [1.0], 20, 4)
    with pytest.raises(PipelineError, match=r"train.copies_per_epoch 5 is more than the 4 "):
        training_split(too_many, labels)


def test_two_workers_see_the_global_batches_of_one():
    rows = np.arange(1000)
    one = epoch_batches(rows, epoch=3, seed=1, rank=0, world_size=1, batch_size=64)
    r0 = epoch_batches(rows, epoch=3, seed=1, rank=0, world_size=2, batch_size=32)
    r1 = epoch_batches(rows, epoch=3, seed=1, rank=1, world_size=2, batch_size=32)
    assert len(one) == len(r0) == len(r1) == 1000 // 64
    for g, a, b in zip(one, r0, r1, strict=True):
        assert sorted(g) == sorted(np.concatenate([a, b]))
    other = epoch_batches(rows, epoch=4, seed=1, rank=0, world_size=1, batch_size=64)
    assert not np.array_equal(one[0], other[0])  # a new order each epoch


def test_plain_loop_is_deterministic(base_project):
    from src.preprocess import load_processed

    params = parse_params(
        deep_update(yaml.safe_load((base_project / "params.yaml").read_text()),
                    {"train": {"epochs": 2, "num_workers": 1}})
    )  # fmt: skip
    data = load_processed(base_project / "data/processed")
    first, second = run_local(params, data), run_local(params, data)
    assert [e["epoch"] for e in first] == [1, 2]
    assert numbers(first) == numbers(second)
    assert first[-1]["val_accuracy"] > 0.5  # it learns


@pytest.mark.parametrize(
    "flags", [{"amx_bf16"}, {"avx512_bf16"}, {"avx512f", "avx2"}, set()], ids=repr
)
def test_precision_auto_is_bf16_exactly_where_the_cpu_flags_say_it_is_native(monkeypatch, flags):
    """auto on CPU: bf16 exactly when /proc/cpuinfo lists AMX BF16 or AVX-512 BF16 (cpu_flags),
    and autocast then computes in bf16; anywhere else fp32, no autocast."""
    import src.loop

    cpu = torch.device("cpu")
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(src.loop, "cpu_flags", lambda *a, **k: frozenset(flags))
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with autocast_for("auto", cpu)():
        out = torch.nn.Linear(4, 2)(torch.ones(3, 4))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)


def test_cpu_flags_reads_the_flags_line_of_cpuinfo(tmp_path):
    from src.loop import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_bf16\nbugs\t: x\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_is_fused_on_cpu_and_steps_as_the_unfused_one(name):
    """make_optimizer fuses the update on CPU (one kernel, not one per tensor); a few steps
    leave the weights where torch's tensor-by-tensor update does, up to rounding."""
    train = {"optimizer": name, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}
    nets = [
        torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        for _ in "ab"
    ]
    nets[1].load_state_dict(nets[0].state_dict())
    fused, plain = (make_optimizer(net, train) for net in nets)
    assert all(g["fused"] for g in fused.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]
    for g in plain.param_groups:
        g["fused"] = None
    x = torch.randn(8, 5)
    for _ in range(3):
        for net, opt in zip(nets, (fused, plain), strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_device_data_matches_preprocess_normalize(base_project):
    from src.preprocess import load_processed
    from src.transforms import normalize

    data = load_processed(base_project / "data/processed")
    rows = np.arange(10)
    mean, std = data.meta["mean"], data.meta["std"]
    x, y = DeviceData(data.train_images, data.train_labels, mean, std, torch.device("cpu")).get(
        rows
    )
    expected = normalize(np.asarray(data.train_images[rows]), mean, std)
    assert np.allclose(x.numpy(), expected, atol=1e-6)
    assert y.tolist() == data.train_labels[rows].tolist()


def test_resource_errors_are_one_line():
    def train(**kw):
        base = {"num_workers": 2, "batch_size": 64}
        return parse_params({"model": {"layers": [{"fc": 4}]}, "train": {**base, **kw}}).train

    with pytest.raises(
        PipelineError,
        match=r"train.num_workers 4 x train.cpus_per_worker 1 needs 4 CPUs but this machine has 2",
    ):
        check_resources(train(num_workers=4), {"CPU": 2.0}, "this machine")
    with pytest.raises(PipelineError, match="train.use_gpu: true needs 2 GPUs"):
        check_resources(train(use_gpu=True), {"CPU": 8.0, "GPU": 1.0}, "the cluster")
    with pytest.raises(PipelineError, match="fp16 autocast needs a GPU"):
        check_resources(train(precision="fp16"), {"CPU": 8.0}, "this machine")
    with pytest.raises(PipelineError, match="more than any node"):
        check_resources(train(cpus_per_worker=4), {"CPU": 8.0}, "the cluster", node_cpus=2.0)
    assert check_resources(train(), {"CPU": 2.0, "GPU": 2.0}, "x") is True  # auto: GPUs
    assert check_resources(train(), {"CPU": 2.0, "GPU": 1.0}, "x") is False  # too few for 2


def test_batch_size_that_does_not_divide_fails_in_one_line(base_project, tmp_path):
    root = clone(base_project, tmp_path / "p", {"train": {"batch_size": 65}})
    done = subprocess.run(  # the stage of base_project, run in the clone (paths from its cwd)
        [sys.executable, "-m", "pipeline.train"],
        cwd=root, env=project_env(PYTHONPATH=str(base_project)), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: params.yaml: train.batch_size 65 is not divisible by train.num_workers 2 "
        "(each worker gets batch_size // num_workers)"
    ]


def test_more_workers_than_cpus_fails_fast(base_project, tmp_path, clean_env):
    cpus = len(os.sched_getaffinity(0))
    root = clone(
        base_project,
        tmp_path / "p",
        {"train": {"num_workers": cpus + 1, "batch_size": 64 * (cpus + 1)}},
    )
    with pytest.raises(PipelineError, match=rf"needs {cpus + 1} CPUs but this machine has {cpus}"):
        train_stage(load_params(root / "params.yaml"), root)
    assert not (root / "mlflow.db").exists()  # nothing started: no store, no Ray to wait on
    assert not (root / "ray_results").exists()


def test_batch_larger_than_the_training_split_fails_fast(base_project, tmp_path, clean_env):
    root = clone(base_project, tmp_path / "p", {"train": {"batch_size": 1 << 16}})
    with pytest.raises(
        PipelineError, match=r"train.batch_size 65536 is larger than the training split"
    ):
        train_stage(load_params(root / "params.yaml"), root)
    assert not (root / "mlflow.db").exists()


def test_unreachable_ray_address_fails_fast(base_project, tmp_path, clean_env):
    root = clone(base_project, tmp_path / "p")
    clean_env.setenv("RAY_ADDRESS", "127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(PipelineError, match=r"RAY_ADDRESS=127.0.0.1:9: Ray cluster unreachable"):
        train_stage(load_params(root / "params.yaml"), root)
    assert not (root / "mlflow.db").exists()


def test_keep_runs_prunes_only_older_finished_runs_nobody_holds(tmp_path):
    """prune_runs on a storage folder as the stage leaves it: the current run is kept and
    counts toward k; unfinished (resumable) runs, runs a stage holds and other folders stay."""
    import fcntl

    storage = tmp_path / "ray_results"
    finished = {"train-a": 1, "train-held": 2, "train-b": 3, "train-current": 4, "other": 0}
    for name in [*finished, "train-unfinished"]:
        (storage / name / "checkpoint_000001").mkdir(parents=True)
    for name, mtime in finished.items():
        (storage / name / DONE_FILE).write_text("{}")
        os.utime(storage / name / DONE_FILE, (mtime, mtime))
    with open(storage / ".train-held.lock", "a+") as held:  # a train stage holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        removed = prune_runs(str(storage), 2, "train-current")
    assert removed == ["train-a"]
    assert sorted(p.name for p in storage.iterdir() if p.is_dir()) == [
        "other", "train-b", "train-current", "train-held", "train-unfinished"
    ]  # fmt: skip
    assert prune_runs(str(storage), 1, "train-current") == ["train-held", "train-b"]
    assert prune_runs(str(tmp_path / "absent"), 1, "train-current") == []


def test_log_epochs_never_logs_a_step_twice(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = tracking.get_or_create_experiment("t", tmp_path)
    run_id, resumed = tracking.open_run(exp, "r", {"api_token": "x", "ok": "1"})
    assert not resumed
    history = [{"epoch": e, "val_accuracy": e / 10, "train_loss": 1.0 / e} for e in (1, 2)]
    assert tracking.log_epochs(uri, run_id, history) == [1, 2]
    assert tracking.log_epochs(uri, run_id, history[:1]) == []
    history.append({"epoch": 3, "val_accuracy": 0.3, "train_loss": 0.3})
    assert tracking.log_epochs(uri, run_id, history) == [3]
    client = mlflow.MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 2, 3]
    tags = client.get_run(run_id).data.tags
    assert "api_token" not in tags and tags["ok"] == "1"  # secrets never logged
    again, resumed = tracking.open_run(exp, "r", {}, run_id)
    assert (again, resumed) == (run_id, True)
    tracking.log_params(run_id, {"a.password": "p", "a.uri": "http://u:pw@host/", "a.n": 3})
    assert client.get_run(run_id).data.params == {"a.n": "3"}


_WRITER = """
import sys
import mlflow
from src import tracking
uri, name = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(uri)
exp = tracking.get_or_create_experiment("shared", None)
run_id, _ = tracking.open_run(exp, name, {"writer": name})
history = []
for step in range(1, 41):
    history.append({"epoch": step, "val_accuracy": step / 100, "train_loss": 1.0 / step})
    tracking.log_epochs(uri, run_id, history)
tracking.log_params(run_id, {f"p.{i}": i for i in range(30)})
tracking.end_run(run_id, "FINISHED")
"""


def test_concurrent_writers_to_one_sqlite_store(tmp_path):
    """Two processes logging into the same SQLite store at once: no 'database is locked'."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    tracking.get_or_create_experiment("shared", tmp_path)  # the store exists before the race
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, uri, f"w{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 41))


# ---------------------------------------------------------------------------------------------
# Real Ray Train runs (slow)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_worker_run_logs_one_run_and_a_model_that_reproduces(first_run):
    root, metrics = first_run["root"], first_run["metrics"]
    runs = first_run["runs"]
    assert len(runs) == 1 and runs[0].info.run_id == metrics["run_id"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key, logged in first_run["steps"].items():
        assert logged == list(range(1, EPOCHS + 1)), key  # each epoch step exactly once
    assert run.data.params["train.num_workers"] == "2"
    assert json.loads(run.data.params["model.layers"])[0]["conv"] == 8
    tags = run.data.tags
    for key in ("git_commit", "data_md5", "data_sha256", "ray_version", "torch_version"):
        assert tags[key], key
    assert tags["num_workers"] == "2" and tags["device"] == "cpu"
    folders = checkpoint_folders(Path(tags["ray_run"]))
    kept = [p.name for p in folders]
    assert f"checkpoint_epoch_{EPOCHS:04d}" in kept, kept
    assert set(kept) <= {f"checkpoint_epoch_{e:04d}" for e in range(1, EPOCHS + 1)}, kept
    for folder in folders:  # report_epoch: rank 0's state only, through Checkpoint.from_directory
        assert [f.name for f in folder.iterdir()] == [STATE_FILE], folder
        state = load_state(folder / STATE_FILE)
        assert state["history"][-1]["epoch"] == int(folder.name[-4:]), folder

    info = tracking.read_run_file(root / "models/run.json")
    assert info["run_id"] == metrics["run_id"] and info["experiment_name"] == "cnn-pipeline"
    saved = json.loads((root / "metrics/train.json").read_text())
    assert saved["epochs"] == EPOCHS and saved["best_epoch"] in range(1, EPOCHS + 1)
    assert sorted(p.name for p in (root / "plots/train").iterdir()) == sorted(
        [f"{k}.tsv" for k in (*METRICS, "images_per_sec", "epoch_seconds")] + ["curves.png"]
    )

    # models/model.pt rebuilds the network and reproduces the logged validation accuracy
    from src.preprocess import load_processed

    model, extra = load_checkpoint(root / "models/model.pt")
    data = load_processed(root / "data/processed")
    assert extra["class_names"] == data.meta["class_names"] and extra["channels"] == 1
    _, val_rows = split_indices(data.train_labels, data.meta["num_originals"], 0.1, seed=42)
    feed = DeviceData(
        data.train_images, data.train_labels, extra["mean"], extra["std"], torch.device("cpu")
    )
    _, correct, count = evaluate(model, feed, val_rows)
    best = first_run["history"][saved["best_epoch"] - 1]
    assert abs(correct / count - best["val_accuracy"]) <= 1 / count
    assert saved["val_accuracy"] == pytest.approx(best["val_accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_is_replaced_and_training_completes(first_run, clean_env):
    """A worker process SIGKILLed from outside once epoch 1 is checkpointed: with
    run.max_failures 1 Ray replaces the worker group, which resumes from the last checkpoint,
    and the run completes with each epoch logged once and the numbers of the uninterrupted
    first run. Re-running the finished project also checks that a completed run is trained
    anew (a second MLflow run), not 'resumed'; and run.keep_runs 1 then prunes."""
    root = first_run["root"]
    clean_env.chdir(root)
    # run.keep_runs 1 (not part of the run's identity): once this run finishes, an older
    # finished run's folder goes, an unfinished one stays
    storage = root / "ray_results"
    older, unfinished = storage / "train-older", storage / "train-unfinished"
    for run in (older, unfinished):
        (run / "checkpoint_000000").mkdir(parents=True)
    (older / DONE_FILE).write_text("{}")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["run"]["keep_runs"] = 1
    params = parse_params(raw)

    seen: dict = {"killed": None, "before": [], "after": [], "error": None}
    done = threading.Event()

    def kill_after_epoch_1() -> None:
        try:
            me = os.getpid()
            # the workers of this run: the finished run's folder (and snapshot) is gone by then
            seen["before"] = faults.wait_workers(me, 2)
            faults.wait_until(lambda: (faults.checkpointed_epoch(storage) or 0) >= 1,
                              "epoch 1's checkpoint", alive=lambda: not done.is_set())  # fmt: skip
            # the first worker of the group still alive (the group may have just changed)
            victim = faults.train_workers(me)[0]
            faults.kill_worker(victim)
            seen["killed"] = (victim, faults.checkpointed_epoch(storage))
            faults.wait_until(lambda: set(faults.train_workers(me)) - set(seen["before"]),
                              "a replacement worker", alive=lambda: not done.is_set())  # fmt: skip
            seen["after"] = faults.train_workers(me)
        except BaseException as e:  # reported by the test, not lost in the thread
            seen["error"] = e

    shm = Path("/dev/shm")
    shm_before = set(os.listdir(shm)) if shm.is_dir() else set()
    lock_files = sorted(storage.glob(".*.lock"))
    watcher = threading.Thread(target=kill_after_epoch_1, daemon=True)
    watcher.start()
    try:
        metrics = train_stage(params, root)
    finally:
        done.set()
        watcher.join(60)
    assert seen["error"] is None, seen
    # nothing left behind by the killed worker or the stage: no shared-memory files, no lock
    if shm.is_dir():
        assert set(os.listdir(shm)) - shm_before == set(), sorted(set(os.listdir(shm)) - shm_before)
    assert sorted(storage.glob(".*.lock")) == lock_files
    victim, at = seen["killed"]
    assert victim in seen["before"] and 1 <= at < EPOCHS, seen  # killed mid-run
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    assert set(seen["after"]) - set(seen["before"]), seen  # a new worker group trained on

    runs = store_runs(root)
    this = next(r for r in runs if r.info.run_id == metrics["run_id"])
    assert this.info.status == "FINISHED"
    assert not older.exists() and unfinished.exists()
    done_files = [str(p.parent) for p in storage.glob(f"*/{DONE_FILE}")]
    assert done_files == [this.data.tags["ray_run"]]
    assert len(runs) == 2 and metrics["run_id"] != first_run["metrics"]["run_id"]
    for key in METRICS:
        assert steps(root, metrics["run_id"], key) == list(range(1, EPOCHS + 1)), key
    assert logged_history(root, metrics["run_id"]) == first_run["history"]
