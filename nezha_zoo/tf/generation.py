"""Text generation for the TensorFlow causal LMs: the whole decoding loop in one ``tf.function``.

The prompt fills a fixed-size :class:`~nezha_zoo.tf.cache.KVCache` of ``P + max_new_tokens`` slots
(the model's ``init_cache``); a ``tf.while_loop`` then appends one token per iteration with static
shapes, so the loop also compiles under XLA (``jit_compile=True``).  Greedy decoding, sampling and
beam search (``rows = batch * num_beams``, finished hypotheses kept in fixed-size buffers, the cache
reordered by beam each step) all run in that one loop.  The traced function returns fixed-size
buffers and the number of steps taken; :meth:`TFGenerationMixin.generate` slices them to
``(rows, P + n)`` like the other backends.

Logits processors (transformers' order, :func:`apply_processors`): repetition penalty, n-gram ban,
bad words, eos suppression before ``min_new_tokens``; then, when sampling, the warpers of
:func:`process_logits`.  In beam search they act on log-softmax scores, as in transformers.

A causal-LM class mixes in :class:`TFGenerationMixin` and declares ``generation_position_rule``
(see :data:`nezha_zoo.generation.POSITION_RULES`).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import numpy as np
import tensorflow as tf

from nezha_zoo.generation import (
    GENERATION_FUNCTIONS,
    GenerationConfig,
    check_streamer,
    effective_bad_words,
    generate_outputs,
    position_offsets,
    prepare_generation,
)
from nezha_zoo.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from nezha_zoo.tf.cache import reorder_cache

__all__ = ["TFGenerationMixin", *GENERATION_FUNCTIONS]

_NEG_INF = float("-inf")
#: transformers' "impossible" beam score (finite, so sums and comparisons stay ordered).
_BEAM_NEG = -1.0e9


def top_k_filter(logits: tf.Tensor, top_k: int) -> tf.Tensor:
    """Set logits below the ``top_k``-th largest of their row to -inf (ties kept); (B, V) -> (B, V)."""
    k = min(max(int(top_k), 1), int(logits.shape[-1]))
    # The k-th value as a masked max over all k values, not `values[..., -1:]`: XLA folds that
    # slice into the top-k and then lowers it to a full sort of the row (40x slower on CPU at
    # B=8, V=30522); read whole, the top-k stays XLA's partial-selection TopK.  Exact.
    values = tf.math.top_k(logits, k=k).values  # (B, k) descending
    kth = tf.where(tf.range(k) == k - 1, values, tf.constant(_NEG_INF, values.dtype))
    kth = tf.reduce_max(kth, axis=-1, keepdims=True)  # (B, 1)
    return tf.where(logits < kth, tf.constant(_NEG_INF, logits.dtype), logits)


def top_p_filter(logits: tf.Tensor, top_p: float) -> tf.Tensor:
    """Nucleus filtering as transformers' ``TopPLogitsWarper`` (``min_tokens_to_keep=1``): (B, V) -> (B, V)."""
    order = tf.argsort(logits, axis=-1, direction="ASCENDING", stable=True)  # (B, V)
    sorted_logits = tf.gather(logits, order, batch_dims=1)
    cumulative = tf.cumsum(tf.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cumulative <= (1.0 - top_p)
    keep_last = tf.range(tf.shape(logits)[-1]) == tf.shape(logits)[-1] - 1  # the most likely token stays
    remove = tf.logical_and(remove, tf.logical_not(keep_last)[None, :])
    # Back to vocabulary order by scattering through the permutation (a second argsort cost a sort).
    rows = tf.broadcast_to(tf.range(tf.shape(order)[0])[:, None], tf.shape(order))
    remove = tf.scatter_nd(tf.stack([rows, order], axis=-1), remove, tf.shape(remove))
    return tf.where(remove, tf.constant(_NEG_INF, logits.dtype), logits)


def process_logits(logits: tf.Tensor, gc: GenerationConfig) -> tf.Tensor:
    """Temperature, then top-k, then top-p (transformers' warper order). (B, V) float32."""
    logits = tf.cast(logits, tf.float32)
    if gc.temperature != 1.0:
        logits = logits / gc.temperature
    if gc.top_k > 0:
        logits = top_k_filter(logits, gc.top_k)
    if gc.top_p < 1.0:
        logits = top_p_filter(logits, gc.top_p)
    return logits


def greedy_choice(logits: tf.Tensor) -> tf.Tensor:
    """Argmax per row with ties to the lowest id, explicitly (``tf.argmax`` documents no tie rule). (B,) int32."""
    vocab = tf.shape(logits)[-1]
    best = tf.reduce_max(logits, axis=-1, keepdims=True)  # (B, 1)
    candidates = tf.where(logits == best, tf.range(vocab)[None, :], vocab)  # (B, V) index or V
    return tf.reduce_min(candidates, axis=-1)


def _token_mask(tokens: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """(R, V) bool: which vocabulary ids occur in each row of ``tokens`` (R, N) int32; ids outside
    ``[0, vocab_size)`` (a fixed buffer's empty slots hold -1) are ignored."""
    tokens = tf.cast(tokens, tf.int32)
    valid = tf.logical_and(tokens >= 0, tokens < vocab_size)
    columns = tf.where(valid, tokens, vocab_size)  # invalid ids land in a spare column, dropped below
    rows = tf.broadcast_to(tf.range(tf.shape(tokens)[0])[:, None], tf.shape(tokens))
    hits = tf.tensor_scatter_nd_max(
        tf.zeros((tf.shape(tokens)[0], vocab_size + 1), tf.int32),
        tf.stack([rows, columns], axis=-1),
        tf.ones_like(tokens),
    )
    return hits[:, :vocab_size] > 0


def apply_repetition_penalty(scores: tf.Tensor, sequences: tf.Tensor, penalty: float) -> tf.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: the score of every token already in a row
    (prompt and its padding included) is divided by ``penalty`` when positive, multiplied when
    negative.

    Args:
        scores: (R, V) float32.
        sequences: (R, T) int32 ids so far; negative ids (empty slots of a fixed buffer) are ignored.
        penalty (float): > 0; 1.0 changes nothing.

    Returns:
        (R, V) float32.
    """
    seen = _token_mask(sequences, int(scores.shape[-1]))
    return tf.where(seen, tf.where(scores < 0, scores * penalty, scores / penalty), scores)


def ban_repeated_ngrams(scores: tf.Tensor, sequences: tf.Tensor, length: Any, n: int) -> tf.Tensor:
    """transformers' ``NoRepeatNGramLogitsProcessor``: -inf for every token that would complete an
    ``n``-gram already present in the row (prompt included).

    Args:
        scores: (R, V) float32.
        sequences: (R, T) int32 buffer whose first ``length`` columns hold the ids so far.
        length: () int32 (or int), the filled columns.
        n (int): the n-gram size (>= 1).

    Returns:
        (R, V) float32.
    """
    total = int(sequences.shape[1])
    windows = total - n + 1  # static count of n-gram start positions in the buffer
    if windows < 1:
        return scores
    length = tf.cast(length, tf.int32)
    match = tf.ones((tf.shape(sequences)[0], windows), tf.bool)
    for j in range(n - 1):
        # the row's last n-1 tokens against the first n-1 tokens of every window
        tail = tf.gather(sequences, tf.maximum(length - n + 1 + j, 0), axis=1)  # (R,)
        match = tf.logical_and(match, sequences[:, j : j + windows] == tail[:, None])
    complete = tf.range(windows) + n <= length  # windows entirely inside the filled columns
    banned = tf.where(tf.logical_and(match, complete[None, :]), sequences[:, n - 1 : n - 1 + windows], -1)
    return tf.where(_token_mask(banned, int(scores.shape[-1])), tf.constant(_NEG_INF, scores.dtype), scores)


def ban_bad_words(scores: tf.Tensor, sequences: tf.Tensor, length: Any, bad_words_ids: Any) -> tf.Tensor:
    """transformers' ``NoBadWordsLogitsProcessor``: a one-token entry is banned always, a longer one's
    last token when the row ends with the rest of it (entries longer than the row are skipped).

    Args:
        scores: (R, V) float32.
        sequences: (R, T) int32 buffer whose first ``length`` columns hold the ids so far.
        length: () int32 (or int), the filled columns.
        bad_words_ids: sequences of token ids (``GenerationConfig.bad_words_ids``).

    Returns:
        (R, V) float32.
    """
    vocab = tf.range(int(scores.shape[-1]))
    length = tf.cast(length, tf.int32)
    banned = tf.zeros_like(scores, tf.bool)
    for word in bad_words_ids:
        prefix, last = list(word[:-1]), int(word[-1])
        if prefix:
            columns = tf.maximum(length - len(prefix) + tf.range(len(prefix)), 0)
            ends_with = tf.reduce_all(tf.gather(sequences, columns, axis=1) == tf.constant(prefix, tf.int32), axis=1)
            hit = tf.logical_and(ends_with, len(word) <= length)  # (R,)
        else:
            hit = tf.ones((tf.shape(scores)[0],), tf.bool)
        banned = tf.logical_or(banned, tf.logical_and(hit[:, None], (vocab == last)[None, :]))
    return tf.where(banned, tf.constant(_NEG_INF, scores.dtype), scores)


def suppress_eos(scores: tf.Tensor, eos_ids: Any) -> tf.Tensor:
    """-inf for the eos ids (transformers' ``MinNewTokensLengthLogitsProcessor`` before the minimum
    is reached).  (R, V) -> (R, V)."""
    is_eos = tf.reduce_any(tf.range(int(scores.shape[-1]))[:, None] == tf.constant(list(eos_ids), tf.int32), axis=1)
    return tf.where(is_eos[None, :], tf.constant(_NEG_INF, scores.dtype), scores)


def apply_processors(scores: tf.Tensor, sequences: tf.Tensor, length: Any, step: Any, gc: GenerationConfig):
    """The logits processors ``gc`` turns on, in transformers' order (repetition penalty, n-gram ban,
    bad words, eos suppression while ``step < gc.min_new_tokens``); the sampling warpers are
    :func:`process_logits`.

    Args:
        scores: (R, V) float32 logits (greedy, sampling) or log-probabilities (beam search).
        sequences: (R, T) int32 buffer, the first ``length`` columns filled (prompt included).
        length: () int32 (or int), the filled columns.
        step: () int32 (or int), new tokens generated so far.
        gc (GenerationConfig): the settings (``min_new_tokens`` concrete, as ``prepare_generation`` returns).

    Returns:
        (R, V) float32.
    """
    if gc.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences, gc.repetition_penalty)
    if gc.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, sequences, length, gc.no_repeat_ngram_size)
    if gc.bad_words_ids:
        words = effective_bad_words(gc)
        if words:
            scores = ban_bad_words(scores, sequences, length, words)
    if gc.min_new_tokens and gc.eos_ids:
        scores = tf.where(tf.cast(step, tf.int32) < gc.min_new_tokens, suppress_eos(scores, gc.eos_ids), scores)
    return scores


def _length_penalty(length: Any, penalty: float) -> tf.Tensor:
    """``length ** penalty`` as transformers computes it (a Python float, then float32)."""
    return tf.cast(tf.cast(length, tf.float64) ** penalty, tf.float32)


def _write_column(buffer: tf.Tensor, column: Any, values: tf.Tensor) -> tf.Tensor:
    """``buffer[..., column] = values`` with static shapes: (..., T), () int32, (...) -> (..., T)."""
    hit = tf.range(int(buffer.shape[-1])) == column
    return tf.where(hit, tf.expand_dims(tf.cast(values, buffer.dtype), -1), buffer)


def _record(buffer: tf.Tensor, step: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """``buffer[step] = values`` for the per-step scores/logits buffers (N, R, V)."""
    return tf.tensor_scatter_nd_update(buffer, tf.reshape(step, (1, 1)), values[None])


def _per_step_outputs(gc: GenerationConfig) -> tuple[str, ...]:
    """Which per-step tensors a call returns: ``"scores"`` and/or ``"logits"``."""
    if not gc.return_dict_in_generate:
        return ()
    return tuple(name for name, flag in (("scores", gc.output_scores), ("logits", gc.output_logits)) if flag)


class TFGenerationMixin:
    """``generate`` for a Keras causal LM with ``init_cache`` (the class sets ``generation_position_rule``)."""

    #: ``"cumsum"``, ``"padding_aware"`` or None; every class declares it (no family checks).
    generation_position_rule: str | None

    def _generation_rule(self) -> str | None:
        try:
            return type(self).generation_position_rule
        except AttributeError:
            raise TypeError(
                f"{type(self).__name__} mixes in TFGenerationMixin but declares no generation_position_rule"
            ) from None

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: GenerationConfig | None = None,
        streamer: Any = None,
        jit_compile: bool = False,
        **settings: Any,
    ) -> tf.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Continue each prompt row inside one ``tf.function`` (greedy, sampling or beam search).

        Args:
            input_ids: (B, P) int prompt ids, left-padded in a batch (numpy, list or tensor).
            attention_mask: (B, P) 0/1, zeros on the left pads; default ones.
            generation_config (GenerationConfig | None): the base settings (default: the model
                config's eos/pad ids).
            streamer: None, an object with ``put``/``end`` (transformers' streamer protocol) or a
                callable: it receives the prompt (B, P) once, then each new column (B * R,) as int32
                numpy, then ``end()``.  Not with beam search, and not with ``jit_compile=True``
                (XLA cannot call back to the host from the compiled loop): ``ValueError``.
            jit_compile (bool): compile the loop with XLA.
            **settings: :class:`~nezha_zoo.generation.GenerationConfig` fields overriding
                ``generation_config`` (``max_new_tokens``, ``num_beams``, ``repetition_penalty``, ...);
                an unknown name raises ``TypeError``.  Sampling uses stateless random ops seeded by
                ``(seed, step)`` (``seed=None``: a fresh random seed).

        Returns:
            By default a (B * R, P + n) int32 tensor, the prompt (with its padding) then ``n`` new
            tokens (``R``: ``num_return_sequences``, rows of a prompt adjacent, best hypothesis
            first under beam search).  Greedy/sampling: ``n <= max_new_tokens``, decoding stops
            once every row has emitted an eos and a finished row holds ``pad_token_id`` after it.
            Beam search: ``n`` is the longest returned hypothesis, shorter ones padded.
            With ``return_dict_in_generate=True``: a ``GenerateDecoderOnlyOutput`` (``scores`` /
            ``logits``: n tensors (B * R, V) when ``output_scores`` / ``output_logits``) or, under
            beam search, a ``GenerateBeamDecoderOnlyOutput`` (``sequences_scores`` (B * R,) with
            ``output_scores``; ``beam_indices`` (B * R, n); ``scores`` / ``logits`` n tensors
            (B * num_beams, V)), as transformers.

        Raises:
            TypeError / ValueError: bad settings or prompt (see
                :func:`~nezha_zoo.generation.prepare_generation`), before any TensorFlow op.

        One trace per (batch, prompt length, settings); the seed is an input.
        """
        if not isinstance(jit_compile, bool):
            raise TypeError(f"jit_compile must be a bool, got {type(jit_compile).__name__}")
        rule = self._generation_rule()
        gc, ids, mask = prepare_generation(self.config, rule, generation_config, input_ids, attention_mask, **settings)
        streamer = check_streamer(streamer, gc)
        if streamer is not None and jit_compile:
            raise ValueError(
                "streamer needs a host callback inside the decoding loop, which XLA (jit_compile=True) cannot "
                "compile; use jit_compile=False to stream"
            )
        copies = gc.rows_per_prompt
        fn, stream_cell = self._compiled_generate(gc, rule, jit_compile, streamer is not None)
        seed_value = gc.seed if gc.seed is not None else secrets.randbelow(2**31)
        inputs = (
            tf.constant(np.repeat(ids, copies, axis=0)),
            tf.constant(np.repeat(mask, copies, axis=0)),
            tf.constant(seed_value, tf.int32),
        )
        if streamer is not None:
            streamer.put(ids.copy())
            stream_cell[0] = streamer
            try:
                out = fn(*inputs)
            finally:
                stream_cell[0] = None
            streamer.end()
        else:
            out = fn(*inputs)
        return generate_outputs(
            gc,
            ids.shape[1],
            out["sequences"],
            int(out["steps"]),
            out.get("scores"),
            out.get("logits"),
            out.get("sequences_scores"),
            out.get("beam_indices"),
        )

    def _compiled_generate(self, gc: GenerationConfig, rule: str | None, jit_compile: bool, stream: bool):
        """The traced loop for these settings and the cell its streamer callback reads, cached on
        the instance (the seed is an input, so it is not part of the key)."""
        fns = self.__dict__.get("_nz_generate_fns")
        if fns is None:
            fns = {}
            object.__setattr__(self, "_nz_generate_fns", fns)  # plain dict, outside Keras' tracking
        key = (dataclasses.replace(gc, seed=None), rule, jit_compile, stream)
        if key not in fns:
            cell = [None]  # the current call's streamer; the traced callback looks it up at run time
            offsets = position_offsets(rule, self.config)
            make = self._beam_search if gc.is_beam_search else self._decode_fn
            fns[key] = (tf.function(make(gc, offsets, cell if stream else None), jit_compile=jit_compile), cell)
        return fns[key]

    def _forward_fn(self, offsets: tuple[int, int] | None):
        """One cached forward step: (cache, tokens (R, L), positions (R, L) | None, mask (R, T)) ->
        (last logits (R, V) float32, cache)."""

        def forward(cache, tokens, positions, mask):
            inputs = {"attention_mask": mask, "past_key_values": cache}
            if offsets is not None:
                inputs["position_ids"] = positions
            # logits_to_keep=1: the LM head on the last position only (the prompt's pass computes P of them)
            out = self(tokens, **inputs, use_cache=True, return_dict=True, training=False, logits_to_keep=1)
            return tf.cast(out.logits[:, -1, :], tf.float32), out.past_key_values

        return forward

    def _prefill(self, forward, offsets, ids, mask, new: int):
        """Run the prompt (R, P) through a fresh cache of ``P + new`` slots; returns the last
        logits, the cache, the (R, P + new) attention mask and the real-token count per row."""
        rows, prompt_len = int(ids.shape[0]), int(ids.shape[1])
        full_mask = tf.concat([mask, tf.zeros((rows, new), tf.int32)], axis=1)
        positions = None
        if offsets is not None:
            positions = tf.where(mask == 1, tf.cumsum(mask, axis=1) + offsets[0], offsets[1])  # (R, P)
        logits, cache = forward(self.init_cache(rows, prompt_len + new), ids, positions, full_mask)
        return logits, cache, full_mask, tf.reduce_sum(mask, axis=1)

    @staticmethod
    def _stream_fn(cell: list | None):
        """A traced ``put`` of each new column to ``cell[0]`` (``tf.numpy_function``); the returned
        ticket is threaded through the loop so the calls run in step order."""
        if cell is None:
            return None

        def put(tokens, ticket):
            cell[0].put(np.asarray(tokens, np.int32))
            return np.int32(ticket + 1)

        def stream(tokens, ticket):
            out = tf.numpy_function(put, [tokens, ticket], tf.int32, stateful=True, name="generate_streamer")
            return tf.ensure_shape(out, ())

        return stream

    def _decode_fn(self, gc: GenerationConfig, offsets: tuple[int, int] | None, cell: list | None):
        """Greedy decoding or sampling: ``run(ids (R, P), mask (R, P), seed ())`` -> dict of
        ``sequences`` (R, P + N), ``steps`` () and the (N, R, V) ``scores`` / ``logits`` buffers asked for."""
        new = gc.max_new_tokens
        pad = 0 if gc.pad_token_id is None else gc.pad_token_id
        eos = list(gc.eos_ids)
        forward, stream = self._forward_fn(offsets), self._stream_fn(cell)
        kept = _per_step_outputs(gc)

        def run(ids, mask, seed):
            rows, prompt_len = int(ids.shape[0]), int(ids.shape[1])
            logits, cache, full_mask, count = self._prefill(forward, offsets, ids, mask, new)
            vocab = int(logits.shape[-1])
            state = {
                "step": tf.constant(0, tf.int32),
                "logits": logits,
                "cache": cache,
                # ids so far; -1 marks the empty slots (the processors ignore them)
                "sequences": tf.concat([ids, tf.fill((rows, new), -1)], axis=1),
                "finished": tf.zeros((rows,), tf.bool),
                "mask": full_mask,
                "count": count,  # (R,) real tokens so far, for the next position id
            }
            for name in kept:
                state[name + "_buffer"] = tf.zeros((new, rows, vocab), tf.float32)
            if stream is not None:
                state["ticket"] = tf.constant(0, tf.int32)
            eos_ids = tf.constant(eos if eos else [-1], tf.int32)

            def cond(state):
                return tf.logical_and(state["step"] < new, tf.logical_not(tf.reduce_all(state["finished"])))

            def body(state):
                state = dict(state)
                step, raw = state["step"], state["logits"]
                scores = apply_processors(raw, state["sequences"], prompt_len + step, step, gc)
                if gc.do_sample:
                    scores = process_logits(scores, gc)
                    draw = tf.random.stateless_categorical(scores, 1, seed=tf.stack([seed, step]), dtype=tf.int32)
                    token = draw[:, 0]
                else:
                    token = greedy_choice(scores)
                if "scores" in kept:
                    state["scores_buffer"] = _record(state["scores_buffer"], step, scores)
                if "logits" in kept:
                    state["logits_buffer"] = _record(state["logits_buffer"], step, raw)
                token = tf.where(state["finished"], tf.constant(pad, tf.int32), token)
                if stream is not None:
                    state["ticket"] = stream(token, state["ticket"])
                state["sequences"] = _write_column(state["sequences"], prompt_len + step, token)
                finished = state["finished"]
                if eos:
                    finished = tf.logical_or(finished, tf.reduce_any(token[:, None] == eos_ids[None, :], axis=1))
                state["finished"] = finished
                state["mask"] = _write_column(state["mask"], prompt_len + step, tf.ones((rows,), tf.int32))
                state["count"] = state["count"] + 1
                step_positions = None if offsets is None else (state["count"] + offsets[0])[:, None]  # (R, 1)
                # The last token needs no forward pass (its logits would be thrown away).
                state["logits"], state["cache"] = tf.cond(
                    tf.logical_and(step + 1 < new, tf.logical_not(tf.reduce_all(finished))),
                    lambda: forward(state["cache"], token[:, None], step_positions, state["mask"]),
                    lambda: (raw, state["cache"]),
                )
                state["step"] = step + 1
                return (state,)

            (state,) = tf.while_loop(cond, body, (state,))
            out = {"sequences": tf.where(state["sequences"] < 0, pad, state["sequences"]), "steps": state["step"]}
            out.update({name: state[name + "_buffer"] for name in kept})
            return out

        return run

    def _beam_search(self, gc: GenerationConfig, offsets: tuple[int, int] | None, cell: list | None):
        """Beam search as transformers' ``_beam_search``, with static shapes.

        ``run(ids (B*K, P), mask (B*K, P), seed ())`` (each prompt row repeated ``K = num_beams``
        times) -> dict of ``sequences`` (B*R, P + N) (the best ``R = num_return_sequences`` finished
        hypotheses per row, padded), ``sequences_scores`` (B*R,), ``beam_indices`` (B*R, N) (-1
        after the end), ``steps`` () and the (N, B*K, V) ``scores`` / ``logits`` buffers asked for.

        Each step keeps the ``max(2, 1 + n_eos) * K`` best continuations over all beams; those
        ending in eos (or at the length limit) enter the ``K`` finished-hypothesis slots of their
        row when among the first ``K`` (score: sum of log-probabilities / new tokens **
        ``length_penalty``), the best ``K`` others keep running.  A row stops taking hypotheses by
        ``early_stopping`` (see :class:`~nezha_zoo.generation.GenerationConfig`); the loop ends when
        no row can improve.
        """
        del cell  # streaming is refused with beams before tracing
        new, beams, returned = gc.max_new_tokens, gc.num_beams, gc.num_return_sequences
        fill = 0 if gc.pad_token_id is None else gc.pad_token_id
        eos = list(gc.eos_ids)
        candidates = max(2, 1 + len(eos)) * beams
        forward = self._forward_fn(offsets)
        kept = _per_step_outputs(gc)

        def run(ids, mask, seed):
            del seed  # beam search is deterministic
            rows, prompt_len = int(ids.shape[0]), int(ids.shape[1])
            batch, total = rows // beams, prompt_len + new
            logits, cache, full_mask, count = self._prefill(forward, offsets, ids, mask, new)
            vocab = int(logits.shape[-1])
            running = tf.reshape(tf.concat([ids, tf.fill((rows, new), -1)], axis=1), (batch, beams, total))
            no_beams = tf.fill((batch, beams, new), -1)
            state = {
                "step": tf.constant(0, tf.int32),
                "logits": logits,
                "cache": cache,
                "mask": full_mask,
                "count": count,
                "running": running,  # (B, K, T) running beams' ids (-1: empty slot)
                # only the first beam of a row is live at first, so the K beams start distinct
                "running_scores": tf.tile(tf.constant([[0.0] + [_BEAM_NEG] * (beams - 1)]), (batch, 1)),
                "running_beams": no_beams,  # (B, K, N) flat row each token came from
                "finished": running,  # (B, K, T) finished hypotheses, best first
                "finished_scores": tf.fill((batch, beams), _BEAM_NEG),
                "finished_beams": no_beams,
                "is_finished": tf.zeros((batch, beams), tf.bool),  # slot holds a real hypothesis
                "can_improve": tf.ones((batch, 1), tf.bool),  # transformers' early-stop heuristic
                "go": tf.constant(True),
            }
            for name in kept:
                state[name + "_buffer"] = tf.zeros((new, rows, vocab), tf.float32)
            eos_ids = tf.constant(eos if eos else [-1], tf.int32)
            is_top = tf.range(candidates) < beams  # (C,) only these may finish
            row_offset = (tf.range(batch) * beams)[:, None]  # (B, 1)

            def cond(state):
                return tf.logical_and(state["go"], state["step"] < new)

            def body(state):
                state = dict(state)
                step, raw = state["step"], state["logits"]
                cur = prompt_len + step
                flat = tf.reshape(state["running"], (rows, total))
                log_probs = apply_processors(tf.nn.log_softmax(raw, axis=-1), flat, cur, step, gc)
                if "scores" in kept:
                    state["scores_buffer"] = _record(state["scores_buffer"], step, log_probs)
                if "logits" in kept:
                    state["logits_buffer"] = _record(state["logits_buffer"], step, raw)
                totals = tf.reshape(log_probs, (batch, beams, vocab)) + state["running_scores"][:, :, None]
                top_scores, top = tf.math.top_k(tf.reshape(totals, (batch, beams * vocab)), k=candidates)
                top_beam, top_token = top // vocab, top % vocab  # (B, C)
                top_seqs = _write_column(tf.gather(state["running"], top_beam, batch_dims=1), cur, top_token)
                top_from = tf.gather(state["running_beams"], top_beam, batch_dims=1)
                top_from = _write_column(top_from, step, top_beam + row_offset)
                ends = tf.logical_or(
                    tf.reduce_any(top_token[:, :, None] == eos_ids, axis=-1), cur + 1 >= total
                )  # (B, C)

                # the best K continuations that did not end keep running
                live_scores = top_scores + tf.cast(ends, tf.float32) * _BEAM_NEG
                pick = tf.math.top_k(live_scores, k=beams).indices
                state["running"] = tf.gather(top_seqs, pick, batch_dims=1)
                state["running_scores"] = tf.gather(live_scores, pick, batch_dims=1)
                state["running_beams"] = tf.gather(top_from, pick, batch_dims=1)

                # those among the first K that ended compete for the finished slots
                just_finished = tf.logical_and(ends, is_top[None, :])
                final_scores = top_scores / _length_penalty(step + 1, gc.length_penalty)
                if gc.early_stopping is True:
                    full = tf.reduce_all(state["is_finished"], axis=-1, keepdims=True)
                    final_scores += tf.cast(full, tf.float32) * _BEAM_NEG
                final_scores += tf.cast(tf.logical_not(state["can_improve"]), tf.float32) * _BEAM_NEG
                final_scores += tf.cast(tf.logical_not(just_finished), tf.float32) * _BEAM_NEG
                merged_scores = tf.concat([state["finished_scores"], final_scores], axis=1)
                best = tf.math.top_k(merged_scores, k=beams).indices
                state["finished"] = tf.gather(tf.concat([state["finished"], top_seqs], 1), best, batch_dims=1)
                state["finished_scores"] = tf.gather(merged_scores, best, batch_dims=1)
                state["finished_beams"] = tf.gather(
                    tf.concat([state["finished_beams"], top_from], 1), best, batch_dims=1
                )
                state["is_finished"] = tf.gather(
                    tf.concat([state["is_finished"], just_finished], 1), best, batch_dims=1
                )

                # can a running beam still beat the worst finished hypothesis?
                if gc.early_stopping == "never" and gc.length_penalty > 0.0:
                    best_length = new
                else:
                    best_length = step + 1
                best_running = state["running_scores"][:, :1] / _length_penalty(best_length, gc.length_penalty)
                worst = tf.where(
                    state["is_finished"],
                    tf.reduce_min(state["finished_scores"], axis=1, keepdims=True),
                    _BEAM_NEG,
                )
                state["can_improve"] = tf.logical_and(
                    state["can_improve"], tf.reduce_any(best_running > worst, axis=-1, keepdims=True)
                )
                go = tf.logical_and(tf.reduce_any(state["can_improve"]), tf.logical_not(tf.reduce_all(ends)))
                if gc.early_stopping is True:
                    go = tf.logical_and(go, tf.logical_not(tf.reduce_all(state["is_finished"])))
                state["go"] = go

                # the cache follows the beams; then the chosen tokens go through the model
                origin = tf.reshape(tf.gather(state["running_beams"], step, axis=2), (rows,))
                tokens = tf.reshape(tf.gather(state["running"], cur, axis=2), (rows, 1))
                state["mask"] = _write_column(state["mask"], cur, tf.ones((rows,), tf.int32))
                state["count"] = state["count"] + 1
                positions = None if offsets is None else (state["count"] + offsets[0])[:, None]
                state["logits"], state["cache"] = tf.cond(
                    tf.logical_and(go, step + 1 < new),
                    lambda: forward(reorder_cache(state["cache"], origin), tokens, positions, state["mask"]),
                    lambda: (raw, state["cache"]),
                )
                state["step"] = step + 1
                return (state,)

            (state,) = tf.while_loop(cond, body, (state,))
            sequences = tf.reshape(state["finished"][:, :returned], (batch * returned, total))
            out = {
                "sequences": tf.where(sequences < 0, fill, sequences),
                "sequences_scores": tf.reshape(state["finished_scores"][:, :returned], (batch * returned,)),
                "beam_indices": tf.reshape(state["finished_beams"][:, :returned], (batch * returned, new)),
                "steps": state["step"],
            }
            out.update({name: state[name + "_buffer"] for name in kept})
            return out

        return run
