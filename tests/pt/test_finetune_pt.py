"""Fine-tuning ergonomics in PyTorch (issue #20): new heads, config overrides, resizing, ecosystem hooks."""

from __future__ import annotations

import logging

import pytest
import torch

from nezha_zoo import ElectraConfig
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.pt import ElectraForSequenceClassification

CFG = ElectraConfig(
    vocab_size=40, embedding_size=8, hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
)


@pytest.fixture(scope="module")
def two_label_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_labels")
    torch.manual_seed(0)
    ElectraForSequenceClassification(CFG).save_pretrained(d)
    return d


def test_new_head_with_ignore_mismatched_sizes(two_label_dir, caplog):
    with pytest.raises(CheckpointError, match="ignore_mismatched_sizes=True"):
        ElectraForSequenceClassification.from_pretrained(two_label_dir, num_labels=3)
    old = ElectraForSequenceClassification.from_pretrained(two_label_dir)
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        new, info = ElectraForSequenceClassification.from_pretrained(
            two_label_dir, num_labels=3, ignore_mismatched_sizes=True, output_loading_info=True
        )
    assert "classifier.out_proj.weight (checkpoint (2, 12), model (3, 12))" in caplog.text
    assert info["mismatched_keys"] == [
        ("classifier.out_proj.weight", (2, 12), (3, 12)),
        ("classifier.out_proj.bias", (2,), (3,)),
    ]
    assert new.config.num_labels == 3 and new.classifier.out_proj.weight.shape == (3, 12)
    assert torch.all(new.classifier.out_proj.bias == 0)  # the spec's init: zero bias, N(0, 0.02) weight
    assert 0.005 < float(new.classifier.out_proj.weight.detach().std()) < 0.05
    for (name, a), b in zip(old.state_dict().items(), new.state_dict().values()):
        if not name.startswith("classifier.out_proj"):
            assert torch.equal(a, b), name  # the body is the pretrained one


def test_unknown_keyword_raises_type_error(two_label_dir):
    with pytest.raises(TypeError, match="'num_label'.*did you mean 'num_labels'"):
        ElectraForSequenceClassification.from_pretrained(two_label_dir, num_label=3)
    with pytest.raises(TypeError, match="does not take 'device_map'"):
        ElectraForSequenceClassification.from_pretrained(two_label_dir, device_map="auto")
