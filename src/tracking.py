"""MLflow in one place: where the store is, the run a stage logs to, and the run file.

Tracking URI: MLFLOW_TRACKING_URI when set, else a SQLite store at the project root
(`sqlite:///<root>/mlflow.db`, artifacts in `<root>/mlartifacts`). Never the file store.
Only this module and `src/registry.py` import mlflow.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Any

from src.errors import PipelineError
from src.files import read_json, write_json

DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"


def tracking_uri(root: str | os.PathLike | None = None) -> str:
    """The tracking URI every stage uses: $MLFLOW_TRACKING_URI or the project's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(root or Path.cwd()).resolve()
    return f"sqlite:///{root / DB_NAME}"


def redacted(uri: str) -> str:
    """The URI without a password or token, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=f"***@{host}")
    return urllib.parse.urlunsplit(parts)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when an HTTP tracking server does not answer.

    MLflow's own client retries for minutes before giving up on an unreachable server.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        reason = type(e).__name__
        raise PipelineError(
            f"MLFLOW_TRACKING_URI={redacted(uri)}: tracking server unreachable ({reason})"
        ) from None


def setup(root: str | os.PathLike | None = None) -> str:
    """Point mlflow at the project's store and return the tracking URI."""
    import mlflow

    uri = tracking_uri(root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def get_or_create_experiment(name: str, root: str | os.PathLike | None = None) -> str:
    """The id of experiment `name`; a new one keeps its artifacts in `<root>/mlartifacts`."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        location = (Path(root or Path.cwd()).resolve() / ARTIFACTS_NAME).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def write_run_file(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Record the run a stage logged to, for the stages after it (models/run.json)."""
    write_json(path, info)


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """The run recorded by the train stage: {run_id, experiment_id, experiment_name, run_name}."""
    info = read_json(path, "the MLflow run of the train stage")
    if not isinstance(info, dict) or "run_id" not in info:
        raise PipelineError(f"{path}: no run_id in it; run the train stage first")
    return info
