"""Weight/compute dtypes shared by the three backends: names in, canonical strings out.

A model's dtype is one of :data:`SUPPORTED` (``"float32"``, ``"bfloat16"``, ``"float16"``).  Users may
name it as a string (``"bf16"``, ``"fp16"``, ``"half"``, ``"float32"``...), as ``None`` (float32), or as
any framework's dtype object (``torch.float16``, ``tf.bfloat16``, ``jnp.bfloat16``, ``np.float32``);
:func:`canonical_dtype` turns each into the canonical string without importing a framework, so every
backend accepts the same spellings and rejects the same mistakes with the same message.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nezha_zoo.io.dtype_names import numpy_dtype_named

__all__ = ["SUPPORTED", "SATURATING_MASK_DTYPES", "canonical_dtype", "numpy_dtype", "itemsize", "saturates_mask_sum"]

#: The dtypes a model's weights and compute may use.
SUPPORTED = ("float32", "bfloat16", "float16")

#: The dtypes whose attention ``scores + additive mask`` saturates at ``finfo.min`` instead of overflowing.
#: float16's min (-65504) sits where neighbours are 32 apart, so a masked score below -16 rounds to -inf, and a
#: row with no visible key turns into NaN (which a later layer's ``0 * value`` spreads to real tokens).  In
#: float32 and bfloat16 (min about -3.4e38) no real score overflows, so their sums are left as they are.
SATURATING_MASK_DTYPES = ("float16",)

_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}


def _name_of(dtype: Any) -> str | None:
    """The dtype's own name, for strings, numpy/ml_dtypes dtypes and framework dtype objects."""
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(getattr(dtype, "name", None), str):  # np.dtype, tf.DType, keras DTypePolicy
        name = dtype.name
    elif isinstance(dtype, type) and hasattr(dtype, "dtype"):  # jnp.float32, jnp.bfloat16 (scalar types)
        name = getattr(dtype.dtype, "name", None) or str(np.dtype(dtype))
    elif isinstance(dtype, type):  # np.float32 and friends
        try:
            name = np.dtype(dtype).name
        except TypeError:
            return None
    elif type(dtype).__module__ == "torch":  # torch.dtype has no .name; str gives "torch.bfloat16"
        name = str(dtype)
    else:
        return None
    return name.strip().lower().removeprefix("torch.")


def canonical_dtype(dtype: Any, argument: str = "dtype") -> str:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` for ``dtype``; ``None`` means float32.

    Args:
        dtype: ``None``, a name (``"float32"``, ``"fp32"``, ``"bfloat16"``, ``"bf16"``, ``"float16"``,
            ``"fp16"``, ``"half"``) or a dtype object of numpy, ml_dtypes, torch, TensorFlow/Keras or JAX.
        argument: the argument name used in error messages.

    Raises:
        ValueError: a dtype that is not one of :data:`SUPPORTED` (e.g. float64, int8), or an unknown name.
        TypeError: something that is not a dtype at all.
    """
    if dtype is None:
        return "float32"
    name = _name_of(dtype)
    if name is None:
        raise TypeError(
            f"{argument} must be None, a string or a dtype object (e.g. 'bfloat16'), got {type(dtype).__name__}"
        )
    canon = _ALIASES.get(name)
    if canon is None:
        raise ValueError(f"{argument}={dtype!r} is not supported; models run in one of {', '.join(SUPPORTED)}")
    return canon


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype of ``dtype`` (bfloat16 through ``ml_dtypes``)."""
    return numpy_dtype_named(canonical_dtype(dtype))


def itemsize(dtype: Any) -> int:
    """Bytes per element of ``dtype`` (4 for float32, 2 for bfloat16 and float16)."""
    return numpy_dtype(dtype).itemsize


def saturates_mask_sum(dtype: Any) -> bool:
    """Whether attention in ``dtype`` clamps ``scores + mask`` at ``finfo(dtype).min`` (see
    :data:`SATURATING_MASK_DTYPES`); ``dtype`` as :func:`canonical_dtype` accepts it."""
    return canonical_dtype(dtype) in SATURATING_MASK_DTYPES
