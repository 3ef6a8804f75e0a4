"""Logging and loading the pipeline's MLflow model, and the register stage's promotion rule.

The model itself (`ImageClassifier`, its input forms and output) is src.serving; it is logged as
models-from-code (src/mlflow_model.py, run at load time: nothing is unpickled) with `model.pt` as
its one artifact. It is the only model a training run logs.

    curl -s http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' \
      -d '{"dataframe_split": {"columns": ["image"], "data": [["'"$(base64 -w0 digit.png)"'"]]}}'

Registering (`register`): once per training run, alias ``challenger`` on that version, alias
``champion`` moved only when the candidate beats the champion's test metric by ``min_delta``.
Only this module, src/serving.py and src/tracking.py import mlflow.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from src import tracking
from src.errors import PipelineError
from src.files import read_json, write_json
from src.serving import (
    CHECKPOINT_KEY,
    FORMAT,
    FORMAT_TAG,
    INPUT_FORMS,
    KIND,
    KIND_TAG,
    SERVING_REQUIREMENTS,
    signature,
)

MODEL_ARTIFACT = "model"  # the name the train stage logs the pyfunc under in its run
MODEL_FILE = Path(__file__).with_name("mlflow_model.py")  # models-from-code: run, not unpickled
CHAMPION, CHALLENGER = "champion", "challenger"


def log_pyfunc_model(checkpoint_path: str | os.PathLike, name: str = MODEL_ARTIFACT) -> str:
    """Log `checkpoint_path` as this pipeline's pyfunc model inside the active MLflow run.

    Args:
        checkpoint_path: a `model.pt` written by `src.model.save_checkpoint` (its `extra` holds
            class names, normalisation and the preprocessing).
        name: the model's name in the run (the register stage looks for "model").
    Returns:
        The logged model's URI (``models:/<model_id>``).
    """
    from src.model import load_checkpoint

    checkpoint_path = Path(checkpoint_path)
    _, extra = load_checkpoint(checkpoint_path)
    side = int(extra["image_size"])
    shape = (side, side) if int(extra["channels"]) == 1 else (side, side, 3)
    example = pd.DataFrame({"image": [np.zeros(shape, dtype=np.uint8).tolist()]})
    src_dir = Path(__file__).resolve().parent
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_FILE),  # models-from-code: stored as code, run at load
        artifacts={CHECKPOINT_KEY: str(checkpoint_path)},
        code_paths=[str(src_dir)],  # the model file imports src.serving, src.model, ...
        pip_requirements=SERVING_REQUIREMENTS,
        signature=signature(),
        input_example=example,
        metadata={
            KIND_TAG: KIND,
            FORMAT_TAG: FORMAT,
            "input": INPUT_FORMS,
            "class_names": list(extra["class_names"]),
            "channels": int(extra["channels"]),
        },
    )
    return info.model_uri


def load_model(model_uri: str, root: str | os.PathLike | None = None):
    """Load a registered or logged pyfunc (e.g. ``models:/cnn@champion``) from the project's store.

    Args:
        model_uri: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, ...
        root: the project folder whose mlflow.db to use when MLFLOW_TRACKING_URI is unset.
    Returns:
        The mlflow PyFuncModel; its ``metadata.metadata`` holds class_names and channels.
    Raises PipelineError naming `model_uri` when the model, version or alias does not exist,
    or when it is not this pipeline's image classifier.
    """
    from mlflow.models import get_model_info

    uri = tracking.setup(root)
    try:
        # The kind is read from the MLmodel file first: a pyfunc's Python object is unpickled
        # on load, so a model this pipeline did not log is refused before it is loaded.
        meta = get_model_info(model_uri).metadata or {}
        if meta.get(KIND_TAG) != KIND:
            raise PipelineError(f"{model_uri}: not an image classifier logged by this pipeline")
        if meta.get(FORMAT_TAG) != FORMAT:
            raise PipelineError(
                f"{model_uri}: logged by an earlier version of this pipeline as a pickled Python "
                f"object, which is not loaded; retrain it (dvc repro -f train) and register again"
            )
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        first = str(e.message).splitlines()[0] if e.message else e.error_code
        raise PipelineError(
            f"{model_uri}: cannot load the model from {tracking.redacted(uri)} ({first})"
        ) from None


# ---------------------------------------------------------------------------------------------
# The register stage
# ---------------------------------------------------------------------------------------------


def _lock_tags(lock_file: Path) -> dict[str, str]:
    """dvc.lock's hashes: the preprocess outputs (the data), the model, and the params of the
    stages that made the model (a sha256 over their recorded values)."""
    import yaml

    if not lock_file.exists():
        return {"dvc.lock": "absent"}
    try:
        stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {"dvc.lock": "unreadable"}
    tags: dict[str, str] = {}
    for stage, key, suffix in (
        ("preprocess", "dvc.data_md5", ""),
        ("train", "dvc.model_md5", ".pt"),
    ):
        outs = (stages.get(stage) or {}).get("outs", [])
        hashes = [
            f"{o.get('path')}:{o.get('md5')}"
            for o in outs
            if o.get("md5") and str(o.get("path", "")).endswith(suffix)
        ]
        if hashes:
            tags[key] = ",".join(hashes)
    params = {
        stage: stages[stage].get("params", {})
        for stage in ("preprocess", "train", "evaluate")
        if stage in stages
    }
    if params:
        blob = json.dumps(params, sort_keys=True, default=str).encode()
        tags["dvc.params_sha256"] = hashlib.sha256(blob).hexdigest()
    return tags


def _test_metrics(evaluate_json: Path) -> dict[str, float]:
    """The scalar test metrics of evaluate.json (per-class tables left out)."""
    metrics = read_json(evaluate_json, "test metrics of the evaluate stage")
    if not isinstance(metrics, dict):
        raise PipelineError(f"{evaluate_json}: expected a JSON object of metrics")
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def beats(candidate: float, champion: float, mode: str, min_delta: float) -> bool:
    """Whether `candidate` improves on `champion` by at least `min_delta` (and strictly)."""
    gain = candidate - champion if mode == "max" else champion - candidate
    return gain > 0 and gain >= min_delta - 1e-12


def _find_or_create_registered_model(client, name: str) -> None:
    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        tracking.with_retry(
            client.create_registered_model,
            name,
            tags={KIND_TAG: KIND},
            description="CNN image classifier (cnn-pipeline)",
        )
        return
    if rm.tags.get(KIND_TAG) != KIND:
        raise PipelineError(
            f"register.model_name '{name}': the MLflow registered model exists but holds another "
            f"kind of model (no {KIND_TAG}={KIND} tag); choose another register.model_name"
        )


def _run_model_uri(client, run_id: str, run_file: Path) -> str:
    """The URI of the run's logged pyfunc; PipelineError when the run or its model is missing."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise PipelineError(
            f"{run_file}: run {run_id} not found in the tracking store "
            f"{tracking.redacted(mlflow.get_tracking_uri())}; run the train stage first"
        ) from None
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'",
        output_format="list",
    )
    if not models:
        raise PipelineError(
            f"{run_file}: run {run_id} has no logged model '{MODEL_ARTIFACT}'; "
            "run the train stage first"
        )
    model = models[0]
    if not _has_kind(model.model_uri):
        raise PipelineError(
            f"{run_file}: the model of run {run_id} is not this pipeline's image classifier"
        )
    return model.model_uri


