"""`python -m src.model` (or `python -m src.summary`): the per-layer table of params.yaml's network.

The CLI of src.model, kept apart from it so that the model imports only torch.
"""

from __future__ import annotations

from pathlib import Path

from src.cli import run_stage, stage_parser
from src.config import load_params
from src.files import read_json
from src.model import build_config, format_table, shape_table


def main() -> None:
    """Print the per-layer table of params.yaml's model spec (h x w x d, parameters, total)."""
    args = stage_parser("Print the per-layer shape table of the configured CNN.").parse_args()
    params = load_params(args.params)  # validates the spec: a bad one is a one-line error
    meta = Path(params.paths.processed) / "meta.json"
    if meta.exists():
        num_classes = len(read_json(meta, "the preprocess stage's metadata")["class_names"])
        note = f"classes: {num_classes}, from {meta}"
    else:
        num_classes = 10
        note = f"note: num_classes 10 assumed: {meta} not found (run the preprocess stage)"
    cfg = build_config(
        params.model.model_dump(),
        in_channels=params.data.channels,
        image_size=params.preprocess.output_size,
        num_classes=num_classes,
    )
    print(f"input {cfg.image_size}x{cfg.image_size}x{cfg.in_channels} ({args.params})")
    print(format_table(shape_table(cfg)))
    print(note)


def cli() -> None:
    """Run `main` with the stages' one-line errors."""
    run_stage(main)


if __name__ == "__main__":
    cli()
