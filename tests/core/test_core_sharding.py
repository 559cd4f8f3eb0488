"""Partition rules read off the spec's logical axes (no framework)."""

from __future__ import annotations

import pytest

from nezha_zoo.spec import LAYOUTS, get_family
from nezha_zoo.spec.partitioning import RULE_SETS, get_rules, memory_table, partition, partitions, per_device_bytes

FLAX, PT = LAYOUTS["flax"], LAYOUTS["pt"]


def _spec(key="electra", head="ForMaskedLM", **cfg):
    fam = get_family(key)
    config = fam.config_class(**cfg)
    return fam.model_spec(config, head)


def _electra(**extra):
    base = dict(vocab_size=96, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return _spec(**{**base, **extra})


def test_data_parallel_replicates_everything():
    spec = _electra()
    assert all(all(a is None for a in part) for part in partitions(spec, FLAX, "dp", {"data": 8}).values())


def test_tensor_parallel_splits_heads_mlp_and_vocab_in_storage_order():
    spec = _electra()
    parts = partitions(spec, FLAX, "tp", {"model": 4})
    layer = "electra.encoder.layer.0."
    # Flax kernels are (in, out): column-parallel q/k/v and FFN-in split their output axis...
    assert parts[layer + "attention.self.query.weight"] == (None, "model")
    assert parts[layer + "attention.self.query.bias"] == ("model",)
    assert parts[layer + "intermediate.dense.weight"] == (None, "model")
    # ...row-parallel attention-out and FFN-out split their input axis.
    assert parts[layer + "attention.output.dense.weight"] == ("model", None)
    assert parts[layer + "output.dense.weight"] == ("model", None)
    assert parts[layer + "output.dense.bias"] == (None,)
    assert parts["electra.embeddings.word_embeddings.weight"] == ("model", None)
    # The canonical (PyTorch) layout puts the same split on the other axis of the weight.
    assert partition(spec[layer + "attention.self.query.weight"], PT, "tp", {"model": 4}) == ("model", None)


def test_fsdp_splits_the_width_axis_once_per_tensor():
    spec = _electra()
    parts = partitions(spec, FLAX, "fsdp", {"data": 8})
    assert parts["electra.encoder.layer.0.intermediate.dense.weight"] == ("data", None)
    # The generator-head dense is (hidden, hidden)-like: the data axis is used at most once.
    for name, part in parts.items():
        assert part.count("data") <= 1, name


def test_indivisible_axes_stay_whole():
    spec = _electra(vocab_size=99, intermediate_size=37)
    parts = partitions(spec, FLAX, "tp", {"model": 4})
    assert parts["electra.embeddings.word_embeddings.weight"] == (None, None)
    assert parts["electra.encoder.layer.0.intermediate.dense.weight"] == (None, None)
    assert parts["electra.encoder.layer.0.attention.self.query.weight"] == (None, "model")


def test_per_device_bytes_and_the_xlm_roberta_xl_table():
    spec = _spec("xlm_roberta_xl", "Model")  # the 3.5B default config: shapes only
    whole = per_device_bytes(spec, FLAX, "dp", {"data": 8})
    assert whole == 4 * spec.num_parameters()
    rows = memory_table(spec, FLAX, {"fsdp": {"data": 8}, "tp": {"model": 8}, "fsdp+tp": {"data": 2, "model": 4}})
    for row in rows:
        # every rule set leaves each of 8 devices about an eighth (LayerNorms, biases of row-parallel
        # layers and position tables stay whole under tp)
        assert 0.125 <= row["fraction_of_model"] < 0.14, row
        assert row["devices"] == 8


def test_rule_sets_only_use_known_axes_and_bad_names_raise():
    assert set(RULE_SETS) == {"dp", "fsdp", "tp", "fsdp+tp"}
    for name in RULE_SETS:
        get_rules(name)
    with pytest.raises(ValueError, match="unknown rule set 'zero3'"):
        get_rules("zero3")
    with pytest.raises(ValueError, match="unknown logical axes"):
        get_rules({"width": "data"})
