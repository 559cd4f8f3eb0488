"""Input checks shared by the backends (SPEC.md §6): clear errors before any framework op fails.

Backends pass shapes (and, where values are concrete, the min/max of id tensors); the checks and the
wording live here once.

Compiled code (``jax.jit``, ``tf.function``, TF XLA) follows the same rules (docs/bad_input.md):
dtypes and static shapes are checked at trace time with these functions; values and dynamic shapes
are checked by ``tf.debugging`` asserts in TF graph mode (worded by :func:`id_range_message` and
:func:`length_message`); where nothing can raise (inside XLA, under ``jax.jit``) an example with an
id outside its table, or a batch longer than :func:`max_input_length`, gets NaN in every float
output (the other examples are unchanged), and each backend's ``checked`` wrapper raises instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "InputError",
    "check_input_shapes",
    "check_id_range",
    "check_length",
    "check_id_dtype",
    "id_range_message",
    "length_message",
    "max_input_length",
    "ID_INPUTS",
]

Shape = Sequence[int | None]


class InputError(ValueError):
    """Model inputs that cannot be right: wrong shapes, ids outside the vocabulary, too long."""

    # The base constructor (same behaviour as ValueError's): tf.function's autograph re-raises an error
    # from traced code under its own type only for such classes (others become a ``StagingError``).
    __init__ = Exception.__init__


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


#: The integer-id inputs and the config field that sizes each one's table (None: no table).
ID_INPUTS: tuple[tuple[str, str, str], ...] = (
    ("input_ids", "vocab_size", "vocabulary"),
    ("token_type_ids", "type_vocab_size", "token types"),
    ("position_ids", "max_position_embeddings", "positions"),
)


def check_id_dtype(name: str, dtype_name: str) -> None:
    """Ids must have an integer dtype: every backend casts ids to int, which would read 5.7 as 5.

    Args:
        name: the input's name (``"input_ids"``...).
        dtype_name: the dtype's name as the framework spells it (``"float32"``, ``"torch.int64"``).
    """
    base = str(dtype_name).rsplit(".", 1)[-1]
    if not base.startswith(("int", "uint")):
        raise InputError(f"{name} must be integers, got dtype {base} (ids are never rounded or truncated)")


def id_range_message(name: str, size: int, what: str = "vocabulary") -> str:
    """The error text of an id outside ``[0, size)`` when its value is not known (compiled asserts)."""
    return f"{name} contains an id outside the {what} [0, {size})"


def length_message(limit: int, what: str = "max_input_length") -> str:
    """The error text of a too-long input when the length is not known (compiled asserts)."""
    return f"sequence (cached positions included) exceeds the model's {what} ({limit})"


def max_input_length(config: object) -> int | None:
    """Longest input (cache included) the family's config allows; None: no limit (relative positions).

    Each family config states it (``PretrainedConfig.max_input_length``); the default is
    ``max_position_embeddings`` when the config has one.
    """
    return getattr(config, "max_input_length", getattr(config, "max_position_embeddings", None))


def check_length(seq_len: int | None, past_len: int, limit: int, what: str = "max_position_embeddings") -> None:
    """Positions ``past_len .. past_len + seq_len - 1`` must fit a table of ``limit`` rows."""
    if seq_len is not None and past_len + seq_len > limit:
        raise InputError(
            f"sequence of length {seq_len}"
            + (f" after {past_len} cached positions" if past_len else "")
            + f" exceeds the model's {what} ({limit})"
        )
