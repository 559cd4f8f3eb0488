"""Fine-tuning ergonomics in Flax (issue #20): new heads, config overrides, resizing, float16, param_dtype."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from nezha_zoo import ElectraConfig
from nezha_zoo.flax import FlaxElectraForSequenceClassification
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.registry import get_family

FAM = get_family("electra")
LAYOUT = LAYOUTS["flax"]
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
        FlaxElectraForSequenceClassification.from_pretrained(two_label_dir, num_labels=3)
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        new, info = FlaxElectraForSequenceClassification.from_pretrained(
            two_label_dir, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert "classifier.out_proj.weight (checkpoint (2, 12), model (3, 12))" in caplog.text
    assert [k for k, _, _ in info["mismatched_keys"]] == ["classifier.out_proj.weight", "classifier.out_proj.bias"]
    spec = new.spec
    flat = flatten_dict(new.params)
    got = {p.name: LAYOUT.from_stored(p, np.asarray(flat[LAYOUT.path(p)])) for p in spec if LAYOUT.path(p) in flat}
    want = random_weights(FAM.model_spec(CFG, "ForSequenceClassification"), CFG, seed=1)
    assert got["classifier.out_proj.weight"].shape == (3, 12) and not got["classifier.out_proj.bias"].any()
    assert 0.005 < got["classifier.out_proj.weight"].std() < 0.05
    for name, value in want.items():
        if not name.startswith("classifier.out_proj"):
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    with pytest.raises(TypeError, match="'num_label'.*did you mean 'num_labels'"):
        FlaxElectraForSequenceClassification.from_pretrained(two_label_dir, num_label=3)


def test_float16_and_float32_master_weights_with_bfloat16_compute(two_label_dir):
    import jax.numpy as jnp

    from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision

    pin_precision("flax")
    ids = np.array([[1, 5, 7, 39, 2, 3]])
    ref = FlaxElectraForSequenceClassification.from_pretrained(two_label_dir)
    want = np.asarray(ref(ids).logits)
    half = FlaxElectraForSequenceClassification.from_pretrained(two_label_dir, dtype="float16")
    assert {x.dtype for x in flatten_dict(half.params).values()} == {jnp.dtype("float16")}
    got = half(ids).logits
    assert got.dtype == jnp.float16
    assert_close(np.asarray(got, np.float32), want, TOLERANCES["bf16"], "float16 logits")
    mixed = FlaxElectraForSequenceClassification.from_pretrained(
        two_label_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32
    )
    assert {x.dtype for x in flatten_dict(mixed.params).values()} == {jnp.dtype("float32")}  # master weights
    got = mixed(ids).logits
    assert got.dtype == jnp.bfloat16
    assert_close(np.asarray(got, np.float32), want, TOLERANCES["bf16"], "bf16-compute logits")
    fresh = FlaxElectraForSequenceClassification(CFG, dtype="bfloat16", param_dtype="float32")
    assert {x.dtype for x in flatten_dict(fresh.params).values()} == {jnp.dtype("float32")}


def test_resize_token_embeddings_keeps_rows_and_round_trips(tmp_path):
    from nezha_zoo.flax import FlaxElectraForMaskedLM

    spec = FAM.model_spec(CFG, "ForMaskedLM")
    save_weights(tmp_path / "mlm", CFG, spec, FAM, random_weights(spec, CFG, seed=2))
    model = FlaxElectraForMaskedLM.from_pretrained(tmp_path / "mlm")
    ids = np.array([[1, 5, 7, 39]])
    before = np.asarray(model(ids).logits)
    old_emb = np.asarray(model.params["electra"]["embeddings"]["word_embeddings"]["embedding"])
    params = model.resize_token_embeddings(45, pad_to_multiple_of=8)
    emb = np.asarray(params["electra"]["embeddings"]["word_embeddings"]["embedding"])
    assert emb.shape == (48, 8) and model.config.vocab_size == 48 and params is model.params
    np.testing.assert_array_equal(emb[:40], old_emb)
    after = np.asarray(model(ids).logits)
    assert after.shape == (1, 4, 48)
    np.testing.assert_allclose(after[..., :40], before, atol=1e-5)  # old tokens score as before
    model.save_pretrained(tmp_path / "resized")
    again = FlaxElectraForMaskedLM.from_pretrained(tmp_path / "resized", strict=True)
    np.testing.assert_allclose(np.asarray(again(ids).logits), after, atol=1e-6)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        model.resize_token_embeddings(50, pad_to_multiple_of=0)


def test_swap_head_example_fine_tunes(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "swap_head.py"
    spec = importlib.util.spec_from_file_location("swap_head_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main("flax", steps=30)
    assert all(np.isfinite(history)) and history[-1] < 0.8 * history[0], history
