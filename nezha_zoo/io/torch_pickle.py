"""Read ``pytorch_model.bin`` without torch, accepting tensors and nothing else.

``torch.save`` writes a zip archive: ``<name>/data.pkl`` (a pickle of the state dict whose tensors
refer to storages by key) and ``<name>/data/<key>`` (raw little-endian storage bytes).  The unpickler
here resolves only the handful of globals a state dict needs (``OrderedDict``, the typed storages,
``_rebuild_tensor_v2``, ``_rebuild_parameter``) and refuses every other one, which is the guarantee
``torch.load(weights_only=True)`` gives, without importing torch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from nezha_zoo.io.dtype_names import TORCH_STORAGE_DTYPES, numpy_dtype_named

__all__ = ["load_torch_file", "UnsafePickleError"]


class UnsafePickleError(ValueError):
    """The pickle needs more than tensors (code, custom classes): refused."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        try:
            self.dtype = numpy_dtype_named(TORCH_STORAGE_DTYPES[name])
        except ImportError as e:  # pragma: no cover - ml_dtypes ships with jax and tensorflow
            raise ValueError(f"checkpoint holds {name} tensors; install ml_dtypes to read them") from e


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, np.ndarray):
        raise UnsafePickleError(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage")
    size, stride = tuple(size), tuple(stride)
    # Non-negative integer geometry only: as_strided does no bounds checks of its own.
    if len(size) != len(stride) or not all(_is_index(v) for v in (storage_offset, *size, *stride)):
        raise ValueError(f"invalid tensor geometry (offset {storage_offset!r}, size {size}, stride {stride})")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)  # an empty tensor reads no storage
    if not size:
        if storage_offset >= storage.size:
            raise ValueError(f"scalar tensor at offset {storage_offset} overruns its storage ({storage.size} elements)")
        return np.array(storage[storage_offset], dtype=storage.dtype)
    needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if needed > storage.size:
        raise ValueError(f"tensor of shape {size} overruns its storage ({storage.size} elements)")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)  # an owned, contiguous copy


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(fh)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafePickleError(
            f"{self._path}: refusing to unpickle {module}.{name}; only tensors and plain containers are "
            f"accepted (like torch.load(weights_only=True))"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) == 5):
            raise UnsafePickleError(f"{self._path}: unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise UnsafePickleError(f"{self._path}: storage of unknown type {stype!r}")
        key = str(key)
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError as e:
                raise ValueError(f"{self._path}: storage {key} is missing from the archive") from e
            arr = np.frombuffer(raw, dtype=stype.dtype.newbyteorder("<"))
            if arr.size < numel:
                raise ValueError(f"{self._path}: storage {key} is truncated ({arr.size} of {numel} elements)")
            self._storages[key] = arr
        return self._storages[key]


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save`` state dict into numpy arrays; refuse anything that is not tensors."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format torch checkpoint (truncated, corrupt, or the pre-1.6 legacy format; "
            f"re-save it with a current torch)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkls) != 1:
                raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pkls)}")
            prefix = pkls[0].rpartition("/")[0]
            data = archive.read(pkls[0])
            obj = _Unpickler(io.BytesIO(data), archive, prefix, path).load()
    except UnsafePickleError as e:
        if str(e).startswith(path):
            raise
        raise UnsafePickleError(f"{path}: {e}") from e
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, TypeError, IndexError, AttributeError, KeyError) as e:
        raise ValueError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from e
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: {e}") from e
    if not isinstance(obj, dict):
        raise UnsafePickleError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise UnsafePickleError(f"{path}: entry {k!r} is not a named tensor")
        out[k] = v
    return out
