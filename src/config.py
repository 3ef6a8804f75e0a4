"""Typed params: `params.yaml` loads into one validated `Params` object.

Each section is a pydantic model that rejects unknown keys, wrong types and impossible values;
`load_params` turns the first problem into one line naming the key, e.g.
``params.yaml: model.layers[2].pool: unknown kind 'median' (expected max, avg, sum)``.
Stages call `load_params` first, so bad params fail before any heavy work.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from src.errors import PipelineError

PositiveInt = Field(gt=0)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class BaseParams(Section):
    seed: int = Field(42, ge=0)


class PathsParams(Section):
    processed: str = "data/processed"
    models: str = "models"
    metrics: str = "metrics"
    plots: str = "plots"
    reports: str = "reports"


class DataParams(Section):
    source: Literal["digits", "idx", "imagefolder"] = "digits"
    path: str | None = None
    channels: Literal[1, 3] = 1
    test_fraction: float = Field(0.2, gt=0, lt=1)
    min_image_side: int = Field(4, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)

    @model_validator(mode="after")
    def _path_when_needed(self) -> DataParams:
        if self.source in ("idx", "imagefolder") and not self.path:
            raise ValueError(f"data.source '{self.source}' needs data.path (a folder)")
        return self


class AugmentStep(BaseModel):
    """One albumentations transform: `transform` is its class name, the other keys its arguments."""

    model_config = ConfigDict(extra="allow", frozen=True)
    transform: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PreprocessParams(Section):
    image_size: int = Field(28, gt=0)
    resize: Literal["stretch", "letterbox"] = "stretch"
    pad: int = Field(0, ge=0)
    fill: int = Field(0, ge=0, le=255)
    border_mode: Literal["constant", "reflect", "replicate", "wrap"] = "constant"
    augment_copies: int = Field(1, ge=0)
    augment: list[AugmentStep] = []
    workers: int = Field(0, ge=0)
    chunk_size: int = Field(2048, gt=0)

    @property
    def output_size(self) -> int:
        """Side of the square images the preprocess stage writes."""
        return self.image_size + 2 * self.pad


class ModelParams(Section):
    activation: str = "relu"
    dropout: float = Field(0.0, ge=0, lt=1)
    layers: list[dict[str, Any]] = Field(min_length=1)
    tta: str = "none"  # eval-mode views averaged; checked by src/model.py, as activation is


class TrainParams(Section):
    num_workers: int = Field(2, gt=0)
    # one Literal, not Literal["auto"] | bool: a union's error names a member ("use_gpu.literal['auto']")
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: int = Field(1, gt=0)
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(0.003, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # null: every epoch trains on each original and all its augmented copies; k: on each
    # original and k of its copies, taken in turn (fresh views each epoch at the same cost)
    copies_per_epoch: int | None = Field(None, gt=0)
    # auto: bf16 where the worker's device computes it in hardware (GPU, or CPU with AMX /
    # AVX-512 BF16), else fp32
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    channels_last: bool = True

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainParams:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"train.batch_size {self.batch_size} is not divisible by train.num_workers "
                f"{self.num_workers} (each worker gets batch_size // num_workers)"
            )
        return self


class RunParams(Section):
    """How a training is run, kept and tracked: none of it changes a number the run computes, so
    DVC does not track this section (changing it retrains nothing) and the run's identity
    (src.runstore.run_key) leaves it out: raising max_failures still resumes an interrupted run."""

    max_failures: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    # null: every finished run keeps its checkpoints; k: only the k most recently finished do
    keep_runs: int | None = Field(None, gt=0)
    storage_path: str = "ray_results"
    experiment: str = Field("cnn-pipeline", min_length=1)


# Keys that were once valid: a params file that still sets one gets a line that says what became
# of it, instead of a bare "unknown key".
MOVED_KEYS = {
    ("train", k): f"moved to run.{k} (the run section: settings that change no number)"
    for k in RunParams.model_fields
}
REMOVED_KEYS = {
    ("train", "shared_memory_allreduce"): (
        "removed: CPU workers sum gradients through torch.distributed's own backend (gloo); "
        "delete the key"
    ),
}


class EvaluateParams(Section):
    batch_size: int = Field(512, gt=0)
    misclassified: int = Field(36, ge=0)


class RegisterParams(Section):
    model_name: str = Field("cnn", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    metric: str = "accuracy"
    mode: Literal["max", "min"] = "max"
    min_delta: float = Field(0.0, ge=0)


# pydantic warns that the `register` section shadows ABCMeta.register; harmless, and a warning
# line on stderr would break the one-line error output of every stage.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(Section):
    base: BaseParams = BaseParams()
    paths: PathsParams = PathsParams()
    data: DataParams = DataParams()
    preprocess: PreprocessParams = PreprocessParams()
    model: ModelParams
    train: TrainParams = TrainParams()
    run: RunParams = RunParams()
    evaluate: EvaluateParams = EvaluateParams()
    register: RegisterParams = RegisterParams()

    def flat(self) -> dict[str, Any]:
        """Every param as `section.key` -> value (lists and dicts as their YAML-ish repr)."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json").items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("function-after[_path_when_needed()]", "function-after[_batch_divides()]"):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing key"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind.startswith("literal_error"):
        # pydantic says "'adamw' or 'sgd'"; the house style is "(expected adamw, sgd)"
        expected = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"unknown value {err['input']!r} (expected {expected})"
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping of keys, got {err['input']!r}"
    return f"{msg[0].lower() + msg[1:]} (got {err['input']!r})"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise PipelineError with a one-line message naming the key."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    _check_retired(raw, source)
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = _loc(err["loc"])
        msg = _message(err)
        if kind_is_self_named(msg):
            raise PipelineError(f"{source}: {msg}") from None
        raise PipelineError(f"{source}: {where}: {msg}") from None
    _check_model(params, source)
    return params


def _check_retired(raw: dict[str, Any], source: str) -> None:
    """A key that was moved or removed: one line saying where it went."""
    for (section, key), what in {**MOVED_KEYS, **REMOVED_KEYS}.items():
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            raise PipelineError(f"{source}: {section}.{key}: {what}")


def kind_is_self_named(msg: str) -> bool:
    """Cross-field messages already name their keys (e.g. 'train.batch_size ... train.num_workers')."""
    return msg.startswith(("train.", "data.", "model.", "preprocess.", "run."))


def _check_model(params: Params, source: str) -> None:
    """Parse the layer spec and walk the shape rule on the configured input, before any work."""
    from src.model import SpecError, build_config, shape_table

    try:
        cfg = build_config(
            params.model.model_dump(),
            in_channels=params.data.channels,
            image_size=params.preprocess.output_size,
            num_classes=2,  # the class count does not change any shape before the classifier
        )
        shape_table(cfg)
    except SpecError as e:
        raise PipelineError(f"{source}: model.{e}") from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate a params file (the stages' first step)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise PipelineError(f"{path}: not valid YAML: {first}") from None
    return parse_params(raw, source=str(path))
