"""Image sources: `digits` | `idx` | `imagefolder` -> uint8 images, int64 labels, class names.

`load_source(params.data, params.base.seed)` returns a `Dataset`. Images are uint8 and already
in `data.channels`: (H, W) when channels is 1, (H, W, 3) when it is 3. The `digits` and `idx`
sources return one (N, H, W[, 3]) array per split; `imagefolder` returns an `ImageFiles` sequence, whose items are
decoded on access, so that the preprocess workers decode their own chunk and no process ever
holds a whole folder of full-size images. Every problem with the input is a one-line
`PipelineError` naming the file, folder or parameter at fault. Orders are deterministic
(sorted names, seeded splits).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from src.errors import PipelineError

IDX_FILES = {  # role -> accepted names (the usual spelling, then the one MNIST's site used)
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes: the only one MNIST-style files use
CLASSES_FILE = "classes.txt"  # optional, in an idx folder: one class name per line


@dataclass(frozen=True)
class Dataset:
    """One source's images, split into train and test.

    Attributes:
        train_images, test_images: an (N, H, W[, 3]) uint8 array, or an `ImageFiles` sequence
            of such images (any sizes) decoded on access.
        train_labels, test_labels: int64 arrays of class indices into `class_names`.
        class_names: one name per class, in label order.
        source: "digits", "idx" or "imagefolder".
        channels: 1 or 3 (data.channels): the images are (H, W) or (H, W, 3).
    """

    train_images: np.ndarray | ImageFiles
    train_labels: np.ndarray
    test_images: np.ndarray | ImageFiles
    test_labels: np.ndarray
    class_names: list[str]
    source: str
    channels: int


# ---------------------------------------------------------------------------------------------
# Decoding: one place turns files and arrays into uint8 images of the wanted channel count


def to_channels(image: Image.Image | np.ndarray, channels: int) -> np.ndarray:
    """Convert a PIL image or a uint8 array (H,W / H,W,1 / H,W,2 / H,W,3 / H,W,4) to `channels`.

    Returns (H, W) uint8 for channels 1, (H, W, 3) for channels 3. Alpha is composited onto
    black (transparent pixels' colours are arbitrary); colour to gray uses PIL's ITU-R 601-2 luma.
    The training data and the served model both convert through here, so they agree exactly.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise PipelineError(f"expected uint8 pixels, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if (channels == 1 and image.ndim == 2) or (
            channels == 3 and image.ndim == 3 and image.shape[2] == 3
        ):
            return image  # already right: the fast path for arrays from digits/idx and servers
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (2, 3, 4)):
            raise PipelineError(
                f"expected an image of shape (H, W) or (H, W, 1|2|3|4), got {image.shape}"
            )
        image = Image.fromarray(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit gray (e.g. some PNGs): keep the top 8 bits; PIL's convert('L') would clip.
        image = Image.fromarray(
            (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        )
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image.convert("RGBA"))
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    return np.asarray(image, dtype=np.uint8)


@contextlib.contextmanager
def _pil_pixel_limit(limit: int) -> Iterator[None]:
    """Hand PIL our own pixel limit (it warns above it and refuses above twice it) while we open.

    We check the header size ourselves first; this only keeps PIL's global default (which
    may be lower than data.max_image_pixels) from refusing what params allow.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _open_checked(
    path: str | os.PathLike | BinaryIO, min_side: int, max_pixels: int
) -> Image.Image:
    """Open an image file and check its header size against the limits, before decoding."""
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise PipelineError(
            f"{path}: not a readable image file (corrupt or unknown format)"
        ) from None
    except Image.DecompressionBombError:
        raise PipelineError(
            f"{path}: image too large (over data.max_image_pixels {max_pixels}); refusing to decode"
        ) from None
    except OSError as e:
        raise PipelineError(f"{path}: cannot open image: {e}") from None
    w, h = image.size
    if w * h > max_pixels:
        image.close()
        raise PipelineError(
            f"{path}: image is {w}x{h} = {w * h} pixels, over data.max_image_pixels {max_pixels} "
            "(decompression-bomb guard); refusing to decode"
        )
    if min(w, h) < min_side:
        image.close()
        raise PipelineError(
            f"{path}: image is {w}x{h}, smaller than data.min_image_side {min_side}"
        )
    return image


def check_image_file(path: str | os.PathLike | BinaryIO, min_side: int, max_pixels: int) -> None:
    """Read only the header of an image file: raise PipelineError if corrupt, too small or too large."""
    with _pil_pixel_limit(max_pixels):
        _open_checked(path, min_side, max_pixels).close()


def decode_image(
    path: str | os.PathLike | BinaryIO, channels: int, min_side: int, max_pixels: int
) -> np.ndarray:
    """Decode an image file (a path or a binary file object) to uint8 in `channels` (see
    `to_channels`), applying EXIF rotation.

    The header size is checked against the limits before any pixel is decoded; a truncated or
    corrupt file is a PipelineError naming it.
    """
    with _pil_pixel_limit(max_pixels):
        image = _open_checked(path, min_side, max_pixels)
        try:
            with image:
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_channels(image, channels)
        except (OSError, ValueError, SyntaxError) as e:
            raise PipelineError(f"{path}: cannot decode image ({e})") from None


@dataclass(frozen=True)
class ImageFiles(Sequence):
    """Image files decoded on access: `files[i]` is a uint8 array; `files[a:b]` another ImageFiles.

    Small to pickle (paths and limits only), so a preprocess worker receives its chunk's paths
    and decodes the images itself.
    """

    paths: tuple[str, ...]
    channels: int
    min_side: int
    max_pixels: int

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return ImageFiles(self.paths[index], self.channels, self.min_side, self.max_pixels)
        return decode_image(self.paths[index], self.channels, self.min_side, self.max_pixels)


# ---------------------------------------------------------------------------------------------
# Sources


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of indices 0..len(labels)-1 into (train, test) index arrays."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    try:
        train, test = train_test_split(
            index, test_size=test_fraction, random_state=seed % 2**32, stratify=labels
        )
    except ValueError as e:
        counts = np.bincount(labels)
        raise PipelineError(
            f"data.test_fraction {test_fraction}: cannot split {len(labels)} images stratified "
            f"(smallest class has {counts[counts > 0].min()}): {e}"
        ) from None
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def _gray_to(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W) gray -> (N, H, W) or (N, H, W, 3) with the gray value in each channel."""
    return images if channels == 1 else np.repeat(images[..., None], 3, axis=-1)


def load_digits(data, seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 digits (values 0..16), scaled to 0..255, split by test_fraction."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, data.test_fraction, seed)
    return Dataset(
        train_images=_gray_to(images[train], data.channels),
        train_labels=labels[train],
        test_images=_gray_to(images[test], data.channels),
        test_labels=labels[test],
        class_names=[str(i) for i in range(10)],
        source="digits",
        channels=data.channels,
    )


def _find_idx_file(folder: Path, role: str) -> Path:
    for name in IDX_FILES[role]:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    raise PipelineError(
        f"{folder}: no {IDX_FILES[role][0]}(.gz) file (data.source idx needs "
        "train-images/train-labels/t10k-images/t10k-labels IDX files)"
    )


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) of unsigned bytes with `ndim` dimensions.

    Returns a uint8 array of the shape its header declares; the magic number, the dimension
    count and the data length are checked, and a mismatch is a PipelineError naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise PipelineError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise PipelineError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})"
        )
    if raw[2] != IDX_UBYTE:
        raise PipelineError(f"{path}: IDX type 0x{raw[2]:02x} is not unsigned bytes (0x08)")
    if raw[3] != ndim:
        raise PipelineError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PipelineError(f"{path}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise PipelineError(
            f"{path}: IDX data has {len(raw) - header} bytes, header {shape} says {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_class_names(folder: Path, num_classes: int) -> list[str]:
    path = folder / CLASSES_FILE
    if not path.is_file():
        return [str(i) for i in range(num_classes)]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < num_classes:
        raise PipelineError(
            f"{path}: {len(names)} class names, but labels go up to {num_classes - 1}"
        )
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: class names are not unique")
    return names


def load_idx(data) -> Dataset:
    """MNIST-format files in `data.path` (e.g. MNIST, Fashion-MNIST); names from classes.txt if present."""
    folder = _existing_folder(data.path)
    arrays = {}
    for role in IDX_FILES:
        path = _find_idx_file(folder, role)
        arrays[role] = read_idx(path, ndim=3 if role.endswith("images") else 1)
        arrays[role + "_path"] = path
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise PipelineError(
                f"{arrays[f'{split}_labels_path']}: {len(labels)} labels for "
                f"{len(images)} images in {arrays[f'{split}_images_path'].name}"
            )
        h, w = images.shape[1:]
        if min(h, w) < data.min_image_side:
            raise PipelineError(
                f"{arrays[f'{split}_images_path']}: images are {w}x{h}, smaller than "
                f"data.min_image_side {data.min_image_side}"
            )
    num_classes = (
        int(max(arrays["train_labels"].max(initial=0), arrays["test_labels"].max(initial=0))) + 1
    )
    return Dataset(
        train_images=_gray_to(arrays["train_images"], data.channels),
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=_gray_to(arrays["test_images"], data.channels),
        test_labels=arrays["test_labels"].astype(np.int64),
        class_names=_idx_class_names(folder, num_classes),
        source="idx",
        channels=data.channels,
    )


def image_extensions() -> set[str]:
    """File extensions PIL can open (lower case, with the dot)."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _scan_classes(root: Path, exts: set[str]) -> dict[str, list[str]]:
    """Class name -> sorted image paths, for the class sub-folders of `root`."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            str(p)
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
        )
        if not files:
            raise PipelineError(f"{folder}: class folder has no image files")
        classes[folder.name] = files
    if len(classes) < 2:
        found = f"only '{next(iter(classes))}'" if classes else "none"
        raise PipelineError(
            f"{root}: an image folder needs at least 2 class sub-folders, found {found}"
        )
    return classes


