"""Classify image files with a registered model: one line per image.

    python -m src.predict --model models:/cnn@champion digit.png photo.jpg
    digit.png	7	0.9931

Columns (tab-separated): the file, the predicted class, its probability. The model is the
pipeline's pyfunc (src/registry.py), which applies the test-split preprocessing itself; the
tracking store is $MLFLOW_TRACKING_URI or the project's mlflow.db (src/tracking.py).
A file that is not an image, or a model URI that does not resolve, is a one-line error, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from src.cli import run_stage
from src.data import check_image_file, decode_image
from src.errors import PipelineError
from src.registry import load_model
from src.serving import MAX_IMAGE_PIXELS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--model URI (default models:/cnn@champion) and one or more image files."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="models:/cnn@champion",
        help="MLflow model URI: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model "
        "(default: models:/cnn@champion)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    return p.parse_args(argv)


def predict_files(model_uri: str, paths: list[str]) -> pd.DataFrame:
    """Classify image files with `model_uri`.

    Returns the pyfunc's output (label, probability, class_index, probabilities) with a `path`
    column first. Raises PipelineError naming the file that is missing or not an image, or
    the model URI that does not load.
    """
    for path in paths:  # fail on a bad argument before loading anything (headers only)
        if not os.path.isfile(path):
            raise PipelineError(f"{path}: file not found")
        check_image_file(path, 1, MAX_IMAGE_PIXELS)
    model = load_model(model_uri)
    channels = int(model.metadata.metadata["channels"])
    images = [decode_image(path, channels, 1, MAX_IMAGE_PIXELS) for path in paths]
    out = model.predict(pd.DataFrame({"image": images}))
    out.insert(0, "path", paths)
    return out


def main(argv: list[str] | None = None) -> None:
    """Print `path<TAB>class<TAB>probability` for each image."""
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = predict_files(args.model, args.images)
    for row in out.itertuples(index=False):
        print(f"{row.path}\t{row.label}\t{row.probability:.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    run_stage(main)
