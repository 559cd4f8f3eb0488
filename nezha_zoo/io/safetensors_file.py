"""The safetensors container, read and written with plain file I/O (no memory map).

The format: 8-byte little-endian header length, a JSON header (space-padded to 8 bytes) giving each
tensor's dtype, shape and byte range, then the raw little-endian data in that order.  Lazy reads go
through the ``safetensors`` package (:mod:`nezha_zoo.io.reader`); this module holds what that package
does not do for us: header checks, dtypes numpy lacks, piecewise reads straight into a destination,
and writes straight from the arrays' memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from nezha_zoo.io.dtype_names import from_safetensors_name, safetensors_name
from nezha_zoo.io.errors import CheckpointError

__all__ = [
    "read_header",
    "check_length",
    "read_raw",
    "read_exactly",
    "write_safetensors",
    "drop_cached_pages",
    "nbytes",
]


def read_header(path: str) -> tuple[int, dict[str, Any]]:
    """``(header length, parsed header)`` of a safetensors file; data starts at ``8 + length``."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(raw, "little")
        header = fh.read(n)
    if len(header) < n:
        raise CheckpointError(f"{path}: truncated safetensors header")
    return n, json.loads(header)


def check_length(path: str) -> None:
    """Safetensors maps lazily; check the data section is complete before trusting the file."""
    n, header = read_header(path)
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(path)
    if size < 8 + n + end:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")


def read_raw(path: str, key: str, st_dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Read tensor ``key`` from its bytes: for dtypes the ``safetensors`` package cannot give numpy
    (bfloat16, float8).  Returns a writable array, like ``get_tensor``."""
    try:
        np_dtype = from_safetensors_name(st_dtype)
    except ImportError as e:  # pragma: no cover - ml_dtypes ships with jax and tensorflow
        raise CheckpointError(f"{path}: tensor {key!r} is {st_dtype}; install ml_dtypes to read it") from e
    if np_dtype is None:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {st_dtype}, which cannot be read")
    n, header = read_header(path)
    start, stop = header[key]["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(8 + n + start)
        buf = fh.read(stop - start)
    return np.frombuffer(bytearray(buf), dtype=np_dtype).reshape(shape)


def read_exactly(fh: BinaryIO, out: np.ndarray, path: str, key: str) -> None:
    """Fill the bytes of ``out`` (a uint8 view) from ``fh``; a short file raises naming ``key``."""
    view = memoryview(out)
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{path}: truncated while reading tensor {key!r}")
        got += n


def nbytes(a: np.ndarray) -> int:
    """Bytes of ``a``'s data."""
    return int(a.size) * a.dtype.itemsize


def write_safetensors(path: str, items: list[tuple[str, np.ndarray]], metadata: Mapping[str, str]) -> None:
    """Write one safetensors file straight from the arrays' memory (no serialised copy of the shard).

    ``items`` are C-contiguous arrays of any dtype :data:`~nezha_zoo.io.dtype_names.SAFETENSORS_DTYPES`
    lists; the file is flushed to disk before this returns.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, arr in items:
        st = safetensors_name(arr.dtype)
        if st is None:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes(arr)]}
        offset += nbytes(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, arr in items:
            if arr.size:
                fh.write(memoryview(arr.reshape(-1).view(np.uint8)))
        fh.flush()
        os.fsync(fh.fileno())


def drop_cached_pages(path: str, offset: int, length: int) -> None:
    """Tell the kernel the bytes just read will not be read again (page cache, not RSS).

    The process never maps the data, so nothing is resident on its account; this only keeps a large
    load or conversion from evicting other users' page cache on a small machine.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or length <= 0:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