def load_imagefolder(data, seed: int) -> Dataset:
    """Class sub-folders of images: `train/` + `test/` splits, or one pool split by test_fraction.

    Every file's header is checked here (format, limits); pixels are decoded later, on access.
    Files whose extension PIL does not know, and hidden files, are skipped.
    """
    root = _existing_folder(data.path)
    exts = image_extensions()
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        missing = "test" if has_train else "train"
        raise PipelineError(
            f"{root}: has {'train' if has_train else 'test'}/ but no {missing}/ (need both, or neither)"
        )
    if has_train:
        train = _scan_classes(root / "train", exts)
        test = _scan_classes(root / "test", exts)
        if set(train) != set(test):
            only = sorted(set(train) ^ set(test))
            raise PipelineError(
                f"{root}: train/ and test/ have different classes (differ in {only})"
            )
        names = list(train)
        splits = {}
        for split, classes in (("train", train), ("test", test)):
            paths = [p for c in names for p in classes[c]]
            labels = np.array([i for i, c in enumerate(names) for _ in classes[c]], dtype=np.int64)
            splits[split] = (paths, labels)
    else:
        classes = _scan_classes(root, exts)
        names = list(classes)
        paths = [p for c in names for p in classes[c]]
        labels = np.array([i for i, c in enumerate(names) for _ in classes[c]], dtype=np.int64)
        train_idx, test_idx = stratified_split(labels, data.test_fraction, seed)
        splits = {
            "train": ([paths[i] for i in train_idx], labels[train_idx]),
            "test": ([paths[i] for i in test_idx], labels[test_idx]),
        }
    for paths, _ in splits.values():
        for path in paths:
            check_image_file(path, data.min_image_side, data.max_image_pixels)

    def files(paths: list[str]) -> ImageFiles:
        return ImageFiles(tuple(paths), data.channels, data.min_image_side, data.max_image_pixels)

    return Dataset(
        train_images=files(splits["train"][0]),
        train_labels=splits["train"][1],
        test_images=files(splits["test"][0]),
        test_labels=splits["test"][1],
        class_names=names,
        source="imagefolder",
        channels=data.channels,
    )


