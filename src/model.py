"""The CNN, built from the layer specs in params.yaml (pure torch + the standard library).

A spec list such as::

    [{conv: 32, kernel: 3, padding: same, batch_norm: true},
     {pool: max, size: 2},
     {fc: 128}]

becomes conv/pool blocks (`CNN.features`), an implicit flatten, fc blocks and a final
Dropout + Linear to the class logits (`CNN.head`). Channels and the feature-map size are tracked
through the loop, so the first fc layer's input size is derived, never typed in.

A conv layer may pool its own output: ``{conv: 64, kernel: 3, padding: same, batch_norm: true,
pool: max}`` is conv -> 2x2 max pool (``pool_size``, stride the same) -> batch norm -> activation.
Pooling before the norm and activation runs them on a 4x smaller map: 1.3-1.5x faster training
steps on a CPU than a separate pool layer after them (BENCHMARKS.md, item 2: 1.1-1.2x through the
2-worker pipeline, where the workers' synchronisation takes its share). Without batch norm, max
pooling and a non-decreasing activation give the same network either way; with it, the norm's
statistics are those of the pooled map.

``tta: flip`` (model section) makes an eval-mode forward average the logits of each image and
of its mirror image: test-time augmentation, in the model itself, so that the evaluate stage,
validation during training and the served model give the same predictions. It doubles the cost
of a prediction and is for data whose classes survive a left-right mirror (clothes, not digits).

The size rule for conv and pool layers is ``out = (h + 2p - k) // s + 1`` (the seed's
``h - k + 1`` when p = 0 and s = 1). ``padding: same`` means ``p = k // 2`` and is accepted only for
an odd kernel with stride 1, the one case where a symmetric padding keeps the size exactly; other
cases are rejected with a SpecError rather than silently padded unevenly. ``valid`` means 0.
`shape_table` walks the rule before anything is built and names the layer whose map collapses.

Run ``python -m src.model [--params params.yaml]`` for the per-layer table of the configured spec.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpecError(ValueError):
    """A bad layer spec. str(e) is one line: its place inside the `model` section, then the problem,
    e.g. "layers[2].pool: unknown kind 'median' (expected max, avg, sum)"."""


class SumPool2d(nn.AvgPool2d):
    """Sum pooling: the window sum, i.e. average pooling times the window area (computed directly,
    so without the rounding of dividing by k*k and multiplying back).

    divisor_override=1 makes avg_pool2d divide the window sum by 1; count_include_pad=True makes
    padded zeros part of the window, as they are for average pooling's k*k divisor.
    """

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0) -> None:
        super().__init__(kernel_size, stride, padding, count_include_pad=True, divisor_override=1)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}

POOLS: dict[str, type[nn.Module]] = {
    "max": nn.MaxPool2d,
    # torch's default count_include_pad=True: padded zeros count, so sum == avg * k*k exactly
    "avg": nn.AvgPool2d,
    "sum": SumPool2d,
}

KINDS = ("conv", "pool", "fc")
LAYER_KEYS = {
    "conv": (
        "conv", "kernel", "stride", "padding", "pool", "pool_size", "batch_norm", "activation",
        "dropout",
    ),
    "pool": ("pool", "size", "stride", "padding"),
    "fc": ("fc", "activation", "batch_norm", "dropout"),
}  # fmt: skip
MODEL_KEYS = ("activation", "dropout", "layers", "tta")
# Test-time augmentation: the views whose logits an eval-mode forward averages (training never does).
# flip: each image and its left-right mirror image, for data whose meaning survives the mirror.
TTA = ("none", "flip")


def get_act_layer(name: str) -> nn.Module:
    """An activation module by name (one of ACTIVATIONS); KeyError if unknown."""
    return ACTIVATIONS[name]()


@dataclass
class CNNConfig:
    """Everything needed to rebuild the network; `asdict(cfg)` is stored in checkpoints.

    layers holds the raw specs as written in params.yaml (see the module docstring).
    """

    in_channels: int  # image channels after preprocessing (1 gray, 3 RGB)
    image_size: int  # side of the square input, after resize and pad
    num_classes: int  # logits size; from the data's class names
    layers: list[dict[str, Any]] = field(default_factory=list)
    activation: str = "relu"  # default for conv and fc layers that name none
    dropout: float = 0.0  # before the final classifier
    tta: str = "none"  # eval-mode views averaged (TTA); a checkpoint without it predates it


@dataclass(frozen=True)
class LayerRow:
    """One row of `shape_table`: a layer and the tensor it outputs.

    index is the position in model.layers, or None for the input and the classifier rows;
    kind is "input", "conv", "pool", "fc" or "logits"; out is (h, w, d) (fc rows: (1, 1, units)).
    """

    index: int | None
    kind: str
    desc: str
    out: tuple[int, int, int]
    params: int


# ---------------------------------------------------------------------------------------------
# Parsing and validation


@dataclass(frozen=True)
class _Conv:
    out: int
    kernel: int
    stride: int
    padding: int
    padding_name: str  # as written, for the table
    pool: str | None  # pooling right after the convolution, before batch norm and activation
    pool_size: int  # its window and stride
    batch_norm: bool
    activation: str
    dropout: float


@dataclass(frozen=True)
class _Pool:
    kind: str
    size: int
    stride: int
    padding: int
    padding_name: str


@dataclass(frozen=True)
class _FC:
    units: int
    batch_norm: bool
    activation: str
    dropout: float


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(where: str, v: Any) -> int:
    if not _is_int(v) or v < 1:
        raise SpecError(f"{where}: must be a positive integer (got {v!r})")
    return v


def _rate(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1:
        raise SpecError(f"{where}: must be a number in [0, 1) (got {v!r})")
    return float(v)


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SpecError(f"{where}: must be true or false (got {v!r})")
    return v


def _activation(where: str, v: Any) -> str:
    if v not in ACTIVATIONS:
        raise SpecError(f"{where}: unknown activation {v!r} (expected {', '.join(ACTIVATIONS)})")
    return v


def _padding(where: str, v: Any, kernel: int, stride: int) -> tuple[int, str]:
    """'valid' -> 0; 'same' -> k // 2 (odd kernel, stride 1 only); an int >= 0 as is."""
    if v == "valid":
        return 0, "valid"
    if v == "same":
        if kernel % 2 == 0 or stride != 1:
            raise SpecError(
                f"{where}: 'same' needs an odd kernel and stride 1 (got kernel {kernel}, "
                f"stride {stride}); give an integer padding instead"
            )
        return kernel // 2, f"same ({kernel // 2})"
    if not _is_int(v) or v < 0:
        raise SpecError(f"{where}: must be same, valid or an integer >= 0 (got {v!r})")
    return v, str(v)


