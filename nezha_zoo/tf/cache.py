"""A fixed-size key/value cache for TensorFlow decoders: static shapes, so decoding compiles.

The growing cache (a ``(key, value)`` tuple per layer, concatenated each step) changes shape every
step and retraces under ``tf.function``.  :class:`KVCache` instead holds ``max_length`` slots and a
fill index; each call writes its new keys/values at ``index`` and advances it.  Slots not yet written
are zeros and must be masked: with a :class:`KVCache` the attention mask covers all ``max_length``
slots (1 = a real token already written or being written now, 0 = padding or an empty slot).

This mirrors the Flax backend's ``"cache"`` collection (``cached_key``, ``cached_value``,
``cache_index``), with the time axis at position 2 as in the growing TF cache.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

__all__ = [
    "KVCache",
    "init_kv_cache",
    "append_kv",
    "is_fixed_cache",
    "fixed_cache_index",
    "fixed_cache_length",
    "reorder_cache",
]


class KVCache(NamedTuple):
    """One attention layer's fixed-size cache.

    Attributes:
        key: (B, kv_heads, max_length, head_dim) keys, zeros in unwritten slots.
        value: (B, kv_heads, max_length, head_dim) values, zeros in unwritten slots.
        index: () int32, the number of slots written so far (the next write position).
    """

    key: tf.Tensor
    value: tf.Tensor
    index: tf.Tensor


def init_kv_cache(batch_size: int, kv_heads: int, max_length: int, head_dim: int, dtype=tf.float32) -> KVCache:
    """An empty cache of ``max_length`` slots."""
    zeros = tf.zeros((batch_size, kv_heads, max_length, head_dim), dtype=dtype)
    return KVCache(zeros, zeros, tf.constant(0, tf.int32))


def is_fixed_cache(past: object) -> bool:
    """Whether a layer's ``past_key_value`` is a :class:`KVCache` (not a growing ``(k, v)`` tuple)."""
    return isinstance(past, KVCache)


def fixed_cache_index(past_key_values: object) -> tf.Tensor | None:
    """The fill index of a model's cache (its first layer's), or None if it is not a fixed-size cache."""
    if past_key_values is None or len(past_key_values) == 0:
        return None
    first = past_key_values[0]
    return first.index if is_fixed_cache(first) else None


def fixed_cache_length(past_key_values: object) -> int | None:
    """The static slot count ``max_length`` of a model's fixed-size cache, or None."""
    if past_key_values is None or len(past_key_values) == 0 or not is_fixed_cache(past_key_values[0]):
        return None
    return int(past_key_values[0].key.shape[2])


def append_kv(cache: KVCache, key: tf.Tensor, value: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, KVCache]:
    """Write ``key``/``value`` (B, kv_heads, n, head_dim) at ``cache.index``.

    Returns the full (B, kv_heads, max_length, head_dim) keys and values to attend over, and the
    updated cache (index advanced by ``n``).  Writing past ``max_length`` raises in eager mode and
    under ``tf.function``; XLA (``jit_compile=True``) compiles assertions out, and rows past the last
    slot are then dropped, so compiled callers must size the cache for the whole sequence up front (as
    ``generate`` does from ``max_new_tokens``).
    """
    n = tf.shape(key)[2]
    max_length = tf.shape(cache.key)[2]
    tf.debugging.assert_less_equal(
        cache.index + n, max_length, message="KVCache: writing past the cache's max_length slots"
    )
    # A select over the time axis, not a scatter: the scatter wanted time first, and its two
    # transposes copied the whole cache twice per layer and step (XLA kept them too); the select
    # fuses into one pass, ~1.4x faster greedy decoding under XLA.  Pure data movement: exact.
    offset = tf.range(max_length) - cache.index  # (max_length,) slot - index
    written = tf.logical_and(offset >= 0, offset < n)[None, None, :, None]  # slots written now
    source = tf.clip_by_value(offset, 0, n - 1)  # which of the n new rows lands in each slot
    new_key = tf.where(written, tf.gather(tf.cast(key, cache.key.dtype), source, axis=2), cache.key)
    new_value = tf.where(written, tf.gather(tf.cast(value, cache.value.dtype), source, axis=2), cache.value)
    return new_key, new_value, KVCache(new_key, new_value, cache.index + n)


def reorder_cache(past_key_values: tuple[KVCache, ...], beam_idx: tf.Tensor) -> tuple[KVCache, ...]:
    """Rows of every layer's cache taken in the order ``beam_idx`` (R,) int32 (beam search: the
    row each surviving beam came from); the fill index is shared and kept."""
    return tuple(
        KVCache(tf.gather(layer.key, beam_idx, axis=0), tf.gather(layer.value, beam_idx, axis=0), layer.index)
        for layer in past_key_values
    )
