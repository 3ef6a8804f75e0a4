"""Params stage: validate the whole params.yaml, every section and key, tracked or not.

DVC reruns a stage only when one of its tracked params changes, so a typo in a key that no
stage tracks (a misspelled section, an unknown key under `paths` or `run`) would otherwise pass
unnoticed while `dvc repro` says everything is up to date. This stage tracks the whole file:
any edit reruns it, and a bad key fails `dvc repro` with one line naming it.
"""

from __future__ import annotations

from src.cli import run_stage, stage_parser
from src.config import load_params


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    load_params(args.params)
    print(f"{args.params}: every key valid")


if __name__ == "__main__":
    run_stage(main)
