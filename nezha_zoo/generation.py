"""Framework-neutral half of text generation: the settings, their validation, prompt checks, and
the position-id rules of left-padded prompts.

Each backend (``nezha_zoo.{pt,tf,flax}.generation``) has a ``GenerationMixin`` whose ``generate``
resolves a :class:`GenerationConfig` here, checks the prompt with :func:`check_prompt` and runs its
own loop.  Numpy only.

Output contract of every backend: ``(B, P + n)`` ids, the prompt (with its left padding) first, then
``n`` new tokens, ``n <= max_new_tokens``; the loop stops early once every row has emitted an
``eos_token_id``, and a finished row holds ``pad_token_id`` after its eos.  Compiled loops (TF, Flax)
fill a fixed ``(B, P + max_new_tokens)`` buffer and return the count; the wrapper slices it, so the
shapes agree across backends.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "GenerationConfig",
    "POSITION_RULES",
    "check_prompt",
    "max_generation_length",
    "position_offsets",
    "prompt_position_ids",
    "resolve_generation_config",
]

#: How a class with learned absolute positions numbers the tokens of a left-padded row, so that it
#: generates what the same prompt generates unpadded (declared per class as
#: ``generation_position_rule``; ``None``: the model takes no position ids, e.g. MPT's ALiBi):
#:
#: * ``"cumsum"`` (Electra, BERT-style ``arange`` positions): ``cumsum(mask) - 1``, pads at 0;
#: * ``"padding_aware"`` (RoBERTa-style, XLM-R-XL): ``cumsum(mask) + pad_token_id``, pads at
#:   ``pad_token_id`` (transformers' ``create_position_ids_from_input_ids``).
POSITION_RULES = ("cumsum", "padding_aware")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (transformers' names and meanings).

    Args:
        max_new_tokens (int): at most this many tokens are appended to the prompt (>= 1).
        do_sample (bool): sample from the processed distribution; False: greedy (argmax, ties to the
            lowest token id; temperature/top-k/top-p are then not applied).
        temperature (float): logits are divided by it before top-k/top-p (> 0).
        top_k (int): keep the ``top_k`` highest logits (ties at the k-th value kept); 0 = off.
        top_p (float): nucleus filtering: keep the smallest set of most likely tokens whose
            probability reaches ``top_p`` (at least one token); 1.0 = off.  In (0, 1].
        seed (int | None): seeds the sampler (same seed, same tokens within a backend); None draws
            a fresh seed.  Non-negative, below 2**31.
        eos_token_id (int | tuple[int, ...] | None): token id(s) that finish a row.
        pad_token_id (int | None): what a finished row receives after its eos.

    Raises:
        ValueError / TypeError naming the field, for out-of-range or wrongly typed values.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens):
            raise TypeError(f"max_new_tokens must be an int, got {type(self.max_new_tokens).__name__}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise TypeError(f"do_sample must be a bool, got {type(self.do_sample).__name__}")
        if not _is_number(self.temperature):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if not (float(self.temperature) > 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be an int (0 = off), got {type(self.top_k).__name__}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not _is_number(self.top_p):
            raise TypeError(f"top_p must be a number, got {type(self.top_p).__name__}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
            if not 0 <= self.seed < 2**31:
                raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")
        eos = self.eos_token_id
        if eos is not None:
            ids = (eos,) if _is_int(eos) else tuple(eos) if isinstance(eos, (list, tuple)) else None
            if ids is None or not ids or not all(_is_int(i) for i in ids):
                raise TypeError(f"eos_token_id must be an int, a non-empty sequence of ints, or None, got {eos!r}")
            if any(i < 0 for i in ids):
                raise ValueError(f"eos_token_id must be >= 0, got {eos!r}")
            object.__setattr__(self, "eos_token_id", int(ids[0]) if len(ids) == 1 else tuple(int(i) for i in ids))
        if self.pad_token_id is not None:
            if not _is_int(self.pad_token_id):
                raise TypeError(f"pad_token_id must be an int or None, got {type(self.pad_token_id).__name__}")
            if self.pad_token_id < 0:
                raise ValueError(f"pad_token_id must be >= 0, got {self.pad_token_id}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "do_sample", bool(self.do_sample))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when None)."""
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if _is_int(self.eos_token_id) else tuple(self.eos_token_id)

    @classmethod
    def from_model_config(cls, config: Any, **overrides: Any) -> GenerationConfig:
        """Defaults from a model config: its ``eos_token_id`` and ``pad_token_id`` (as transformers).

        ``overrides`` (non-None values) replace fields; unknown names raise ``TypeError``.
        """
        base = cls(
            eos_token_id=getattr(config, "eos_token_id", None),
            pad_token_id=getattr(config, "pad_token_id", None),
        )
        return base.replace(**overrides)

    def replace(self, **overrides: Any) -> GenerationConfig:
        """A copy with the non-None ``overrides`` applied (validated again)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown generation settings {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def with_model_defaults(self) -> GenerationConfig:
        """Fill ``pad_token_id`` from the first eos when it is unset (transformers does the same)."""
        if self.pad_token_id is None and self.eos_ids:
            return dataclasses.replace(self, pad_token_id=self.eos_ids[0])
        return self


def resolve_generation_config(
    model_config: Any, generation_config: GenerationConfig | None, **overrides: Any
) -> GenerationConfig:
    """The settings a ``generate`` call runs with.

    ``generation_config`` (default: :meth:`GenerationConfig.from_model_config`) with the non-None
    keyword ``overrides`` applied, then ``pad_token_id`` defaulted to the first eos.
    """
    if generation_config is None:
        gc = GenerationConfig.from_model_config(model_config, **overrides)
    elif isinstance(generation_config, GenerationConfig):
        gc = generation_config.replace(**overrides)
    else:
        raise TypeError(f"generation_config must be a GenerationConfig or None, got {type(generation_config).__name__}")
    return gc.with_model_defaults()


def check_prompt(
    input_ids: Any,
    attention_mask: Any,
    vocab_size: int,
    max_new_tokens: int,
    max_length: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prompt before any framework op; returns ``(ids, mask)`` as int32 numpy (B, P).

    Args:
        input_ids: (B, P) integer ids (numpy, list, or any tensor with ``numpy()``/``__array__``).
        attention_mask: (B, P) 0/1 or None (all ones).  Padding must be on the left: each row is
            zeros then ones, with at least one token.
        vocab_size (int): ids must lie in ``[0, vocab_size)``.
        max_new_tokens (int): tokens to be appended.
        max_length (int | None): the longest sequence the model takes (prompt + new tokens).

    Raises:
        ValueError / TypeError naming the argument.
    """
    ids = _as_array(input_ids, "input_ids")
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (batch, prompt_length) with both >= 1, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the vocabulary), got [{ids.min()}, {ids.max()}]")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = _as_array(attention_mask, "attention_mask")
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.astype(np.int32)
        if (mask[:, -1] == 0).any() or (np.diff(mask, axis=1) < 0).any():
            raise ValueError(
                "attention_mask must be left-padded for generation: each row zeros then ones, ending with a token"
            )
    total = ids.shape[1] + max_new_tokens
    if max_length is not None and total > max_length:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds the "
            f"model's maximum sequence length {max_length}"
        )
    return ids.astype(np.int32), mask


