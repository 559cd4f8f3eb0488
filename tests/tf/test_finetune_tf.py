"""Fine-tuning ergonomics in TensorFlow/Keras (issue #20): new heads, config overrides, resizing, float16."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from nezha_zoo import ElectraConfig
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family
from nezha_zoo.tf import TFElectraForSequenceClassification

FAM = get_family("electra")
CFG = ElectraConfig(
    vocab_size=40, embedding_size=8, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
)


@pytest.fixture(scope="module")
def two_label_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_labels")
    spec = FAM.model_spec(CFG, "ForSequenceClassification")
    save_weights(d, CFG, spec, FAM, random_weights(spec, CFG, seed=1))
    return d


def test_new_head_with_ignore_mismatched_sizes(two_label_dir, caplog):
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        TFElectraForSequenceClassification.from_pretrained(two_label_dir, num_labels=3)
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        new, info = TFElectraForSequenceClassification.from_pretrained(
            two_label_dir, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert "classifier.out_proj.weight (checkpoint (2, 12), model (3, 12))" in caplog.text
    assert [k for k, _, _ in info["mismatched_keys"]] == ["classifier.out_proj.weight", "classifier.out_proj.bias"]
    got = dict(new.canonical_weights())
    want = random_weights(FAM.model_spec(CFG, "ForSequenceClassification"), CFG, seed=1)
    assert got["classifier.out_proj.weight"].shape == (3, 12) and not got["classifier.out_proj.bias"].any()
    assert 0.005 < got["classifier.out_proj.weight"].std() < 0.05
    for name, value in want.items():
        if not name.startswith("classifier.out_proj"):
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    with pytest.raises(TypeError, match="'num_label'.*did you mean 'num_labels'"):
        TFElectraForSequenceClassification.from_pretrained(two_label_dir, num_label=3)


def test_float16_close_to_float32(two_label_dir):
    import tensorflow as tf

    from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision

    pin_precision("tf")
    ids = np.array([[1, 5, 7, 39, 2, 3]])
    want = TFElectraForSequenceClassification.from_pretrained(two_label_dir)(ids).logits.numpy()
    half = TFElectraForSequenceClassification.from_pretrained(two_label_dir, dtype="float16")
    assert {v.dtype for v in half.weights} == {"float16"}
    got = half(ids).logits
    assert got.dtype == tf.float16
    assert_close(got.numpy().astype(np.float32), want, TOLERANCES["bf16"], "float16 logits")


def test_resize_token_embeddings_keeps_rows_and_round_trips(tmp_path):
    from nezha_zoo.tf import TFElectraForMaskedLM

    spec = FAM.model_spec(CFG, "ForMaskedLM")
    save_weights(tmp_path / "mlm", CFG, spec, FAM, random_weights(spec, CFG, seed=2))
    model = TFElectraForMaskedLM.from_pretrained(tmp_path / "mlm")
    ids = np.array([[1, 5, 7, 39]])
    before = model(ids).logits.numpy()
    old_emb = dict(model.canonical_weights())["electra.embeddings.word_embeddings.weight"]
    emb = model.resize_token_embeddings(45, pad_to_multiple_of=8)
    assert tuple(emb.shape) == (48, 8) and model.config.vocab_size == 48
    np.testing.assert_array_equal(emb.numpy()[:40], old_emb)
    after = model(ids).logits.numpy()
    assert after.shape == (1, 4, 48)
    np.testing.assert_allclose(after[..., :40], before, atol=1e-5)  # old tokens score as before
    model.save_pretrained(tmp_path / "resized")
    again = TFElectraForMaskedLM.from_pretrained(tmp_path / "resized", strict=True)
    np.testing.assert_allclose(again(ids).logits.numpy(), after, atol=1e-6)


def test_swap_head_example_fine_tunes(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "swap_head.py"
    spec = importlib.util.spec_from_file_location("swap_head_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main("tf", steps=30)
    assert all(np.isfinite(history)) and history[-1] < 0.8 * history[0], history


def test_input_and_output_embeddings():
    import keras

    from nezha_zoo.tf import TFElectraForMaskedLM, TFElectraModel

    model = TFElectraForMaskedLM(CFG)
    emb = model.get_input_embeddings()
    assert isinstance(emb, keras.layers.Embedding) and tuple(emb.embeddings.shape) == (40, 8)
    assert model.get_output_embeddings() is model.generator_lm_head
    assert TFElectraModel(CFG).get_output_embeddings() is None
