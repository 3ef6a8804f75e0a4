"""The MLflow model of this pipeline, and the register stage's promotion rule.

The logged model is an MLflow pyfunc (`ImageClassifier`) that carries `model.pt` and applies the
test-split preprocessing itself, so `mlflow models serve` and `src.predict` take raw images.

Input (a pandas DataFrame, or any JSON form MLflow's scoring server turns into one): one column
``image``; each cell is either
  * a nested list / uint8 array of pixels, H x W (grayscale) or H x W x 3 (RGB; H x W x 1 and
    H x W x 4 with alpha are accepted too), integers 0-255, any size, or
  * a base64 string (or bytes) of an encoded image file: PNG, JPEG, BMP, ...
Output: a DataFrame, one row per image: ``label`` (predicted class name), ``probability`` (its
probability), ``class_index``, ``probabilities`` ({class name: probability} over every class).

    curl -s http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' \
      -d '{"dataframe_split": {"columns": ["image"], "data": [["'"$(base64 -w0 digit.png)"'"]]}}'

Malformed input raises MlflowException(INVALID_PARAMETER_VALUE): the scoring server answers
HTTP 400 with the reason instead of a 500.

Registering (`register`): once per training run, alias ``challenger`` on that version, alias
``champion`` moved only when the candidate beats the champion's test metric by ``min_delta``.
Only this module and `src/tracking.py` import mlflow.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from src import tracking
from src.errors import PipelineError
from src.files import read_json, write_json

MODEL_ARTIFACT = "model"  # the name the train stage logs the pyfunc under in its run
CHECKPOINT_KEY = "checkpoint"  # the pyfunc artifact holding model.pt
KIND_TAG = "cnn_pipeline.kind"  # set on our registered models and versions, to tell them apart
KIND = "image-classifier-pyfunc/1"
CHAMPION, CHALLENGER = "champion", "challenger"
MAX_IMAGE_PIXELS = 40_000_000  # larger inputs are refused before decoding (decompression bombs)
PREDICT_BATCH = 256  # images per forward pass: bounds the memory one request holds

# What serving needs, as ranges: the exact pins MLflow infers (torch==2.13.0) resolve to a CUDA
# build elsewhere, and inferring them costs ~5 s per log_model (see FINDINGS.md).
SERVING_REQUIREMENTS = [
    f"mlflow>={mlflow.__version__.split('.')[0]}.0",
    "torch>=2.4",
    "numpy>=1.26",
    "pandas>=2.0",
    "albumentations>=2.0,<2.1",
    "opencv-python-headless>=4.9",
    "pillow>=10.0",
    "pydantic>=2.6",
    "pyyaml>=6.0",
]


# ---------------------------------------------------------------------------------------------
# Raw images in, probabilities out
# ---------------------------------------------------------------------------------------------


def decode_image(blob: bytes, name: str, channels: int) -> np.ndarray:
    """Decode an encoded image file (PNG, JPEG, ...) into uint8 pixels in `channels` (1 or 3).

    Decoding and channel conversion are `src.data`'s, so served images match the training data.
    Raises ValueError with a one-line message starting with `name` when `blob` is not an image.
    """
    from src.data import decode_image as decode_file

    try:
        return decode_file(io.BytesIO(blob), channels, 1, MAX_IMAGE_PIXELS)
    except PipelineError as e:
        # its message starts with the file object's repr: name the request's image instead
        reason = str(e).split(": ", 1)[-1]
        raise ValueError(f"{name}: {reason}") from None


def to_pixels(value: Any, name: str, channels: int) -> np.ndarray:
    """One input cell as uint8 pixels H x W or H x W x 1|2|3|4 (converted later by
    `prepare_images`), or, for a base64 string / bytes of an image file, decoded to `channels`.

    Raises ValueError naming `name` on anything else (ragged lists, floats, values > 255, ...).
    """
    if isinstance(value, str):
        try:
            blob = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"{name}: a string must be a base64-encoded image file (PNG, JPEG, ...)"
            ) from None
        return decode_image(blob, name, channels)
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value), name, channels)
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise ValueError(
            f"{name}: expected a nested list of pixels or a base64 image file, "
            f"got {type(value).__name__}"
        )
    try:
        arr = np.asarray(value)
        if arr.dtype == object:
            # pandas and JSON parsing can leave nested lists as arrays of arrays
            arr = np.asarray(arr.tolist())
    except ValueError:
        raise ValueError(f"{name}: ragged pixel array (rows of different lengths)") from None
    shape = "x".join(map(str, arr.shape))
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2, 3, 4))):
        raise ValueError(f"{name}: expected H x W (gray) or H x W x 3 (RGB) pixels, got {shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty image ({shape})")
    if arr.shape[0] * arr.shape[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name}: image too large ({shape}, over {MAX_IMAGE_PIXELS} pixels)")
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: pixels must be integers 0-255, got {arr.dtype} values")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise ValueError(f"{name}: pixels must be integers 0-255, got fractional values")
    if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(
            f"{name}: pixels must be integers 0-255, got values {arr.min()}..{arr.max()}"
        )
    return arr.astype(np.uint8, copy=False)


def _cells(model_input: Any) -> list[Any]:
    """The `image` cells of whatever MLflow hands to predict."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            cols = ", ".join(map(str, model_input.columns))
            raise ValueError(f"expected a column 'image', got columns [{cols}]")
        return list(model_input["image"])
    if isinstance(model_input, dict) and "image" in model_input:
        cells = model_input["image"]
        return list(cells) if isinstance(cells, (list, tuple)) else [cells]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise ValueError(
        f"expected a DataFrame with a column 'image', got {type(model_input).__name__}"
    )


