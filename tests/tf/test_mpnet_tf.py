"""Keras 3 MPNet vs transformers 4.57.6 PyTorch: weights, numerics, relative bias, losses, sentence
embeddings, gradients, fit, errors."""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
keras = pytest.importorskip("keras")

import nezha_zoo.tf as ztf  # noqa: E402
from nezha_zoo import MPNetConfig  # noqa: E402
from nezha_zoo.families.mpnet import relative_position_bucket
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.outputs import SentenceEmbeddingOutput  # noqa: E402
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.hf]

HEADS = (
    "Model",
    "ForMaskedLM",
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
    max_position_embeddings=40,
    relative_attention_num_buckets=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
PAD = 1  # transformers' MPNet padding row, whatever pad_token_id says
HIDDEN, LOGITS, GRAD_REL = TOLERANCES["hidden"], TOLERANCES["logits"], TOLERANCES["grad_rel"]
KERAS = LAYOUTS["keras"]
MEASURED: dict[str, float] = {}  # worst differences seen, printed at the end with -s


@pytest.fixture(scope="module", autouse=True)
def _pin():
    pin_precision("tf")
    pin_precision("pt")
    yield
    if MEASURED:
        print("\nmax-abs vs transformers:", {k: f"{v:.1e}" for k, v in sorted(MEASURED.items())})


def _record(name: str, diff: float) -> None:
    MEASURED[name] = max(MEASURED.get(name, 0.0), diff)


def _pt(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


def _pt_model(head: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, f"MPNet{head}")(transformers.MPNetConfig(**{**TINY, **kw}))
    with torch.no_grad():  # move every tensor away from its structured init (biases 0, LN 1, pad rows 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A transformers-PyTorch checkpoint directory and model per head."""
    root = tmp_path_factory.mktemp("hf_mpnet")
    out = {}
    for i, head in enumerate(HEADS):
        pt = _pt_model(head, seed=i)
        path = root / head
        pt.save_pretrained(path)
        out[head] = (path, pt)
    return out


@pytest.fixture(scope="module")
def tf_models(checkpoints):
    return {head: getattr(ztf, f"TFMPNet{head}").from_pretrained(path) for head, (path, _) in checkpoints.items()}


def _inputs(head: str, seed: int = 0, side: str = "right", seq_len: int = 9):
    """ids with padding id 1 where the mask is 0; padded on the right or the left."""
    rng = np.random.default_rng(seed)
    lead = (2, 3) if head == "ForMultipleChoice" else (2,)
    ids = rng.integers(2, 99, size=(*lead, seq_len))
    mask = np.ones_like(ids)
    flat = mask.reshape(-1, seq_len)
    for r in range(flat.shape[0]):
        keep = int(rng.integers(2, seq_len))  # every row keeps >= 2 tokens and has >= 1 pad
        if side == "right":
            flat[r, keep:] = 0
        else:
            flat[r, : seq_len - keep] = 0
    return {"input_ids": np.where(mask == 1, ids, PAD), "attention_mask": mask}


def _compare(head: str, tf_out, pt_out, what: str) -> None:
    pt_keys = [k for k in pt_out.keys() if pt_out[k] is not None]
    assert list(tf_out.keys()) == pt_keys, (list(tf_out.keys()), pt_keys)
    for key in pt_keys:
        a, b = tf_out[key], pt_out[key]
        if isinstance(b, tuple):
            assert len(a) == len(b)
            for i, (x, y) in enumerate(zip(a, b)):
                _record(f"{head}.{key}", assert_close(x, y, HIDDEN, f"{head}.{key}[{i}] ({what})"))
        else:
            tol = HIDDEN if key in ("last_hidden_state", "pooler_output") else LOGITS
            _record(f"{head}.{key}", assert_close(a, b, tol, f"{head}.{key} ({what})"))


# --- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec(head, tf_models):
    model = tf_models[head]
    keys = {v.path.split("/", 1)[1] for v in model.weights}
    assert keys == {KERAS.key(p) for p in model.spec}
    for p in model.spec:  # stored shapes follow the layout (dense kernels transposed)
        assert tuple(model.variables_by_key()[KERAS.key(p)].shape) == KERAS.shape(p)
    assert len(model.trainable_weights) == len(model.spec)
    prefix = "" if head == "Model" else "mpnet/"
    assert (prefix + "pooler/dense/kernel" in keys) == (head in ("Model", "ForMultipleChoice"))
    assert prefix + "encoder/relative_attention_bias/embeddings" in keys
    assert prefix + "encoder/layer/1/attention/attn/o/kernel" in keys
    assert not any("token_type" in k for k in keys)


def test_model_without_pooler_and_untied_lm_head():
    base = ztf.TFMPNetModel(MPNetConfig(**TINY), add_pooling_layer=False, seed=0)
    keys = {v.path.split("/", 1)[1] for v in base.weights}
    assert keys == {KERAS.key(p) for p in base.spec} and not any(k.startswith("pooler") for k in keys)
    assert "pooler_output" not in base(np.array([[0, 5, 6, 2]]))
    mlm = ztf.TFMPNetForMaskedLM(MPNetConfig(**TINY, tie_word_embeddings=False), seed=0)
    keys = {v.path.split("/", 1)[1] for v in mlm.weights}
    assert keys == {KERAS.key(p) for p in mlm.spec} and "lm_head/decoder/kernel" in keys


def test_init_follows_spec():
    cfg = MPNetConfig(**{**TINY, "pad_token_id": 0})  # the padding row stays 1 regardless
    a, b = ztf.TFMPNetForMaskedLM(cfg, seed=3), ztf.TFMPNetForMaskedLM(cfg, seed=3)
    va, vb = a.variables_by_key(), b.variables_by_key()
    for k in va:
        np.testing.assert_array_equal(va[k].numpy(), vb[k].numpy())
    for table in ("word_embeddings", "position_embeddings"):
        w = va[f"mpnet/embeddings/{table}/embeddings"].numpy()
        assert np.all(w[PAD] == 0) and np.all(w[0] != 0) and 0.01 < w[2:].std() < 0.03
    assert np.all(va["lm_head/bias"].numpy() == 0) and np.all(va["lm_head/layer_norm/gamma"].numpy() == 1)


# --- numerics vs transformers PyTorch ---------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_matches_transformers(head, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    for side in ("right", "left"):
        inputs = _inputs(head, seed=1, side=side)
        with torch.no_grad():
            ref = pt(**{k: _pt(v) for k, v in inputs.items()}, output_hidden_states=True, output_attentions=True)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        _compare(head, out, ref, f"{side}-padded")
    # Optional inputs left out: mask ones, padding-aware positions from the ids (pads included).
    ids = _inputs(head, seed=2)["input_ids"]
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids))
    _compare(head, model(ids), ref, "defaults")


