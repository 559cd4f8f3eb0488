"""Read checkpoints in transformers' PyTorch layout with numpy + safetensors.

``model.safetensors``; sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``; ``pytorch_model.bin`` (and its sharded index), unpickled by a
restricted reader that accepts tensors and nothing else (:mod:`nezha_zoo.io.torch_pickle`).  Tensors
are read lazily, one at a time, so loading never holds the checkpoint and the model in memory twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from nezha_zoo.io.dtype_names import from_safetensors_name, safetensors_name
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.safetensors_file import check_length, drop_cached_pages, read_exactly, read_header, read_raw
from nezha_zoo.io.shards import (
    PT_WEIGHTS_INDEX_NAME,
    PT_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    read_index,
)

__all__ = ["CheckpointReader", "open_checkpoint"]

#: Safetensors dtypes the ``safetensors`` package cannot hand to numpy: read from their bytes.
_RAW_DTYPES = ("BF16", "F8_E4M3", "F8_E5M2")


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
                index_map = read_index(p, index)
                files = list(dict.fromkeys(index_map.values()))  # each shard once, in index order
                if fmt == "safetensors":
                    self._index_safetensors(files, expected=index_map)
                else:
                    self._load_bin(files, expected=index_map)
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

    def _index_safetensors(self, files: list[str], expected: Mapping[str, str] | None = None) -> None:
        from safetensors import SafetensorError, safe_open

        for f in files:
            try:
                h = safe_open(f, framework="np")
                keys = list(h.keys())
                meta = h.metadata() or {}
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
            check_length(f)
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
        from nezha_zoo.io.torch_pickle import load_torch_file

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
            name = self._eager[key].dtype.name
            return safetensors_name(name) or name.upper()
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
            if self.dtype(key) in _RAW_DTYPES:
                return read_raw(f, key, self.dtype(key), self.shape(key))
            raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from e

    def get_slice(self, key: str, index: tuple) -> np.ndarray:
        """Read ``tensor[index]`` (a tuple of slices, one per axis), reading only that block where the
        format allows (safetensors); sharded loaders read each device's block this way."""
        if key not in self._files:
            raise KeyError(f"checkpoint {self.path!r} has no tensor {key!r}")
        if self._eager is not None or self.dtype(key) in _RAW_DTYPES:
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
            self._headers[f] = read_header(f)
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
        dtype = from_safetensors_name(st_dtype)
        if dtype is None:
            return self.get(key)  # a dtype this package does not know: through safetensors' own reader
        out = np.empty(shape, dtype=dtype)
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            read_exactly(fh, out.reshape(-1).view(np.uint8), path, key)
        drop_cached_pages(path, offset, out.nbytes)
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
    """A :class:`CheckpointReader` on ``path`` (a checkpoint directory or one weights file); use it in
    a ``with`` block so its files are closed."""
    return CheckpointReader(path)
