"""The preprocess stage: output contract, determinism, the augmentation policy, the readers.

Runs the real albumentations on a 600/200 Fashion-MNIST slice, digits and image folders.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_data import fashion_slice, make_folder  # noqa: F401  (a fixture and a helper)

from src.config import parse_params
from src.data import load_source
from src.errors import PipelineError
from src.preprocess import load_processed, preprocess_dataset
from src.transforms import (
    build_augment,
    make_eval_transform,
    normalize,
    prepare_images,
    preprocess_meta,
    resize_pad,
)

REPO = Path(__file__).resolve().parents[1]


def make_params(tmp: Path, data: dict | None = None, pre: dict | None = None):
    """The repository's params with `data` / `preprocess` keys replaced, outputs in `tmp`."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data or {})
    raw["preprocess"].update(pre or {})
    raw["paths"] = {k: str(tmp / v) for k, v in raw["paths"].items()}
    return parse_params(raw)


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# A Fashion slice at 28x28 + pad 2, small chunks so that several workers get work.
FASHION_PRE = {"image_size": 28, "pad": 2, "chunk_size": 128, "augment_copies": 2}


@pytest.fixture(scope="module")
def fashion_ds(fashion_slice):  # noqa: F811
    params = make_params(
        Path("/unused"), {"source": "idx", "path": str(fashion_slice)}, FASHION_PRE
    )
    return load_source(params.data, seed=params.base.seed), params


@pytest.fixture(scope="module")
def fashion_out(fashion_ds, tmp_path_factory):
    """The slice preprocessed with 2 workers."""
    ds, params = fashion_ds
    out = tmp_path_factory.mktemp("fashion") / "processed"
    pre = params.preprocess.model_copy(update={"workers": 2})
    meta = preprocess_dataset(ds, pre, params.base.seed, out)
    return out, meta


def test_output_layout_and_meta_contract(fashion_ds, fashion_out):
    ds, params = fashion_ds
    out, _ = fashion_out
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "samples.png",
        "test_images.npy",
        "test_labels.npy",
        "train_images.npy",
        "train_labels.npy",
    ]
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {
        "class_names": [str(i) for i in range(10)],
        "channels": 1,
        "image_size": 32,
        "num_train": 1800,
        "num_originals": 600,
        "augment_copies": 2,
        "num_test": 200,
        "mean": meta["mean"],
        "std": meta["std"],
        "source": "idx",
        "preprocess": {
            "resize": "stretch",
            "image_size": 28,
            "pad": 2,
            "fill": 0,
            "border_mode": "constant",
        },
    }
    data = load_processed(out)
    assert isinstance(data.train_images, np.memmap)
    assert data.train_images.shape == (1800, 32, 32, 1) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (200, 32, 32, 1)
    assert data.train_labels.dtype == np.int64 and data.test_labels.dtype == np.int64
    # row r comes from original r % N0: labels repeat, originals are the un-augmented images
    assert np.array_equal(data.train_labels, np.tile(ds.train_labels, 3))
    originals = data.train_images[:600]
    assert np.array_equal(originals[:, 2:30, 2:30, 0], ds.train_images)
    assert (originals[:, :2] == 0).all() and (originals[:, :, -2:] == 0).all()  # the pad
    copy1, copy2 = data.train_images[600:1200], data.train_images[1200:]
    changed1 = (copy1 != originals).any(axis=(1, 2, 3)).mean()
    assert 0.6 < changed1 <= 1.0  # Affine with p=0.8
    assert not np.array_equal(copy1, copy2)  # each copy draws anew
    # the test split is exactly what the served model's preprocessing gives
    assert np.array_equal(
        data.test_images, prepare_images(list(ds.test_images), meta["preprocess"], 1)
    )
    # normalisation statistics of the training originals, 0-1 scale
    pixels = originals.astype(np.float64) / 255
    assert meta["mean"][0] == pytest.approx(pixels.mean(), rel=1e-9)
    assert meta["std"][0] == pytest.approx(pixels.std(), rel=1e-9)
    with Image.open(out / "samples.png") as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_same_bytes_across_runs_and_process_counts(fashion_ds, fashion_out, tmp_path):
    ds, params = fashion_ds
    reference = hashes(fashion_out[0])
    for workers in (1, 2):
        pre = params.preprocess.model_copy(update={"workers": workers})
        preprocess_dataset(ds, pre, params.base.seed, tmp_path / f"w{workers}")
        assert hashes(tmp_path / f"w{workers}") == reference, f"workers={workers}"
    other_seed = tmp_path / "seed"
    preprocess_dataset(
        ds, params.preprocess.model_copy(update={"workers": 1}), params.base.seed + 1, other_seed
    )
    changed = hashes(other_seed)
    assert changed["test_images.npy"] == reference["test_images.npy"]
    assert changed["train_images.npy"] != reference["train_images.npy"]


