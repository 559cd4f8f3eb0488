"""Atomic file writes: a file either appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_path", "staged_directory"]


def _umask_file_mode() -> int:
    # The process umask can only be read by setting it; do it once, at import, not per write.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


#: Mode of files this package writes: what ``open(path, "w")`` would give.  Temporary files from
#: ``tempfile`` are private (0600) and would otherwise keep that mode after the rename.
_FILE_MODE = _umask_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[str]:
    """Yield an empty staging directory; on success its files are moved into ``target``.

    Files are written to the staging directory first, so a failure part-way leaves ``target`` as it
    was.  Each file then moves into place with an atomic rename (same filesystem).
    """
    target = os.fspath(target)
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(target))}.", suffix=".staging", dir=parent)
    try:
        yield stage
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(stage)):
            staged = os.path.join(stage, name)
            dest = os.path.join(target, name)
            if os.path.isfile(staged):
                os.chmod(staged, _FILE_MODE)
            elif os.path.isdir(dest):  # a folder (sentence-transformers' 1_Pooling) replaces the old one
                shutil.rmtree(dest)
            os.replace(staged, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