def _parse_layer(i: int, raw: Any, default_act: str, seen_fc: bool) -> _Conv | _Pool | _FC:
    at = f"layers[{i}]"
    if not isinstance(raw, Mapping):
        raise SpecError(f"{at}: expected a mapping such as {{conv: 32, kernel: 3}} (got {raw!r})")
    kinds = [k for k in KINDS if k in raw]
    if kinds[:2] == ["conv", "pool"]:
        kinds.remove("pool")  # a conv layer's own pooling (its `pool` key)
    if len(kinds) != 1:
        if kinds:
            got = ", ".join(kinds)
        else:
            got = ("keys " + ", ".join(map(str, raw))) if raw else "an empty mapping"
        raise SpecError(f"{at}: a layer must have exactly one of conv, pool, fc (got {got})")
    kind = kinds[0]
    for key in raw:
        if key not in LAYER_KEYS[kind]:
            raise SpecError(
                f"{at}: unknown key {key!r} for a {kind} layer "
                f"(expected {', '.join(LAYER_KEYS[kind])})"
            )
    if kind != "fc" and seen_fc:
        raise SpecError(f"{at}: {kind} after an fc layer (conv and pool layers must come first)")

    if kind == "pool":
        pool = raw["pool"]
        if pool not in POOLS:
            raise SpecError(f"{at}.pool: unknown kind {pool!r} (expected {', '.join(POOLS)})")
        if "size" not in raw:
            raise SpecError(f"{at}.size: missing (a pool layer needs its window size)")
        size = _pos_int(f"{at}.size", raw["size"])
        stride = _pos_int(f"{at}.stride", raw.get("stride", size))  # default: non-overlapping
        pad, pad_name = _padding(f"{at}.padding", raw.get("padding", 0), size, stride)
        if pad > size // 2:  # torch's pooling rule: more padding gives windows of padding only
            raise SpecError(f"{at}.padding: must be at most size // 2 = {size // 2} (got {pad})")
        return _Pool(pool, size, stride, pad, pad_name)

    act = _activation(f"{at}.activation", raw.get("activation", default_act))
    bn = _bool(f"{at}.batch_norm", raw.get("batch_norm", False))
    drop = _rate(f"{at}.dropout", raw.get("dropout", 0.0))
    if kind == "fc":
        return _FC(_pos_int(f"{at}.fc", raw["fc"]), bn, act, drop)
    out = _pos_int(f"{at}.conv", raw["conv"])
    if "kernel" not in raw:
        raise SpecError(f"{at}.kernel: missing (a conv layer needs its kernel size)")
    kernel = _pos_int(f"{at}.kernel", raw["kernel"])
    stride = _pos_int(f"{at}.stride", raw.get("stride", 1))
    pad, pad_name = _padding(f"{at}.padding", raw.get("padding", 0), kernel, stride)
    pool = raw.get("pool")
    if pool is not None and pool not in POOLS:
        raise SpecError(f"{at}.pool: unknown kind {pool!r} (expected {', '.join(POOLS)})")
    if "pool_size" in raw and pool is None:
        raise SpecError(f"{at}.pool_size: given without pool (max, avg or sum)")
    pool_size = _pos_int(f"{at}.pool_size", raw.get("pool_size", 2))
    return _Conv(out, kernel, stride, pad, pad_name, pool, pool_size, bn, act, drop)