@pytest.mark.parametrize("head", ["Model", "ForMultipleChoice", "ForTokenClassification"])
def test_inputs_embeds_position_ids_head_mask(head, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    inputs = _inputs(head, seed=3)
    rng = np.random.default_rng(4)
    shape = inputs["input_ids"].shape
    embeds = rng.normal(size=(*shape, 32)).astype(np.float32)
    positions = rng.integers(0, 40, size=shape)
    head_mask = np.array([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]], np.float32)
    ids, mask = inputs["input_ids"], {"attention_mask": inputs["attention_mask"]}
    cases = {  # inputs_embeds: positions arange(2, L + 2), as transformers PyTorch
        "inputs_embeds": dict(inputs_embeds=embeds, **mask),
        "inputs_embeds+position_ids": dict(inputs_embeds=embeds, position_ids=positions, **mask),
        "position_ids+head_mask": dict(input_ids=ids, position_ids=positions, head_mask=head_mask, **mask),
        "1-d head_mask": dict(input_ids=ids, head_mask=head_mask[0], **mask),
    }
    for what, kw in cases.items():
        with torch.no_grad():
            ref = pt(**{k: _pt(v) for k, v in kw.items()}, output_hidden_states=True)
        _compare(f"{head}[{what}]", model(**kw, output_hidden_states=True), ref, what)


def _numpy_bucket(relative: np.ndarray, num_buckets: int, max_distance: int = 128) -> np.ndarray:
    """T5's bidirectional bucket, written from the formula (float64)."""
    n = -relative
    half = num_buckets // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    with np.errstate(divide="ignore"):
        large = exact + np.floor(np.log(np.maximum(n, 1) / exact) / math.log(max_distance / exact) * (half - exact))
    return ret + np.where(n < exact, n, np.minimum(large.astype(np.int64), half - 1))