def _invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE maps to HTTP 400 in the scoring server, with `message` in the body
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Raw images -> class probabilities, with the test-split preprocessing built in.

    The instance holds nothing when pickled: `load_context` rebuilds the network from the
    `checkpoint` artifact (weights only) and reads the preprocessing from its `extra`.
    """

    def load_context(self, context) -> None:
        """Load the checkpoint named by the `checkpoint` artifact."""
        from src.model import load_checkpoint

        self.model, self.extra = load_checkpoint(context.artifacts[CHECKPOINT_KEY])
        self.model.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Classify each image of `model_input` (see the module docstring for the format)."""
        try:
            cells = _cells(model_input)
            if not cells:
                raise ValueError("no images in the request")
            channels = int(self.extra["channels"])
            images = [to_pixels(c, f"image[{i}]", channels) for i, c in enumerate(cells)]
            probs = classify(self.model, self.extra, images)
        except (ValueError, PipelineError) as e:
            raise _invalid(str(e)) from None
        return probabilities_frame(probs, self.extra["class_names"])


def classify(model, extra: dict[str, Any], images: list[np.ndarray]) -> np.ndarray:
    """Class probabilities (N, num_classes) of raw uint8 images, preprocessed like the test split."""
    from src.evaluate import predict_logits
    from src.transforms import prepare_images

    out = []
    for start in range(0, len(images), PREDICT_BATCH):
        batch = prepare_images(
            images[start : start + PREDICT_BATCH], extra["preprocess"], extra["channels"]
        )
        logits = predict_logits(model, batch, extra["mean"], extra["std"], PREDICT_BATCH)
        out.append(softmax(logits))
    return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (rows sum to 1 to within 1e-12)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def probabilities_frame(probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """The pyfunc's output rows: label, probability, class_index, probabilities by class name."""
    idx = probs.argmax(axis=1)
    return pd.DataFrame(
        {
            "label": [class_names[i] for i in idx],
            "probability": [float(p[i]) for p, i in zip(probs, idx, strict=True)],
            "class_index": idx.astype(np.int64),
            "probabilities": [
                {name: float(v) for name, v in zip(class_names, p, strict=True)} for p in probs
            ],
        }
    )


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Map, Schema

    inputs = Schema([ColSpec(AnyType(), "image")])  # pixels (nested list) or base64 image file
    outputs = Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "probability"),
            ColSpec(DataType.long, "class_index"),
            ColSpec(Map(DataType.double), "probabilities"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_pyfunc_model(checkpoint_path: str | os.PathLike, name: str = MODEL_ARTIFACT) -> str:
    """Log `checkpoint_path` as this pipeline's pyfunc model inside the active MLflow run.

    Args:
        checkpoint_path: a `model.pt` written by `src.model.save_checkpoint` (its `extra` holds
            class names, normalisation and the preprocessing).
        name: the model's name in the run (the register stage looks for "model").
    Returns:
        The logged model's URI (``models:/<model_id>``).
    """
    from src.model import load_checkpoint

    checkpoint_path = Path(checkpoint_path)
    _, extra = load_checkpoint(checkpoint_path)
    side = int(extra["image_size"])
    shape = (side, side) if int(extra["channels"]) == 1 else (side, side, 3)
    example = pd.DataFrame({"image": [np.zeros(shape, dtype=np.uint8).tolist()]})
    src_dir = Path(__file__).resolve().parent
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=ImageClassifier(),
        artifacts={CHECKPOINT_KEY: str(checkpoint_path)},
        code_paths=[str(src_dir)],  # the served model imports src.model / src.preprocess
        pip_requirements=SERVING_REQUIREMENTS,
        signature=_signature(),
        input_example=example,
        metadata={
            KIND_TAG: KIND,
            "class_names": list(extra["class_names"]),
            "channels": int(extra["channels"]),
        },
    )
    return info.model_uri