def _parse_layers(cfg: CNNConfig) -> list[_Conv | _Pool | _FC]:
    """Validate cfg (raising SpecError) and return its typed layer specs."""
    for name in ("in_channels", "image_size", "num_classes"):
        _pos_int(name, getattr(cfg, name))
    default_act = _activation("activation", cfg.activation)
    _rate("dropout", cfg.dropout)
    if cfg.tta not in TTA:
        raise SpecError(f"tta: unknown value {cfg.tta!r} (expected {', '.join(TTA)})")
    if not isinstance(cfg.layers, list) or not cfg.layers:
        raise SpecError(f"layers: must be a non-empty list of layer specs (got {cfg.layers!r})")
    specs: list[_Conv | _Pool | _FC] = []
    for i, raw in enumerate(cfg.layers):
        specs.append(_parse_layer(i, raw, default_act, any(isinstance(s, _FC) for s in specs)))
    return specs


def build_config(
    model_section: Mapping[str, Any], *, in_channels: int, image_size: int, num_classes: int
) -> CNNConfig:
    """Validate params.yaml's `model` section (keys activation, dropout, layers) into a CNNConfig.

    Args:
        model_section: the raw mapping; activation defaults to relu and dropout to 0.
        in_channels, image_size, num_classes: the input and output the data dictates.
    Returns:
        The CNNConfig (layers kept as plain dicts, so it is checkpoint-safe).
    Raises:
        SpecError naming the key at fault. Shapes are checked by `shape_table`.
    """
    for key in model_section:
        if key not in MODEL_KEYS:
            raise SpecError(f"{key}: unknown key (expected {', '.join(MODEL_KEYS)})")
    if "layers" not in model_section:
        raise SpecError("layers: missing (the list of layer specs)")
    layers = model_section["layers"]
    cfg = CNNConfig(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        # copied as plain dicts so later edits of the params do not reach the config
        layers=[dict(copy.deepcopy(x)) if isinstance(x, Mapping) else x for x in layers]
        if isinstance(layers, list)
        else layers,
        activation=model_section.get("activation", "relu"),
        dropout=model_section.get("dropout", 0.0),
        tta=model_section.get("tta", "none"),
    )
    _parse_layers(cfg)
    return cfg


def _out_side(at: str, h: int, w: int, k: int, s: int, p: int, k_name: str) -> tuple[int, int]:
    """The size rule (h + 2p - k) // s + 1; SpecError naming the layer if the map collapses."""
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if oh < 1 or ow < 1:
        raise SpecError(
            f"{at}: feature map collapses to {max(oh, 0)}x{max(ow, 0)} "
            f"(input {h}x{w}, {k_name} {k}, stride {s}, padding {p})"
        )
    return oh, ow