def _has_kind(model_uri: str) -> bool:
    from mlflow.models import get_model_info

    try:
        return (get_model_info(model_uri).metadata or {}).get(KIND_TAG) == KIND
    except (MlflowException, OSError):
        return False


def register(
    run_file: str | os.PathLike,
    evaluate_json: str | os.PathLike,
    register_params,
    reports_dir: str | os.PathLike,
    *,
    data_source: str = "unknown",
    root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Register the train run's model, set `challenger`, move `champion` if it wins.

    Args:
        run_file: models/run.json of the train stage (its run_id).
        evaluate_json: metrics/evaluate.json (the test metrics; `register_params.metric` decides).
        register_params: `params.register` (model_name, metric, mode, min_delta).
        reports_dir: where registry.json goes: {"decision": <this one>, "history": [every one]}.
        data_source: tagged on the version (params data.source).
        root: the project folder (dvc.lock, git, the default MLflow store); default the cwd.
    Returns:
        The decision: candidate version and metric, champion's, promoted or not, and why.
    Idempotent per run: a run already registered gets its existing version back, no duplicate.
    """
    from mlflow.tracking import MlflowClient

    root = Path(root or Path.cwd()).resolve()
    run_file, evaluate_json = Path(run_file), Path(evaluate_json)
    report = Path(reports_dir) / "registry.json"
    name, metric = register_params.model_name, register_params.metric
    mode, min_delta = register_params.mode, float(register_params.min_delta)

    run_id = tracking.read_run_file(run_file)["run_id"]
    metrics = _test_metrics(evaluate_json)
    if metric not in metrics:
        raise PipelineError(
            f"register.metric '{metric}': not in {evaluate_json} "
            f"(has {', '.join(sorted(metrics)) or 'no scalar metrics'})"
        )
    value = metrics[metric]
    history = _read_history(report)  # before any change: a broken report stops us early

    tracking.setup(root)
    client = MlflowClient()
    source_uri = _run_model_uri(client, run_id, run_file)
    _find_or_create_registered_model(client, name)

    existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if existing:
        version = min(existing, key=lambda v: int(v.version))
        created = False
    else:
        version = tracking.with_retry(mlflow.register_model, source_uri, name)
        created = True
    tags = {
        KIND_TAG: KIND,
        "run_id": run_id,
        "git_commit": tracking.git_commit(root),
        "data_source": data_source,
        **_lock_tags(root / "dvc.lock"),
        **{f"test_{k}": repr(v) for k, v in metrics.items()},
    }
    for key, tag_value in tags.items():
        tracking.with_retry(
            client.set_model_version_tag, name, version.version, key, str(tag_value)
        )
    tracking.with_retry(client.set_registered_model_alias, name, CHALLENGER, version.version)

    champion = _alias_version(client, name, CHAMPION)
    champion_value = None
    if champion is not None:
        raw = champion.tags.get(f"test_{metric}")
        champion_value = float(raw) if raw is not None else None
    if champion is None:
        promoted, why = True, "no champion yet"
    elif champion.version == version.version:
        promoted, why = False, f"version {version.version} is already the champion"
    elif champion_value is None or math.isnan(champion_value):
        promoted = True
        why = f"champion version {champion.version} has no test_{metric} tag"
    elif beats(value, champion_value, mode, min_delta):
        promoted = True
        why = (
            f"{metric} {value:.6g} beats the champion's {champion_value:.6g} "
            f"by at least min_delta {min_delta:g} ({mode})"
        )
    else:
        promoted = False
        why = (
            f"{metric} {value:.6g} does not beat the champion's {champion_value:.6g} "
            f"by min_delta {min_delta:g} ({mode})"
        )
    if promoted:
        tracking.with_retry(client.set_registered_model_alias, name, CHAMPION, version.version)

    decision = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_name": name,
        "run_id": run_id,
        "candidate_version": int(version.version),
        "new_version": created,
        "metric": metric,
        "mode": mode,
        "min_delta": min_delta,
        "candidate_value": value,
        "champion_version": int(champion.version) if champion is not None else None,
        "champion_value": champion_value,
        "promoted": promoted,
        "reason": why,
        "champion_after": int(version.version if promoted else champion.version),
    }
    write_json(report, {"decision": decision, "history": [*history, decision]})
    return decision


def _alias_version(client, name: str, alias: str):
    """The version carrying `alias`, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _read_history(report: Path) -> list[dict[str, Any]]:
    """Earlier decisions from the previous registry.json (kept by `persist: true` in dvc.yaml)."""
    if not report.exists():
        return []
    previous = read_json(report, "the register stage's decision history")
    history = previous.get("history") if isinstance(previous, dict) else None
    if not isinstance(history, list):
        raise PipelineError(
            f"{report}: no 'history' list in it; move the file aside to start a new history"
        )
    return history
