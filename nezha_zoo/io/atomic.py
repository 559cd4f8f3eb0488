"""Atomic file writes: a file either appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from nezha_zoo.io.lock import destination_lock, staging_prefix

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_path", "staged_directory", "pause_point", "PAUSE_ENV"]

#: Test hook: ``"<point>:<fifo>"`` makes the writer stop at ``<point>`` (see :func:`pause_point`).
PAUSE_ENV = "NEZHA_ZOO_TEST_PAUSE"


def pause_point(point: str) -> None:
    """Stop here when ``$NEZHA_ZOO_TEST_PAUSE`` is ``"<point>:<fifo>"`` (fault-injection tests only).

    The writer writes its pid into the FIFO (the test reads it: the writer is now paused at
    ``point``, e.g. ``"commit"``: every file staged, none moved into place), then waits until the
    test opens the FIFO for writing and closes it, or kills the writer.  A rendezvous, no timing.
    """
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, fifo = spec.partition(":")
    if name != point or not fifo:
        return
    with open(fifo, "w", encoding="ascii") as fh:
        fh.write(f"{os.getpid()}\n")
    with open(fifo, encoding="ascii") as fh:
        fh.read()


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
    was.  Each file then moves into place with an atomic rename (same filesystem).  The whole block
    holds ``target``'s :func:`~nezha_zoo.io.lock.destination_lock` (a second writer fails at once;
    staging directories of dead runs are removed); the staging directory's name records this
    process's pid (``.NAME.<pid>.XXXXXXXX.staging``).
    """
    target = os.fspath(target)
    parent = os.path.dirname(os.path.abspath(target))
    with destination_lock(target):
        stage = tempfile.mkdtemp(prefix=staging_prefix(target), suffix=".staging", dir=parent)
        try:
            yield stage
            pause_point("commit")
            _commit(stage, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: str, target: str) -> None:
    """Move every entry of ``stage`` into ``target`` (created if absent), one rename each."""
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(stage)):
        staged = os.path.join(stage, name)
        dest = os.path.join(target, name)
        if os.path.isfile(staged):
            os.chmod(staged, _FILE_MODE)
        elif os.path.isdir(dest):  # a folder (sentence-transformers' 1_Pooling) replaces the old one
            shutil.rmtree(dest)
        os.replace(staged, dest)
