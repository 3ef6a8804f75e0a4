"""The whole pipeline (`dvc repro`) as a Ray job, on the cluster it is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow-host:5000"}}' \\
        -- python -m pipeline.cluster_job [dvc repro options]

What it does, and why (each a pitfall of `ray job submit --working-dir . -- dvc repro`):
* Ray uploads the checkout without `.git` (and what .gitignore names) and unpacks it once per
  content hash, reusing that folder for every later job of the same checkout. So the pipeline
  runs in a fresh copy of it (a temporary folder on the head, a DVC repository without Git:
  `core.no_scm`), never in the unpacked folder: each submission really runs, and no job sees
  another's dvc.lock or outputs.
* The stages' own runtime env (the code and MLFLOW_TRACKING_URI for the workers) is merged over
  the job's with RAY_OVERRIDE_JOB_RUNTIME_ENV=1 (Ray's documented switch); without it Ray
  refuses to merge the two.
* The submitting shell's environment does not reach a job: MLFLOW_TRACKING_URI must come in the
  job's runtime env (env_vars, as above), and must be a tracking server; a local file would be a
  store inside the head's temporary folder that nobody reads. Both are one-line errors.
* Where the outputs go: the run (params, per-epoch and test metrics, plots, the model) is in the
  MLflow run and the model in the registry, checkpoints are under run.storage_path, and the
  job's dvc.lock is logged to the MLflow run (artifact `dvc/dvc.lock`). With a DVC remote in
  .dvc/config the outputs are also `dvc push`ed. The copy is removed at the end (--keep leaves
  it, and prints where).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from src.cli import run_stage
from src.errors import PipelineError

TRACKING_ENV = "MLFLOW_TRACKING_URI"
# Left behind by a pipeline run in place (or copied by an upload without .gitignore): never
# carried into the fresh copy.
LEFTOVERS = ("models", "metrics", "plots", "reports", "dvclive", "mlruns", "mlartifacts",
             "mlflow.db", "ray_results", "__pycache__", "tmp", "cache", "config.local")  # fmt: skip


def check_tracking(uri: str | None) -> str:
    """MLFLOW_TRACKING_URI as the job got it: a tracking server, else one line."""
    if not uri:
        raise PipelineError(
            f"{TRACKING_ENV} is not set in the job: the shell's environment does not reach a Ray "
            'job; pass it with --runtime-env-json \'{"env_vars": {"MLFLOW_TRACKING_URI": '
            '"http://host:5000"}}\''
        )
    if "://" not in uri or uri.startswith(("sqlite:", "file:")):
        raise PipelineError(
            f"{TRACKING_ENV}={uri}: a job needs a tracking server (http://host:port) that the "
            "nodes and you reach, not a file in the head's temporary folder"
        )
    return uri


def fresh_copy(src: Path) -> Path:
    """A new temporary copy of the unpacked checkout, without leftovers, as a DVC repo
    without Git (Ray uploads no .git)."""
    dest = Path(tempfile.mkdtemp(prefix="cnn-job-")) / "project"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*LEFTOVERS), symlinks=True)
    if not (dest / ".dvc").is_dir():
        raise PipelineError(f"{src}: not a DVC project (no .dvc/): submit with --working-dir .")
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "core.no_scm", "true"],
                   cwd=dest, check=True)  # fmt: skip
    return dest


def keep_outputs(project: Path, uri: str) -> None:
    """Log the job's dvc.lock to the MLflow run; dvc push where a remote is configured."""
    run_file, lock = project / "models" / "run.json", project / "dvc.lock"
    if run_file.exists() and lock.exists():
        from mlflow import MlflowClient

        run_id = json.loads(run_file.read_text())["run_id"]
        MlflowClient(tracking_uri=uri).log_artifact(run_id, str(lock), artifact_path="dvc")
        print(f"cluster_job: dvc.lock logged to MLflow run {run_id} (dvc/dvc.lock)", flush=True)
    remotes = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=project,
                             capture_output=True, text=True)  # fmt: skip
    if remotes.returncode == 0 and remotes.stdout.strip():
        subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=project, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description="Run `dvc repro` as a Ray job, in a fresh copy.")
    p.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    args, repro = p.parse_known_args()
    uri = check_tracking(os.environ.get(TRACKING_ENV))
    project = fresh_copy(Path.cwd())
    bin_dir = str(Path(sys.executable).parent)  # the stages' `python` is this one
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}  # fmt: skip
    print(f"cluster_job: dvc repro in {project}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *repro], cwd=project, env=env)

    def stop(signum: int, _frame: object) -> None:  # `ray job stop`: stop dvc, then exit
        proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    try:
        code = proc.wait()
        if code == 0:
            keep_outputs(project, uri)
    finally:
        if args.keep:
            print(f"cluster_job: the job's copy is kept in {project}", flush=True)
        else:
            shutil.rmtree(project.parent, ignore_errors=True)
    if code != 0:
        raise PipelineError(f"dvc repro failed (exit {code}); its output is above")


if __name__ == "__main__":
    run_stage(main)
