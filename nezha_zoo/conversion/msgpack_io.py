"""Flax's msgpack checkpoints, read and written a tensor at a time without importing flax.

``flax.serialization.to_bytes`` writes a nested msgpack map whose leaves are msgpack *ext* objects
of type 1, each holding ``[shape, dtype name, raw C-order bytes]``; an array above 2**30 bytes is
split into a map ``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0":
<ext>, ...}}`` of flat pieces.  Reading scans only the headers (seeking over tensor data) and
records where each tensor's bytes lie; a tensor is then read straight into one numpy array.
Writing emits map headers and entries in tree order, each tensor's bytes written from the array's
own memory, so neither direction ever holds more than one tensor.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from nezha_zoo.io.dtype_names import numpy_dtype_named
from nezha_zoo.io.errors import CheckpointError

__all__ = ["MsgpackLeaf", "scan_msgpack", "read_leaf", "write_msgpack_tree", "MAX_CHUNK_SIZE"]

#: flax.serialization.MAX_CHUNK_SIZE: arrays larger than this are stored in flat chunks.
MAX_CHUNK_SIZE = 2**30
_EXT_NDARRAY = 1  # flax's _MsgpackExtType.ndarray
_CHUNKED = "__msgpack_chunked_array__"


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MsgpackLeaf:
    """Where one array's bytes lie in a msgpack file: ``pieces`` are ``(offset, nbytes)`` in order."""

    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[tuple[int, int], ...]


class _Scanner:
    """A minimal msgpack reader over a seekable file that skips binary payloads instead of reading them."""

    def __init__(self, fh: BinaryIO, path: str, size: int):
        self.fh, self.path, self.size = fh, path, size

    def _read(self, n: int) -> bytes:
        b = self.fh.read(n)
        if len(b) < n:
            raise CheckpointError(f"{self.path}: truncated msgpack file (ends at byte {self.fh.tell()})")
        return b

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._read(n), "big")

    def _skip(self, n: int) -> int:
        pos = self.fh.tell()
        if pos + n > self.size:
            raise CheckpointError(f"{self.path}: truncated msgpack file (a payload at byte {pos} runs past the end)")
        self.fh.seek(n, os.SEEK_CUR)
        return pos

    def value(self) -> Any:
        """The next object; maps become dicts, ext objects become ``("ext", code, offset, length)``."""
        t = self._read(1)[0]
        if t <= 0x7F:
            return t
        if t >= 0xE0:
            return t - 0x100
        if 0x80 <= t <= 0x8F:
            return self._map(t & 0x0F)
        if 0x90 <= t <= 0x9F:
            return [self.value() for _ in range(t & 0x0F)]
        if 0xA0 <= t <= 0xBF:
            return self._str(t & 0x1F)
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if t in simple:
            return simple[t]
        if t in (0xC4, 0xC5, 0xC6):  # bin 8/16/32: recorded, not read
            n = self._uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[t])
            return ("bin", self._skip(n), n)
        if t in (0xC7, 0xC8, 0xC9):  # ext 8/16/32
            n = self._uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[t])
            code = self._read(1)[0]
            return ("ext", code, self._skip(n), n)
        if 0xD4 <= t <= 0xD8:  # fixext 1..16
            n = 1 << (t - 0xD4)
            code = self._read(1)[0]
            return ("ext", code, self._skip(n), n)
        if t in (0xCA, 0xCB):
            return struct.unpack(">f" if t == 0xCA else ">d", self._read(4 if t == 0xCA else 8))[0]
        if 0xCC <= t <= 0xCF:
            return self._uint(1 << (t - 0xCC))
        if 0xD0 <= t <= 0xD3:
            n = 1 << (t - 0xD0)
            return int.from_bytes(self._read(n), "big", signed=True)
        if t in (0xD9, 0xDA, 0xDB):
            return self._str(self._uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[t]))
        if t in (0xDC, 0xDD):
            return [self.value() for _ in range(self._uint(2 if t == 0xDC else 4))]
        if t in (0xDE, 0xDF):
            return self._map(self._uint(2 if t == 0xDE else 4))
        raise CheckpointError(f"{self.path}: corrupt msgpack file (byte 0x{t:02x} at {self.fh.tell() - 1})")

    def _str(self, n: int) -> str:
        try:
            return self._read(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path}: corrupt msgpack file (bad string at {self.fh.tell() - n})") from e

    def _map(self, n: int) -> dict:
        out: dict = {}
        for _ in range(n):
            k = self.value()
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{self.path}: corrupt msgpack file (a map key is {type(k).__name__})")
            out[str(k)] = self.value()
        return out

    def ndarray(self, ext: tuple, where: str) -> MsgpackLeaf:
        """Parse an ndarray ext payload's small header; the data is recorded, not read."""
        _, code, offset, length = ext
        if code != _EXT_NDARRAY:
            raise CheckpointError(f"{self.path}: {where} is msgpack ext type {code}, not a flax ndarray")
        back = self.fh.tell()
        self.fh.seek(offset)
        inner = self.value()
        self.fh.seek(back)
        ok = isinstance(inner, list) and len(inner) == 3 and isinstance(inner[0], list) and isinstance(inner[1], str)
        if not ok or not (isinstance(inner[2], tuple) and inner[2][0] == "bin"):
            raise CheckpointError(f"{self.path}: {where} is not a flax ndarray record")
        shape, dtype, (_, data_at, nbytes) = tuple(int(d) for d in inner[0]), inner[1], inner[2]
        if data_at + nbytes > offset + length:
            raise CheckpointError(f"{self.path}: {where}: ndarray data overruns its record")
        try:
            itemsize = numpy_dtype_named(dtype).itemsize
        except TypeError as e:
            raise CheckpointError(f"{self.path}: {where} has unknown dtype {dtype!r}") from e
        if int(np.prod(shape, dtype=np.int64)) * itemsize != nbytes:
            raise CheckpointError(f"{self.path}: {where}: {nbytes} bytes do not fill shape {shape} of {dtype}")
        return MsgpackLeaf(shape, dtype, ((data_at, nbytes),))