def _describe(spec: _Conv | _Pool | _FC) -> str:
    if isinstance(spec, _Pool):
        return f"{spec.kind} pool {spec.size}x{spec.size}/{spec.stride} pad {spec.padding_name}"
    parts = [
        f"conv {spec.kernel}x{spec.kernel}/{spec.stride} pad {spec.padding_name}"
        if isinstance(spec, _Conv)
        else "fc"
    ]
    if isinstance(spec, _Conv) and spec.pool:
        parts.append(f"{spec.pool} pool {spec.pool_size}x{spec.pool_size}/{spec.pool_size}")
    if spec.batch_norm:
        parts.append("bn")
    parts.append(spec.activation)
    if spec.dropout:
        parts.append(f"dropout {spec.dropout:g}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The network


def _conv_block(spec: _Conv, in_ch: int) -> nn.Sequential:
    # no conv bias before batch norm: BN's shift makes it redundant
    mods: list[nn.Module] = [
        nn.Conv2d(in_ch, spec.out, spec.kernel, spec.stride, spec.padding, bias=not spec.batch_norm)
    ]
    if spec.pool:
        # pooling first: batch norm and the activation then run on a map pool_size^2 times smaller
        mods.append(POOLS[spec.pool](spec.pool_size, spec.pool_size, 0))
    if spec.batch_norm:
        mods.append(nn.BatchNorm2d(spec.out))
    mods.append(get_act_layer(spec.activation))
    if spec.dropout:
        # whole channels: neighbouring pixels are correlated, so element dropout barely regularises
        mods.append(nn.Dropout2d(spec.dropout))
    return nn.Sequential(*mods)


def _pool_block(spec: _Pool) -> nn.Module:
    return POOLS[spec.kind](spec.size, spec.stride, spec.padding)


def _fc_block(spec: _FC, in_features: int) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(in_features, spec.units, bias=not spec.batch_norm)]
    if spec.batch_norm:
        mods.append(nn.BatchNorm1d(spec.units))
    mods.append(get_act_layer(spec.activation))
    if spec.dropout:
        mods.append(nn.Dropout(spec.dropout))
    return nn.Sequential(*mods)


def _walk(cfg: CNNConfig) -> list[tuple[int, _Conv | _Pool | _FC, int, tuple[int, int, int]]]:
    """(index, spec, input size of the block, output (h, w, d)) per layer, by the size rule.

    The input size is the conv/pool input channel count, or an fc layer's flattened input.
    """
    specs = _parse_layers(cfg)
    h = w = cfg.image_size
    d = cfg.in_channels
    flat = False
    steps = []
    for i, spec in enumerate(specs):
        at = f"layers[{i}]"
        if isinstance(spec, _FC):
            n_in = d if flat else h * w * d  # flatten is implicit before the first fc
            flat, h, w, d = True, 1, 1, spec.units
        elif isinstance(spec, _Conv):
            n_in = d
            h, w = _out_side(at, h, w, spec.kernel, spec.stride, spec.padding, "kernel")
            if spec.pool:
                h, w = _out_side(at, h, w, spec.pool_size, spec.pool_size, 0, "pool_size")
            d = spec.out
        else:
            n_in = d
            h, w = _out_side(at, h, w, spec.size, spec.stride, spec.padding, "size")
        steps.append((i, spec, n_in, (h, w, d)))
    return steps


class CNN(nn.Module):
    """The configured CNN: features (conv/pool blocks) -> flatten -> fc blocks -> dropout -> logits.

    Input: float (N, in_channels, image_size, image_size), already normalised. Output: logits
    (N, num_classes). `features[j]` / `fc[j]` are the blocks of the conv/pool / fc specs, in order.
    """

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        features: list[nn.Module] = []
        fcs: list[nn.Module] = []
        prev = 0
        for _, spec, n_in, (h, w, d) in _walk(cfg):
            if isinstance(spec, _Conv):
                features.append(_conv_block(spec, n_in))
            elif isinstance(spec, _Pool):
                features.append(_pool_block(spec))
            else:
                fcs.append(_fc_block(spec, n_in))
            prev = h * w * d  # the flattened size of what this layer outputs
        self.features = nn.Sequential(*features)
        self.fc = nn.Sequential(*fcs)
        self.head_drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(prev, cfg.num_classes)  # logits: no activation after it

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the last conv/pool feature map (N, D, h, w)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (N, num_classes); with pre_logits, the classifier's input."""
        x = self.head_drop(self.fc(torch.flatten(x, 1)))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float -> logits (N, num_classes).

        In eval mode with cfg.tta "flip", the logits are the mean of those of each image and of
        its mirror image (one forward pass over both), so evaluation, validation and serving all
        see the same predictions; training steps never average.
        """
        if self.training or self.cfg.tta == "none":
            return self.forward_head(self.forward_features(x))
        logits = self.forward_head(self.forward_features(torch.cat([x, x.flip(3)])))
        return (logits[: len(x)] + logits[len(x) :]) / 2

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, num_classes), softmax of the logits. Call .eval() first."""
        return F.softmax(self(x), dim=1)


