"""Text generation for the Flax causal LMs: the whole decoding loop under one ``jax.jit``.

The prompt is run once through a fixed-size cache of ``P + max_new_tokens`` slots (the wrapper's
``init_cache``), then a ``lax.while_loop`` appends one token per iteration with static shapes:
greedy, sampling and beam search alike.  Ids so far live in a fixed ``(rows, P + max_new_tokens)``
buffer whose unfilled columns hold -1; the processors below take that buffer plus ``length`` (the
filled columns).  The loop stops when every row is done (or after ``max_new_tokens``); the compiled
function returns the fixed buffers and the step count, and :meth:`FlaxGenerationMixin.generate`
slices them like the other backends.

Semantics are transformers' PyTorch ``generate`` (4.57): the logits processors in its order
(repetition penalty, n-gram ban, bad words, min new tokens), then, when sampling, the warpers
(temperature, top-k, top-p); beam search is its static-shape algorithm (``2 * num_beams``
candidates or more with several eos ids, finished hypotheses kept in fixed buffers).

A causal-LM wrapper class lists :class:`FlaxGenerationMixin` as its first base and declares
``generation_position_rule`` (see :data:`nezha_zoo.generation.POSITION_RULES`).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from nezha_zoo.generation import (
    GENERATION_FUNCTIONS,
    GenerationConfig,
    check_streamer,
    effective_bad_words,
    generate_outputs,
    position_offsets,
    prepare_generation,
)

__all__ = ["FlaxGenerationMixin", *GENERATION_FUNCTIONS]

_NEG_INF = float("-inf")
#: transformers' "impossible" beam score (added, not -inf, so that sums stay ordered).
_BEAM_MASK = -1.0e9


def _divide(x: jax.Array, divisor: Any) -> jax.Array:
    """``x / divisor`` rounded as PyTorch does.  XLA on CPU turns a division by a broadcast scalar
    into a multiplication by its reciprocal (1 ulp off); the barrier keeps it a true division."""
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape))


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Set logits below the ``top_k``-th largest of their row to -inf (ties kept); (B, V) -> (B, V)."""
    k = min(max(int(top_k), 1), logits.shape[-1])
    # The k-th value as a masked max over all k values, not `values[..., -1:]`: XLA folds that
    # slice into the top-k and then lowers it to a full sort of the row (40x slower on CPU at
    # B=8, V=30522); read whole, the top-k stays XLA's partial-selection TopK.  Exact.
    values = jax.lax.top_k(logits, k)[0]  # (B, k) descending
    kth = jnp.max(jnp.where(jnp.arange(k) == k - 1, values, _NEG_INF), axis=-1, keepdims=True)  # (B, 1)
    return jnp.where(logits < kth, _NEG_INF, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering as transformers' ``TopPLogitsWarper`` (``min_tokens_to_keep=1``): (B, V) -> (B, V)."""
    order = jnp.argsort(logits, axis=-1)  # ascending, stable
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cumulative <= (1.0 - top_p)
    remove = remove.at[..., -1].set(False)  # the most likely token always stays
    # Back to vocabulary order by scattering through the permutation (a second argsort cost a sort).
    remove = jnp.zeros_like(remove).at[jnp.arange(remove.shape[0])[:, None], order].set(remove)
    return jnp.where(remove, _NEG_INF, logits)


def process_logits(logits: jax.Array, gc: GenerationConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (transformers' warper order). (B, V) float32."""
    logits = logits.astype(jnp.float32)
    if gc.temperature != 1.0:
        logits = _divide(logits, gc.temperature)
    if gc.top_k > 0:
        logits = top_k_filter(logits, gc.top_k)
    if gc.top_p < 1.0:
        logits = top_p_filter(logits, gc.top_p)
    return logits


def greedy_choice(logits: jax.Array) -> jax.Array:
    """Argmax per row; ``jnp.argmax`` returns the first maximum, i.e. ties go to the lowest id. (B,) int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _token_mask(ids: jax.Array, vocab: int) -> jax.Array:
    """(R, V) bool: which tokens ``ids`` (R, W) holds per row; ids outside [0, V) count for nothing."""
    rows = ids.shape[0]
    ids = jnp.where((ids >= 0) & (ids < vocab), ids, vocab)  # out-of-range -> a spare column, dropped
    seen = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], ids].set(True)
    return seen[:, :vocab]


def apply_repetition_penalty(scores: jax.Array, sequences: jax.Array, penalty: float) -> jax.Array:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: the score of every token in ``sequences``
    (prompt included) is divided by ``penalty`` when positive, multiplied when negative.

    Args:
        scores: (R, V) float32.
        sequences: (R, T) int32 ids so far; negative ids (the unfilled columns of a fixed buffer)
            are ignored.
        penalty (float): > 0; 1.0 changes nothing.

    Returns:
        (R, V) float32.
    """
    seen = _token_mask(sequences, scores.shape[-1])
    return jnp.where(seen, jnp.where(scores < 0, scores * penalty, _divide(scores, penalty)), scores)


def ban_repeated_ngrams(scores: jax.Array, sequences: jax.Array, length: Any, n: int) -> jax.Array:
    """transformers' ``NoRepeatNGramLogitsProcessor``: a token that would complete an ``n``-gram
    already present in the sequence (prompt included) gets -inf.

    Args:
        scores: (R, V) float32.
        sequences: (R, T) int32; the first ``length`` columns are the ids so far.
        length: int or int32 scalar (traced in compiled loops), ``1 <= length <= T``.
        n (int): the n-gram size (>= 1).

    Returns:
        (R, V) float32.
    """
    width = sequences.shape[1]
    if n > width:
        return scores
    starts = width - n + 1
    windows = jnp.stack([sequences[:, j : starts + j] for j in range(n)], axis=-1)  # (R, S, n)
    # The last n - 1 ids (dynamic_slice clamps the start; the `length + 1 >= n` test below covers it).
    tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.asarray(length) - (n - 1), n - 1, axis=1)  # (R, n-1)
    match = jnp.all(windows[:, :, :-1] == tail[:, None, :], axis=-1)  # (R, S)
    inside = (jnp.arange(starts) + n <= length)[None, :]  # the n-gram lies in the filled columns
    ban = match & inside & (jnp.asarray(length) + 1 >= n)
    banned = _token_mask(jnp.where(ban, windows[:, :, -1], -1), scores.shape[-1])
    return jnp.where(banned, _NEG_INF, scores)


def ban_bad_words(scores: jax.Array, sequences: jax.Array, length: Any, bad_words_ids: Any) -> jax.Array:
    """transformers' ``NoBadWordsLogitsProcessor``: a one-token entry is banned always; a longer one
    bans its last token where the sequence ends with the rest (and the entry fits in ``length``).

    Args:
        scores: (R, V) float32.
        sequences: (R, T) int32; the first ``length`` columns are the ids so far.
        length: int or int32 scalar (traced in compiled loops).
        bad_words_ids (tuple[tuple[int, ...], ...]): the token sequences (see
            :func:`nezha_zoo.generation.effective_bad_words`).

    Returns:
        (R, V) float32.
    """
    banned = jnp.zeros(scores.shape, bool)
    for word in bad_words_ids:
        prefix, last = word[:-1], word[-1]
        if len(word) > sequences.shape[1]:
            continue  # can never fit
        if not prefix:
            hit = jnp.ones((scores.shape[0],), bool)
        else:
            tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.asarray(length) - len(prefix), len(prefix), axis=1)
            hit = jnp.all(tail == jnp.asarray(prefix, sequences.dtype)[None, :], axis=1) & (len(word) <= length)
        banned = banned.at[:, last].set(banned[:, last] | hit)
    return jnp.where(banned, _NEG_INF, scores)


def suppress_eos(scores: jax.Array, eos_ids: Any) -> jax.Array:
    """Give every eos id -inf (min new tokens not reached yet). (R, V) -> (R, V)."""
    return scores.at[:, jnp.asarray(tuple(eos_ids), jnp.int32)].set(_NEG_INF)


def apply_processors(scores: jax.Array, sequences: jax.Array, length: Any, step: Any, gc: GenerationConfig):
    """The logits processors ``gc`` asks for, in transformers' order: repetition penalty, n-gram ban,
    bad words, min new tokens (eos suppressed while ``step < gc.min_new_tokens``).

    Args:
        scores: (R, V) float32 raw logits (greedy, sampling) or log-probabilities (beam search).
        sequences: (R, T) int32 fixed buffer, the ids so far in its first ``length`` columns and -1
            after them.
        length: int32 scalar, the filled columns (prompt plus ``step``).
        step: int32 scalar, tokens generated so far.
        gc: the resolved settings (:func:`nezha_zoo.generation.prepare_generation`).

    Returns:
        (R, V) float32.
    """
    if gc.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences, gc.repetition_penalty)
    if gc.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, sequences, length, gc.no_repeat_ngram_size)
    words = effective_bad_words(gc)
    if words:
        scores = ban_bad_words(scores, sequences, length, words)
    if gc.min_new_tokens and gc.eos_ids:
        scores = jnp.where(step < gc.min_new_tokens, suppress_eos(scores, gc.eos_ids), scores)
    return scores


