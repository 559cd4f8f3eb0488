"""Keras 3 Electra vs transformers 4.57.6 PyTorch: weights, numerics, losses, cache, fit, errors."""

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
from nezha_zoo import ElectraConfig  # noqa: E402
from nezha_zoo.io.errors import CheckpointError  # noqa: E402
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.hf]

HEADS = (
    "Model",
    "ForPreTraining",
    "ForMaskedLM",
    "ForCausalLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
TINY = dict(
    vocab_size=99,
    embedding_size=16,  # != hidden_size: covers embeddings_project
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
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
    return transformers.ElectraConfig(**{**TINY, **kw})


def _pt_model(head: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls = getattr(transformers, f"Electra{head}")
    model = cls(_hf_config(**kw))
    with torch.no_grad():  # move every tensor away from its structured init (biases 0, LN 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _record(name: str, diff: float) -> None:
    MEASURED[name] = max(MEASURED.get(name, 0.0), diff)


def _pt(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A transformers-PyTorch checkpoint directory and model per head."""
    root = tmp_path_factory.mktemp("hf_electra")
    out = {}
    for i, head in enumerate(HEADS):
        kw = {"is_decoder": True} if head == "ForCausalLM" else {}
        pt = _pt_model(head, seed=i, **kw)
        path = root / head
        pt.save_pretrained(path)
        out[head] = (path, pt)
    return out


@pytest.fixture(scope="module")
def tf_models(checkpoints):
    return {head: getattr(ztf, f"TFElectra{head}").from_pretrained(path) for head, (path, _) in checkpoints.items()}


def _inputs(head: str, seed: int = 0):
    return tiny_inputs(batch=2, seq_len=7, seed=seed, num_choices=3 if head == "ForMultipleChoice" else None)


def _compare(head: str, tf_out, pt_out, what: str, mask=None) -> None:
    pt_keys = [k for k in pt_out.keys() if pt_out[k] is not None]
    assert list(tf_out.keys()) == pt_keys, (list(tf_out.keys()), pt_keys)
    for key in pt_keys:
        a, b = tf_out[key], pt_out[key]
        if isinstance(b, tuple):
            assert len(a) == len(b)
            for i, (x, y) in enumerate(zip(a, b)):
                d = assert_close(x, y, HIDDEN, f"{head}.{key}[{i}]")
                _record(f"{head}.{key}", d)
        else:
            tol = HIDDEN if key == "last_hidden_state" else LOGITS
            d = assert_close(a, b, tol, f"{head}.{key} ({what})")
            _record(f"{head}.{key}", d)


# --- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec(head, tf_models):
    model = tf_models[head]
    keys = {v.path.split("/", 1)[1] for v in model.weights}
    assert keys == {LAYOUTS["keras"].key(p) for p in model.spec}
    for p in model.spec:  # stored shapes follow the layout (dense kernels transposed)
        assert tuple(model.variables_by_key()[LAYOUTS["keras"].key(p)].shape) == LAYOUTS["keras"].shape(p)
    assert len(model.trainable_weights) == len(model.spec)


def test_variable_paths_without_projection():
    cfg = ElectraConfig(**{**TINY, "embedding_size": 32})
    model = ztf.TFElectraModel(cfg, seed=0)
    keys = {v.path.split("/", 1)[1] for v in model.weights}
    assert keys == {LAYOUTS["keras"].key(p) for p in model.spec}
    assert not any("embeddings_project" in k for k in keys)


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForTokenClassification", "Model"])
def test_cross_attention_variables_in_every_head(head):
    cfg = ElectraConfig(**{**TINY, "is_decoder": True, "add_cross_attention": True})
    model = getattr(ztf, f"TFElectra{head}")(cfg, seed=0)
    keys = {v.path.split("/", 1)[1] for v in model.weights}
    assert keys == {LAYOUTS["keras"].key(p) for p in model.spec}
    assert any("crossattention" in k for k in keys)


def test_init_follows_spec():
    cfg = ElectraConfig(**TINY)
    a, b = ztf.TFElectraForMaskedLM(cfg, seed=3), ztf.TFElectraForMaskedLM(cfg, seed=3)
    va, vb = a.variables_by_key(), b.variables_by_key()
    for k in va:
        np.testing.assert_array_equal(va[k].numpy(), vb[k].numpy())
    word = va["electra/embeddings/word_embeddings/embeddings"].numpy()
    assert np.all(word[cfg.pad_token_id] == 0) and 0.01 < word[1:].std() < 0.03
    assert np.all(va["electra/embeddings/LayerNorm/gamma"].numpy() == 1)
    assert np.all(va["generator_lm_head/bias"].numpy() == 0)


@pytest.mark.parametrize("names,final_norm", [("XLM_ROBERTA_XL_NAMES", "LayerNorm"), ("MPNET_NAMES", None)])
def test_shared_encoder_follows_renamed_layer_names(names, final_norm):
    """The shared blocks take their names from BertLayerNames, as the spec does (XLM-R-XL: pre-LN,
    final encoder norm; MPNet: attention.attn.{q,k,v,o} + attention.LayerNorm)."""
    from nezha_zoo.spec import blocks
    from nezha_zoo.spec.blocks import bert_encoder, layer_norm
    from nezha_zoo.tf.layers import TFBertEncoder

    cfg = ElectraConfig(**{**TINY, "is_decoder": True, "add_cross_attention": True})
    layer_names = getattr(blocks, names)
    encoder = TFBertEncoder(cfg, layer_names, final_norm_name=final_norm, name="encoder")
    h = tf.zeros((1, 3, 32))
    encoder(h, encoder_hidden_states=h, use_cache=True)
    params = bert_encoder("encoder", 2, 32, 37, layer_names, cross_attention=True)
    if final_norm:
        params += layer_norm(f"encoder.{final_norm}", 32)
    assert {v.path for v in encoder.weights} == {LAYOUTS["keras"].key(p) for p in params}


# --- numerics vs transformers PyTorch ---------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_matches_transformers(head, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    inputs = _inputs(head)
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in inputs.items()}, output_hidden_states=True, output_attentions=True)
    # transformers returns a decoder cache only when asked; ours follows config.use_cache, so say no.
    extra = {"use_cache": False} if head == "ForCausalLM" else {}
    out = model(**inputs, output_hidden_states=True, output_attentions=True, **extra)
    _compare(head, out, ref, "padded + token types")
    # Optional inputs left out: attention mask ones, token types zeros, positions arange.
    ids = inputs["input_ids"]
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids))
    out = model(ids, use_cache=False) if head == "ForCausalLM" else model(ids)
    _compare(head, out, ref, "defaults")


@pytest.mark.parametrize(
    "head,kw",
    [
        ("ForMultipleChoice", {"summary_type": "mean", "summary_activation": "tanh"}),
        ("ForMultipleChoice", {"summary_type": "last", "summary_use_proj": False, "summary_activation": None}),
        ("ForMaskedLM", {"hidden_act": "relu"}),  # the generator head stays GELU
        ("ForPreTraining", {"hidden_act": "relu", "type_vocab_size": 3}),
    ],
)
def test_config_variants_match_transformers(head, kw, tmp_path):
    pt = _pt_model(head, seed=21, **kw)
    pt.save_pretrained(tmp_path)
    model = getattr(ztf, f"TFElectra{head}").from_pretrained(tmp_path)
    inputs = _inputs(head, seed=12)
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in inputs.items()})
    _compare(f"{head}{sorted(kw)}", model(**inputs), ref, str(kw))


def test_inputs_embeds_and_head_mask(checkpoints, tf_models):
    _, pt = checkpoints["Model"]
    model = tf_models["Model"]
    inputs = _inputs("Model", seed=1)
    embeds = np.random.default_rng(0).normal(size=(2, 7, TINY["embedding_size"])).astype(np.float32)
    head_mask = np.array([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]], np.float32)
    kw = dict(attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
    with torch.no_grad():
        ref = pt(inputs_embeds=_pt(embeds), head_mask=_pt(head_mask), **{k: _pt(v) for k, v in kw.items()})
    out = model(inputs_embeds=embeds, head_mask=head_mask, **kw)
    diff = assert_close(out.last_hidden_state, ref.last_hidden_state, HIDDEN, "embeds")
    _record("Model.inputs_embeds+head_mask", diff)
    with torch.no_grad():
        ref = pt(input_ids=_pt(inputs["input_ids"]), head_mask=_pt(head_mask[0]), **{k: _pt(v) for k, v in kw.items()})
    out = model(input_ids=inputs["input_ids"], head_mask=head_mask[0], **kw)
    assert_close(out.last_hidden_state, ref.last_hidden_state, HIDDEN, "1-d head_mask")


def test_return_dict_false_gives_tuple(tf_models):
    model = tf_models["ForSequenceClassification"]
    inputs = _inputs("ForSequenceClassification")
    full = model(**inputs, labels=np.array([0, 1]), output_hidden_states=True)
    tup = model(**inputs, labels=np.array([0, 1]), output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 3
    assert_close(tup[0], full.loss, 0, "loss")
    assert_close(tup[1], full.logits, 0, "logits")


# --- losses ---------------------------------------------------------------------------------------


def _loss_pair(pt, model, inputs, **labels):
    if hasattr(pt.config, "problem_type"):
        pt.config.problem_type = None  # transformers stores the inferred type on the config
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in {**inputs, **labels}.items()})
    out = model(**inputs, **labels)
    return out, ref


@pytest.mark.parametrize(
    "head,labels",
    [
        ("ForMaskedLM", "mlm"),
        ("ForCausalLM", "mlm"),
        ("ForTokenClassification", "tok"),
        ("ForPreTraining", "rtd"),
        ("ForMultipleChoice", "mc"),
        ("ForQuestionAnswering", "qa"),
        ("ForSequenceClassification", "single"),
        ("ForSequenceClassification", "multi"),
    ],
)
def test_losses_match_transformers(head, labels, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    inputs = _inputs(head, seed=2)
    rng = np.random.default_rng(5)
    if labels == "mlm":
        lab = rng.integers(0, 99, size=(2, 7))
        lab[:, ::3] = -100
        kw = {"labels": lab}
    elif labels == "tok":
        lab = rng.integers(0, 2, size=(2, 7))
        lab[0, :2] = -100
        kw = {"labels": lab}
    elif labels == "rtd":
        kw = {"labels": rng.integers(0, 2, size=(2, 7))}
    elif labels == "mc":
        kw = {"labels": np.array([2, 0])}
    elif labels == "qa":  # one position past the end: clamped to L and ignored
        kw = {"start_positions": np.array([3, 40]), "end_positions": np.array([5, 1])}
    elif labels == "single":
        kw = {"labels": np.array([1, 0])}
    else:
        kw = {"labels": rng.integers(0, 2, size=(2, 2)).astype(np.float32)}
    out, ref = _loss_pair(pt, model, inputs, **kw)
    assert out.loss.shape == ()
    _record(f"{head}.loss[{labels}]", assert_close(out.loss, ref.loss, LOGITS, f"{head} loss"))
    if labels == "rtd":  # without an attention mask every position counts
        no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
        out, ref = _loss_pair(pt, model, no_mask, **kw)
        assert_close(out.loss, ref.loss, LOGITS, "pretraining loss without mask")


def test_regression_loss(tmp_path):
    pt = _pt_model("ForSequenceClassification", num_labels=1)
    pt.save_pretrained(tmp_path)
    model = ztf.TFElectraForSequenceClassification.from_pretrained(tmp_path)
    inputs = _inputs("x", seed=3)
    out, ref = _loss_pair(pt, model, inputs, labels=np.array([0.5, -1.25], np.float32))
    _record("ForSequenceClassification.loss[regression]", assert_close(out.loss, ref.loss, LOGITS, "mse"))


# --- decoder mode ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder")
    pt = _pt_model("ForCausalLM", seed=11, is_decoder=True, add_cross_attention=True)
    pt.save_pretrained(path)
    return pt, ztf.TFElectraForCausalLM.from_pretrained(path)


def test_decoder_with_cross_attention_matches_transformers(decoder):
    pt, model = decoder
    inputs = _inputs("x", seed=4)
    rng = np.random.default_rng(1)
    enc = rng.normal(size=(2, 5, 32)).astype(np.float32)
    enc_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    kw = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    with torch.no_grad():
        ref = pt(
            **{k: _pt(v) for k, v in {**inputs, **kw}.items()},
            use_cache=True,
            output_attentions=True,
            output_hidden_states=True,
        )
    out = model(**inputs, **kw, use_cache=True, output_attentions=True, output_hidden_states=True)
    for key in ("logits", "hidden_states", "attentions", "cross_attentions"):
        a, b = out[key], ref[key]
        for x, y in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
            _record(f"decoder.{key}", assert_close(x, y, LOGITS if key == "logits" else HIDDEN, key))
    legacy = ref.past_key_values.to_legacy_cache()
    assert len(out.past_key_values) == len(legacy) == 2
    for mine, theirs in zip(out.past_key_values, legacy):
        assert len(mine) == len(theirs) == 4
        for x, y in zip(mine, theirs):
            _record("decoder.past_key_values", assert_close(x, y, HIDDEN, "cache"))


def test_decoder_cached_equals_full(decoder):
    pt, model = decoder
    ids = tiny_inputs(batch=2, seq_len=7, seed=6, pad=None)["input_ids"] % 97 + 2
    enc = np.random.default_rng(2).normal(size=(2, 4, 32)).astype(np.float32)
    full = model(ids, encoder_hidden_states=enc, use_cache=True)
    first = model(ids[:, :4], encoder_hidden_states=enc, use_cache=True)
    logits = [first.logits]
    past = first.past_key_values
    for t in range(4, 7):  # one token at a time, cross keys/values reused from the cache
        step = model(ids[:, t : t + 1], encoder_hidden_states=enc, past_key_values=past, use_cache=True)
        past = step.past_key_values
        logits.append(step.logits)
    cached = tf.concat(logits, axis=1)
    # An explicit mask covers cached + new positions; a wrong length is refused.
    masked = model(
        ids[:, 4:5],
        encoder_hidden_states=enc,
        past_key_values=first.past_key_values,
        attention_mask=np.ones((2, 5), np.int64),
    )
    assert_close(masked.logits, logits[1], 0.0, "explicit mask with cache")
    with pytest.raises(InputError, match="cached positions"):
        model(
            ids[:, 4:5],
            encoder_hidden_states=enc,
            past_key_values=first.past_key_values,
            attention_mask=np.ones((2, 1), np.int64),
        )
    _record("decoder.cached_vs_full", assert_close(cached, full.logits, LOGITS, "cached vs full"))
    assert past[0][0].shape == (2, 4, 7, 8)
    # transformers PyTorch, one step with its cache built from ours.
    from transformers.cache_utils import EncoderDecoderCache

    prefix = [tuple(torch.from_numpy(t.numpy()) for t in layer) for layer in first.past_key_values]
    with torch.no_grad():
        ref = pt(
            input_ids=_pt(ids[:, 4:5]),
            encoder_hidden_states=_pt(enc),
            past_key_values=EncoderDecoderCache.from_legacy_cache(prefix),
            use_cache=True,
        )
    assert_close(logits[1], ref.logits, LOGITS, "cached step vs transformers")


# --- input conventions -----------------------------------------------------------------------------


def test_four_input_conventions_agree(tf_models):
    model = tf_models["ForSequenceClassification"]
    x = _inputs("x", seed=7)
    ids, mask, types = x["input_ids"], x["attention_mask"], x["token_type_ids"]
    kw = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    packed_list = model([ids, mask, types]).logits
    packed_dict = model({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}).logits
    for other in (packed_list, packed_dict, model(tf.constant(ids), attention_mask=mask, token_type_ids=types).logits):
        assert_close(other, kw, 0.0, "convention")
    single = model(tf.constant(ids)).logits
    assert_close(single, model(input_ids=ids).logits, 0.0, "single tensor")
    with pytest.raises(TypeError):
        model({"input_ids": ids}, input_ids=ids)


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForMultipleChoice", "Model"])
def test_save_pretrained_loads_in_transformers(head, tf_models, tmp_path):
    model = tf_models[head]
    model.save_pretrained(tmp_path)
    pt = getattr(transformers, f"Electra{head}").from_pretrained(tmp_path).eval()
    inputs = _inputs(head, seed=8)
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in inputs.items()})
    _compare(head, model(**inputs), ref, "round trip")
    again = type(model).from_pretrained(tmp_path)
    for k, v in model.variables_by_key().items():
        np.testing.assert_array_equal(again.variables_by_key()[k].numpy(), v.numpy())


@pytest.mark.parametrize("fmt", [dict(safe_serialization=False), dict(max_shard_size="20KB")])
def test_loads_bin_and_sharded_checkpoints(fmt, checkpoints, tf_models, tmp_path):
    _, pt = checkpoints["ForQuestionAnswering"]
    pt.save_pretrained(tmp_path, **fmt)
    model = ztf.TFElectraForQuestionAnswering.from_pretrained(tmp_path, strict=True)
    reference = tf_models["ForQuestionAnswering"].variables_by_key()
    for k, v in model.variables_by_key().items():
        np.testing.assert_array_equal(v.numpy(), reference[k].numpy())


def test_base_and_head_prefix_loading(checkpoints, tf_models):
    base_dir, _ = checkpoints["Model"]
    head, info = ztf.TFElectraForTokenClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert info["unexpected_keys"] == []
    base_vars = tf_models["Model"].variables_by_key()
    for k, v in head.variables_by_key().items():
        if k.startswith("electra/"):
            np.testing.assert_array_equal(v.numpy(), base_vars[k[len("electra/") :]].numpy())
    head_dir, _ = checkpoints["ForMaskedLM"]
    base, info = ztf.TFElectraModel.from_pretrained(head_dir, output_loading_info=True)
    assert info["missing_keys"] == []
    assert sorted(info["unexpected_keys"]) == sorted(
        [
            "generator_lm_head.bias",
            "generator_predictions.LayerNorm.bias",
            "generator_predictions.LayerNorm.weight",
            "generator_predictions.dense.bias",
            "generator_predictions.dense.weight",
        ]
    )
    mlm_vars = tf_models["ForMaskedLM"].variables_by_key()
    for k, v in base.variables_by_key().items():
        np.testing.assert_array_equal(v.numpy(), mlm_vars["electra/" + k].numpy())
    with pytest.raises(CheckpointError):
        ztf.TFElectraForTokenClassification.from_pretrained(base_dir, strict=True)


def test_shape_mismatch_names_the_tensor(checkpoints):
    path, _ = checkpoints["ForSequenceClassification"]
    with pytest.raises(CheckpointError, match=r"classifier\.out_proj\.weight.*\(2, 32\).*\(5, 32\)"):
        ztf.TFElectraForSequenceClassification.from_pretrained(path, num_labels=5)


# --- training ------------------------------------------------------------------------------------


def _dataset(n=32, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 99, size=(n, 6))
    labels = (ids[:, 0] > 50).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels})
    return ds.batch(batch)


def test_compile_fit_evaluate_predict():
    keras.utils.set_random_seed(0)
    model = ztf.TFElectraForSequenceClassification(ElectraConfig(**TINY), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")])
    ds = _dataset()
    before = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    hist = model.fit(ds, epochs=6, shuffle=False, verbose=0).history["loss"]
    scores = model.evaluate(ds, verbose=0, return_dict=True)
    after = scores["loss"]
    assert 0.0 <= scores["acc"] <= 1.0
    assert hist[-1] < hist[0] and after < before * 0.8, (before, hist, after)
    pred = model.predict(ds.map(lambda d: {k: v for k, v in d.items() if k != "labels"}), verbose=0)
    assert pred["logits"].shape == (32, 2) and "loss" not in pred
    # (x, y) pairs work too: y goes to the head's label argument.
    xy = ds.map(lambda d: ({"input_ids": d["input_ids"]}, d["labels"]))
    assert np.isfinite(model.evaluate(xy, verbose=0, return_dict=True)["loss"])


def test_gradient_checkpointing_gives_equal_gradients(checkpoints, monkeypatch):
    import nezha_zoo.tf.layers as tf_layers

    calls = []
    original = tf_layers._checkpointed
    monkeypatch.setattr(tf_layers, "_checkpointed", lambda *a: calls.append(1) or original(*a))
    path, _ = checkpoints["ForMaskedLM"]
    plain = ztf.TFElectraForMaskedLM.from_pretrained(path)
    ckpt = ztf.TFElectraForMaskedLM.from_pretrained(path, gradient_checkpointing=True)
    inputs = _inputs("x", seed=9)
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)

    def grads(m):
        with tf.GradientTape() as tape:
            loss = m(**inputs, labels=labels, training=True).loss
        return loss, tape.gradient(loss, m.trainable_weights)

    (l1, g1), n_plain, (l2, g2) = grads(plain), len(calls), grads(ckpt)
    assert n_plain == 0 and len(calls) == 2  # one recompute_grad block per layer, only when asked
    assert_close(l1, l2, 1e-6, "loss")
    top = max(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) for g in g1)
    for v, a, b in zip(plain.trainable_weights, g1, g2):
        assert a is not None and b is not None, v.path
        assert_close(tf.convert_to_tensor(a), tf.convert_to_tensor(b), TOLERANCES["grad_rel"] * top, v.path)
    # the methods every backend shares switch the same mechanism as the constructor argument
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    plain.gradient_checkpointing_enable()
    assert plain.is_gradient_checkpointing
    l3, _ = grads(plain)
    assert len(calls) == 4
    assert_close(l1, l3, 1e-6, "loss after gradient_checkpointing_enable()")
    plain.gradient_checkpointing_disable()
    assert not plain.is_gradient_checkpointing
    grads(plain)
    assert len(calls) == 4


def test_training_flag_controls_dropout():
    model = ztf.TFElectraForTokenClassification(ElectraConfig(**{**TINY, "hidden_dropout_prob": 0.3}), seed=0)
    ids = _inputs("x")["input_ids"]
    a, b = model(ids).logits, model(ids, training=False).logits
    assert_close(a, b, 0.0, "eval is deterministic")
    c = model(ids, training=True).logits
    assert float(tf.reduce_max(tf.abs(c - a))) > 1e-3


def test_backend_imports_only_its_framework():
    import subprocess
    import sys

    # jax is left out: TensorFlow 2.21 itself imports it (`python -c "import tensorflow"` does too).
    probe = (
        "import sys, nezha_zoo.tf, keras\n"
        "bad = sorted(m for m in ('torch', 'flax', 'transformers', 'tf_keras') if m in sys.modules)\n"
        "print(keras.backend.backend(), bad)"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert res.stdout.strip().splitlines()[-1] == "tensorflow []"


def test_gradient_checkpointing_with_dropout_reuses_masks():
    cfg = ElectraConfig(**{**TINY, "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2})
    inputs = _inputs("x", seed=10)
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    results = []
    for flag in (False, True):
        keras.utils.set_random_seed(1)  # same dropout seed states in both models
        model = ztf.TFElectraForMaskedLM(cfg, seed=0, gradient_checkpointing=flag)
        with tf.GradientTape() as tape:
            loss = model(**inputs, labels=labels, training=True).loss
        results.append((loss, tape.gradient(loss, model.trainable_weights)))
    (l1, g1), (l2, g2) = results
    assert_close(l1, l2, 1e-6, "loss")
    top = max(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) for g in g1)
    for a, b in zip(g1, g2):
        assert_close(tf.convert_to_tensor(a), tf.convert_to_tensor(b), TOLERANCES["grad_rel"] * top, "grad")


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(tf_models):
    model = tf_models["ForSequenceClassification"]
    ids = np.ones((2, 7), np.int64)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.full((2, 7), 99))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.full((2, 7), -1))
    with pytest.raises(InputError, match="max_position_embeddings"):
        model(np.ones((1, 65), np.int64))
    with pytest.raises(InputError, match="attention_mask"):
        model(ids, attention_mask=np.ones((2, 6), np.int64))
    with pytest.raises(InputError, match="token_type_ids"):
        model(ids, token_type_ids=np.zeros((2, 8), np.int64))
    with pytest.raises(InputError, match="not both"):
        model(input_ids=ids, inputs_embeds=np.zeros((2, 7, 16), np.float32))
    with pytest.raises(InputError, match="give input_ids or inputs_embeds"):
        model(attention_mask=ids)
    with pytest.raises(InputError, match="rank 3"):
        tf_models["ForMultipleChoice"](ids)


# --- example ---------------------------------------------------------------------------------------


def test_fit_example_loss_falls():
    path = Path(__file__).resolve().parents[2] / "examples" / "tf_fit_electra.py"
    spec = importlib.util.spec_from_file_location("tf_fit_electra_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    history = mod.main(steps=40)
    assert history[-1] < 0.6 * history[0], history
