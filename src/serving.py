"""The pipeline's MLflow pyfunc: raw images in, class probabilities out.

`ImageClassifier` carries `model.pt` as an artifact and applies the test-split preprocessing
itself, so `mlflow models serve` and `src.predict` take raw images. It is logged as
models-from-code: `src/mlflow_model.py` (which calls `mlflow.models.set_model`) is stored with the
model and run at load time, so loading unpickles nothing, and the weights load with
`torch.load(weights_only=True)`.

Input (a pandas DataFrame, or any JSON form MLflow's scoring server turns into one): one column
``image``; each cell is either
  * a nested list / uint8 array of pixels, H x W (grayscale) or H x W x 3 (RGB; H x W x 1 and
    H x W x 4 with alpha are accepted too), integers 0-255, any size, or
  * a base64 string (or bytes) of an encoded image file: PNG, JPEG, BMP, ...
Output: a DataFrame, one row per image: ``label`` (predicted class name), ``probability`` (its
probability), ``class_index``, ``probabilities`` ({class name: probability} over every class).

Malformed input raises MlflowException(INVALID_PARAMETER_VALUE): the scoring server answers
HTTP 400 with the reason instead of a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from src.errors import PipelineError

CHECKPOINT_KEY = "checkpoint"  # the pyfunc artifact holding model.pt
KIND_TAG = "cnn_pipeline.kind"  # set on our registered models and versions, to tell them apart
KIND = "image-classifier-pyfunc/1"
# How the model is stored: models-from-code (MODEL_FILE runs at load; nothing is unpickled).
# Versions logged before it have no such key: their Python object is a cloudpickle.
FORMAT_TAG, FORMAT = "cnn_pipeline.format", "models-from-code/1"
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
    """The images of whatever reaches predict, one cell each: a DataFrame (or a dict, as the
    scoring server's `inputs` JSON gives it) with an ``image`` column; a uint8 batch N x H x W
    or N x H x W x C; a list of arrays (mixed sizes allowed) or of ``{"image": ...}`` records
    (the `instances` JSON)."""
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            cols = ", ".join(map(str, model_input.columns))
            raise ValueError(f"expected a column 'image', got columns [{cols}]")
        return list(model_input["image"])
    if isinstance(model_input, dict):
        if set(model_input) != {"image"}:
            keys = ", ".join(map(str, model_input))
            raise ValueError(f"expected one input named 'image', got [{keys}]")
        model_input = model_input["image"]
        if isinstance(model_input, (str, bytes)):
            return [model_input]
    if isinstance(model_input, np.ndarray):
        if model_input.dtype == object or model_input.ndim in (3, 4):
            return list(model_input)  # a batch: N x H x W (gray) or N x H x W x C
        if model_input.ndim == 2:
            return [model_input]  # one gray image
        raise ValueError(
            f"expected a batch N x H x W or N x H x W x C, got shape "
            f"{'x'.join(map(str, model_input.shape))}"
        )
    if isinstance(model_input, (list, tuple)):
        return [c["image"] if isinstance(c, dict) and "image" in c else c for c in model_input]
    raise ValueError(
        f"expected a DataFrame with a column 'image', an image batch or a list of images, got "
        f"{type(model_input).__name__}"
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


# What predict accepts, recorded in the model's metadata: an MLflow input schema cannot say
# "a DataFrame column, or a batch, or a list of images of mixed sizes", and one that says less
# would make MLflow refuse the rest before predict sees it.
INPUT_FORMS = (
    "a DataFrame (or JSON dataframe_split / dataframe_records / inputs) with a column 'image'; "
    "a uint8 batch N x H x W or N x H x W x C (JSON instances); a list of arrays of any sizes. "
    "Each image: pixels H x W (gray) or H x W x 3 (RGB), 0-255, or a base64 image file."
)


def signature():
    """The model's signature: its output columns. Its inputs are INPUT_FORMS (no input schema:
    predict validates each image itself and answers HTTP 400 with the reason)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    outputs = Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "probability"),
            ColSpec(DataType.long, "class_index"),
            ColSpec(Map(DataType.double), "probabilities"),
        ]
    )
    return ModelSignature(inputs=None, outputs=outputs)