def _reorder_cache(cache: Any, order: jax.Array) -> Any:
    """Take rows ``order`` of every cache leaf with a batch axis (the ``cache_index`` scalars stay)."""
    return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else jnp.take(x, order, axis=0), cache)


class FlaxGenerationMixin:
    """``generate`` for a Flax causal-LM wrapper (``module``, ``params``, ``init_cache``, ``config``)."""

    #: ``"cumsum"``, ``"padding_aware"`` or None; every class declares it (no family checks).
    generation_position_rule: str | None

    def _generation_rule(self) -> str | None:
        try:
            return type(self).generation_position_rule
        except AttributeError:
            raise TypeError(
                f"{type(self).__name__} mixes in FlaxGenerationMixin but declares no generation_position_rule"
            ) from None

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: GenerationConfig | None = None,
        streamer: Any = None,
        params: Any = None,
        **settings: Any,
    ) -> Any:
        """Continue each prompt row under one ``jax.jit`` (greedy, sampling or beam search).

        Args:
            input_ids: (B, P) int prompt ids, left-padded in a batch (numpy, list or jax array).
            attention_mask: (B, P) 0/1, zeros on the left pads; default ones.
            generation_config (GenerationConfig | None): the base settings (default: from the
                model config's eos/pad ids).
            streamer: transformers' streamer protocol (``put``/``end``, e.g. ``TextStreamer``) or a
                callable: gets the prompt (B, P) once, then each new column (rows,) as int32 numpy,
                from an ordered host callback inside the compiled loop, then ``end()``.  Not with
                beam search (``ValueError``, as transformers).
            params: a params tree instead of ``self.params``.
            **settings: :class:`nezha_zoo.generation.GenerationConfig` fields overriding
                ``generation_config`` (``max_new_tokens``, ``num_beams``, ``repetition_penalty``,
                ...); an unknown name raises ``TypeError``.  Sampling draws from
                ``jax.random.PRNGKey(seed)`` (``seed=None``: a fresh random seed).

        Returns:
            ``jax.Array`` (rows, P + n) int32, the prompt then ``n <= max_new_tokens`` new tokens;
            ``rows = B * num_return_sequences`` (each prompt's sequences adjacent, best first under
            beam search).  Greedy/sampling stop once every row has emitted an eos, a finished row
            holding ``pad_token_id`` after it; beam search returns finished hypotheses, the shorter
            ones padded with ``pad_token_id`` (transformers pads with the first eos when
            ``pad_token_id`` is 0, a truthiness slip not copied here).  With
            ``return_dict_in_generate=True``: a ``GenerateDecoderOnlyOutput`` (``sequences``, and
            ``scores`` / ``logits``: n arrays (rows, V) with ``output_scores`` / ``output_logits``)
            or, under beam search, a ``GenerateBeamDecoderOnlyOutput`` (``sequences``,
            ``sequences_scores`` (rows,) with ``output_scores``, ``scores`` / ``logits`` n arrays
            (B * num_beams, V), ``beam_indices`` (rows, n') the flat beam each token came from, -1
            after a hypothesis ended).

        Raises:
            ValueError / TypeError from :func:`nezha_zoo.generation.prepare_generation` (settings,
            prompt, lengths), before any computation.

        One compilation per (rows, prompt length, settings); the seed is an input, not a key.
        """
        rule = self._generation_rule()
        gc, ids, mask = prepare_generation(self.config, rule, generation_config, input_ids, attention_mask, **settings)
        streamer = check_streamer(streamer, gc)
        prompt_len = ids.shape[1]
        expand = gc.rows_per_prompt
        rows_ids, rows_mask = np.repeat(ids, expand, axis=0), np.repeat(mask, expand, axis=0)
        # beam search runs the prompt once per prompt row (its K beams are alike until the first choice)
        cache = self.init_cache(
            ids.shape[0] if gc.is_beam_search else rows_ids.shape[0], prompt_len + gc.max_new_tokens
        )
        params = self.apply_lora(self.params) if params is None else params
        fn = self._compiled_generate(gc, rule, streamer is not None)
        sink = self.__dict__.setdefault("_generation_sink", [None])
        if streamer is not None:
            sink[0] = streamer
            streamer.put(ids)
        try:
            if gc.is_beam_search:
                out = fn(params, jnp.asarray(rows_ids), jnp.asarray(rows_mask), cache)
            else:
                key = jax.random.PRNGKey(gc.seed if gc.seed is not None else secrets.randbelow(2**31))
                out = fn(params, jnp.asarray(rows_ids), jnp.asarray(rows_mask), cache, key)
            if streamer is not None:
                jax.block_until_ready(out)
                jax.effects_barrier()  # every put() has run
                streamer.end()
        finally:
            sink[0] = None
        return _outputs(gc, prompt_len, out)

    def _compiled_generate(self, gc: GenerationConfig, rule: str | None, streaming: bool = False):
        """The jitted loop for these settings (cached on the instance; the seed is not part of the key)."""
        key = (dataclasses.replace(gc, seed=None), rule, streaming)
        compiled = self.__dict__.setdefault("_generate_fns", {})
        if key not in compiled:
            offsets = position_offsets(rule, self.config)
            emit = self._stream_column if streaming else None
            build = _beam_search if gc.is_beam_search else _decode
            compiled[key] = jax.jit(build(_forward_fn(self.module, offsets), gc, offsets, emit))
        return compiled[key]

    def _stream_column(self, tokens: Any) -> None:
        """Host side of the ordered callback: hand one new column to the active streamer."""
        streamer = self.__dict__.get("_generation_sink", [None])[0]
        if streamer is not None:
            streamer.put(np.asarray(tokens, np.int32))


