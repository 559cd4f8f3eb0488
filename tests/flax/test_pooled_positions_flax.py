"""Pooled positions (issue #23, :mod:`nezha_zoo.spec.pooling`): the sequence-level heads' last layer
computes only the rows the head reads, with the logits, loss, gradients and dropout masks of the
full computation.

The full computation is the same model with ``output_hidden_states=True``, which turns pruning off;
transformers parity of the pruned heads is in each family's own test file (its sequence
classification and multiple-choice heads now run this path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.traverse_util import flatten_dict

import nezha_zoo.flax as nzf
from nezha_zoo import ElectraConfig, MPNetConfig, MptConfig, NezhaConfig, XLMRobertaXLConfig
from nezha_zoo.flax import losses as L
from nezha_zoo.flax.layers import Dropout, dropout_kept_rows, keep_positions
from nezha_zoo.testing import TINY_BERT, TOLERANCES, assert_close, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.flax]

pin_precision("flax")

_BERT = dict(TINY_BERT, num_labels=3, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
_BERT_FFN = ("layer", "1", "intermediate", "dense")
_MPT = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=99, pad_token_id=0, num_labels=3)
#: family -> (config, sequence-classification class name, the path of the last layer's FFN input dense)
FAMILIES = {
    "electra": (ElectraConfig(**_BERT, embedding_size=16), "FlaxElectraForSequenceClassification", _BERT_FFN),
    "nezha": (NezhaConfig(**_BERT, max_relative_position=3), "FlaxNezhaForSequenceClassification", _BERT_FFN),
    "mpnet": (MPNetConfig(**_BERT, max_position_embeddings=40), "FlaxMPNetForSequenceClassification", _BERT_FFN),
    "xlm_roberta_xl": (
        XLMRobertaXLConfig(**_BERT, max_position_embeddings=40, type_vocab_size=2),
        "FlaxXLMRobertaXLForSequenceClassification",
        _BERT_FFN,
    ),
    "mpt": (
        MptConfig(**_MPT, attn_config={"attn_pdrop": 0.3}),
        "FlaxMptForSequenceClassification",
        ("blocks", "1", "ffn", "up_proj"),
    ),
    # MPT's attention options the split Wqkv must honour: biases, clip_qkv (it clips at this init),
    # qk_ln and multi-query attention (key/value columns narrower than the query's)
    "mpt_options": (
        MptConfig(
            **_MPT,
            no_bias=False,
            attn_config={"attn_pdrop": 0.3, "clip_qkv": 0.1, "qk_ln": True, "attn_type": "multiquery_attention"},
        ),
        "FlaxMptForSequenceClassification",
        ("blocks", "1", "ffn", "up_proj"),
    ),
}
LOG, LOSS, GRAD = TOLERANCES["logits"], TOLERANCES["loss"], TOLERANCES["grad_rel"]


def nonzero_biases(params, seed: int = 2):
    """``params`` with every bias set to small random values (the initialiser's are zeros)."""
    rng = np.random.default_rng(seed)

    def bias(path, a):
        return jnp.asarray(rng.normal(0.0, 0.05, a.shape), a.dtype) if "bias" in str(path[-1]) else a

    return jax.tree_util.tree_map_with_path(bias, params)


@pytest.fixture(scope="module")
def models():
    """family -> the tiny sequence classifier (random weights), built once; ``mpt_options`` with nonzero
    biases, so the split Wqkv's bias slice counts."""
    out = {}
    for fam, (config, cls_name, _) in FAMILIES.items():
        out[fam] = getattr(nzf, cls_name)(config, seed=1)
    out["mpt_options"].params = nonzero_biases(out["mpt_options"].params)
    return out


def inputs_of(model, seed: int = 0, left: bool = False) -> dict:
    """Padded ids (left-padded for MPT's ``left``), mask and, where the family has them, token types."""
    x = tiny_inputs(batch=3, seq_len=7, vocab_size=99, seed=seed, pad=model.config.pad_token_id or 0)
    if left:  # move each row's padding to its front
        order = np.argsort(x["attention_mask"] == 1, axis=1, kind="stable")
        x = {k: np.take_along_axis(v, order, axis=1) for k, v in x.items()}
    return {k: v for k, v in x.items() if k != "token_type_ids" or model._accepts("token_type_ids")}


def ffn_rows(model, inputs: dict, ffn: tuple, **kwargs) -> list[tuple]:
    """The input shapes the last layer's FFN input dense sees in one forward of ``model.module``."""
    seen = []

    def spy(next_fun, args, kw, context):
        if context.method_name == "__call__" and tuple(context.module.path[-len(ffn) :]) == ffn:
            seen.append(tuple(args[0].shape))
        return next_fun(*args, **kw)

    with nn.intercept_methods(spy):
        model.module.apply({"params": model.params}, **{k: jnp.asarray(v) for k, v in inputs.items()}, **kwargs)
    return sorted(set(seen))  # our Dense calls flax's Dense.__call__ too: one shape per forward


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eval_logits_equal_the_full_computation(models, family):
    model = models[family]
    for left in (False, True) if family.startswith("mpt") else (False,):
        x = inputs_of(model, seed=2, left=left)
        pruned, full = model(**x).logits, model(**x, output_hidden_states=True).logits
        assert_close(pruned, full, LOG, f"{family} left={left}")
    # defaulted inputs: ids only (no mask, no token types)
    ids = {"input_ids": x["input_ids"]}
    assert_close(model(**ids).logits, model(**ids, output_hidden_states=True).logits, LOG, f"{family} ids only")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_logits_loss_and_gradients_equal_the_full_computation(models, family):
    """Dropout on, one rng: the pruned layer keeps the rows of the full-shape masks, so everything matches."""
    model = models[family]
    x = {k: jnp.asarray(v) for k, v in inputs_of(model, seed=3, left=family.startswith("mpt")).items()}
    labels = jnp.asarray([0, 2, 1])

    def loss(params, rng, full):
        out = model.module.apply(
            {"params": params}, **x, deterministic=False, output_hidden_states=full, rngs={"dropout": rng}
        )
        return L.sequence_classification_loss(out.logits, labels), out.logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
    key = jax.random.key(7, impl="rbg")
    (l_p, logits_p), g_p = step(model.params, key, False)
    (l_f, logits_f), g_f = step(model.params, key, True)
    assert_close(logits_p, logits_f, LOG, f"{family} training logits")
    assert_close(l_p, l_f, LOSS, f"{family} loss")
    scale = max(float(jnp.abs(v).max()) for v in jax.tree_util.tree_leaves(g_f))
    fp, ff = flatten_dict(g_p), flatten_dict(g_f)
    assert set(fp) == set(ff)
    for k, a in ff.items():
        assert_close(fp[k], a, GRAD * scale, f"{family} grad {'/'.join(k)}")
    # dropout is live: another key gives other logits
    (_, other), _ = step(model.params, jax.random.key(8, impl="rbg"), False)
    assert not np.allclose(np.asarray(other), np.asarray(logits_p))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_last_layer_computes_only_the_pooled_rows(models, family):
    """A spy on the last layer's FFN input: 1 row per sequence when pruned, L when something reads them all."""
    model = models[family]
    x = inputs_of(model, seed=4)
    ffn = FAMILIES[family][2]
    batch, length = x["input_ids"].shape
    width = getattr(model.config, "d_model", None) or model.config.hidden_size
    assert ffn_rows(model, x, ffn) == [(batch, 1, width)]
    assert ffn_rows(model, x, ffn, output_hidden_states=True) == [(batch, length, width)]
    assert ffn_rows(model, x, ffn, output_attentions=True) == [(batch, length, width)]


def test_multiple_choice_prunes_and_equals_the_full_computation():
    model = nzf.FlaxElectraForMultipleChoice(FAMILIES["electra"][0], seed=2)
    x = tiny_inputs(batch=2, seq_len=7, vocab_size=99, seed=5, num_choices=3)
    assert_close(model(**x).logits, model(**x, output_hidden_states=True).logits, LOG, "multiple choice")
    ffn = FAMILIES["electra"][2]
    assert ffn_rows(model, x, ffn) == [(6, 1, 32)]  # 2 x 3 choices, one row each
    assert ffn_rows(model, x, ffn, output_hidden_states=True) == [(6, 7, 32)]


def test_electra_multiple_choice_with_another_summary_keeps_every_position():
    config = ElectraConfig(**_BERT, embedding_size=16, summary_type="mean")
    model = nzf.FlaxElectraForMultipleChoice(config, seed=2)
    x = tiny_inputs(batch=2, seq_len=7, vocab_size=99, seed=5, num_choices=3)
    assert ffn_rows(model, x, FAMILIES["electra"][2]) == [(6, 7, 32)]


def test_next_sentence_prediction_prunes_and_equals_the_full_computation():
    """Nezha's next-sentence head reads the pooler only, i.e. position 0 of the last layer."""
    model = nzf.FlaxNezhaForNextSentencePrediction(FAMILIES["nezha"][0], seed=2)
    x = tiny_inputs(batch=3, seq_len=7, vocab_size=99, seed=5)
    assert_close(model(**x).logits, model(**x, output_hidden_states=True).logits, LOG, "next sentence")
    ffn = FAMILIES["nezha"][2]
    assert ffn_rows(model, x, ffn) == [(3, 1, 32)]
    assert ffn_rows(model, x, ffn, output_hidden_states=True) == [(3, 7, 32)]


def test_pruned_head_under_jit_equals_eager(models):
    model = models["nezha"]
    x = {k: jnp.asarray(v) for k, v in inputs_of(model, seed=6).items()}
    jitted = jax.jit(lambda p: model(**x, params=p).logits)(model.params)
    assert_close(jitted, model(**x, output_hidden_states=True).logits, LOG, "jit")


@pytest.mark.parametrize("family", ["electra", "mpt"])
def test_base_model_returns_the_kept_rows(models, family):
    """The base module's ``positions_to_keep``: (B, R, H) rows equal to those of the full output."""
    model = models[family]
    base = model.module.backbone_class(model.config)
    params = model.params[model.module.backbone_name]
    x = {k: jnp.asarray(v) for k, v in inputs_of(model, seed=8).items()}
    keep = jnp.asarray([[0, 3], [6, 1], [2, 2]])
    full = base.apply({"params": params}, **x).last_hidden_state
    pruned = base.apply({"params": params}, **x, positions_to_keep=keep).last_hidden_state
    assert pruned.shape == (3, 2, full.shape[-1])
    assert_close(pruned, keep_positions(full, keep), TOLERANCES["hidden"], f"{family} kept rows")


def test_bad_positions_to_keep_raise_input_error(models):
    model = models["electra"]
    base = model.module.backbone_class(model.config)
    params = {"params": model.params[model.module.backbone_name]}
    ids = jnp.asarray(inputs_of(model)["input_ids"])  # (3, 7)
    cases = {
        "shape": jnp.zeros((3,), jnp.int32),
        "batch": jnp.zeros((2, 1), jnp.int32),
        "integers": jnp.zeros((3, 1), jnp.float32),
        "lie in": jnp.full((3, 1), 7, jnp.int32),
    }
    for match, keep in cases.items():
        with pytest.raises(InputError, match=match):
            base.apply(params, ids, positions_to_keep=keep)
    with pytest.raises(InputError, match="cannot be combined"):
        base.apply(params, ids, positions_to_keep=jnp.zeros((3, 1), jnp.int32), output_hidden_states=True)
    mpt = models["mpt"]
    with pytest.raises(InputError, match="lie in"):
        mpt.module.backbone_class(mpt.config).apply(
            {"params": mpt.params["transformer"]}, ids, positions_to_keep=jnp.full((3, 1), -1, jnp.int32)
        )


def test_dropout_kept_rows_keeps_the_rows_of_the_full_mask():
    x = jnp.ones((2, 5, 3))
    keep = jnp.asarray([[4, 0], [2, 2]])
    key = jax.random.key(0)
    full = Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": key})
    rows = Dropout(0.5).apply({}, keep_positions(x, keep), False, keep, 5, rngs={"dropout": key})
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(keep_positions(full, keep)))
    # along another axis (attention probabilities' query axis)
    probs = jnp.ones((2, 4, 5, 5))
    full = dropout_kept_rows(key, 0.5, probs)
    rows = dropout_kept_rows(key, 0.5, keep_positions(probs, keep, axis=2), keep, 5, axis=2)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(keep_positions(full, keep, axis=2)))


