"""Smoke versions of the benchmarks (bench/): each runs on tiny sizes so the code cannot rot.
Nothing here asserts on time; the figures are `make bench`'s (BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, TINY, tiny_raw

from bench import common, fashion, gpu, memory, overheads, preprocess_speed, ray_overhead, report
from src.config import load_params, parse_params
from src.data import load_source
from src.preprocess import load_processed, run

RESULTS: dict[str, dict] = {}  # what the smoke runs return, rendered by the last test


@pytest.fixture(scope="module")
def plain_data(tmp_path_factory: pytest.TempPathFactory):
    """The digits at 8x8, no augmented copies (what item 1 and 6 train on, shrunk)."""
    raw = tiny_raw()
    raw["preprocess"]["augment_copies"] = 0
    raw["paths"]["processed"] = str(tmp_path_factory.mktemp("bench") / "processed")
    run(parse_params(raw), quiet=True)
    return raw, load_processed(raw["paths"]["processed"])


def saved(name: str, result: dict) -> dict:
    """Keep `result` for the report test, as bench.run would save it."""
    RESULTS[name] = {
        "item": name,
        "measured_at": "now",
        "machine": common.machine(),
        "versions": common.versions(),
        "load_start": common.loadavg(),
        "load_end": common.loadavg(),
        **json.loads(json.dumps(result)),
    }
    return result


def test_noise_sees_other_processes_and_alternation_orders_runs():
    import subprocess
    import sys

    with common.Noise(interval=0.1) as noise:
        # a child is ours; the busy loop below it is too (descendant): no foreign time
        subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)
    assert noise.foreign_seconds() >= 0.0
    assert 0.0 <= noise.foreign_share() <= 1.0
    order: list[str] = []
    alt = common.Alternation(
        {
            "a": lambda: order.append("a") or {"x": 1.0},
            "b": lambda: order.append("b") or {"x": 2.0},
        },
        rounds=2,
        noise_limit=1.0,
        log=lambda m: None,
    )
    alt.run()
    assert order == ["a", "b", "b", "a"]  # every other round reversed
    assert alt.values("b", "x") == [2.0, 2.0]


def test_cpu_timeline_counts_preemptions_and_cpu_per_thread():
    """A thread that ends between two samples keeps the switches and waits seen before it ended
    (the training thread ends with the last epoch), and cannot cancel the other threads'."""
    timeline = common.CpuTimeline()
    worker = (7, 1.0)
    timeline.samples = [
        (0.0, {worker: ("ray::RayTrainWorker", 1.0, {70: (100, 1.0, 0.5), 71: (5, 0.0, 0.0), 72: (900, 2.0, 0.5)})}),
        (5.0, {worker: ("ray::RayTrainWorker", 5.0, {70: (250, 1.5, 4.0), 71: (10, 0.0, 0.1), 72: (1500, 2.5, 3.0)})}),
        (10.0, {worker: ("ray::RayTrainWorker", 9.0, {70: (400, 2.0, 8.5), 71: (15, 0.1, 0.2), 73: (20, 0.2, 0.3)})}),
    ]  # fmt: skip
    wall, cpu, switches, waits = timeline.used(0.0, 10.0)
    assert wall == 10.0
    assert cpu == {"ray::RayTrainWorker": 8.0}
    # 70 and 71 as counted; 72 up to its last sample; 73 born in between, from zero
    assert switches == {"ray::RayTrainWorker": 300 + 10 + 600 + 20}
    assert waits["ray::RayTrainWorker"] == pytest.approx(1.0 + 0.1 + 0.5 + 0.2)
    assert timeline.used(0.0, 5.0)[2] == {"ray::RayTrainWorker": 150 + 5 + 600}
    # CPU seconds per thread, counted the same way, largest first
    assert timeline.thread_cpu(0.0, 10.0, "RayTrainWorker") == pytest.approx([8.0, 2.5, 0.3, 0.2])
    assert timeline.thread_cpu(0.0, 10.0, "driver") == []
    assert set(common.thread_stats(os.getpid())) >= {threading.get_native_id()}


def test_busy_fraction_merges_overlapping_device_intervals():
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 100},
            {"ph": "X", "cat": "kernel", "ts": 10, "dur": 20},
            {"ph": "X", "cat": "kernel", "ts": 20, "dur": 20},  # overlaps: 10..40
            {"ph": "X", "cat": "gpu_memcpy", "ts": 60, "dur": 10},
        ]
    }
    assert gpu.busy_fraction(trace)["busy_fraction"] == pytest.approx(0.4)
    assert gpu.busy_fraction({"traceEvents": trace["traceEvents"][:1]}) is None