def _as_array(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise TypeError(f"{name} is required")
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tf
        x = x.numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # noqa: BLE001  (anything not array-like)
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}") from err


def position_offsets(rule: str | None, model_config: Any) -> tuple[int, int] | None:
    """``(offset, pad_value)`` of a position rule: a real token's position is ``cumsum(mask) +
    offset`` (the running count of real tokens up to and including it, plus ``offset``) and a pad's is
    ``pad_value``; ``None`` for ``rule=None`` (no position ids)."""
    if rule is None:
        return None
    if rule == "cumsum":
        return -1, 0
    if rule == "padding_aware":
        pad = getattr(model_config, "pad_token_id", None)
        if pad is None:
            raise ValueError("padding-aware positions need config.pad_token_id")
        return int(pad), int(pad)
    raise ValueError(f"unknown position rule {rule!r}; known: {POSITION_RULES} or None")


def prompt_position_ids(mask: np.ndarray, rule: str | None, model_config: Any) -> np.ndarray | None:
    """Reference (numpy) position ids of a left-padded prompt: (B, P) int32, or None."""
    offsets = position_offsets(rule, model_config)
    if offsets is None:
        return None
    offset, pad_value = offsets
    mask = np.asarray(mask, np.int32)
    return np.where(mask == 1, np.cumsum(mask, axis=1) + offset, pad_value).astype(np.int32)


def max_generation_length(model_config: Any, rule: str | None) -> int | None:
    """The longest sequence (prompt + new tokens) a model takes: ``max_seq_len`` (MPT),
    ``max_position_embeddings`` (minus ``pad_token_id + 1`` for padding-aware positions), or None."""
    seq = getattr(model_config, "max_seq_len", None)
    if seq is not None:
        return int(seq)
    mpe = getattr(model_config, "max_position_embeddings", None)
    if mpe is None:
        return None
    if rule == "padding_aware":
        return int(mpe) - int(model_config.pad_token_id) - 1
    return int(mpe)
