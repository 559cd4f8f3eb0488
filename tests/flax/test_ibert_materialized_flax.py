"""``quant.materialized``: a requantized activation is computed once in the compiled program (issue #23).

XLA's CPU fusion copies a cheap elementwise producer into every fusion that reads it; a requantization
read by a LayerNorm's sum, variance and output kernels was computed three or four times per element.
:func:`nezha_zoo.flax.quant.materialized` (the ``QuantAct`` outputs) ends such a chain in one kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nezha_zoo import IBertConfig
from nezha_zoo.flax import FlaxIBertModel
from nezha_zoo.flax import quant as fq
from nezha_zoo.testing import IBERT_SMOKE, pin_precision

pytestmark = pytest.mark.flax

pin_precision("flax")


def _requantize_and_read_thrice(keep_once: bool):
    def f(acc, m):
        with fq.x64_scope():
            q = jnp.clip(jnp.round(acc.astype(jnp.float64) * m), -(2**21), 2**21 - 1).astype(jnp.int32)
            if keep_once:
                q = fq.materialized(q)
            wide = q.astype(jnp.int64)
            return wide * 3 + 1, jnp.sum(wide, axis=-1), jnp.right_shift(wide - 5, 2)

    return f


def test_materialized_computes_a_shared_producer_once():
    acc = jnp.asarray(np.random.default_rng(0).integers(-(2**30), 2**30, (64, 48)), jnp.int32)
    with fq.x64_scope():
        m = jnp.linspace(1e-4, 3e-4, 48, dtype=jnp.float64)
        programs = {k: jax.jit(_requantize_and_read_thrice(k)).lower(acc, m).compile() for k in (False, True)}
        outs = {k: p(acc, m) for k, p in programs.items()}
    rounds = {k: p.as_text().count("round-nearest-even(") for k, p in programs.items()}
    assert rounds[False] == 3, rounds  # XLA duplicates the requantization into its three readers
    assert rounds[True] == 1, rounds
    for a, b in zip(outs[False], outs[True]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_materialized_is_the_array_itself_op_by_op():
    x = jnp.arange(6, dtype=jnp.int32)
    assert fq.materialized(x) is x


def test_quant_model_compiled_with_materialized_is_bit_identical(monkeypatch):
    model = FlaxIBertModel(IBertConfig(**IBERT_SMOKE, initializer_range=0.2, quant_mode=True), seed=0)
    ids = np.random.default_rng(0).integers(3, 99, (2, 16))
    _, state = model(ids, train=True)
    model.buffers = state["buffers"]
    model.jit_after_calls = 0  # the wrapper's compiled call, traced again after clear_jit_cache
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    once = model(ids, mask).last_hidden_state
    monkeypatch.setattr(fq, "materialized", lambda x: x)
    model.clear_jit_cache()
    np.testing.assert_array_equal(np.asarray(once), np.asarray(model(ids, mask).last_hidden_state))