def shape_table(cfg: CNNConfig) -> list[LayerRow]:
    """Walk the spec with the size rule: one LayerRow for the input, each layer, and the logits.

    Raises SpecError naming the first layer whose feature map collapses (or any bad spec).
    Parameter counts come from the real blocks, built on the meta device (no memory used).
    """
    rows = [LayerRow(None, "input", "", (cfg.image_size, cfg.image_size, cfg.in_channels), 0)]
    with torch.device("meta"):
        for i, spec, n_in, out in _walk(cfg):
            if isinstance(spec, _Conv):
                kind, block = "conv", _conv_block(spec, n_in)
            elif isinstance(spec, _Pool):
                kind, block = "pool", _pool_block(spec)
            else:
                kind, block = "fc", _fc_block(spec, n_in)
            n = sum(p.numel() for p in block.parameters())
            rows.append(LayerRow(i, kind, _describe(spec), out, n))
        h, w, d = rows[-1].out
        head = nn.Linear(h * w * d, cfg.num_classes)
        n = sum(p.numel() for p in head.parameters())
    desc = f"dropout {cfg.dropout:g}, linear" if cfg.dropout else "linear"
    if cfg.tta != "none":
        desc += f" (eval: tta {cfg.tta})"
    rows.append(LayerRow(None, "logits", desc, (1, 1, cfg.num_classes), n))
    return rows


def format_table(rows: list[LayerRow]) -> str:
    """The rows of `shape_table` as a text table, with the total parameter count last."""
    lines = [("layer", "kind", "output h x w x d", "params")]
    for r in rows:
        name = str(r.index) if r.index is not None else r.kind
        lines.append((name, r.desc, " x ".join(map(str, r.out)), f"{r.params:,}"))
    lines.append(("total", "", "", f"{sum(r.params for r in rows):,}"))
    widths = [max(len(line[c]) for line in lines) for c in range(4)]
    out = []
    for j, line in enumerate(lines):
        out.append(
            f"{line[0]:<{widths[0]}}  {line[1]:<{widths[1]}}  "
            f"{line[2]:>{widths[2]}}  {line[3]:>{widths[3]}}".rstrip()
        )
        if j == 0 or j == len(lines) - 2:
            out.append("-" * (sum(widths) + 6))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _unwrap(model: nn.Module) -> CNN:
    """The CNN inside a DDP (`.module`) or torch.compile (`._orig_mod`) wrapper."""
    while not isinstance(model, CNN):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a CNN (or a wrapper of one), got {type(model).__name__}")
        model = inner
    return model


def _check_plain(where: str, value: Any) -> None:
    """TypeError naming the first value that torch.load(weights_only=True) would refuse."""
    if value is None or type(value) in (bool, int, float, str):
        return
    if type(value) in (list, tuple):
        for j, v in enumerate(value):
            _check_plain(f"{where}[{j}]", v)
        return
    if type(value) is dict:
        for k, v in value.items():
            _check_plain(where, k)
            _check_plain(f"{where}[{k!r}]", v)
        return
    raise TypeError(
        f"{where}: {type(value).__module__}.{type(value).__qualname__} is not plain python "
        "(convert it, e.g. .tolist() / float(); weights_only loading would refuse it)"
    )


def save_checkpoint(path: str | os.PathLike, model: nn.Module, extra: dict[str, Any]) -> None:
    """Write {"model_config", "state_dict", "extra"} to `path` with torch.save, atomically.

    Args:
        path: the file; its folder is created. It appears only once fully written.
        model: a CNN, possibly wrapped by DDP or torch.compile.
        extra: plain python only (dict/list/str/int/float/bool/None), so that it loads with
            weights_only=True: class names, normalisation, preprocessing.
    Raises:
        TypeError naming the first value of extra that is not plain python (e.g. a numpy float).
    """
    net = _unwrap(model)
    _check_plain("extra", extra)  # fail now, not when evaluate or the registry loads the file
    payload = {
        "model_config": asdict(net.cfg),
        # cpu + contiguous: loads anywhere, whatever device or memory format training used
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        "extra": extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[CNN, dict[str, Any]]:
    """Rebuild the model saved by `save_checkpoint` (torch.load with weights_only=True).

    Returns:
        (model in eval mode on map_location, extra).
    Raises:
        FileNotFoundError if missing; ValueError (one line, naming the file) if it is not such a
        checkpoint; SpecError if its stored config is invalid.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(payload, dict) or not {"model_config", "state_dict"} <= payload.keys():
        raise ValueError(f"{path}: not a model checkpoint (no model_config / state_dict)")
    model = CNN(CNNConfig(**payload["model_config"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the stored model_config ({e})") from None
    model.to(map_location).eval()
    return model, payload.get("extra", {})


# ---------------------------------------------------------------------------------------------
# `python -m src.model` prints the configured network's table: the CLI is src.summary, which
# reads params.yaml (this module stays torch-only; src.config imports it, never the reverse).

if __name__ == "__main__":
    from src.summary import cli

    cli()