def _forward_fn(module: Any, offsets: tuple[int, int] | None):
    """``forward(params, cache, tokens (R, L), positions (R, L) | None, mask (R, T))`` -> (last logits
    (R, V) float32, updated cache)."""

    def forward(params, cache, tokens, positions, mask):
        inputs = {"input_ids": tokens, "attention_mask": mask}
        if offsets is not None:
            inputs["position_ids"] = positions
        variables = {"params": params, "cache": cache}
        # logits_to_keep=1: the LM head on the last position only (the prompt's pass computes P of them)
        out, updated = module.apply(variables, **inputs, deterministic=True, mutable=["cache"], logits_to_keep=1)
        return out["logits"][:, -1, :].astype(jnp.float32), updated["cache"]

    return forward


def _prompt_positions(mask: jax.Array, offsets: tuple[int, int] | None) -> jax.Array | None:
    """(R, P) position ids of a left-padded prompt by the class's rule (None: no position ids)."""
    if offsets is None:
        return None
    offset, pad_value = offsets
    return jnp.where(mask == 1, jnp.cumsum(mask, axis=1) + offset, pad_value).astype(jnp.int32)


def _new_positions(count: jax.Array, offsets: tuple[int, int] | None) -> jax.Array | None:
    """(R, 1) position of the token fed next, ``count`` (R,) being the real tokens so far, itself included."""
    return None if offsets is None else (count + offsets[0])[:, None]