def load_model(model_uri: str, root: str | os.PathLike | None = None):
    """Load a registered or logged pyfunc (e.g. ``models:/cnn@champion``) from the project's store.

    Args:
        model_uri: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, ...
        root: the project folder whose mlflow.db to use when MLFLOW_TRACKING_URI is unset.
    Returns:
        The mlflow PyFuncModel; its ``metadata.metadata`` holds class_names and channels.
    Raises PipelineError naming `model_uri` when the model, version or alias does not exist,
    or when it is not this pipeline's image classifier.
    """
    from mlflow.models import get_model_info

    uri = tracking.setup(root)
    try:
        # The kind is read from the MLmodel file first: a pyfunc's Python object is unpickled
        # on load, so a model this pipeline did not log is refused before it is loaded.
        meta = get_model_info(model_uri).metadata or {}
        if meta.get(KIND_TAG) != KIND:
            raise PipelineError(f"{model_uri}: not an image classifier logged by this pipeline")
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        first = str(e.message).splitlines()[0] if e.message else e.error_code
        raise PipelineError(
            f"{model_uri}: cannot load the model from {tracking.redacted(uri)} ({first})"
        ) from None


# ---------------------------------------------------------------------------------------------
# The register stage
# ---------------------------------------------------------------------------------------------


def _lock_tags(lock_file: Path) -> dict[str, str]:
    """dvc.lock's hashes: the preprocess outputs (the data), the model, and the params of the
    stages that made the model (a sha256 over their recorded values)."""
    import yaml

    if not lock_file.exists():
        return {"dvc.lock": "absent"}
    try:
        stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {"dvc.lock": "unreadable"}
    tags: dict[str, str] = {}
    for stage, key, suffix in (
        ("preprocess", "dvc.data_md5", ""),
        ("train", "dvc.model_md5", ".pt"),
    ):
        outs = (stages.get(stage) or {}).get("outs", [])
        hashes = [
            f"{o.get('path')}:{o.get('md5')}"
            for o in outs
            if o.get("md5") and str(o.get("path", "")).endswith(suffix)
        ]
        if hashes:
            tags[key] = ",".join(hashes)
    params = {
        stage: stages[stage].get("params", {})
        for stage in ("preprocess", "train", "evaluate")
        if stage in stages
    }
    if params:
        blob = json.dumps(params, sort_keys=True, default=str).encode()
        tags["dvc.params_sha256"] = hashlib.sha256(blob).hexdigest()
    return tags


def _test_metrics(evaluate_json: Path) -> dict[str, float]:
    """The scalar test metrics of evaluate.json (per-class tables left out)."""
    metrics = read_json(evaluate_json, "test metrics of the evaluate stage")
    if not isinstance(metrics, dict):
        raise PipelineError(f"{evaluate_json}: expected a JSON object of metrics")
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def beats(candidate: float, champion: float, mode: str, min_delta: float) -> bool:
    """Whether `candidate` improves on `champion` by at least `min_delta` (and strictly)."""
    gain = candidate - champion if mode == "max" else champion - candidate
    return gain > 0 and gain >= min_delta - 1e-12


def _find_or_create_registered_model(client, name: str) -> None:
    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        tracking.with_retry(
            client.create_registered_model,
            name,
            tags={KIND_TAG: KIND},
            description="CNN image classifier (cnn-pipeline)",
        )
        return
    if rm.tags.get(KIND_TAG) != KIND:
        raise PipelineError(
            f"register.model_name '{name}': the MLflow registered model exists but holds another "
            f"kind of model (no {KIND_TAG}={KIND} tag); choose another register.model_name"
        )


