"""Keras-native lifecycle and precision policies of every TF class (issue #19).

``get_config`` / ``from_config`` for every class, ``model.save`` + ``keras.models.load_model`` (outputs,
optimizer state, the next training step), ``ModelCheckpoint`` (``.keras`` and ``.weights.h5``),
``clone_model``, ``summary`` shapes, ``evaluate`` / ``predict``, and Keras' mixed policies.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import nezha_zoo.tf as ztf  # noqa: E402
from nezha_zoo import (  # noqa: E402
    ElectraConfig,
    IBertConfig,
    MPNetConfig,
    MptConfig,
    NezhaConfig,
    XLMRobertaXLConfig,
)
from nezha_zoo.spec.registry import families, model_class  # noqa: E402
from nezha_zoo.testing import pin_precision  # noqa: E402
from nezha_zoo.tf.modeling_utils import KERAS_PACKAGE, resolve_dtype_policy  # noqa: E402

pytestmark = [pytest.mark.tf]

#: One layer, no dropout: a training step is deterministic, so two models that agree keep agreeing.
BERT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
CONFIGS = {
    "electra": lambda: ElectraConfig(**BERT, embedding_size=24),
    "ibert": lambda: IBertConfig(**BERT),
    "mpnet": lambda: MPNetConfig(**BERT),
    "mpt": lambda: MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=99, max_seq_len=24, pad_token_id=0),
    "nezha": lambda: NezhaConfig(**BERT, max_relative_position=8, classifier_dropout=0.0),  # 0.1 by default
    "xlm-roberta-xl": lambda: XLMRobertaXLConfig(**BERT),
}
BATCH, LENGTH = 4, 7


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("tf")


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.config.set_dtype_policy("float32")  # a test that set a global policy leaves none behind


def _data(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    x = {
        "input_ids": rng.integers(2, 99, (BATCH, LENGTH)).astype(np.int32),
        "attention_mask": np.ones((BATCH, LENGTH), np.int32),
    }
    x["attention_mask"][0, -2:] = 0
    return x, rng.integers(0, 2, (BATCH,)).astype(np.int32)


def _classifier(family: str, **kwargs) -> ztf.TFPreTrainedModel:
    return model_class(family, "ForSequenceClassification", "tf")(CONFIGS[family](), seed=0, **kwargs)


def _compile(model: keras.Model, run_eagerly: bool = False) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"], jit_compile=False, run_eagerly=run_eagerly
    )


def _assert_same_weights(a: keras.Model, b: keras.Model) -> None:
    assert [v.path for v in a.weights] == [v.path for v in b.weights]
    for u, v in zip(a.weights, b.weights):
        np.testing.assert_array_equal(u.numpy(), v.numpy(), err_msg=u.path)


def test_every_class_is_registered_and_round_trips_its_config():
    for key, fam in families().items():
        config = CONFIGS[key]()
        for head in fam.heads:
            cls = model_class(key, head, "tf")
            assert keras.saving.get_registered_object(f"{KERAS_PACKAGE}>{cls.__name__}") is cls
            assert keras.saving.get_registered_name(cls) == f"{KERAS_PACKAGE}>{cls.__name__}"
            model = cls(config, seed=0)
            got = model.get_config()
            assert isinstance(got["config"], dict) and got["config"] == config.to_dict()
            rebuilt = cls.from_config(got)
            assert type(rebuilt) is cls and rebuilt.config == config and rebuilt.name == model.name
            assert rebuilt.get_config() == got
            _assert_same_weights(model, rebuilt)  # the seed travels in the config


def test_constructor_arguments_travel_in_the_config():
    model = ztf.TFMPNetModel(MPNetConfig(**BERT), add_pooling_layer=False, seed=3, name="enc")
    got = model.get_config()
    assert (got["add_pooling_layer"], got["seed"], got["name"]) == (False, 3, "enc")
    rebuilt = ztf.TFMPNetModel.from_config(got)
    assert rebuilt.pooler is None and not any("pooler" in v.path for v in rebuilt.weights)
    with pytest.raises(ValueError, match="model config under 'config'"):
        ztf.TFMPNetModel.from_config({"seed": 0})


def test_train_step_traces_once(monkeypatch):
    """The optimizer's state exists before Keras traces the train step, so the step is traced once
    (Keras 3 alone creates it inside the first trace, and a ``tf.function`` that creates variables
    is traced again on its next call).  Each trace runs ``train_step`` in Python once.  No compiled
    metrics: Keras creates their variables in the first trace too."""
    cls = model_class("electra", "ForSequenceClassification", "tf")
    traced = []
    train_step = cls.train_step
    monkeypatch.setattr(cls, "train_step", lambda self, data: traced.append(1) or train_step(self, data))
    x, y = _data()
    model = _classifier("electra")
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=False)
    assert not model.optimizer.built
    before = [v.numpy() for v in model.trainable_variables]
    for _ in range(3):
        model.train_on_batch(x, y)
    assert len(traced) == 1
    assert len(model.optimizer.variables) == 2 + 2 * len(model.trainable_variables)  # iterations, lr; m, v
    assert all(np.any(v.numpy() != b) for v, b in zip(model.trainable_variables, before))


def test_word_embedding_gradient_stays_sparse():
    """The word table's gradient is the looked-up rows (``IndexedSlices``), not a dense (vocab, E)
    table: padding-row freezing must not densify it."""
    x, y = _data()
    model = _classifier("electra")
    with tf.GradientTape() as tape:
        loss = model(**x, labels=y, training=True).loss
    grad = tape.gradient(loss, model.electra.embeddings.word_embeddings.embeddings)
    assert isinstance(grad, tf.IndexedSlices) and grad.values.shape == (BATCH * LENGTH, 24)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fit_checkpoint_load_model_clone_summary(family, tmp_path):
    x, y = _data()
    val = _data(1)
    model = _classifier(family)
    # Graph mode (Keras' default) once; the other families skip the tracing, which costs more than
    # their tiny steps (saving and loading do not depend on it).
    _compile(model, run_eagerly=family != "electra")
    best, weights = str(tmp_path / "best.keras"), str(tmp_path / "last.weights.h5")
    callbacks = [
        keras.callbacks.ModelCheckpoint(best, monitor="val_accuracy", mode="max", save_best_only=True),
        keras.callbacks.ModelCheckpoint(weights, save_weights_only=True),
    ]
    history = model.fit(x, y, validation_data=val, batch_size=BATCH, epochs=1, callbacks=callbacks, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and "val_accuracy" in history.history

    # The best (only) epoch reloads as the trained model: class, config, weights, optimizer state.
    loaded = keras.models.load_model(best)
    assert type(loaded) is type(model) and loaded.config == model.config
    _assert_same_weights(model, loaded)
    np.testing.assert_array_equal(loaded(x).logits.numpy(), model(x).logits.numpy())
    trained = {v.path: v.numpy() for v in model.weights}
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables) > 2
    for u, v in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(u.numpy(), v.numpy(), err_msg=u.path)
    # Training goes on from the same state: one more step lands on the same weights.
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    for u, v in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(v.numpy(), u.numpy(), rtol=1e-5, atol=1e-6, err_msg=u.path)

    # .weights.h5 into a fresh model of the same config.
    fresh = type(model)(model.config, seed=1)
    fresh.load_weights(weights)
    assert {v.path for v in fresh.weights} == set(trained)
    for v in fresh.weights:
        np.testing.assert_array_equal(v.numpy(), trained[v.path], err_msg=v.path)

    # predict / evaluate agree with a direct call.
    predicted = loaded.predict(x, batch_size=2, verbose=0)
    np.testing.assert_allclose(predicted.logits, loaded(x).logits.numpy(), rtol=1e-5, atol=1e-6)
    loss, accuracy = loaded.evaluate(x, y, batch_size=BATCH, verbose=0)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0

    clone = keras.models.clone_model(loaded)
    assert type(clone) is type(loaded) and clone.config == loaded.config
    assert clone(x).logits.shape == (BATCH, 2)

    lines: list[str] = []
    loaded.summary(print_fn=lambda line, **_: lines.append(line))
    table = "\n".join(lines)
    assert "?" not in table, table
    hidden = model.config.hidden_size if family != "mpt" else model.config.d_model
    # The base layer's last layer runs at the pooled row only (positions_to_keep): (B, 1, H), and MPT scores
    # that row; I-BERT keeps every position (its activation ranges calibrate over all of them).
    rows = "None" if family == "ibert" else "1"
    logits = f"(None, {rows}, 2)" if family == "mpt" else "(None, 2)"
    assert f"(None, {rows}, {hidden})" in table and logits in table, table


def test_load_model_keeps_a_mixed_policy(tmp_path):
    model = _classifier("electra", dtype="mixed_bfloat16")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.dtype_policy.name == "mixed_bfloat16"
    assert {v.dtype for v in loaded.weights} == {"float32"}
    x, _ = _data()
    np.testing.assert_array_equal(loaded(x).logits.numpy(), model(x).logits.numpy())


@pytest.mark.parametrize(
    ("family", "policy", "how"),
    [
        ("electra", "mixed_float16", "global"),
        ("mpt", "mixed_float16", "argument"),
        ("nezha", "mixed_bfloat16", "global"),
        ("electra", "mixed_bfloat16", "policy"),
    ],
)
def test_mixed_precision(family, policy, how):
    low = policy.removeprefix("mixed_")
    if how == "global":
        keras.mixed_precision.set_global_policy(policy)
        model = _classifier(family)
    else:
        model = _classifier(family, dtype=policy if how == "argument" else keras.DTypePolicy(policy))
    assert model.dtype_policy.name == policy
    assert {v.dtype for v in model.weights} == {"float32"}
    layers = [layer for layer in model._flatten_layers() if layer.weights]
    assert {layer.compute_dtype for layer in layers} == {low}
    x, y = _data()
    out = model(x, labels=y, output_hidden_states=True)
    assert out.logits.dtype == low and out.hidden_states[-1].dtype == low  # Keras: compute dtype out
    assert out.loss.dtype == tf.float32 and np.isfinite(out.loss.numpy())  # the loss in float32

    before = [v.numpy() for v in model.trainable_weights]
    _compile(model)
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (low == "float16")  # Keras adds dynamic loss scaling for float16 only
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_weights))
    assert {v.dtype for v in model.weights} == {"float32"}


def test_bfloat16_stays_a_plain_dtype():
    model = ztf.TFElectraModel(CONFIGS["electra"](), dtype="bf16", seed=0)
    assert model.dtype_policy.name == "bfloat16" and {v.dtype for v in model.weights} == {"bfloat16"}


def test_unsupported_dtypes_and_policies_are_refused():
    assert resolve_dtype_policy(None) == "float32"
    assert resolve_dtype_policy(keras.DTypePolicy("mixed_float16")) == "mixed_float16"
    assert resolve_dtype_policy(tf.bfloat16) == "bfloat16"
    assert resolve_dtype_policy("float16") == "float16"  # a plain dtype since issue #20 (all backends)
    for bad in ("float64", "mixed_float64", keras.DTypePolicy("float64"), "int8"):
        with pytest.raises(ValueError, match="not supported"):
            resolve_dtype_policy(bad)
    with pytest.raises(TypeError):
        resolve_dtype_policy(3.5)
    keras.mixed_precision.set_global_policy("float64")
    with pytest.raises(ValueError, match="global dtype policy 'float64' is not supported"):
        ztf.TFElectraModel(CONFIGS["electra"]())
