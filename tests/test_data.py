"""Image sources on small real data: digits, a Fashion-MNIST slice, image folders made here.

Every bad input must give a one-line PipelineError naming the file, folder or parameter.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from src.config import DataParams
from src.data import (
    ImageFiles,
    decode_image,
    load_source,
    read_idx,
    stratified_split,
    to_channels,
)
from src.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
SEED = yaml.safe_load((REPO / "params.yaml").read_text())["base"]["seed"]


def data_params(**overrides) -> DataParams:
    """The repository's `data` section with some keys replaced."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    raw.update(overrides)
    return DataParams.model_validate(raw)


# ---------------------------------------------------------------------------------------------
# IDX helpers (our own writer, independent of the reader under test)


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob, mtime=0) if path.suffix == ".gz" else blob)


def real_idx_header(path: Path) -> tuple[int, tuple[int, ...]]:
    """(magic, shape) of a gzipped IDX file, read with struct alone."""
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        return magic, struct.unpack(f">{ndim}I", f.read(4 * ndim))


@pytest.fixture(scope="module")
def fashion_slice(tmp_path_factory, fashion_dir) -> Path:
    """600 train / 200 test Fashion-MNIST images, written as IDX files in a scratch folder."""
    folder = tmp_path_factory.mktemp("fashion-slice")
    for prefix, n in (("train", 600), ("t10k", 200)):
        images = read_idx(fashion_dir / f"{prefix}-images-idx3-ubyte.gz", 3)[:n]
        labels = read_idx(fashion_dir / f"{prefix}-labels-idx1-ubyte.gz", 1)[:n]
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        # labels uncompressed: the reader takes both
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_stratified_seeded_and_scaled():
    ds = load_source(data_params(source="digits"), seed=SEED)
    assert ds.source == "digits" and ds.class_names == [str(i) for i in range(10)]
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape[1:] == (8, 8)
    assert len(ds.train_images) + len(ds.test_images) == 1797
    assert len(ds.test_images) == pytest.approx(0.2 * 1797, abs=1)
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    assert ds.train_labels.dtype == np.int64 and set(ds.test_labels) == set(range(10))
    train_share = np.bincount(ds.train_labels) / len(ds.train_labels)
    test_share = np.bincount(ds.test_labels) / len(ds.test_labels)
    assert np.abs(train_share - test_share).max() < 0.02  # stratified
    again = load_source(data_params(source="digits"), seed=SEED)
    assert np.array_equal(again.test_labels, ds.test_labels)
    assert np.array_equal(again.train_images, ds.train_images)
    other = load_source(data_params(source="digits"), seed=SEED + 1)
    assert not np.array_equal(other.test_labels, ds.test_labels)


def test_digits_in_rgb_repeats_the_gray_value():
    ds = load_source(data_params(source="digits", channels=3), seed=SEED)
    assert ds.channels == 3 and ds.train_images.shape[1:] == (8, 8, 3)
    assert (ds.train_images == ds.train_images[..., :1]).all()


# ---------------------------------------------------------------------------------------------
# idx


