"""Keras 3 XLM-RoBERTa-XL vs transformers 4.57.6 PyTorch: weights, numerics, losses, cache, fit, errors."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
keras = pytest.importorskip("keras")

import nezha_zoo.tf as ztf  # noqa: E402
from nezha_zoo import XLMRobertaXLConfig  # noqa: E402
from nezha_zoo.pretrained import random_weights, save_weights  # noqa: E402
from nezha_zoo.spec import get_family  # noqa: E402
from nezha_zoo.spec.blocks import XLM_ROBERTA_XL_NAMES  # noqa: E402
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs  # noqa: E402
from nezha_zoo.tf.layers import TFBertLayer  # noqa: E402
from nezha_zoo.tf.modeling_utils import variable_key  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.hf]

FAMILY = get_family("xlm_roberta_xl")
HEADS = FAMILY.heads
PAD = 1
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,  # two rows so token types matter (the real models have one)
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
DECODER = dict(is_decoder=True, add_cross_attention=True)
LONGEST = TINY["max_position_embeddings"] - PAD - 1
HIDDEN_FIELDS = {"last_hidden_state", "hidden_states", "attentions", "cross_attentions", "pooler_output"}


@pytest.fixture(scope="module", autouse=True)
def _pin():
    pin_precision("tf")
    pin_precision("pt")


def _checkpoint(root, head: str, seed: int, **overrides):
    config = XLMRobertaXLConfig(**{**TINY, **overrides})
    spec = FAMILY.model_spec(config, head)
    path = root / f"{head}_{seed}"
    save_weights(path, config, spec, FAMILY, random_weights(spec, config, seed=seed))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per head: (checkpoint dir, transformers PyTorch model, our TF model) on one seeded checkpoint."""
    root = tmp_path_factory.mktemp("xlm_roberta_xl_tf")
    out = {}
    for i, head in enumerate(HEADS):
        path = _checkpoint(root, head, i)
        hf = getattr(transformers, f"XLMRobertaXL{head}").from_pretrained(path, attn_implementation="eager").eval()
        out[head] = (path, hf, getattr(ztf, f"TFXLMRobertaXL{head}").from_pretrained(path))
    return out


def _inputs(head: str, seed: int = 0, seq_len: int = 7) -> dict:
    choices = 3 if head == "ForMultipleChoice" else None
    return tiny_inputs(batch=2, seq_len=seq_len, vocab_size=99, pad=PAD, seed=seed, num_choices=choices)


def _hf(model, inputs: dict, **kw):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kw)


def _tf(model, inputs: dict, **kw):
    return model(**{k: tf.constant(v) for k, v in inputs.items()}, **kw)


def _compare(hf_out, tf_out, what: str) -> None:
    hf_keys = [k for k in hf_out.keys() if k != "past_key_values"]
    assert [k for k in tf_out.keys() if k != "past_key_values"] == hf_keys, f"{what}: {list(tf_out)} vs {hf_keys}"
    for k in hf_keys:
        tol = TOLERANCES["hidden"] if k in HIDDEN_FIELDS else TOLERANCES["logits"]
        ref, got = hf_out[k], tf_out[k]
        if isinstance(ref, tuple):
            assert len(ref) == len(got), f"{what}.{k}"
            for i, (a, b) in enumerate(zip(ref, got)):
                assert_close(b, a, tol, f"{what}.{k}[{i}]")
        else:
            assert_close(got, ref, tol, f"{what}.{k}")


@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec(head, models):
    model = models[head][2]
    spec = model.spec
    assert {variable_key(v) for v in model.weights} == {LAYOUTS["keras"].key(p) for p in spec}
    keys = {variable_key(v) for v in model.weights}
    assert any(k.endswith("pooler/dense/kernel") for k in keys) == (head in ("Model", "ForMultipleChoice"))


