"""MLflow in one place: where the store is, the run a stage logs to, and the run file.

Tracking URI: MLFLOW_TRACKING_URI when set, else a SQLite store at the project root
(`sqlite:///<root>/mlflow.db`, artifacts in `<root>/mlartifacts`). Never the file store.
Only this module and `src/registry.py` import mlflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from src.errors import PipelineError
from src.files import read_json, shared_root, write_json

DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
T = TypeVar("T")


def tracking_uri(root: str | os.PathLike | None = None) -> str:
    """The tracking URI every stage uses: $MLFLOW_TRACKING_URI or the project's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{shared_root(root) / DB_NAME}"


def redacted(uri: str) -> str:
    """The URI without a user, password or token (userinfo, and credential-looking query
    values such as ?token=), for messages and logs; anything else is left as it is written.

    Edits the string in place rather than re-joining urlsplit's parts, which would turn
    'sqlite:////abs/mlflow.db' into 'sqlite://abs/mlflow.db'.
    """
    parts = urllib.parse.urlsplit(uri)
    out = uri
    if "@" in parts.netloc:
        out = out.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1], 1)
    if parts.query:
        pairs = parts.query.split("&")
        safe = [
            f"{p.split('=', 1)[0]}=***"
            if "=" in p and _SECRET_KEY.search(p.split("=", 1)[0])
            else p
            for p in pairs
        ]
        out = out.replace("?" + parts.query, "?" + "&".join(safe), 1)
    return out


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

    uri = absolute_uri(tracking_uri(root))
    where = (  # before mlflow.set_tracking_uri, which sets MLFLOW_TRACKING_URI itself
        f"MLFLOW_TRACKING_URI={redacted(uri)}"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else f"tracking store {redacted(uri)}"
    )
    check_reachable(uri)
    # MLflow announces a new SQLite store's tables at INFO on stderr: noise in front of a
    # stage's one-line error, and in every first run
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    _check_store(uri, where)
    return uri


def _check_store(uri: str, where: str) -> None:
    """One cheap query, so that a store MLflow cannot use (the disabled file store, a file that
    is not a database, a server refusing the credentials) is one line naming the URI, before
    any work, instead of a traceback from deep inside a stage."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with_retry(MlflowClient(uri).search_experiments, max_results=1)
    except (MlflowException, SQLAlchemyError, OSError) as e:
        text = getattr(e, "message", None) or str(e) or type(e).__name__
        first = text.strip().splitlines()[0].split(". ")[0][:200]  # its first sentence
        raise PipelineError(f"{where}: cannot use the tracking store ({first})") from None


def get_or_create_experiment(name: str, root: str | os.PathLike | None = None) -> str:
    """The id of experiment `name`; a new one keeps its artifacts in `<root>/mlartifacts`."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        location = (shared_root(root) / ARTIFACTS_NAME).as_uri()
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


def metric_key(name: str) -> str:
    """`name` made acceptable as an MLflow metric key (letters, digits, _ - . / and spaces)."""
    import re

    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def log_to_run(
    run_id: str,
    metrics: dict[str, float],
    artifacts: dict[str, list[str | os.PathLike]] | None = None,
) -> None:
    """Log metrics and files into an existing run (finished or not) without reopening it.

    Args:
        run_id: the run (e.g. from models/run.json); PipelineError if the store lacks it.
        metrics: name -> value; names are passed through `metric_key`.
        artifacts: artifact folder in the run -> local files to copy there.
    """
    import time

    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException:
        raise PipelineError(
            f"run {run_id} not found in the tracking store "
            f"{redacted(mlflow.get_tracking_uri())}; run the train stage first"
        ) from None
    now = int(time.time() * 1000)
    batch = [Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items()]
    for start in range(0, len(batch), 1000):  # the store's batch limit
        with_retry(client.log_batch, run_id, metrics=batch[start : start + 1000])
    for folder, files in (artifacts or {}).items():
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path=folder or None)


# ---------------------------------------------------------------------------------------------
# Runs: create or reopen, params, per-epoch metrics, tags. Used by the train driver and rank 0.
# ---------------------------------------------------------------------------------------------

# A key or value that looks like a credential is never logged (issue: secrets never in params/tags).
_SECRET_KEY = re.compile(
    r"(passw(or)?d|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth)",
    re.IGNORECASE,
)
_SECRET_VALUE = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)

# ~0.1 s doubling to ~13 s in all: longer than any single SQLite write holds the lock.
LOCK_RETRIES = 8


