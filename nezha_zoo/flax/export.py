"""Flax serving export: ``jax.export`` of the jitted forward with symbolic batch and length.

The artifact is one file, the serialized :class:`jax.export.Exported`: the weights are constants
of the compiled function, whose arguments are the int32 inputs of
:func:`nezha_zoo.spec.serving.serving_signature` (positional, in signature order) and whose result is
the dict of the signature's outputs.  :func:`load_jax` reloads it in any process with only ``jax``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import export as jax_export

from nezha_zoo.spec.serving import ServingSignature, model_serving_signature

__all__ = ["export_jax", "serialize_jax", "load_jax"]


def serialize_jax(model: Any) -> tuple[bytes, ServingSignature]:
    """``jax.export`` of ``model``'s forward (eval mode, current params) -> (serialized bytes, signature).

    Every input axis is symbolic (``batch``, ``choices``, ``length``), so the artifact runs any shape
    (``length`` up to the signature's ``max_length``).
    """
    sig = model_serving_signature(model)
    params = model.params
    extra = {"buffers": model.buffers} if model.has_buffers else {}

    def serve(*inputs: jax.Array) -> dict[str, jax.Array]:
        kwargs = dict(zip(sig.inputs, inputs))
        out = model(**kwargs, params=params, return_dict=True, **extra)
        return {name: out[name] for name in sig.outputs}

    # The position table bounds the length: a constraint, so shape checks under tracing are decidable.
    constraints = [f"length <= {sig.max_length}"] if sig.max_length is not None else []
    shape = jax_export.symbolic_shape(", ".join(sig.dims), constraints=constraints)
    args = [jax.ShapeDtypeStruct(shape, jnp.dtype(sig.dtype)) for _ in sig.inputs]
    exported = jax_export.export(jax.jit(serve))(*args)
    return bytes(exported.serialize()), sig


def export_jax(model: Any, path: str | os.PathLike) -> ServingSignature:
    """Write :func:`serialize_jax`'s bytes to ``path`` (overwritten; ``nezha-zoo export`` writes atomically)."""
    data, sig = serialize_jax(model)
    with open(path, "wb") as f:
        f.write(data)
    return sig


def load_jax(path: str | os.PathLike) -> Callable[..., dict[str, jax.Array]]:
    """Reload an artifact of :func:`export_jax`: ``fn(input_ids, attention_mask[, token_type_ids])``
    (int32 arrays) -> dict of output fields."""
    with open(path, "rb") as f:
        exported = jax_export.deserialize(bytearray(f.read()))
    return exported.call