def test_bucket_formula_equals_transformers_and_numpy():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    rel = np.arange(-400, 400)
    for buckets in (8, 16, 32, 64):
        ours = relative_position_bucket(rel, buckets)
        theirs = MPNetEncoder.relative_position_bucket(torch.from_numpy(rel), num_buckets=buckets).numpy()
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{buckets} buckets vs transformers")
        np.testing.assert_array_equal(ours, _numpy_bucket(rel, buckets), err_msg=f"{buckets} buckets vs numpy")
    # 32 buckets: 0..7 exact, then logarithmic up to 128, 16..31 for keys after the query.
    assert relative_position_bucket(np.array([0, -7, -8, -16, -127, -128, -1000, 1, 9]), 32).tolist() == [
        0,
        7,
        8,
        10,
        15,
        15,
        15,
        17,
        24,
    ]


@pytest.mark.parametrize("buckets", [16, 64])
def test_other_bucket_counts_follow_the_config(buckets, tmp_path):
    """Deliberate difference: the config's bucket count is used (transformers PyTorch hard-codes 32 in
    ``compute_position_bias``).  The bias equals the numpy formula, and the whole model equals
    transformers once its ``compute_position_bias`` is given the config's count."""
    pt = _pt_model("Model", seed=7, relative_attention_num_buckets=buckets)
    pt.save_pretrained(tmp_path)
    model = ztf.TFMPNetModel.from_pretrained(tmp_path)
    inputs = _inputs("Model", seed=5, seq_len=30)  # distances up to 29 cover the logarithmic buckets
    table = pt.encoder.relative_attention_bias.weight.detach().numpy()  # (buckets, heads)
    rel = np.arange(30)[None, :] - np.arange(30)[:, None]
    expected = table[_numpy_bucket(rel, buckets)].transpose(2, 0, 1)[None]  # (1, heads, L, L)
    bias = model.encoder.compute_position_bias(tf.zeros((2, 30, 32)))
    assert_close(bias, expected, 0.0, f"position bias, {buckets} buckets")
    pt.encoder.compute_position_bias = functools.partial(pt.encoder.compute_position_bias, num_buckets=buckets)
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in inputs.items()}, output_attentions=True)
    _compare(f"Model[{buckets} buckets]", model(**inputs, output_attentions=True), ref, f"{buckets} buckets")


def test_return_dict_false_and_input_conventions(tf_models):
    model = tf_models["ForSequenceClassification"]
    x = _inputs("x", seed=6)
    ids, mask = x["input_ids"], x["attention_mask"]
    full = model(ids, attention_mask=mask, labels=np.array([0, 1]), output_hidden_states=True)
    tup = model(ids, attention_mask=mask, labels=np.array([0, 1]), output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 3
    assert_close(tup[0], full.loss, 0, "loss")
    # Without output_hidden_states the last layer runs at the pooled row only: the same sums, another order.
    plain = model(ids, attention_mask=mask)
    assert_close(plain.logits, full.logits, LOGITS, "pooled row vs every row")
    for other in (model([ids, mask]), model({"input_ids": ids, "attention_mask": mask}), model(tf.constant(ids), mask)):
        assert_close(other.logits, plain.logits, 0.0, "convention")


# --- losses ---------------------------------------------------------------------------------------


def _loss_pair(pt, model, inputs, **labels):
    pt.config.problem_type = None  # transformers stores the inferred type on the config
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in {**inputs, **labels}.items()})
    return model(**inputs, **labels), ref


