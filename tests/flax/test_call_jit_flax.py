"""The Flax wrapper's eager call compiles a repeated call signature (``jit_after_calls``, issue #23).

A call outside any trace runs op by op the first time a signature (settings, shapes, dtypes) is seen
and through a cached ``jax.jit`` of ``module.apply`` afterwards; a call inside the user's own
``jax.jit`` / ``jax.grad`` goes into that trace untouched.  Counted here by how often the module's
``apply`` runs in Python: once per eager call, once per compilation, never for a compiled call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nezha_zoo.flax as nzf
from nezha_zoo import ElectraConfig, MptConfig
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision
from nezha_zoo.validation import InputError

pytestmark = pytest.mark.flax

pin_precision("flax")

HID = TOLERANCES["hidden"]
SIZES = dict(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
ELECTRA = dict(SIZES, intermediate_size=37, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
MPT = dict(vocab_size=99, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def _ids(shape=(2, 7), seed=0):
    return np.random.default_rng(seed).integers(3, 99, size=shape)


def _counting(model, monkeypatch) -> list[int]:
    """A list whose length is the number of times ``model.module.apply`` runs in Python."""
    calls: list[int] = []
    cls = type(model.module)
    apply = cls.apply

    def counted(self, *args, **kwargs):
        calls.append(1)
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(cls, "apply", counted)
    return calls


@pytest.fixture(scope="module")
def electra():
    return nzf.FlaxElectraModel(ElectraConfig(**ELECTRA), seed=1)


@pytest.fixture
def model(electra):
    electra.clear_jit_cache()
    yield electra
    electra.jit_after_calls = type(electra).jit_after_calls
    electra.jit_cache_size = type(electra).jit_cache_size
    electra.clear_jit_cache()


def _eager(model, *args, **kwargs):
    """The op-by-op result of the same call (the reference)."""
    model.jit_after_calls = None
    try:
        return model(*args, **kwargs)
    finally:
        model.jit_after_calls = type(model).jit_after_calls


def test_second_call_compiles_and_later_calls_reuse_it(model, monkeypatch):
    calls = _counting(model, monkeypatch)
    ids, mask = _ids(), np.ones((2, 7), np.int64)
    first = model(ids, attention_mask=mask)  # eager
    assert len(calls) == 1 and not model._jit_compiled
    second = model(ids, attention_mask=mask)  # traced once for the compilation
    assert len(calls) == 2 and len(model._jit_compiled) == 1
    for seed in (1, 2, 3):  # same signature, new values: the compiled program, no retrace
        model(_ids(seed=seed), attention_mask=mask)
    assert len(calls) == 2 and len(model._jit_compiled) == 1
    assert_close(second.last_hidden_state, first.last_hidden_state, HID, "compiled vs eager")
    again = model(ids, attention_mask=mask)
    assert_close(again.last_hidden_state, second.last_hidden_state, 0.0, "compiled calls are deterministic")
    model(_ids((2, 9)), attention_mask=np.ones((2, 9), np.int64))  # a new length: eager first
    assert len(calls) == 3 and len(model._jit_compiled) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(output_attentions=True, output_hidden_states=True),
        dict(return_dict=False, head_mask=np.linspace(0.0, 1.0, 4)),
        dict(token_type_ids=np.ones((2, 7), np.int64), position_ids=np.arange(7)[None].repeat(2, 0)),
    ],
    ids=["attentions", "tuple-head-mask", "types-positions"],
)
def test_compiled_call_equals_eager(model, kwargs):
    ids = _ids()
    want = _eager(model, ids, **kwargs)
    for _ in range(3):
        got = model(ids, **kwargs)
    assert len(model._jit_compiled) == 1
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want) >= 1
    for a, b in zip(got, want):
        assert_close(a, b, HID, "compiled vs eager")


# a typed key (jax.random.key) is a jax.Array without weak_type: part of the call signature all the same
@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw-key", "typed-key"])
def test_dropout_with_the_same_key_equals_eager(model, make_key):
    ids, key = _ids(), make_key(5)
    want = _eager(model, ids, train=True, dropout_rng=key)
    got = [model(ids, train=True, dropout_rng=key) for _ in range(3)]
    assert len(model._jit_compiled) == 1
    assert_close(got[-1].last_hidden_state, want.last_hidden_state, HID, "compiled dropout")
    other = model(ids, train=True, dropout_rng=make_key(6)).last_hidden_state
    assert not np.allclose(np.asarray(other), np.asarray(want.last_hidden_state))


def test_given_params_are_used(model):
    ids = _ids()
    doubled = jax.tree_util.tree_map(lambda p: p * 2, model.params)
    want = _eager(model, ids, params=doubled).last_hidden_state
    for _ in range(3):
        got = model(ids, params=doubled).last_hidden_state
    assert_close(got, want, HID, "params=")
    assert not np.allclose(np.asarray(model(ids).last_hidden_state), np.asarray(want))


def test_user_jit_and_grad_trace_through_without_caching(model, monkeypatch):
    ids = _ids()
    want = _eager(model, ids).last_hidden_state
    fn = jax.jit(lambda p, i: model(i, params=p).last_hidden_state)
    for _ in range(3):
        got = fn(model.params, ids)
    assert_close(got, want, HID, "under the user's jit")

    def loss(p):
        return jnp.sum(model(ids, params=p).last_hidden_state ** 2)

    grads = [jax.grad(loss)(model.params) for _ in range(2)]
    model.jit_after_calls = None
    want_grads = jax.grad(loss)(model.params)
    for a, b in zip(jax.tree_util.tree_leaves(grads[-1]), jax.tree_util.tree_leaves(want_grads)):
        assert_close(a, b, HID, "grad")
    assert not model._jit_compiled and not model._jit_seen


def test_bad_ids_raise_on_a_compiled_signature(model):
    ids = _ids()
    model(ids)
    model(ids)
    assert len(model._jit_compiled) == 1
    bad = ids.copy()
    bad[0, 0] = 99
    with pytest.raises(InputError, match="input_ids"):
        model(bad)


def test_opt_out_first_call_and_cache_bound(model, monkeypatch):
    calls = _counting(model, monkeypatch)
    model.jit_after_calls = None
    for _ in range(3):
        model(_ids())
    assert len(calls) == 3 and not model._jit_compiled and not model._jit_seen
    model.jit_after_calls, model.jit_cache_size = 0, 2
    for length in (5, 6, 7, 5):  # compiled at first sight; 5 was dropped when 7 came in
        model(_ids((1, length)))
    assert len(calls) == 3 + 4 and len(model._jit_compiled) == 2
    model(_ids((1, 7)))
    assert len(calls) == 7


def test_switching_the_module_compiles_again(model):
    ids = _ids()
    model(ids)
    model(ids)
    model.gradient_checkpointing_enable()
    try:
        model(ids)
        model(ids)
        assert len(model._jit_compiled) == 2
    finally:
        model.gradient_checkpointing_disable()


def test_lora_adapter_is_applied_in_compiled_calls():
    model = nzf.FlaxElectraModel(ElectraConfig(**ELECTRA), seed=1)
    model.enable_lora(2, alpha=4, target_modules=["query", "value"])
    model.lora_params = jax.tree_util.tree_map(lambda a: a + 0.1, model.lora_params)
    ids = _ids()
    want = _eager(model, ids).last_hidden_state
    for _ in range(3):
        got = model(ids).last_hidden_state
    assert len(model._jit_compiled) == 1
    assert_close(got, want, HID, "LoRA, compiled")
    model.lora_params = jax.tree_util.tree_map(lambda a: a * 0, model.lora_params)  # same shapes: no recompile
    plain = _eager(model, ids, params=model.params).last_hidden_state
    assert_close(model(ids).last_hidden_state, plain, HID, "zero adapter")
    assert len(model._jit_compiled) == 1


def test_cached_decoding_steps_compile_once():
    model = nzf.FlaxMptForCausalLM(MptConfig(**MPT), seed=2)
    ids = _ids((1, 4))
    full = _eager(model, np.concatenate([ids, _ids((1, 3), seed=9)], axis=1)).logits
    cache = model.init_cache(1, 8)
    mask = np.zeros((1, 8), np.int64)
    mask[:, :4] = 1
    out = model(ids, attention_mask=mask, past_key_values=cache)
    steps = [out.logits[:, -1]]
    nxt = _ids((1, 3), seed=9)
    for k in range(3):
        mask[:, 4 + k] = 1
        out = model(nxt[:, k : k + 1], attention_mask=mask, past_key_values=out.past_key_values)
        steps.append(out.logits[:, -1])
    assert len(model._jit_compiled) == 1  # the one-token step, compiled at its second call
    assert_close(jnp.stack(steps, 1), full[:, 3:], TOLERANCES["logits"], "cached steps vs full forward")