def _step_buffers(gc: GenerationConfig, new: int, rows: int, vocab: int) -> tuple[Any, Any]:
    """Fixed (N, rows, V) buffers for the per-step scores/logits a dict output asks for (else None)."""
    want = gc.return_dict_in_generate
    scores = jnp.zeros((new, rows, vocab), jnp.float32) if want and gc.output_scores else None
    logits = jnp.zeros((new, rows, vocab), jnp.float32) if want and gc.output_logits else None
    return scores, logits


def _record(buffer: Any, step: jax.Array, value: jax.Array) -> Any:
    return None if buffer is None else jax.lax.dynamic_update_index_in_dim(buffer, value, step, axis=0)


def _decode(forward, gc: GenerationConfig, offsets: tuple[int, int] | None, emit):
    """Greedy or sampling: ``run(params, ids (R, P), mask (R, P), cache, key)`` -> (sequences (R, P+N)
    with -1 after the generated columns, steps, scores (N, R, V) | None, logits (N, R, V) | None)."""
    new = gc.max_new_tokens
    pad = 0 if gc.pad_token_id is None else gc.pad_token_id
    eos = jnp.asarray(gc.eos_ids, jnp.int32) if gc.eos_ids else None

    def run(params, ids, mask, cache, key):
        rows, prompt_len = ids.shape
        width = prompt_len + new
        full_mask = jnp.zeros((rows, width), jnp.int32).at[:, :prompt_len].set(mask)  # (R, T)
        logits, cache = forward(params, cache, ids, _prompt_positions(mask, offsets), full_mask)
        sequences = jnp.full((rows, width), -1, jnp.int32).at[:, :prompt_len].set(ids)
        scores_buf, logits_buf = _step_buffers(gc, new, rows, logits.shape[-1])
        finished = jnp.zeros((rows,), bool)
        count = jnp.sum(mask, axis=1).astype(jnp.int32)  # (R,) real tokens so far

        def cond(state):
            step, finished = state[0], state[4]
            return (step < new) & ~jnp.all(finished)

        def body(state):
            step, logits, cache, sequences, finished, full_mask, count, key, scores_buf, logits_buf = state
            key, sub = jax.random.split(key)
            scores = apply_processors(logits, sequences, prompt_len + step, step, gc)
            if gc.do_sample:
                scores = process_logits(scores, gc)
                token = jax.random.categorical(sub, scores, axis=-1).astype(jnp.int32)
            else:
                token = greedy_choice(scores)
            scores_buf, logits_buf = _record(scores_buf, step, scores), _record(logits_buf, step, logits)
            token = jnp.where(finished, pad, token)
            if emit is not None:
                io_callback(emit, None, token, ordered=True)
            sequences = jax.lax.dynamic_update_slice(sequences, token[:, None], (0, prompt_len + step))
            if eos is not None:
                finished = finished | jnp.any(token[:, None] == eos[None, :], axis=1)
            full_mask = jax.lax.dynamic_update_slice(full_mask, jnp.ones((rows, 1), jnp.int32), (0, prompt_len + step))
            count = count + 1
            # The last token needs no forward pass (its logits would be thrown away).
            logits, cache = jax.lax.cond(
                (step + 1 < new) & ~jnp.all(finished),
                lambda: forward(params, cache, token[:, None], _new_positions(count, offsets), full_mask),
                lambda: (logits, cache),
            )
            return step + 1, logits, cache, sequences, finished, full_mask, count, key, scores_buf, logits_buf

        state = (jnp.int32(0), logits, cache, sequences, finished, full_mask, count, key, scores_buf, logits_buf)
        state = jax.lax.while_loop(cond, body, state)
        return state[3], state[0], state[8], state[9]

    return run


