"""Keras 3 Nezha vs transformers 4.57.6 PyTorch: weights, numerics, relative positions, losses,
decoder + cache, lengths beyond max_position_embeddings, checkpoints, fit, errors."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
keras = pytest.importorskip("keras")

import nezha_zoo.tf as ztf  # noqa: E402
from nezha_zoo import NezhaConfig  # noqa: E402
from nezha_zoo.families.nezha import relative_position_table
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs  # noqa: E402
from nezha_zoo.tf.nezha import relative_position_encoding  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.hf]

HEADS = (
    "Model",
    "ForPreTraining",
    "ForMaskedLM",
    "ForNextSentencePrediction",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=16,
    max_relative_position=3,  # short inputs already clip the distances
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
HIDDEN, LOGITS = TOLERANCES["hidden"], TOLERANCES["logits"]
MEASURED: dict[str, float] = {}  # worst differences seen, printed at the end with -s


@pytest.fixture(scope="module", autouse=True)
def _pin():
    pin_precision("tf")
    pin_precision("pt")
    yield
    if MEASURED:
        logging.getLogger("nezha_zoo.tests").info("max-abs vs transformers: %s", MEASURED)
        print("\nmax-abs vs transformers:", {k: f"{v:.1e}" for k, v in sorted(MEASURED.items())})


def _hf_config(**kw):
    return transformers.NezhaConfig(**{**TINY, **kw})


def _pt_model(head: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, f"Nezha{head}")(_hf_config(**kw))
    with torch.no_grad():  # move every tensor away from its structured init (biases 0, LN 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _record(name: str, diff: float) -> None:
    MEASURED[name] = max(MEASURED.get(name, 0.0), diff)


def _pt(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


def _run_pt(pt, **kw):
    with torch.no_grad():
        return pt(**{k: (_pt(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A transformers-PyTorch checkpoint directory and model per head."""
    root = tmp_path_factory.mktemp("hf_nezha")
    out = {}
    for i, head in enumerate(HEADS):
        pt = _pt_model(head, seed=i)
        path = root / head
        pt.save_pretrained(path)
        out[head] = (path, pt)
    return out


@pytest.fixture(scope="module")
def tf_models(checkpoints):
    return {head: getattr(ztf, f"TFNezha{head}").from_pretrained(path) for head, (path, _) in checkpoints.items()}


def _inputs(head: str, seed: int = 0, seq_len: int = 9):
    return tiny_inputs(batch=2, seq_len=seq_len, seed=seed, num_choices=3 if head == "ForMultipleChoice" else None)


def _compare(name: str, tf_out, pt_out, what: str) -> None:
    pt_keys = [k for k in pt_out.keys() if pt_out[k] is not None]
    assert list(tf_out.keys()) == pt_keys, (list(tf_out.keys()), pt_keys)
    for key in pt_keys:
        a, b = tf_out[key], pt_out[key]
        if isinstance(b, tuple):
            assert len(a) == len(b)
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if isinstance(y, tuple):  # a cache layer (k, v[, cross_k, cross_v])
                    assert len(x) == len(y)
                    for xx, yy in zip(x, y, strict=True):
                        _record(f"{name}.{key}", assert_close(xx, yy, HIDDEN, f"{name}.{key}[{i}]"))
                    continue
                _record(f"{name}.{key}", assert_close(x, y, HIDDEN, f"{name}.{key}[{i}] ({what})"))
        else:
            tol = HIDDEN if key in ("last_hidden_state", "pooler_output") else LOGITS
            _record(f"{name}.{key}", assert_close(a, b, tol, f"{name}.{key} ({what})"))


# --- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec(head, tf_models):
    model = tf_models[head]
    keys = {v.path.split("/", 1)[1] for v in model.weights}
    assert keys == {LAYOUTS["keras"].key(p) for p in model.spec}
    for p in model.spec:  # stored shapes follow the layout (dense kernels transposed)
        assert tuple(model.variables_by_key()[LAYOUTS["keras"].key(p)].shape) == LAYOUTS["keras"].shape(p)
    assert len(model.trainable_weights) == len(model.spec)
    assert not any("relative" in k or "position" in k for k in keys)  # the encoding is computed, not stored


