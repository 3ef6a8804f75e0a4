"""Run the benchmarks and write BENCHMARKS.md: `python -m bench.run [--only NAME,...] [--quick]`.

Names (in run order): ray (item 1), fashion (items 2 and 5: the pipeline on Fashion-MNIST),
fashion-fp32 (2b: the same in fp32, kernels capped at AVX2), preprocess (3), memory (5: the
preprocess bound), overheads (4), gpu (6). Each writes
bench/results/<item>.json; BENCHMARKS.md is rebuilt from every saved result, so `--only`
re-measures some items and keeps the others. `--quick` runs tiny sizes into bench/out/quick
(its own results and report; never BENCHMARKS.md): a check that everything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("CNN_QUIET", "1")

from bench import common, fashion, gpu, memory, overheads, preprocess_speed, ray_overhead, report  # noqa: E402
from bench.common import FASHION, OUT, REPO, RESULTS, load_yaml  # noqa: E402

# Item 1's sizes. This machine's speed moves by 10-30% within seconds: more rounds of more epochs
# average more of that out (9 rounds of 4 epochs once left single ratios at 0.75-1.08).
RAY_SIZES = {
    "quick": {"rows": 2_000, "epochs": 3, "rounds": 1},
    "full": {"rows": 12_000, "epochs": 8, "rounds": 7},
}
NAMES = ("ray", "fashion", "fashion-fp32", "preprocess", "memory", "overheads", "gpu")
ITEM = {  # name -> result file stem
    "ray": "ray_overhead",
    "fashion": "fashion",
    "fashion-fp32": "fashion_fp32",
    "preprocess": "preprocess",
    "memory": "memory",
    "overheads": "overheads",
    "gpu": "gpu",
}


def base_params() -> dict[str, Any]:
    """The repository's params.yaml as a dict."""
    return load_yaml(REPO / "params.yaml")


def fashion_data(folder: Path, raw: dict[str, Any] | None = None) -> Any:
    """Fashion-MNIST at 28x28, no augmented copies (the plain training split), preprocessed once
    by the stage's code into `folder` and reused; the digits data where Fashion-MNIST is absent."""
    from src.config import parse_params
    from src.preprocess import load_processed, run

    raw = copy.deepcopy(raw or base_params())
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        raw["data"].update(source="idx", path=str(FASHION))
        raw["preprocess"].update(image_size=28, pad=0)
    raw["preprocess"]["augment_copies"] = 0
    raw["paths"]["processed"] = str(folder)
    if not (folder / "meta.json").exists():
        run(parse_params(raw), quiet=True)
    return load_processed(folder)


