"""Checkpoint files in transformers' PyTorch layout, read and written with numpy + safetensors.

Reading: ``model.safetensors``; sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``; ``pytorch_model.bin`` (and its sharded index), unpickled by a
restricted reader that accepts tensors and nothing else.  Tensors are read lazily, one at a time, so
loading never holds the checkpoint and the model in memory twice.

Writing: ``model.safetensors``, sharded above ``max_shard_size``, with metadata ``{"format": "pt"}``
so transformers reads it.  Files are staged and moved into place only when all are complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from nezha_zoo._io import atomic_write_text, staged_directory

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "open_checkpoint",
    "save_state_dict",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "PT_WEIGHTS_NAME",
    "PT_WEIGHTS_INDEX_NAME",
    "parse_size",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

#: Default shard limit of ``save_pretrained`` (transformers uses 5GB too).
DEFAULT_MAX_SHARD_SIZE = "5GB"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model."""


def parse_size(size: int | str) -> int:
    """``"5GB"``/``"500MB"``/``"2GiB"``/int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '500MB' or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(num * scale[unit])


# --- reading -------------------------------------------------------------------------------------


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint directory (or a single weights file).

    ``keys()``, ``shape(key)`` and ``dtype(key)`` read only headers; ``get(key)`` reads one tensor as
    a numpy array (bfloat16 through ``ml_dtypes`` when installed).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._files: dict[str, str] = {}  # key -> file
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}  # file -> parsed header (location())
        self._eager: dict[str, np.ndarray] | None = None
        self.metadata: dict[str, str] = {}
        self.format = self._discover()

    # discovery ------------------------------------------------------------------------------------

    def _discover(self) -> str:
        p = self.path
        if os.path.isfile(p):
            if p.endswith(".safetensors"):
                self._index_safetensors([p])
                return "safetensors"
            if p.endswith(".bin") or p.endswith(".pt"):
                self._load_bin([p])
                return "pytorch-bin"
            raise CheckpointError(f"{p}: not a .safetensors or .bin weights file")
        if not os.path.isdir(p):
            raise FileNotFoundError(f"no checkpoint at {p!r}")
        for index_name, fmt in ((SAFE_WEIGHTS_INDEX_NAME, "safetensors"), (PT_WEIGHTS_INDEX_NAME, "pytorch-bin")):
            index = os.path.join(p, index_name)
            if os.path.isfile(index):
                files = self._read_index(index)
                if fmt == "safetensors":
                    self._index_safetensors(files, expected=self._index_map)
                else:
                    self._load_bin(files, expected=self._index_map)
                return f"{fmt}-sharded"
        single = os.path.join(p, SAFE_WEIGHTS_NAME)
        if os.path.isfile(single):
            self._index_safetensors([single])
            return "safetensors"
        single = os.path.join(p, PT_WEIGHTS_NAME)
        if os.path.isfile(single):
            self._load_bin([single])
            return "pytorch-bin"
        present = sorted(os.listdir(p))
        raise FileNotFoundError(
            f"no weights in {p!r}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, {PT_WEIGHTS_NAME} "
            f"or {PT_WEIGHTS_INDEX_NAME}; found {present}"
        )

    def _read_index(self, index: str) -> list[str]:
        try:
            with open(index, encoding="utf-8") as fh:
                data = json.load(fh)
            weight_map = data["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
        self._index_map: dict[str, str] = {}
        files: list[str] = []
        for key, shard in weight_map.items():
            if os.path.basename(shard) != shard:
                raise CheckpointError(f"{index}: shard {shard!r} of {key!r} is not a plain file name")
            full = os.path.join(self.path, shard)
            if not os.path.isfile(full):
                raise CheckpointError(f"{index}: shard {shard!r} (holding {key!r}) is missing")
            self._index_map[key] = full
            if full not in files:
                files.append(full)
        return files

    def _index_safetensors(self, files: list[str], expected: Mapping[str, str] | None = None) -> None:
        from safetensors import SafetensorError, safe_open

        for f in files:
            try:
                h = safe_open(f, framework="np")
                keys = list(h.keys())
                meta = h.metadata() or {}
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
            _check_safetensors_length(f)
            self._handles[f] = h
            self.metadata.update(meta)
            for k in keys:
                if k in self._files:
                    raise CheckpointError(f"tensor {k!r} appears in both {self._files[k]} and {f}")
                self._files[k] = f
        if expected is not None:
            self._check_index(expected)

    def _check_index(self, expected: Mapping[str, str]) -> None:
        for k, f in expected.items():
            if self._files.get(k) != f:
                raise CheckpointError(f"index says {k!r} is in {os.path.basename(f)}, but that shard does not hold it")
        stray = set(self._files) - set(expected)
        if stray:
            raise CheckpointError(f"shards hold tensors the index does not list: {sorted(stray)[:5]}")

    def _load_bin(self, files: list[str], expected: Mapping[str, str] | None = None) -> None:
        from nezha_zoo.torch_pickle import load_torch_file

        self._eager = {}
        for f in files:
            for k, v in load_torch_file(f).items():
                if k in self._eager:
                    raise CheckpointError(f"tensor {k!r} appears in more than one shard")
                self._eager[k] = v
                self._files[k] = f
        if expected is not None:
            self._check_index(expected)

    # access ---------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def _slice(self, key: str):
        return self._handles[self._files[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._eager is not None:
            return tuple(self._eager[key].shape)
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """Safetensors dtype name (``F32``, ``BF16``, ``I64``...)."""
        if self._eager is not None:
            return _NP_TO_ST.get(self._eager[key].dtype.name, self._eager[key].dtype.name.upper())
        return self._slice(key).get_dtype()

    def get(self, key: str) -> np.ndarray:
        """Read one tensor."""
        if key not in self._files:
            raise KeyError(f"checkpoint {self.path!r} has no tensor {key!r}")
        if self._eager is not None:
            return self._eager[key]
        f = self._files[key]
        try:
            return self._handles[f].get_tensor(key)
        except Exception as e:  # safetensors raises its own types for dtypes numpy lacks
            if self.dtype(key) in ("BF16", "F8_E4M3", "F8_E5M2"):
                return _read_raw(f, key, self.dtype(key), self.shape(key))
            raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from e

    def get_slice(self, key: str, index: tuple) -> np.ndarray:
        """Read ``tensor[index]`` (a tuple of slices, one per axis), reading only that block where the
        format allows (safetensors); sharded loaders read each device's block this way."""
        if key not in self._files:
            raise KeyError(f"checkpoint {self.path!r} has no tensor {key!r}")
        if self._eager is not None or self.dtype(key) in ("BF16", "F8_E4M3", "F8_E5M2"):
            return np.asarray(self.get(key))[index]  # numpy cannot slice these lazily
        return self._slice(key)[index]

    def location(self, key: str) -> tuple[str, int, str, tuple[int, ...]] | None:
        """``(file, byte offset of the data, safetensors dtype, shape)`` of a safetensors tensor.

        Lets a loader read a tensor in pieces straight into its destination (no whole-tensor copy,
        no mapped pages); ``None`` for tensors of an unpickled ``.bin`` checkpoint.
        """
        if key not in self._files:
            raise KeyError(f"checkpoint {self.path!r} has no tensor {key!r}")
        if self._eager is not None:
            return None
        f = self._files[key]
        if f not in self._headers:
            self._headers[f] = _header(f)
        n, header = self._headers[f]
        entry = header[key]
        return f, 8 + n + int(entry["data_offsets"][0]), entry["dtype"], tuple(entry["shape"])

    def read(self, key: str) -> np.ndarray:
        """Read one tensor into a fresh array with plain file reads (no memory map).

        ``get`` goes through safetensors' memory map, whose pages stay resident in this process
        until the file is closed; a converter streaming a large checkpoint reads with this instead,
        so only the tensor in hand is resident.  Tensors of a ``.bin`` checkpoint come from memory.
        """
        loc = self.location(key)
        if loc is None:
            return self.get(key)
        path, offset, st_dtype, shape = loc
        names = {v: k for k, v in _NP_TO_ST.items()}
        if st_dtype not in names:
            return self.get(key)  # e.g. float8: through safetensors' own reader
        if st_dtype == "BF16":
            import ml_dtypes

            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(names[st_dtype])
        out = np.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{path}: truncated while reading tensor {key!r}")
                got += n
        _drop_cached_pages(path, offset, out.nbytes)
        return out

    def close(self) -> None:
        self._handles.clear()
        self._headers.clear()
        self._eager = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    return CheckpointReader(path)


