"""The register stage: promotion rule, idempotence per run, tags, history, one-line errors;
and the pyfunc: raw images of any size and mode in, probabilities and class names out."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from evalkit import get_kit, new_run, raw_test_images
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from src import registry
from src.config import RegisterParams
from src.errors import PipelineError
from src.evaluate import evaluate_model


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return get_kit(tmp_path_factory)


@pytest.fixture
def store(kit, monkeypatch):
    """The kit's SQLite store for every MLflow call in the test (register's root may differ)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", kit.tracking_uri)
    mlflow.set_tracking_uri(kit.tracking_uri)
    return MlflowClient(kit.tracking_uri)


@pytest.fixture(scope="module")
def pyfunc(kit):
    return registry.load_model(f"runs:/{kit.run_id}/model", kit.root)


def candidate(kit, folder, metrics: dict) -> tuple:
    """A fresh train run (the kit's checkpoint as its pyfunc) and a fake evaluate.json."""
    folder.mkdir(parents=True, exist_ok=True)
    run_json, eval_json = folder / "run.json", folder / "evaluate.json"
    new_run(kit.root, kit.model_pt, run_json, "candidates")
    eval_json.write_text(json.dumps({"macro_f1": 0.5, "loss": 1.0, **metrics}))
    return run_json, eval_json


def aliases(client, name) -> dict[str, int]:
    return {a: int(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_promotion_rule(kit, store, tmp_path):
    params = RegisterParams(model_name="promo", metric="accuracy", mode="max", min_delta=0.02)
    reports = tmp_path / "reports"
    runs = {
        acc: candidate(kit, tmp_path / str(acc), {"accuracy": acc})
        for acc in (0.8, 0.9, 0.85, 0.91, 0.92)
    }

    def reg(acc):
        return registry.register(*runs[acc], params, reports, root=tmp_path)

    first = reg(0.8)
    assert (first["promoted"], first["reason"]) == (True, "no champion yet")
    assert aliases(store, "promo") == {"champion": 1, "challenger": 1}

    better = reg(0.9)  # beats 0.8 by 0.1 >= 0.02
    assert better["promoted"] and better["champion_value"] == pytest.approx(0.8)
    assert aliases(store, "promo") == {"champion": 2, "challenger": 2}

    worse = reg(0.85)
    assert not worse["promoted"] and "does not beat" in worse["reason"]
    assert aliases(store, "promo") == {"champion": 2, "challenger": 3}

    within = reg(0.91)  # better, but by 0.01 < min_delta
    assert not within["promoted"]
    assert aliases(store, "promo") == {"champion": 2, "challenger": 4}

    by_delta = reg(0.92)  # better by exactly min_delta
    assert by_delta["promoted"] and by_delta["candidate_version"] == 5
    assert aliases(store, "promo") == {"champion": 5, "challenger": 5}

    again = reg(0.85)  # the same run once more: its version again, no new one
    assert again["candidate_version"] == 3 and not again["new_version"]
    assert not again["promoted"]
    assert len(store.search_model_versions("name = 'promo'")) == 5
    assert aliases(store, "promo") == {"champion": 5, "challenger": 3}

    report = json.loads((reports / "registry.json").read_text())
    assert report["decision"] == again
    assert [d["candidate_version"] for d in report["history"]] == [1, 2, 3, 4, 5, 3]


def test_min_mode_promotes_lower_values(kit, store, tmp_path):
    params = RegisterParams(model_name="promo-min", metric="loss", mode="min", min_delta=0.0)
    a = candidate(kit, tmp_path / "a", {"accuracy": 0.9, "loss": 0.5})
    b = candidate(kit, tmp_path / "b", {"accuracy": 0.9, "loss": 0.6})
    c = candidate(kit, tmp_path / "c", {"accuracy": 0.9, "loss": 0.4})
    d = candidate(kit, tmp_path / "d", {"accuracy": 0.9, "loss": 0.4})  # a tie is no win
    got = [
        registry.register(*r, params, tmp_path / "rep", root=tmp_path)["promoted"]
        for r in (a, b, c, d)
    ]
    assert got == [True, False, True, False]


def test_versions_are_tagged(kit, store, tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        "  preprocess:\n    params:\n      params.yaml:\n        data: {source: digits}\n"
        "    outs:\n    - path: data/processed\n      md5: abc123.dir\n"
        "  train:\n    params:\n      params.yaml:\n        train: {epochs: 2}\n"
        "    outs:\n    - path: models/model.pt\n      md5: def456\n"
    )
    run_json, eval_json = candidate(kit, tmp_path / "r", {"accuracy": 0.75})
    params = RegisterParams(model_name="tagged")
    d = registry.register(
        run_json, eval_json, params, tmp_path, data_source="digits", root=tmp_path
    )
    tags = store.get_model_version("tagged", str(d["candidate_version"])).tags
    assert tags["data_source"] == "digits"
    assert tags["dvc.data_md5"] == "data/processed:abc123.dir"
    assert tags["dvc.model_md5"] == "models/model.pt:def456"
    assert len(tags["dvc.params_sha256"]) == 64
    assert float(tags["test_accuracy"]) == 0.75 and float(tags["test_loss"]) == 1.0
    assert tags["git_commit"]  # "unknown" outside a git work tree
    assert tags["run_id"] == json.loads(run_json.read_text())["run_id"]
    assert tags[registry.KIND_TAG] == registry.KIND


def test_register_errors_are_one_line(kit, store, tmp_path):
    params = RegisterParams(model_name="errors")
    eval_json = tmp_path / "evaluate.json"
    eval_json.write_text(json.dumps({"accuracy": 0.9}))

    def fails(run_json, match, p=params, ev=eval_json):
        with pytest.raises(PipelineError, match=match) as e:
            registry.register(run_json, ev, p, tmp_path, root=tmp_path)
        assert "\n" not in str(e.value)

    fails(tmp_path / "missing.json", "missing.json: not found")  # no train run yet
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps({"run_id": "0" * 32}))
    fails(gone, f"run {'0' * 32} not found in the tracking store")
    with mlflow.start_run(
        experiment_id=mlflow.get_experiment_by_name("candidates").experiment_id
    ) as run:
        pass  # a run with no model
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"run_id": run.info.run_id}))
    fails(empty, "has no logged model 'model'")
    run_json, _ = candidate(kit, tmp_path / "ok", {"accuracy": 0.9})
    fails(run_json, "register.metric 'f1'", p=RegisterParams(model_name="errors", metric="f1"))
    # a registered model of the same name made by something else
    store.create_registered_model("foreign")
    fails(
        run_json,
        "register.model_name 'foreign'.*another kind",
        p=RegisterParams(model_name="foreign"),
    )
    # a previous report without history is not silently overwritten
    (tmp_path / "registry.json").write_text("{}")
    fails(run_json, "registry.json: no 'history'")


