"""The Ray Train driver: the per-worker function, the cluster session and `fit`.

Only this module imports Ray, and only its public API (`ray.init`, `ray.train.report`,
`Checkpoint.from_directory`, `get_checkpoint`, `TorchTrainer`, `ScalingConfig`, `RunConfig`,
`CheckpointConfig`, `FailureConfig`). The epoch loop itself is `src.loop`.

  train_loop_per_worker(config)  run_epochs inside a TorchTrainer worker; a checkpoint per epoch
  ray_session()                  connect to RAY_ADDRESS, or start a local instance on loopback
  check_resources(...)           fail fast when the workers cannot be placed; use GPUs or not
  fit(...)                       TorchTrainer.fit; a finished, failed or stopped fit told apart
  run_ray(params, processed, d)  fit from scratch, no MLflow/outputs: the benchmark's Ray path

Decisions (and why):
* Data path: the driver puts the uint8 training arrays in Ray's object store once (ray.put); each
  worker ray.get()s them (one shared-memory copy per node, zero-copy reads) and gathers its own
  rows per batch in memory. It needs no shared file system (the object store moves the arrays
  between nodes) and the epoch order is a seeded permutation, so runs are bit-identical. Ray Data
  was measured at 0.79-0.87x the plain loop on 2 cores (per-epoch streaming cost; FINDINGS.md),
  and a lazily read dataset can hang fit() when workers hold every CPU. Limit: the training
  split must fit in each node's object store (Fashion-MNIST with one augmented copy: 94 MB).
* Checkpoints: rank 0 saves its state in a temporary folder and reports it with
  `Checkpoint.from_directory`; Ray copies it to `storage_path` (local, NFS or s3://) and keeps
  the best `run.keep_checkpoints` by validation accuracy. `get_checkpoint()` hands a replaced
  worker group, or a re-run of the stage, the latest one to resume from.
* Gradients: DDP over torch.distributed's own backend (gloo on CPU, NCCL on GPUs), with its
  documented options only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src import cluster as cluster_checks
from src import tracking
from src.config import Params, RunParams, TrainParams
from src.errors import PipelineError
from src.loop import (
    Comm,
    Diverged,
    LoopSpec,
    format_epoch,
    load_state,
    loop_spec,
    make_loop,
    run_epochs,
)

CODE_ROOT = Path(__file__).resolve().parents[1]  # the checkout this code runs from
STATE_FILE = "state.pt"  # inside each Ray checkpoint
TRACKING_ENV = "MLFLOW_TRACKING_URI"  # how the workers find the store: env, never the config
# Never shipped to a remote cluster: environments, data, stores and outputs.
RUNTIME_EXCLUDES = [
    ".venv/", ".git/", ".dvc/cache/", ".dvc/tmp/", "data/", "models/", "metrics/", "plots/",
    "reports/", "mlflow.db", "mlartifacts/", "mlruns/", "ray_results/", "bench/out/",
    "__pycache__/", ".pytest_cache/", ".ruff_cache/", "dvc.lock",
]  # fmt: skip


class TrainingStopped(KeyboardInterrupt):
    """fit() ended before every epoch was reported: the run was stopped (Ctrl-C, SIGTERM), not
    finished. A KeyboardInterrupt, so the stage exits as interrupted and writes no outputs."""


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, str] | None:
    """Ray Train's per-worker function: run_epochs under DDP, a report + checkpoint per epoch.

    config: {"spec": asdict(LoopSpec), "data": [images_ref, labels_ref] (object store),
    "tracking": {"run_id"} or None}. Rank 0 prints one line per epoch, logs the epoch to
    MLflow (step=epoch, never twice) and saves the checkpoint; every rank reports the epoch.
    Returns {"diverged": message} when the loss became NaN or infinite (every rank stops at
    that epoch, unreported: it is no checkpoint to resume from), else None.
    """
    import ray
    import ray.train
    import ray.train.torch

    spec = LoopSpec(**config["spec"])
    torch.set_num_threads(spec.train["cpus_per_worker"])  # Ray sets OMP_NUM_THREADS=1
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    images, labels = ray.get(config["data"])
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder) / STATE_FILE)
    history = state["history"] if state is not None else []
    comm = Comm(rank, world, device)
    wrap = functools.partial(ray.train.torch.prepare_model, parallel_strategy_kwargs=ddp_options())
    loop = make_loop(spec, images, labels, comm, device, state=state, wrap=wrap)
    if rank == 0:
        sums = "" if loop.allreduce == "none" else f", all-reduce: {loop.allreduce}"
        say(f"{world} worker(s) on {device.type}, precision {loop.precision}{sums}")
    # The store's URI may carry credentials: it comes from the workers' environment (inherited
    # from the driver locally, the runtime env's env_vars on a cluster), never from the config,
    # which Ray keeps in its object store. Without it, the driver logs every epoch after fit.
    uri = os.environ.get(TRACKING_ENV)
    track = config.get("tracking") if uri else None
    if rank == 0 and track and history:  # epochs a previous attempt checkpointed, maybe unlogged
        tracking.log_epochs(uri, track["run_id"], history)

    def on_epoch(entry: dict[str, Any], loop: Any, history: list[dict[str, Any]]) -> None:
        if rank == 0:
            say(format_epoch(entry, spec.train["epochs"]))
            if track:
                tracking.log_epochs(uri, track["run_id"], history)
        report_epoch(entry, loop.state(history) if rank == 0 else None)

    try:
        run_epochs(loop, comm, history, on_epoch=on_epoch)
    except Diverged as e:  # not a worker failure: a retry would only diverge again
        return {"diverged": str(e)}
    return None


def say(line: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the driver's console once.
    (Ray Train copies what print() writes in a worker into its own logger as well, so the
    console would show each print() twice; a write to sys.stdout it leaves alone.)"""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def report_epoch(entry: dict[str, Any], state: dict[str, Any] | None) -> None:
    """ray.train.report of one epoch on every rank (it is a barrier), with rank 0's `state` (None
    on the other ranks) as the checkpoint `checkpoint_epoch_NNNN`, as Ray documents it: saved
    in a temporary folder that Ray copies to the run's storage."""
    import ray.train

    name = f"checkpoint_epoch_{entry['epoch']:04d}"  # the same on every rank, and after a retry
    if state is None:
        ray.train.report(dict(entry), checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(dict(entry), checkpoint=checkpoint, checkpoint_dir_name=name)


def ddp_options() -> dict[str, Any]:
    """The workers' DistributedDataParallel options. DDP's per-step broadcast of rank 0's
    BatchNorm buffers is one more collective each step for nothing: only rank 0's buffers are
    ever used (validated and saved); run_epochs copies them to every rank once per epoch
    instead. Gradients are views into DDP's buckets (no copy)."""
    return {**no_buffer_sync(), "gradient_as_bucket_view": True}


def no_buffer_sync() -> dict[str, bool]:
    """DDP's option to skip the per-step buffer broadcast: `forward_sync_buffers` from torch
    2.13 (`broadcast_buffers` is deprecated there), `broadcast_buffers` before it."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------


def machine_resources() -> dict[str, float]:
    """CPUs this process may use and visible GPUs: what a local Ray instance gets."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(
    train: TrainParams, resources: dict[str, float], where: str, node_cpus: float | None = None
) -> bool:
    """Fail fast (one line) when the workers cannot all be placed; return whether to use GPUs.

    Args:
        train: the train params (num_workers, cpus_per_worker, use_gpu, precision).
        resources: total CPU and GPU of the machine or cluster.
        where: how to name it in a message ("this machine", "the Ray cluster at ...").
        node_cpus: the most CPUs on one node, if known (a worker cannot span nodes).
    Returns:
        use_gpu: True for use_gpu=true, or auto with at least one GPU per worker.
    """
    n, c = train.num_workers, train.cpus_per_worker
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if train.use_gpu is True and gpus < n:
        raise PipelineError(
            f"train.use_gpu: true needs {n} GPUs (one per worker, train.num_workers) "
            f"but {where} has {gpus:g}"
        )
    use_gpu = train.use_gpu is True or (train.use_gpu == "auto" and gpus >= n)
    if n * c > cpus:
        raise PipelineError(
            f"train.num_workers {n} x train.cpus_per_worker {c} needs {n * c} CPUs "
            f"but {where} has {cpus:g}"
        )
    if node_cpus is not None and c > node_cpus:
        raise PipelineError(
            f"train.cpus_per_worker {c} is more than any node of {where} has ({node_cpus:g})"
        )
    if train.precision == "fp16" and not use_gpu:
        raise PipelineError("train.precision: fp16 autocast needs a GPU; use bf16 or fp32 on CPU")
    return use_gpu


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the cluster at RAY_ADDRESS does not answer
    (src.cluster.check_address)."""
    cluster_checks.check_address(address, timeout)


@dataclass
class Cluster:
    """The Ray instance a stage uses: its resources, how to name it in messages, and whether it
    is local (started here or in this process, not a cluster at RAY_ADDRESS)."""

    resources: dict[str, float]
    node_cpus: float | None
    where: str
    local: bool


def ray_address() -> str | None:
    """The Ray cluster the stage runs on ($RAY_ADDRESS), or None for a local instance."""
    return os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_session() -> Iterator[Cluster]:
    """Connect to $RAY_ADDRESS (shipping this checkout's code as the workers' working dir) or
    start a local Ray sized to this machine (no dashboard); shut down (or disconnect) at the end.

    A local instance's workers import this checkout's `src`: Ray puts the driver's working
    directory (the stage's: the repository, or the experiment's copy) first on their sys.path.
    When Ray is already initialised in this process (a benchmark alternating runs), use that
    instance as it is and leave it running.
    """
    import logging

    import ray

    address = ray_address()
    kwargs: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
    }
    owned = not ray.is_initialized()
    if not owned:
        where = "the Ray instance of this process"
    elif address:
        check_ray_address(address)
        where = f"the Ray cluster at RAY_ADDRESS={address}"
        kwargs["runtime_env"] = {"working_dir": str(CODE_ROOT), "excludes": RUNTIME_EXCLUDES}
        if os.environ.get(TRACKING_ENV):  # a secret, passed as Ray passes secrets to workers
            kwargs["runtime_env"]["env_vars"] = {TRACKING_ENV: os.environ[TRACKING_ENV]}
    else:
        where = "this machine"
        res = machine_resources()
        kwargs.update(num_cpus=int(res["CPU"]), num_gpus=int(res["GPU"]), include_dashboard=False)
    try:
        if owned and address:
            with cluster_checks.captured_stderr() as logged:
                try:
                    ray.init(address=address, **kwargs)
                except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
                    if line := cluster_checks.auth_failure(address, logged()):
                        raise PipelineError(line) from None
                    raise e from None
                finally:
                    text = logged()
            if text:
                sys.stderr.write(text)  # not a refused token: what Ray said, as it said it
        elif owned:
            ray.init(**kwargs)
    except ray.exceptions.AuthenticationError:  # token auth on, and no token at all here
        raise PipelineError(
            cluster_checks.auth_message(str(address), "no token was found here")
        ) from None
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Failed to merge the Job's runtime env" in str(e):  # inside `ray job submit`
            raise PipelineError(cluster_checks.job_conflict_message(address)) from None
        raise PipelineError(f"RAY_ADDRESS={address}: cannot connect to Ray ({first})") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
        yield Cluster(dict(ray.cluster_resources()), node_cpus, where, local=not address)
    finally:
        if owned:
            ray.shutdown()


def _worker_error(e: BaseException) -> str:
    """One line for a failed fit: the first worker's error message, else the error's own."""
    failures = getattr(e, "worker_failures", None) or {}
    for failure in failures.values():
        cause = getattr(failure, "cause", None) or failure
        lines = [s for s in str(cause).strip().splitlines() if s.strip()]
        if lines:
            return lines[-1].strip()
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def fit(
    spec: LoopSpec,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    storage: str,
    use_gpu: bool,
    train: TrainParams,
    run: RunParams,
    track: dict[str, str] | None = None,
) -> Any:
    """Run TorchTrainer.fit on the connected Ray instance; resume run `name` if it has checkpoints.

    Args:
        spec, images, labels: what the workers train on (arrays go through the object store).
        name, storage: the Ray run (folder `storage/name`): same name and storage = resume.
        use_gpu: one GPU per worker.
        train: scaling (num_workers, cpus_per_worker).
        run: checkpoint and failure settings (keep_checkpoints, max_failures).
        track: {"run_id"} of the MLflow run rank 0 logs epochs to (in the store the workers'
            MLFLOW_TRACKING_URI names), or None.
    Returns:
        Ray's Result of a finished run: every epoch reported (checkpoints kept: the best
        run.keep_checkpoints by val_accuracy, and the latest).
    Raises:
        PipelineError with the worker's error when training fails past run.max_failures;
        Diverged when the loss became NaN or infinite (at once: no retry);
        TrainingStopped when fit() ends before the last epoch (Ctrl-C: Ray aborts the run).
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": asdict(spec),
            "data": [ray.put(images), ray.put(labels)],
            "tracking": track,
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=run.keep_checkpoints,
                checkpoint_score_attribute="val_accuracy",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=run.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        raise PipelineError(
            f"train: training failed (run.max_failures={run.max_failures}): {_worker_error(e)}"
        ) from None
    except Exception:
        raise
    except BaseException as e:  # not an error: fit() was stopped (Ctrl-C or SIGTERM)
        raise TrainingStopped(f"training stopped before it finished ({type(e).__name__})") from None
    finally:
        if main:  # fit() may leave its own Ctrl-C handler installed, bound to a finished run
            signal.signal(signal.SIGINT, sigint)
    if result.error is not None:
        raise PipelineError(f"train: training failed: {_worker_error(result.error)}")
    returned = getattr(result, "return_value", None) or {}  # rank 0's return (Ray >= 2.49)
    if "diverged" in returned:
        raise Diverged(returned["diverged"])
    done = int((result.metrics or {}).get("epoch", 0))
    if done < spec.train["epochs"]:
        raise TrainingStopped(f"training stopped after epoch {done} of {spec.train['epochs']}")
    return result


