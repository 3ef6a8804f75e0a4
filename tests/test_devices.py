"""The CUDA-specific decisions, checked on a CPU-only machine: the precision and autocast dtype a
GPU worker picks, the data path that gathers batches on the device, and `use_gpu: auto` against
the cluster's resources. (The GPU itself is measured by bench/gpu.py where one is lent.)"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from src.config import parse_params
from src.errors import PipelineError
from src.loop import DeviceData, autocast_for, resolve_precision
from src.ray_driver import check_resources

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", CUDA) == expected
    assert resolve_precision("fp16", CUDA) == "fp16"  # an explicit choice is kept


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)]
)
def test_the_autocast_a_gpu_worker_enters(precision, dtype):
    """autocast_for builds the context the worker enters on its device (not entered here: this
    torch has no CUDA); fp32 enters none."""
    factory = autocast_for(precision, CUDA)
    if dtype is None:
        assert factory is contextlib.nullcontext
        return
    ctx = factory()
    assert isinstance(ctx, torch.autocast)
    assert ctx.device == "cuda" and ctx.fast_dtype == dtype


def test_fp16_is_refused_on_a_cpu_worker():
    with pytest.raises(PipelineError, match="fp16 autocast needs a GPU"):
        autocast_for("fp16", torch.device("cpu"))


def test_an_accelerator_worker_gathers_its_batches_on_the_device():
    """Off the CPU, DeviceData copies the whole uint8 split to the device once and gathers each
    batch there (the `meta` device stands in for a GPU: shapes, dtypes and strides, no data)."""
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int64)
    data = DeviceData(images, labels, [0.5] * 3, [0.2] * 3, torch.device("meta"))
    assert data.on_device and data.images.device.type == "meta"
    x, y = data.get(np.array([3, 1, 4]))
    assert x.device.type == "meta" and x.dtype == torch.float32 and tuple(x.shape) == (3, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.int64
    flat = DeviceData(images, labels, [0.5] * 3, [0.2] * 3, torch.device("meta"), False)
    assert flat.get(np.array([0, 1]))[0].is_contiguous()
    cpu = DeviceData(images, labels, [0.5] * 3, [0.2] * 3, torch.device("cpu"))
    assert not cpu.on_device and cpu.images is images  # on CPU the arrays stay where they are


def _train(**kw):
    base = {"num_workers": 2, "batch_size": 64}
    return parse_params({"model": {"layers": [{"fc": 4}]}, "train": {**base, **kw}}).train


@pytest.mark.parametrize(
    "gpus, use_gpu, expected",
    [(0, "auto", False), (1, "auto", False), (2, "auto", True), (8, "auto", True),
     (4, False, False), (2, True, True)],
)  # fmt: skip
def test_use_gpu_auto_takes_gpus_only_when_each_worker_gets_one(gpus, use_gpu, expected):
    resources = {"CPU": 8.0, "GPU": float(gpus)}
    assert check_resources(_train(use_gpu=use_gpu), resources, "the cluster") is expected


def test_use_gpu_true_without_enough_gpus_is_one_line():
    with pytest.raises(PipelineError, match=r"train.use_gpu: true needs 2 GPUs .* has 1"):
        check_resources(_train(use_gpu=True), {"CPU": 8.0, "GPU": 1.0}, "the cluster")
