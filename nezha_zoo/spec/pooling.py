"""Which positions of the last layer a sequence-level head reads (issue #23), framework-neutral.

A sequence-classification or multiple-choice head reads one position of the encoder's last layer:
the first (BERT's ``[CLS]``, RoBERTa's ``<s>``) or, for a causal model, each row's last non-padding
token (MPT).  Every other position of the last layer feeds nothing the head returns, so the last layer
can run its queries, attention output and feed-forward block at the read positions only; its keys and
values still cover every position.  For a 12-layer base model that is about 7% less work per step,
and the head's outputs (logits, loss) are the same sums.

Each backend's encoder takes the positions as ``positions_to_keep``: ``None`` (every position, the
default) or an integer tensor (B, R) of positions per row; the encoder's output is then (B, R, H).
Heads pass it only when :func:`can_keep_positions` says that nothing else reads the last layer.
Dropout in the pruned layer draws its mask at the full shape and keeps the rows it needs, so the
random stream, and with it every later draw, is the one the full computation consumes.
"""

from __future__ import annotations

__all__ = ["FIRST", "LAST_NON_PAD", "POOLING_RULES", "can_keep_positions"]

#: The head reads position 0 of every row.
FIRST = "first"
#: The head reads each row's rightmost position whose id is not ``pad_token_id`` (transformers' causal
#: sequence classifiers; a row of only padding reads position 0).
LAST_NON_PAD = "last_non_pad"
#: Every pooling rule a head may declare.
POOLING_RULES = (FIRST, LAST_NON_PAD)


def can_keep_positions(
    *,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    use_cache: bool = False,
    quant_mode: bool = False,
) -> bool:
    """Whether a head may ask its encoder for the pooled positions of the last layer only.

    Args:
        output_hidden_states (bool): the caller asked for every layer's hidden states, the last one
            at every position.
        output_attentions (bool): the caller asked for every layer's attention probabilities, the last
            one for every query position.
        use_cache (bool): the caller asked for the keys and values of every layer (decoding).
        quant_mode (bool): I-BERT's integer-only mode, whose activation ranges are calibrated over every
            position of every layer in training.

    Returns:
        bool: True when none of them is asked for.
    """
    return not (output_hidden_states or output_attentions or use_cache or quant_mode)
