"""Fault injection from outside the training: find the Ray Train worker processes, and act on
them by signals, watching the run folder to know what was checkpointed.

Nothing here hooks into the code under test. A local Ray instance's processes descend from the
process that started it (the driver starts the raylet; the raylet forks the workers), and Ray
titles a Train worker's process `ray::RayTrainWorker` (its cmdline, which psutil reads), so
the workers of a stage are the descendants of that stage (or of the dvc that started it) whose
cmdline says RayTrainWorker.

  train_workers(pid)          the Ray Train worker pids below `pid`
  kill_worker(pid)            SIGKILL one of them: a dead worker, as a crashed node leaves it
  frozen(pid)                 SIGSTOP all of them (training stops where it is), and on leaving
                              SIGKILL them should they still be there: none outlives a test
  checkpoint_epochs(storage)  the epochs whose checkpoint_epoch_NNNN folders exist
  checkpointed_epoch(storage) the latest epoch Ray registered (checkpoint_manager_snapshot.json):
                              the one a re-run resumes after
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

WORKER_TITLE = "RayTrainWorker"  # in the cmdline Ray gives a Train worker's process
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's registry of a run's checkpoints
CHECKPOINT = re.compile(r"checkpoint_epoch_(\d{4})$")  # src.ray_driver.report_epoch's names


def train_workers(root_pid: int) -> list[int]:
    """The pids of the live Ray Train worker processes that descend from `root_pid`."""
    try:
        below = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    pids = []
    for p in below:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and WORKER_TITLE in " ".join(p.cmdline()):
                pids.append(p.pid)
    return sorted(pids)


def wait_workers(root_pid: int, n: int, timeout: float = 300.0) -> list[int]:
    """Wait until `n` Train workers run below `root_pid`; their pids."""
    deadline = time.monotonic() + timeout
    while len(pids := train_workers(root_pid)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{n} Ray Train workers never appeared below pid {root_pid}")
        time.sleep(0.05)
    return pids


def kill_worker(pid: int) -> None:
    """SIGKILL one worker process and wait until it is gone (or a zombie)."""
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).wait(timeout=30)


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextlib.contextmanager
def frozen(root_pid: int, n: int | None = None) -> Iterator[list[int]]:
    """SIGSTOP every Train worker below `root_pid` (at least `n` of them, when given): training
    stops mid-run until the block ends, then the workers are SIGKILLed if still alive (a stopped
    process cannot run the exit its raylet asks of it, and must not outlive the test)."""
    pids = wait_workers(root_pid, n) if n else train_workers(root_pid)
    assert pids, f"no Ray Train worker below pid {root_pid} to freeze"
    signal_all(pids, signal.SIGSTOP)
    try:
        yield pids
    finally:
        signal_all(pids, signal.SIGKILL)
        signal_all(pids, signal.SIGCONT)


def run_folders(storage: Path) -> list[Path]:
    """The stage's Ray run folders (train-<key>) in `storage`."""
    return sorted(p for p in Path(storage).glob("train-*") if p.is_dir())


def checkpoint_epochs(storage: Path) -> list[int]:
    """Epochs whose checkpoint folder exists in some run folder of `storage`, sorted."""
    return sorted(
        int(m.group(1))
        for run in run_folders(storage)
        for p in run.iterdir()
        if p.is_dir() and (m := CHECKPOINT.search(p.name))
    )


def checkpointed_epoch(storage: Path) -> int | None:
    """The latest epoch Ray registered as checkpointed in `storage` (what a re-run resumes
    after), or None when none is (or the snapshot is being rewritten)."""
    latest = None
    for run in run_folders(storage):
        try:
            snap = json.loads((run / SNAPSHOT).read_text())
        except (OSError, ValueError):
            continue
        result = snap.get("latest_checkpoint_result")
        if result:
            latest = max(latest or 0, int(result["metrics"]["epoch"]))
    return latest


def wait_until(
    predicate: Callable[[], bool],
    what: str,
    timeout: float = 600.0,
    alive: Callable[[], bool] = lambda: True,
    every: float = 0.05,
) -> None:
    """Poll `predicate` until true; fail if `alive()` turns false first, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if not alive():
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
