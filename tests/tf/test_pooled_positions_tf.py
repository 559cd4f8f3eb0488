"""Keras 3: the last layer at the pooled positions only (``positions_to_keep``, issue #23).

A sequence-level head (sequence classification, and the multiple-choice / next-sentence heads that read
position 0) runs its last layer at the positions it reads; the full computation of the same model
(``output_hidden_states=True``, which keeps every position) gives the same logits, loss and gradients,
in eval and in training with dropout on (the masks are drawn at the full shape).  Against transformers
the families' own loss tests cover the pruned path (padded inputs, no flags).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import nezha_zoo as nz  # noqa: E402
import nezha_zoo.tf as ztf  # noqa: E402
from nezha_zoo.spec.pooling import FIRST, LAST_NON_PAD  # noqa: E402
from nezha_zoo.spec.registry import get_family  # noqa: E402
from nezha_zoo.testing import TINY_BERT, TOLERANCES, assert_close, pin_precision, tiny_inputs  # noqa: E402
from nezha_zoo.tf.layers import keep_positions, sublayers  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf]

LOGITS, GRAD_REL = TOLERANCES["logits"], TOLERANCES["grad_rel"]
BERT = dict(TINY_BERT, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
MPT = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=99, max_seq_len=24, pad_token_id=0)
#: family -> (config, token types, left padding)
FAMILIES = {
    "Electra": (lambda: nz.ElectraConfig(**BERT, embedding_size=16, max_position_embeddings=64), True, False),
    "Nezha": (lambda: nz.NezhaConfig(**BERT, max_position_embeddings=16, max_relative_position=3), True, False),
    "MPNet": (
        lambda: nz.MPNetConfig(**BERT, max_position_embeddings=40, relative_attention_num_buckets=32),
        False,
        False,
    ),
    "XLMRobertaXL": (lambda: nz.XLMRobertaXLConfig(**BERT, max_position_embeddings=40, type_vocab_size=2), True, False),
    "Mpt": (lambda: nz.MptConfig(**MPT, attn_config={"attn_pdrop": 0.1}), False, True),
}
#: MPT's attention options the split ``Wqkv`` must honour: biases, ``clip_qkv`` (it clips at this init),
#: ``qk_ln`` and multi-query attention (key/value columns narrower than the query's).
MPT_OPTIONS = dict(
    MPT,
    no_bias=False,
    attn_config={"attn_pdrop": 0.1, "clip_qkv": 0.1, "qk_ln": True, "attn_type": "multiquery_attention"},
)
FAMILY_KEYS = {"Electra": "electra", "Nezha": "nezha", "MPNet": "mpnet", "XLMRobertaXL": "xlm-roberta-xl", "Mpt": "mpt"}


@pytest.fixture(scope="module", autouse=True)
def _pin():
    pin_precision("tf")


@pytest.fixture(scope="module")
def models():
    """One sequence classifier per family (built once, on first use)."""
    cache: dict[str, keras.Model] = {}

    def get(family: str) -> keras.Model:
        if family not in cache:
            cache[family] = getattr(ztf, f"TF{family}ForSequenceClassification")(FAMILIES[family][0](), seed=0)
        return cache[family]

    return get


def _inputs(family: str, batch: int = 3, seq_len: int = 7) -> dict[str, tf.Tensor]:
    _, types, left = FAMILIES[family]
    pad = 1 if family == "MPNet" else 0
    raw = tiny_inputs(batch=batch, seq_len=seq_len, type_vocab_size=2 if types else None, pad=pad)
    if left:  # a causal model's padding comes first
        raw["attention_mask"] = raw["attention_mask"][:, ::-1].copy()
        raw["input_ids"] = np.where(raw["attention_mask"] == 1, raw["input_ids"][:, ::-1], pad)
    return {k: tf.constant(v) for k, v in raw.items()}


def _rewind(model: keras.Model) -> None:
    """Every dropout seed generator back to one state: the next call draws the same masks."""
    for layer in sublayers(model):
        gen = getattr(layer, "seed_generator", None)
        if gen is not None:
            gen.state.assign(tf.zeros_like(gen.state))


def _run(model, inputs, full: bool, training: bool):
    _rewind(model)
    with tf.GradientTape() as tape:
        out = model(
            **inputs,
            labels=tf.constant([0, 1, 1][: inputs["input_ids"].shape[0]]),
            output_hidden_states=full,
            training=training,
        )
    grads = tape.gradient(out.loss, model.trainable_variables)
    return out, grads


def _assert_same_step(model, a, b, what: str, per_variable: bool = True) -> None:
    """Two ``(logits, loss, gradients)`` of ``model``: equal logits and loss, and each gradient within
    ``grad_rel`` of the second one's largest element (``per_variable=False``: of the largest element of
    all the second gradients, for variables whose gradient is zero but for rounding, as multi-query
    attention's ``k_ln`` bias: a shift of every key leaves the scores' softmax unchanged)."""
    assert_close(a[0], b[0], LOGITS, f"{what} logits")
    assert_close(a[1], b[1], LOGITS, f"{what} loss")
    every = max(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) for g in b[2] if g is not None)
    for v, ga, gb in zip(model.trainable_variables, a[2], b[2], strict=True):
        assert (ga is None) == (gb is None), v.path
        if ga is not None:
            ga, gb = tf.convert_to_tensor(ga), tf.convert_to_tensor(gb)
            scale = max(float(tf.reduce_max(tf.abs(gb))), 1e-6) if per_variable else every
            assert float(tf.reduce_max(tf.abs(ga - gb))) <= GRAD_REL * scale, f"{what} grad {v.path}"


def _last_ffn_in(model) -> keras.layers.Layer:
    """The dense layer that reads the last layer's feed-forward input."""
    base = getattr(model, model.base_model_prefix)
    if isinstance(model, ztf.TFMptForSequenceClassification):
        return base.blocks.items[-1].ffn.up_proj
    return base.encoder.layer.items[-1].intermediate.dense


