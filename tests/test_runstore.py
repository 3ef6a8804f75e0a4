"""The run store's lock: one train stage at a time per run, and no lock file left behind."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

from src.runstore import RunFolder

# Each process claims the run `rounds` times; while it holds it, it creates a marker file that
# must not exist (O_EXCL): a second holder at the same time would find it and report it.
CONTENDER = """
import os, sys, time
from src.runstore import RunFolder
storage, inside, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for _ in range(rounds):
    with RunFolder(storage, "train-abc").claim(wait=120):
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            print("two holders at once", flush=True)
            continue
        time.sleep(0.02)
        os.close(fd)
        os.unlink(inside)
print("done", flush=True)
"""


def test_claims_exclude_each_other_and_leave_no_lock_file(tmp_path):
    """The holder removes the lock file as it lets go; contenders that had opened the removed
    file notice it once they get the lock and lock the new one, so holds never overlap."""
    storage = tmp_path / "ray_results"
    inside = tmp_path / "inside"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, str(storage), str(inside), "15"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "two holders at once" not in out and out.splitlines()[-1] == "done", out
    assert list(storage.glob(".*.lock")) == []


def test_a_claim_leaves_no_lock_file(tmp_path):
    storage = tmp_path / "ray_results"
    with RunFolder(str(storage), "train-x").claim(wait=0):
        assert [p.name for p in storage.glob(".*.lock")] == [".train-x.lock"]
    assert list(storage.glob(".*.lock")) == []
