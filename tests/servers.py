"""Servers the tests run as users run them, each on 127.0.0.1 in its own process group, stopped
by its group id (never by name): `mlflow server`, `mlflow models serve`, moto's S3 server and a
`ray start` cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from bench.common import free_port, stop_tree, wait_port


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout: float = 180) -> Iterator[str]:
    """`mlflow server` (SQLite backend, served artifacts, one worker, no job runner) on
    127.0.0.1; yields its URL. FINDINGS.md: ~6 s and ~0.5 GB so configured."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with http_process(cmd, folder, env, f"http://127.0.0.1:{port}", "/health", timeout) as url:
        yield url


@contextlib.contextmanager
def model_server(mlflow_exe: Path, env: dict, folder: Path, uri: str) -> Iterator[str]:
    """`mlflow models serve -m URI` on 127.0.0.1 with the given `mlflow` executable and
    environment (its MLFLOW_TRACKING_URI names the registry), in its own process group; yields
    its base URL. cwd is `folder`, outside the repo: the model imports src from its own copy."""
    port = free_port()
    cmd = [
        str(mlflow_exe), "models", "serve", "-m", uri,
        "--env-manager", "local",  # no virtualenv build: the environment given is the one
        "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    with http_process(cmd, folder, env, f"http://127.0.0.1:{port}", "/ping") as url:
        yield url


@contextlib.contextmanager
def http_process(
    cmd: list[str], cwd: Path, env: dict, url: str, probe: str, timeout: float = 180
) -> Iterator[str]:
    """Run the HTTP server `cmd` in its own process group (output to cwd/server.log) until
    GET url+probe answers 200; yield `url`; then end the whole group (SIGTERM, then SIGKILL):
    uvicorn and gunicorn workers outlive a signal to the CLI process alone."""
    log = cwd / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    what = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:3]))
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited {proc.returncode}:\n"
                                     f"{log.read_text()[-3000:]}")  # fmt: skip
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}{probe}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """An S3-compatible server (moto's server mode, in a thread of this process) on 127.0.0.1;
    yields the settings pyarrow's S3 file system (Ray's storage_path) and boto3 read from the
    environment: AWS_ENDPOINT_URL, fake credentials and a region."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


class RayNodes:
    """A Ray cluster started with the `ray` CLI: each node a `ray start --block` process (its own
    process group and --temp-dir), stopped by its pid, never by `ray stop`."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        import tempfile

        self.folder, self.env = folder, env
        # Ray's socket paths under --temp-dir must fit in 107 bytes: pytest's tmp_path is too long
        self.temp_root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.address = f"127.0.0.1:{self.port}"  # the GCS: RAY_ADDRESS for a stage
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"  # ray job submit --address

    def _ports(self) -> list[str]:
        return [
            "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            "--object-store-memory=200000000",
        ]  # fmt: skip

    def start(self, name: str, cpus: int, *, head: bool = False, env: dict | None = None) -> None:
        """Start node `name` with `cpus` CPUs (the head first), its temp dir folder/name."""
        ray = str(Path(sys.executable).parent / "ray")
        temp = self.temp_dir(name)
        if head:
            where = [
                "--head", f"--port={self.port}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={self.client_port}",
            ]  # fmt: skip
        else:
            where = [f"--address={self.address}"]
        cmd = [ray, "start", "--block", *where, f"--temp-dir={temp}", f"--num-cpus={cpus}",
               *self._ports()]  # fmt: skip
        with open(self.folder / f"{name}.log", "w") as out:
            self.procs[name] = subprocess.Popen(
                cmd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        """Wait until `n` nodes are alive (Ray's state API, GET /api/v0/nodes on the dashboard,
        with the cluster's token); their records."""
        headers = {}
        if self.env.get("RAY_AUTH_TOKEN"):
            headers["Authorization"] = f"Bearer {self.env['RAY_AUTH_TOKEN']}"
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"ray node {name} exited {proc.returncode}:\n"
                                         f"{self.log(name)}")  # fmt: skip
            with contextlib.suppress(requests.RequestException, ValueError):
                got = requests.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 100},
                                   headers=headers, timeout=5)  # fmt: skip
                alive = [x for x in _records(got.json()) if x.get("state") == "ALIVE"]
                if len(alive) >= n:
                    return alive
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} ray nodes not alive:\n{self.log('head')}")
            time.sleep(0.5)

    def temp_dir(self, name: str) -> Path:
        """Node `name`'s --temp-dir."""
        return self.temp_root / name

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()[-3000:]

    def stop(self, name: str) -> None:
        """Stop node `name` by its pid: its `ray start --block` and whatever of its process tree
        or group is left (bench.common.stop_tree)."""
        stop_tree(self.procs.pop(name))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop_all(self) -> None:
        for name in [n for n in self.procs if n != "head"] + ["head"]:
            if name in self.procs:
                self.stop(name)
        import shutil

        shutil.rmtree(self.temp_root, ignore_errors=True)


def _records(obj) -> list[dict]:
    """The node records (dicts with a node_id) anywhere in a state API answer."""
    if isinstance(obj, dict):
        return [obj] if "node_id" in obj else [r for v in obj.values() for r in _records(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _records(v)]
    return []


@contextlib.contextmanager
def ray_cluster(folder: Path, env: dict[str, str], cpus: tuple[int, ...] = (1, 1)):
    """A head and len(cpus) - 1 worker nodes started with `ray start` (CPUs each as given), each
    with its own temp dir (logs under `folder`); yields the RayNodes; stops them all by pid."""
    folder.mkdir(parents=True, exist_ok=True)
    nodes = RayNodes(folder, env)
    try:
        nodes.start("head", cpus[0], head=True)
        for i, c in enumerate(cpus[1:], 1):
            if not wait_port(nodes.port, nodes.procs["head"]):  # a worker can join the GCS
                raise AssertionError(f"ray head did not start:\n{nodes.log('head')}")
            nodes.start(f"worker{i}", c)
        nodes.wait_nodes(len(cpus))
        yield nodes
    finally:
        nodes.stop_all()