class _RowCounter:
    """Counts the rows the wrapped dense layer sees per call (its input's leading dims)."""

    def __init__(self, layer, monkeypatch):
        self.rows: list[int] = []
        call = layer.call

        def counting(inputs, *args, **kwargs):
            self.rows.append(int(np.prod(inputs.shape[:-1])))
            return call(inputs, *args, **kwargs)

        monkeypatch.setattr(layer, "call", counting)


def test_heads_take_the_rule_from_the_family():
    assert {k: get_family(v).pooling for k, v in FAMILY_KEYS.items()} == {
        "Electra": FIRST,
        "Nezha": FIRST,
        "MPNet": FIRST,
        "XLMRobertaXL": FIRST,
        "Mpt": LAST_NON_PAD,
    }


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_equals_full(family, training, models):
    model = models(family)
    inputs = _inputs(family)
    for what, given in (("padded", inputs), ("defaults", {"input_ids": inputs["input_ids"]})):
        pruned, g_pruned = _run(model, given, full=False, training=training)
        full, g_full = _run(model, given, full=True, training=training)
        assert pruned.hidden_states is None and full.hidden_states is not None
        _assert_same_step(
            model,
            (pruned.logits, pruned.loss, g_pruned),
            (full.logits, full.loss, g_full),
            f"{family} ({what}, training={training})",
        )
    if training:  # dropout is on: another draw gives other logits, so the equal ones above are the same masks
        other = model(**inputs, training=True).logits
        assert float(tf.reduce_max(tf.abs(other - pruned.logits))) > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_last_layer_computes_only_the_pooled_rows(family, models, monkeypatch):
    model = models(family)
    inputs = _inputs(family)
    batch, length = inputs["input_ids"].shape
    counter = _RowCounter(_last_ffn_in(model), monkeypatch)
    model(**inputs)
    model(**inputs, output_hidden_states=True)
    model(**inputs, output_attentions=True)
    assert counter.rows == [batch, batch * length, batch * length]