def wqkv_calls(model, inputs: dict, block: str, **kwargs) -> list[tuple]:
    """(input shape, ``columns``) of each call of block ``block``'s ``Wqkv`` in one forward."""
    seen = []

    def spy(next_fun, args, kw, context):
        if context.method_name == "__call__" and tuple(context.module.path[-3:]) == (block, "attn", "Wqkv"):
            seen.append((tuple(args[0].shape), kw.get("columns")))
        return next_fun(*args, **kw)

    with nn.intercept_methods(spy):
        model.module.apply({"params": model.params}, **{k: jnp.asarray(v) for k, v in inputs.items()}, **kwargs)
    return sorted(set(seen), key=str)  # our Dense's plain call runs flax's Dense.__call__ too


@pytest.mark.parametrize("family", ["mpt", "mpt_options"])
def test_mpt_wqkv_projects_the_query_at_the_kept_rows_only(models, family):
    """The last block's Wqkv: one row per sequence (the whole kernel, its query columns kept), its
    key/value columns at every row; the first block, and a call that reads every row, run the whole
    projection at every row."""
    model = models[family]
    x = inputs_of(model, seed=4, left=True)
    (batch, length), width = x["input_ids"].shape, model.config.d_model
    d, kv, _ = model.config.qkv_widths
    assert wqkv_calls(model, x, "1") == [((batch, 1, width), None), ((batch, length, width), (d, d + 2 * kv))]
    assert wqkv_calls(model, x, "0") == [((batch, length, width), None)]
    assert wqkv_calls(model, x, "1", output_hidden_states=True) == [((batch, length, width), None)]


