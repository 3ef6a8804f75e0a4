"""Register stage: register the train run's model, set @challenger, move @champion if it wins."""

from __future__ import annotations

from pathlib import Path

from src.cli import run_stage, stage_parser
from src.config import load_params
from src.registry import register


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = load_params(args.params)
    paths = params.paths
    d = register(
        Path(paths.models) / "run.json",
        Path(paths.metrics) / "evaluate.json",
        params.register,
        paths.reports,
        data_source=params.data.source,
    )
    verdict = "promoted to @champion" if d["promoted"] else "not promoted"
    print(
        f"{d['model_name']} version {d['candidate_version']} (@challenger): {verdict}: "
        f"{d['reason']}"
    )


if __name__ == "__main__":
    run_stage(main)
