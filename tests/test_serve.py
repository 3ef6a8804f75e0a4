"""The registered champion over HTTP (`mlflow models serve`) and through `python -m src.predict`."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import REPO, project_env
from evalkit import get_kit, raw_test_images
from PIL import Image
from servers import model_server

from src import registry
from src.config import RegisterParams

NAME = "served"
URI = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """The kit's run registered as `served`, with @champion on it."""
    kit = get_kit(tmp_path_factory)
    folder = tmp_path_factory.mktemp("serve")
    eval_json = folder / "evaluate.json"
    eval_json.write_text(json.dumps({"accuracy": 0.9, "macro_f1": 0.9, "loss": 0.3}))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = kit.tracking_uri
    try:
        d = registry.register(kit.run_json, eval_json, RegisterParams(model_name=NAME), folder)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert d["champion_after"] == d["candidate_version"]
    return kit


@pytest.fixture(scope="module")
def digits(champion):
    """A few raw test digits (8x8 uint8) and what the in-process pyfunc says about them."""
    images, _ = raw_test_images(champion.params)
    images = images[:6]
    model = registry.load_model(URI, champion.root)
    return images, model.predict(pd.DataFrame({"image": images}))


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """The champion served from the project's own environment."""
    env = project_env(MLFLOW_TRACKING_URI=champion.tracking_uri)
    folder = tmp_path_factory.mktemp("srv")
    with model_server(Path(sys.executable).parent / "mlflow", env, folder, URI) as url:
        yield url


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_model_serves_from_an_environment_of_its_own_requirements_only(
    champion, digits, tmp_path
):
    """A fresh virtual environment built from the model artifact's requirements.txt alone (pip
    reaches the package registry; the torch build comes from constraints.txt, as `make install`
    takes it): no project install, no Ray, DVC or DVCLive, a CPU torch; `mlflow models serve`
    from it answers real images as the in-process model does."""
    from mlflow.artifacts import download_artifacts

    images, expected = digits
    env = project_env(MLFLOW_TRACKING_URI=champion.tracking_uri)
    model = Path(download_artifacts(artifact_uri=URI, dst_path=str(tmp_path / "model")))
    requirements = model / "requirements.txt"
    wanted = requirements.read_text()
    assert not [n for n in ("ray", "dvc", "dvclive") if re.search(rf"^{n}\b", wanted, re.M)]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    bare = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    bare["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-r", str(requirements), "-c", str(REPO / "constraints.txt")],
        env=bare, capture_output=True, text=True, timeout=1000,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    probe = (
        "import importlib.util as u, torch\n"
        "print(torch.version.cuda, [m for m in ('ray', 'dvc', 'dvclive', 'src') if u.find_spec(m)])"
    )
    shown = subprocess.run([str(python), "-c", probe], env=bare, cwd=tmp_path,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert shown.stdout.split("\n")[0] == "None []", shown.stdout  # CPU torch; none of those

    with model_server(venv / "bin" / "mlflow", bare, tmp_path, URI) as base:
        split = {"dataframe_split": {"columns": ["image"],
                                     "data": [[im.tolist()] for im in images]}}  # fmt: skip
        r = invoke(base, split)
        assert r.status_code == 200, r.text[:2000]
        assert [row["label"] for row in r.json()["predictions"]] == list(expected["label"])
        r = invoke(base, {"instances": [im.tolist() for im in images]})
        assert r.status_code == 200, r.text[:2000]
        assert [row["label"] for row in r.json()["predictions"]] == list(expected["label"])


def invoke(base: str, payload) -> requests.Response:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return requests.post(
        f"{base}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )


@pytest.mark.slow
def test_served_model_classifies_raw_images(server, digits):
    images, expected = digits
    split = {"dataframe_split": {"columns": ["image"], "data": [[im.tolist()] for im in images]}}
    files = [base64.b64encode(png_bytes(im)).decode() for im in images]
    records = {"dataframe_records": [{"image": f} for f in files]}
    for payload in (split, records):
        r = invoke(server, payload)
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        assert [row["label"] for row in rows] == list(expected["label"])
        for row, probs in zip(rows, expected["probabilities"], strict=True):
            assert row["probabilities"] == pytest.approx(probs, abs=1e-6)
            assert sum(row["probabilities"].values()) == pytest.approx(1.0)
            assert row["probability"] == pytest.approx(max(probs.values()), abs=1e-6)
    # any size and mode: a 40x30 gray and a 50x50 RGB image in one request
    mixed = [np.zeros((40, 30), np.uint8).tolist(), np.full((50, 50, 3), 255, np.uint8).tolist()]
    r = invoke(server, {"dataframe_split": {"columns": ["image"], "data": [[m] for m in mixed]}})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 2


@pytest.mark.slow
def test_served_model_takes_mlflows_instances_and_inputs_forms(server, digits):
    """MLflow's tensor-style JSON: `instances` (a batch, or records) and `inputs` (a batch, or
    named columns) give the DataFrame form's answer."""
    images, expected = digits
    batch = [im.tolist() for im in images]
    for payload in (
        {"instances": batch},
        {"instances": [{"image": im} for im in batch]},
        {"inputs": batch},
        {"inputs": {"image": batch}},
    ):
        r = invoke(server, payload)
        assert r.status_code == 200, (payload.keys(), r.text[:500])
        rows = r.json()["predictions"]
        assert [row["label"] for row in rows] == list(expected["label"]), payload.keys()


@pytest.mark.slow
@pytest.mark.parametrize(
    "payload, reason",
    [
        ({"dataframe_split": {"columns": ["image"], "data": [[[[1, 2], [3]]]]}}, "ragged"),
        ({"dataframe_split": {"columns": ["image"], "data": [[[[1, 999]]]]}}, "0-255"),
        ({"dataframe_records": [{"image": "bm90IGFuIGltYWdl"}]}, "not a readable image"),
        ({"dataframe_records": [{"pixels": [[0]]}]}, "image"),
        ("{not json", "JSON"),
    ],
)
def test_served_model_answers_malformed_requests_with_400(server, payload, reason):
    r = invoke(server, payload)
    assert r.status_code == 400, (r.status_code, r.text[:500])
    assert reason in r.json()["message"], r.text[:500]


def predict_cli(champion, *args: str) -> subprocess.CompletedProcess:
    env = project_env(MLFLOW_TRACKING_URI=champion.tracking_uri)
    return subprocess.run(
        [sys.executable, "-m", "src.predict", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_predict_command(champion, digits, tmp_path):
    images, expected = digits
    files = []
    for i, im in enumerate(images[:3]):
        files.append(tmp_path / f"digit{i}.png")
        files[-1].write_bytes(png_bytes(im))
    rgb = tmp_path / "big.jpg"  # another size and mode, as JPEG
    Image.fromarray(np.full((64, 48, 3), 30, np.uint8)).save(rgb)
    r = predict_cli(champion, "--model", URI, *map(str, files), str(rgb))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert [row[0] for row in lines] == [*map(str, files), str(rgb)]
    assert [row[1] for row in lines[:3]] == list(expected["label"][:3])
    for row in lines:
        assert 0.0 <= float(row[2]) <= 1.0


@pytest.mark.slow
def test_predict_errors_are_one_line(champion, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    r = predict_cli(champion, "--model", URI, str(text))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and str(text) in r.stderr, r.stderr
    good = tmp_path / "ok.png"
    good.write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    r = predict_cli(champion, "--model", "models:/missing@champion", str(good))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "models:/missing@champion" in r.stderr, r.stderr
