"""Packed kernels in Flax (issue #23): opt-in blocked copies of the block kernels for small compiled products.

``nezha_zoo.flax.set_packed_linear(True)`` / ``with packed_linear():`` make the wrapper's compiled float32
inference call pass a ``"packed"`` collection (``pack_kernel`` of every packable kernel); ``Dense`` runs
products of at most ``PACKED_MAX_ROWS`` rows on it.  Results agree with the plain call to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import nezha_zoo.flax as nzf
from nezha_zoo import ElectraConfig, IBertConfig, MptConfig, packing
from nezha_zoo.flax.layers import (
    PACKED,
    PACKED_COMPILER_OPTIONS,
    Dense,
    pack_kernel,
    packable,
    packed_compiler_options,
)
from nezha_zoo.packing import PACK_BLOCK, PACKED_MAX_ROWS, packed_linear, set_packed_linear
from nezha_zoo.testing import TOLERANCES, assert_close, op_by_op, pin_precision

pytestmark = pytest.mark.flax

pin_precision("flax")

HID = TOLERANCES["hidden"]
# widths that are multiples of 64, so every block kernel is packable; embedding_size 16 is not (projection 16 -> 64 is)
ELECTRA = dict(
    vocab_size=99, embedding_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
)
#: per layer query, key, value, attention output, intermediate, output; and the embeddings' projection
PACKABLE_KERNELS = 6 * ELECTRA["num_hidden_layers"] + 1


def _ids(shape=(1, 7), seed=0):
    return np.random.default_rng(seed).integers(3, 99, size=shape)


@pytest.fixture
def model():
    return nzf.FlaxElectraModel(ElectraConfig(**ELECTRA), seed=1)


def _eager(model, *args, **kwargs):
    """The op-by-op, unpacked result of the same call (the reference)."""
    with op_by_op(model):
        return model(*args, **kwargs)


def test_switch_is_the_shared_process_wide_one():
    """``nezha_zoo.flax``'s switch is :mod:`nezha_zoo.packing`'s (tested in tests/core), and Dense reads it."""
    assert nzf.set_packed_linear is set_packed_linear is packing.set_packed_linear
    assert nzf.packed_linear is packed_linear is packing.packed_linear


def test_this_jaxlib_takes_the_packed_compiler_options():
    # a renamed experimental option would silently cost the packed products their speed: fail here instead
    assert packed_compiler_options() == PACKED_COMPILER_OPTIONS


def test_pack_kernel_layout_and_packable():
    kernel = jnp.arange(3 * 128, dtype=jnp.float32).reshape(3, 128)
    packed = np.asarray(pack_kernel(kernel))
    assert packed.shape == (128 // PACK_BLOCK, 3, PACK_BLOCK)
    for b in range(2):
        np.testing.assert_array_equal(packed[b], np.asarray(kernel)[:, b * PACK_BLOCK : (b + 1) * PACK_BLOCK])
    assert packable(kernel)
    assert not packable(kernel[:, :100])  # a head's odd width
    assert not packable(kernel.astype(jnp.bfloat16))
    assert not packable(kernel[None])


@pytest.mark.parametrize("rows", [(1, 5), (2, 16), (3, 11)], ids=["5-rows", "32-rows", "33-rows"])
def test_dense_on_the_packed_kernel_equals_dense(rows):
    layer = Dense(128, use_bias=True, bias_init=jax.nn.initializers.normal(1.0))
    x = jax.random.normal(jax.random.PRNGKey(0), (*rows, 48))
    variables = layer.init(jax.random.PRNGKey(1), x)
    want = layer.apply(variables, x)
    packed = {PACKED: {"kernel": pack_kernel(variables["params"]["kernel"])}}
    got = jax.jit(layer.apply)({**variables, **packed}, x)
    assert got.shape == want.shape == (*rows, 128)
    # at most PACKED_MAX_ROWS rows: one product batched over the blocks; more: the plain product
    hlo = jax.jit(layer.apply).lower({**variables, **packed}, x).as_text()
    assert hlo.count("dot_general") == 1
    assert ("batching_dims" in hlo) == (np.prod(rows) <= PACKED_MAX_ROWS)
    assert_close(got, want, HID, "packed Dense")


def test_compiled_calls_run_on_the_packed_kernels(model):
    ids = _ids()
    want = _eager(model, ids).last_hidden_state
    with packed_linear():
        got = [model(ids).last_hidden_state for _ in range(3)]  # eager, compiled + packed, reused
        assert len(model._packed) == PACKABLE_KERNELS
        held = {path: copy for path, (_, copy) in model._packed.items()}
        model(ids)
        assert all(model._packed[path][1] is copy for path, copy in held.items())  # packed once
        # the compiled program reads the packed copies: zeroing them changes the result
        model._packed = {path: (ref, jnp.zeros_like(copy)) for path, (ref, copy) in model._packed.items()}
        zeroed = model(ids).last_hidden_state
    assert_close(got[-1], want, HID, "packed vs eager")
    assert not np.allclose(np.asarray(zeroed), np.asarray(want), atol=1e-2)
    model.clear_jit_cache()
    assert not model._packed


def test_new_params_are_packed_again(model):
    ids = _ids()
    doubled = jax.tree_util.tree_map(lambda p: p * 2, model.params)
    want = _eager(model, ids, params=doubled).last_hidden_state
    with packed_linear():
        for _ in range(3):
            model(ids)
        got = model(ids, params=doubled).last_hidden_state  # same signature, new arrays: packed again
    assert_close(got, want, HID, "params= packed")
    assert not np.allclose(np.asarray(_eager(model, ids).last_hidden_state), np.asarray(want))


def test_one_new_kernel_is_packed_again_and_the_others_reused(model):
    # a params tree that repeats the last one's leaves reuses its collection; one new leaf anywhere
    # takes the per-kernel path, which packs that kernel alone
    ids = _ids()
    path = ("encoder", "layer", "1", "intermediate", "dense", "kernel")
    with packed_linear():
        for _ in range(3):
            model(ids)
        held = {p: copy for p, (_, copy) in model._packed.items()}
        flat = flatten_dict(model.params)
        flat[path] = flat[path] * 2
        params = unflatten_dict(flat)
        got = model(ids, params=params).last_hidden_state
        assert model._packed[path][1] is not held[path]
        assert all(model._packed[p][1] is copy for p, copy in held.items() if p != path)
        packed = model._packed
        again = model(ids, params=unflatten_dict(flatten_dict(params))).last_hidden_state  # new dicts, same leaves
        assert model._packed is packed  # the fast path: not walked again (per_array would build a new dict)
    want = _eager(model, ids, params=params).last_hidden_state
    assert_close(got, want, HID, "one new kernel, packed")
    assert_close(again, got, 0.0, "same leaves, new dicts")
    assert not np.allclose(np.asarray(_eager(model, ids).last_hidden_state), np.asarray(want))


def test_off_the_switch_or_outside_float32_inference_nothing_is_packed(model):
    ids = _ids()
    for _ in range(3):
        model(ids)  # switch off
    with packed_linear():
        for _ in range(3):
            model(ids, train=True, dropout_rng=jax.random.PRNGKey(0))
    assert not model._packed
    wide = _ids((2, PACKED_MAX_ROWS // 2 + 1))  # more rows than PACKED_MAX_ROWS: the plain program
    want = [model(wide).last_hidden_state for _ in range(3)][-1]
    with packed_linear():
        got = [model(wide).last_hidden_state for _ in range(3)][-1]
    assert not model._packed
    assert_close(got, want, 0.0, "more rows than PACKED_MAX_ROWS, switch on vs off")
    bf16 = nzf.FlaxElectraModel(ElectraConfig(**ELECTRA), seed=1, dtype="bfloat16")
    with packed_linear():
        for _ in range(3):
            bf16(ids)
    assert not bf16._packed


def test_unmerged_lora_is_not_packed():
    model = nzf.FlaxElectraModel(ElectraConfig(**ELECTRA), seed=1)
    model.enable_lora(2, alpha=4, target_modules=["query", "value"])
    model.lora_params = jax.tree_util.tree_map(lambda a: a + 0.1, model.lora_params)
    ids = _ids()
    want = _eager(model, ids).last_hidden_state
    with packed_linear():
        for _ in range(3):
            got = model(ids).last_hidden_state
    assert not model._packed
    assert_close(got, want, HID, "LoRA, packing on")


def test_bias_free_cached_decoding_steps_run_packed():
    # MPT: bias-free products (no_bias), one-row steps on a mutable "cache" collection
    model = nzf.FlaxMptForCausalLM(MptConfig(vocab_size=99, d_model=64, n_layers=2, n_heads=4, max_seq_len=64), seed=2)
    ids, nxt = _ids((1, 4)), _ids((1, 3), seed=9)
    full = _eager(model, np.concatenate([ids, nxt], axis=1)).logits
    mask = np.zeros((1, 8), np.int64)
    mask[:, :4] = 1
    with packed_linear():
        out = model(ids, attention_mask=mask, past_key_values=model.init_cache(1, 8))
        steps = [out.logits[:, -1]]
        for k in range(3):
            mask[:, 4 + k] = 1
            out = model(nxt[:, k : k + 1], attention_mask=mask, past_key_values=out.past_key_values)
            steps.append(out.logits[:, -1])
    assert len(model._packed) == 4 * 2  # Wqkv, out_proj, up_proj, down_proj per block
    assert_close(jnp.stack(steps, 1), full[:, 3:], TOLERANCES["logits"], "packed cached steps vs full forward")


@pytest.mark.parametrize("quant_mode", [False, True])
def test_ibert_packs_no_quant_linear_kernel(quant_mode):
    # QuantLinear computes its own product in both modes (float: x @ kernel; quant: the int8 kernel of the
    # "quantized" collection) and never reads "packed": a copy of its kernel would only cost memory.  The
    # classification head's Dense still gets its packed copy.
    widths = {k: v for k, v in ELECTRA.items() if k != "embedding_size"}
    cfg = IBertConfig(**widths, quant_mode=quant_mode)
    model = nzf.FlaxIBertForSequenceClassification(cfg, seed=0)
    quant_linear = {path[:-1] + ("kernel",) for path in flatten_dict(model.buffers) if path[-1] == "fc_scaling_factor"}
    assert len(quant_linear) == 6 * ELECTRA["num_hidden_layers"]
    assert all(packable(flatten_dict(model.params)[path]) for path in quant_linear)  # packable, yet not packed
    with packed_linear():
        for _ in range(3):  # eager, compiled + packed, reused
            model(_ids())
    assert set(model._packed) == {("classifier", "dense", "kernel")}
