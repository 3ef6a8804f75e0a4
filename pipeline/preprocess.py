"""Preprocess stage: load `data.source`, resize / pad / augment, write `paths.processed`."""

from __future__ import annotations

from src.cli import quiet, run_stage, stage_parser
from src.config import load_params
from src.preprocess import run


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = load_params(args.params)
    meta = run(params, quiet=quiet(args), source=args.params)
    side, c = meta["image_size"], meta["channels"]
    print(
        f"preprocess: {meta['source']} -> {params.paths.processed}: {meta['num_train']} train "
        f"({meta['num_originals']} originals x {1 + meta['augment_copies']}), {meta['num_test']} test, "
        f"{side}x{side}x{c}, {len(meta['class_names'])} classes; "
        f"{(meta['num_originals'] + meta['num_test']) / meta['seconds']:,.0f} images/s on {meta['workers']} processes"
    )


if __name__ == "__main__":
    run_stage(main)