def test_mpt_lora_on_wqkv_pruned_equals_full():
    """A LoRA adapter (B nonzero) on Wqkv: the pruned head's logits, loss and adapter gradients under
    jax.jit, with dropout on and left padding, equal the full computation's."""
    model = nzf.FlaxMptForSequenceClassification(FAMILIES["mpt_options"][0], seed=1)
    model.params = nonzero_biases(model.params)
    model.enable_lora(2, target_modules=["Wqkv"])
    rng = np.random.default_rng(0)
    lora = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.normal(0.0, 0.3, a.shape), a.dtype) if "lora_B" in str(path) else a,
        model.lora_params,
    )
    x = {k: jnp.asarray(v) for k, v in inputs_of(model, seed=3, left=True).items()}
    labels = jnp.asarray([0, 2, 1])

    def loss(lora, rng, full):
        params = model.apply_lora(model.params, lora)
        out = model.module.apply(
            {"params": params}, **x, deterministic=False, output_hidden_states=full, rngs={"dropout": rng}
        )
        return L.sequence_classification_loss(out.logits, labels), out.logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
    key = jax.random.key(7, impl="rbg")
    (l_p, logits_p), g_p = step(lora, key, False)
    (l_f, logits_f), g_f = step(lora, key, True)
    (_, logits_0), _ = step(model.lora_params, key, False)
    assert not np.allclose(np.asarray(logits_0), np.asarray(logits_p))  # the adapter changes the product
    assert_close(logits_p, logits_f, LOG, "lora logits")
    assert_close(l_p, l_f, LOSS, "lora loss")
    scale = max(float(jnp.abs(v).max()) for v in jax.tree_util.tree_leaves(g_f))
    fp, ff = flatten_dict(g_p), flatten_dict(g_f)
    assert set(fp) == set(ff) and any("Wqkv" in k for k in ff)
    for k, a in ff.items():
        assert_close(fp[k], a, GRAD * scale, f"lora grad {'/'.join(k)}")