def test_same_bytes_when_workers_start_clean(fashion_ds, fashion_out, tmp_path):
    """With another thread alive, workers start from a forkserver instead of fork: same bytes."""
    import threading

    ds, params = fashion_ds
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        pre = params.preprocess.model_copy(update={"workers": 2})
        preprocess_dataset(ds, pre, params.base.seed, tmp_path / "fs")
    finally:
        stop.set()
        thread.join()
    assert hashes(tmp_path / "fs") == hashes(fashion_out[0])


def test_run_twice_gives_identical_bytes_digits(tmp_path):
    """The stage function end to end (load_source + preprocess) on the default digits source."""
    from src.preprocess import run

    params = make_params(tmp_path / "a")
    first = run(params, quiet=True)
    assert first["num_originals"] == 1437 and first["image_size"] == 20
    second = run(make_params(tmp_path / "b"), quiet=True)
    assert second["workers"] == first["workers"]
    assert hashes(tmp_path / "a" / "data/processed") == hashes(tmp_path / "b" / "data/processed")


def test_imagefolder_rgb_letterbox_mixed_sizes(tmp_path):
    root = make_folder(tmp_path / "pool")
    params = make_params(
        tmp_path,
        {"source": "imagefolder", "path": str(root), "channels": 3, "test_fraction": 0.25},
        {
            "image_size": 12,
            "pad": 1,
            "resize": "letterbox",
            "fill": 7,
            "workers": 2,
            "chunk_size": 5,
        },
    )
    ds = load_source(params.data, seed=params.base.seed)
    meta = preprocess_dataset(ds, params.preprocess, params.base.seed, params.paths.processed)
    data = load_processed(params.paths.processed)
    assert data.train_images.shape == (36, 14, 14, 3) and data.test_images.shape == (6, 14, 14, 3)
    assert meta["class_names"] == ["cat", "dog", "eel"] and meta["channels"] == 3
    assert (data.train_images[:18, 0] == 7).all()  # outer pad with the fill value
    assert np.array_equal(
        data.test_images,
        prepare_images([ds.test_images[i] for i in range(6)], meta["preprocess"], 3),
    )