def absolute_uri(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute (Ray workers run in another folder)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def with_retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn; retry with exponential backoff while SQLite answers "database is locked".

    SQLite allows one writer at a time: two stages or experiments logging at once make the
    loser fail immediately unless it waits. Other errors propagate at once.
    """
    delay = 0.1
    for attempt in range(LOCK_RETRIES + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if "database is locked" not in str(e) or attempt == LOCK_RETRIES:
                raise
            time.sleep(delay * (1 + random.random()))
            delay *= 2
    raise AssertionError("unreachable")


def is_secret(key: str, value: Any = None) -> bool:
    """Whether a param/tag looks like a credential (by its name or a URL with a password)."""
    return bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1])) or (
        isinstance(value, str) and bool(_SECRET_VALUE.match(value))
    )


def git_commit(root: str | os.PathLike) -> str:
    """HEAD's commit in `root` (with '-dirty' when tracked files changed), or 'unknown'."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lock_out_md5(root: str | os.PathLike, stage: str, path: str) -> str | None:
    """The md5 dvc.lock records for output `path` of `stage` (the data hash), or None."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    for out in (stages.get(stage) or {}).get("outs", []):
        if str(out.get("path", "")).rstrip("/") == path.rstrip("/"):
            return out.get("md5")
    return None


def open_run(
    experiment_id: str, run_name: str, tags: dict[str, str], run_id: str | None = None
) -> tuple[str, bool]:
    """Reopen run `run_id` when it still exists in the store, else create a new run.

    Args:
        experiment_id: where a new run goes.
        run_name: the new run's name.
        tags: set on the run either way (credential-looking ones are dropped).
        run_id: a run this stage started earlier and is resuming, or None.
    Returns:
        (run_id, resumed): resumed is True when `run_id` was reopened.
    """
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient()
    resumed = False
    if run_id:
        try:
            run = client.get_run(run_id)
            resumed = run.info.lifecycle_stage == "active"
        except Exception:  # deleted, or another store: start a new run
            resumed = False
    if resumed:
        with_retry(client.update_run, run_id, status="RUNNING")
    else:
        run = with_retry(client.create_run, experiment_id, run_name=run_name)
        run_id = run.info.run_id
    safe = [RunTag(k, str(v)) for k, v in tags.items() if not is_secret(k, v)]
    with_retry(client.log_batch, run_id, tags=safe)
    return run_id, resumed


def log_params(run_id: str, flat: dict[str, Any]) -> None:
    """Log `section.key` params not yet on the run (a resumed run keeps its first values).

    Lists and dicts are logged as JSON; credential-looking keys and values are skipped.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient()
    have = client.get_run(run_id).data.params
    todo = []
    for key, value in flat.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in have or is_secret(key, text):
            continue
        todo.append(Param(key, text[:6000]))  # MLflow's param value limit
    for i in range(0, len(todo), 100):  # log_batch takes at most 100 params per call
        with_retry(client.log_batch, run_id, params=todo[i : i + 100])


def log_epochs(
    uri: str, run_id: str, history: list[dict[str, Any]], step_key: str = "epoch"
) -> list[int]:
    """Log each history entry's numbers with step=entry[step_key], skipping steps already logged.

    Idempotent, so rank 0 can call it after every epoch and the driver once more at the end:
    a worker restarted after a failure, or a resumed run, never logs a step twice.
    Returns the steps logged by this call.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    if not history:
        return []
    sentinel = next(k for k in history[0] if k != step_key)
    done = {m.step for m in with_retry(client.get_metric_history, run_id, sentinel)}
    now = int(time.time() * 1000)
    new = []
    for entry in history:
        step = int(entry[step_key])
        if step in done:
            continue
        # One log_batch per step: one transaction in the SQL store, so a step is all there or not.
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in entry.items()
            if k != step_key and isinstance(v, (int, float))
        ]
        with_retry(client.log_batch, run_id, metrics=metrics)
        new.append(step)
    return new


def end_run(run_id: str, status: str) -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    with_retry(MlflowClient().set_terminated, run_id, status)


@contextlib.contextmanager
def active_run(run_id: str) -> Iterator[None]:
    """Make `run_id` mlflow's active run (for log_model); FINISHED on success, FAILED otherwise."""
    import mlflow

    with_retry(mlflow.start_run, run_id=run_id)
    try:
        yield
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def set_tag(run_id: str, key: str, value: str, uri: str | None = None) -> None:
    """Set one tag on a run (with the SQLite lock retry), in the store at `uri` (default: the
    process's tracking URI)."""
    from mlflow import MlflowClient

    with_retry(MlflowClient(tracking_uri=uri).set_tag, run_id, key, value)
