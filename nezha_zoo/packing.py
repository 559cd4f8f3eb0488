"""The process-wide switch for packed (blocked) weight layouts in inference products and oneDNN training
products (issue #23).

Framework-neutral: a backend whose products can run on a second, blocked copy of a layer's weight
reads :func:`packed_linear_enabled` (PyTorch: :class:`nezha_zoo.pt.layers.PackedLinear`; TF:
:class:`nezha_zoo.tf.layers.Dense`; Flax: :class:`nezha_zoo.flax.layers.Dense`).  Each backend re-exports
:func:`set_packed_linear` and :func:`packed_linear`; they are these functions, so one call switches every
backend of the process.

The switch has three settings (:func:`packed_linear_setting`):

* ``True`` (``NEZHA_ZOO_PACKED_LINEAR=1``): packed inference products in every backend, and PyTorch's
  training products on oneDNN;
* ``False`` (``NEZHA_ZOO_PACKED_LINEAR=0``): plain products everywhere (PyTorch: ``F.linear``, its
  no-grad products by row count included);
* ``None`` (unset, the default): no packed inference copy (it costs one more copy of the block weights
  in memory); PyTorch's training products (autograd on) on oneDNN where that was measured faster:
  CPUs with AVX-512 (an Electra-base training step 1.8x as fast, one thread), not AVX2-only ones (0.91x),
  see :func:`nezha_zoo.pt.layers.onednn_training`; and PyTorch's no-grad products on the plain weight by
  row count (:func:`nezha_zoo.pt.layers.linear_route`).  TF and Flax train on their own kernels: for
  them ``None`` is ``False``.
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
    "fingerprint_step",
    "fingerprint_indices",
    "set_packed_linear",
    "packed_linear",
    "packed_linear_enabled",
    "packed_linear_setting",
]

#: Environment switch read once, at import: ``"1"`` turns packed products on for the process, ``"0"``
#: turns every packed and oneDNN product off, unset leaves the default (see the module docstring);
#: :func:`set_packed_linear` overrides it.
PACKED_LINEAR_ENV = "NEZHA_ZOO_PACKED_LINEAR"
#: Output columns per block of a packed kernel: (in, out) is stored as (out / PACK_BLOCK, in, PACK_BLOCK),
#: each block one contiguous (in, 64) panel (the width of oneDNN's AVX512 float32 blocking).
PACK_BLOCK = 64
#: Products with more rows than this run on the plain kernel: the blocked product is faster only
#: while the weight read dominates (1.37x at 16 rows, 1.12x at 32, 0.73x at 64 on AVX512, XLA CPU).
PACKED_MAX_ROWS = 32


#: How many elements of a weight a backend with mutable weights (PyTorch's ``PackedLinear``, TF's
#: ``Dense``) compares on each packed call, its stale-copy check ...
FINGERPRINT_SIZE = 256
#: ... read as runs of this many neighbours (one 64-byte cache line of float32).
FINGERPRINT_RUN = 16


def fingerprint_step(shape: tuple[int, ...]) -> int | None:
    """The flat distance between the starts of consecutive runs of a weight's stale-copy sample
    (:func:`fingerprint_indices`); ``None`` when the weight has at most :data:`FINGERPRINT_SIZE`
    elements and every element is compared.

    Spread evenly from the first element to the last, the step nudged off a whole number of rows so
    the runs fall in many columns.
    """
    n = int(np.prod(shape))
    if n <= FINGERPRINT_SIZE:
        return None
    step = (n - FINGERPRINT_RUN) // (FINGERPRINT_SIZE // FINGERPRINT_RUN - 1)
    return step - 1 if step % shape[-1] == 0 else step


def fingerprint_indices(shape: tuple[int, ...]) -> np.ndarray:
    """Flat (row-major) indices, int64, of the :data:`FINGERPRINT_SIZE` elements of a weight of ``shape``
    that a stale-copy check compares: :data:`FINGERPRINT_SIZE` / :data:`FINGERPRINT_RUN` runs of
    neighbours (a few cache lines, not one per element) :func:`fingerprint_step` apart; every element
    when the weight is that small.  PyTorch's ``PackedLinear`` reads the same elements as a strided view.
    """
    step = fingerprint_step(shape)
    if step is None:
        return np.arange(int(np.prod(shape)), dtype=np.int64)
    runs = FINGERPRINT_SIZE // FINGERPRINT_RUN
    return (np.arange(runs)[:, None] * step + np.arange(FINGERPRINT_RUN)[None, :]).reshape(-1).astype(np.int64)


def _from_env() -> bool | None:
    value = os.environ.get(PACKED_LINEAR_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{PACKED_LINEAR_ENV} must be '0' or '1', got {value!r}")
    return None if value == "" else value == "1"


_STATE: dict[str, bool | None] = {"enabled": _from_env()}


def packed_linear_enabled() -> bool:
    """Whether packed inference products are on: the setting is ``True`` (see :func:`set_packed_linear`)."""
    return _STATE["enabled"] is True


def packed_linear_setting() -> bool | None:
    """The switch as set: ``True`` (on), ``False`` (off everywhere) or ``None`` (the default; see the
    module docstring)."""
    return _STATE["enabled"]


def set_packed_linear(enabled: bool | None) -> bool | None:
    """Turn packed products on (``True``) or off (``False``) for the whole process, or restore the default
    (``None``); returns the previous setting (:func:`packed_linear_setting`).

    On, PyTorch's ``PackedLinear`` runs float32 CPU inference on a oneDNN-reordered copy of its weight
    (and training forward products on a per-call reorder); a TF ``Dense`` in float32 inference on CPU
    without XLA (see :class:`nezha_zoo.tf.layers.Dense`; read when a ``tf.function`` traces) and a Flax
    wrapper's compiled float32 inference call (see :class:`nezha_zoo.flax.layers.Dense`) keep a blocked
    copy of each block kernel and run products of at most :data:`PACKED_MAX_ROWS` rows on it.  Off, every
    backend runs plain products (PyTorch's training and no-grad products too).  ``None``: no packed
    inference copy; PyTorch's training products on oneDNN where that is faster and its no-grad products by
    row count (see the module docstring).
    """
    previous = _STATE["enabled"]
    _STATE["enabled"] = None if enabled is None else bool(enabled)
    return previous


@contextlib.contextmanager
def packed_linear(enabled: bool | None = True) -> Iterator[None]:
    """``with packed_linear(): ...`` runs the block with :func:`set_packed_linear` set to ``enabled``, then
    restores the previous setting (a process-wide switch, not a per-thread one)."""
    previous = set_packed_linear(enabled)
    try:
        yield
    finally:
        set_packed_linear(previous)
