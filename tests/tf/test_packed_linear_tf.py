"""Packed kernels in TF (issue #23): opt-in blocked copies of the Dense kernels for small inference products.

``nezha_zoo.tf.set_packed_linear(True)`` / ``with packed_linear():`` make ``nezha_zoo.tf.layers.Dense`` run
float32 inference of at most ``PACKED_MAX_ROWS`` rows on ``pack_kernel``'s copy of its kernel, guarded by a
sampled fingerprint.  Results agree with the plain call to float32 rounding; the plain path is unchanged.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import nezha_zoo.tf as ztf  # noqa: E402
from nezha_zoo import ElectraConfig, MPNetConfig, MptConfig, NezhaConfig, XLMRobertaXLConfig  # noqa: E402
from nezha_zoo.packing import (  # noqa: E402
    FINGERPRINT_SIZE,
    PACK_BLOCK,
    PACKED_MAX_ROWS,
    fingerprint_indices,
    packed_linear,
    set_packed_linear,
)
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision  # noqa: E402
from nezha_zoo.tf.layers import Dense, pack_kernel, packable  # noqa: E402

pytestmark = pytest.mark.tf

pin_precision("tf")

HID = TOLERANCES["hidden"]
# widths that are multiples of 64, so every block kernel is packable
BERT = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
FAMILIES = {
    "electra": (ztf.TFElectraModel, ElectraConfig(**BERT, embedding_size=16)),  # projection 16 -> 64 packs
    "nezha": (ztf.TFNezhaModel, NezhaConfig(**BERT)),
    "mpnet": (ztf.TFMPNetModel, MPNetConfig(**BERT)),
    "xlm_roberta_xl": (ztf.TFXLMRobertaXLModel, XLMRobertaXLConfig(**BERT)),
    "mpt": (ztf.TFMptModel, MptConfig(vocab_size=99, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)),
}


def _ids(shape=(1, 7), seed=0):
    return np.random.default_rng(seed).integers(3, 99, size=shape)


def _packed_layers(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, Dense) and layer._nz_packed is not None
    ]


def _dense_layers(model):
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, Dense)]


def _hidden(out):
    return np.asarray(out[0])


def test_exports_and_layout():
    assert ztf.set_packed_linear is set_packed_linear and ztf.packed_linear is packed_linear
    kernel = tf.reshape(tf.range(3 * 128, dtype=tf.float32), (3, 128))
    packed = pack_kernel(kernel).numpy()
    assert packed.shape == (128 // PACK_BLOCK, 3, PACK_BLOCK)
    for b in range(2):
        np.testing.assert_array_equal(packed[b], kernel.numpy()[:, b * PACK_BLOCK : (b + 1) * PACK_BLOCK])
    assert packable(kernel)
    assert not packable(kernel[:, :100])  # a head's odd width
    assert not packable(tf.cast(kernel, tf.bfloat16))
    indices = fingerprint_indices((768, 3072))
    assert len(indices) == len(set(indices.tolist())) == FINGERPRINT_SIZE
    assert indices.min() == 0 and indices.max() >= 768 * 3072 - 2 * 16  # spread to the end
    assert len({i % 3072 for i in indices}) > 16  # the runs fall in many columns
    np.testing.assert_array_equal(fingerprint_indices((3, 64)), np.arange(3 * 64))


@pytest.mark.parametrize("rows", [(1, 5), (2, 16), (3, 11)], ids=["5-rows", "32-rows", "33-rows"])
def test_dense_on_the_packed_kernel_equals_dense(rows):
    layer = Dense(128, bias_initializer=keras.initializers.RandomNormal(stddev=1.0), activation="relu")
    x = tf.random.stateless_normal((*rows, 48), seed=(0, 1))
    want = layer(x).numpy()
    assert layer._nz_packed is None
    with packed_linear():
        got = layer(x).numpy()
        graph = tf.function(lambda t: layer(t, training=False))(x).numpy()
    assert got.shape == want.shape == (*rows, 128)
    small = np.prod(rows) <= PACKED_MAX_ROWS
    assert (layer._nz_packed is not None) == small  # more rows: the plain product, nothing packed
    if small:
        np.testing.assert_array_equal(layer._nz_packed[1].numpy(), pack_kernel(layer.kernel).numpy())
        assert_close(got, want, HID, "packed Dense")
        assert_close(graph, want, HID, "packed Dense in a tf.function")
    else:
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(graph, want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_calls_match_plain_calls(family):
    cls, config = FAMILIES[family]
    model = cls(config, seed=1)
    ids, mask = _ids(), np.ones((1, 7), np.int64)
    mask[0, -2:] = 0
    want = _hidden(model(input_ids=ids, attention_mask=mask))
    # switch off: nothing packed, the same result bit for bit
    np.testing.assert_array_equal(_hidden(model(input_ids=ids, attention_mask=mask)), want)
    assert not _packed_layers(model)
    fn = tf.function(lambda i, m: model(input_ids=i, attention_mask=m, training=False)[0])
    with packed_linear():
        eager = _hidden(model(input_ids=ids, attention_mask=mask))
        packed = _packed_layers(model)
        assert packed and len(packed) == sum(packable(layer.kernel) for layer in _dense_layers(model))
        graph = fn(tf.constant(ids), tf.constant(mask)).numpy()
        predicted = model.predict({"input_ids": ids, "attention_mask": mask}, verbose=0)[0]
    assert_close(eager, want, HID, f"{family}: packed eager vs plain", mask=mask[..., None] > 0)
    assert_close(graph, want, HID, f"{family}: packed tf.function vs plain", mask=mask[..., None] > 0)
    assert_close(predicted, want, HID, f"{family}: packed predict vs plain", mask=mask[..., None] > 0)
    # the packed calls read the copies: zeroing them (fingerprints kept) changes the result
    for layer in packed:
        layer._nz_packed[1].assign(tf.zeros_like(layer._nz_packed[1]))
    with packed_linear():
        zeroed = _hidden(model(input_ids=ids, attention_mask=mask))
    assert not np.allclose(zeroed, want, atol=1e-2)


def _electra():
    cls, config = FAMILIES["electra"]
    return cls(config, seed=1)


def test_writes_to_the_kernels_are_seen_in_eager_and_traced_calls(tmp_path):
    model = _electra()
    ids = _ids()
    fn = tf.function(lambda i: model(input_ids=i, training=False)[0])
    with packed_linear():
        fn(tf.constant(ids))  # traced and packed before the writes below
        model(input_ids=ids)
    original = model.get_weights()
    doubled = [w * 2 for w in original]
    model.set_weights(doubled)
    want_doubled = _hidden(model(input_ids=ids))
    with packed_linear():
        assert_close(fn(tf.constant(ids)).numpy(), want_doubled, HID, "set_weights, traced")
        assert_close(_hidden(model(input_ids=ids)), want_doubled, HID, "set_weights, eager")
    model.set_weights(original)
    want = _hidden(model(input_ids=ids))
    with packed_linear():  # packed afresh: the writes below are seen by the fingerprints alone
        assert_close(fn(tf.constant(ids)).numpy(), want, HID, "set_weights back, traced")
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    # kernel.assign (as an optimizer step or a user's edit): every packed kernel scaled
    for layer in _dense_layers(model):
        layer.kernel.assign(layer.kernel * 3.0)
    want_tripled = _hidden(model(input_ids=ids))
    with packed_linear():
        assert_close(fn(tf.constant(ids)).numpy(), want_tripled, HID, "assign, traced")
        assert_close(_hidden(model(input_ids=ids)), want_tripled, HID, "assign, eager")
    model.load_weights(path)
    with packed_linear():
        assert_close(fn(tf.constant(ids)).numpy(), want, HID, "load_weights, traced")
        assert_close(_hidden(model(input_ids=ids)), want, HID, "load_weights, eager")


def test_a_write_the_fingerprint_misses_needs_drop_packed_weights():
    model = _electra()
    ids = _ids()
    fn = tf.function(lambda i: model(input_ids=i, training=False)[0])
    with packed_linear():
        fn(tf.constant(ids))
    layer = next(d for d in _packed_layers(model) if d.kernel.shape[-1] == BERT["intermediate_size"])
    sampled = set(layer._nz_packed[3].tolist())
    row = next(r for r in range(layer.kernel.shape[0]) if not sampled & set(range(r * 128, (r + 1) * 128)))
    # one whole kernel row that holds no sampled element, written through the underlying tf.Variable
    layer.kernel.value[row].assign(tf.fill((128,), 5.0))
    want = _hidden(model(input_ids=ids))
    with packed_linear():
        stale = fn(tf.constant(ids)).numpy()
    assert not np.allclose(stale, want, atol=1e-3)  # the guard's documented limit
    model.drop_packed_weights()
    with packed_linear():
        assert_close(fn(tf.constant(ids)).numpy(), want, HID, "after drop_packed_weights, traced")
        assert_close(_hidden(model(input_ids=ids)), want, HID, "after drop_packed_weights, eager")


def test_training_more_rows_and_xla_stay_plain():
    model = _electra()
    ids = _ids()
    wide = _ids((2, PACKED_MAX_ROWS // 2 + 1))
    want_wide = _hidden(model(input_ids=wide))
    xla = tf.function(lambda i: model(input_ids=i, training=False)[0], jit_compile=True)
    want_xla = xla(tf.constant(ids)).numpy()
    with packed_linear():
        np.testing.assert_array_equal(_hidden(model(input_ids=wide)), want_wide)
        model(input_ids=ids, training=True)
        np.testing.assert_array_equal(xla(tf.constant(ids)).numpy(), want_xla)  # traced with the switch off
        np.testing.assert_array_equal(
            tf.function(lambda i: model(input_ids=i, training=False)[0], jit_compile=True)(tf.constant(ids)).numpy(),
            want_xla,
        )
    assert not _packed_layers(model)


def test_gradients_through_a_packed_inference_call_are_the_plain_ones():
    model = _electra()
    ids = tf.constant(_ids())

    def grads():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(input_ids=ids, training=False)[0] ** 2)
        return [None if g is None else tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_weights)]

    want = grads()
    with packed_linear():
        got = grads()
    assert _packed_layers(model)
    for w, g, v in zip(want, got, model.trainable_weights, strict=True):
        assert (w is None) == (g is None), v.path
        if w is not None:
            assert_close(g, w, TOLERANCES["grad_rel"] * max(1.0, float(tf.reduce_max(tf.abs(w)))), v.path)


def test_a_later_trace_of_the_same_function_may_pack():
    # a function traced first with more rows (plain), then with few: the copies are made in the later trace
    model = _electra()
    fn = tf.function(lambda i: model(input_ids=i, training=False)[0])
    wide, ids = _ids((2, PACKED_MAX_ROWS // 2 + 1)), _ids()
    want = _hidden(model(input_ids=ids))
    with packed_linear():
        fn(tf.constant(wide))
        assert not _packed_layers(model)
        got = fn(tf.constant(ids)).numpy()
    assert _packed_layers(model)
    assert_close(got, want, HID, "packed in a later trace")


def test_unmerged_lora_stays_plain_and_a_merge_is_packed_again():
    model = _electra()
    ids = _ids()
    with packed_linear():
        model(input_ids=ids)  # every packable kernel packed before the adapter
    model.enable_lora(2, alpha=4, target_modules=["query", "value"])
    for layer in model._adapted().values():
        layer.lora_kernel_b.assign(tf.fill(layer.lora_kernel_b.shape, 0.1))
    want = _hidden(model(input_ids=ids))
    with packed_linear():
        assert_close(_hidden(model(input_ids=ids)), want, HID, "unmerged LoRA, switch on")
    model.merge_lora()
    assert all(not layer.lora_enabled for layer in model._adapted().values())
    merged = _hidden(model(input_ids=ids))
    assert_close(merged, want, HID, "merged vs unmerged")
    with packed_linear():
        assert_close(_hidden(model(input_ids=ids)), merged, HID, "merged LoRA, packed")


def test_an_optimizer_step_in_a_compiled_train_step_is_seen():
    # the kernels change inside Keras' traced train function: the guard of an earlier-traced call sees it
    model = ztf.TFElectraForSequenceClassification(FAMILIES["electra"][1], seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    ids = _ids((2, 7))
    fn = tf.function(lambda i: model(input_ids=i, training=False)[0])
    with packed_linear():
        before = fn(tf.constant(ids)).numpy()
    model.train_on_batch({"input_ids": ids, "labels": np.array([0, 1])})
    want = model(input_ids=ids)[0].numpy()
    assert not np.allclose(want, before, atol=1e-3)
    with packed_linear():
        assert_close(fn(tf.constant(ids)).numpy(), want, TOLERANCES["logits"], "after a train step, traced")


def test_small_shapes_benchmark_times_tf_packed(tmp_path):
    small_shapes = pytest.importorskip("benchmarks.small_shapes")
    argv = ["--smoke", "--threads", "0", "--rounds", "2", "--backends", "tf-function,tf-packed"]
    assert small_shapes.main([*argv, "--workdir", str(tmp_path), "--out", str(tmp_path)]) == 0
    assert "| tf-packed |" in (tmp_path / "small_shapes.md").read_text()