def run_item(
    name: str,
    quick: bool,
    out: Path,
    log: Any,
    noise: float = 0.10,
    runs: int = 1,
    sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Measure one item; returns its result (without machine/versions, added on saving).
    `noise`: the share of the CPUs other processes may use during a measurement before it is
    repeated (1.0: never); `runs`: pipelines (seeds) for the Fashion-MNIST item; `sizes`:
    item 1's rows, epochs and rounds where given (else RAY_SIZES)."""
    raw = base_params()
    if name == "ray":
        size = {**RAY_SIZES["quick" if quick else "full"], **(sizes or {})}
        data = fashion_data(OUT / "data" / "fashion-28")
        data = ray_overhead.subset(data, size["rows"])
        return ray_overhead.measure(
            raw,
            data,
            out / "ray",
            epochs=size["epochs"],
            rounds=size["rounds"],
            noise_limit=noise,
            lockstep_steps=50 if quick else 400,
            log=log,
        )
    if name in ("fashion", "fashion-fp32"):
        fp32 = name == "fashion-fp32"
        params = fashion.fp32_params() if fp32 else fashion.fashion_params()
        if quick:  # the same pipeline on a sliver of the work: checks it runs, not the target
            params["train"]["epochs"] = 1
            params["preprocess"]["augment_copies"] = min(params["preprocess"]["augment_copies"], 1)
        with fashion.baseline_isa() if fp32 else contextlib.nullcontext() as isa:
            result = fashion.measure(
                out / name, params=params, runs=1 if quick else runs, noise_limit=noise, log=log
            )
        return {**result, "isa_cap": isa}
    if name == "preprocess":
        data = fashion_data(OUT / "data" / "fashion-28")
        base = data.train_images[..., 0]
        return preprocess_speed.measure(
            raw, out / "preprocess", images=2_000 if quick else 120_000,
            rounds=1 if quick else 5, base=base, noise_limit=noise, log=log,
        )  # fmt: skip
    if name == "memory":
        from src.data import load_source

        params = fashion.fashion_params()
        from src.config import parse_params

        ds = load_source(parse_params(params).data, seed=0)
        if quick:
            ds = memory.head(ds, 4_000)
        return memory.measure(
            ds, params, out / "memory", factors=(1, 2) if quick else (1, 4), log=log
        )
    if name == "overheads":
        return overheads.measure(
            out / "overheads",
            rounds=1 if quick else 3,
            train_rounds=1 if quick else 3,
            noise_limit=noise,
            log=log,
        )
    if name == "gpu":
        data = fashion_data(OUT / "data" / "fashion-28")
        params = fashion.fashion_params() if fashion.CONFIG.exists() else raw
        return gpu.measure(params, data, epochs=2 if quick else 3, log=log)
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only", default="", help=f"comma-separated items to run (of {', '.join(NAMES)})"
    )
    p.add_argument("--skip", default="", help="comma-separated items not to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes, results in bench/out/quick")
    p.add_argument(
        "--noise", type=float, default=None,
        help="repeat a measurement when other processes used more than this share of the CPUs "
        "(default 0.10; 1.0 with --quick)",
    )  # fmt: skip
    p.add_argument(
        "--runs", type=int, default=1, help="Fashion-MNIST pipelines (seeds) to run (default 1)"
    )
    for size in ("rows", "epochs", "rounds"):
        p.add_argument(f"--ray-{size}", type=int, default=None, help=f"item 1's {size}")
    p.add_argument(
        "--report-only", action="store_true", help="rebuild BENCHMARKS.md, measure nothing"
    )
    args = p.parse_args(argv)
    only = [n for n in args.only.split(",") if n] or list(NAMES)
    skip = {n for n in args.skip.split(",") if n}
    for n in [*only, *skip]:
        if n not in NAMES:
            p.error(f"unknown item {n!r} (expected {', '.join(NAMES)})")
    names = [] if args.report_only else [n for n in NAMES if n in only and n not in skip]
    out = OUT / "quick" if args.quick else OUT
    results_dir = out / "results" if args.quick else RESULTS
    target = out / "BENCHMARKS.md" if args.quick else REPO / "BENCHMARKS.md"

    def log(msg: str) -> None:
        print(msg, flush=True)

    for name in names:
        load_start = common.loadavg()
        t0 = time.time()
        log(f"== {name} (load average {load_start})")
        noise = args.noise if args.noise is not None else (1.0 if args.quick else 0.10)
        sizes = {k: getattr(args, f"ray_{k}") for k in ("rows", "epochs", "rounds")}
        sizes = {k: v for k, v in sizes.items() if v is not None}
        result = run_item(name, args.quick, out, log, noise, args.runs, sizes)
        result.update(load_start=load_start, load_end=common.loadavg(), bench_s=time.time() - t0)
        # the training code measured: the report pools the runs of one code
        result["code"] = common.code_version()
        path = common.save_result(ITEM[name], result, results_dir, keep=True)
        log(f"   {time.time() - t0:.0f} s, saved {path.relative_to(REPO)}")
    report.write(common.load_results(results_dir), target, common.load_history(results_dir))
    log(f"wrote {target.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