def test_truncated_image_fails_in_a_worker_and_leaves_no_output(tmp_path):
    root = make_folder(tmp_path / "pool")
    rng = np.random.default_rng(0)
    bad = root / "dog" / "zz_truncated.png"
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:200])
    params = make_params(
        tmp_path,
        {"source": "imagefolder", "path": str(root), "test_fraction": 0.25},
        {"workers": 2, "chunk_size": 4},
    )
    ds = load_source(params.data, seed=params.base.seed)  # the header is fine
    out = Path(params.paths.processed)
    with pytest.raises(PipelineError, match=r"zz_truncated\.png: cannot decode image"):
        preprocess_dataset(ds, params.preprocess, params.base.seed, out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no half-written folder


# ---------------------------------------------------------------------------------------------
# The augmentation policy from params


def test_unknown_transform_is_named():
    with pytest.raises(PipelineError) as err:
        build_augment([{"transform": "Foo"}])
    assert (
        str(err.value)
        == "params.yaml: preprocess.augment[0].transform: unknown albumentations transform 'Foo'"
    )
    for name in ("Compose", "BboxParams", "resize", "_private"):
        with pytest.raises(PipelineError, match="unknown albumentations transform"):
            build_augment([{"transform": "HorizontalFlip"}, {"transform": name}])


def test_bad_arguments_are_named():
    with pytest.raises(
        PipelineError, match=r"preprocess\.augment\[0\]\.rotat: unknown argument for Affine"
    ):
        build_augment([{"transform": "Affine", "rotat": 5}])
    with pytest.raises(
        PipelineError,
        match=r"preprocess\.augment\[1\]\.rotate: invalid value 'x' for Affine \(expected tuple\[float, float\] \| float\)",
    ):
        build_augment([{"transform": "HorizontalFlip"}, {"transform": "Affine", "rotate": "x"}])
    with pytest.raises(
        PipelineError, match=r"preprocess\.augment\[0\]\.border_mode: unknown border mode 'mirror'"
    ):
        build_augment([{"transform": "Affine", "border_mode": "mirror"}])
    with pytest.raises(
        PipelineError,
        match=r"preprocess\.augment\[0\]\.transforms\[1\]\.transform: unknown albumentations transform 'Nope'",
    ):
        build_augment(
            [
                {
                    "transform": "OneOf",
                    "transforms": [{"transform": "HorizontalFlip"}, {"transform": "Nope"}],
                }
            ]
        )


def test_policy_by_name_and_nested():
    policy = build_augment(
        [
            {
                "transform": "Affine",
                "rotate": [-5, 5],
                "border_mode": "reflect",
                "interpolation": "nearest",
                "p": 1,
            },
            {
                "transform": "OneOf",
                "p": 1,
                "transforms": [{"transform": "HorizontalFlip"}, {"transform": "VerticalFlip"}],
            },
        ]
    )
    import cv2

    assert policy.transforms[0].border_mode == cv2.BORDER_REFLECT_101
    assert policy.transforms[0].interpolation == cv2.INTER_NEAREST
    assert len(policy.transforms[1].transforms) == 2
    assert build_augment([]) is None


def test_policy_that_changes_the_size_is_refused(fashion_ds, tmp_path):
    ds, params = fashion_ds
    pre = params.preprocess.model_copy(
        update={
            "augment": [
                parse_params_step({"transform": "RandomCrop", "height": 20, "width": 20, "p": 1})
            ],
            "workers": 1,
        }
    )
    with pytest.raises(
        PipelineError,
        match=r"preprocess\.augment changes the image shape from \(32, 32\) to \(20, 20\)",
    ):
        preprocess_dataset(ds, pre, 0, tmp_path / "out")
    pre = params.preprocess.model_copy(update={"augment": []})
    with pytest.raises(
        PipelineError, match=r"augment_copies is 2 but preprocess\.augment is empty"
    ):
        preprocess_dataset(ds, pre, 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def parse_params_step(step: dict):
    from src.config import AugmentStep

    return AugmentStep.model_validate(step)


def test_unknown_augmentation_through_the_stage_script(tmp_path):
    """The stage script: one line on stderr, exit 2, no outputs."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["preprocess"]["augment"][0]["transform"] = "Foo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, str(REPO / "pipeline/preprocess.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: preprocess.augment[0].transform: unknown albumentations transform 'Foo'"
    )
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------
# The test-split transform and the readers


@pytest.mark.parametrize("border_mode", ["constant", "reflect", "replicate", "wrap"])
@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("channels", [1, 3])
def test_batched_pad_equals_albumentations(border_mode, resize, channels):
    """The one-numpy-call path for images already at size gives the per-image path's pixels."""
    pre = {"resize": resize, "image_size": 10, "pad": 3, "fill": 9, "border_mode": border_mode}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 10, 10) + ((3,) if channels == 3 else ()), dtype=np.uint8)
    batched = prepare_images(images, pre, channels)
    transform = make_eval_transform(pre)
    one_by_one = np.stack([transform(image=im)["image"] for im in images]).reshape(batched.shape)
    assert batched.shape == (5, 16, 16, channels)
    assert np.array_equal(batched, one_by_one)


