"""The one table of tensor dtype names used by the checkpoint formats.

Safetensors headers name dtypes ``F32``, ``BF16``, ``I64``...; torch pickles name typed storages
(``FloatStorage``...); msgpack and HDF5 files and numpy use numpy's names (``float32``,
``bfloat16``...).  Every reader and writer converts through this module, so a dtype is added in one
place.  bfloat16 and float8 come from ``ml_dtypes`` (which ships with jax and tensorflow).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "SAFETENSORS_DTYPES",
    "TORCH_STORAGE_DTYPES",
    "numpy_dtype_named",
    "safetensors_name",
    "from_safetensors_name",
]

#: Safetensors dtype name -> numpy dtype name.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

_NUMPY_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

#: torch typed-storage class name (in a ``pytorch_model.bin`` pickle) -> numpy dtype name.
TORCH_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

#: Names numpy itself lacks, found in ``ml_dtypes``.
_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def numpy_dtype_named(name: str) -> np.dtype:
    """The numpy dtype called ``name`` (``"float32"``, ``"bfloat16"``...; the last two through ``ml_dtypes``).

    Raises:
        ImportError: ``name`` needs ``ml_dtypes``, which is not installed.
        TypeError: numpy knows no dtype called ``name``.
    """
    if name in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError as e:  # pragma: no cover - ml_dtypes ships with jax and tensorflow
            raise ImportError(f"{name} tensors need the ml_dtypes package (pip install ml_dtypes)") from e
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def safetensors_name(dtype: Any) -> str | None:
    """The safetensors name of a numpy dtype (or dtype name), ``None`` when safetensors cannot store it."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return _NUMPY_TO_SAFETENSORS.get(name)


def from_safetensors_name(st_dtype: str) -> np.dtype | None:
    """The numpy dtype of a safetensors dtype name, ``None`` for a name this table does not know."""
    name = SAFETENSORS_DTYPES.get(st_dtype)
    return None if name is None else numpy_dtype_named(name)