_NP_TO_ST = {
    "float32": "F32",
    "float16": "F16",
    "float64": "F64",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def _header(path: str) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(raw, "little")
        header = fh.read(n)
    if len(header) < n:
        raise CheckpointError(f"{path}: truncated safetensors header")
    return n, json.loads(header)


def _check_safetensors_length(path: str) -> None:
    """Safetensors maps lazily; check the data section is complete before trusting the file."""
    n, header = _header(path)
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    size = os.path.getsize(path)
    if size < 8 + n + end:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")


def _read_raw(path: str, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        import ml_dtypes
    except ImportError as e:  # pragma: no cover - ml_dtypes ships with jax and tensorflow
        raise CheckpointError(f"{path}: tensor {key!r} is {dtype}; install ml_dtypes to read it") from e
    np_dtype = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[dtype]
    n, header = _header(path)
    start, stop = header[key]["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(8 + n + start)
        buf = fh.read(stop - start)
    return np.frombuffer(bytearray(buf), dtype=np_dtype).reshape(shape)  # writable, like get_tensor


# --- writing -------------------------------------------------------------------------------------


def _nbytes(a: np.ndarray) -> int:
    return int(a.size) * a.dtype.itemsize


def _write_safetensors(path: str, items: list[tuple[str, np.ndarray]], metadata: Mapping[str, str]) -> None:
    """Write one safetensors file straight from the arrays' memory (no serialised copy of the shard).

    The format: 8-byte little-endian header length, a JSON header (space-padded to 8 bytes) giving
    each tensor's dtype, shape and byte range, then the raw little-endian data in that order.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, arr in items:
        st = _NP_TO_ST.get(arr.dtype.name)
        if st is None:
            raise ValueError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + _nbytes(arr)]}
        offset += _nbytes(arr)
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


def save_state_dict(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` (or shards + index) into ``directory``.

    ``tensors`` is a mapping or an iterable of ``(name, array)`` pairs (float32, bfloat16 via
    ``ml_dtypes``, or any dtype safetensors stores).  An iterable is consumed as it goes: each shard is
    written once it is full and its arrays are released, so a model can be saved without a second
    full copy of its weights in memory.  An exception raised by the iterable leaves ``directory`` as
    it was.  ``extra_files`` (name -> text, e.g. ``config.json``) are written in the same staged commit.
    Weight files from an earlier save that the new one does not use are removed afterwards.
    Returns the file names written.
    """
    directory = os.fspath(directory)
    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **dict(metadata or {})}
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    written: list[str] = []
    with staged_directory(directory) as stage:
        parts: list[tuple[str, list[str], int]] = []  # (staged file, its keys, its bytes)
        shard: list[tuple[str, np.ndarray]] = []
        size = 0

        def flush() -> None:
            part = os.path.join(stage, f".part-{len(parts):05d}")
            _write_safetensors(part, shard, meta)
            parts.append((part, [k for k, _ in shard], size))

        seen: set[str] = set()
        for key, arr in pairs:
            if key in seen:
                raise ValueError(f"tensor {key!r} given twice")
            seen.add(key)
            arr = np.asarray(arr)
            if not arr.flags.c_contiguous:
                arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d tensor into shape (1,))
            if shard and size + _nbytes(arr) > limit:
                flush()
                shard, size = [], 0
            shard.append((key, arr))
            size += _nbytes(arr)
        if shard or not parts:
            flush()
        shard = []
        if len(parts) == 1:
            os.replace(parts[0][0], os.path.join(stage, SAFE_WEIGHTS_NAME))
            written.append(SAFE_WEIGHTS_NAME)
        else:
            weight_map: dict[str, str] = {}
            for i, (part, keys, _) in enumerate(parts, 1):
                name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                os.replace(part, os.path.join(stage, name))
                written.append(name)
                weight_map.update(dict.fromkeys(keys, name))
            total = sum(n for _, _, n in parts)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_text(os.path.join(stage, SAFE_WEIGHTS_INDEX_NAME), json.dumps(index, indent=2) + "\n")
            written.append(SAFE_WEIGHTS_INDEX_NAME)
        for name, text in (extra_files or {}).items():
            atomic_write_text(os.path.join(stage, name), text)
            written.append(name)
    _remove_stale_weights(directory, keep=set(written))
    return written


_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)$")


def _remove_stale_weights(directory: str, keep: set[str]) -> None:
    for name in os.listdir(directory):
        if _WEIGHT_FILE.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))


def _drop_cached_pages(path: str, offset: int, length: int) -> None:
    """Advise the kernel that bytes just read will not be read again (keeps a large conversion from
    evicting other users' page cache; the pages were never mapped into this process)."""
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
