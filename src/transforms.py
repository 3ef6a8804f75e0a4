"""What is done to each image: albumentations resize, pad and augment, and normalisation.

The transforms of one image, shared by the preprocess stage (over a whole dataset, src.preprocess)
and by everything that must treat new images exactly like the test split: the evaluate stage and
the registered model (`prepare_images` + `normalize`).

albumentations is imported on first use (it takes ~2.5 s), so `normalize` stays cheap for the
stages that only read processed data.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from src.data import to_channels
from src.errors import PipelineError

BORDER_MODES = ("constant", "reflect", "reflect_101", "replicate", "wrap")
# cv2 border mode -> numpy pad mode, for padding a whole chunk at once (same pixels; tested)
_NUMPY_PAD = {
    "constant": "constant",
    "reflect": "reflect",
    "reflect_101": "reflect",
    "replicate": "edge",
    "wrap": "wrap",
}
INTERPOLATIONS = ("nearest", "linear", "cubic", "area", "lanczos4")


def _albumentations():
    """Import albumentations without its online update check (a 2 s timeout offline)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def cv2_border(name: str) -> int:
    """A border mode name (constant, reflect, reflect_101, replicate, wrap) -> the cv2 constant.

    `reflect` mirrors without repeating the edge pixel (cv2's REFLECT_101, numpy's 'reflect').
    """
    import cv2

    table = {
        "constant": cv2.BORDER_CONSTANT,
        "reflect": cv2.BORDER_REFLECT_101,
        "reflect_101": cv2.BORDER_REFLECT_101,
        "replicate": cv2.BORDER_REPLICATE,
        "wrap": cv2.BORDER_WRAP,
    }
    return table[name]


def _cv2_interpolation(name: str) -> int:
    import cv2

    return getattr(cv2, f"INTER_{name.upper()}")


# ---------------------------------------------------------------------------------------------
# Transforms


def preprocess_meta(pre) -> dict[str, Any]:
    """The test-split preprocessing as a plain dict (stored in meta.json and the checkpoint)."""
    return {
        "resize": pre.resize,
        "image_size": pre.image_size,
        "pad": pre.pad,
        "fill": pre.fill,
        "border_mode": pre.border_mode,
    }


def output_side(preprocess: dict[str, Any]) -> int:
    """Side of the square images that `preprocess` produces."""
    return int(preprocess["image_size"]) + 2 * int(preprocess["pad"])


def make_eval_transform(preprocess: dict[str, Any]):
    """The test-split transform: resize (stretch or letterbox) to image_size, then pad.

    Args:
        preprocess: {resize, image_size, pad, fill, border_mode} (see `preprocess_meta`).
    Returns:
        An albumentations Compose mapping an (H, W[, C]) uint8 image of any size to
        (S, S[, C]) with S = image_size + 2 * pad. Downscaling uses area interpolation
        (no aliasing on large photos), upscaling bilinear.
    """
    A = _albumentations()
    size, fill = int(preprocess["image_size"]), preprocess["fill"]
    border = cv2_border(preprocess["border_mode"])
    if preprocess["resize"] == "stretch":
        steps = [_stretch_step(size)]
    elif preprocess["resize"] == "letterbox":
        steps = [
            A.LongestMaxSize(max_size=size, area_for_downscale="image"),
            A.PadIfNeeded(size, size, position="center", border_mode=border, fill=fill),
        ]
    else:
        raise PipelineError(
            f"preprocess.resize: unknown mode {preprocess['resize']!r} (expected stretch, letterbox)"
        )
    if preprocess["pad"]:
        steps.append(A.Pad(padding=int(preprocess["pad"]), border_mode=border, fill=fill))
    return A.Compose(steps)


