"""The process-wide switch for packed (blocked) weight layouts in inference products (issue #23).

Framework-neutral: a backend whose products can run on a second, blocked copy of a layer's weight
reads :func:`packed_linear_enabled` (Flax: :class:`nezha_zoo.flax.layers.Dense`; TF:
:class:`nezha_zoo.tf.layers.Dense`).
Off by default, because the copy costs one more copy of the block weights in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

__all__ = [
    "PACKED_LINEAR_ENV",
    "PACK_BLOCK",
    "PACKED_MAX_ROWS",
    "FINGERPRINT_SIZE",
    "FINGERPRINT_RUN",
    "fingerprint_indices",
    "set_packed_linear",
    "packed_linear",
    "packed_linear_enabled",
]

#: Environment switch read once, at import: ``"1"`` turns packed products on for the process, ``"0"``
#: (or unset) leaves them off; :func:`set_packed_linear` overrides it.  PyTorch's ``PackedLinear``
#: reads the same variable.
PACKED_LINEAR_ENV = "NEZHA_ZOO_PACKED_LINEAR"
#: Output columns per block of a packed kernel: (in, out) is stored as (out / PACK_BLOCK, in, PACK_BLOCK),
#: each block one contiguous (in, 64) panel (the width of oneDNN's AVX512 float32 blocking).
PACK_BLOCK = 64
#: Products with more rows than this run on the plain kernel: the blocked product is faster only
#: while the weight read dominates (1.37x at 16 rows, 1.12x at 32, 0.73x at 64 on AVX512, XLA CPU).
PACKED_MAX_ROWS = 32


#: How many elements of a weight a backend with mutable weights (TF's ``Dense``) compares on each packed
#: call, its stale-copy check ...
FINGERPRINT_SIZE = 256
#: ... read as runs of this many neighbours (one 64-byte cache line of float32).
FINGERPRINT_RUN = 16


def fingerprint_indices(shape: tuple[int, ...]) -> np.ndarray:
    """Flat (row-major) indices, int64, of the :data:`FINGERPRINT_SIZE` elements of a weight of ``shape``
    that a stale-copy check compares: runs of :data:`FINGERPRINT_RUN` neighbours spread evenly from the
    first element to the last (a few cache lines, not one per element), the step nudged off a whole number
    of rows so the runs fall in many columns; every element when the weight is that small.  (PyTorch's
    ``PackedLinear`` samples its weight the same way.)
    """
    n = int(np.prod(shape))
    if n <= FINGERPRINT_SIZE:
        return np.arange(n, dtype=np.int64)
    runs = FINGERPRINT_SIZE // FINGERPRINT_RUN
    step = (n - FINGERPRINT_RUN) // (runs - 1)
    if step % shape[-1] == 0:
        step -= 1
    return (np.arange(runs)[:, None] * step + np.arange(FINGERPRINT_RUN)[None, :]).reshape(-1).astype(np.int64)


def _from_env() -> bool:
    value = os.environ.get(PACKED_LINEAR_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{PACKED_LINEAR_ENV} must be '0' or '1', got {value!r}")
    return value == "1"


_STATE = {"enabled": _from_env()}


def packed_linear_enabled() -> bool:
    """Whether packed products are on (see :func:`set_packed_linear`)."""
    return _STATE["enabled"]


def set_packed_linear(enabled: bool) -> bool:
    """Turn packed products on or off for the whole process; returns the previous setting.

    On, a Flax wrapper's compiled float32 inference call keeps a blocked copy of each block kernel
    (see :class:`nezha_zoo.flax.layers.Dense`) and runs products of at most :data:`PACKED_MAX_ROWS`
    rows on it; so does a TF ``Dense`` in float32 inference on CPU without XLA (see
    :class:`nezha_zoo.tf.layers.Dense`; read when a ``tf.function`` traces).
    """
    previous = _STATE["enabled"]
    _STATE["enabled"] = bool(enabled)
    return previous


@contextlib.contextmanager
def packed_linear(enabled: bool = True) -> Iterator[None]:
    """``with packed_linear(): ...`` runs the block with :func:`set_packed_linear` set to ``enabled``, then
    restores the previous setting (a process-wide switch, not a per-thread one)."""
    previous = set_packed_linear(enabled)
    try:
        yield
    finally:
        set_packed_linear(previous)
