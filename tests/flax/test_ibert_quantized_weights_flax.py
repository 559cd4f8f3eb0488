"""Flax I-BERT quant-mode inference quantizes the weights once, not in every forward (issue #23).

The wrapper's compiled deterministic calls pass the ``"quantized"`` collection
(:data:`nezha_zoo.flax.quant.QUANTIZED`: each ``QuantLinear``'s int8 kernel and scale, computed once per
params array outside the program), as PyTorch caches its quantized weights and TF freezes an int8
kernel.  The compiled forward then holds no weight quantization, its outputs are the inline path's bit
for bit, and new params are quantized again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nezha_zoo import IBertConfig
from nezha_zoo.flax import FlaxIBertForSequenceClassification, FlaxIBertModel
from nezha_zoo.flax import quant as fq
from nezha_zoo.testing import IBERT_SMOKE, pin_precision

pytestmark = pytest.mark.flax

pin_precision("flax")

#: One layer: it holds every QuantLinear kind, and each more only adds x64 tracing and compile time.
SMOKE = dict(IBERT_SMOKE, num_hidden_layers=1)
#: QuantLinear layers of the SMOKE encoder: 6 a layer (query, key, value, two outputs, intermediate)
LINEARS = 6 * SMOKE["num_hidden_layers"]
#: QuantEmbedding tables: words, token types, positions
TABLES = 3


def _calibrated(cls=FlaxIBertModel, seed: int = 0):
    model = cls(IBertConfig(**SMOKE, initializer_range=0.2, quant_mode=True), seed=seed)
    ids = np.random.default_rng(seed).integers(3, 99, (2, 16))
    _, state = model(ids, train=True)
    model.buffers = state["buffers"]
    return model


def _inputs():
    ids = np.random.default_rng(1).integers(3, 99, (2, 12))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def _counting(monkeypatch) -> list:
    """Count the inline weight quantizations (one per QuantLinear / QuantEmbedding call or trace)."""
    calls: list = []
    for name in ("_kernel_quantization", "_table_quantization"):
        inline = getattr(fq, name)
        monkeypatch.setattr(fq, name, lambda *a, inline=inline: calls.append(1) or inline(*a))
    return calls


def test_compiled_call_uses_the_quantized_weights(monkeypatch):
    model = _calibrated()
    ids, mask = _inputs()
    # the collection for these params, made before the spy (quantize_kernel's own traces call it too)
    model._inference_collections({"params": model.params, "buffers": model.buffers})
    # the inline path: op by op and under the user's jax.jit (traced params: nothing to precompute)
    calls = _counting(monkeypatch)
    eager = np.asarray(model(ids, mask).last_hidden_state)
    assert len(calls) == LINEARS + TABLES
    jitted = np.asarray(jax.jit(lambda p: model(ids, mask, params=p).last_hidden_state)(model.params))
    assert len(calls) == 2 * (LINEARS + TABLES)  # the spy sees a trace
    # the wrapper's compiled call (the second of this signature) quantizes nothing in the program
    compiled = [np.asarray(model(ids, mask).last_hidden_state) for _ in range(2)]
    assert len(calls) == 2 * (LINEARS + TABLES) and len(model._jit_compiled) == 1
    for out in (jitted, *compiled):
        assert out.dtype == eager.dtype and np.array_equal(out, eager)
    # the collection: each QuantLinear's integers and scale, on its params path
    held = model._quantized
    assert len(held) == LINEARS + TABLES
    path = ("encoder", "layer", "0", "intermediate", "dense")
    kernel = model.params
    for name in path:
        kernel = kernel[name]
    kernel = kernel["kernel"]
    entry = held[path][1]
    assert held[path][0]() is kernel and entry["kernel_int8"].dtype == jnp.int8
    w_int_t, w_scale = fq._kernel_quantization(kernel, 8)
    assert np.array_equal(np.asarray(entry["kernel_int8"], np.float32), np.asarray(w_int_t))
    assert np.array_equal(np.asarray(entry["fc_scaling_factor"]), np.asarray(w_scale))
    path = ("embeddings", "word_embeddings")
    entry = held[path][1]
    assert held[path][0]() is model.params[path[0]][path[1]]["embedding"] and entry["weight_integer"].dtype == jnp.int8
    w_int, w_scale = fq._table_quantization(model.params[path[0]][path[1]]["embedding"], 8)
    assert np.array_equal(np.asarray(entry["weight_integer"], np.float32), np.asarray(w_int))
    assert np.array_equal(np.asarray(entry["weight_scaling_factor"]), np.asarray(w_scale))


def test_module_program_has_no_weight_quantization_with_the_collection():
    model = _calibrated()
    ids, mask = _inputs()
    variables = {"params": model.params, "buffers": model.buffers}
    quantized = model._inference_collections(variables)
    assert set(quantized) == {fq.QUANTIZED}
    weight_shapes = {
        tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]
        if path[-1].key in ("kernel", "embedding")
    }

    def weight_reductions(extra: dict) -> int:
        with fq.x64_scope():
            jaxpr = jax.make_jaxpr(lambda v: model.module.apply(v, ids, mask))({**variables, **extra})
        count = 0
        for eqn in jaxpr.jaxpr.eqns:  # min/max over a kernel's channels (in, out) -> (out,) or a whole table
            if eqn.primitive.name in ("reduce_min", "reduce_max") and eqn.params.get("axes") in ((0,), (0, 1)):
                count += tuple(eqn.invars[0].aval.shape) in weight_shapes
        return count

    assert weight_reductions({}) == 2 * (LINEARS + TABLES)
    assert weight_reductions(quantized) == 0


def test_new_params_are_quantized_again():
    model = _calibrated(FlaxIBertForSequenceClassification)
    ids, mask = _inputs()
    for _ in range(2):  # compile
        before = np.asarray(model(ids, mask).logits)
    held = dict(model._quantized)
    again = model._inference_collections({"params": model.params, "buffers": model.buffers})
    assert all(model._quantized[p][1] is held[p][1] for p in held)  # same arrays: reused
    assert set(again) == {fq.QUANTIZED}
    # new params (another seed's weights, same buffers): quantized again, the fresh model's results
    other = FlaxIBertForSequenceClassification(IBertConfig(**SMOKE, initializer_range=0.2, quant_mode=True), seed=7)
    model.params = other.params
    other.buffers = model.buffers
    after = np.asarray(model(ids, mask).logits)
    assert all(model._quantized[p][1] is not held[p][1] for p in held)
    assert not np.array_equal(after, before)
    other.jit_after_calls = None  # the inline path, op by op
    assert np.array_equal(after, np.asarray(other(ids, mask).logits))
    # params= given to one call: quantized for it, equal to the inline path
    given = np.asarray(model(ids, mask, params=other.params).logits)
    assert np.array_equal(given, after)