def _beam_search(forward, gc: GenerationConfig, offsets: tuple[int, int] | None, emit):
    """transformers' beam search with static shapes: ``run(params, ids (B*K, P), mask (B*K, P), cache)``
    (each prompt repeated ``K = num_beams`` times; ``cache`` for B rows) -> (sequences (B*R, P+N),
    sequences_scores (B*R,), beam_indices (B*R, N), steps, scores (N, B*K, V) | None, logits (N, B*K, V) | None).

    Per prompt it keeps ``K`` running beams and the ``K`` best finished hypotheses; each step takes
    the top ``keep = max(2, 1 + #eos) * K`` continuations of all beams, the best ``K`` of those that did
    not finish run on (the cache rows reordered by their source beam), and the top ``K`` candidates that
    finished (eos, or the last step) compete with the kept hypotheses by ``sum_logprobs / new_length **
    length_penalty``.  ``early_stopping`` decides when a prompt is done (see ``GenerationConfig``).
    """
    del emit  # generate refuses a streamer with beams
    beams, new, ret = gc.num_beams, gc.max_new_tokens, gc.num_return_sequences
    keep = max(2, 1 + len(gc.eos_ids)) * beams
    eos = jnp.asarray(gc.eos_ids, jnp.int32) if gc.eos_ids else None
    fill = 0 if gc.pad_token_id is None else gc.pad_token_id
    stop_early = gc.early_stopping is True
    # Length-penalty denominators, computed in double and rounded once as transformers' Python floats are.
    penalties = jnp.asarray(np.array([(s + 1) ** gc.length_penalty for s in range(new)], np.float32))
    if gc.early_stopping == "never" and gc.length_penalty > 0.0:
        best_penalties = jnp.full((new,), np.float32(new**gc.length_penalty))  # at the longest length
    else:
        best_penalties = penalties
    first_k = jnp.arange(keep) < beams  # (keep,) only these candidates may become hypotheses

    def gather(x, index):  # x (B, n, ...), index (B, m) -> (B, m, ...)
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def run(params, ids, mask, cache):
        rows, prompt_len = ids.shape
        batch, width = rows // beams, prompt_len + new
        full_mask = jnp.zeros((rows, width), jnp.int32).at[:, :prompt_len].set(mask)
        # The K copies of a prompt row are alike until the first choice: the prompt runs once per
        # row (``cache`` has B rows) and its logits and cache rows are copied K times.
        first = slice(None, None, beams)
        logits, cache = forward(params, cache, ids[first], _prompt_positions(mask[first], offsets), full_mask[first])
        copies = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), beams)  # (B*K,)
        logits, cache = jnp.take(logits, copies, axis=0), _reorder_cache(cache, copies)
        vocab = logits.shape[-1]
        running = (
            jnp.full((batch, beams, width), -1, jnp.int32)
            .at[:, :, :prompt_len]
            .set(ids.reshape(batch, beams, prompt_len))
        )
        running_scores = jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(_BEAM_MASK)  # only beam 0 starts
        running_from = jnp.full((batch, beams, new), -1, jnp.int32)  # flat source beam of each token
        state = {
            "step": jnp.int32(0),
            "done": jnp.bool_(False),
            "logits": logits,
            "cache": cache,
            "full_mask": full_mask,
            "count": jnp.sum(mask, axis=1).astype(jnp.int32),
            "running": running,
            "running_scores": running_scores,
            "running_from": running_from,
            "hyps": running,
            "hyp_scores": jnp.full((batch, beams), _BEAM_MASK, jnp.float32),
            "hyp_from": running_from,
            "hyp_done": jnp.zeros((batch, beams), bool),
            "can_improve": jnp.ones((batch, 1), bool),
        }
        state["scores"], state["logits_out"] = _step_buffers(gc, new, rows, vocab)

        def cond(s):
            return (s["step"] < new) & ~s["done"]

        def body(s):
            s = dict(s)
            step = s["step"]
            log_probs = jax.nn.log_softmax(s["logits"], axis=-1)
            log_probs = apply_processors(log_probs, s["running"].reshape(rows, width), prompt_len + step, step, gc)
            s["scores"], s["logits_out"] = (
                _record(s["scores"], step, log_probs),
                _record(s["logits_out"], step, s["logits"]),
            )
            total = log_probs.reshape(batch, beams, vocab) + s["running_scores"][:, :, None]
            top_scores, top_index = jax.lax.top_k(total.reshape(batch, beams * vocab), keep)  # (B, keep)
            source, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
            cand = gather(s["running"], source)  # (B, keep, T)
            cand = jnp.where(jnp.arange(width) == prompt_len + step, token[:, :, None], cand)
            cand_from = gather(s["running_from"], source)
            flat_source = (source + jnp.arange(batch)[:, None] * beams).astype(jnp.int32)
            cand_from = jnp.where(jnp.arange(new) == step, flat_source[:, :, None], cand_from)
            ends = jnp.broadcast_to(step + 1 >= new, token.shape)  # the length limit
            if eos is not None:
                ends = ends | jnp.any(token[:, :, None] == eos, axis=-1)

            # The best K unfinished candidates run on.
            alive = top_scores + ends.astype(jnp.float32) * _BEAM_MASK
            pick = jax.lax.top_k(alive, beams)[1]
            s["running"], s["running_scores"] = gather(cand, pick), gather(alive, pick)
            s["running_from"] = gather(cand_from, pick)

            # Finished candidates among the top K compete with the kept hypotheses.
            is_new = ends & first_k[None, :]
            ranked = _divide(top_scores, penalties[step])
            full = jnp.all(s["hyp_done"], axis=-1, keepdims=True) & stop_early
            ranked = ranked + full.astype(jnp.float32) * _BEAM_MASK
            ranked = ranked + (~s["can_improve"]).astype(jnp.float32) * _BEAM_MASK
            ranked = ranked + (~is_new).astype(jnp.float32) * _BEAM_MASK
            merged_scores = jnp.concatenate([s["hyp_scores"], ranked], axis=1)
            best = jax.lax.top_k(merged_scores, beams)[1]
            s["hyps"] = gather(jnp.concatenate([s["hyps"], cand], axis=1), best)
            s["hyp_scores"] = gather(merged_scores, best)
            s["hyp_from"] = gather(jnp.concatenate([s["hyp_from"], cand_from], axis=1), best)
            s["hyp_done"] = gather(jnp.concatenate([s["hyp_done"], is_new], axis=1), best)

            # Can a running beam still beat the worst kept hypothesis?
            best_running = _divide(s["running_scores"][:, :1], best_penalties[step])
            worst = jnp.where(s["hyp_done"], jnp.min(s["hyp_scores"], axis=1, keepdims=True), _BEAM_MASK)
            s["can_improve"] = s["can_improve"] & jnp.any(best_running > worst, axis=-1, keepdims=True)
            open_rows = ~(jnp.all(s["hyp_done"]) & stop_early)
            s["done"] = ~(jnp.any(s["can_improve"]) & open_rows & ~jnp.all(ends))

            s["full_mask"] = jax.lax.dynamic_update_slice(
                s["full_mask"], jnp.ones((rows, 1), jnp.int32), (0, prompt_len + step)
            )
            s["count"] = s["count"] + 1
            order = s["running_from"][:, :, step].reshape(rows)
            tokens = s["running"][:, :, prompt_len + step].reshape(rows, 1)

            def advance():
                cache = _reorder_cache(s["cache"], order)
                return forward(params, cache, tokens, _new_positions(s["count"], offsets), s["full_mask"])

            s["logits"], s["cache"] = jax.lax.cond(
                (step + 1 < new) & ~s["done"], advance, lambda: (s["logits"], s["cache"])
            )
            s["step"] = step + 1
            return s

        s = jax.lax.while_loop(cond, body, state)
        sequences = s["hyps"][:, :ret].reshape(batch * ret, width)
        sequences = jnp.where(sequences < 0, fill, sequences)
        return (
            sequences,
            s["hyp_scores"][:, :ret].reshape(batch * ret),
            s["hyp_from"][:, :ret].reshape(batch * ret, new),
            s["step"],
            s["scores"],
            s["logits_out"],
        )

    return run


def _outputs(gc: GenerationConfig, prompt_len: int, out: tuple) -> Any:
    """The compiled loop's tuple (see :func:`_decode` / :func:`_beam_search`) as ``generate`` returns it."""
    if not gc.is_beam_search:
        sequences, steps, scores, logits = out
        return generate_outputs(gc, prompt_len, sequences, int(steps), scores, logits)
    sequences, sequences_scores, beam_indices, steps, scores, logits = out
    return generate_outputs(gc, prompt_len, sequences, int(steps), scores, logits, sequences_scores, beam_indices)
