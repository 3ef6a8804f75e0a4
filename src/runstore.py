"""The run store: where a training's Ray run lives, under what name, held by whom, kept how long.

A run's name is a hash of everything that decides its numbers (model and train params, seed,
data), so re-running after an interruption finds its checkpoints under `run.storage_path` and
resumes; the small JSON files beside them say which MLflow run it logs into and whether the
stage finished (then a re-run, `dvc repro -f`, starts anew). Local, NFS and s3:// storage alike,
through pyarrow's file systems (what Ray Train itself uses).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.config import Params
from src.errors import PipelineError
from src.files import shared_root
from src.supervise import STOP_WAIT

MLFLOW_RUN_FILE = "mlflow_run.json"  # in the Ray run folder: the MLflow run a resume reuses
DONE_FILE = "stage_done.json"  # in the Ray run folder: the stage finished; a re-run starts anew


class RunFolder:
    """Small JSON files in the Ray run's folder `storage/name` (local, NFS or s3:// alike)."""

    def __init__(self, storage: str, name: str) -> None:
        import pyarrow.fs

        self.storage, self.name = storage, name
        self.fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        self.path = f"{base.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def claim(self, wait: float | None = None) -> Iterator[None]:
        """Hold the run for this stage: an exclusive lock on `storage/.name.lock` (local or NFS
        storage; an object store has no locks, and then nothing is held). A second stage of
        the same run waits up to `wait` s (default: as long as an interrupted stage may take to
        stop) and then fails in one line: a queued twin experiment, or a `dvc repro` started
        while an interrupted stage still cleans up (at Ctrl-C, /bin/sh as dash dies at once
        and dvc returns before its stage has stopped)."""
        import pyarrow.fs

        try:
            import fcntl
        except ImportError:  # not POSIX
            fcntl = None
        if fcntl is None or not isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            yield
            return
        wait = STOP_WAIT + 15.0 if wait is None else wait
        lock = Path(self.path).parent / f".{self.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        deadline, told = time.monotonic() + wait, False
        while True:
            f = open(lock, "a+")  # noqa: SIM115 (closed below; not inherited by child processes)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
            else:
                if _same_file(f, lock):
                    break
                f.close()  # the holder removed the file as it let go: lock the new one
                continue
            if time.monotonic() > deadline:
                raise PipelineError(
                    f"run.storage_path: run {self.name} is in use by another train stage "
                    f"(pid {holder}, lock {lock}); wait for it to end or stop it"
                )
            if not told:
                print(f"waiting for the train stage (pid {holder}) that holds run "
                      f"{self.name} to end", flush=True)  # fmt: skip
                told = True
            time.sleep(0.2)
        with f:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                # removed while held, so none is left behind: a stage that opened the old file
                # meanwhile finds it gone once it gets the lock (_same_file) and tries again
                lock.unlink(missing_ok=True)
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self, filename: str) -> dict[str, Any] | None:
        """The JSON in `filename`, or None when absent or unreadable."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{filename}") as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            return None

    def write(self, filename: str, obj: dict[str, Any]) -> None:
        """Write `obj` as JSON to `filename` (the folder is created)."""
        self.fs.create_dir(self.path, recursive=True)
        tmp = f"{self.path}/.{filename}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, indent=2).encode())
        self.fs.move(tmp, f"{self.path}/{filename}")

    def delete(self) -> None:
        """Remove the whole run folder (its checkpoints too)."""
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self.path)


def _same_file(f: Any, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path` (not removed or replaced)."""
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def storage_uri(storage_path: str, root: Path) -> str:
    """run.storage_path as Ray needs it: URIs as they are, local paths absolute (Ray changes
    the workers' working directory; relative ones under the DVC repository's root, so queued
    experiments share one checkpoint store)."""
    if "://" in storage_path:
        return storage_path
    return str((shared_root(root) / storage_path).resolve())


def run_uri(storage: str, name: str) -> str:
    """Where run `name` lives in `storage`, as one URI: the name goes into the path, before a
    query Ray and pyarrow read as file-system options (s3://b/p?endpoint_override=host:port
    becomes s3://b/p/name?endpoint_override=host:port, not s3://b/p?...=host:port/name)."""
    base, sep, query = storage.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def data_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of the training split and meta.json: the data part of the run's identity."""
    h = hashlib.sha256()
    for name in ("meta.json", "train_images.npy", "train_labels.npy"):
        path = Path(folder) / name
        h.update(name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def run_key(params: Params, data_hash: str) -> str:
    """A short hash of everything that decides the numbers: the model and train sections, the
    seed and the data (not the run section: it changes no number). Same key = same run to
    resume."""
    blob = json.dumps(
        {"model": params.model.model_dump(mode="json"),
         "train": params.train.model_dump(mode="json"),
         "seed": params.base.seed, "data": data_hash},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prune_runs(storage: str, keep: int, current: str) -> list[str]:
    """run.keep_runs: delete the run folders in `storage` of finished runs (those with a
    DONE_FILE) beyond the `keep` most recently finished, `current` always counted among them.

    Runs that did not finish (resumable) and runs a train stage holds are never touched; a
    finished run's model lives on in its models/model.pt and its MLflow run. Returns the names
    of the folders deleted, oldest first.
    """
    import pyarrow.fs

    fs, base = pyarrow.fs.FileSystem.from_uri(storage)
    base = base.rstrip("/")
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        runs = [e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory]
        done = fs.get_file_info([f"{base}/{n}/{DONE_FILE}" for n in runs])
    except OSError as e:
        print(f"run.keep_runs: could not list {storage} ({e}); nothing removed", flush=True)
        return []
    finished = sorted(
        (info.mtime, name)
        for name, info in zip(runs, done, strict=True)
        if name.startswith("train-") and name != current and info.type == pyarrow.fs.FileType.File
    )
    removed = []
    for _, name in finished[: max(len(finished) - (keep - 1), 0)]:
        folder = RunFolder(storage, name)
        try:
            with folder.claim(wait=0):  # held by a stage (re-training it): leave it to that one
                folder.delete()
        except PipelineError:
            continue
        removed.append(name)
    return removed