def test_gpu_path_runs_on_cpu_and_is_skipped_without_cuda(plain_data):
    """Every figure of item 6 comes out of one call (on a CPU: no busy fraction, no peak), the
    2 ranks share one device, see disjoint batches and end a DDP step with the same weights."""
    import torch

    raw, data = plain_data
    small = ray_overhead.subset(data, 300)
    out = gpu.measure(raw, small, batch_sizes=(32,), epochs=2, steps=3, device="cpu", log=print)
    assert [r["precision"] for r in out["results"]] == ["fp32", "bf16"]
    assert all(r["busy_fraction"] is None and r["images_per_sec"] > 0 for r in out["results"])
    tta = out["time_to_accuracy"]
    assert len(tta["curve"]) <= TINY["train"]["epochs"] and 0 <= tta["accuracy"] <= 1
    assert (tta["seconds"] is not None) == tta["reached"]
    ranks = out["two_ranks"]
    assert ranks["ok"] and ranks["devices"] == ["cpu", "cpu"] and ranks["disjoint_batches"]
    if not torch.cuda.is_available():
        skipped = saved("gpu", gpu.measure(raw, data))
        assert skipped["available"] is False


def test_gpu_reads_idx_files_with_numpy_alone(tmp_path: Path):
    """bench/gpu.py's own IDX reader (the GPU machine has no PIL): header dims, then bytes."""
    import gzip

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(gpu.read_idx(path), images)


def test_bench_uses_no_framework_internals():
    """bench/ imports no private module of Ray, torch or anything else, nor the tuning removed
    from src/ (its shared-memory all-reduce, its worker environment)."""
    import ast

    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                assert not any(p.startswith("_") and p != "__future__" for p in parts), (path, name)
                assert name.split(".")[:2] not in (["src", "allreduce"], ["src", "train"]), name
        text = path.read_text()
        for flag in ("WORKER_ENV", "THP_MEM_ALLOC_ENABLE", "RAY_TRAIN_", "mallopt"):
            assert flag not in text, (path, flag)


@pytest.mark.slow
def test_ray_overhead_smoke(plain_data, tmp_path):
    raw, data = plain_data
    result = ray_overhead.measure(
        raw,
        ray_overhead.subset(data, 600),
        tmp_path,
        epochs=2,
        rounds=1,
        variants=("plain", "ray2", "plain2"),
        noise_limit=1.0,
        lockstep_steps=12,
    )
    saved("ray_overhead", result)
    lockstep = result["lockstep"]
    assert lockstep["steps"] == 12 and lockstep["step_s"] > 0 and lockstep["lockstep"] >= 0
    assert set(result["summary"]) == {"plain", "ray2", "plain2"}
    assert set(result["ratios"]) >= {"ray2/plain2 epoch_ips", "plain2/plain epoch_ips"}
    assert result["allreduce"]["seconds"] > 0  # gloo, alone
    plain2 = next(r for r in result["runs"] if r["variant"] == "plain2")
    assert plain2["val_accuracy"] > 0 and plain2["ray_init_s"] > 0
    assert all(r["epoch_ips"] > 0 and r["loop_ips"] > 0 for r in result["runs"])


def test_preprocess_speed_smoke(tmp_path):
    cases = {"28x28 gray, pad+augment": (28, 28, 1)}
    result = preprocess_speed.measure(
        tiny_raw(), tmp_path, images=300, rounds=1, cases=cases, noise_limit=1.0
    )
    saved("preprocess", result)
    case = result["cases"]["28x28 gray, pad+augment"]
    assert case["1 process images/s"] > 0 and case["2 processes images/s"] > 0


def test_memory_bound_smoke(tmp_path):
    raw = tiny_raw()
    ds = memory.head(load_source(load_params(REPO / "params.yaml").data, seed=0), 400)
    result = saved("memory", memory.measure(ds, raw, tmp_path, factors=(1, 2)))
    assert result["bound_images_per_worker"] == raw["preprocess"]["chunk_size"] * 3
    assert result["factors"]["2"]["images"] == 2 * result["factors"]["1"]["images"]


@pytest.mark.slow
def test_overheads_and_fashion_smoke(reproduced):
    """Item 4 on the tiny pipeline (end-to-end dvc repro, no-op, start-ups; the run that the
    pipeline tests go on with); item 2's summary of the same run (the Fashion-MNIST benchmark
    runs `dvc repro` the same way)."""
    project, result = reproduced
    saved("overheads", result)
    e2e = result["end_to_end"]
    assert set(e2e["stages"]) == set(overheads.STAGES)  # every stage of dvc.yaml ran, timed
    assert (
        e2e["training"]["epochs"] == TINY["train"]["epochs"] and e2e["training"]["training_s"] > 0
    )
    assert e2e["stages"]["train"]["pss_mib"] > 0
    assert result["noop_repro_s"] > 0 and result["ray_startup"]["init_s"] > 0
    run_summary = fashion.summarize(e2e, project)
    assert 0 <= run_summary["test_accuracy"] <= 1
    saved(
        "fashion",
        {
            "runs": [{**run_summary, "foreign_share": 0.0}],
            "summary": {
                "runs": 1,
                "test_accuracy_median": run_summary["test_accuracy"],
                "training_s_median": run_summary["training_s"],
            },
            "memory": {s: run_summary["stages"][s] for s in ("preprocess", "train", "evaluate")},
        },
    )


