"""Keras 3 dtypes (float32 / bfloat16) and low-memory from_pretrained (issue #5)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import nezha_zoo.tf as ztf  # noqa: E402
import nezha_zoo.tf.modeling_utils as tf_utils  # noqa: E402
from benchmarks.precision import _hlo_dots  # noqa: E402
from nezha_zoo import ElectraConfig, MPNetConfig, NezhaConfig  # noqa: E402
from nezha_zoo.io.reader import open_checkpoint  # noqa: E402
from nezha_zoo.testing import (  # noqa: E402
    TOLERANCES,
    assert_close,
    assert_save_pretrained_takes_the_lock,
    pin_precision,
    tiny_inputs,
)
from nezha_zoo.tf.layers import in_xla_context  # noqa: E402

pytestmark = [pytest.mark.tf]

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
CONFIGS = {
    "Electra": ElectraConfig(**TINY, embedding_size=24),
    "Nezha": NezhaConfig(**TINY, max_relative_position=8),
    "MPNet": MPNetConfig(**TINY),
}


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("tf")


def _inputs(family: str) -> dict[str, np.ndarray]:
    arrays = tiny_inputs(batch=2, seq_len=7, vocab_size=TINY["vocab_size"], seed=1)
    if family == "MPNet":
        arrays.pop("token_type_ids")
        arrays["input_ids"] = np.where(arrays["attention_mask"] == 1, arrays["input_ids"], 1)  # MPNet pads with 1
    return arrays


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_bf16_model_is_bf16_and_close_to_float32(family, tmp_path):
    ref = getattr(ztf, f"TF{family}ForMaskedLM")(CONFIGS[family], seed=0)
    ref.save_pretrained(tmp_path)
    bf = getattr(ztf, f"TF{family}ForMaskedLM").from_pretrained(tmp_path, dtype="bfloat16")
    assert {v.dtype for v in bf.weights} == {"bfloat16"}
    inp = _inputs(family)
    want = ref(**inp, output_hidden_states=True)
    got = bf(**inp, output_hidden_states=True)
    assert got.logits.dtype == tf.bfloat16 and got.hidden_states[-1].dtype == tf.bfloat16
    keep = inp["attention_mask"][..., None].astype(bool)
    last = tf.cast(got.hidden_states[-1], tf.float32)
    assert_close(last, want.hidden_states[-1], TOLERANCES["bf16"], "last hidden", mask=keep)
    scale = float(np.abs(want.logits.numpy()).max())
    logits = tf.cast(got.logits, tf.float32).numpy()
    assert_close(logits / scale, want.logits.numpy() / scale, TOLERANCES["bf16"], "logits / max|logits|", keep)


def test_constructor_dtype_reaches_every_layer_and_masks_stay_finite():
    cfg = CONFIGS["Electra"]
    bf = ztf.TFElectraForSequenceClassification(cfg, dtype="bfloat16", seed=0)
    assert {v.dtype for v in bf.weights} == {"bfloat16"}
    layers = [layer for layer in bf._flatten_layers() if layer.weights]
    assert layers and {layer.compute_dtype for layer in layers} == {"bfloat16"}
    assert keras.config.dtype_policy().name == "float32"  # the scope did not leak
    ref = ztf.TFElectraForSequenceClassification(cfg, seed=0)
    for v, w in zip(bf.weights, ref.weights):
        w.assign(tf.cast(v, tf.float32))  # the same (bf16-representable) weights in float32
    inp = _inputs("Electra")
    got = bf(**inp, output_attentions=True)
    want = ref(**inp)
    probs = got.attentions[0].numpy().astype(np.float32)  # (B, heads, Lq, Lk)
    pad = inp["attention_mask"] == 0
    assert pad.any() and np.all(np.isfinite(probs))
    # Masked keys get exactly zero probability (bfloat16's own minimum, not float32's, which is -inf there).
    assert float(np.abs(np.transpose(probs, (0, 3, 1, 2))[pad]).max()) == 0.0
    assert_close(tf.cast(got.logits, tf.float32), want.logits, TOLERANCES["bf16"], "logits")


def _dots(fn, stage: str) -> dict[str, int]:
    """Dots of an argument-free ``tf.function(jit_compile=True)`` by ``"lhs x rhs -> out"`` dtypes:
    as emitted (``stage="hlo"``) or as XLA compiled them (``"optimized_hlo"``)."""
    return _hlo_dots(fn.experimental_get_compiler_ir()(stage=stage))


@pytest.mark.parametrize("family", ["Electra", "Nezha"])
def test_bf16_products_compile_as_bf16_operands_with_f32_result(family):
    # XLA's CPU compiler widens a bf16 x bf16 -> bf16 dot whole to float32, but runs bf16 x bf16 -> f32
    # natively: under XLA every matmul of a bf16 model (dense, attention, tied decoder) and both of its
    # backward products reach XLA in that form; float32 models, eager calls and graphs without XLA unchanged.
    cls = getattr(ztf, f"TF{family}ForMaskedLM")
    bf = cls(CONFIGS[family], dtype="bfloat16", seed=0)
    ref = cls(CONFIGS[family], seed=0)
    for v, w in zip(bf.weights, ref.weights):
        w.assign(tf.cast(v, tf.float32))  # the same (bf16-representable) weights in float32
    inp = {k: tf.constant(v) for k, v in _inputs(family).items()}

    def forward(model, xla):
        return tf.function(lambda: model(**inp).logits, jit_compile=xla)

    bf_fwd, ref_fwd = forward(bf, True), forward(ref, True)
    ref_dots = _dots(ref_fwd, "hlo")
    assert set(ref_dots) == {"f32 x f32 -> f32"} and _dots(ref_fwd, "optimized_hlo") == ref_dots
    total, layers = ref_dots["f32 x f32 -> f32"], CONFIGS[family].num_hidden_layers
    relative = 2 * layers if family == "Nezha" else 0  # Nezha's relative-position einsums keep their form
    emitted = {k: n for k, n in {"bf16 x bf16 -> f32": total - relative, "bf16 x bf16 -> bf16": relative}.items() if n}
    assert _dots(bf_fwd, "hlo") == emitted
    if "xla_cpu_multi_thread_eigen=false" not in os.environ.get("XLA_FLAGS", ""):
        # XLA's default CPU runtime keeps them native (its single-threaded one, as in the suite's xdist
        # workers, is not checked here, as in the Flax test), the relative-position einsums widened.
        compiled = {"bf16 x bf16 -> f32": total - relative, "f32 x f32 -> f32": relative}
        assert _dots(bf_fwd, "optimized_hlo") == {k: n for k, n in compiled.items() if n}
    want = ref(**inp).logits.numpy()
    scale = float(np.abs(want).max())
    keep = inp["attention_mask"].numpy()[..., None].astype(bool)
    for how, got in [("XLA", bf_fwd()), ("eager", bf(**inp).logits), ("tf.function", forward(bf, False)())]:
        assert got.dtype == tf.bfloat16, how
        got = tf.cast(got, tf.float32).numpy()
        assert_close(got / scale, want / scale, TOLERANCES["bf16"], f"{how} logits / max|logits|", keep)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(bf(**inp, training=True).logits, tf.float32))
        return tape.gradient(loss, bf.trainable_variables)

    xla_step = tf.function(step, jit_compile=True)
    # TensorFlow's own gradient of a bf16 x bf16 -> f32 matmul mixes f32 and bf16 operands; ours emits
    # both backward products in the forward's form.
    assert _dots(xla_step, "hlo") == {k: 3 * n for k, n in emitted.items()}
    grads = xla_step()
    assert all(g.dtype == tf.bfloat16 and bool(tf.reduce_all(tf.math.is_finite(tf.cast(g, tf.float32)))) for g in grads)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_keras_fit_and_predict_of_a_bf16_model_take_the_xla_products_only_when_compiled(jit_compile, monkeypatch):
    # bf16_matmul's native form has no kernel outside XLA: it must see XLA in Keras' compiled steps, never elsewhere.
    seen: list[bool] = []
    real = ztf.layers.in_xla_context

    def recording():
        seen.append(real())
        return seen[-1]

    model = ztf.TFElectraForSequenceClassification(CONFIGS["Electra"], dtype="bfloat16", seed=0)
    model.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit_compile
    )
    monkeypatch.setattr(ztf.layers, "in_xla_context", recording)  # from here: the steps fit and predict trace
    inp = _inputs("Electra")
    x, y = {"input_ids": inp["input_ids"], "attention_mask": inp["attention_mask"]}, np.array([0, 1])
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    logits = model.predict(x, batch_size=2, verbose=0)
    logits = logits["logits"] if isinstance(logits, dict) else getattr(logits, "logits", logits)
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))
    assert seen and set(seen) == {jit_compile}
    assert not in_xla_context()


def test_bf16_save_is_bf16_and_loads_exactly(tmp_path):
    bf = ztf.TFElectraForPreTraining(CONFIGS["Electra"], dtype=tf.bfloat16, seed=1)
    bf.save_pretrained(tmp_path, max_shard_size="20KB")
    with open_checkpoint(tmp_path) as reader:
        assert reader.format == "safetensors-sharded"
        assert {reader.dtype(k) for k in reader.keys()} == {"BF16"}
    again = ztf.TFElectraForPreTraining.from_pretrained(tmp_path, dtype="bf16")
    as_f32 = ztf.TFElectraForPreTraining.from_pretrained(tmp_path)
    for v, w, x in zip(bf.weights, again.weights, as_f32.weights):
        assert v.path == w.path == x.path and x.dtype == "float32"
        np.testing.assert_array_equal(w.numpy().view(np.uint16), v.numpy().view(np.uint16), err_msg=v.path)
        np.testing.assert_array_equal(x.numpy(), v.numpy().astype(np.float32), err_msg=v.path)


def test_save_pretrained_fails_at_once_while_another_writer_holds_the_destination(tmp_path):
    assert_save_pretrained_takes_the_lock(ztf.TFElectraForPreTraining(CONFIGS["Electra"], seed=1), tmp_path)


def test_transformers_loads_our_bf16_checkpoint(tmp_path):
    ours = ztf.TFElectraForMaskedLM(CONFIGS["Electra"], dtype="bfloat16", seed=2)
    ours.save_pretrained(tmp_path)
    hf = transformers.ElectraForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    inp = _inputs("Electra")
    with torch.no_grad():
        want = hf(**{k: torch.from_numpy(v) for k, v in inp.items()}).logits.float().numpy()
    got = tf.cast(ours(**inp).logits, tf.float32).numpy()
    keep = inp["attention_mask"][..., None].astype(bool)
    assert_close(got, want, TOLERANCES["bf16"], "ours (TF) vs transformers, both bf16", mask=keep)


def test_from_pretrained_never_random_inits(tmp_path, monkeypatch):
    ztf.TFElectraForMaskedLM(CONFIGS["Electra"], seed=0).save_pretrained(tmp_path / "full")
    ztf.TFElectraModel(CONFIGS["Electra"], seed=0).save_pretrained(tmp_path / "base")
    calls: list = []
    real = tf_utils.TFPreTrainedModel.init_weights

    def recording(self, seed=None, names=None):
        calls.append(None if names is None else set(names))
        return real(self, seed, names)

    built_with: list = []
    real_build = tf_utils._uninitialized_variables

    def spying(model):
        built_with.append(type(model).__name__)
        return real_build(model)

    monkeypatch.setattr(tf_utils.TFPreTrainedModel, "init_weights", recording)
    monkeypatch.setattr(tf_utils, "_uninitialized_variables", spying)
    model = ztf.TFElectraForMaskedLM.from_pretrained(tmp_path / "full", dtype="bfloat16")
    assert calls == [] and built_with == ["TFElectraForMaskedLM"]  # variables allocated, never initialised
    model, info = ztf.TFElectraForMaskedLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] and calls == [set(info["missing_keys"])]  # only the head's own weights
    # The layers' own initializers are back in place after the build.
    dense = model.electra.encoder.layer[0].intermediate.dense
    assert not isinstance(dense.kernel_initializer, tf_utils._Uninitialized)


def test_bad_dtype_raises_clearly(tmp_path):
    with pytest.raises(ValueError, match="dtype='float64' is not supported"):
        ztf.TFElectraModel(CONFIGS["Electra"], dtype="float64")  # float16 is supported (issue #20)
    ztf.TFElectraModel(CONFIGS["Electra"], seed=0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        ztf.TFElectraModel.from_pretrained(tmp_path, dtype=tf.float64)
    assert keras.config.dtype_policy().name == "float32"  # a failed constructor leaves the policy alone


def test_weights_loaded_in_pieces_leave_copy_on_read_mode(tmp_path, monkeypatch):
    # A sliced write puts a TF variable in copy-on-read mode for good: each later read in a graph
    # copies the whole tensor (Electra-base's embedding table: ~70 ms of a 50 ms forward pass).
    ztf.TFElectraModel(CONFIGS["Electra"], seed=0).save_pretrained(tmp_path)
    monkeypatch.setattr("nezha_zoo.io.plan.CHUNK_BYTES", 512)  # every tensor above 512 bytes arrives in pieces
    sliced, released = [], []
    real_slice, real_release = tf.raw_ops.ResourceStridedSliceAssign, tf.raw_ops.DisableCopyOnRead

    def slice_assign(ref, **kwargs):
        sliced.append(ref)
        return real_slice(ref=ref, **kwargs)

    def release(resource, **kwargs):
        released.append(resource)
        return real_release(resource=resource, **kwargs)

    monkeypatch.setattr(tf.raw_ops, "ResourceStridedSliceAssign", slice_assign)
    monkeypatch.setattr(tf.raw_ops, "DisableCopyOnRead", release)
    model = ztf.TFElectraModel.from_pretrained(tmp_path)
    # A safetensors file streams every tensor through sliced writes (the word table, 99 x 24 float32,
    # in 19 of them); each variable is released once, after its last slice.
    assert len(sliced) > len(model.weights)
    assert len(released) == len(model.weights)
    want = ztf.TFElectraModel(CONFIGS["Electra"], seed=0)
    ids = tf.constant(_inputs("Electra")["input_ids"])
    np.testing.assert_array_equal(model(input_ids=ids)[0].numpy(), want(input_ids=ids)[0].numpy())


def test_float16_fully_masked_row_is_finite_and_matches_float32(tmp_path):
    # float16's min + a score below -16 rounds to -inf: a row whose keys are all masked became NaN.  The sum now
    # saturates at the dtype's min (one rule in every backend, nezha_zoo.dtypes.SATURATING_MASK_DTYPES): the row
    # is uniform, as in float32.  Zero query/key kernels and biases +-8 make every score about -181.
    ref = ztf.TFElectraModel(CONFIGS["Electra"], seed=0)
    for v in ref.weights:
        if "/attention/self/" in v.path and v.path.endswith("/kernel") and "/value/" not in v.path:
            v.assign(tf.zeros_like(v))
        elif v.path.endswith("/attention/self/query/bias") or v.path.endswith("/attention/self/key/bias"):
            v.assign(tf.fill(v.shape, 8.0 if "/query/" in v.path else -8.0))
    ref.save_pretrained(tmp_path)
    half = ztf.TFElectraModel.from_pretrained(tmp_path, dtype="float16")
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], np.int32)  # the second row sees no key at all
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    got = half(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.dtype == tf.float16 and bool(tf.reduce_all(tf.math.is_finite(got)))
    assert_close(tf.cast(got, tf.float32).numpy(), want.numpy(), TOLERANCES["bf16"], "float16 against float32")