@pytest.mark.parametrize("head", ["Model", "ForMaskedLM", "ForSequenceClassification"])
def test_cross_attention_variables_in_every_head(head):
    cfg = NezhaConfig(**{**TINY, "is_decoder": True, "add_cross_attention": True})
    model = getattr(ztf, f"TFNezha{head}")(cfg, seed=0)
    keys = {v.path.split("/", 1)[1] for v in model.weights}
    assert keys == {LAYOUTS["keras"].key(p) for p in model.spec}
    assert any("crossattention/self/query" in k for k in keys)


def test_model_without_pooler_and_untied_decoder():
    cfg = NezhaConfig(**TINY)
    model = ztf.TFNezhaModel(cfg, add_pooling_layer=False, seed=0)
    keys = {v.path.split("/", 1)[1] for v in model.weights}
    assert keys == {LAYOUTS["keras"].key(p) for p in model.spec} and not any(k.startswith("pooler") for k in keys)
    assert model(np.array([[5, 6, 7]])).pooler_output is None
    untied = ztf.TFNezhaForMaskedLM(NezhaConfig(**{**TINY, "tie_word_embeddings": False}), seed=0)
    keys = {v.path.split("/", 1)[1] for v in untied.weights}
    assert "cls/predictions/decoder/kernel" in keys and keys == {LAYOUTS["keras"].key(p) for p in untied.spec}
    with pytest.raises(ValueError, match="is_decoder"):
        ztf.TFNezhaModel(NezhaConfig(**{**TINY, "add_cross_attention": True}))


def test_relative_encoding_equals_transformers_table():
    from transformers.models.deprecated.nezha.modeling_nezha import NezhaRelativePositionsEncoding

    for length, depth, k in ((16, 8, 3), (12, 6, 64), (10, 8, 0)):
        ref = NezhaRelativePositionsEncoding(length, depth, k).positions_encoding.numpy()
        table = relative_position_table(k, depth)
        assert table.shape == (2 * k + 1, depth)
        ours = relative_position_encoding(table, length, length).numpy()
        _record("relative_encoding", assert_close(ours, ref, 1e-6, f"R L={length} d={depth} K={k}"))
        # A query block at offset o sees the rows o.. of the full grid (cached decoding).
        part = relative_position_encoding(table, 3, length, query_offset=5).numpy()
        np.testing.assert_array_equal(part, ours[5:8])


# --- numerics vs transformers PyTorch ---------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_matches_transformers(head, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    inputs = _inputs(head)
    ref = _run_pt(pt, **inputs, output_hidden_states=True, output_attentions=True)
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    _compare(head, out, ref, "padded + token types")
    # Optional inputs left out: attention mask ones, token types zeros.
    ids = inputs["input_ids"]
    _compare(head, model(ids), _run_pt(pt, input_ids=ids), "defaults")