@pytest.mark.parametrize(
    "family, param_dtype", [("mpt", jnp.float32), ("mpt_options", jnp.bfloat16)], ids=["mixed", "bfloat16"]
)
def test_mpt_bf16_pruned_equals_full_bit_for_bit_under_jit(family, param_dtype):
    """``dtype=bfloat16`` (float32 or bfloat16 params): under ``jax.jit`` the pruned head's left-padded
    logits equal the full computation's bit for bit: the key/value columns and the kept rows' whole
    product round exactly as the full product does (nonzero biases: the bias add rounds too)."""
    model = nzf.FlaxMptForSequenceClassification(
        FAMILIES[family][0], seed=1, dtype=jnp.bfloat16, param_dtype=param_dtype
    )
    rng = np.random.default_rng(1)
    model.params = jax.tree_util.tree_map_with_path(  # biases start at zero; 0.05 stays inside clip_qkv's 0.1
        lambda path, a: jnp.asarray(rng.normal(0.0, 0.05, a.shape), a.dtype) if "bias" in str(path[-1]) else a,
        model.params,
    )
    assert {p.dtype for p in jax.tree_util.tree_leaves(model.params)} == {jnp.dtype(param_dtype)}
    x = {k: jnp.asarray(v) for k, v in inputs_of(model, seed=2, left=True).items()}
    assert int(x["attention_mask"][:, 0].min()) == 0  # some rows are left-padded
    d, kv, _ = model.config.qkv_widths
    calls = []  # traced, not run (an eager bf16 forward costs seconds): the pruned path's key/value call
    jax.eval_shape(lambda: calls.extend(wqkv_calls(model, x, "1")))
    assert ((3, 7, 32), (d, d + 2 * kv)) in calls

    @jax.jit
    def logits(params):
        def run(full):
            return model.module.apply({"params": params}, **x, output_hidden_states=full).logits

        return run(False), run(True)

    pruned, full = logits(model.params)
    assert pruned.dtype == full.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(pruned, np.float32), np.asarray(full, np.float32), err_msg=family)
