"""Framework-free family maths, written once in ``families/`` and ``spec/`` (numpy only).

Each rule is checked against an independent formula written here: Nezha's sinusoid table and its
clipped index, MPNet's T5 buckets (transformers' ``relative_position_bucket`` rule, scalar maths) and
its per-distance table, the RoBERTa padding-aware position ids, and the cross-attention names.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nezha_zoo.families.mpnet import MAX_DISTANCE, MPNetConfig, relative_bucket_table, relative_position_bucket
from nezha_zoo.families.nezha import relative_position_table
from nezha_zoo.outputs import IGNORE_INDEX
from nezha_zoo.spec.blocks import MPNET_NAMES, XLM_ROBERTA_XL_NAMES, BertLayerNames, cross_attention_names
from nezha_zoo.spec.positions import (
    padding_aware_max_length,
    padding_aware_position_ids,
    relative_position_index,
    sequential_position_ids,
)


@pytest.mark.parametrize("K,depth", [(3, 8), (0, 6), (16, 7), (64, 12)])
def test_nezha_table_is_the_interleaved_sinusoid(K, depth):
    table = relative_position_table(K, depth)
    assert table.shape == (2 * K + 1, depth) and table.dtype == np.float32
    want = np.zeros((2 * K + 1, depth))
    for p in range(2 * K + 1):
        for c in range(depth):
            w = math.exp((c - c % 2) * -math.log(10000.0) / depth)
            want[p, c] = math.sin(p * w) if c % 2 == 0 else math.cos(p * w)
    # float32 maths in transformers' order: within float32 rounding of |p * w| <= 2K
    np.testing.assert_allclose(table, want, rtol=0, atol=2e-7 * max(1, 2 * K))


def test_relative_index_clips_the_distance_and_shifts_it():
    K = 3
    index = relative_position_index(np.arange(4, 9), np.arange(12), K)  # queries at 4..8 (a cache of 4)
    assert index.shape == (5, 12)
    for i, q in enumerate(range(4, 9)):
        for j in range(12):
            assert index[i, j] == min(max(j - q, -K), K) + K
    assert index.min() == 0 and index.max() == 2 * K


def _t5_bucket(rel: int, num_buckets: int, max_distance: int = 128) -> int:
    """transformers' ``MPNetEncoder.relative_position_bucket`` for one distance, in scalar maths."""
    half = num_buckets // 2
    ret = half if rel > 0 else 0
    n = abs(rel)
    exact = half // 2
    if n < exact:
        return ret + n
    return ret + min(exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact)), half - 1)


@pytest.mark.parametrize("num_buckets", [8, 16, 32, 64])
def test_mpnet_buckets_follow_the_t5_rule(num_buckets):
    rel = np.arange(-400, 401)
    got = relative_position_bucket(rel, num_buckets)
    assert got.dtype == np.int32 and got.shape == rel.shape
    np.testing.assert_array_equal(got, [_t5_bucket(int(d), num_buckets) for d in rel])
    assert got.min() == 0 and got.max() == num_buckets - 1
    assert MAX_DISTANCE == 128


def test_mpnet_bucket_values_at_32():
    rel = np.array([0, -7, -8, -16, -127, -128, -1000, 1, 9])
    assert relative_position_bucket(rel, 32).tolist() == [0, 7, 8, 10, 15, 15, 15, 17, 24]
    assert relative_position_bucket(np.array([-5, 0, 5]), 2).tolist() == [0, 0, 1]  # one bucket per direction


@pytest.mark.parametrize("num_buckets", [4, 32, 100])
def test_mpnet_bucket_table_looked_up_by_the_index_rule_equals_the_buckets(num_buckets):
    config = MPNetConfig(max_position_embeddings=40, relative_attention_num_buckets=num_buckets)
    table = relative_bucket_table(config)
    span = config.max_position_embeddings
    assert table.shape == (2 * span + 1,)
    pos = np.arange(span - 2)  # the longest input
    rel = pos[None, :] - pos[:, None]
    np.testing.assert_array_equal(
        table[relative_position_index(pos, pos, span)], relative_position_bucket(rel, num_buckets)
    )


def test_padding_aware_positions_are_robertas():
    ids = np.array([[5, 6, 7, 8, 1, 1], [1, 1, 5, 6, 7, 8]])
    assert padding_aware_position_ids(ids, 1).tolist() == [[2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 5]]
    assert padding_aware_position_ids(ids, 1, past_len=3).tolist() == [[5, 6, 7, 8, 1, 1], [1, 1, 5, 6, 7, 8]]
    assert padding_aware_position_ids(np.array([[0, 4, 0]]), 0).tolist() == [[0, 1, 0]]
    assert sequential_position_ids(2, 4, 1).tolist() == [[2, 3, 4, 5]] * 2
    assert padding_aware_max_length(514, 1) == 512


def test_cross_attention_names_are_the_attention_names_under_crossattention():
    bert = cross_attention_names(BertLayerNames())
    assert (bert.self_attn, bert.attn_out, bert.attn_norm, bert.pre_attn_norm) == (
        "crossattention.self",
        "crossattention.output.dense",
        "crossattention.output.LayerNorm",
        None,
    )
    xl = cross_attention_names(XLM_ROBERTA_XL_NAMES)
    assert (xl.pre_attn_norm, xl.attn_norm) == ("crossattention.self_attn_layer_norm", None)
    mp = cross_attention_names(MPNET_NAMES)
    assert (mp.self_attn, mp.attn_out, mp.query) == ("crossattention.attn", "crossattention.attn.o", "q")
    assert bert.intermediate == "intermediate.dense"  # the feed-forward is not part of the block


def test_ignore_index_is_transformers():
    assert IGNORE_INDEX == -100