def test_real_fashion_files_headers_and_counts(fashion_dir):
    expected = {
        "train-images-idx3-ubyte.gz": (0x803, (60000, 28, 28)),
        "train-labels-idx1-ubyte.gz": (0x801, (60000,)),
        "t10k-images-idx3-ubyte.gz": (0x803, (10000, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": (0x801, (10000,)),
    }
    for name, (magic, shape) in expected.items():
        assert real_idx_header(fashion_dir / name) == (magic, shape)
    labels = read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", 1)
    assert labels.shape == (10000,) and set(labels) == set(range(10))


def test_idx_slice_loads_with_numbered_classes(fashion_slice):
    ds = load_source(data_params(source="idx", path=str(fashion_slice)), seed=SEED)
    assert ds.source == "idx" and ds.class_names == [str(i) for i in range(10)]
    assert ds.train_images.shape == (600, 28, 28) and ds.test_images.shape == (200, 28, 28)
    assert ds.train_labels.dtype == np.int64 and len(ds.test_labels) == 200


def test_idx_class_names_from_classes_txt(fashion_slice, tmp_path):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for f in fashion_slice.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    names = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    assert load_source(data_params(source="idx", path=str(folder)), seed=SEED).class_names == names
    (folder / "classes.txt").write_text("a\nb\n")
    with pytest.raises(PipelineError, match=r"classes\.txt: 2 class names, but labels go up to 9"):
        load_source(data_params(source="idx", path=str(folder)), seed=SEED)


def idx_folder(tmp_path: Path, n_train=20, n_test=10) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 6, 6)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 3)
    return tmp_path


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("bad_magic", r"t10k-images-idx3-ubyte: not an IDX file"),
        ("label_count", r"train-labels-idx1-ubyte: 19 labels for 20 images"),
        (
            "truncated",
            r"train-images-idx3-ubyte: IDX data has 719 bytes, header \(20, 6, 6\) says 720",
        ),
        ("missing", r"no train-labels-idx1-ubyte\(\.gz\) file"),
        ("bad_gzip", r"train-images-idx3-ubyte\.gz: cannot read"),
        ("labels_as_images", r"train-labels-idx1-ubyte: IDX file has 3 dimensions, expected 1"),
    ],
)
def test_idx_errors_name_the_file(tmp_path, breakage, message):
    folder = idx_folder(tmp_path)
    if breakage == "bad_magic":
        write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((10, 6, 6)), magic=0x12345678)
    elif breakage == "label_count":
        write_idx(folder / "train-labels-idx1-ubyte", np.arange(19) % 3)
    elif breakage == "truncated":
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-1])
    elif breakage == "missing":
        (folder / "train-labels-idx1-ubyte").unlink()
    elif breakage == "bad_gzip":
        (folder / "train-images-idx3-ubyte").unlink()
        (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08not really gzip")
    elif breakage == "labels_as_images":
        write_idx(folder / "train-labels-idx1-ubyte", np.zeros((20, 6, 6)))
    with pytest.raises(PipelineError, match=message) as err:
        load_source(data_params(source="idx", path=str(folder)), seed=SEED)
    assert "\n" not in str(err.value)


def test_idx_single_class_and_too_small_images(tmp_path):
    folder = idx_folder(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(20))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(10))
    with pytest.raises(PipelineError, match="single class"):
        load_source(data_params(source="idx", path=str(folder)), seed=SEED)
    with pytest.raises(PipelineError, match=r"images are 6x6, smaller than data.min_image_side 7"):
        load_source(data_params(source="idx", path=str(folder), min_image_side=7), seed=SEED)


# ---------------------------------------------------------------------------------------------
# imagefolder


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def mixed_images(rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    """One image per mode and format, of different sizes."""
    rgb = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (21, 8), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    return [
        ("a.png", rgb),
        ("b.jpg", rgb.resize((30, 12))),
        ("c.png", rgba),
        ("d.png", gray),
        ("e.jpeg", gray.resize((10, 10))),
        ("f.png", pal),
        ("g.png", pal_t),
        ("h.bmp", rgb),
    ]


def make_folder(
    root: Path, classes=("cat", "dog", "eel"), split: bool = False, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        for sub in ("train", "test") if split else ("",):
            for name, image in mixed_images(rng):
                save(root / sub / c / name, image)
    return root


def test_imagefolder_pool_mixed_modes_and_sizes(tmp_path):
    root = make_folder(tmp_path / "pool")
    (root / "cat" / "notes.txt").write_text("not an image: skipped")
    (root / "dog" / ".hidden.png").write_bytes(b"skipped too")
    ds = load_source(
        data_params(source="imagefolder", path=str(root), test_fraction=0.25), seed=SEED
    )
    assert ds.source == "imagefolder" and ds.class_names == ["cat", "dog", "eel"]
    assert isinstance(ds.train_images, ImageFiles)
    assert len(ds.train_images) == 18 and len(ds.test_images) == 6
    assert np.bincount(ds.test_labels).tolist() == [2, 2, 2]  # stratified
    shapes = set()
    for i in range(len(ds.train_images)):
        image = ds.train_images[i]
        assert image.dtype == np.uint8 and image.ndim == 2
        shapes.add(image.shape)
    assert len(shapes) > 3  # sizes are kept: resizing is preprocessing's job
    rgb = load_source(
        data_params(source="imagefolder", path=str(root), channels=3, test_fraction=0.25), seed=SEED
    )
    assert all(rgb.test_images[i].shape[2:] == (3,) for i in range(len(rgb.test_images)))
    again = load_source(
        data_params(source="imagefolder", path=str(root), test_fraction=0.25), seed=SEED
    )
    assert again.train_images.paths == ds.train_images.paths  # deterministic order


def test_imagefolder_train_test_split(tmp_path):
    root = make_folder(tmp_path / "split", split=True)
    ds = load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)
    assert ds.class_names == ["cat", "dog", "eel"]
    assert len(ds.train_images) == len(ds.test_images) == 24
    assert all("/train/" in p for p in ds.train_images.paths)
    assert all("/test/" in p for p in ds.test_images.paths)
    assert ds.train_labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_imagefolder_split_class_sets_must_match(tmp_path):
    root = make_folder(tmp_path / "split", split=True)
    save(root / "train" / "fox" / "a.png", Image.new("L", (8, 8)))
    save(root / "train" / "fox" / "b.png", Image.new("L", (8, 8)))
    with pytest.raises(
        PipelineError, match=r"train/ and test/ have different classes \(differ in \['fox'\]\)"
    ):
        load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)
    (root / "test").rename(root / "other")
    with pytest.raises(PipelineError, match=r"has train/ but no test/"):
        load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)


