"""BENCHMARKS.md from the saved results: bench/results/<item>.json (the latest run of each item)
and bench/results/history/<item>/<when>.json (the runs kept). A table of target against
measured first, then one short section per item; earlier runs as a table from the history."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import median, quantiles
from typing import Any

# item -> (what is targeted, as the table says it)
TARGETS = {
    "ray_overhead": "Ray 1 worker ≥ 0.98 x plain loop; 2 workers ≥ 1.0 x 1 worker",
    "fashion": "test accuracy ≥ 0.935 in ≤ 300 s of training",
    "fashion_fp32": "the same in fp32 on AVX2 (no bf16)",
    "preprocess": "≥ 5,000 images/s per core at 28x28; 2 processes ≥ 1.8 x 1",
    "overheads": "no-op `dvc repro` ≤ 3 s; end-to-end ≤ 120 s",
    "memory": "preprocess memory per worker bounded (flat as data grows)",
    "gpu": "GPU busy ≥ 90% (bf16, channels_last)",
}
TITLES = {
    "ray_overhead": "1. Ray Train against the plain loop",
    "fashion": "2. Time to accuracy on Fashion-MNIST",
    "fashion_fp32": "2b. Time to accuracy on Fashion-MNIST, fp32 on AVX2",
    "preprocess": "3. Preprocess throughput",
    "overheads": "4. Pipeline overheads",
    "memory": "5. Memory",
    "gpu": "6. GPU path",
}
RERUN = {"ray_overhead": "ray", "fashion": "fashion", "fashion_fp32": "fashion-fp32",
         "preprocess": "preprocess",
         "overheads": "overheads", "memory": "memory", "gpu": "gpu"}  # fmt: skip
RAY_DOCS = "https://docs.ray.io/en/latest/train/benchmarks.html"
GPU_DATA = "../shared/data/fashion-mnist/ (the 4 IDX .gz files, relative to the repository)"
GPU_RUN = "python -m bench.gpu"
NO_GPU = "not measured: no GPU lent"
NOISE_LIMIT = 0.10  # the share of the CPUs other processes may take during a run with a verdict


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("pass" if passed else "**miss**")


def _f(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def machine_kind(cpu: str) -> str:
    """'AMD' or 'Intel' (the vendor in a result's cpu name), else the name itself."""
    return next((k for k in ("AMD", "Intel") if k in cpu), cpu)


def short_machine(r: dict[str, Any]) -> str:
    """The CPU in a few words and its cores, e.g. 'AMD EPYC fam 25, 2 cores'."""
    m = r["machine"]
    cpu = m["cpu"].replace("(R)", "").replace(" Processor", "").replace("family ", "fam ")
    cpu = cpu.split(", model")[0].replace("(fam", "fam").strip()
    return f"{cpu}, {m.get('cores', '?')} cores" + (f", {m['gpu']}" if m.get("gpu") else "")


def context(r: dict[str, Any]) -> str:
    """When, where, with which code and versions a result was measured (one line)."""
    m, v = r["machine"], r.get("versions", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val != "absent")
    return (
        f"*{r['measured_at']}, {m['cpu']}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; "
        f"code {r.get('code', 'not recorded')}; {versions}; load average "
        f"{r.get('load_start')} -> {r.get('load_end')}.*\n\n"
    )


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n\n"


# ---------------------------------------------------------------------------------------------
# Item 1: pooled over the kept runs of one code on one machine kind


def others(r: dict[str, Any]) -> float | None:
    """The median share of the CPUs other processes took during a result's runs (None where
    the result kept no runs)."""
    shares = [x["foreign_share"] for x in r.get("runs", []) if "foreign_share" in x]
    return median(shares) if shares else None


def quiet(r: dict[str, Any]) -> bool:
    """Whether a result was measured with others taking at most NOISE_LIMIT of the CPUs."""
    share = others(r)
    return share is None or share <= NOISE_LIMIT


def pooled_runs(r: dict[str, Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kept runs of item 1 (common.load_history) of the code `r` measured, on its machine
    kind, with `r` itself last: the runs the verdict pools."""
    kind, code = machine_kind(r["machine"]["cpu"]), r.get("code")
    runs = [
        h for h in history
        if code is not None and h.get("code") == code and h.get("round_ratios") and quiet(h)
        and machine_kind(h["machine"]["cpu"]) == kind and h["measured_at"] != r["measured_at"]
    ]  # fmt: skip
    return [*runs, r]


def _pool(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Every round's ratio of `runs`, by ratio name (those all the runs have)."""
    rounds = [h.get("round_ratios") or {k: [v] for k, v in h["ratios"].items()} for h in runs]
    return {
        k: [x for rr in rounds for x in rr[k]] for k in rounds[-1] if all(k in rr for rr in rounds)
    }


def previous_code(r: dict[str, Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kept runs with rounds of the latest code before `r`'s on its machine kind (pooled
    as `r`'s are), or []."""
    kind = machine_kind(r["machine"]["cpu"])
    earlier = [
        h for h in history
        if h.get("round_ratios") and quiet(h) and h.get("code") != r.get("code")
        and machine_kind(h["machine"]["cpu"]) == kind and h["measured_at"] < r["measured_at"]
    ]  # fmt: skip
    return [h for h in earlier if h["code"] == earlier[-1]["code"]] if earlier else []


def _ratio(pooled: dict[str, list[float]], key: str) -> float | None:
    return median(pooled[key]) if pooled.get(key) else None


def item_ray(r: dict[str, Any], history: list[dict[str, Any]]) -> tuple[str, bool | None, str]:
    s, setup = r["summary"], r["setup"]
    runs = pooled_runs(r, history)
    pooled = _pool(runs)
    over, scale = _ratio(pooled, "ray1/plain epoch_ips"), _ratio(pooled, "ray2/ray1 epoch_ips")
    ddp = _ratio(pooled, "ray2/plain2 epoch_ips")
    passed = None if over is None or scale is None else over >= 0.98 and scale >= 1.0
    n = len(pooled.get("ray1/plain epoch_ips", []))
    measured = f"ray1/plain {_f(over, '.3f')}, ray2/ray1 {_f(scale, '.3f')} ({n} rounds)"
    if not quiet(r):  # the ratios then measure the other jobs more than the code
        passed = None
        measured += f", others used {others(r):.0%} of the CPUs: no verdict"
    before = previous_code(r, history)
    if before:
        p = _pool(before)
        measured += (
            f"; code {before[-1]['code']} before: {_f(_ratio(p, 'ray1/plain epoch_ips'), '.3f')}, "
            f"{_f(_ratio(p, 'ray2/ray1 epoch_ips'), '.3f')} "
            f"({len(p.get('ray1/plain epoch_ips', []))} rounds, {short_machine(before[-1])})"
        )
    rows = [
        [name, v["threads"], _f(v["epoch_ips"]), _f(v["loop_ips"]), _f(v["epoch_s"], ".2f"),
         _f(v["train_pass_s"], ".2f"), _f(v["fixed_s"], ".1f"), _f(v.get("ray_share"), ".1%")]
        for name, v in s.items()
    ]  # fmt: skip
    ratios = [
        [k, f"**{median(v):.3f}**", f"{min(v):.3f}-{max(v):.3f}"]
        + ([f"{quantiles(v, n=4)[0]:.3f}-{quantiles(v, n=4)[2]:.3f}"] if len(v) > 3 else ["-"])
        for k, v in pooled.items()
        if k.endswith("epoch_ips") or k.endswith("loop_ips")
    ]
    text = (
        "Method (`bench/ray_overhead.py`): `src.loop.run_local` (the plain loop, no Ray: the "
        "baseline) against `src.ray_driver.run_ray` (the stage's TorchTrainer, a report and a "
        "checkpoint per epoch), 1 worker x 2 threads and 2 x 1; plain2 is the 2 workers' DDP "
        "loop without Ray (torch.distributed, gloo). Same model (params.yaml), global batch "
        f"{setup['batch_size']}, {setup['rows']:,} Fashion-MNIST rows, {setup['epochs']} epochs, "
        f"{setup['rounds']} rounds alternated (every other reversed), a fresh Ray instance per "
        "run. Epoch images/s: epochs 2..E, from epoch end to epoch end (Ray: the checkpoints' "
        "file times). Ratios: medians of each round's ratio. Reference: Ray documents its "
        f"PyTorch training within 2.5% of native PyTorch DDP ({RAY_DOCS}); here ray2/plain2 "
        f"is that comparison: {_f(ddp, '.3f')}.\n\n"
        + table(
            [
                "variant",
                "workers x threads",
                "epoch images/s",
                "pass images/s",
                "epoch s",
                "pass s",
                "fixed s per fit",
                "Ray processes' CPU",
            ],
            rows,
        )  # fmt: skip
        + table(["ratio (pooled)", "median", "range", "quartiles"], ratios)
        + _ray_causes(r)
    )
    return measured, passed, text


def _ray_causes(r: dict[str, Any]) -> str:
    """What this run measured of where Ray's time goes, by public means only."""
    s, out = r["summary"], []
    plain = s.get("plain")
    if plain:
        for name in ("ray1", "ray2"):
            if name in s:
                v, base = s[name], s.get("plain2" if name == "ray2" else "plain", plain)
                rest = (v["epoch_s"] - v["train_pass_s"]) - (base["epoch_s"] - base["train_pass_s"])
                out.append(
                    f"{name}: start-up and shutdown per fit {v['fixed_s']:.1f} s (the plain loop "
                    f"{plain['fixed_s']:.1f} s; `ray.init` {r['setup']['ray_init_s']:.1f} s more, "
                    f"outside it); report + checkpoint {rest * 1e3:+.0f} ms per epoch against "
                    f"{'plain2' if name == 'ray2' else 'plain'} ({rest / v['epoch_s']:+.1%} of the "
                    f"epoch); training pass {v['train_pass_s'] / base['train_pass_s'] - 1:+.1%}"
                )
    for name, base in (("ray1", "plain"), ("ray2", "plain2")):
        v, b = s.get(name), s.get(base)
        if v and b and "idle_share" in v and "preemptions_per_s" in v:
            out.append(
                f"{name}: CPUs idle {v['idle_share']:.1%} of its epochs ({base} "
                f"{b['idle_share']:.1%}); a worker preempted {v['preemptions_per_s']:,.0f} times "
                f"a second ({base} {b['preemptions_per_s']:,.0f}; /proc)"
            )
    ar, p2 = r.get("allreduce"), s.get("plain2")
    if ar and p2 and isinstance(ar.get("seconds"), float):
        step = r["setup"]["batch_size"] / p2["loop_ips"]
        out.append(
            f"gloo all-reduce of the {ar['parameters']:,} gradients alone: "
            f"{ar['seconds'] * 1e3:.2f} ms, {ar['seconds'] / step:.1%} of plain2's step"
        )
    lock = r.get("lockstep")
    if lock:
        out.append(
            f"lockstep: 2 processes stepping side by side without exchange (batch "
            f"{lock['batch_size']}, {lock['steps']} steps) wait {lock['lockstep']:.1%} a step for "
            f"the slower one (step spread {lock['cv']:.0%})"
        )
    ceiling = r.get("machine_scaling")
    if ceiling:
        out.append(f"this machine's 2-process ceiling (pure compute): {ceiling['scaling']:.2f}")
    noisy = [x["foreign_share"] for x in r.get("runs", [])]
    if noisy:
        out.append(
            f"other processes used {min(noisy):.0%}-{max(noisy):.0%} of the CPUs during the runs"
        )
    out.append(
        "not measured: Ray's actors one by one (Ray's state API needs the dashboard, which "
        "ray[train] lacks: the column above sums Ray's processes by name from /proc), and the "
        "all-reduce wait inside a DDP step of the workers (it needs a hook in src/'s worker "
        "code; the gloo figure above is the all-reduce alone)"
    )
    return "Measured causes, this run:\n\n" + "".join(f"- {x}\n" for x in out) + "\n"


EARLIER_SHOWN = 8  # the newest runs in the table; the rest stay in bench/results/history


def earlier_ray(history: list[dict[str, Any]]) -> str:
    older, history = history[:-EARLIER_SHOWN], history[-EARLIER_SHOWN:]
    rows = [
        [h["measured_at"][:16], machine_kind(h["machine"]["cpu"]), str(h.get("code", "-")),
         _f(h["ratios"].get("ray1/plain epoch_ips"), ".3f"),
         _f(h["ratios"].get("ray2/ray1 epoch_ips"), ".3f"),
         str(len(h.get("round_ratios", {}).get("ray1/plain epoch_ips", [])) or "-"),
         _f(others(h), ".0%")]
        for h in history
    ]  # fmt: skip
    return (
        "Earlier runs (bench/results/history/ray_overhead; codes 1-9 are the tuned code "
        "before 37a129e, each record's `code_note` says what it had; runs where others took "
        f"over {NOISE_LIMIT:.0%} of the CPUs are neither pooled nor compared with"
        + (f"; the {len(older)} oldest are left out here" if older else "")
        + "):\n\n"
        + table(
            ["when", "CPU", "code", "ray1/plain", "ray2/ray1", "rounds kept", "others' CPU"], rows
        )
    )


# ---------------------------------------------------------------------------------------------
# Items 2-6


def item_fashion(r: dict[str, Any], _: list[dict[str, Any]]) -> tuple[str, bool | None, str]:
    s = r["summary"]
    acc, secs = s["test_accuracy_median"], s["training_s_median"]
    accs = [x["test_accuracy"] for x in r["runs"]]

    def stage_s(x: dict[str, Any], name: str) -> str:
        return _f(x.get("stages", {}).get(name, {}).get("seconds"))

    rows = [
        [str(x.get("seed", "-")), f"{x['test_accuracy']:.4f}", _f(x["training_s"]),
         _f(x["train_stage_s"] - x["training_s"] if x.get("train_stage_s") else None),
         stage_s(x, "preprocess"), stage_s(x, "evaluate"), _f(x.get("images_per_sec"))]
        for x in r["runs"]
    ]  # fmt: skip
    isa, ran = r.get("isa_cap"), r.get("params", {})
    what = ""
    if ran.get("model") and ran.get("train"):  # the config measured (it changes between runs)
        layers = [f"{x['conv']}" if "conv" in x else f"fc{x['fc']}" if "fc" in x else "pool"
                  for x in ran["model"]["layers"]]  # fmt: skip
        t = ran["train"]
        what = (
            f"Config: conv {'-'.join(layers)}, dropout {ran['model'].get('dropout')}, "
            f"{t['epochs']} epochs, batch {t['batch_size']}, precision {t['precision']}. "
        )
    if isa:  # item 2b: item 2's method, in fp32 on the x86-64 baseline
        method = (
            "Method: item 2's, with train.precision fp32 and the kernels capped at AVX2 ("
            + ", ".join(f"{k}={v}" for k, v in isa.items())
            + "): what a CPU without AVX-512 or bf16 runs. "
        )
    else:
        method = (
            "Method (`bench/fashion.py`): a fresh copy of the project with "
            "configs/fashion-mnist.yaml as params.yaml, then `dvc repro`; test accuracy from "
            "metrics/evaluate.json; training s: the train stage's first batch to its last "
            "epoch's report; outside epochs: the rest of the stage (start-up, worker group, "
            "MLflow, shutdown). "
        )
    headers = ["seed", "test accuracy", "training s", "train stage outside epochs s",
               "preprocess s", "evaluate s", "images/s"]  # fmt: skip
    text = (
        f"{method}{what}\n\n"
        + table(headers, rows)
        + f"Seed-to-seed spread: {min(accs):.4f}-{max(accs):.4f} ({max(accs) - min(accs):.4f}).\n\n"
        + ("" if isa else "The configuration search behind the config is a record in "
           "bench/results/records/fashion_search.json (not re-run).\n\n")
    )  # fmt: skip
    return f"{acc:.4f} in {secs:.0f} s (median of {s['runs']})", acc >= 0.935 and secs <= 300, text


def earlier_fashion(history: list[dict[str, Any]]) -> str:
    rows = [
        [h["measured_at"][:16], short_machine(h), str(h.get("code", "-")),
         f"{h['summary']['test_accuracy_median']:.4f}", f"{h['summary']['training_s_median']:.0f}"]
        for h in history
    ]  # fmt: skip
    return "Earlier runs:\n\n" + table(["when", "machine", "code", "accuracy", "training s"], rows)


def item_preprocess(r: dict[str, Any], _: list[dict[str, Any]]) -> tuple[str, bool | None, str]:
    cases = r["cases"]
    main = cases.get("28x28 gray, pad+augment") or next(iter(cases.values()))
    per_core = min(main["per core (1 process)"], main["per core (2 processes)"])
    scaling = min(c["scaling 2/1"] for c in cases.values())
    rows = [
        [name, f"{c['images']:,}", _f(c["1 process images/s"]), _f(c["2 processes images/s"]),
         _f(c["per core (2 processes)"]), f"{c['scaling 2/1']:.2f}"]
        for name, c in cases.items()
    ]  # fmt: skip
    ceiling = r.get("machine_scaling", {}).get("scaling")
    text = (
        "Method (`bench/preprocess_speed.py`): the stage's code (`src.preprocess."
        "preprocess_dataset`) in a fresh process, one augmented copy per training image, 1 and 2 "
        f"processes alternated, medians of {r['rounds']} rounds; baseline: 1 process in the same "
        f"run. This machine's 2-process ceiling (pure compute): {_f(ceiling, '.2f')}.\n\n"
        + table(["case", "images", "1 process /s", "2 processes /s", "per core (2)", "2/1"], rows)
    )
    measured = f"{per_core:,.0f} per core; 2/1 {scaling:.2f} (lowest of {len(cases)} cases)"
    return measured, per_core >= 5000 and scaling >= 1.8, text


def item_overheads(r: dict[str, Any], _: list[dict[str, Any]]) -> tuple[str, bool | None, str]:
    e2e, ray = r["end_to_end"], r["ray_startup"]
    stages = [[n, f"{st['seconds']:.1f}", _f(st.get("pss_mib"))] for n, st in e2e["stages"].items()]
    starts = ", ".join(f"{n} {s:.2f} s" for n, s in r["stage_startup_s"].items())
    text = (
        "Method (`bench/overheads.py`): `dvc repro` in a fresh copy of the project (default "
        "params, bundled digits), then alternated, medians of "
        f"{r['rounds']}: the no-op `dvc repro`, each stage's start-up (`--help`), Ray's start-up "
        "in a fresh process.\n\n"
        + table(["stage", "s", "peak PSS MiB (tree)"], stages)
        + f"Stage start-up: {starts}. Ray: `import ray.train.torch` {ray['import_s']:.2f} s, "
        f"`ray_session()` {ray['init_s']:.2f} s, shutdown {ray['shutdown_s']:.2f} s.\n\n"
    )
    fixed = r.get("train_fixed")
    if fixed:  # before/after of the sweep recipe (README: one `ray start --head` for a sweep)
        rows = [[f"{v} Ray instance", *(f"{fixed[v][k]:.1f}" for k in
                 ("seconds", "training_s", "before_s", "after_s", "fixed_s"))]
                for v in ("own", "shared")]  # fmt: skip
        ratio = fixed["shared"]["fixed_s"] / fixed["own"]["fixed_s"]
        text += (
            "The train stage alone (`dvc repro -f -s train`, alternated, medians): fixed s = "
            "before its first batch + after its last epoch's report; *own*: it starts its Ray "
            "instance (the default), *shared*: the README's sweep recipe (one `ray start --head`, "
            f"RAY_ADDRESS). Shared/own fixed s: {ratio:.2f}.\n\n"
            + table(
                ["train stage", "stage s", "training s", "before s", "after s", "fixed s"], rows
            )  # fmt: skip
        )
    noop, total = r["noop_repro_s"], e2e["seconds"]
    return f"no-op {noop:.2f} s; end-to-end {total:.1f} s", noop <= 3 and total <= 120, text


def item_memory(r: dict[str, Any], _: list[dict[str, Any]]) -> tuple[str, bool | None, str]:
    f = r["factors"]
    lo, hi = f[min(f, key=int)], f[max(f, key=int)]
    bounded = r["worker_growth_mib"] <= max(
        0.25 * r["output_growth_mib"], r["bound_mib_per_worker"] * 2 + 8
    )
    rows = [
        [f"x{k}", f"{x['images']:,}", f"{x['output_mib']:.0f}", f"{x['parent_anon_mib']:.0f}",
         f"{x['largest_worker_private_mib']:.0f}"]
        for k, x in f.items()
    ]  # fmt: skip
    text = (
        "Method (`bench/memory.py`): the preprocess stage's code on Fashion-MNIST repeated "
        f"{' and '.join(f'{k}x' for k in f)}, 2 workers, each process's peak memory sampled every "
        f"0.1 s; the bound is chunk_size x (2 + augment_copies) = "
        f"{r['bound_images_per_worker']:,} images per worker. Baseline: the 1x run.\n\n"
        + table(["data", "images", "output MiB", "parent anon MiB", "largest worker own MiB"], rows)
    )
    measured = (
        f"worker {r['worker_growth_mib']:+.0f} MiB for {hi['images'] // lo['images']}x the data "
        f"(+{r['output_growth_mib']:.0f} MiB output)"
    )
    return measured, bounded, text


def item_gpu(r: dict[str, Any], _: list[dict[str, Any]]) -> tuple[str, bool | None, str]:
    how = (
        f"Run on a CUDA machine with torch only (no Ray, MLflow, DVC or albumentations): "
        f"`{GPU_RUN}` (`bench/gpu.py`; data: Fashion-MNIST IDX files in {GPU_DATA}). It trains "
        "the per-worker loop (`src.loop.make_loop` + `train_epoch`) and measures in one call: "
        "images/s in fp32 and bf16 autocast (channels_last), the GPU busy fraction "
        "(torch.profiler: kernel/memcpy/memset time over the wall window), peak GPU memory, the "
        "time to 0.935 test accuracy, and a smoke run of 2 ranks sharing the GPU (gloo: device "
        "per rank, data sharding, all-reduce of CUDA gradients).\n\n"
    )
    if not r.get("available"):
        return NO_GPU, None, f"**{NO_GPU}**: every GPU figure is unmeasured.\n\n" + how
    rows = [
        [x["precision"], str(x["batch_size"]), _f(x["images_per_sec"]),
         _f(x["busy_fraction"], ".1%"), _f(x.get("peak_mib"))]
        for x in r["results"]
    ]  # fmt: skip
    best = max((x["busy_fraction"] or 0.0) for x in r["results"])
    tta = r.get("time_to_accuracy") or {}
    ranks = r.get("two_ranks") or {}
    text = (
        table(["precision", "batch", "images/s", "GPU busy", "peak MiB"], rows)
        + f"Time to 0.935: {_f(tta.get('seconds'), '.1f')} s (reached: {tta.get('reached')}, "
        f"accuracy {_f(tta.get('accuracy'), '.4f')}). 2 ranks on one GPU: "
        f"{'ok' if ranks.get('ok') else ranks or 'not run'}.\n\n" + how
    )
    return f"busy {best:.1%} ({r['device']})", best >= 0.90, text


ITEMS: dict[str, Callable[..., tuple[str, bool | None, str]]] = {
    "ray_overhead": item_ray,
    "fashion": item_fashion,
    "fashion_fp32": item_fashion,
    "preprocess": item_preprocess,
    "overheads": item_overheads,
    "memory": item_memory,
    "gpu": item_gpu,
}
EARLIER = {"ray_overhead": earlier_ray, "fashion": earlier_fashion,
           "fashion_fp32": earlier_fashion}  # fmt: skip


def render(
    results: dict[str, dict[str, Any]], history: dict[str, list[dict[str, Any]]] | None = None
) -> str:
    """The whole BENCHMARKS.md text; `history`: the runs kept (common.load_history)."""
    history = history or {}
    summary, sections = [], []
    for name, item in ITEMS.items():
        r, kept = results.get(name), history.get(name, [])
        head = f"## {TITLES[name]}\n\n"
        if r is None:
            summary.append([TITLES[name], TARGETS[name], "-", "n/a", "-"])
            sections.append(
                head + f"Not measured yet: `python -m bench.run --only {RERUN[name]}`.\n"
            )
            continue
        measured, passed, text = item(r, kept)
        machine = short_machine(r) if name != "gpu" or r.get("available") else "-"
        summary.append([TITLES[name], TARGETS[name], measured, _verdict(passed), machine])
        earlier = [h for h in kept if h["measured_at"] != r["measured_at"]]
        more = EARLIER[name](earlier) if earlier and name in EARLIER else ""
        measured_here = name != "gpu" or r.get("available")  # a skipped item has no figures
        sections.append(head + (context(r) if measured_here else "") + text + more)
    return (
        "# Benchmarks\n\n"
        "Generated by `python -m bench.run` (one item: `--only NAME`; `--report-only` rebuilds "
        "this file) from bench/results/*.json and bench/results/history/. Not tests: nothing "
        "here is asserted. The machines are shared 2-core VMs: compared variants alternate, "
        "figures are medians, and each run records the CPU share other processes took.\n\n"
        + table(["item", "target", "measured", "result", "machine"], summary)
        + "\n".join(sections)
    )


def write(
    results: dict[str, dict[str, Any]],
    path: Path,
    history: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    path.write_text(render(results, history))
    return path
