"""Score the trained model on the test split: metrics, confusion matrix, misclassified images.

`evaluate_model` computes; `write_outputs` writes the DVC metrics and plots; the stage script
(pipeline/evaluate.py) also logs them into the train run through `src.tracking`.
`predict_logits` is the one forward pass over uint8 images, shared with the registered pyfunc
(src/registry.py), so the served model and this stage agree on every prediction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from src.errors import PipelineError
from src.files import atomic_dir, write_json

CONFUSION_JSON = "confusion.json"
CONFUSION_PNG = "confusion.png"
MISCLASSIFIED_PNG = "misclassified.png"


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: list[float],
    std: list[float],
    batch_size: int,
    progress: Any = None,
) -> np.ndarray:
    """Logits (N, num_classes) float32 of uint8 NHWC images, normalised with `mean`/`std`.

    Args:
        model: the CNN (put in eval mode here).
        images: uint8 (N, H, W, C), already resized/padded like the test split.
        mean, std: per-channel normalisation on the 0-1 scale (from the checkpoint's extra).
        batch_size: images per forward pass (bounds memory; np.memmap inputs are read per batch).
        progress: an optional tqdm bar, advanced by each batch's size.
    """
    from src.transforms import normalize

    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size])
        x = torch.from_numpy(np.ascontiguousarray(normalize(batch, mean, std)))
        out.append(model(x).float().numpy())
        if progress is not None:
            progress.update(len(batch))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)


@dataclass
class Evaluation:
    """What `evaluate_model` found on the test split.

    metrics: {"accuracy", "macro_f1", "loss", "num_test", "per_class": {name: {precision,
    recall, f1, support}}}; probs: (N, K) softmax; preds, labels: (N,) int64; images: the
    processed uint8 NHWC test images (for the misclassified grid); class_names.
    """

    metrics: dict[str, Any]
    probs: np.ndarray
    preds: np.ndarray
    labels: np.ndarray
    images: np.ndarray
    class_names: list[str]


def compute_metrics(
    logits: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, mean cross-entropy and per-class precision/recall/F1/support."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    preds = logits.argmax(axis=1)
    ks = list(range(len(class_names)))
    loss = F.cross_entropy(torch.from_numpy(logits), torch.as_tensor(np.array(labels))).item()
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=ks, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=ks, average="macro", zero_division=0)),
        "loss": float(loss),
        "num_test": int(len(labels)),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(class_names)
        },
    }


def evaluate_model(
    model_path: str | os.PathLike,
    processed_dir: str | os.PathLike,
    batch_size: int,
    quiet: bool = False,
) -> Evaluation:
    """Load `model_path` (weights only) and score it on the processed test split.

    Raises PipelineError naming the file when the checkpoint is missing or unreadable, or when
    it does not fit the processed data (classes, image size, channels).
    """
    from tqdm import tqdm

    from src.model import load_checkpoint
    from src.preprocess import load_processed

    try:
        model, extra = load_checkpoint(model_path)
    except FileNotFoundError:
        raise PipelineError(f"{model_path}: not found; run the train stage first") from None
    except ValueError as e:
        raise PipelineError(str(e)) from None
    data = load_processed(processed_dir)
    class_names = list(extra["class_names"])
    if class_names != list(data.meta["class_names"]):
        raise PipelineError(
            f"{model_path}: trained on classes {class_names}, but {processed_dir} has "
            f"{data.meta['class_names']}; run the train stage again"
        )
    images, labels = data.test_images, np.asarray(data.test_labels, dtype=np.int64)
    if images.shape[1:] != (extra["image_size"], extra["image_size"], extra["channels"]):
        raise PipelineError(
            f"{model_path}: expects {extra['image_size']}x{extra['image_size']}x"
            f"{extra['channels']} images, {processed_dir} has {'x'.join(map(str, images.shape[1:]))}"
            "; run the train stage again"
        )
    with tqdm(total=len(images), desc="evaluate", unit="img", disable=quiet) as bar:
        logits = predict_logits(model, images, extra["mean"], extra["std"], batch_size, bar)
    metrics = compute_metrics(logits, labels, class_names)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    return Evaluation(metrics, probs, logits.argmax(axis=1), labels, images, class_names)


def confusion_rows(ev: Evaluation) -> list[dict[str, str]]:
    """One {actual, predicted} row per test image, with class names (DVC's confusion template)."""
    names = ev.class_names
    return [
        {"actual": names[a], "predicted": names[p]}
        for a, p in zip(ev.labels.tolist(), ev.preds.tolist(), strict=True)
    ]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Training curves as a PNG: train and validation loss and accuracy per epoch."""
    plt = _plt()
    epochs = [e["epoch"] for e in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, what in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [e[f"train_{what}"] for e in history], marker="o", label="train")
        ax.plot(epochs, [e[f"val_{what}"] for e in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(what)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(ev: Evaluation, path: str | os.PathLike) -> None:
    """The confusion matrix (counts, rows = actual) as a PNG."""
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    k = len(ev.class_names)
    cm = confusion_matrix(ev.labels, ev.preds, labels=list(range(k)))
    side = min(4 + 0.5 * k, 20)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), ev.class_names, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), ev.class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    acc = ev.metrics["accuracy"]
    ax.set_title(f"Confusion matrix, test split (accuracy {acc:.4f})")
    if k <= 30:  # numbers stay readable up to about this many classes
        high = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if cm[i, j] > high else "black",
                )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_misclassified(ev: Evaluation, path: str | os.PathLike, limit: int) -> None:
    """A grid of up to `limit` misclassified test images, titled true -> predicted (p)."""
    plt = _plt()
    wrong = np.flatnonzero(ev.preds != ev.labels)[:limit]
    n = max(len(wrong), 1)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if len(wrong) == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified\ntest images", ha="center", va="center")
    for ax, i in zip(axes.flat, wrong, strict=False):
        img = np.asarray(ev.images[i])
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img)
        true, pred = ev.class_names[ev.labels[i]], ev.class_names[ev.preds[i]]
        ax.set_title(f"{true} -> {pred} ({ev.probs[i, ev.preds[i]]:.2f})", fontsize=8)
    fig.suptitle(f"Misclassified test images: true -> predicted ({len(wrong)} shown)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    ev: Evaluation,
    metrics_file: str | os.PathLike,
    plots_dir: str | os.PathLike,
    misclassified: int,
) -> dict[str, Path]:
    """Write metrics_file (JSON) and plots_dir/{confusion.json, confusion.png, misclassified.png}.

    The plots folder is replaced whole, atomically. Returns the final paths by name.
    """
    plots_dir = Path(plots_dir)
    with atomic_dir(plots_dir) as tmp:
        write_json(tmp / CONFUSION_JSON, confusion_rows(ev))
        plot_confusion(ev, tmp / CONFUSION_PNG)
        plot_misclassified(ev, tmp / MISCLASSIFIED_PNG, misclassified)
    write_json(metrics_file, ev.metrics)
    return {
        "metrics": Path(metrics_file),
        "confusion_json": plots_dir / CONFUSION_JSON,
        "confusion_png": plots_dir / CONFUSION_PNG,
        "misclassified_png": plots_dir / MISCLASSIFIED_PNG,
    }


def run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The test metrics as flat MLflow metric names: test_accuracy, test_precision_<class>, ..."""
    out = {f"test_{k}": float(metrics[k]) for k in ("accuracy", "macro_f1", "loss")}
    for name, row in metrics["per_class"].items():
        for key in ("precision", "recall"):
            out[f"test_{key}_{name}"] = float(row[key])
    return out
