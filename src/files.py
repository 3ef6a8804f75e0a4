"""Atomic outputs: a file or folder appears under its final name only once it is complete.

An interrupted stage therefore never leaves something that DVC or a later stage could take for
a finished output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def shared_root(root: str | os.PathLike | None = None) -> Path:
    """Where state that every experiment shares lives: the MLflow store, Ray checkpoints.

    That is the DVC repository's root. `dvc exp run --queue` runs the stages in a temporary copy
    of the repository and sets DVC_ROOT to the real one, so queued experiments log into the same
    store as `dvc repro`. Outside DVC it is `root` (default: the working directory).
    """
    return Path(os.environ.get("DVC_ROOT") or root or Path.cwd()).resolve()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    Args:
        path: the final file name. Its parent folder is created.
        suffix: kept on the temporary name, for writers that choose a format by extension.
    Yields:
        The temporary path to write. On an exception it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file that an earlier stage wrote; a missing or broken one is a PipelineError."""
    from src.errors import PipelineError

    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: not found ({what}); run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({what}): {e}") from None