def scan_msgpack(path: str | os.PathLike) -> dict[tuple[str, ...], MsgpackLeaf]:
    """Every array of a flax msgpack file by its tree path, located but not read.

    Args:
        path (str | os.PathLike): the msgpack file.

    Raises:
        CheckpointError: truncated or corrupt file, or a leaf that is not a flax ndarray (named).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        sc = _Scanner(fh, path, size)
        tree = sc.value()
        if fh.tell() != size:
            raise CheckpointError(f"{path}: {size - fh.tell()} stray bytes after the msgpack tree")
        if not isinstance(tree, dict):
            raise CheckpointError(f"{path}: not a flax msgpack tree (top level is {type(tree).__name__})")
        out: dict[tuple[str, ...], MsgpackLeaf] = {}

        def walk(node: Any, prefix: tuple[str, ...]) -> None:
            where = "/".join(prefix) or "<root>"
            if isinstance(node, dict) and node.get(_CHUNKED) is True:
                try:
                    shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
                    chunks = [sc.ndarray(node["chunks"][str(i)], where) for i in range(len(node["chunks"]))]
                except (KeyError, TypeError) as e:
                    raise CheckpointError(f"{path}: {where}: malformed chunked array ({e})") from e
                dtypes = {c.dtype for c in chunks}
                total = sum(n for c in chunks for _, n in c.pieces)
                if len(dtypes) != 1:
                    raise CheckpointError(f"{path}: {where}: chunks of different dtypes {sorted(dtypes)}")
                dtype = dtypes.pop()
                if int(np.prod(shape, dtype=np.int64)) * numpy_dtype_named(dtype).itemsize != total:
                    raise CheckpointError(f"{path}: {where}: chunks do not fill shape {shape}")
                out[prefix] = MsgpackLeaf(shape, dtype, tuple(p for c in chunks for p in c.pieces))
            elif isinstance(node, dict):
                for k, v in node.items():
                    walk(v, (*prefix, k))
            elif isinstance(node, tuple) and node[0] == "ext":
                out[prefix] = sc.ndarray(node, where)
            else:
                raise CheckpointError(f"{path}: {where} holds a {type(node).__name__}, not an array")

        walk(tree, ())
    return out


def read_leaf(path: str | os.PathLike, leaf: MsgpackLeaf) -> np.ndarray:
    """Read one located array into a fresh numpy array.

    Args:
        path (str | os.PathLike): the msgpack file.
        leaf (MsgpackLeaf): from :func:`scan_msgpack`.
    """
    arr = np.empty(leaf.shape, dtype=numpy_dtype_named(leaf.dtype))
    flat = arr.reshape(-1).view(np.uint8)
    pos = 0
    with open(path, "rb") as fh:
        for offset, nbytes in leaf.pieces:
            fh.seek(offset)
            got = fh.readinto(memoryview(flat[pos : pos + nbytes]))
            if got != nbytes:
                raise CheckpointError(f"{os.fspath(path)}: truncated msgpack file (array data at byte {offset})")
            pos += nbytes
    return arr


# --- writing -------------------------------------------------------------------------------------


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return (b"\xde" + n.to_bytes(2, "big")) if n < 2**16 else (b"\xdf" + n.to_bytes(4, "big"))


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    n = len(b)
    if n < 32:
        head = bytes([0xA0 | n])
    elif n < 2**8:
        head = b"\xd9" + n.to_bytes(1, "big")
    elif n < 2**16:
        head = b"\xda" + n.to_bytes(2, "big")
    else:
        head = b"\xdb" + n.to_bytes(4, "big")
    return head + b


def _int(v: int) -> bytes:
    if 0 <= v < 128:
        return bytes([v])
    for code, n in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if v < 2 ** (8 * n):
            return bytes([code]) + v.to_bytes(n, "big")
    raise ValueError(f"dimension {v} too large for msgpack")


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else (b"\xdc" + n.to_bytes(2, "big"))


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    return (b"\xc5" + n.to_bytes(2, "big")) if n < 2**16 else (b"\xc6" + n.to_bytes(4, "big"))


def _ext_header(n: int, code: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    if n < 2**8:
        return b"\xc7" + n.to_bytes(1, "big") + bytes([code])
    if n < 2**16:
        return b"\xc8" + n.to_bytes(2, "big") + bytes([code])
    return b"\xc9" + n.to_bytes(4, "big") + bytes([code])


def _write_ndarray(fh: BinaryIO, arr: np.ndarray) -> None:
    """One flax ndarray ext record, the data written from the array's memory."""
    inner = _array_header(3) + _array_header(arr.ndim) + b"".join(_int(int(d)) for d in arr.shape)
    inner += _str(arr.dtype.name) + _bin_header(arr.nbytes)
    fh.write(_ext_header(len(inner) + arr.nbytes, _EXT_NDARRAY))
    fh.write(inner)
    if arr.nbytes:
        fh.write(memoryview(arr.reshape(-1).view(np.uint8)))