@pytest.mark.parametrize(
    "head,labels",
    [
        ("ForMaskedLM", "mlm"),
        ("ForTokenClassification", "tok"),
        ("ForMultipleChoice", "mc"),
        ("ForQuestionAnswering", "qa"),
        ("ForSequenceClassification", "single"),
        ("ForSequenceClassification", "multi"),
    ],
)
def test_losses_match_transformers(head, labels, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    inputs = _inputs(head, seed=8)
    rng = np.random.default_rng(5)
    if labels == "mlm":
        lab = rng.integers(0, 99, size=(2, 9))
        lab[:, ::3] = -100
        kw = {"labels": lab}
    elif labels == "tok":
        lab = rng.integers(0, 2, size=(2, 9))
        lab[0, :2] = -100
        kw = {"labels": lab}
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


def test_regression_loss(tmp_path):
    pt = _pt_model("ForSequenceClassification", num_labels=1)
    pt.save_pretrained(tmp_path)
    model = ztf.TFMPNetForSequenceClassification.from_pretrained(tmp_path)
    out, ref = _loss_pair(pt, model, _inputs("x", seed=9), labels=np.array([0.5, -1.25], np.float32))
    _record("ForSequenceClassification.loss[regression]", assert_close(out.loss, ref.loss, LOGITS, "mse"))


# --- gradients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForSequenceClassification", "ForMaskedLM", "ForMultipleChoice"])
def test_gradients_match_transformers_for_every_variable(head, checkpoints, tf_models):
    """One training step's loss and gradients equal transformers' for every variable, padding rows
    (word and position tables) included, and no variable lacks a gradient (no unused pooler)."""
    _, pt = checkpoints[head]
    model = tf_models[head]
    inputs = _inputs(head, seed=10)
    if head == "ForSequenceClassification":  # no mask: the pads are attended, so their lookups matter
        inputs.pop("attention_mask")
    if head == "ForMaskedLM":
        labels = np.where(inputs["input_ids"] != PAD, (inputs["input_ids"] * 7) % 99, -100)
    elif head == "ForMultipleChoice":
        labels = np.array([1, 2])
    else:
        labels = np.array([1, 0])
    pt.config.problem_type = None
    pt.zero_grad()
    ref_loss = pt(**{k: _pt(v) for k, v in inputs.items()}, labels=_pt(labels)).loss
    ref_loss.backward()
    pt_grads = dict(pt.named_parameters())
    with tf.GradientTape() as tape:
        loss = model(**inputs, labels=labels, training=True).loss
    grads = tape.gradient(loss, model.trainable_weights)
    assert_close(loss, ref_loss.detach(), LOGITS, "loss")
    by_var = {id(v): g for v, g in zip(model.trainable_weights, grads)}
    missing = [v.path for v, g in zip(model.trainable_weights, grads) if g is None]
    assert not missing, missing
    top = max(float(p.grad.abs().max()) for p in pt_grads.values() if p.grad is not None)
    for p in model.spec:
        var = model.variables_by_key()[KERAS.key(p)]
        mine = KERAS.from_stored(p, tf.convert_to_tensor(by_var[id(var)]).numpy())
        theirs = pt_grads[p.name].grad
        theirs = np.zeros(p.shape, np.float32) if theirs is None else theirs.numpy()
        _record(f"{head}.grad", assert_close(mine, theirs, GRAD_REL * top, f"grad {p.name}"))
    tables = ["position_embeddings"] + ([] if head == "ForMaskedLM" else ["word_embeddings"])  # MLM: tied output
    for table in tables:  # pads were looked up (ids and positions 1), yet their rows get no gradient
        var = model.variables_by_key()[f"mpnet/embeddings/{table}/embeddings"]
        assert np.all(tf.convert_to_tensor(by_var[id(var)]).numpy()[PAD] == 0), table


def test_gradient_checkpointing_keeps_relative_bias_gradients(checkpoints):
    path, _ = checkpoints["ForTokenClassification"]
    plain = ztf.TFMPNetForTokenClassification.from_pretrained(path)
    ckpt = ztf.TFMPNetForTokenClassification.from_pretrained(path, gradient_checkpointing=True)
    inputs = _inputs("x", seed=11)
    labels = np.where(inputs["attention_mask"] == 1, 1, -100)

    def grads(m):
        with tf.GradientTape() as tape:
            loss = m(**inputs, labels=labels, training=True).loss
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, m.trainable_weights)]

    g1, g2 = grads(plain), grads(ckpt)
    top = max(float(tf.reduce_max(tf.abs(g))) for g in g1)
    for v, a, b in zip(plain.trainable_weights, g1, g2):
        assert_close(a, b, GRAD_REL * top, v.path)
    bias_grad = [g for v, g in zip(ckpt.trainable_weights, g2) if "relative_attention_bias" in v.path]
    assert len(bias_grad) == 1 and float(tf.reduce_max(tf.abs(bias_grad[0]))) > 0


def _dataset(n=32, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 99, size=(n, 6))
    labels = (ids[:, 0] > 50).astype(np.int64)
    return tf.data.Dataset.from_tensor_slices(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    ).batch(batch)


