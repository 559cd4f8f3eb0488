"""Which positions of the last layer a sequence-level head reads (issue #23), framework-neutral.

A sequence-classification or multiple-choice head reads one position of the encoder's last layer:
the first (BERT's ``[CLS]``, RoBERTa's ``<s>``) or, for a causal model, each row's last non-padding
token (MPT).  Every other position of the last layer feeds nothing the head returns, so the last layer
can run its queries, attention output and feed-forward block at the read positions only; its keys and
values still cover every position.  For a 12-layer base model that is about 7% less work per step,
and the head's outputs (logits, loss) are the same sums.

Each backend's encoder takes the positions as ``positions_to_keep``: ``None`` (every position, the
default) or an integer tensor (B, R) of positions per row; the encoder's output is then (B, R, H).
Heads pass it only when :func:`can_keep_positions` says that nothing else reads the last layer; each
backend's head base class decides in one method, ``_pooled_positions(args, last_index=None)``, on
:func:`keeps_positions` of the head's call arguments.
Dropout in the pruned layer draws its mask at the full shape and keeps the rows it needs, so the
random stream, and with it every later draw, is the one the full computation consumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FIRST", "LAST_NON_PAD", "POOLING_RULES", "can_keep_positions", "keeps_positions"]

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


def keeps_positions(args: Mapping[str, Any], config: Any, *, cache: bool | None = None) -> bool:
    """Whether a sequence-level head's call may run the last layer at its pooled positions only.

    The one rule of the three backends' ``_pooled_positions``: :func:`can_keep_positions` of the call's
    flags, with cross-attention (``encoder_hidden_states`` given) also forbidding it.

    Args:
        args (Mapping[str, Any]): the head's call arguments (its ``locals()``).  ``output_hidden_states``
            and ``output_attentions`` that are None or absent take the config's value.
        config: the model's config (``quant_mode``: I-BERT's integer-only mode).
        cache (bool | None): whether the call reads or writes a key/value cache.  None: ``use_cache``
            of the call (None: the config's), else the config's for a decoder (``is_decoder``), or
            ``past_key_values`` given.

    Returns:
        bool: True when the head may pass ``positions_to_keep``.
    """

    def flag(name: str) -> bool:
        value = args.get(name)
        return bool(getattr(config, name, False)) if value is None else bool(value)

    if cache is None:
        if "use_cache" in args:
            cache = flag("use_cache")
        else:  # heads without the argument: their base model's default
            cache = bool(getattr(config, "is_decoder", False)) and bool(getattr(config, "use_cache", False))
        cache = cache or args.get("past_key_values") is not None
    return args.get("encoder_hidden_states") is None and can_keep_positions(
        output_hidden_states=flag("output_hidden_states"),
        output_attentions=flag("output_attentions"),
        use_cache=cache,
        quant_mode=bool(getattr(config, "quant_mode", False)),
    )