def _write_array(fh: BinaryIO, arr: np.ndarray) -> None:
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    if arr.nbytes <= MAX_CHUNK_SIZE:
        _write_ndarray(fh, arr)
        return
    # flax's own layout for oversized arrays (what flax.serialization.to_bytes writes for numpy leaves).
    flat = arr.reshape(-1)
    step = max(1, MAX_CHUNK_SIZE // arr.dtype.itemsize)
    starts = range(0, flat.size, step)
    fh.write(_map_header(3) + _str(_CHUNKED) + b"\xc3")
    fh.write(_str("shape") + _map_header(arr.ndim))
    for i, d in enumerate(arr.shape):
        fh.write(_str(str(i)) + _int(int(d)))
    fh.write(_str("chunks") + _map_header(len(starts)))
    for i, s in enumerate(starts):
        fh.write(_str(str(i)))
        _write_ndarray(fh, flat[s : s + step])


def write_msgpack_tree(
    path: str | os.PathLike,
    paths: Iterable[tuple[str, ...]],
    fetch: Callable[[tuple[str, ...]], np.ndarray],
) -> list[tuple[str, ...]]:
    """Write a nested map with an array at each of ``paths``; ``fetch(path)`` is called once per leaf.

    Leaves are fetched and written in depth-first tree order (the order keys first appear in
    ``paths``), one at a time.  Returns the leaf paths in the order they were written.

    Args:
        path (str | os.PathLike): output file.
        paths (Iterable[tuple[str, ...]]): leaf paths.
        fetch (Callable[[tuple[str, ...]], np.ndarray]): the array at a path.
    """
    tree: dict[str, Any] = {}
    for p in paths:
        node = tree
        for part in p[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{'/'.join(p)}: {part!r} is both an array and a subtree")
            node = child
        if p[-1] in node:
            raise ValueError(f"{'/'.join(p)} given twice or is both an array and a subtree")
        node[p[-1]] = None
    order: list[tuple[str, ...]] = []
    with open(path, "wb") as fh:

        def emit(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
            fh.write(_map_header(len(node)))
            for k, v in node.items():
                fh.write(_str(k))
                if v is None:
                    _write_array(fh, fetch((*prefix, k)))
                    order.append((*prefix, k))
                else:
                    emit(v, (*prefix, k))

        emit(tree, ())
        fh.flush()
        os.fsync(fh.fileno())
    return order