def test_fit_lowers_loss_and_trains_every_variable():
    keras.utils.set_random_seed(0)
    model = ztf.TFMPNetForSequenceClassification(MPNetConfig(**TINY), seed=0)
    before = {v.path: v.numpy().copy() for v in model.trainable_weights}
    model.compile(optimizer=keras.optimizers.Adam(3e-3))  # no loss: the model's internal one
    hist = model.fit(_dataset(), epochs=6, shuffle=False, verbose=0).history["loss"]
    assert hist[-1] < 0.8 * hist[0], hist
    unchanged = [v.path for v in model.trainable_weights if np.array_equal(v.numpy(), before[v.path])]
    assert not unchanged, unchanged  # every variable was trained (no pooler left without gradients)


def test_training_flag_controls_dropout():
    model = ztf.TFMPNetForTokenClassification(MPNetConfig(**{**TINY, "hidden_dropout_prob": 0.3}), seed=0)
    ids = _inputs("x")["input_ids"]
    assert_close(model(ids).logits, model(ids, training=False).logits, 0.0, "eval is deterministic")
    assert float(tf.reduce_max(tf.abs(model(ids, training=True).logits - model(ids).logits))) > 1e-3


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForMultipleChoice", "Model"])
def test_save_pretrained_loads_in_transformers(head, tf_models, tmp_path):
    model = tf_models[head]
    model.save_pretrained(tmp_path)
    pt = getattr(transformers, f"MPNet{head}").from_pretrained(tmp_path).eval()
    inputs = _inputs(head, seed=12)
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in inputs.items()})
    _compare(head, model(**inputs), ref, "round trip")
    again = type(model).from_pretrained(tmp_path, strict=True)
    for k, v in model.variables_by_key().items():
        np.testing.assert_array_equal(again.variables_by_key()[k].numpy(), v.numpy())


