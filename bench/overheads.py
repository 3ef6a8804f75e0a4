"""Item 4: pipeline overheads.

  end-to-end   `dvc repro` in a fresh copy of the project with the repository's params.yaml
               (the default data): what `make run` does after `make install`
  no-op        `dvc repro` again with nothing changed (median of `rounds`)
  stage start  `python -m pipeline.<stage> --help`: interpreter + the stage's imports
  Ray start    in a fresh process: `import ray.train.torch`, then `src.ray_driver.ray_session()`
               entered (ray.init sized to this machine) and left (shutdown)
The per-fit cost of Ray Train (worker group start, set-up, shutdown) is item 1's fixed_s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Alternation,
    Noise,
    check,
    load_yaml,
    make_project,
    measure_repro,
    median,
    run_timed,
    stage_env,
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


def measure(
    out: Path,
    *,
    params: dict[str, Any] | None = None,
    rounds: int = 3,
    stages: tuple[str, ...] = STAGES,
    noise_limit: float = 0.10,
    log: Any = print,
) -> dict[str, Any]:
    """End-to-end `dvc repro` once, then the no-op repro, stage and Ray start-up `rounds` times.

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
    ray = {k: median(alt.values("ray start-up", k)) for k in ("import_s", "init_s", "shutdown_s")}
    return {
        "end_to_end": {**e2e, "foreign_share": noise.foreign_share()},
        "noop_repro_s": median(alt.values("no-op dvc repro", "seconds")),
        "stage_startup_s": {s: median(alt.values(f"{s} start-up", "seconds")) for s in stages},
        "ray_startup": ray,
        "rounds": rounds,
    }