def test_fashion_config_is_params_yaml_with_documented_changes():
    """configs/fashion-mnist.yaml is a full params.yaml (`cp` it over params.yaml): the same
    sections and keys, valid, pointing at Fashion-MNIST."""
    params = yaml.safe_load(fashion.CONFIG.read_text())
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert {s: set(v) for s, v in params.items()} == {s: set(v) for s, v in base.items()}
    assert params["data"]["source"] == "idx" and "fashion-mnist" in params["data"]["path"]
    parsed = load_params(fashion.CONFIG)
    assert parsed.train.num_workers * parsed.train.cpus_per_worker <= 2  # fits this machine
    assert fashion.preprocess_bound(params)["images_per_worker"] > 0


def test_report_renders_every_item(tmp_path: Path):
    """BENCHMARKS.md from whatever the smoke runs above produced (missing items say so)."""
    text = report.write(RESULTS, tmp_path / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks")
    for n in range(1, 7):
        assert f"## {n}." in text
    assert report.NO_GPU in text or "GPU busy" in text


def test_benchmarks_md_is_generated_from_the_saved_results():
    """The committed BENCHMARKS.md is what the report makes of bench/results (rebuild it with
    `python -m bench.run --report-only`), and stays short."""
    text = report.render(common.load_results(), common.load_history())
    assert (REPO / "BENCHMARKS.md").read_text() == text
    assert len(text.encode()) < 12_000
    for item, runs in common.load_history().items():
        if item in report.EARLIER:  # the newest kept runs are rows of its earlier-runs table,
            latest = common.load_results()[item]["measured_at"]  # the rest are counted
            earlier = [h for h in runs if h["measured_at"] != latest]
            shown = earlier[-report.EARLIER_SHOWN :] if item == "ray_overhead" else earlier
            assert all(h["measured_at"][:16] in text for h in shown), item
            if len(shown) < len(earlier):
                assert f"the {len(earlier) - len(shown)} oldest are left out here" in text


def test_item1_verdict_pools_the_kept_runs_of_one_code_on_one_machine_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """save_result(keep=True) keeps each run; the verdict is the median of every round of the
    runs of the same code on the same machine kind; summaries without rounds are not pooled."""
    amd = {**common.machine(), "cpu": "AMD EPYC (family 25, model 17)"}
    intel = {**common.machine(), "cpu": "Intel(R) Xeon(R) Processor (family 6, model 207)"}

    def run(code: str, machine: dict, over: list[float], scale: list[float]) -> dict:
        rounds = {"ray1/plain epoch_ips": over, "ray2/ray1 epoch_ips": scale}
        ratios = {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}
        return {"code": code, "machine": machine, "round_ratios": rounds, "ratios": ratios}

    summary_only = run("abc1234", amd, [0.1], [0.1])
    del summary_only["round_ratios"]  # an old run kept as its medians only: not pooled
    kept = [
        run("abc1234", amd, [0.90, 0.91, 0.92], [1.1, 1.1, 1.1]),
        run("0ld0000", amd, [0.10, 0.10, 0.10], [0.1, 0.1, 0.1]),  # another code: left out
        run("abc1234", intel, [0.10, 0.10, 0.10], [0.1, 0.1, 0.1]),  # another kind: left out
        summary_only,
        run("abc1234", amd, [0.99, 1.00, 1.01], [0.9, 0.9, 0.9]),
    ]
    folder = tmp_path / "results"
    clock = iter(range(1_800_000_000, 1_800_000_000 + 60 * len(kept), 60))  # a run a minute
    real = time.gmtime
    monkeypatch.setattr(time, "gmtime", lambda *_: real(next(clock)))
    for result in kept:
        common.save_result("ray_overhead", result, folder, keep=True)
    history = common.load_history(folder)["ray_overhead"]
    assert len(history) == len(kept) and all("measured_at" in h for h in history)
    assert list(common.load_results(folder)) == ["ray_overhead"]  # the history is not an item

    now = common.load_results(folder)["ray_overhead"]  # this run: also the last one kept
    runs = report.pooled_runs(now, history)
    assert [h["round_ratios"] for h in runs] == [kept[0]["round_ratios"], kept[4]["round_ratios"]]
    pooled = report._pool(runs)
    assert sorted(pooled["ray1/plain epoch_ips"]) == [0.90, 0.91, 0.92, 0.99, 1.00, 1.01]
    assert report._ratio(pooled, "ray1/plain epoch_ips") == pytest.approx(0.955)
    alone = report.pooled_runs({**now, "code": None}, history)  # a result without its code
    assert len(alone) == 1 and alone[0]["code"] is None
    later = {**now, "code": "new", "measured_at": "2099-01-01 00:00:00 UTC"}  # the next code
    before = report.previous_code(later, history)  # what it is shown beside: the latest code's
    assert [h["round_ratios"] for h in before] == [h["round_ratios"] for h in runs]
    table = report.earlier_ray(history[:-1])
    assert table.count("\n| 20") == len(kept) - 1  # a row per earlier run, rounds or not
    assert "| 0.100 | 0.100 | - | - |" in table  # the summary-only run: no rounds kept


def test_code_version_names_the_last_commit_of_the_measured_code():
    version = common.code_version()
    assert version == "unknown" or len(version.split("+")[0]) >= 7