def test_base_and_head_prefix_loading(checkpoints, tf_models):
    base_dir, _ = checkpoints["Model"]
    head, info = ztf.TFMPNetForTokenClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    base_vars = tf_models["Model"].variables_by_key()
    for k, v in head.variables_by_key().items():
        if k.startswith("mpnet/"):
            np.testing.assert_array_equal(v.numpy(), base_vars[k[len("mpnet/") :]].numpy())
    mc, info = ztf.TFMPNetForMultipleChoice.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"] and not info["unexpected_keys"]
    head_dir, _ = checkpoints["ForMaskedLM"]
    base, info = ztf.TFMPNetModel.from_pretrained(head_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert sorted(info["unexpected_keys"]) == sorted(
        [
            "lm_head.bias",
            "lm_head.dense.bias",
            "lm_head.dense.weight",
            "lm_head.layer_norm.bias",
            "lm_head.layer_norm.weight",
        ]
    )
    mlm_vars = tf_models["ForMaskedLM"].variables_by_key()
    for k, v in base.variables_by_key().items():
        if not k.startswith("pooler/"):
            np.testing.assert_array_equal(v.numpy(), mlm_vars["mpnet/" + k].numpy())
    with pytest.raises(CheckpointError):
        ztf.TFMPNetForTokenClassification.from_pretrained(base_dir, strict=True)


def test_shape_mismatch_names_the_tensor(checkpoints):
    path, _ = checkpoints["ForSequenceClassification"]
    with pytest.raises(CheckpointError, match=r"classifier\.out_proj\.weight.*\(2, 32\).*\(5, 32\)"):
        ztf.TFMPNetForSequenceClassification.from_pretrained(path, num_labels=5)


# --- sentence embeddings ------------------------------------------------------------------------------


def _numpy_mean_pool(hidden: np.ndarray, mask: np.ndarray, normalize: bool = True) -> np.ndarray:
    """sentence-transformers: masked mean (count clamped at 1e-9), then F.normalize (eps 1e-12)."""
    m = mask[:, :, None].astype(np.float64)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


@pytest.mark.parametrize("head", ["Model", "ForSequenceClassification"])
def test_encode_equals_numpy_mean_pool_of_transformers(head, checkpoints, tf_models):
    _, pt = checkpoints[head]
    model = tf_models[head]
    for side in ("right", "left"):
        inputs = _inputs("x", seed=13, side=side)
        with torch.no_grad():
            base = pt if head == "Model" else pt.mpnet
            hidden = base(**{k: _pt(v) for k, v in inputs.items()}).last_hidden_state.numpy()
        out = model.encode(inputs["input_ids"], inputs["attention_mask"])
        assert isinstance(out, SentenceEmbeddingOutput) and out.embeddings.shape == (2, 32)
        _record(
            f"{head}.encode",
            assert_close(
                out.embeddings, _numpy_mean_pool(hidden, inputs["attention_mask"]), HIDDEN, f"encode ({side})"
            ),
        )
        assert_close(out.last_hidden_state, hidden, HIDDEN, "encode last_hidden_state")
        np.testing.assert_allclose(np.linalg.norm(out.embeddings.numpy(), axis=-1), 1.0, atol=1e-6)
        raw = model.encode(inputs["input_ids"], inputs["attention_mask"], normalize=False).embeddings
        assert_close(raw, _numpy_mean_pool(hidden, inputs["attention_mask"], normalize=False), HIDDEN, "unnormalised")
    ids = inputs["input_ids"]  # no mask: every token (pads too) is averaged, as the model attends to all
    with torch.no_grad():
        hidden = (pt if head == "Model" else pt.mpnet)(input_ids=_pt(ids)).last_hidden_state.numpy()
    assert_close(model.encode(ids).embeddings, _numpy_mean_pool(hidden, np.ones_like(ids)), HIDDEN, "no mask")


def test_mean_pool_function():
    rng = np.random.default_rng(14)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    from nezha_zoo.tf.heads import mean_pool

    assert ztf.mean_pool is mean_pool
    assert_close(ztf.mean_pool(hidden, mask), _numpy_mean_pool(hidden, mask), 1e-6, "normalised")
    assert_close(ztf.mean_pool(hidden, mask, normalize=False), _numpy_mean_pool(hidden, mask, False), 1e-6, "raw")
    assert_close(ztf.mean_pool(hidden), _numpy_mean_pool(hidden, np.ones((3, 5))), 1e-6, "no mask")
    zeros = ztf.mean_pool(np.zeros((2, 3, 4), np.float32), np.array([[1, 1, 0], [0, 0, 0]]))
    assert_close(zeros, np.zeros((2, 4)), 0.0, "zero vectors and empty masks stay finite zeros")


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(tf_models):
    model = tf_models["ForSequenceClassification"]
    ids = np.full((2, 7), 5)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.full((2, 7), 99))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.full((2, 7), -1))
    model(np.full((1, 38), 5))  # 38 tokens take positions 2..39: the longest that fits
    for too_long in (dict(input_ids=np.full((1, 39), 5)), dict(inputs_embeds=np.zeros((1, 39, 32), np.float32))):
        with pytest.raises(InputError, match="usable positions.*38"):
            model(**too_long)
    with pytest.raises(InputError, match="usable positions"):
        tf_models["ForMultipleChoice"](np.full((1, 2, 39), 5))
    with pytest.raises(InputError, match="attention_mask"):
        model(ids, attention_mask=np.ones((2, 6), np.int64))
    with pytest.raises(InputError, match="not both"):
        model(input_ids=ids, inputs_embeds=np.zeros((2, 7, 32), np.float32))
    with pytest.raises(InputError, match="inputs_embeds last dimension"):
        model(inputs_embeds=np.zeros((2, 7, 16), np.float32))
    with pytest.raises(InputError, match="give input_ids or inputs_embeds"):
        model(attention_mask=ids)
    with pytest.raises(InputError, match="positions"):
        model(ids, position_ids=np.full((2, 7), 40))
    with pytest.raises(InputError, match="rank 3"):
        tf_models["ForMultipleChoice"](ids)
    with pytest.raises(InputError, match="outside the vocabulary"):
        tf_models["Model"].encode(np.full((1, 4), 120))


def test_shared_padding_aware_positions_equal_transformers():
    """The shared helpers (also for XLM-R-XL and I-BERT) against transformers' RoBERTa functions."""
    from transformers.models.roberta.modeling_roberta import create_position_ids_from_input_ids

    from nezha_zoo.tf.layers import padding_aware_position_ids, sequential_position_ids

    ids = _inputs("x", seed=15, side="left")["input_ids"]
    for past in (0, 3):
        ref = create_position_ids_from_input_ids(_pt(ids), PAD, past_key_values_length=past).numpy()
        np.testing.assert_array_equal(padding_aware_position_ids(tf.constant(ids), PAD, past).numpy(), ref)
    np.testing.assert_array_equal(sequential_position_ids(4, PAD).numpy(), [[2, 3, 4, 5]])
