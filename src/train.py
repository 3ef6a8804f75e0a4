"""The train stage: Ray Train on the processed data, one MLflow run, the stage's outputs.

  train_stage(params, root)  check, hold the run, fit (src.ray_driver), write models/, metrics/,
                             plots/ and log them to the MLflow run

Where the parts live: the epoch loop is src.loop, Ray is src.ray_driver, the run's name, lock and
pruning are src.runstore, signals and the parent watch are src.supervise, MLflow is src.tracking.

Decisions (and why):
* Resume: the Ray run's name is a hash of the model/train params, the seed and the data, under
  run.storage_path. Re-running after an interruption finds its checkpoints there (Ray restores
  the checkpoint manager from storage; ray.train.get_checkpoint() returns the latest) and goes on
  at the next epoch; a run that finished is marked done and a re-run (dvc repro -f) starts anew.
  The MLflow run id is kept in the same folder, so a resumed run logs into the same MLflow run.
  Steps already in MLflow are never logged again (tracking.log_epochs is idempotent).
* An interrupted or failed fit writes no output: outputs are written only from a Result whose
  every epoch was reported (src.ray_driver.fit), and the MLflow run is then marked KILLED or
  FAILED.
* The final model (models/model.pt) is the best checkpoint by validation accuracy (ties: the
  later epoch), as CheckpointConfig keeps the best k by that metric; metrics/train.json describes
  that epoch.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src import tracking
from src.cluster import check_storage
from src.config import Params
from src.files import atomic_dir, write_json
from src.loop import LoopSpec, loop_spec, training_split
from src.model import CNN, CNNConfig, save_checkpoint
from src.ray_driver import (
    TRACKING_ENV,
    best_checkpoint,
    check_ray_address,
    check_resources,
    fit,
    machine_resources,
    ray_address,
    ray_session,
)
from src.runstore import (
    DONE_FILE,
    MLFLOW_RUN_FILE,
    RunFolder,
    data_fingerprint,
    prune_runs,
    run_key,
    run_uri,
    storage_uri,
)
from src.supervise import sigterm_as_interrupt


def model_extra(meta: dict[str, Any]) -> dict[str, Any]:
    """What models/model.pt carries beside the weights: classes, normalisation, preprocessing."""
    return {
        "class_names": [str(c) for c in meta["class_names"]],
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "image_size": int(meta["image_size"]),
        "channels": int(meta["channels"]),
        "preprocess": dict(meta["preprocess"]),
    }


def summary_metrics(best: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """metrics/train.json: the chosen epoch's numbers, and the median epoch throughput."""
    return {
        "best_epoch": int(best["epoch"]),
        "epochs": len(history),
        "train_loss": best["train_loss"],
        "train_accuracy": best["train_accuracy"],
        "val_loss": best["val_loss"],
        "val_accuracy": best["val_accuracy"],
        "images_per_sec": statistics.median(e["images_per_sec"] for e in history),
    }


