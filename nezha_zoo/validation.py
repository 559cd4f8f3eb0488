"""Input checks shared by the backends (SPEC.md §6): clear errors before any framework op fails.

Backends pass shapes (and, where values are concrete, the min/max of id tensors); the checks and the
wording live here once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["InputError", "check_input_shapes", "check_id_range", "check_length"]

Shape = Sequence[int | None]


class InputError(ValueError):
    """Model inputs that cannot be right: wrong shapes, ids outside the vocabulary, too long."""


def check_input_shapes(
    input_shape: Shape | None,
    embeds_shape: Shape | None,
    others: Mapping[str, Shape | None],
    hidden_size: int | None = None,
    rank: int = 2,
) -> tuple[int | None, ...]:
    """Check ``input_ids``/``inputs_embeds`` exclusivity and that every other input matches.

    Args:
        input_shape: shape of ``input_ids`` or None.
        embeds_shape: shape of ``inputs_embeds`` or None.
        others: name -> shape of inputs that must equal the ids' shape (``attention_mask``...).
        hidden_size: expected last dim of ``inputs_embeds``.
        rank: rank of ``input_ids`` (2, or 3 for multiple choice).

    Returns:
        The ``(batch, seq_len[, ...])`` shape of the ids.
    """
    if input_shape is not None and embeds_shape is not None:
        raise InputError("give either input_ids or inputs_embeds, not both")
    if input_shape is None and embeds_shape is None:
        raise InputError("give input_ids or inputs_embeds")
    if input_shape is not None:
        shape = tuple(input_shape)
        if len(shape) != rank:
            raise InputError(f"input_ids must have rank {rank}, got shape {shape}")
    else:
        eshape = tuple(embeds_shape)  # type: ignore[arg-type]
        if len(eshape) != rank + 1:
            raise InputError(f"inputs_embeds must have rank {rank + 1}, got shape {eshape}")
        if hidden_size is not None and eshape[-1] is not None and eshape[-1] != hidden_size:
            raise InputError(f"inputs_embeds last dimension must be {hidden_size}, got shape {eshape}")
        shape = eshape[:-1]
    for name, s in others.items():
        if s is None:
            continue
        s = tuple(s)
        if len(s) != len(shape) or any(a is not None and b is not None and a != b for a, b in zip(s, shape)):
            raise InputError(f"{name} has shape {s}, but the ids have shape {shape}")
    return shape


def check_id_range(name: str, lo: int, hi: int, size: int, what: str = "vocabulary") -> None:
    """Ids must lie in ``[0, size)``."""
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise InputError(f"{name} contains id {bad}, outside the {what} [0, {size})")


def check_length(seq_len: int | None, past_len: int, limit: int, what: str = "max_position_embeddings") -> None:
    """Positions ``past_len .. past_len + seq_len - 1`` must fit a table of ``limit`` rows."""
    if seq_len is not None and past_len + seq_len > limit:
        raise InputError(
            f"sequence of length {seq_len}"
            + (f" after {past_len} cached positions" if past_len else "")
            + f" exceeds the model's {what} ({limit})"
        )