def _translate_arg(key: str, value: Any, where: str) -> Any:
    """Let params name cv2 constants by word: border_mode: constant, interpolation: linear."""
    if not isinstance(value, str):
        return value
    if key == "border_mode":
        if value not in BORDER_MODES:
            raise PipelineError(
                f"{where}: unknown border mode {value!r} (expected {', '.join(BORDER_MODES)})"
            )
        return cv2_border(value)
    if key in ("interpolation", "mask_interpolation"):
        if value not in INTERPOLATIONS:
            raise PipelineError(
                f"{where}: unknown interpolation {value!r} (expected {', '.join(INTERPOLATIONS)})"
            )
        return _cv2_interpolation(value)
    return value


def _init_error(exc: Exception, cls: type, where: str, params: dict) -> str:
    """One line from albumentations' pydantic validation error, naming the argument."""
    from pydantic import ValidationError

    cause = exc.__cause__ if isinstance(exc.__cause__, ValidationError) else exc
    if isinstance(cause, ValidationError) and cause.errors():
        errors = cause.errors()
        first = errors[0]
        arg = str(first["loc"][0]) if first["loc"] else ""
        if arg in params:
            same = [e for e in errors if e["loc"] and str(e["loc"][0]) == arg]
            # a union type: pydantic reports each member, and the annotation says it better
            if len(same) > 1:
                expected = f"expected {params[arg].annotation}"
            else:
                expected = first["msg"][0].lower() + first["msg"][1:]
            return f"{where}.{arg}: invalid value {first.get('input')!r} for {cls.__name__} ({expected})"
        return f"{where}: {cls.__name__}: {first['msg']}"
    return (
        f"{where}: {cls.__name__}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )


def step_dict(step: Any) -> dict | None:
    """A policy step as {transform, **arguments}, from a dict or a config.AugmentStep."""
    if isinstance(step, dict):
        return step
    if hasattr(step, "transform") and hasattr(step, "kwargs"):
        return {"transform": step.transform, **step.kwargs}
    return None


def _build_steps(steps: Sequence[Any], source: str, where: str) -> list:
    A = _albumentations()
    built = []
    for i, step in enumerate(steps):
        loc = f"{where}[{i}]"
        spec = step_dict(step)
        if not isinstance(spec, dict) or "transform" not in spec:
            raise PipelineError(f"{source}: {loc}: expected a mapping with a 'transform' key")
        name = spec["transform"]
        kwargs = {k: v for k, v in spec.items() if k != "transform"}
        cls = getattr(A, name, None) if isinstance(name, str) and not name.startswith("_") else None
        if not (
            isinstance(cls, type)
            and issubclass(cls, (A.BasicTransform, A.BaseCompose))
            and cls not in (A.Compose, A.ReplayCompose, A.BaseCompose)
        ):
            raise PipelineError(
                f"{source}: {loc}.transform: unknown albumentations transform {name!r}"
            )
        params = {
            k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"
        }
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in kwargs:
            if key not in params and not takes_any:
                raise PipelineError(
                    f"{source}: {loc}.{key}: unknown argument for {name} (it takes {', '.join(params)})"
                )
        kwargs = {k: _translate_arg(k, v, f"{source}: {loc}.{k}") for k, v in kwargs.items()}
        if issubclass(cls, A.BaseCompose):  # OneOf, SomeOf, Sequential...: nested transform lists
            nested = kwargs.get("transforms")
            if not isinstance(nested, list) or not nested:
                raise PipelineError(
                    f"{source}: {loc}.transforms: expected a non-empty list of transforms"
                )
            kwargs["transforms"] = _build_steps(nested, source, f"{loc}.transforms")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                built.append(cls(**kwargs))
            except (ValueError, TypeError) as e:
                raise PipelineError(f"{source}: {_init_error(e, cls, loc, params)}") from None
        for w in caught:
            if "are not valid for transform" in str(w.message):  # albumentations only warns
                raise PipelineError(f"{source}: {loc}: {w.message}")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return built


def build_augment(steps: Sequence[Any], source: str = "params.yaml"):
    """Build the augmentation policy from `preprocess.augment`.

    Args:
        steps: a list of {transform: ClassName, **arguments} (dicts or config.AugmentStep);
            composites (OneOf, SomeOf, Sequential, ...) take a nested `transforms` list.
            border_mode / interpolation may be given by name ("constant", "linear").
        source: the params file, for error messages.
    Returns:
        An albumentations Compose, or None when `steps` is empty. An unknown transform or
        argument, or a bad value, is a PipelineError naming e.g. preprocess.augment[0].rotate.
    """
    if not steps:
        return None
    return _albumentations().Compose(_build_steps(steps, source, "preprocess.augment"))


# ---------------------------------------------------------------------------------------------
# Applying them to chunks


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    return images[..., None] if images.ndim == 3 else images


def _stretch_step(size: int):
    """The stretch resize of the test-split transform (area interpolation when downscaling)."""
    return _albumentations().Resize(size, size, area_for_downscale="image")


def _stretch(images: np.ndarray, size: int) -> np.ndarray:
    """`_stretch_step` over a stack (n, H, W[, C]) through its own `apply`: the same pixels,
    without a Compose call's ~30 us of bookkeeping per image."""
    resize = _stretch_step(size)
    out = np.empty((len(images), size, size, *images.shape[3:]), np.uint8)
    for i, image in enumerate(images):
        out[i] = resize.apply(image)
    return out


def resize_pad(images, transform, preprocess: dict[str, Any]) -> np.ndarray:
    """Apply the test-split transform to a sequence of images -> uint8 (n, S, S, C).

    A stacked array already at image_size needs no resize (an identity for both modes), so it
    is padded in one numpy call: the same pixels as the per-image path, ~20x faster. A stack of
    another size in stretch mode is resized image by image by the Resize step alone (no
    Compose call), then padded the same way (3x faster).
    """
    size, pad = int(preprocess["image_size"]), int(preprocess["pad"])
    stack = isinstance(images, np.ndarray) and images.ndim in (3, 4)
    if stack and images.shape[1:3] != (size, size) and preprocess["resize"] == "stretch":
        images = _stretch(images, size)
    if stack and images.shape[1:3] == (size, size):
        widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
        mode = _NUMPY_PAD[preprocess["border_mode"]]
        extra = {"constant_values": preprocess["fill"]} if mode == "constant" else {}
        return _as_nhwc(np.pad(images, widths, mode=mode, **extra) if pad else np.array(images))
    side = output_side(preprocess)
    out = None
    for i, image in enumerate(images):
        result = transform(image=image)["image"]
        if out is None:
            out = np.empty(
                (len(images), side, side, 1 if result.ndim == 2 else result.shape[2]), np.uint8
            )
        out[i] = result.reshape(out.shape[1:])
    return out


def prepare_images(
    images: Sequence[np.ndarray] | np.ndarray, preprocess: dict[str, Any], channels: int
) -> np.ndarray:
    """Preprocess raw images exactly like the test split.

    Args:
        images: uint8 arrays of any size, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or one
            stacked (N, H, W[, C]) array.
        preprocess: the `preprocess` dict from meta.json (or the checkpoint's extra).
        channels: 1 or 3, the trained model's input channels.
    Returns:
        uint8 (N, S, S, channels), S = image_size + 2 * pad; feed it to `normalize`.
    """
    converted = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        try:
            image = to_channels(image, channels)
        except PipelineError as e:
            raise PipelineError(f"image {i}: {e}") from None
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise PipelineError(f"image {i}: empty image {image.shape}")
        converted.append(image)
    side = output_side(preprocess)
    if not converted:
        return np.empty((0, side, side, channels), np.uint8)
    if len({im.shape for im in converted}) == 1:
        converted = np.stack(converted)  # one shape: the batched path
    return resize_pad(converted, make_eval_transform(preprocess), preprocess)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) with x = (pixel / 255 - mean) / std per channel."""
    scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)
    out = np.asarray(images, dtype=np.float32) * scale - shift
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
