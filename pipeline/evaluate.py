"""Evaluate stage: score models/model.pt on the test split; log the results into the train run."""

from __future__ import annotations

from pathlib import Path

from src import tracking
from src.cli import quiet, run_stage, stage_parser
from src.config import load_params
from src.evaluate import evaluate_model, run_metrics, write_outputs


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = load_params(args.params)
    paths = params.paths
    models = Path(paths.models)
    run = tracking.read_run_file(models / "run.json")  # fail before the work, not after
    tracking.setup()  # likewise an unreachable tracking store: before any output is written

    ev = evaluate_model(
        models / "model.pt", paths.processed, params.evaluate.batch_size, quiet=quiet(args)
    )
    out = write_outputs(
        ev,
        Path(paths.metrics) / "evaluate.json",
        Path(paths.plots) / "evaluate",
        params.evaluate.misclassified,
    )
    samples = Path(paths.processed) / "samples.png"
    tracking.log_to_run(
        run["run_id"],
        run_metrics(ev.metrics),
        {
            "evaluate": [out["confusion_png"], out["misclassified_png"], out["metrics"]],
            "preprocess": [samples] if samples.exists() else [],
        },
    )
    m = ev.metrics
    print(
        f"test accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, loss {m['loss']:.4f} "
        f"({m['num_test']} images); logged to run {run['run_id']}"
    )


if __name__ == "__main__":
    run_stage(main)
