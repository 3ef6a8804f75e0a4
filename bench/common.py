"""What the benchmarks share: the machine and versions, noise from other processes, alternating
runs, scratch projects, and subprocesses timed line by line with their memory sampled."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"  # scratch projects and data (git-ignored)
RESULTS = REPO / "bench" / "results"  # one JSON per item: BENCHMARKS.md is built from them
FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"
PROJECT_FILES = ("dvc.yaml", "pyproject.toml", "src", "pipeline")
# the code whose speed the figures measure: a result records its last commit (code_version)
MEASURED_CODE = ("src", "pipeline", "dvc.yaml", "params.yaml")
VERSIONED = ("torch", "ray", "mlflow", "dvc", "albumentations", "numpy", "opencv-python-headless")


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, the SIMD extensions that matter to torch, and the GPU if any."""
    model, flags = platform.processor() or platform.machine(), set()
    family = number = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "cpu family":
                family = value
            elif key == "model":
                number = value
            elif key == "flags":
                flags = set(value.split())
    if family:  # a VM may show only "AMD EPYC": family 25 model 1 is Zen 3 (Milan)
        model = f"{model} (family {family}, model {number})"
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info = {
        "cpu": model,
        "cores": cpus(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "simd": simd,
        "os": platform.platform(),
        "gpu": None,
    }
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    """python and the libraries whose speed the figures depend on."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def code_version(paths: Sequence[str] = MEASURED_CODE) -> str:
    """The short hash of the last commit that changed `paths`, with "+dirty" when they hold
    uncommitted changes (the figures then measure code no commit has); "unknown" without git."""
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run(
            [*git, "log", "-1", "--format=%h", "--", *paths],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", *paths],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit or "unknown"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------
# Noise: CPU used by processes that are not ours


def _ours(root: int) -> set[int]:
    """This process and its descendants (Ray's raylet and workers, stage subprocesses)."""
    try:
        proc = psutil.Process(root)
        return {root, *(p.pid for p in proc.children(recursive=True))}
    except psutil.Error:
        return {root}


class _Sampler:
    """Calls `_sample()` on entering, every `interval` s in a thread, and on leaving."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.root = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_time = 0.0
        self.stop_time = 0.0

    def _sample(self, initial: bool = False) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self.start_time = time.time()
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.stop_time = time.time()


class Noise(_Sampler):
    """Samples, every `interval` s in a thread, the CPU seconds each process on the machine used;
    `foreign_share()` is the CPU used by processes that are not this one or its descendants, as
    a fraction of all cores over the window. A benchmark on a shared machine uses it to tell a
    quiet measurement from a disturbed one (then repeated). Granularity: a foreign process that
    lives less than one interval is missed."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(interval)
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._foreign: set[tuple[int, float]] = set()
        self._mine: set[tuple[int, float]] = set()

    def _sample(self, initial: bool = False) -> None:
        ours = _ours(self.root)
        for p in psutil.process_iter(["pid", "create_time", "cpu_times"]):
            try:
                key = (p.info["pid"], p.info["create_time"])
                t = p.info["cpu_times"]
                used = t.user + t.system
            except (psutil.Error, TypeError, AttributeError):
                continue
            if key not in self._first:
                # a process born during the window used all its CPU time inside it
                self._first[key] = used if initial or key[1] < self.start_time else 0.0
            self._last[key] = used
            if key[0] in ours:  # once ours, always: at shutdown Ray's processes are orphaned
                self._mine.add(key)  # (their parent gone) for a moment before they exit
                self._foreign.discard(key)
            elif key not in self._mine:
                self._foreign.add(key)

    def foreign_seconds(self) -> float:
        """CPU seconds used by other processes during the window."""
        return sum(max(self._last[k] - self._first[k], 0.0) for k in self._foreign)

    def foreign_share(self) -> float:
        """foreign_seconds over (window x cores): 0 = we had the machine to ourselves."""
        wall = max((self.stop_time or time.time()) - self.start_time, 1e-9)
        return self.foreign_seconds() / (wall * cpus())


_SCHEDSTAT = Path("/proc/self/schedstat").exists()  # the kernel keeps per-thread run-queue waits


def thread_stats(pid: int) -> dict[int, tuple[int, float, float]]:
    """{thread id: (involuntary context switches, seconds it was runnable but waited for a CPU,
    seconds it ran on a CPU)} of the threads of process `pid` (Linux; else empty; both times are
    0 without schedstat). psutil's num_ctx_switches counts the main thread only."""
    stats: dict[int, tuple[int, float, float]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            status = (task / "status").read_text().splitlines()
            switches = next(
                int(line.split()[1])
                for line in status
                if line.startswith("nonvoluntary_ctxt_switches:")
            )
            sched = (task / "schedstat").read_text() if _SCHEDSTAT else "0 0 0"
            ran, waited = (int(x) / 1e9 for x in sched.split()[:2])
        except (OSError, StopIteration, IndexError, ValueError):  # the thread ended
            continue
        stats[int(task.name)] = (switches, waited, ran)
    return stats


_Row = tuple[str, float, dict[int, tuple[int, float, float]]]


class CpuTimeline(_Sampler):
    """Samples, every `interval` s in a thread, the CPU seconds, involuntary context switches
    (preemptions) and run-queue waits of this process and its descendants (a local Ray
    instance: raylet, GCS, Ray's actors, the training workers), so that a benchmark can say who
    used the CPUs in a window it learns afterwards (e.g. between two checkpoints). Processes are
    named by their process name (`ray::TrainController`, ...); this process is `DRIVER`.

    Per-thread figures are read only for the processes whose name contains `threads_of` (all
    when None): reading every thread of a Ray instance (about a thousand) twice a second costs
    about 5% of 2 CPUs, more with more Ray actors, so it would tax the variant it measures."""

    DRIVER = "driver"

    def __init__(self, interval: float = 0.5, threads_of: str | None = None) -> None:
        super().__init__(interval)
        self.threads_of = threads_of
        # (time, {(pid, create time): (name, CPU s, {thread id: (preemptions, wait s, CPU s)})})
        self.samples: list[tuple[float, dict[tuple[int, float], _Row]]] = []
        self.machine: list[tuple[float, Any]] = []  # (time, psutil.cpu_times()): all processes

    def _sample(self, initial: bool = False) -> None:
        self.machine.append((time.time(), psutil.cpu_times()))
        seen: dict[tuple[int, float], _Row] = {}
        for pid in _ours(self.root):
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    t = p.cpu_times()
                    name = self.DRIVER if pid == self.root else p.name()
                    wanted = self.threads_of is None or self.threads_of in name
                    threads = thread_stats(pid) if wanted else {}
                    seen[(pid, p.create_time())] = (name, t.user + t.system, threads)
            except psutil.Error:
                continue
        self.samples.append((time.time(), seen))

    def used(
        self, start: float, stop: float
    ) -> tuple[float, dict[str, float], dict[str, float], dict[str, float]]:
        """(seconds between the samples nearest `start` and `stop`, then per process name, summed
        over its processes and their threads, in between: {CPU seconds}, {involuntary context
        switches}, {seconds runnable but waiting for a CPU}). A process or thread born in between
        counts from zero; a thread that ended in between counts up to the last sample that saw it
        (a training thread ends with its last epoch, before the sample nearest the last
        checkpoint)."""
        (t0, a), (t1, b) = self._nearest(start), self._nearest(stop)
        cpu: dict[str, float] = {}
        for key, (name, seconds, _) in b.items():
            c0 = a[key][1] if key in a else 0.0
            cpu[name] = cpu.get(name, 0.0) + max(seconds - c0, 0.0)
        switches: dict[str, float] = {}
        waits: dict[str, float] = {}
        for (name, _), (n, w, _) in self._thread_deltas(start, stop).items():
            switches[name] = switches.get(name, 0.0) + n
            waits[name] = waits.get(name, 0.0) + w
        return t1 - t0, cpu, switches, waits

    def idle(self, start: float, stop: float) -> dict[str, float]:
        """Shares of the machine's CPU time between the samples nearest `start` and `stop` that
        no process used: {"idle": idle or waiting for I/O, "steal": taken by the hypervisor
        (a virtual machine's CPUs running another guest; 0 where the kernel does not count it)}.
        A run that leaves CPUs idle while it has work waits on something (I/O, a remote call)."""
        (_, a), (_, b) = self._nearest(start, self.machine), self._nearest(stop, self.machine)
        guests = ("guest", "guest_nice")  # Linux counts these in user and nice already
        total = sum(b) - sum(a) - sum(getattr(b, g, 0.0) - getattr(a, g, 0.0) for g in guests)
        total = max(total, 1e-9)

        def delta(*fields: str) -> float:
            return sum(getattr(b, f, 0.0) - getattr(a, f, 0.0) for f in fields) / total

        return {"idle": delta("idle", "iowait"), "steal": delta("steal")}

    def thread_cpu(self, start: float, stop: float, name: str) -> list[float]:
        """CPU seconds each thread of the processes whose name contains `name` ran between the
        samples nearest `start` and `stop` (counted as in `used`), largest first."""
        deltas = self._thread_deltas(start, stop)
        return sorted((d[2] for (n, _), d in deltas.items() if name in n), reverse=True)

    def _nearest(self, when: float, series: list | None = None) -> Any:
        """The sample nearest `when` (of `series`: default the processes' samples)."""
        return min(self.samples if series is None else series, key=lambda s: abs(s[0] - when))

    def _thread_deltas(
        self, start: float, stop: float
    ) -> dict[tuple[str, tuple[tuple[int, float], int]], tuple[float, ...]]:
        """{(process name, ((pid, create time), thread id)): the thread's (switches, waits, CPU
        seconds) between the samples t0 and t1 nearest `start` and `stop`}."""
        (t0, a), t1 = self._nearest(start), self._nearest(stop)[0]
        last: dict[tuple[tuple[int, float], int], tuple[int, float, float]] = {}
        names: dict[tuple[int, float], str] = {}
        for when, seen in self.samples:
            if t0 < when <= t1:
                for key, (name, _, threads) in seen.items():
                    names[key] = name
                    last.update(((key, tid), stat) for tid, stat in threads.items())
        deltas = {}
        for (key, tid), stat in last.items():
            before = a[key][2].get(tid, (0, 0.0, 0.0)) if key in a else (0, 0.0, 0.0)
            deltas[(names[key], (key, tid))] = tuple(
                x - y for x, y in zip(stat, before, strict=True)
            )
        return deltas

    def count(self, when: float, name: str) -> int:
        """How many processes whose name contains `name` the sample nearest `when` saw."""
        _, seen = self._nearest(when)
        return sum(name in row[0] for row in seen.values())


def wait_quiet(limit: float = 0.1, patience: float = 120.0, probe: float = 3.0) -> float:
    """Wait (up to `patience` s) until other processes use less than `limit` of the CPUs over
    `probe` s; return the last share seen."""
    if limit >= 1.0:
        return 0.0
    deadline = time.time() + patience
    while True:
        with Noise() as n:
            time.sleep(probe)
        share = n.foreign_share()
        if share < limit or time.time() > deadline:
            return share
        time.sleep(2)


@dataclass
class Measurement:
    """One run of a variant: what it returned, how noisy the machine was, how often it ran."""

    variant: str
    result: dict[str, Any]
    foreign_share: float
    attempts: int
    load_before: list[float]
    load_after: list[float]


@dataclass
class Alternation:
    """Variants run A B C C B A A B C ... (`rounds` rounds, every other one reversed, so each
    variant runs as often before its neighbour as after it and a drift of this machine's speed
    favours neither), each repeated while the machine was busy."""

    variants: dict[str, Callable[[], dict[str, Any]]]
    rounds: int = 3
    noise_limit: float = 0.10  # share of the CPUs other processes may use during a measurement
    retries: int = 2  # extra attempts of a disturbed measurement
    patience: float = 120.0  # seconds to wait for a quiet machine before each attempt
    log: Callable[[str], None] = print
    runs: list[Measurement] = field(default_factory=list)

    def run(self) -> list[Measurement]:
        for r in range(self.rounds):
            turn = list(self.variants.items())
            for name, fn in turn if r % 2 == 0 else reversed(turn):
                for attempt in range(1, self.retries + 2):
                    wait_quiet(self.noise_limit, self.patience)
                    before = loadavg()
                    with Noise() as noise:
                        result = fn()
                    share = noise.foreign_share()
                    self.log(
                        f"  round {r + 1} {name}: {_short(result)} (others used "
                        f"{share:.0%} of the CPUs{', retrying' if share > self.noise_limit and attempt <= self.retries else ''})"
                    )
                    if share <= self.noise_limit or attempt > self.retries:
                        break
                self.runs.append(Measurement(name, result, share, attempt, before, loadavg()))
        return self.runs

    def values(self, variant: str, key: str) -> list[float]:
        return [m.result[key] for m in self.runs if m.variant == variant]


def _short(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in result.items()
        if isinstance(v, int | float)
    )[:160]


# ---------------------------------------------------------------------------------------------
# Scratch projects and timed subprocesses


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Wait until 127.0.0.1:`port` accepts a connection: True, or False once `proc` (the server
    meant to open it) has exited or `timeout` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def stop_tree(proc: subprocess.Popen, grace: float = 10) -> None:
    """Stop `proc` (started with start_new_session=True) and everything it started: SIGTERM to
    its whole process tree at once (`ray start --block` alone takes its time to stop what it
    started), SIGKILL to what is left after `grace` s, then to its process group."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def stage_env(**extra: str) -> dict[str, str]:
    """The environment stage subprocesses run with: this venv first on PATH, unbuffered output
    (lines are timestamped as they arrive), no update checks, no progress bars, local stores."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1", CNN_QUIET="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def make_project(
    dest: Path, params: dict[str, Any], *, dvc: bool = True, env: dict[str, str] | None = None
) -> Path:
    """A fresh copy of the project in `dest` (its own git + DVC repo, empty caches and stores)
    with `params` as its params.yaml: what a user has after `make install`. `dvc=False`: the
    files only; `env`: the environment git and dvc run with (default `stage_env()`)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy2(REPO / ".gitignore", dest / ".gitignore")
    if not dvc:
        return dest
    quiet = {"check": True, "env": env or stage_env(), "cwd": dest, "capture_output": True}
    subprocess.run(["git", "init", "-q"], **quiet)
    subprocess.run(["dvc", "init", "-q"], **quiet)
    subprocess.run(["dvc", "config", "core.analytics", "false"], **quiet)
    # DVCLive and DVC experiments need a commit to compare against
    subprocess.run(["git", "add", "-A"], **quiet)
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "p"],
        **quiet,
    )
    return dest


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


MIB = 2**20


@dataclass
class Timed:
    """A finished subprocess: its lines with arrival times (s since start), exit code, wall
    time, and memory samples of its process tree (`tree_memory` dicts with a time "t")."""

    cmd: list[str]
    returncode: int
    seconds: float
    lines: list[tuple[float, str]]
    memory: list[dict[str, Any]]

    def output(self, last: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-last:])

    def peak(self, start: float = 0.0, stop: float = float("inf")) -> dict[str, float]:
        """Peak of each memory figure (MiB) over the samples in [start, stop]."""
        rows = [m for m in self.memory if start <= m["t"] <= stop] or self.memory
        keys = [k for k in (rows[0] if rows else {}) if k != "t"]
        return {
            f"{k}_mib": max((m[k] for m in rows if m[k] is not None), default=0) / MIB for k in keys
        }


def tree_memory(pid: int, pss: bool = True, private: bool = False) -> dict[str, float | None]:
    """Memory of a process and its descendants, in bytes:
    rss     sum of resident sizes (pages shared by several processes count in each)
    pss     sum of proportional sizes (shared pages split between their processes: Ray's object
            store counts once); read from smaps, which costs milliseconds per process, so only
            when `pss` (else None)
    anon    sum of anonymous resident memory (what the processes allocated; not file pages such
            as memory-mapped outputs the kernel can drop, nor shared memory)
    largest_rss, root_anon, largest_child_anon  single processes
    largest_child_private  only when `private` (else None): the largest private anonymous
            memory of a descendant, what it allocated itself, without the pages a forked child
            shares with its parent (counted in its anon) nor file pages it mapped. Read from
            the descendants' full smaps, which also give their PSS."""
    keys = ("rss", "anon", "largest_rss", "root_anon", "largest_child_anon")
    out: dict[str, float | None] = dict.fromkeys(keys, 0)
    out["pss"] = 0 if pss or private else None
    out["largest_child_private"] = 0 if private else None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        child = p.pid != pid
        try:
            info = p.memory_info()  # /proc/pid/statm: cheap
            if private and child:
                maps = p.memory_maps(grouped=False)
                out["pss"] += sum(m.pss for m in maps)
                mine = sum(
                    m.private_clean + m.private_dirty
                    for m in maps
                    if not m.path or m.path.startswith(("[heap]", "[stack]", "[anon"))
                )
                out["largest_child_private"] = max(out["largest_child_private"], mine)
            elif pss or private:
                out["pss"] += getattr(p.memory_full_info(), "pss", info.rss)  # smaps_rollup
        except psutil.Error:
            continue
        anon = info.rss - info.shared
        out["rss"] += info.rss
        out["anon"] += anon
        out["largest_rss"] = max(out["largest_rss"], info.rss)
        if child:
            out["largest_child_anon"] = max(out["largest_child_anon"], anon)
        else:
            out["root_anon"] = anon
    return out


def run_timed(
    cmd: list[str],
    cwd: str | os.PathLike,
    env: dict[str, str] | None = None,
    sample: float = 0.5,
    pss_every: int = 10,
    private: bool = False,
    echo: Callable[[str], None] | None = None,
    timeout: float = 3600,
) -> Timed:
    """Run `cmd`, timestamping each output line (stdout and stderr merged) and sampling its
    process tree's memory every `sample` s (PSS, which is costly to read, every `pss_every`
    samples: None in the others; with `private`, the workers' own memory as well, see
    tree_memory)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env or stage_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1,
    )  # fmt: skip
    memory: list[dict[str, Any]] = []
    done = threading.Event()

    def sampler() -> None:
        n = 0
        while not done.wait(sample):
            read = n % pss_every == 0
            m = tree_memory(proc.pid, pss=read, private=private and read)
            memory.append({"t": time.perf_counter() - start, **m})
            n += 1

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if echo is not None:
                echo(line.rstrip("\n"))
            if time.perf_counter() - start > timeout:
                proc.kill()
        proc.wait()
    finally:
        done.set()
        thread.join()
        if proc.poll() is None:
            proc.kill()
    return Timed(cmd, proc.returncode, time.perf_counter() - start, lines, memory)


def check(timed: Timed, what: str) -> Timed:
    """Raise with the tail of the output when the command failed."""
    if timed.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {timed.returncode}):\n{timed.output()}")
    return timed


# ---------------------------------------------------------------------------------------------
# Results


def save_result(
    name: str, result: dict[str, Any], folder: Path = RESULTS, keep: bool = False
) -> Path:
    """bench/results/<name>.json, with the machine, versions and when it was measured; with
    `keep`, also bench/results/history/<name>/<when>.json, which the next runs leave alone (the
    report pools the runs kept: see load_history)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    now = time.gmtime()
    result = {
        "item": name,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", now),
        "machine": machine(),
        "versions": versions(),
        **result,
    }
    text = json.dumps(result, indent=2) + "\n"
    path.write_text(text)
    if keep:
        kept = folder / "history" / name / time.strftime("%Y-%m-%dT%H-%M-%SZ.json", now)
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(text)
    return path


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every saved item result, by item name."""
    if not folder.exists():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def load_history(folder: Path = RESULTS) -> dict[str, list[dict[str, Any]]]:
    """Every kept run (save_result's `keep`), oldest first, by item name."""
    kept = folder / "history"
    if not kept.exists():
        return {}
    return {
        d.name: [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
        for d in sorted(kept.iterdir())
        if d.is_dir()
    }


@contextlib.contextmanager
def chdir(path: str | os.PathLike) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ---------------------------------------------------------------------------------------------
# `dvc repro`, timed stage by stage

STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+)\s+train loss")


def stage_windows(timed: Timed) -> dict[str, tuple[float, float]]:
    """Each stage's (start, end) in a `dvc repro` run: from its "Running stage" line to the next
    one (the last stage ends with the command)."""
    starts = [(t, m.group(1)) for t, line in timed.lines if (m := STAGE_LINE.search(line))]
    windows = {}
    for i, (t, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else timed.seconds
        windows[name] = (t, end)
    return windows


def read_tsv(path: Path) -> list[float]:
    """The value column of a DVCLive .tsv (one row per step)."""
    rows = path.read_text().splitlines()[1:]
    return [float(r.split("\t")[-1]) for r in rows if r.strip()]


def training_time(timed: Timed, project: Path, plots: str = "plots") -> dict[str, float] | None:
    """Training wall time of the train stage, from its first batch to its last epoch's report:
    the arrival times of the per-epoch lines give epochs 2..E whole (training pass, validation,
    report, checkpoint); epoch 1 is its training pass (epoch_seconds.tsv) plus the median of the
    other epochs' time beyond their training pass."""
    ends = {int(m.group(1)): t for t, line in timed.lines if (m := EPOCH_LINE.search(line))}
    tsv = project / plots / "train" / "epoch_seconds.tsv"
    if not ends or not tsv.exists():
        return None
    passes = read_tsv(tsv)
    epochs = sorted(ends)
    times = [ends[e] for e in epochs]
    intervals = np.diff(times).tolist()
    extra = [iv - passes[e - 1] for iv, e in zip(intervals, epochs[1:], strict=True)]
    overhead = max(median(extra), 0.0) if extra else 0.0
    return {
        "epochs": len(epochs),
        "last_epoch_at": times[-1],  # seconds into the command
        "training_s": times[-1] - times[0] + passes[0] + overhead,
        "training_pass_s": sum(passes),
        "per_epoch_overhead_s": overhead,
    }


def measure_repro(
    project: Path, echo: Callable[[str], None] | None = None, **kw: Any
) -> dict[str, Any]:
    """`dvc repro` in `project`: total and per-stage wall time, per-stage peak memory of the
    process tree, and the train stage's training time."""
    timed = check(run_timed(["dvc", "repro"], cwd=project, echo=echo, **kw), "dvc repro")
    stages = {}
    for name, (start, end) in stage_windows(timed).items():
        stages[name] = {"seconds": end - start, **timed.peak(start, end)}
    params = load_yaml(project / "params.yaml")
    return {
        "seconds": timed.seconds,
        "stages": stages,
        "training": training_time(timed, project, params["paths"]["plots"]),
        "peak": timed.peak(),
        "tail": timed.output(15),
    }


def _matmul_loop(seconds: float) -> int:
    """Multiplications of a cache-resident 200x200 matrix done in `seconds` (1 BLAS thread)."""
    a = np.random.default_rng(0).random((200, 200))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    return n


def cpu_scaling(seconds: float = 3.0) -> dict[str, float]:
    """This machine's own ceiling for 2 processes: a pure compute loop (no memory traffic, no
    I/O) in 1 process, then in 2 at once; scaling = their total over the single one. A VM whose
    2 vCPUs share a physical core, or a busy host, shows well below 2 here."""
    import multiprocessing as mp

    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        one = _matmul_loop(seconds)
        with mp.get_context("fork").Pool(2) as pool:
            two = pool.map(_matmul_loop, [seconds, seconds])
    return {"one": one, "two": sum(two), "scaling": sum(two) / one}
