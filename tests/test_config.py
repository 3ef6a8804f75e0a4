"""src/config.py: the repo's params.yaml is valid; each bad value is one line naming its key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from src.config import Params, load_params, parse_params
from src.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]


def _first_pool(raw: dict) -> int:
    return next(i for i, layer in enumerate(raw["model"]["layers"]) if "pool" in layer)


def error_of(raw: dict) -> str:
    with pytest.raises(PipelineError) as e:
        parse_params(raw)
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params.base.seed == raw["base"]["seed"]
    assert params.train.batch_size % params.train.num_workers == 0
    pre = raw["preprocess"]
    assert params.preprocess.output_size == pre["image_size"] + 2 * pre["pad"]
    assert len(params.model.layers) == len(raw["model"]["layers"])
    assert set(params.flat()) >= {"base.seed", "train.epochs", "model.layers"}


def _set(section: str, key: str, value) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        raw[section][key] = value

    return edit


CASES = [
    # unknown keys: at the top level, in a section, in a layer
    (lambda r: r.update(trian={"epochs": 1}), "params.yaml: trian: unknown key"),
    (_set("train", "epoch", 3), "params.yaml: train.epoch: unknown key"),
    (
        lambda r: r["model"]["layers"][0].update(kernal=3),
        "params.yaml: model.layers[0]: unknown key 'kernal' for a conv layer "
        "(expected conv, kernel, stride, padding, pool, pool_size, batch_norm, activation, "
        "dropout)",
    ),
    (lambda r: r["model"].update(width=2), "params.yaml: model.width: unknown key"),
    # wrong types
    (
        _set("train", "epochs", "five"),
        "params.yaml: train.epochs: input should be a valid integer, "
        "unable to parse string as an integer (got 'five')",
    ),
    (
        _set("train", "lr", "fast"),
        "params.yaml: train.lr: input should be a valid number, "
        "unable to parse string as a number (got 'fast')",
    ),
    (
        _set("train", "channels_last", "maybe"),
        "params.yaml: train.channels_last: input should be a valid boolean, "
        "unable to interpret input (got 'maybe')",
    ),
    (
        lambda r: r.update(train=[1]),
        "params.yaml: train: expected a mapping of keys, got [1]",
    ),
    # zero or negative sizes
    (
        _set("preprocess", "image_size", 0),
        "params.yaml: preprocess.image_size: input should be greater than 0 (got 0)",
    ),
    (
        _set("train", "batch_size", -1),
        "params.yaml: train.batch_size: input should be greater than 0 (got -1)",
    ),
    (
        _set("preprocess", "pad", -2),
        "params.yaml: preprocess.pad: input should be greater than or equal to 0 (got -2)",
    ),
    (
        _set("data", "test_fraction", 1.0),
        "params.yaml: data.test_fraction: input should be less than 1 (got 1.0)",
    ),
    # unknown literal values name the key and the allowed values
    (
        _set("train", "optimizer", "adam2"),
        "params.yaml: train.optimizer: unknown value 'adam2' (expected adamw, sgd)",
    ),
    (
        _set("train", "use_gpu", "maybe"),
        "params.yaml: train.use_gpu: unknown value 'maybe' (expected auto, True, False)",
    ),
    (
        _set("data", "channels", 2),
        "params.yaml: data.channels: unknown value 2 (expected 1, 3)",
    ),
    (
        _set("data", "source", "mnist"),
        "params.yaml: data.source: unknown value 'mnist' (expected digits, idx, imagefolder)",
    ),
    # the model spec (parsed by src.model; prefixed with model.)
    (
        lambda r: r["model"]["layers"][_first_pool(r)].update(pool="median"),
        "params.yaml: model.layers[{pool}].pool: unknown kind 'median' (expected max, avg, sum)",
    ),
    (
        _set("model", "activation", "relux"),
        "params.yaml: model.activation: unknown activation 'relux' "
        "(expected relu, gelu, silu, tanh, sigmoid, leaky_relu, elu)",
    ),
    (
        lambda r: r["model"]["layers"].extend([{"fc": 4}, {"conv": 8, "kernel": 3}]),
        "params.yaml: model.layers[{after}]: conv after an fc layer "
        "(conv and pool layers must come first)",
    ),
    (
        _set("model", "tta", "mirror"),
        "params.yaml: model.tta: unknown value 'mirror' (expected none, flip)",
    ),
    (
        _set("model", "layers", []),
        "params.yaml: model.layers: list should have at least 1 item after validation, not 0 (got [])",
    ),
    # cross-field rules
    (
        _set("train", "batch_size", 127),
        "params.yaml: train.batch_size 127 is not divisible by train.num_workers 2 "
        "(each worker gets batch_size // num_workers)",
    ),
    (_set("data", "source", "idx"), "params.yaml: data.source 'idx' needs data.path (a folder)"),
    (
        _set("data", "source", "imagefolder"),
        "params.yaml: data.source 'imagefolder' needs data.path (a folder)",
    ),
    (lambda r: r.pop("model"), "params.yaml: model: missing key"),
    # keys that once were valid say what became of them
    (
        _set("train", "shared_memory_allreduce", True),
        "params.yaml: train.shared_memory_allreduce: removed: CPU workers sum gradients through "
        "torch.distributed's own backend (gloo); delete the key",
    ),
    (
        _set("train", "storage_path", "elsewhere"),
        "params.yaml: train.storage_path: moved to run.storage_path (the run section: settings "
        "that change no number)",
    ),
    (
        _set("run", "keep_runs", 0),
        "params.yaml: run.keep_runs: input should be greater than 0 (got 0)",
    ),
]


@pytest.mark.parametrize("edit,message", CASES, ids=[m.split(": ")[1] for _, m in CASES])
def test_bad_value_gives_one_line_naming_the_key(raw_params, edit, message):
    # indexes in messages follow the repo's layer order: its first pool, the appended conv
    n = len(raw_params["model"]["layers"])
    expected = message.format(pool=_first_pool(raw_params), after=n + 1)
    raw_params["train"]["num_workers"] = 2  # the divisibility message names it
    edit(raw_params)
    assert error_of(raw_params) == expected


def test_collapsing_spec_names_the_layer_and_size(raw_params):
    raw_params["preprocess"].update(image_size=4, pad=0)
    raw_params["model"]["layers"] = [
        {"conv": 8, "kernel": 3},  # 4 -> 2
        {"pool": "max", "size": 2},  # 2 -> 1
        {"conv": 8, "kernel": 3},  # 1 -> collapses
        {"fc": 16},
    ]
    assert error_of(raw_params) == (
        "params.yaml: model.layers[2]: feature map collapses to 0x0 "
        "(input 1x1, kernel 3, stride 1, padding 0)"
    )


def test_repo_spec_collapses_on_a_tiny_image(raw_params):
    raw_params["preprocess"].update(image_size=2, pad=0)
    message = error_of(raw_params)
    assert message.startswith("params.yaml: model.layers[")
    assert "feature map collapses to 0x0 (input 1x1," in message


def test_source_names_the_file(tmp_path, raw_params):
    raw_params["train"]["optimizer"] = "adam2"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw_params))
    with pytest.raises(PipelineError) as e:
        load_params(path)
    assert str(e.value).startswith(f"{path}: train.optimizer: unknown value 'adam2'")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(PipelineError) as e:
        load_params(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert "\n" not in message


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- base\n- train\n")
    with pytest.raises(PipelineError, match=r": expected a mapping of sections, got list$"):
        load_params(path)
    with pytest.raises(PipelineError, match=r"nope.yaml: params file not found$"):
        load_params(tmp_path / "nope.yaml")