@pytest.mark.parametrize(
    "family, head, choices",
    [
        ("Nezha", "ForMultipleChoice", 3),
        ("Nezha", "ForNextSentencePrediction", None),
        ("Electra", "ForMultipleChoice", 3),  # summary_type "first" (the config's default)
    ],
)
def test_multiple_choice_and_next_sentence_heads_prune(family, head, choices, monkeypatch):
    config = FAMILIES[family][0]()
    assert getattr(config, "summary_type", "first") == "first"
    inputs = tiny_inputs(batch=2, seq_len=5, num_choices=choices)
    model = getattr(ztf, f"TF{family}{head}")(config, seed=0)
    counter = _RowCounter(_last_ffn_in(model), monkeypatch)
    pruned = model(**inputs).logits
    full = model(**inputs, output_hidden_states=True).logits
    rows = int(np.prod(inputs["input_ids"].shape[:-1]))
    assert counter.rows == [rows, rows * 5]
    assert_close(pruned, full, LOGITS, f"{family}{head}")


def test_electra_multiple_choice_with_another_summary_keeps_every_position(monkeypatch):
    config = FAMILIES["Electra"][0]()
    config.summary_type = "mean"
    model = ztf.TFElectraForMultipleChoice(config, seed=0)
    counter = _RowCounter(_last_ffn_in(model), monkeypatch)
    model(**tiny_inputs(batch=2, seq_len=5, num_choices=3))
    assert counter.rows == [2 * 3 * 5]


@pytest.mark.parametrize("family", ["Electra", "Mpt"])
def test_compiled_pruned_equals_eager_full(family, models):
    model = models(family)
    inputs = _inputs(family)
    full = model(**inputs, output_hidden_states=True).logits
    for jit in (False, True):
        step = tf.function(lambda x: model(**x).logits, jit_compile=jit)
        assert_close(step(inputs), full, LOGITS, f"{family} jit_compile={jit}")


@pytest.mark.parametrize("family", ["Electra", "Mpt"])
def test_fit_and_train_on_batch_run_the_pruned_head(family):
    """Keras ``train_on_batch`` and ``fit`` (XLA) train the pruned head (MPT: with :data:`MPT_OPTIONS`)."""
    if family == "Mpt":
        model = ztf.TFMptForSequenceClassification(nz.MptConfig(**MPT_OPTIONS), seed=5)
    else:
        model = ztf.TFElectraForSequenceClassification(FAMILIES["Electra"][0](), seed=1)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=True)
    inputs = {k: v.numpy() for k, v in _inputs(family, batch=4).items()}
    labels = np.array([0, 1, 1, 0])
    first = float(model.train_on_batch(inputs, labels))
    history = model.fit(inputs, labels, epochs=3, batch_size=4, verbose=0).history["loss"]
    assert np.isfinite(first) and history[-1] < first


def test_gradient_checkpointing_prunes_the_recomputed_layer():
    cfg = FAMILIES["MPNet"][0]()
    plain = ztf.TFMPNetForSequenceClassification(cfg, seed=2)
    ckpt = ztf.TFMPNetForSequenceClassification(cfg, seed=2, gradient_checkpointing=True)
    inputs = _inputs("MPNet")
    out_a, g_a = _run(plain, inputs, full=True, training=True)
    out_b, g_b = _run(ckpt, inputs, full=False, training=True)
    assert_close(out_b.logits, out_a.logits, LOGITS, "checkpointed pruned vs full")
    for a, b in zip(g_a, g_b):
        if a is not None:
            a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
            assert float(tf.reduce_max(tf.abs(a - b))) <= GRAD_REL * max(float(tf.reduce_max(tf.abs(a))), 1e-6)


