"""Checks of an existing Ray cluster (RAY_ADDRESS), each failing in one line naming the cause.

  check_address(address)          the address answers (TCP, 5 s)
  captured_stderr()               what Ray's core writes to fd 2 while connecting, to tell a
                                  refused token from other failures
  auth_failure(address, logged)   the one line for a cluster that refused this driver's token
  job_conflict_message(address)   the one line for a stage whose runtime env clashes with its job's
  check_storage(storage, where)   every alive node reaches run.storage_path and sees what the
                                  driver wrote there (one tiny task per node, pinned to it)

Decisions (and why):
* Token authentication (Ray >= 2.52): a driver without the cluster's token gets `InvalidAuthToken`
  from the GCS, which ray.init's core logs to fd 2 once a second for ~20 s before it reports a
  generic "failed to connect". No public API asks a cluster whether it wants a token, so the
  stage waits for ray.init as before, with fd 2 captured: when what Ray logged says the token
  was refused, the stage fails in one line saying so and how to give it (a driver sends its
  token only with RAY_AUTH_MODE=token: measured with Ray 2.60, a token file or RAY_AUTH_TOKEN
  alone still fails); otherwise what Ray logged is written back, unchanged.
* Storage: Ray copies checkpoints to `storage_path` from the nodes the workers run on and reads
  them back from wherever a replaced worker starts, so each node must see the same storage, not
  merely a path of the same name. The driver writes a marker with a random value; a task pinned
  to each alive node (NodeAffinitySchedulingStrategy, soft=False; 0 CPUs, so it runs beside
  anything) reads it back through pyarrow (what Ray uses) and writes one of its own, which the
  driver reads. A node's own disk at the same path fails the first half; a node without the S3
  settings fails to open the bucket.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from src.errors import PipelineError

AUTH_DOCS = "https://docs.ray.io/en/latest/ray-security/token-auth.html"
STORAGE_CHECK_TIMEOUT = 120.0  # s: a node starts a worker (and fetches the runtime env) first


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of RAY_ADDRESS (host:port or ray://host:port); one line when malformed."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"RAY_ADDRESS={address}: expected host:port or ray://host:port")
    return host, int(port)


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when the cluster at RAY_ADDRESS does not answer (ray.init would
    otherwise retry for a long time)."""
    if address in ("auto", "local"):
        return
    host, port = split_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise PipelineError(
            f"RAY_ADDRESS={address}: Ray cluster unreachable ({type(e).__name__})"
        ) from None


def ray_token() -> tuple[str | None, str]:
    """The token Ray would send, and where it comes from (never the token in messages)."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        token = path.read_text().strip()
    except OSError:
        return None, str(path)
    return token or None, str(path)


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Send this process's fd 2 to a temporary file for the block (Ray's core logs there from
    C++, past sys.stderr); yields a function that reads what was written. What was written is
    the caller's to show or to replace by one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)

        def read() -> str:
            sys.stderr.flush()
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield read
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


REFUSED = ("InvalidAuthToken", "Unauthenticated")  # what Ray's core logs for a refused token


def auth_failure(address: str, logged: str) -> str | None:
    """The one line for a connection that failed because the cluster refused this driver's
    token (by what Ray logged while connecting), or None when that was not the cause."""
    if not any(word in logged for word in REFUSED):
        return None
    token, source = ray_token()
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode != "token":  # a driver that connects sends its token only in token mode
        reason = f"RAY_AUTH_MODE is {mode or 'unset'} here"
    elif token is None:
        reason = f"no token here (RAY_AUTH_TOKEN unset, {source} absent)"
    else:
        reason = f"it refused the token from {source}"
    return auth_message(address, reason)


def auth_message(address: str, reason: str) -> str:
    """The one line for a cluster that wants a token it did not get."""
    return (
        f"RAY_ADDRESS={address}: the Ray cluster requires token authentication and {reason}: "
        "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` "
        f"on the head prints it), or put it in ~/.ray/auth_token ({AUTH_DOCS})"
    )


def job_conflict_message(address: str | None) -> str:
    """The one line for a stage that runs inside a Ray job whose runtime env already ships a
    working dir (ray job submit --working-dir ...), which the stage's own would clash with."""
    return (
        f"RAY_ADDRESS={address}: this stage runs inside a Ray job whose runtime env clashes with "
        "the one the stage ships (working_dir, env_vars): submit the pipeline as "
        "`ray job submit --working-dir . -- python -m pipeline.cluster_job` (README, Scale out), "
        "which runs it with RAY_OVERRIDE_JOB_RUNTIME_ENV=1"
    )


def _reach(storage: str, check: str, expected: str, node_id: str) -> str | None:
    """On one node: read the driver's marker under `storage`/`check`, write this node's.
    Returns None, or why not (one line)."""
    import pyarrow.fs

    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        folder = f"{base.rstrip('/')}/{check}"
        try:
            with fs.open_input_stream(f"{folder}/driver") as f:
                seen = f.read().decode()
        except FileNotFoundError:
            seen = None
        if seen != expected:
            return "it does not see the marker the driver wrote there: not the same storage"
        with fs.open_output_stream(f"{folder}/node-{node_id}") as f:
            f.write(expected.encode())
    except Exception as e:  # noqa: BLE001 (any failure is the answer, on one line)
        lines = [s for s in str(e).strip().splitlines() if s.strip()]
        return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    return None


def check_storage(storage: str, where: str, shown: str | None = None) -> None:
    """Fail in one line, before training, when an alive node of the connected cluster does not
    reach `storage` (run.storage_path as Ray uses it) or sees other storage there than the
    driver does.

    Args:
        storage: the storage URI or absolute path.
        where: how to name the cluster in messages.
        shown: `storage` as messages show it (credentials redacted); default `storage`.
    """
    import pyarrow.fs
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    shown = shown or storage
    check, token = f".storage-check-{secrets.token_hex(6)}", secrets.token_hex(16)
    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        folder = f"{base.rstrip('/')}/{check}"
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(f"{folder}/driver") as f:
            f.write(token.encode())
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"run.storage_path {shown}: the driver cannot write there "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None  # fmt: skip
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        reach = ray.remote(num_cpus=0, max_retries=0)(_reach)
        refs = {
            n["NodeID"]: reach.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(storage, check, token, n["NodeID"])
            for n in nodes
        }
        for node in nodes:
            node_id = node["NodeID"]
            name = f"node {node_id[:12]} ({node.get('NodeManagerAddress', '?')}) of {where}"
            try:
                why = ray.get(refs[node_id], timeout=STORAGE_CHECK_TIMEOUT)
            except Exception as e:  # noqa: BLE001 (the task could not run there)
                line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                why = f"the check could not run there ({line})"
            if why is None:
                try:
                    with fs.open_input_stream(f"{folder}/node-{node_id}") as f:
                        why = None if f.read().decode() == token else "its marker differs"
                except FileNotFoundError:
                    why = "what it wrote there does not reach the driver: not the same storage"
            if why:
                raise PipelineError(
                    f"run.storage_path {shown}: {name} does not reach it ({why}); on a cluster "
                    "it must be storage every node and the driver share (s3://, gs://, or NFS "
                    "mounted at the same path on each)"
                )
    finally:
        try:
            fs.delete_dir(folder)
        except Exception:  # noqa: BLE001, S110 (a leftover marker folder is harmless)
            pass
