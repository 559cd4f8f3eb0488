"""Framework-free position-id rules shared by several families, with numpy reference implementations.

RoBERTa-style *padding-aware* positions (transformers' ``create_position_ids_from_input_ids``; used by
XLM-RoBERTa-XL, I-BERT and MPNet): a padding token's position is ``padding_idx``; a real token's is
``padding_idx + past_len + (number of real tokens up to and including it in its row)``, so the first
real token of every row -- left-padded or not -- sits at ``padding_idx + 1 + past_len``::

    keep = (input_ids != padding_idx)
    position_ids = (cumsum(keep, axis=1) + past_len) * keep + padding_idx

With ``inputs_embeds`` the pads cannot be seen, so every row counts ``padding_idx + 1 ..``
(:func:`sequential_position_ids`, transformers' ``create_position_ids_from_inputs_embeds``).  Since the
position table has ``max_position_embeddings`` rows and real tokens start at ``padding_idx + 1``, the
longest input is :func:`padding_aware_max_length`.

Each backend's ``layers.py`` implements the same two rules under the same names
(``padding_aware_position_ids``, ``sequential_position_ids``) with its own tensors; the functions here
are the reference the tests compare them with.

Relative positions (Nezha's sinusoid table, MPNet's bucket table) index a per-distance table with
:func:`relative_position_index`, ``clip(j - i, -K, K) + K``, written once here and evaluated by each
backend with its own ops (so it works with traced positions and dynamic lengths).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "padding_aware_position_ids",
    "sequential_position_ids",
    "padding_aware_max_length",
    "relative_position_index",
]


def padding_aware_position_ids(input_ids: Any, padding_idx: int, past_len: int = 0) -> np.ndarray:
    """RoBERTa-style positions of ``input_ids`` (B, L) int: (B, L) int64 (the rule in the module doc).

    Args:
        input_ids: (B, L) integer ids (array-like).
        padding_idx (int): the padding token id, which is also the position table's padding row.
        past_len (int): cached positions before these tokens (decoding).
    """
    keep = (np.asarray(input_ids) != padding_idx).astype(np.int64)  # (B, L): 1 for real tokens
    return (np.cumsum(keep, axis=1) + past_len) * keep + padding_idx


def sequential_position_ids(batch: int, seq_len: int, padding_idx: int) -> np.ndarray:
    """Positions of ``inputs_embeds`` rows: ``padding_idx + 1 .. padding_idx + seq_len``, (batch, seq_len) int64."""
    row = np.arange(padding_idx + 1, padding_idx + 1 + seq_len, dtype=np.int64)
    return np.broadcast_to(row, (batch, seq_len)).copy()


def padding_aware_max_length(max_position_embeddings: int, padding_idx: int) -> int:
    """The longest padding-aware input: positions ``padding_idx + 1 .. max_position_embeddings - 1``."""
    return max_position_embeddings - padding_idx - 1


def relative_position_index(
    query_positions: Any, key_positions: Any, max_distance: int, clip: Callable[..., Any] = np.clip
) -> Any:
    """Row of a per-distance table for every (query, key) pair: ``clip(k_j - q_i, -K, K) + K``, (Lq, Lk).

    Query ``i`` sits at absolute position ``q_i`` (the cache length plus ``i`` when decoding), key
    ``j`` at ``k_j``; row ``p`` of the table encodes the distance ``p - K``, distances beyond ``K``
    share the end rows.  The positions are 1-D integer arrays of any array library that broadcasts
    with ``[None, :]``; ``clip`` is that library's ``clip(x, low, high)`` (``np.clip``, ``torch.clamp``,
    ``tf.clip_by_value``, ``jnp.clip``).

    Args:
        query_positions: (Lq,) int.
        key_positions: (Lk,) int.
        max_distance (int): ``K``.
        clip: the clipping function of the positions' array library.
    """
    distance = key_positions[None, :] - query_positions[:, None]  # (Lq, Lk): j - i
    return clip(distance, -max_distance, max_distance) + max_distance