def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "pool")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    with pytest.raises(PipelineError, match=r"broken\.png: not a readable image file") as err:
        load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_truncated_image_fails_at_decode_naming_the_file(tmp_path):
    path = save(
        tmp_path / "x.png",
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
    )
    path.write_bytes(path.read_bytes()[:300])  # the header survives, the pixels do not
    with pytest.raises(PipelineError, match=r"x\.png: cannot decode image"):
        decode_image(str(path), 3, 1, 10**6)


def test_empty_class_folder_names_the_folder(tmp_path):
    root = make_folder(tmp_path / "pool")
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(PipelineError, match=r"pool/empty: class folder has no image files"):
        load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)


def test_single_class_folder(tmp_path):
    root = make_folder(tmp_path / "pool", classes=("only",))
    with pytest.raises(PipelineError, match=r"at least 2 class sub-folders, found only 'only'"):
        load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)
    with pytest.raises(PipelineError, match=r"found none"):
        load_source(
            data_params(source="imagefolder", path=str(tmp_path / "pool" / "only")), seed=SEED
        )


@pytest.mark.parametrize("source", ["idx", "imagefolder"])
def test_missing_path_names_data_path(tmp_path, source):
    missing = tmp_path / "nowhere"
    with pytest.raises(PipelineError, match=rf"data\.path: {missing} does not exist"):
        load_source(data_params(source=source, path=str(missing)), seed=SEED)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(PipelineError, match=r"is not a folder"):
        load_source(data_params(source=source, path=str(file)), seed=SEED)


def test_too_small_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "pool")
    save(root / "eel" / "tiny.png", Image.new("RGB", (3, 40)))
    with pytest.raises(
        PipelineError, match=r"tiny\.png: image is 3x40, smaller than data\.min_image_side 4"
    ):
        load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    root = make_folder(tmp_path / "pool")
    # 8000 x 8000 = 64 M pixels, a few KB on disk: over the default 40 M limit
    save(root / "cat" / "bomb.png", Image.new("1", (8000, 8000)))
    assert (root / "cat" / "bomb.png").stat().st_size < 100_000
    with pytest.raises(
        PipelineError,
        match=r"bomb\.png: image is 8000x8000 = 64000000 pixels, over data\.max_image_pixels 40000000",
    ):
        load_source(data_params(source="imagefolder", path=str(root)), seed=SEED)
    # a small limit in params applies too, and decode_image checks it as well
    big = save(tmp_path / "big.png", Image.new("L", (300, 300)))
    with pytest.raises(PipelineError, match=r"over data\.max_image_pixels 50000"):
        decode_image(str(big), 1, 1, 50_000)


def test_limits_above_pil_default_are_honoured(tmp_path):
    """PIL refuses > 2 x its own default (179 M pixels); data.max_image_pixels decides instead."""
    path = save(tmp_path / "wide.png", Image.new("1", (20000, 10000)))  # 200 M pixels
    with pytest.raises(PipelineError, match="over data.max_image_pixels"):
        decode_image(str(path), 1, 1, 40_000_000)
    from src.data import check_image_file

    check_image_file(str(path), 1, 250_000_000)  # allowed by the param, only the header read
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's global is restored


# ---------------------------------------------------------------------------------------------
# channel conversion (shared by training data and the served model)


def test_to_channels_conversions():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = to_channels(rgb, 1)
    assert gray.shape == (5, 7)
    assert np.array_equal(gray, np.asarray(Image.fromarray(rgb).convert("L")))
    assert to_channels(rgb, 3) is rgb  # nothing to do
    g3 = to_channels(gray, 3)
    assert g3.shape == (5, 7, 3) and (g3 == gray[..., None]).all()
    assert np.array_equal(to_channels(gray[..., None], 1), gray)
    rgba = np.concatenate([rgb, np.zeros((5, 7, 1), np.uint8)], axis=2)  # fully transparent
    assert (to_channels(rgba, 3) == 0).all()  # composited onto black
    rgba[..., 3] = 255
    assert np.array_equal(to_channels(rgba, 3), rgb)
    with pytest.raises(PipelineError, match="expected uint8 pixels, got float32"):
        to_channels(rgb.astype(np.float32), 1)
    with pytest.raises(PipelineError, match=r"got \(5, 7, 5\)"):
        to_channels(np.zeros((5, 7, 5), np.uint8), 1)
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert (to_channels(sixteen, 1) == 255).all()


def test_stratified_split_too_few_images_per_class():
    with pytest.raises(
        PipelineError,
        match=r"data\.test_fraction 0\.2: cannot split 5 images stratified \(smallest class has 1\)",
    ):
        stratified_split(np.array([0, 0, 0, 0, 1]), 0.2, 0)