@pytest.mark.parametrize("family", ["Electra", "Mpt"])
def test_base_model_returns_the_kept_rows(family):
    cfg = FAMILIES[family][0]()
    model = getattr(ztf, f"TF{family}Model")(cfg, seed=3)
    inputs = _inputs(family)
    positions = tf.constant([[0, 4], [6, 1], [2, 2]])
    full = model(**inputs).last_hidden_state
    kept = model(**inputs, positions_to_keep=positions).last_hidden_state  # (B, 2, H)
    assert kept.shape == (3, 2, full.shape[-1])
    assert_close(kept, keep_positions(full, positions), TOLERANCES["hidden"], f"{family} kept rows")


@pytest.mark.parametrize("family", ["Electra", "Mpt"])
def test_bad_positions_to_keep_raise_input_error(family):
    model = getattr(ztf, f"TF{family}Model")(FAMILIES[family][0](), seed=3)
    inputs = _inputs(family)
    with pytest.raises(InputError, match="positions_to_keep must be"):
        model(**inputs, positions_to_keep=tf.constant([0, 1, 2]))
    with pytest.raises(InputError, match="outside the positions"):
        model(**inputs, positions_to_keep=tf.constant([[0], [7], [1]]))
    with pytest.raises(InputError, match="outside the positions"):
        model(**inputs, positions_to_keep=tf.constant([[0], [-1], [1]]))
    with pytest.raises(InputError, match="batch 3"):
        model(**inputs, positions_to_keep=tf.zeros((2, 1), tf.int32))
    with pytest.raises(InputError, match="must be integers"):
        model(**inputs, positions_to_keep=tf.zeros((3, 1)))
    with pytest.raises(InputError, match="output_hidden_states"):
        model(**inputs, positions_to_keep=tf.zeros((3, 1), tf.int32), output_hidden_states=True)