@pytest.mark.parametrize("head", HEADS)
def test_matches_transformers(head, models):
    _, hf, ours = models[head]
    x = _inputs(head, seed=1)
    _compare(
        _hf(hf, x, output_hidden_states=True, output_attentions=True),
        _tf(ours, x, output_hidden_states=True, output_attentions=True),
        f"{head} padded",
    )
    ids = {"input_ids": x["input_ids"]}
    _compare(_hf(hf, ids), _tf(ours, ids), f"{head} ids-only")


def test_left_padding_inputs_embeds_and_tuple(models):
    _, hf, ours = models["Model"]
    ids = np.array([[PAD, PAD, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    x = {"input_ids": ids, "attention_mask": (ids != PAD).astype(np.int64)}
    _compare(_hf(hf, x), _tf(ours, x), "left padding")
    emb = hf.embeddings.word_embeddings(torch.from_numpy(ids)).detach().numpy()
    e = {"inputs_embeds": emb, "attention_mask": x["attention_mask"]}
    _compare(_hf(hf, e), _tf(ours, e), "inputs_embeds")
    _, hf_mlm, ours_mlm = models["ForMaskedLM"]
    a, b = _hf(hf_mlm, x, return_dict=False), _tf(ours_mlm, x, return_dict=False)
    assert isinstance(b, tuple) and len(a) == len(b)
    assert_close(b[0], a[0], TOLERANCES["logits"], "tuple logits")


LOSS_LABELS = {
    "ForMaskedLM": lambda r: {"labels": np.where(r.random((2, 7)) < 0.3, -100, r.integers(0, 99, (2, 7)))},
    "ForCausalLM": lambda r: {"labels": r.integers(0, 99, (2, 7))},
    "ForSequenceClassification": lambda r: {"labels": r.integers(0, 2, (2,))},
    "ForMultipleChoice": lambda r: {"labels": r.integers(0, 3, (2,))},
    # labels on padded positions too: the attention mask drops them (transformers' XLM-R-XL rule)
    "ForTokenClassification": lambda r: {"labels": r.integers(0, 2, (2, 7))},
    "ForQuestionAnswering": lambda r: {"start_positions": np.array([1, 30]), "end_positions": np.array([5, 3])},
}


@pytest.mark.parametrize("head", list(LOSS_LABELS))
def test_losses_match_transformers(head, models):
    _, hf, ours = models[head]
    x = _inputs(head, seed=2)
    labels = LOSS_LABELS[head](np.random.default_rng(4))
    a, b = _hf(hf, {**x, **labels}), _tf(ours, {**x, **labels})
    assert_close(b.loss, a.loss, TOLERANCES["loss"], f"{head} loss")


def test_sequence_classification_regression_and_multi_label(tmp_path):
    for kw, labels in (
        ({"num_labels": 1}, np.array([0.5, -1.0], np.float32)),
        ({"num_labels": 3}, np.array([[0, 1, 1], [1, 0, 0]], np.float32)),
    ):
        path = _checkpoint(tmp_path, "ForSequenceClassification", kw["num_labels"], **kw)
        hf = transformers.XLMRobertaXLForSequenceClassification.from_pretrained(path).eval()
        ours = ztf.TFXLMRobertaXLForSequenceClassification.from_pretrained(path)
        x = {**_inputs("Model", seed=3), "labels": labels}
        assert_close(_tf(ours, x).loss, _hf(hf, x).loss, TOLERANCES["loss"], f"seqcls {kw}")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = _checkpoint(tmp_path_factory.mktemp("xl_tf_dec"), "ForCausalLM", 21, **DECODER)
    hf = transformers.XLMRobertaXLForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return hf, ztf.TFXLMRobertaXLForCausalLM.from_pretrained(path)


def _decoder_inputs():
    r = np.random.default_rng(12)
    ids = r.integers(2, 99, (2, 7))
    enc = r.standard_normal((2, 5, TINY["hidden_size"])).astype(np.float32)
    enc_mask = np.array([[1] * 5, [1] * 3 + [0] * 2])
    types = np.array([[0] * 3 + [1] * 4] * 2)
    return ids, enc, enc_mask, types


def test_decoder_with_cross_attention_matches_transformers(decoder):
    hf, ours = decoder
    ids, enc, enc_mask, types = _decoder_inputs()
    x = dict(
        input_ids=ids,
        attention_mask=np.array([[1] * 7, [1] * 5 + [0] * 2]),
        token_type_ids=types,
        encoder_hidden_states=enc,
        encoder_attention_mask=enc_mask,
    )
    a = _hf(hf, x, output_attentions=True, output_hidden_states=True)
    b = _tf(ours, x, output_attentions=True, output_hidden_states=True)
    _compare(a, b, "decoder")
    assert len(b.past_key_values) == 2 and len(b.past_key_values[0]) == 4  # cached by default (use_cache)


def test_decoder_cached_equals_full(decoder):
    hf, ours = decoder
    ids, enc, enc_mask, types = _decoder_inputs()
    enc_kw = dict(encoder_hidden_states=tf.constant(enc), encoder_attention_mask=tf.constant(enc_mask))
    full = _hf(
        hf, dict(input_ids=ids, token_type_ids=types, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    )
    step = ours(input_ids=tf.constant(ids[:, :4]), token_type_ids=tf.constant(types[:, :4]), use_cache=True, **enc_kw)
    logits, past = [step.logits], step.past_key_values
    for t in range(4, 7):  # positions continue after the cached length
        o = ours(
            input_ids=tf.constant(ids[:, t : t + 1]),
            token_type_ids=tf.constant(types[:, t : t + 1]),
            past_key_values=past,
            use_cache=True,
            **enc_kw,
        )
        logits.append(o.logits)
        past = o.past_key_values
    assert_close(tf.concat(logits, axis=1), full.logits, TOLERANCES["logits"], "cached vs full")


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForMultipleChoice", "Model"])
def test_save_pretrained_loads_in_transformers(head, models, tmp_path):
    _, hf, ours = models[head]
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, f"XLMRobertaXL{head}").from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = _inputs(head, seed=5)
    _compare(_hf(back, x), _tf(ours, x), f"{head} round trip")


def test_base_and_head_prefix_loading(models):
    base_path, _, base = models["Model"]
    head_path, _, head = models["ForQuestionAnswering"]
    model, info = ztf.TFXLMRobertaXLForQuestionAnswering.from_pretrained(base_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"qa_outputs.weight", "qa_outputs.bias"}
    w = base.encoder.final_norm.gamma
    assert_close(model.roberta.encoder.final_norm.gamma, w, 0.0, "base->head")
    model, info = ztf.TFXLMRobertaXLModel.from_pretrained(head_path, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {"qa_outputs.weight", "qa_outputs.bias"}
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}


def test_bad_inputs_raise_input_error(models):
    _, hf, ours = models["Model"]
    ids = np.random.default_rng(1).integers(2, 99, (1, LONGEST))
    _compare(_hf(hf, {"input_ids": ids}), _tf(ours, {"input_ids": ids}), "longest input")
    with pytest.raises(InputError, match="max_position_embeddings"):
        ours(tf.constant(np.concatenate([ids, ids[:, :1]], axis=1)))
    with pytest.raises(InputError, match="attention_mask"):
        ours(tf.constant(ids), attention_mask=tf.ones((1, LONGEST - 1)))
    with pytest.raises(InputError, match="input_ids"):
        ours(tf.constant([[5, 99]]))
    with pytest.raises(InputError, match="token_type_ids"):
        ours(tf.constant([[5, 6]]), token_type_ids=tf.constant([[0, 2]]))
    _, _, mc = models["ForMultipleChoice"]
    with pytest.raises(InputError):
        mc(tf.constant(ids))  # multiple choice needs (B, C, L)


def test_compile_fit_lowers_the_loss(models):
    path, _, _ = models["ForTokenClassification"]
    model = ztf.TFXLMRobertaXLForTokenClassification.from_pretrained(path)
    x = _inputs("ForTokenClassification", seed=6)
    data = {**{k: v.astype(np.int32) for k, v in x.items()}, "labels": np.random.default_rng(7).integers(0, 2, (2, 7))}
    before = float(model(data, training=False).loss)
    ds = tf.data.Dataset.from_tensor_slices(data).batch(2).repeat()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(ds, epochs=2, steps_per_epoch=4, verbose=0)
    after = float(model(data, training=False).loss)
    assert after < before, (before, after)


def test_gradient_checkpointing_in_a_decoder_gives_equal_gradients(decoder, monkeypatch, tmp_path):
    import nezha_zoo.tf.layers as tf_layers

    calls = []
    original = tf_layers._checkpointed
    monkeypatch.setattr(tf_layers, "_checkpointed", lambda *a: calls.append(1) or original(*a))
    ids, enc, enc_mask, types = _decoder_inputs()
    x = dict(input_ids=ids, token_type_ids=types, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    decoder[1].save_pretrained(tmp_path)  # the CausalLM's base weights (the pooler stays fresh)
    base = ztf.TFXLMRobertaXLModel.from_pretrained(tmp_path)
    ckpt = ztf.TFXLMRobertaXLModel.from_pretrained(tmp_path, gradient_checkpointing=True)

    def grads(m):
        with tf.GradientTape() as tape:
            # no use_cache given: a decoder's default cache must not switch checkpointing off in training
            loss = tf.reduce_sum(_tf(m, x, training=True).last_hidden_state ** 2)
        return loss, tape.gradient(loss, m.trainable_weights)

    (l1, g1), n_plain, (l2, g2) = grads(base), len(calls), grads(ckpt)
    assert n_plain == 0 and len(calls) == TINY["num_hidden_layers"]
    assert_close(l1, l2, 1e-5, "loss")
    top = max(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) for g in g1 if g is not None)
    for v, a, b in zip(base.trainable_weights, g1, g2):
        if a is None:  # the pooler is not on the loss path
            assert b is None and "pooler" in v.path, v.path
            continue
        assert_close(tf.convert_to_tensor(a), tf.convert_to_tensor(b), TOLERANCES["grad_rel"] * top, v.path)


def test_layer_drops_nothing_on_the_feed_forward_output():
    """XLM-R-XL's layer has no dropout on its feed-forward output (``XLM_ROBERTA_XL_NAMES.output_dropout``).

    transformers' ``XLMRobertaXLOutput`` is ``dense`` + residual.  With ``hidden_dropout_prob`` 0.9, no
    attention-probability dropout and the attention's output projection zeroed, the attention block adds
    exactly 0 (dropped or not) to its input, so only a feed-forward output dropout could make a training
    call differ from an inference call; with ``output_dropout=True`` (the control) it does.
    """
    config = XLMRobertaXLConfig(**{**TINY, "hidden_dropout_prob": 0.9})
    x = tf.random.stateless_normal((2, 7, TINY["hidden_size"]), seed=(0, 1))

    def training_and_inference(names):
        layer = TFBertLayer(config, names, name="0")
        layer(x)  # builds the variables
        projection = layer.attention.dense_output.dense
        for v in (projection.kernel, projection.bias):
            v.assign(tf.zeros_like(v))
        return layer(x, training=True)[0], layer(x, training=False)[0]

    train, infer = training_and_inference(XLM_ROBERTA_XL_NAMES)
    assert_close(train, infer, TOLERANCES["hidden"], "training vs inference call (no feed-forward dropout)")
    train, infer = training_and_inference(dataclasses.replace(XLM_ROBERTA_XL_NAMES, output_dropout=True))
    # The control: that dropout changes the output by more than half the feed-forward's whole contribution.
    contribution = float(tf.reduce_max(tf.abs(infer - x)))
    assert float(tf.reduce_max(tf.abs(train - infer))) > 0.5 * contribution > 0
