"""The train stage: Ray Train (TorchTrainer, DDP) on the preprocessed data, tracked in MLflow.

Reads params.paths.processed; writes paths.models/model.pt and run.json, paths.metrics/train.json
and paths.plots/train (see src/train.py). Re-running after an interruption resumes from the
last checkpoint under run.storage_path. RAY_ADDRESS runs it on an existing cluster.
"""

from __future__ import annotations

from pathlib import Path

from src.cli import run_stage, stage_parser
from src.config import load_params
from src.train import train_stage


def main() -> None:
    args = stage_parser("Train the CNN with Ray Train; track it in MLflow.").parse_args()
    params = load_params(args.params)
    metrics = train_stage(params, root=Path.cwd())
    print(
        f"best epoch {metrics['best_epoch']}/{metrics['epochs']}: "
        f"val accuracy {metrics['val_accuracy']:.4f}, run {metrics['run_id']}"
    )


if __name__ == "__main__":
    run_stage(main)
