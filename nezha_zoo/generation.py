"""Framework-neutral half of text generation: the settings, their validation, prompt checks, and
the position-id rules of left-padded prompts.

Each backend (``nezha_zoo.{pt,tf,flax}.generation``) has a ``GenerationMixin`` whose ``generate``
resolves a :class:`GenerationConfig` here, checks the prompt with :func:`check_prompt`, turns the
length settings into a :class:`DecodingLengths` with :func:`decoding_lengths` and runs its own loop.
Numpy only.

Output contract of every backend: ``(B, P + n)`` ids, the prompt (with its left padding) first, then
``n`` new tokens, ``n <= max_new_tokens``; the loop stops early once every row has emitted an
``eos_token_id``, and a finished row holds ``pad_token_id`` after its eos.  Compiled loops (TF, Flax)
fill a fixed ``(B, P + max_new_tokens)`` buffer and return the count; the wrapper slices it, so the
shapes agree across backends.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import numpy as np

from nezha_zoo.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from nezha_zoo.validation import InputError

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DecodingLengths",
    "GENERATION_FUNCTIONS",
    "GenerationConfig",
    "as_streamer",
    "check_logits_to_keep",
    "check_streamer",
    "decoding_lengths",
    "effective_bad_words",
    "generate_outputs",
    "keep_last_positions",
    "POSITION_RULES",
    "check_prompt",
    "max_generation_length",
    "prepare_generation",
    "position_offsets",
    "prompt_position_ids",
    "resolve_generation_config",
]

#: The module-level functions every backend's ``generation`` module defines under these names (its
#: ``__all__`` adds the mixin): the sampling warpers and the logits processors.
GENERATION_FUNCTIONS = (
    "top_k_filter",
    "top_p_filter",
    "process_logits",
    "greedy_choice",
    "apply_repetition_penalty",
    "ban_repeated_ngrams",
    "ban_bad_words",
    "suppress_eos",
    "apply_processors",
)

#: How a class with learned absolute positions numbers the tokens of a left-padded row, so that it
#: generates what the same prompt generates unpadded (declared per class as
#: ``generation_position_rule``; ``None``: the model takes no position ids, e.g. MPT's ALiBi):
#:
#: * ``"cumsum"`` (Electra, BERT-style ``arange`` positions): ``cumsum(mask) - 1``, pads at 0;
#: * ``"padding_aware"`` (RoBERTa-style, XLM-R-XL): ``cumsum(mask) + pad_token_id``, pads at
#:   ``pad_token_id`` (transformers' ``create_position_ids_from_input_ids``).
POSITION_RULES = ("cumsum", "padding_aware")

#: New tokens a call decodes when neither ``max_new_tokens`` nor ``max_length`` is given.  (transformers
#: falls back to ``max_length=20`` in all, prompt included, and warns that it is a poor default; a
#: count of new tokens does not depend on the prompt's length.)
DEFAULT_MAX_NEW_TOKENS = 20


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int(value: Any, name: str, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_number(value: Any, name: str) -> None:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _token_sequences(value: Any, name: str) -> tuple[tuple[int, ...], ...]:
    """``[[ids...], ...]`` as a tuple of non-empty tuples of non-negative ints."""
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name} must be a non-empty list of lists of token ids, got {value!r}")
    out = []
    for seq in value:
        if not isinstance(seq, (list, tuple)) or not seq or not all(_is_int(i) for i in seq):
            raise TypeError(f"{name} entries must be non-empty lists of int token ids, got {seq!r}")
        if any(i < 0 for i in seq):
            raise ValueError(f"{name} holds a negative token id: {seq!r}")
        out.append(tuple(int(i) for i in seq))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings (transformers' names and meanings).

    Lengths (resolved against the prompt by :func:`decoding_lengths`):
        max_new_tokens (int | None): at most this many tokens are appended to the prompt (>= 1).
        max_length (int | None): at most this many tokens in all, prompt included.  Neither set:
            :data:`DEFAULT_MAX_NEW_TOKENS` new tokens.  Both set, they must agree for the prompt.
        min_new_tokens (int | None): eos is forbidden before this many new tokens (>= 0).
        min_length (int | None): eos is forbidden before the sequence, prompt included, is this
            long (>= 0).  Both min settings set, they must agree for the prompt.

    Choosing tokens:
        do_sample (bool): sample from the processed distribution; False: greedy or beam search
            (argmax, ties to the lowest token id; temperature/top-k/top-p are then not applied).
        temperature (float): logits are divided by it before top-k/top-p (> 0).
        top_k (int): keep the ``top_k`` highest logits (ties at the k-th value kept); 0 = off.
        top_p (float): nucleus filtering: keep the smallest set of most likely tokens whose
            probability reaches ``top_p`` (at least one token); 1.0 = off.  In (0, 1].
        seed (int | None): seeds the sampler (same seed, same tokens within a backend); None draws
            a fresh seed.  Non-negative, below 2**31.

    Beam search (``num_beams > 1``, ``do_sample=False``):
        num_beams (int): beams per prompt row (>= 1; 1 = no beam search).
        length_penalty (float): a finished hypothesis scores ``sum_logprobs / length **
            length_penalty`` (length: its generated tokens); > 0 favours longer ones.
        early_stopping (bool | "never"): True: a row is done once it holds ``num_beams`` finished
            hypotheses; False: also once no running beam can still beat the worst of them
            (estimated at the current length); "never": only when that holds at the best possible
            length (the canonical beam-search stop).
        num_return_sequences (int): hypotheses returned per prompt row, best first (<= num_beams
            under beam search; under sampling, independent samples; 1 under greedy decoding).

    Logits processors (transformers' order: repetition penalty, n-gram ban, bad words, min length):
        repetition_penalty (float): scores of tokens already in the sequence (prompt included) are
            divided by it when positive and multiplied when negative (> 0; 1.0 = off).
        no_repeat_ngram_size (int): no n-gram of this size occurs twice in a sequence (0 = off).
        bad_words_ids (tuple[tuple[int, ...], ...] | None): token sequences never generated: a
            one-token entry is banned always, a longer one when the sequence ends with its prefix.

    Stopping and outputs:
        eos_token_id (int | tuple[int, ...] | None): token id(s) that finish a row.
        pad_token_id (int | None): what a finished row receives after its eos.
        return_dict_in_generate (bool): return a ``GenerateDecoderOnlyOutput`` (beam search:
            ``GenerateBeamDecoderOnlyOutput``) instead of the ids alone.
        output_scores (bool): with ``return_dict_in_generate``, the processed scores of each step.
        output_logits (bool): with ``return_dict_in_generate``, the raw logits of each step.

    Raises:
        ValueError / TypeError naming the field, for out-of-range, wrongly typed or contradictory
        values.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    min_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False

    def __post_init__(self) -> None:
        _check_int(self.max_new_tokens, "max_new_tokens", low=1, optional=True)
        _check_int(self.max_length, "max_length", low=1, optional=True)
        _check_int(self.min_new_tokens, "min_new_tokens", low=0, optional=True)
        _check_int(self.min_length, "min_length", low=0, optional=True)
        if self.max_new_tokens is not None and self.min_new_tokens is not None:
            if self.min_new_tokens > self.max_new_tokens:
                raise ValueError(
                    f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
                )
        if self.max_length is not None and self.min_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) exceeds max_length ({self.max_length})")
        for flag in ("do_sample", "return_dict_in_generate", "output_scores", "output_logits"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise TypeError(f"{flag} must be a bool, got {type(getattr(self, flag)).__name__}")
            object.__setattr__(self, flag, bool(getattr(self, flag)))
        _check_number(self.temperature, "temperature")
        if not float(self.temperature) > 0.0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        _check_int(self.top_k, "top_k (0 = off)", low=0)
        _check_number(self.top_p, "top_p")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.seed is not None:
            _check_int(self.seed, "seed", low=0)
            if self.seed >= 2**31:
                raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")
        _check_int(self.num_beams, "num_beams", low=1)
        _check_number(self.length_penalty, "length_penalty")
        if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
            raise ValueError(f'early_stopping must be True, False or "never", got {self.early_stopping!r}')
        if self.early_stopping != "never":
            object.__setattr__(self, "early_stopping", bool(self.early_stopping))
        _check_int(self.num_return_sequences, "num_return_sequences", low=1)
        if self.num_beams > 1:
            if self.do_sample:
                raise ValueError(
                    "beam sampling (num_beams > 1 with do_sample=True) is not supported; use "
                    "num_beams=1 to sample or do_sample=False for beam search"
                )
            if self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})"
                )
        elif self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                f"greedy decoding returns one sequence per row; num_return_sequences="
                f"{self.num_return_sequences} needs num_beams >= {self.num_return_sequences} or do_sample=True"
            )
        _check_number(self.repetition_penalty, "repetition_penalty")
        if not float(self.repetition_penalty) > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        _check_int(self.no_repeat_ngram_size, "no_repeat_ngram_size (0 = off)", low=0)
        if self.bad_words_ids is not None:
            object.__setattr__(self, "bad_words_ids", _token_sequences(self.bad_words_ids, "bad_words_ids"))
        eos = self.eos_token_id
        if eos is not None:
            ids = (eos,) if _is_int(eos) else tuple(eos) if isinstance(eos, (list, tuple)) else None
            if ids is None or not ids or not all(_is_int(i) for i in ids):
                raise TypeError(f"eos_token_id must be an int, a non-empty sequence of ints, or None, got {eos!r}")
            if any(i < 0 for i in ids):
                raise ValueError(f"eos_token_id must be >= 0, got {eos!r}")
            object.__setattr__(self, "eos_token_id", int(ids[0]) if len(ids) == 1 else tuple(int(i) for i in ids))
        _check_int(self.pad_token_id, "pad_token_id", low=0, optional=True)
        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def is_beam_search(self) -> bool:
        """True when ``num_beams > 1`` (beam search replaces greedy decoding)."""
        return self.num_beams > 1

    @property
    def rows_per_prompt(self) -> int:
        """Rows each prompt row becomes in the loop: ``num_beams`` under beam search, else
        ``num_return_sequences`` (transformers repeats each row in place: b -> b*R .. b*R + R - 1)."""
        return self.num_beams if self.is_beam_search else self.num_return_sequences

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
            hints = [
                f"{name!r} (did you mean {' or '.join(map(repr, close))}?)"
                if (close := difflib.get_close_matches(name, known, n=2))
                else repr(name)
                for name in unknown
            ]
            raise TypeError(f"unknown generation settings {', '.join(hints)}; known: {sorted(known)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def with_model_defaults(self) -> GenerationConfig:
        """Fill ``pad_token_id`` from the first eos when it is unset (transformers does the same)."""
        if self.pad_token_id is None and self.eos_ids:
            return dataclasses.replace(self, pad_token_id=self.eos_ids[0])
        return self


def effective_bad_words(gc: GenerationConfig) -> tuple[tuple[int, ...], ...]:
    """``gc.bad_words_ids`` without the one-token entries that are an eos id (transformers drops
    them, so that banning a word never forbids ending); empty when unset."""
    return tuple(w for w in gc.bad_words_ids or () if not (len(w) == 1 and w[0] in gc.eos_ids))


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


def check_logits_to_keep(logits_to_keep: Any, has_labels: bool) -> int:
    """Validate a causal LM's ``logits_to_keep`` (transformers' argument); returns it as an int.

    Args:
        logits_to_keep (int): run the LM head on the last this many positions only; 0 keeps all.
        has_labels (bool): the call computes a loss, which reads every position's logits.

    Raises:
        InputError: not an int >= 0 (a bool is not one), or not 0 with labels.
    """
    if not _is_int(logits_to_keep) or logits_to_keep < 0:
        raise InputError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
    if logits_to_keep and has_labels:
        raise InputError(f"logits_to_keep={logits_to_keep} with labels: the loss needs every position's logits")
    return int(logits_to_keep)


def keep_last_positions(hidden: Any, logits_to_keep: Any, labels: Any = None) -> Any:
    """The positions a causal LM's head runs on, by its ``logits_to_keep`` (every backend's helper).

    ``generate`` needs the logits of the last position only; at the prompt's forward pass the head
    over every position is the largest matmul of the call (a (B * P, H) x (H, vocab) product for
    one (B, H) x (H, vocab) row block), so the causal LMs take ``logits_to_keep=1`` there.  The
    slice is basic indexing, the same in torch, TensorFlow and JAX (all clamp ``-n`` to the
    length); ``logits_to_keep`` is a Python int, so it is static under ``tf.function``/``jax.jit``.

    Args:
        hidden: (B, L, H) final hidden states (a torch, TF or JAX array).
        logits_to_keep (int): keep the last this many positions; 0 (the default) keeps all of them.
        labels: the forward's ``labels`` (None when there are none); the loss needs ``logits_to_keep=0``.

    Returns:
        (B, min(L, logits_to_keep) or L, H): ``hidden`` itself for 0, else its last positions.

    Raises:
        InputError: as :func:`check_logits_to_keep`.
    """
    keep = check_logits_to_keep(logits_to_keep, labels is not None)
    return hidden if keep == 0 else hidden[:, -keep:]


def check_prompt(input_ids: Any, attention_mask: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prompt before any framework op; returns ``(ids, mask)`` as int32 numpy (B, P).

    Args:
        input_ids: (B, P) integer ids (numpy, list, or any tensor with ``numpy()``/``__array__``);
            ``B >= 1`` and ``P >= 1`` (an empty prompt is refused: these models have no BOS
            convention to start from).
        attention_mask: (B, P) 0/1 or None (all ones).  Padding must be on the left: each row is
            zeros then ones, with at least one token.
        vocab_size (int): ids must lie in ``[0, vocab_size)``.

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
    return ids.astype(np.int32), mask


@dataclasses.dataclass(frozen=True)
class DecodingLengths:
    """How many tokens a call appends: at least ``min_new_tokens`` before an eos may end a row, at
    most ``max_new_tokens`` (>= 1)."""

    min_new_tokens: int
    max_new_tokens: int


def decoding_lengths(gc: GenerationConfig, prompt_length: int, context_length: int | None) -> DecodingLengths:
    """Resolve ``gc``'s length settings for a prompt of ``prompt_length`` tokens.

    Args:
        gc: the settings (``max_new_tokens`` / ``max_length``, ``min_new_tokens`` / ``min_length``).
        prompt_length (int): P, the prompt's columns (left padding included, as in transformers).
        context_length (int | None): the longest sequence the model takes (None: unbounded); see
            :func:`max_generation_length`.

    Raises:
        ValueError: ``max_length`` leaves no room after the prompt; ``max_length`` and
            ``max_new_tokens`` (or the two min settings) disagree for this prompt; the prompt fills
            or exceeds the model's context; prompt plus new tokens exceed it.
    """
    max_new = gc.max_new_tokens
    if gc.max_length is not None:
        if gc.max_length <= prompt_length:
            raise ValueError(
                f"max_length={gc.max_length} leaves no room for new tokens after the prompt of length "
                f"{prompt_length}; use max_new_tokens (tokens after the prompt) or a larger max_length"
            )
        if max_new is not None and prompt_length + max_new != gc.max_length:
            raise ValueError(
                f"conflicting lengths: max_new_tokens={max_new} after a prompt of length {prompt_length} gives "
                f"{prompt_length + max_new} tokens, but max_length={gc.max_length}; pass only one of them"
            )
        max_new = gc.max_length - prompt_length
    if max_new is None:
        max_new = DEFAULT_MAX_NEW_TOKENS
    min_new = gc.min_new_tokens
    if gc.min_length is not None:
        from_length = max(gc.min_length - prompt_length, 0)
        if min_new is not None and min_new != from_length:
            raise ValueError(
                f"conflicting lengths: min_new_tokens={min_new} but min_length={gc.min_length} after a prompt of "
                f"length {prompt_length} means {from_length} new tokens; pass only one of them"
            )
        min_new = from_length
    min_new = 0 if min_new is None else min_new
    if min_new > max_new:
        raise ValueError(f"at least {min_new} new tokens are required but at most {max_new} may be generated")
    if context_length is not None:
        if prompt_length >= context_length:
            raise ValueError(
                f"the prompt ({prompt_length} tokens) leaves no room in the model's context of {context_length} "
                "tokens; shorten it"
            )
        if prompt_length + max_new > context_length:
            raise ValueError(
                f"prompt length {prompt_length} + max_new_tokens {max_new} = {prompt_length + max_new} exceeds the "
                f"model's maximum sequence length {context_length}"
            )
    return DecodingLengths(min_new_tokens=min_new, max_new_tokens=max_new)


def prepare_generation(
    model_config: Any,
    rule: str | None,
    generation_config: GenerationConfig | None,
    input_ids: Any,
    attention_mask: Any,
    **overrides: Any,
) -> tuple[GenerationConfig, np.ndarray, np.ndarray]:
    """Everything a backend's ``generate`` checks before its first framework op, in one place.

    Resolves the settings (:func:`resolve_generation_config`), checks the prompt
    (:func:`check_prompt`), the token ids the settings name (eos, pad, bad words: inside the
    vocabulary) and the lengths (:func:`decoding_lengths`).

    Returns:
        ``(gc, ids, mask)``: ``gc`` with concrete ``max_new_tokens`` and ``min_new_tokens`` for
        this prompt (``max_length``/``min_length`` cleared), ``ids`` and ``mask`` int32 (B, P).
    """
    gc = resolve_generation_config(model_config, generation_config, **overrides)
    vocab_size = int(model_config.vocab_size)
    ids, mask = check_prompt(input_ids, attention_mask, vocab_size)
    named = [("eos_token_id", i) for i in gc.eos_ids] + [("pad_token_id", gc.pad_token_id)]
    named += [("bad_words_ids", i) for seq in gc.bad_words_ids or () for i in seq]
    for name, token in named:
        if token is not None and token >= vocab_size:
            raise ValueError(f"{name} holds {token}, outside the vocabulary [0, {vocab_size})")
    lengths = decoding_lengths(gc, ids.shape[1], max_generation_length(model_config, rule))
    gc = dataclasses.replace(
        gc,
        max_new_tokens=lengths.max_new_tokens,
        min_new_tokens=lengths.min_new_tokens,
        max_length=None,
        min_length=None,
    )
    return gc, ids, mask


class _CallbackStreamer:
    """``put``/``end`` around a plain callable (called with whatever ``put`` receives: the prompt, then
    each new column)."""

    def __init__(self, callback: Any) -> None:
        self._callback = callback

    def put(self, value: np.ndarray) -> None:
        self._callback(value)

    def end(self) -> None:
        pass


def as_streamer(streamer: Any) -> Any:
    """A streamer with transformers' protocol, or None.

    ``streamer`` may be None, an object with ``put(value)`` and ``end()`` (transformers'
    ``BaseStreamer``, e.g. its ``TextStreamer``), or a callable, which receives what ``put``
    receives.  Every backend calls ``put`` once with the prompt ids (B, P) and then once per step
    with the new tokens (rows,), as int32 numpy arrays, and ``end()`` after the last one (rows:
    B, or B * num_return_sequences when sampling several sequences per prompt).
    """
    if streamer is None:
        return None
    if callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None)):
        return streamer
    if callable(streamer):
        return _CallbackStreamer(streamer)
    raise TypeError(f"streamer must have put()/end() or be callable, got {type(streamer).__name__}")


def check_streamer(streamer: Any, gc: GenerationConfig) -> Any:
    """:func:`as_streamer`, refusing a streamer with beam search (``ValueError``, as transformers).

    Returns None or an object with ``put``/``end``; the backend then puts the prompt (B, P) once,
    each new column (B * num_return_sequences,) per step, and calls ``end()``.
    """
    if streamer is not None and gc.is_beam_search:
        raise ValueError("a streamer cannot be used with beam search (num_beams > 1), as in transformers")
    return as_streamer(streamer)


def generate_outputs(
    gc: GenerationConfig,
    prompt_len: int,
    sequences: Any,
    steps: int,
    scores: Any = None,
    logits: Any = None,
    sequences_scores: Any = None,
    beam_indices: Any = None,
    generated: int | None = None,
) -> Any:
    """What every backend's ``generate`` returns, from its loop's (possibly fixed-size) buffers.

    Works on any backend's tensors (only slicing and indexing).

    Args:
        gc: the settings of the call.
        prompt_len (int): P.
        sequences: (rows, >= P + n) ids.
        steps (int): loop iterations run (the length of ``scores``/``logits``).
        scores, logits: None or a buffer/list whose first ``steps`` entries are (rows', V) tensors;
            kept when ``return_dict_in_generate`` and ``output_scores`` / ``output_logits``.
        sequences_scores: beam search: (rows,) final hypothesis scores.
        beam_indices: beam search: (rows, >= n) source beam per new token, -1 after the end.
        generated (int | None): beam search: new tokens of the longest returned hypothesis;
            default counted from ``beam_indices`` (which must then convert to numpy).

    Returns:
        ``sequences[:, :P + n]`` (greedy/sampling: ``n = steps``), or with
        ``return_dict_in_generate`` a ``GenerateDecoderOnlyOutput`` / ``GenerateBeamDecoderOnlyOutput``.
    """

    def per_step(buffer: Any, flag: bool) -> tuple | None:
        return None if buffer is None or not flag else tuple(buffer[i] for i in range(steps))

    if not gc.is_beam_search:
        sequences = sequences[:, : prompt_len + steps]
        if not gc.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(
            sequences=sequences, scores=per_step(scores, gc.output_scores), logits=per_step(logits, gc.output_logits)
        )
    if generated is None:  # the longest returned hypothesis: its tokens have a source beam, the rest -1
        generated = int(np.max(np.sum(np.asarray(beam_indices) >= 0, axis=1)))
    sequences = sequences[:, : prompt_len + generated]
    if not gc.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=sequences_scores if gc.output_scores else None,
        scores=per_step(scores, gc.output_scores),
        logits=per_step(logits, gc.output_logits),
        beam_indices=beam_indices[:, :generated],
    )


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
