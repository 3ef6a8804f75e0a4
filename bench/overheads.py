"""Item 4: pipeline overheads.

  end-to-end   `dvc repro` in a fresh copy of the project with the repository's params.yaml
               (the default data): what `make run` does after `make install`
  no-op        `dvc repro` again with nothing changed (median of `rounds`)
  stage start  `python -m pipeline.<stage> --help`: interpreter + the stage's imports
  Ray start    in a fresh process: `import ray.train.torch`, then `src.ray_driver.ray_session()`
               entered (ray.init sized to this machine) and left (shutdown)
  train fixed  the train stage alone (`dvc repro -f -s train`), split into its seconds before
               the first batch (Python, imports, Ray, the worker group, MLflow's run) and after
               the last epoch's report (outputs, logging the model, shutdown): with its own Ray
               instance (what each experiment pays by default), and with the README's sweep
               recipe, one `ray start --head` instance shared through RAY_ADDRESS
The per-fit cost of Ray Train (worker group start, set-up, shutdown) is item 1's fixed_s.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Alternation,
    Noise,
    check,
    free_port,
    load_yaml,
    make_project,
    measure_repro,
    median,
    run_timed,
    stage_env,
    stage_windows,
    stop_tree,
    training_time,
    wait_port,
    wait_quiet,
)  # fmt: skip

STAGES = tuple(load_yaml(REPO / "dvc.yaml")["stages"])  # each timed for its start-up
RAY_PROBE = """
import json, time
t0 = time.perf_counter()
import ray.train.torch  # noqa: F401
t1 = time.perf_counter()
from src.ray_driver import ray_session
with ray_session():
    t2 = time.perf_counter()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "init_s": t2 - t1, "shutdown_s": t3 - t2}))
"""


def timed_cmd(cmd: list[str], cwd: Path) -> dict[str, Any]:
    """Wall time of one command (it must succeed)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return {"seconds": seconds, "stdout": proc.stdout}


def ray_startup() -> dict[str, Any]:
    """One fresh process: import, init and shutdown times of Ray as the stage starts it."""
    out = timed_cmd([sys.executable, "-c", RAY_PROBE], REPO)
    import json

    return {**json.loads(out["stdout"].strip().splitlines()[-1]), "process_s": out["seconds"]}


@contextlib.contextmanager
def shared_ray(cpus: int) -> Iterator[dict[str, str]]:
    """One `ray start --head` instance as the README's sweep recipe starts it (token auth on), in
    its own process group and temp dir, stopped with its process tree (`stop_tree`) and its temp
    dir removed; yields the environment a stage needs to use it (RAY_ADDRESS, RAY_AUTH_MODE,
    RAY_AUTH_TOKEN)."""
    port = free_port()
    env = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    # Ray's socket paths under --temp-dir must fit in 107 bytes: a short folder in /tmp
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           f"--port={port}", "--include-dashboard=false", f"--num-cpus={cpus}",
           f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=stage_env(**env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        if not wait_port(port, proc):
            raise RuntimeError(f"{' '.join(cmd)} did not start (exit {proc.poll()})")
        yield env
    finally:
        stop_tree(proc)
        shutil.rmtree(temp, ignore_errors=True)


FIXED_KEYS = ("seconds", "training_s", "before_s", "after_s", "fixed_s")


def train_fixed(project: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The train stage alone (`dvc repro -f -s train`) in `project`: its seconds, the training
    time (`training_time`), and the fixed seconds before the first batch and after the last
    epoch's report. `env`: extra environment (a shared Ray instance)."""
    timed = check(
        run_timed(["dvc", "repro", "-f", "-s", "train"], cwd=project, env=stage_env(**(env or {}))),
        "dvc repro -f -s train",
    )
    start, end = stage_windows(timed)["train"]
    trained = training_time(timed, project)
    if trained is None:
        raise RuntimeError(f"no epoch lines in the train stage's output:\n{timed.output(15)}")
    last = trained["last_epoch_at"]
    before, after = last - trained["training_s"] - start, end - last
    return {"seconds": end - start, "training_s": trained["training_s"],
            "before_s": before, "after_s": after, "fixed_s": before + after}  # fmt: skip


def fixed_seconds(
    project: Path, params: dict[str, Any], rounds: int, noise_limit: float, log: Any
) -> dict[str, dict[str, float]]:
    """`train_fixed` alternated `rounds` times with the stage's own Ray instance and with a
    shared `ray start --head` (`shared_ray`): the medians of each."""
    train = params["train"]
    with shared_ray(int(train["num_workers"]) * int(train["cpus_per_worker"])) as ray_env:
        alt = Alternation(
            {"own": lambda: train_fixed(project), "shared": lambda: train_fixed(project, ray_env)},
            rounds=rounds, noise_limit=noise_limit, log=log,
        )  # fmt: skip
        alt.run()
    return {v: {k: median(alt.values(v, k)) for k in FIXED_KEYS} for v in ("own", "shared")}


def measure(
    out: Path,
    *,
    params: dict[str, Any] | None = None,
    rounds: int = 3,
    stages: tuple[str, ...] = STAGES,
    train_rounds: int = 3,
    noise_limit: float = 0.10,
    log: Any = print,
) -> dict[str, Any]:
    """End-to-end `dvc repro` once, then the no-op repro, stage and Ray start-up `rounds` times,
    then the train stage alone `train_rounds` times with its own and with a shared Ray instance
    (0: not measured; the project's outputs are then left as the first repro wrote them).

    Args:
        out: scratch folder for the project copy.
        params: params.yaml content for the copy (default: the repository's).
        stages: the stage scripts whose start-up is timed.
    """
    params = params or load_yaml(REPO / "params.yaml")
    wait_quiet(noise_limit)
    project = make_project(out / "default", params)
    with Noise() as noise:
        e2e = measure_repro(project)
    log(f"  end-to-end dvc repro: {e2e['seconds']:.1f} s (others used {noise.foreign_share():.0%})")
    variants = {
        "no-op dvc repro": lambda: {
            "seconds": check(run_timed(["dvc", "repro"], cwd=project), "dvc repro").seconds
        },
        **{
            f"{stage} start-up": (
                lambda s=stage: {
                    "seconds": timed_cmd(
                        [sys.executable, "-m", f"pipeline.{s}", "--help"], project
                    )["seconds"]
                }
            )
            for stage in stages
        },
        "ray start-up": ray_startup,
    }
    alt = Alternation(variants, rounds=rounds, noise_limit=noise_limit, log=log)
    alt.run()
    # after the no-op rounds: a forced train stage leaves evaluate and register to rerun
    fixed = fixed_seconds(project, params, train_rounds, noise_limit, log) if train_rounds else None
    ray = {k: median(alt.values("ray start-up", k)) for k in ("import_s", "init_s", "shutdown_s")}
    return {
        "end_to_end": {**e2e, "foreign_share": noise.foreign_share()},
        "noop_repro_s": median(alt.values("no-op dvc repro", "seconds")),
        "stage_startup_s": {s: median(alt.values(f"{s} start-up", "seconds")) for s in stages},
        "ray_startup": ray,
        "train_fixed": fixed,
        "rounds": rounds,
    }
