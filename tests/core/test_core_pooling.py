"""``nezha_zoo.spec.pooling.keeps_positions``: the one rule by which every backend's sequence-level head
decides to run its last layer at the pooled positions only (issue #23)."""

from __future__ import annotations

import pytest

from nezha_zoo import ElectraConfig, IBertConfig, MptConfig
from nezha_zoo.spec.pooling import keeps_positions

ARGS = dict(input_ids=object(), output_hidden_states=None, output_attentions=None)


@pytest.mark.parametrize(
    "args, fields, cache, want",
    [
        ({}, {}, None, True),
        ({"output_hidden_states": True}, {}, None, False),
        ({"output_attentions": True}, {}, None, False),
        ({"output_attentions": False}, {"output_attentions": True}, None, True),  # the call's flag wins
        ({}, {"output_hidden_states": True}, None, False),  # None: the config's
        ({"encoder_hidden_states": object()}, {}, None, False),  # cross-attention
        ({"past_key_values": ()}, {}, None, False),
        ({}, {"is_decoder": True}, None, False),  # a decoder's base model caches by default
        ({}, {"is_decoder": True, "use_cache": False}, None, True),
        ({}, {"is_decoder": True}, False, True),  # the backend says there is no cache (Flax)
        ({}, {}, True, False),
    ],
)
def test_keeps_positions_follows_the_flags(args, fields, cache, want):
    assert keeps_positions({**ARGS, **args}, ElectraConfig(**fields), cache=cache) is want


def test_keeps_positions_reads_use_cache_and_quant_mode():
    assert keeps_positions({**ARGS, "use_cache": None}, MptConfig(use_cache=False))
    assert not keeps_positions({**ARGS, "use_cache": None}, MptConfig(use_cache=True))
    assert not keeps_positions({**ARGS, "use_cache": True}, MptConfig(use_cache=False))
    assert keeps_positions(ARGS, IBertConfig(quant_mode=False))
    assert not keeps_positions(ARGS, IBertConfig(quant_mode=True))