def test_load_model_errors_name_the_uri(kit, store):
    with pytest.raises(PipelineError, match="models:/nope@champion: cannot load"):
        registry.load_model("models:/nope@champion", kit.root)
    store.create_registered_model("no-champion")
    with pytest.raises(PipelineError, match="models:/no-champion@champion"):
        registry.load_model("models:/no-champion@champion", kit.root)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_pyfunc_takes_raw_images_of_any_size_and_mode(pyfunc):
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    cells = [
        gray8,
        rng.integers(0, 256, (40, 30), dtype=np.uint8),
        rng.integers(0, 256, (50, 50, 3), dtype=np.uint8),
        rng.integers(0, 256, (20, 20, 4), dtype=np.uint8).tolist(),  # RGBA, as nested lists
        base64.b64encode(png(gray8)).decode(),  # an encoded file, as sent over JSON
    ]
    out = pyfunc.predict(pd.DataFrame({"image": cells}))
    assert list(out.columns) == ["label", "probability", "class_index", "probabilities"]
    names = [str(i) for i in range(10)]
    for row in out.itertuples():
        assert list(row.probabilities) == names
        assert sum(row.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        assert row.label == names[row.class_index]
        assert row.probability == max(row.probabilities.values())
    # the same pixels as an array and as a PNG give the same answer
    assert out.probabilities[0] == pytest.approx(out.probabilities[4], abs=1e-6)


def test_pyfunc_takes_a_batch_an_array_list_or_records_as_a_dataframe_would(pyfunc):
    """A uint8 batch (N x H x W, N x H x W x C), a list of arrays of mixed sizes, and
    `{"image": ...}` records give what the same images in a DataFrame give."""
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    mixed = [gray[0], rgb[0], rng.integers(0, 256, (30, 20), dtype=np.uint8)]

    def frame(images) -> pd.DataFrame:
        return pyfunc.predict(pd.DataFrame({"image": list(images)}))

    for batch in (gray, rgb, mixed):
        expected = frame(batch)
        for given in (batch, list(batch), [{"image": im} for im in batch], {"image": list(batch)}):
            out = pyfunc.predict(given)
            assert out["label"].tolist() == expected["label"].tolist(), type(given)
            assert out["probability"].to_numpy() == pytest.approx(expected["probability"])
    assert len(pyfunc.predict(gray[0])) == 1  # one H x W image
    with pytest.raises(MlflowException, match="expected a batch N x H x W"):
        pyfunc.predict(np.zeros((2, 2, 2, 2, 2), np.uint8))
    meta = pyfunc.metadata.metadata
    assert "N x H x W" in meta["input"] and "column 'image'" in meta["input"]


@pytest.mark.parametrize(
    "cell, reason",
    [
        ([[1, 2], [3]], "ragged"),
        ([1, 2, 3], "expected H x W"),
        (np.zeros((4, 4, 5), np.uint8), "expected H x W"),
        ([[0, 300], [0, 0]], "0-255"),
        ([[0.5, 1], [0, 0]], "fractional"),
        ("not base64!", "base64"),
        (base64.b64encode(b"hello, not an image").decode(), "not a readable image"),
        (3, "got int"),
    ],
)
def test_pyfunc_rejects_malformed_input_with_the_reason(pyfunc, cell, reason):
    with pytest.raises(MlflowException, match=reason) as e:
        pyfunc.predict(pd.DataFrame({"image": [cell]}))
    assert e.value.get_http_status_code() == 400
    assert "image[0]" in e.value.message


def test_pyfunc_rejects_a_frame_without_images(pyfunc):
    with pytest.raises(MlflowException, match="image"):
        pyfunc.predict(pd.DataFrame({"pixels": [[[0]]]}))


def test_pyfunc_matches_evaluate_on_raw_test_images(kit, pyfunc):
    ev = evaluate_model(kit.model_pt, kit.processed, batch_size=128, quiet=True)
    images, labels = raw_test_images(kit.params)
    assert np.array_equal(labels, ev.labels)
    out = pyfunc.predict(pd.DataFrame({"image": images}))
    assert np.array_equal(out["class_index"].to_numpy(), ev.preds)
    probs = np.array([list(p.values()) for p in out["probabilities"]])
    np.testing.assert_allclose(probs, ev.probs, atol=1e-5)


def test_the_registered_model_loads_and_predicts_without_unpickling(kit, store, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """Models-from-code: the MLmodel file names the model file, no .pkl, and with every
    unpickler made to raise, the champion still loads from the registry and predicts."""
    import pickle

    import cloudpickle
    import yaml
    from mlflow.artifacts import download_artifacts

    params = RegisterParams(model_name="no-pickle")
    run_json, eval_json = candidate(kit, tmp_path / "c", {"accuracy": 0.9})
    registry.register(run_json, eval_json, params, tmp_path / "reports", root=tmp_path)
    local = download_artifacts(
        artifact_uri="models:/no-pickle@champion", dst_path=str(tmp_path / "m")
    )
    files = sorted(p.name for p in Path(local).rglob("*"))
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    mlmodel = yaml.safe_load((Path(local) / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model", flavor  # run as code
    assert "python_model" not in flavor and "mlflow_model.py" in files, (flavor, files)
    assert ".pkl" not in json.dumps(mlmodel)

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "loads", refuse)
        monkeypatch.setattr(module, "load", refuse)
    model = mlflow.pyfunc.load_model("models:/no-pickle@champion")
    images, labels = raw_test_images(kit.params)
    out = model.predict(pd.DataFrame({"image": [im.tolist() for im in images[:20]]}))
    assert len(out) == 20 and (out["class_index"].to_numpy() == labels[:20]).mean() > 0.5


def test_a_version_logged_as_a_pickle_is_refused_in_one_line(kit, store, tmp_path):
    """A version from before models-from-code (metadata without the format key) is not
    loaded: one line says to retrain and register again."""
    from src.serving import KIND, KIND_TAG

    # not mlflow.set_experiment: that would make "old-format" the process's active experiment
    # for every later test that opens a run
    exp = store.create_experiment("old-format")
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=registry.MODEL_FILE,
            artifacts={"checkpoint": str(kit.model_pt)}, metadata={KIND_TAG: KIND},
            code_paths=[str(registry.MODEL_FILE.parent)], pip_requirements=["mlflow"],
        )  # fmt: skip
    with pytest.raises(PipelineError, match=r"earlier version .* retrain it .* register again"):
        registry.load_model(info.model_uri, kit.root)