def _nonzero_biases(model, seed: int = 2) -> None:
    """Every bias of ``model`` set to small random values (the initialiser's are zeros)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if v.path.endswith("/bias"):
            v.assign(tf.cast(rng.normal(0.0, 0.05, v.shape), v.dtype))


@pytest.fixture(scope="module")
def mpt_models():
    """``"options"``: an MPT classifier with :data:`MPT_OPTIONS` and nonzero biases; ``"lora"``: the same with
    a LoRA adapter (B nonzero, so it changes the product) on ``Wqkv``, its only trainable variables.  Built
    once."""
    plain = ztf.TFMptForSequenceClassification(nz.MptConfig(**MPT_OPTIONS), seed=4)
    lora = ztf.TFMptForSequenceClassification(nz.MptConfig(**MPT_OPTIONS), seed=4)
    for model in (plain, lora):  # nonzero biases (they start at zero), so the split Wqkv's bias slice counts
        _nonzero_biases(model)
    lora.enable_lora(2, target_modules=["Wqkv"])
    rng = np.random.default_rng(0)
    for layer in lora._lora_layer_map.values():
        layer.lora_kernel_b.assign(rng.normal(0.0, 0.3, layer.lora_kernel_b.shape).astype("float32"))
    return {"options": plain, "lora": lora}


class _Wqkv:
    """Records, per call of one ``Wqkv`` layer, the rows it projects and the ``columns`` it computes."""

    def __init__(self, layer, monkeypatch):
        self.calls: list[tuple[int, tuple[int, int] | None]] = []
        call = layer.call

        def recording(inputs, *args, columns=None, **kwargs):
            self.calls.append((int(np.prod(inputs.shape[:-1])), columns))
            return call(inputs, *args, columns=columns, **kwargs)

        monkeypatch.setattr(layer, "call", recording)


@pytest.mark.parametrize("which", ["default", "options", "lora"])
def test_mpt_wqkv_projects_the_query_at_the_kept_rows_only(which, models, mpt_models, monkeypatch):
    """The last block's ``Wqkv``: one row per sequence (the whole kernel, its query columns kept), its
    key/value columns at every row; earlier blocks, and a call that reads every row, run the whole
    projection at every row."""
    model = models("Mpt") if which == "default" else mpt_models[which]
    inputs = _inputs("Mpt")
    batch, length = inputs["input_ids"].shape
    d, kv, _ = model.config.qkv_widths
    first, last = (_Wqkv(block.attn.Wqkv, monkeypatch) for block in model.transformer.blocks.items)
    model(**inputs)
    assert last.calls == [(batch, None), (batch * length, (d, d + 2 * kv))]
    assert first.calls == [(batch * length, None)]
    model(**inputs, output_hidden_states=True)
    assert last.calls[2:] == [(batch * length, None)]


@pytest.mark.parametrize("which", ["options", "lora"])
def test_mpt_options_pruned_equal_full_eager_and_compiled(which, mpt_models):
    """clip_qkv, qk_ln, biases, multi-query (and LoRA on Wqkv): logits, loss and gradients (the Wqkv
    kernel's, or the adapter's) of the pruned head equal the full computation's, left-padded, with
    dropout on (and off, eagerly), eagerly and under ``tf.function(jit_compile=True)``."""
    model = mpt_models[which]
    inputs = _inputs("Mpt")
    names = [v.path for v in model.trainable_variables]
    assert any("Wqkv" in n for n in names) and (which != "lora" or all("lora_kernel" in n for n in names))

    def step(x, full, training):
        with tf.GradientTape() as tape:
            out = model(**x, labels=tf.constant([0, 1, 1]), output_hidden_states=full, training=training)
        return out.logits, out.loss, tape.gradient(out.loss, model.trainable_variables)

    compiled = tf.function(step, jit_compile=True)
    for name, run, training in (("eager", step, False), ("eager", step, True), ("xla", compiled, True)):
        _rewind(model)
        pruned = run(inputs, False, training)
        _rewind(model)
        full = run(inputs, True, training)
        _assert_same_step(model, pruned, full, f"{which} {name} training={training}", per_variable=False)


@pytest.mark.parametrize(
    "config, policy",
    [(MPT, "mixed_bfloat16"), (MPT_OPTIONS, "bfloat16")],
    ids=["default-mixed_bfloat16", "options-bfloat16"],
)
def test_mpt_bf16_pruned_equals_full_bit_for_bit(config, policy, monkeypatch):
    """In bfloat16 (the constructor's policy: float32 or bfloat16 weights, bfloat16 compute) the pruned
    head's left-padded logits equal the full computation's bit for bit, eagerly and under
    ``tf.function(jit_compile=True)`` (XLA's bf16 x bf16 -> f32 products): the key/value columns and
    the kept rows' whole product round exactly as the full product does."""
    model = ztf.TFMptForSequenceClassification(nz.MptConfig(**config), dtype=policy, seed=6)
    rng = np.random.default_rng(1)
    for v in model.weights:
        if v.path.endswith("/bias"):  # nonzero biases (they start at zero): the bias add rounds in bf16 too
            v.assign(tf.cast(rng.normal(0.0, 0.05, v.shape), v.dtype))
    assert keras.config.dtype_policy().name == "float32"  # the constructor's scope did not leak
    wqkv = model.transformer.blocks.items[-1].attn.Wqkv
    weights = "float32" if policy.startswith("mixed") else "bfloat16"
    assert wqkv.compute_dtype == "bfloat16" and wqkv.kernel.dtype == weights
    inputs = _inputs("Mpt")
    assert int(tf.reduce_min(inputs["attention_mask"][:, 0])) == 0  # some rows are left-padded
    calls = _Wqkv(wqkv, monkeypatch)

    def logits(x, full):
        return model(**x, output_hidden_states=full).logits

    compiled = tf.function(logits, jit_compile=True)
    for name, run in (("eager", logits), ("xla", compiled)):
        pruned, full = run(inputs, False), run(inputs, True)
        assert pruned.dtype == full.dtype == tf.bfloat16, name
        np.testing.assert_array_equal(
            tf.cast(pruned, tf.float32).numpy(), tf.cast(full, tf.float32).numpy(), err_msg=f"{policy} {name}"
        )
    d, kv, _ = model.config.qkv_widths
    assert (3 * 7, (d, d + 2 * kv)) in calls.calls  # the pruned path ran (its key/value columns' call)