def _run_model_uri(client, run_id: str, run_file: Path) -> str:
    """The URI of the run's logged pyfunc; PipelineError when the run or its model is missing."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise PipelineError(
            f"{run_file}: run {run_id} not found in the tracking store "
            f"{tracking.redacted(mlflow.get_tracking_uri())}; run the train stage first"
        ) from None
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_ARTIFACT}'",
        output_format="list",
    )
    if not models:
        raise PipelineError(
            f"{run_file}: run {run_id} has no logged model '{MODEL_ARTIFACT}'; "
            "run the train stage first"
        )
    model = models[0]
    if not _has_kind(model.model_uri):
        raise PipelineError(
            f"{run_file}: the model of run {run_id} is not this pipeline's image classifier"
        )
    return model.model_uri


def _has_kind(model_uri: str) -> bool:
    from mlflow.models import get_model_info

    try:
        return (get_model_info(model_uri).metadata or {}).get(KIND_TAG) == KIND
    except (MlflowException, OSError):
        return False


def register(
    run_file: str | os.PathLike,
    evaluate_json: str | os.PathLike,
    register_params,
    reports_dir: str | os.PathLike,
    *,
    data_source: str = "unknown",
    root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Register the train run's model, set `challenger`, move `champion` if it wins.

    Args:
        run_file: models/run.json of the train stage (its run_id).
        evaluate_json: metrics/evaluate.json (the test metrics; `register_params.metric` decides).
        register_params: `params.register` (model_name, metric, mode, min_delta).
        reports_dir: where registry.json goes: {"decision": <this one>, "history": [every one]}.
        data_source: tagged on the version (params data.source).
        root: the project folder (dvc.lock, git, the default MLflow store); default the cwd.
    Returns:
        The decision: candidate version and metric, champion's, promoted or not, and why.
    Idempotent per run: a run already registered gets its existing version back, no duplicate.
    """
    from mlflow.tracking import MlflowClient

    root = Path(root or Path.cwd()).resolve()
    run_file, evaluate_json = Path(run_file), Path(evaluate_json)
    report = Path(reports_dir) / "registry.json"
    name, metric = register_params.model_name, register_params.metric
    mode, min_delta = register_params.mode, float(register_params.min_delta)

    run_id = tracking.read_run_file(run_file)["run_id"]
    metrics = _test_metrics(evaluate_json)
    if metric not in metrics:
        raise PipelineError(
            f"register.metric '{metric}': not in {evaluate_json} "
            f"(has {', '.join(sorted(metrics)) or 'no scalar metrics'})"
        )
    value = metrics[metric]
    history = _read_history(report)  # before any change: a broken report stops us early

    tracking.setup(root)
    client = MlflowClient()
    source_uri = _run_model_uri(client, run_id, run_file)
    _find_or_create_registered_model(client, name)

    existing = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if existing:
        version = min(existing, key=lambda v: int(v.version))
        created = False
    else:
        version = tracking.with_retry(mlflow.register_model, source_uri, name)
        created = True
    tags = {
        KIND_TAG: KIND,
        "run_id": run_id,
        "git_commit": tracking.git_commit(root),
        "data_source": data_source,
        **_lock_tags(root / "dvc.lock"),
        **{f"test_{k}": repr(v) for k, v in metrics.items()},
    }
    for key, tag_value in tags.items():
        tracking.with_retry(
            client.set_model_version_tag, name, version.version, key, str(tag_value)
        )
    tracking.with_retry(client.set_registered_model_alias, name, CHALLENGER, version.version)

    champion = _alias_version(client, name, CHAMPION)
    champion_value = None
    if champion is not None:
        raw = champion.tags.get(f"test_{metric}")
        champion_value = float(raw) if raw is not None else None
    if champion is None:
        promoted, why = True, "no champion yet"
    elif champion.version == version.version:
        promoted, why = False, f"version {version.version} is already the champion"
    elif champion_value is None or math.isnan(champion_value):
        promoted = True
        why = f"champion version {champion.version} has no test_{metric} tag"
    elif beats(value, champion_value, mode, min_delta):
        promoted = True
        why = (
            f"{metric} {value:.6g} beats the champion's {champion_value:.6g} "
            f"by at least min_delta {min_delta:g} ({mode})"
        )
    else:
        promoted = False
        why = (
            f"{metric} {value:.6g} does not beat the champion's {champion_value:.6g} "
            f"by min_delta {min_delta:g} ({mode})"
        )
    if promoted:
        tracking.with_retry(client.set_registered_model_alias, name, CHAMPION, version.version)

    decision = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model_name": name,
        "run_id": run_id,
        "candidate_version": int(version.version),
        "new_version": created,
        "metric": metric,
        "mode": mode,
        "min_delta": min_delta,
        "candidate_value": value,
        "champion_version": int(champion.version) if champion is not None else None,
        "champion_value": champion_value,
        "promoted": promoted,
        "reason": why,
        "champion_after": int(version.version if promoted else champion.version),
    }
    write_json(report, {"decision": decision, "history": [*history, decision]})
    return decision


def _alias_version(client, name: str, alias: str):
    """The version carrying `alias`, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _read_history(report: Path) -> list[dict[str, Any]]:
    """Earlier decisions from the previous registry.json (kept by `persist: true` in dvc.yaml)."""
    if not report.exists():
        return []
    previous = read_json(report, "the register stage's decision history")
    history = previous.get("history") if isinstance(previous, dict) else None
    if not isinstance(history, list):
        raise PipelineError(
            f"{report}: no 'history' list in it; move the file aside to start a new history"
        )
    return history