@pytest.mark.parametrize(
    "shape", [(13, 13), (7, 7, 1), (13, 9, 3), (6, 14, 3), (10, 10, 4), (10, 10, 6)]
)
def test_batched_stretch_equals_albumentations(shape):
    """A stack of another size, stretched by cv2 directly: the per-image path's pixels, up
    (bilinear) and down (area) and mixed."""
    pre = {"resize": "stretch", "image_size": 10, "pad": 2, "fill": 0, "border_mode": "reflect"}
    images = np.random.default_rng(0).integers(0, 256, (5, *shape), dtype=np.uint8)
    batched = resize_pad(images, make_eval_transform(pre), pre)
    one_by_one = resize_pad(list(images), make_eval_transform(pre), pre)
    assert batched.shape == (5, 14, 14, 1 if len(shape) == 2 else shape[2])
    assert np.array_equal(batched, one_by_one)


def test_prepare_images_any_size_and_mode():
    pre = {"resize": "letterbox", "image_size": 8, "pad": 2, "fill": 0, "border_mode": "constant"}
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in [(30, 10), (4, 4, 1), (9, 20, 3), (16, 16, 4), (8, 8, 2)]
    ]
    for channels in (1, 3):
        out = prepare_images(images, pre, channels)
        assert out.shape == (5, 12, 12, channels) and out.dtype == np.uint8
    tall = prepare_images([np.full((16, 8), 200, np.uint8)], pre, 1)[0, :, :, 0]
    assert (tall[2:10, 4:8] == 200).all() and (tall[:, :4] == 0).all()  # centred, fill on the sides
    assert prepare_images([], pre, 1).shape == (0, 12, 12, 1)
    with pytest.raises(PipelineError, match=r"image 1: expected uint8 pixels"):
        prepare_images([images[0], images[0].astype(np.float64)], pre, 1)


def test_normalize():
    images = np.array([[[[0, 255, 51]]]], dtype=np.uint8)  # N=1, H=1, W=1, C=3
    out = normalize(images, mean=[0.0, 0.5, 0.2], std=[1.0, 0.5, 0.1])
    assert out.dtype == np.float32 and out.shape == (1, 3, 1, 1) and out.flags["C_CONTIGUOUS"]
    assert out[0, :, 0, 0] == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)


def test_load_processed_errors(fashion_out, tmp_path):
    with pytest.raises(PipelineError, match=r"meta\.json: not found"):
        load_processed(tmp_path / "none")
    broken = tmp_path / "broken"
    shutil.copytree(fashion_out[0], broken)
    (broken / "test_labels.npy").unlink()
    with pytest.raises(PipelineError, match=r"test_labels\.npy: not found \(preprocess output\)"):
        load_processed(broken)
    np.save(broken / "test_labels.npy", np.zeros(3, np.int64))
    with pytest.raises(
        PipelineError, match=r"test_images\.npy: shape .* does not match meta\.json"
    ):
        load_processed(broken)
    (broken / "train_images.npy").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match=r"train_images\.npy: not a readable \.npy array"):
        load_processed(broken)


def test_preprocess_meta_matches_config():
    params = make_params(Path("/unused"))
    assert preprocess_meta(params.preprocess) == {
        "resize": "stretch",
        "image_size": 16,
        "pad": 2,
        "fill": 0,
        "border_mode": "constant",
    }


# ---------------------------------------------------------------------------------------------
# DVC


@pytest.mark.slow
def test_dvc_repro_preprocess_in_a_copy(tmp_path):
    from conftest import make_project, project_env

    root = make_project(tmp_path / "project")
    # only this stage's block: the test must not depend on the state of later stages
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {"preprocess": dvc_yaml["stages"]["preprocess"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    env = project_env(PYTHONPATH=str(root))  # the copy's src/, not the installed repo's

    def dvc(*args):
        return subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)

    result = dvc("repro", "preprocess")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    processed = root / "data" / "processed"
    for name in (
        "train_images.npy",
        "train_labels.npy",
        "test_images.npy",
        "test_labels.npy",
        "meta.json",
        "samples.png",
    ):
        assert (processed / name).is_file(), name
    assert (root / "dvc.lock").is_file()
    first = hashes(processed)
    again = dvc("repro", "preprocess")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    shutil.rmtree(processed)
    forced = dvc("repro", "--force", "preprocess", "--no-run-cache")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert hashes(processed) == first  # a real rerun gives the same bytes: cache hits hold