def test_inputs_embeds_and_head_mask(checkpoints, tf_models):
    _, pt = checkpoints["Model"]
    model = tf_models["Model"]
    inputs = _inputs("Model", seed=1)
    embeds = np.random.default_rng(0).normal(size=(2, 9, 32)).astype(np.float32)
    head_mask = np.array([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]], np.float32)
    kw = dict(attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
    ref = _run_pt(pt, inputs_embeds=embeds, head_mask=head_mask, **kw)
    out = model(inputs_embeds=embeds, head_mask=head_mask, **kw)
    _compare("Model[embeds+head_mask]", out, ref, "embeds + head mask")
    ref = _run_pt(pt, input_ids=inputs["input_ids"], head_mask=head_mask[0], **kw)
    out = model(input_ids=inputs["input_ids"], head_mask=head_mask[0], **kw)
    _compare("Model[1-d head_mask]", out, ref, "1-d head mask")


def test_return_dict_false_and_input_conventions(tf_models):
    model = tf_models["ForSequenceClassification"]
    x = _inputs("x", seed=7)
    ids, mask, types = x["input_ids"], x["attention_mask"], x["token_type_ids"]
    full = model(ids, attention_mask=mask, token_type_ids=types, labels=np.array([0, 1]))
    tup = model(ids, attention_mask=mask, token_type_ids=types, labels=np.array([0, 1]), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2
    assert_close(tup[0], full.loss, 0, "loss")
    assert_close(tup[1], full.logits, 0, "logits")
    packed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    for other in (model([ids, mask, types]), model(packed)):
        assert_close(other.logits, full.logits, 0.0, "packed inputs")


# --- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head,labels",
    [
        ("ForPreTraining", "pretrain"),
        ("ForMaskedLM", "mlm"),
        ("ForNextSentencePrediction", "nsp"),
        ("ForSequenceClassification", "single"),
        ("ForSequenceClassification", "multi"),
        ("ForMultipleChoice", "mc"),
        ("ForTokenClassification", "tok"),
        ("ForQuestionAnswering", "qa"),
    ],
)
def test_losses_match_transformers(head, labels, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    inputs = _inputs(head, seed=2)
    rng = np.random.default_rng(5)
    mlm = rng.integers(0, 99, size=(2, 9))
    mlm[:, ::3] = -100
    kw = {
        "pretrain": {"labels": mlm, "next_sentence_label": np.array([1, 0])},
        "mlm": {"labels": mlm},
        "nsp": {"labels": np.array([1, 0])},
        "single": {"labels": np.array([1, 0])},
        "multi": {"labels": rng.integers(0, 2, size=(2, 2)).astype(np.float32)},
        "mc": {"labels": np.array([2, 0])},
        "tok": {"labels": np.where(rng.random((2, 9)) < 0.2, -100, rng.integers(0, 2, size=(2, 9)))},
        "qa": {"start_positions": np.array([3, 40]), "end_positions": np.array([5, 1])},  # 40: clamped, ignored
    }[labels]
    if hasattr(pt.config, "problem_type"):
        pt.config.problem_type = None  # transformers stores the inferred type on the config
    ref = _run_pt(pt, **inputs, **kw)
    out = model(**inputs, **kw)
    assert out.loss.shape == ()
    _record(f"{head}.loss[{labels}]", assert_close(out.loss, ref.loss, LOGITS, f"{head} loss"))
    if labels == "pretrain":  # loss = MLM CE + NSP CE; only one of the two labels gives none (as transformers)
        assert model(**inputs, labels=mlm).loss is None
        ce = torch.nn.CrossEntropyLoss()
        parts = ce(_pt(out.prediction_logits.numpy()).reshape(-1, 99), _pt(mlm).reshape(-1)) + ce(
            _pt(out.seq_relationship_logits.numpy()), _pt(kw["next_sentence_label"])
        )
        assert_close(out.loss, parts, LOGITS, "loss = MLM + NSP")


def test_regression_loss(tmp_path):
    pt = _pt_model("ForSequenceClassification", num_labels=1)
    pt.save_pretrained(tmp_path)
    model = ztf.TFNezhaForSequenceClassification.from_pretrained(tmp_path)
    inputs = _inputs("x", seed=3)
    labels = np.array([0.5, -1.25], np.float32)
    ref = _run_pt(pt, **inputs, labels=labels)
    _record(
        "ForSequenceClassification.loss[regression]",
        assert_close(model(**inputs, labels=labels).loss, ref.loss, LOGITS, "mse"),
    )


# --- decoder mode, cache, long sequences ---------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A decoder NezhaModel with cross-attention (max_position_embeddings 16), ours and transformers'
    with the table raised to 32 positions (same weights: the encoding is not stored)."""
    path = tmp_path_factory.mktemp("decoder")
    pt = _pt_model("Model", seed=11, is_decoder=True, add_cross_attention=True)
    pt.save_pretrained(path)
    long_pt = transformers.NezhaModel.from_pretrained(path, max_position_embeddings=32).eval()
    return pt, long_pt, ztf.TFNezhaModel.from_pretrained(path)


def test_decoder_with_cross_attention_matches_transformers(decoder):
    pt, _, model = decoder
    inputs = _inputs("x", seed=4)
    rng = np.random.default_rng(1)
    # transformers applies the relative terms in cross-attention too and needs Le == L there.
    enc = rng.normal(size=(2, 9, 32)).astype(np.float32)
    enc_mask = np.array([[1] * 9, [1] * 6 + [0] * 3])
    kw = dict(
        encoder_hidden_states=enc,
        encoder_attention_mask=enc_mask,
        output_attentions=True,
        output_hidden_states=True,
        use_cache=True,
    )
    ref = _run_pt(pt, **inputs, **kw)
    out = model(**inputs, **kw)
    assert len(out.past_key_values) == 2 and all(len(layer) == 4 for layer in out.past_key_values)
    _compare("decoder", out, ref, "decoder + cross-attention")
    mlm_cfg = NezhaConfig(**{**TINY, "is_decoder": True, "add_cross_attention": True})
    assert ztf.TFNezhaForMaskedLM(mlm_cfg, seed=0)(inputs["input_ids"], encoder_hidden_states=enc).logits.shape == (
        2,
        9,
        99,
    )


def _cached_decode(model, ids, enc, first: int, **kw):
    """A prefix of ``first`` tokens, then one token at a time with the cache."""
    out = model(ids[:, :first], encoder_hidden_states=enc, use_cache=True, **kw)
    states, past = [out.last_hidden_state], out.past_key_values
    for t in range(first, ids.shape[1]):
        step = model(ids[:, t : t + 1], encoder_hidden_states=enc, past_key_values=past, use_cache=True, **kw)
        states.append(step.last_hidden_state)
        past = step.past_key_values
    return tf.concat(states, axis=1), past


def test_cached_decoding_equals_full_decoding(decoder):
    pt, long_pt, model = decoder
    rng = np.random.default_rng(6)
    ids = rng.integers(2, 99, size=(2, 9))
    enc = rng.normal(size=(2, 9, 32)).astype(np.float32)
    full = model(ids, encoder_hidden_states=enc).last_hidden_state
    cached, past = _cached_decode(model, ids, enc, first=4)
    assert past[0][0].shape == (2, 4, 9, 8) and past[0][2].shape == (2, 4, 9, 8)
    _record("decoder.cached_vs_full", assert_close(cached, full, HIDDEN, "cached vs our full pass"))
    ref = _run_pt(pt, input_ids=ids, encoder_hidden_states=enc).last_hidden_state
    _record("decoder.cached_vs_transformers_full", assert_close(cached, ref, HIDDEN, "cached vs transformers full"))
    # An encoder of another length (transformers cannot run this): cached still equals full.
    enc5 = enc[:, :5]
    full5 = model(ids, encoder_hidden_states=enc5).last_hidden_state
    cached5, _ = _cached_decode(model, ids, enc5, first=1)
    _record("decoder.cached_vs_full[Le=5]", assert_close(cached5, full5, HIDDEN, "cached vs full, Le != L"))
    # An explicit mask covers cached + new positions; a wrong length is refused.
    first = model(ids[:, :4], encoder_hidden_states=enc, use_cache=True)
    step = model(
        ids[:, 4:5],
        encoder_hidden_states=enc,
        past_key_values=first.past_key_values,
        attention_mask=np.ones((2, 5), np.int64),
    )
    assert_close(step.last_hidden_state, cached[:, 4:5], HIDDEN, "explicit mask with cache")
    with pytest.raises(InputError, match="cached positions"):
        model(
            ids[:, 4:5],
            encoder_hidden_states=enc,
            past_key_values=first.past_key_values,
            attention_mask=np.ones((2, 1), np.int64),
        )


def test_self_attention_decoder_cache_matches_transformers(tmp_path):
    pt = _pt_model("Model", seed=13, is_decoder=True)
    pt.save_pretrained(tmp_path)
    model = ztf.TFNezhaModel.from_pretrained(tmp_path)
    ids = np.random.default_rng(8).integers(2, 99, size=(2, 8))
    ref = _run_pt(pt, input_ids=ids, use_cache=False).last_hidden_state
    assert model(ids).past_key_values is None and model(ids, use_cache=True).past_key_values is not None
    cached, _ = _cached_decode(model, ids, None, first=3)
    _record("causal.cached_vs_transformers_full", assert_close(cached, ref, HIDDEN, "causal cached vs transformers"))


def test_longer_than_max_position_embeddings(checkpoints, tf_models, decoder):
    """24 and 20 tokens with max_position_embeddings 16: ours runs and equals transformers built with
    a 32-position table (transformers' own 16-position model fails)."""
    path, pt = checkpoints["ForSequenceClassification"]
    long_pt = transformers.NezhaForSequenceClassification.from_pretrained(path, max_position_embeddings=32).eval()
    inputs = _inputs("x", seed=14, seq_len=24)
    with pytest.raises(RuntimeError):
        _run_pt(pt, **inputs)
    ref = _run_pt(long_pt, **inputs, output_hidden_states=True, output_attentions=True)
    out = tf_models["ForSequenceClassification"](**inputs, output_hidden_states=True, output_attentions=True)
    _compare("long[L=24]", out, ref, "24 > max_position_embeddings")
    # Cached decoding past the limit equals transformers' (32-position) full pass.
    _, long_dec, model = decoder
    rng = np.random.default_rng(15)
    ids = rng.integers(2, 99, size=(2, 20))
    enc = rng.normal(size=(2, 20, 32)).astype(np.float32)
    cached, _ = _cached_decode(model, ids, enc, first=12)
    ref = _run_pt(long_dec, input_ids=ids, encoder_hidden_states=enc).last_hidden_state
    _record("long.cached_vs_transformers", assert_close(cached, ref, HIDDEN, "long cached decoding"))


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForPreTraining", "ForMultipleChoice", "Model"])
def test_save_pretrained_loads_in_transformers(head, tf_models, tmp_path):
    model = tf_models[head]
    model.save_pretrained(tmp_path)
    pt = getattr(transformers, f"Nezha{head}").from_pretrained(tmp_path).eval()
    inputs = _inputs(head, seed=8)
    _compare(f"roundtrip.{head}", model(**inputs), _run_pt(pt, **inputs), "round trip")
    again = type(model).from_pretrained(tmp_path)
    for k, v in model.variables_by_key().items():
        np.testing.assert_array_equal(again.variables_by_key()[k].numpy(), v.numpy())


def test_base_and_head_prefix_loading(checkpoints, tf_models):
    base_dir, _ = checkpoints["Model"]
    head, info = ztf.TFNezhaForTokenClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    base_vars = tf_models["Model"].variables_by_key()
    for k, v in head.variables_by_key().items():
        if k.startswith("nezha/"):
            np.testing.assert_array_equal(v.numpy(), base_vars[k[len("nezha/") :]].numpy())
    head_dir, _ = checkpoints["ForPreTraining"]
    base, info = ztf.TFNezhaModel.from_pretrained(head_dir, output_loading_info=True)
    assert info["missing_keys"] == []
    assert sorted(info["unexpected_keys"]) == sorted(
        [
            "cls.predictions.bias",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.weight",
            "cls.seq_relationship.bias",
            "cls.seq_relationship.weight",
        ]
    )
    pre_vars = tf_models["ForPreTraining"].variables_by_key()
    for k, v in base.variables_by_key().items():
        np.testing.assert_array_equal(v.numpy(), pre_vars["nezha/" + k].numpy())
    with pytest.raises(CheckpointError):
        ztf.TFNezhaForTokenClassification.from_pretrained(base_dir, strict=True)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(tf_models):
    model = tf_models["ForSequenceClassification"]
    ids = np.ones((2, 7), np.int64)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.full((2, 7), 99))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.full((2, 7), -1))
    with pytest.raises(InputError, match="token types"):
        model(ids, token_type_ids=np.full((2, 7), 2))
    with pytest.raises(InputError, match="attention_mask"):
        model(ids, attention_mask=np.ones((2, 6), np.int64))
    with pytest.raises(InputError, match="token_type_ids"):
        model(ids, token_type_ids=np.zeros((2, 8), np.int64))
    with pytest.raises(InputError, match="not both"):
        model(input_ids=ids, inputs_embeds=np.zeros((2, 7, 32), np.float32))
    with pytest.raises(InputError, match="give input_ids or inputs_embeds"):
        model(attention_mask=ids)
    with pytest.raises(InputError, match="last dimension"):
        model(inputs_embeds=np.zeros((2, 7, 16), np.float32))
    with pytest.raises(InputError, match="rank 3"):
        tf_models["ForMultipleChoice"](ids)
    # No length limit: 40 tokens with max_position_embeddings 16 run, in every head kind.
    assert model(np.ones((1, 40), np.int64)).logits.shape == (1, 2)
    assert tf_models["ForMultipleChoice"](np.ones((1, 2, 40), np.int64)).logits.shape == (1, 2)


# --- training ------------------------------------------------------------------------------------


def test_training_flag_controls_dropout():
    model = ztf.TFNezhaForTokenClassification(NezhaConfig(**{**TINY, "hidden_dropout_prob": 0.3}), seed=0)
    ids = _inputs("x")["input_ids"]
    a, b = model(ids).logits, model(ids, training=False).logits
    assert_close(a, b, 0.0, "eval is deterministic")
    assert float(tf.reduce_max(tf.abs(model(ids, training=True).logits - a))) > 1e-3


def test_training_step_gradients_match_transformers(checkpoints, tf_models):
    """One pre-training step (dropout off): loss and every gradient, tied word embeddings included."""
    from nezha_zoo.tf.modeling_utils import KERAS_LAYOUT

    _, pt = checkpoints["ForPreTraining"]
    model = tf_models["ForPreTraining"]
    inputs = _inputs("x", seed=16)
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    kw = dict(labels=labels, next_sentence_label=np.array([0, 1]))
    pt.zero_grad()
    ref = pt(**{k: _pt(v) for k, v in {**inputs, **kw}.items()})
    ref.loss.backward()
    with tf.GradientTape() as tape:
        loss = model(**inputs, **kw, training=True).loss
    matched = list(model._matched())
    grads = tape.gradient(loss, [var for _, var in matched])
    assert_close(loss, ref.loss.detach(), LOGITS, "loss")
    pt_grads = {name: p.grad.numpy() for name, p in pt.named_parameters()}
    top = max(float(np.abs(g).max()) for g in pt_grads.values())
    for (p, var), g in zip(matched, grads, strict=True):
        assert g is not None, var.path
        mine = KERAS_LAYOUT.from_stored(p, np.asarray(tf.convert_to_tensor(g)))
        _record("ForPreTraining.grad", assert_close(mine, pt_grads[p.name], TOLERANCES["grad_rel"] * top, p.name))


def test_gradient_checkpointing_gives_equal_gradients(checkpoints, monkeypatch):
    import nezha_zoo.tf.layers as tf_layers

    calls = []
    original = tf_layers._checkpointed
    monkeypatch.setattr(tf_layers, "_checkpointed", lambda *a: calls.append(1) or original(*a))
    path, _ = checkpoints["ForMaskedLM"]
    inputs = _inputs("x", seed=9)
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    results = []
    for flag in (False, True):
        model = ztf.TFNezhaForMaskedLM.from_pretrained(path, gradient_checkpointing=flag)
        with tf.GradientTape() as tape:
            loss = model(**inputs, labels=labels, training=True).loss
        results.append((loss, tape.gradient(loss, model.trainable_weights)))
    (l1, g1), (l2, g2) = results
    assert len(calls) == 2  # one recompute_grad block per layer, only in the checkpointed model
    assert_close(l1, l2, 1e-6, "loss")
    top = max(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) for g in g1)
    for a, b in zip(g1, g2, strict=True):
        assert_close(tf.convert_to_tensor(a), tf.convert_to_tensor(b), TOLERANCES["grad_rel"] * top, "grad")


def test_pretraining_fit_on_internal_loss():
    keras.utils.set_random_seed(0)
    model = ztf.TFNezhaForPreTraining(NezhaConfig(**TINY), seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 99, size=(16, 8))
    labels = np.where(rng.random((16, 8)) < 0.3, ids, -100)
    data = {"input_ids": ids, "labels": labels, "next_sentence_label": (ids[:, 0] > 50).astype(np.int64)}
    ds = tf.data.Dataset.from_tensor_slices(data).batch(8)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    hist = model.fit(ds, epochs=5, shuffle=False, verbose=0).history["loss"]
    assert hist[-1] < 0.9 * hist[0], hist


def test_fit_example_loss_falls():
    path = Path(__file__).resolve().parents[2] / "examples" / "tf_fit_nezha.py"
    spec = importlib.util.spec_from_file_location("tf_fit_nezha_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    history = mod.main(steps=40)
    assert history[-1] < 0.6 * history[0], history