def best_checkpoint(result: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(state of the best kept checkpoint by val_accuracy, ties to the later epoch; the full
    history from the latest checkpoint)."""
    kept = result.best_checkpoints or []
    if not kept or result.checkpoint is None:
        raise PipelineError("train: the Ray run reported no checkpoint")
    ckpt, _ = max(kept, key=lambda cm: (cm[1]["val_accuracy"], cm[1]["epoch"]))
    with ckpt.as_directory() as folder:
        best = load_state(Path(folder) / STATE_FILE)
    with result.checkpoint.as_directory() as folder:
        history = load_state(Path(folder) / STATE_FILE)["history"]
    return best, history


def run_ray(params: Params, processed: Any, storage: str | os.PathLike) -> list[dict[str, Any]]:
    """The Ray path of the stage without MLflow or outputs: TorchTrainer.fit on the processed
    data, from scratch, returning the per-epoch history (the benchmark's counterpart of
    run_local). Uses an already initialised Ray, else starts (and stops) one like the stage.

    Args:
        params: validated params (train.num_workers etc. as for the stage).
        processed: `src.preprocess.load_processed(...)` output.
        storage: a folder for the run's checkpoints (a fresh run folder is made in it).
    """
    spec = loop_spec(params, processed.meta)
    name = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns()}"
    with ray_session() as cluster:
        use_gpu = check_resources(params.train, cluster.resources, cluster.where, cluster.node_cpus)
        result = fit(
            spec, np.asarray(processed.train_images), np.asarray(processed.train_labels),
            name=name, storage=str(Path(storage).resolve()), use_gpu=use_gpu, train=params.train,
            run=params.run,
        )  # fmt: skip
    return best_checkpoint(result)[1]