def _existing_folder(path: str | None) -> Path:
    if not path:
        raise PipelineError("data.path: not set (the idx and imagefolder sources need a folder)")
    folder = Path(path)
    if not folder.exists():
        raise PipelineError(f"data.path: {folder} does not exist")
    if not folder.is_dir():
        raise PipelineError(f"data.path: {folder} is not a folder")
    return folder


def load_source(data, seed: int) -> Dataset:
    """Load the images that `data.source` names.

    Args:
        data: the `data` params section (src.config.DataParams).
        seed: base.seed, for the digits and single-pool imagefolder test splits.
    Returns:
        A Dataset with at least 2 classes and non-empty train and test splits.
    """
    if data.source == "digits":
        ds = load_digits(data, seed)
    elif data.source == "idx":
        ds = load_idx(data)
    elif data.source == "imagefolder":
        ds = load_imagefolder(data, seed)
    else:
        raise PipelineError(
            f"data.source: unknown source {data.source!r} (expected digits, idx, imagefolder)"
        )
    where = data.path or data.source
    for split, labels in (("train", ds.train_labels), ("test", ds.test_labels)):
        if len(labels) == 0:
            raise PipelineError(f"{where}: the {split} split has no images")
    if len(np.unique(ds.train_labels)) < 2:
        raise PipelineError(f"{where}: the train split has a single class; need at least 2")
    return ds