def write_plots(folder: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """Per-epoch curves for DVC, written by DVCLive: `folder`/<metric>.tsv (columns step =
    epoch, value), and curves.png (loss and accuracy, train and validation). The folder appears whole (atomic); DVCLive's own params, dvc.yaml and summary
    are left out (params.yaml and metrics/train.json hold them)."""
    from dvclive import Live

    folder = Path(folder).resolve()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(folder) as tmp:
        # DVCLive looks for a repository from the working directory: it would `dvc init` a Git
        # repo without DVC and fails in one without commits. From a scratch folder it finds
        # none and only writes files (DVC reads them as plots of the stage).
        os.chdir(scratch)
        try:
            with Live(dir="live", save_dvc_exp=False, dvcyaml=None, report=None) as live:
                for entry in history:
                    live.step = int(entry["epoch"])
                    for key, value in entry.items():
                        if key != "epoch":
                            live.log_metric(key, value)
        finally:
            os.chdir(cwd)
        for tsv in (Path(scratch) / "live" / "plots" / "metrics").glob("*.tsv"):
            shutil.move(tsv, tmp / tsv.name)
        from src.evaluate import plot_curves

        plot_curves(history, tmp / "curves.png")


def train_stage(params: Params, root: str | os.PathLike = ".") -> dict[str, Any]:
    """The train stage: train with Ray Train, track in MLflow, write models/, metrics/, plots/.

    Args:
        params: validated params.
        root: the project folder (paths.* are relative to it; the SQLite store is there).
    Returns:
        metrics/train.json's content plus run_id.
    Raises:
        PipelineError (one line) for missing data, impossible resources, an unreachable
        RAY_ADDRESS or tracking server, or training that fails past run.max_failures.
    """
    from src.preprocess import load_processed

    root = Path(root).resolve()
    t, paths = params.train, params.paths
    processed_dir = root / paths.processed
    data = load_processed(processed_dir)
    spec = loop_spec(params, data.meta)
    training_split(spec, data.train_labels)  # before starting anything: fail in a second
    if address := ray_address():
        check_ray_address(address)
    else:
        check_resources(t, machine_resources(), "this machine")
    data_hash = data_fingerprint(processed_dir)
    key = run_key(params, data_hash)
    storage = storage_uri(params.run.storage_path, root)
    ray_name = f"train-{key}"
    folder = RunFolder(storage, ray_name)
    uri = tracking.setup(root)  # an unreachable store fails here, before anything is written
    with folder.claim():
        return _train_run(params, root, data, spec, folder, data_hash, uri)


def _train_run(
    params: Params,
    root: Path,
    data: Any,
    spec: LoopSpec,
    folder: RunFolder,
    data_hash: str,
    uri: str,
) -> dict[str, Any]:
    """train_stage's work once it holds the run's folder: see train_stage."""
    t, paths = params.train, params.paths
    storage, ray_name, key = folder.storage, folder.name, folder.name.removeprefix("train-")
    if folder.read(DONE_FILE) is not None:  # that run finished: train anew, don't "resume" it
        folder.delete()

    experiment_id = tracking.get_or_create_experiment(params.run.experiment, root)
    run_name = os.environ.get("DVC_EXP_NAME") or f"train-{key[:8]}"
    opened: dict[str, str] = {}  # the MLflow run once open: marked KILLED if the stage is abandoned

    def abandon() -> None:
        if "run_id" in opened:
            tracking.end_run(opened["run_id"], "KILLED")

    # The workers find the store in their environment (inherited from this process by a local
    # instance; the runtime env's env_vars on a cluster), not in their config: it may carry
    # credentials, and Ray keeps the config in its object store.
    os.environ[TRACKING_ENV] = uri
    # SIGTERM handler after ray.init, which installs its own (exit without marking the run)
    with ray_session() as cluster, sigterm_as_interrupt(abandon):
        import ray

        use_gpu = check_resources(t, cluster.resources, cluster.where, cluster.node_cpus)
        if not cluster.local:  # every node must see the same checkpoints: fail before training
            check_storage(storage, cluster.where, tracking.redacted(storage))
        tags = {
            "stage": "train",
            "git_commit": tracking.git_commit(root),
            "data_md5": tracking.lock_out_md5(root, "preprocess", paths.processed) or "absent",
            "data_sha256": data_hash,
            "ray_version": ray.__version__,
            "torch_version": torch.__version__,
            "num_workers": str(t.num_workers),
            "device": "cuda" if use_gpu else "cpu",
            "ray_run": tracking.redacted(run_uri(storage, ray_name)),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        }
        previous = (folder.read(MLFLOW_RUN_FILE) or {}).get("run_id")
        run_id, resumed = tracking.open_run(experiment_id, run_name, tags, previous)
        opened["run_id"] = run_id
        folder.write(MLFLOW_RUN_FILE, {"run_id": run_id, "tracking_uri": tracking.redacted(uri)})
        if resumed:
            print(f"resuming {ray_name} (MLflow run {run_id})", flush=True)
        # Rank 0 logs each epoch as it ends, unless the store is a file on this machine and the
        # workers may run on others (RAY_ADDRESS): then the driver logs them all after fit.
        local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        track = None if local_store and not cluster.local else {"run_id": run_id}
        try:
            tracking.log_params(run_id, params.flat())
            result = fit(
                spec, np.asarray(data.train_images), np.asarray(data.train_labels),
                name=ray_name, storage=storage, use_gpu=use_gpu, train=t,
                run=params.run, track=track,
            )  # fmt: skip
            best, history = best_checkpoint(result)
        except BaseException as e:
            tracking.end_run(run_id, _end_status(e))
            raise

    try:
        metrics = write_outputs(params, root, data.meta, best, history, run_id)
        tracking.write_run_file(
            root / paths.models / "run.json",
            {
                "run_id": run_id,
                "experiment_id": experiment_id,
                "experiment_name": params.run.experiment,
                "run_name": run_name,
                "tracking_uri": tracking.redacted(uri),
            },
        )
    except BaseException as e:
        tracking.end_run(run_id, _end_status(e))
        raise
    folder.write(DONE_FILE, {"run_id": run_id, "epochs": len(history)})
    if params.run.keep_runs is not None:
        removed = prune_runs(storage, params.run.keep_runs, ray_name)
        if removed:
            print(f"run.keep_runs {params.run.keep_runs}: removed the checkpoints of {len(removed)} "
                  f"older finished run(s): {', '.join(removed)}", flush=True)  # fmt: skip
    return {**metrics, "run_id": run_id}


def write_outputs(
    params: Params,
    root: Path,
    meta: dict[str, Any],
    best: dict[str, Any],
    history: list[dict[str, Any]],
    run_id: str,
) -> dict[str, Any]:
    """Write model.pt, metrics/train.json and the plots (each atomically), complete the MLflow
    run's epochs, log the models into it and mark it FINISHED. Returns train.json's content.

    Args:
        best: the chosen checkpoint's state (weights, model config, history up to it).
        history: every epoch of the run.
    """
    paths = params.paths
    net = CNN(CNNConfig(**best["model_config"]))
    net.load_state_dict(best["model"])
    net.eval()
    model_path = root / paths.models / "model.pt"
    save_checkpoint(model_path, net, model_extra(meta))
    metrics = summary_metrics(best["history"][-1], history)
    write_json(root / paths.metrics / "train.json", metrics)
    write_plots(root / paths.plots / "train", history)
    tracking.log_epochs(tracking.setup(root), run_id, history)  # epochs rank 0 did not log
    with tracking.active_run(run_id):
        from src.registry import log_pyfunc_model

        log_pyfunc_model(model_path)
        tracking.set_tag(run_id, "best_epoch", str(metrics["best_epoch"]))
    tracking.log_to_run(run_id, {}, {"plots": [root / paths.plots / "train" / "curves.png"]})
    return metrics


def _end_status(e: BaseException) -> str:
    """The MLflow status of a run that stopped on `e`: interrupted (KILLED) or FAILED."""
    return "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
