"""The evaluate stage: metrics, DVC plots, pictures, and logging into the train run."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import yaml
from conftest import REPO, project_env
from evalkit import get_kit
from PIL import Image

from src.errors import PipelineError
from src.evaluate import (
    compute_metrics,
    confusion_rows,
    evaluate_model,
    run_metrics,
    write_outputs,
)

NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return get_kit(tmp_path_factory)


@pytest.fixture(scope="module")
def ev(kit):
    return evaluate_model(kit.model_pt, kit.processed, batch_size=100, quiet=True)


def test_metrics_on_the_test_split(ev):
    m = ev.metrics
    assert {"accuracy", "macro_f1", "loss", "per_class"} <= m.keys()
    assert m["accuracy"] > 0.5  # a few epochs on digits learn something
    assert m["accuracy"] == pytest.approx(float(np.mean(ev.preds == ev.labels)))
    assert m["loss"] > 0 and 0 <= m["macro_f1"] <= 1
    assert list(m["per_class"]) == NAMES
    assert sum(row["support"] for row in m["per_class"].values()) == m["num_test"] == len(ev.labels)
    for row in m["per_class"].values():
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    np.testing.assert_allclose(ev.probs.sum(axis=1), 1.0, rtol=1e-5)


def test_batch_size_does_not_change_the_answer(kit, ev):
    other = evaluate_model(kit.model_pt, kit.processed, batch_size=7, quiet=True)
    assert np.array_equal(other.preds, ev.preds)
    assert other.metrics["accuracy"] == ev.metrics["accuracy"]


def test_compute_metrics_by_hand():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]], np.float32)
    labels = np.array([0, 1, 1, 1])
    m = compute_metrics(logits, labels, ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["a"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
    }
    assert m["per_class"]["b"]["precision"] == 1.0 and m["per_class"]["b"][
        "recall"
    ] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    p_right, p_wrong = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))
    assert m["loss"] == pytest.approx(-(3 * np.log(p_right) + np.log(p_wrong)) / 4, rel=1e-5)


def test_outputs(ev, tmp_path):
    out = write_outputs(ev, tmp_path / "metrics" / "evaluate.json", tmp_path / "plots", 9)
    assert json.loads(out["metrics"].read_text()) == ev.metrics
    rows = json.loads(out["confusion_json"].read_text())
    assert rows == confusion_rows(ev) and len(rows) == len(ev.labels)
    assert set(rows[0]) == {"actual", "predicted"} and rows[0]["actual"] in NAMES
    wrong = sum(r["actual"] != r["predicted"] for r in rows)
    assert wrong == int((ev.preds != ev.labels).sum())
    for png in (out["confusion_png"], out["misclassified_png"]):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 100
    # nothing left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        ["confusion.json", "confusion.png", "misclassified.png"]
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_misclassified_grid_with_nothing_wrong(ev, tmp_path):
    perfect = type(ev)(ev.metrics, ev.probs, ev.labels.copy(), ev.labels, ev.images, ev.class_names)
    out = write_outputs(perfect, tmp_path / "m.json", tmp_path / "plots", 36)
    assert out["misclassified_png"].exists()


def test_run_metrics_names():
    m = {
        "accuracy": 0.9,
        "macro_f1": 0.8,
        "loss": 0.3,
        "per_class": {"cat": {"precision": 1, "recall": 0.5}},
    }
    assert run_metrics(m) == {
        "test_accuracy": 0.9,
        "test_macro_f1": 0.8,
        "test_loss": 0.3,
        "test_precision_cat": 1.0,
        "test_recall_cat": 0.5,
    }


def write_params(kit, path):
    """The kit's params as a params file (absolute paths into the kit)."""
    path.write_text(yaml.safe_dump(kit.params.model_dump(mode="json"), sort_keys=False))
    return path


def run_stage(kit, params_file) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "evaluate.py"), "--params", str(params_file)],
        cwd=kit.root,  # the stage's MLflow store is the project folder's mlflow.db
        env=project_env(CNN_QUIET="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_stage_logs_into_the_train_run(kit, ev, tmp_path):
    r = run_stage(kit, write_params(kit, tmp_path / "params.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((kit.root / "metrics" / "evaluate.json").read_text())
    assert metrics["accuracy"] == ev.metrics["accuracy"]
    assert (kit.root / "plots" / "evaluate" / "confusion.json").exists()
    client = mlflow.MlflowClient(kit.tracking_uri)
    run = client.get_run(kit.run_id)
    assert run.data.metrics["test_accuracy"] == pytest.approx(ev.metrics["accuracy"])
    assert run.data.metrics["test_macro_f1"] == pytest.approx(ev.metrics["macro_f1"])
    assert run.data.metrics["test_loss"] == pytest.approx(ev.metrics["loss"])
    assert "test_recall_3" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(kit.run_id, "evaluate")}
    assert {"evaluate/confusion.png", "evaluate/misclassified.png"} <= logged
    assert [a.path for a in client.list_artifacts(kit.run_id, "preprocess")] == [
        "preprocess/samples.png"
    ]


def test_missing_model_is_one_line(kit, tmp_path):
    with pytest.raises(PipelineError, match="model.pt: not found; run the train stage first"):
        evaluate_model(tmp_path / "model.pt", kit.processed, 64, quiet=True)
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="model.pt: not a readable checkpoint"):
        evaluate_model(tmp_path / "model.pt", kit.processed, 64, quiet=True)


@pytest.mark.slow
def test_stage_without_run_file_fails_in_one_line(kit, tmp_path):
    raw = kit.params.model_dump(mode="json")
    raw["paths"]["models"] = str(tmp_path / "models")  # no run.json there
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = run_stage(kit, tmp_path / "params.yaml")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "run.json: not found" in r.stderr, r.stderr
