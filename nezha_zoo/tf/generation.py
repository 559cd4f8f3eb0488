"""Text generation for the TensorFlow causal LMs: the whole decoding loop in one ``tf.function``.

The prompt fills a fixed-size :class:`~nezha_zoo.tf.cache.KVCache` of ``P + max_new_tokens`` slots
(the model's ``init_cache``); a ``tf.while_loop`` then appends one token per iteration with static
shapes, so the loop also compiles under XLA (``jit_compile=True``).  The loop stops when every row
has emitted an eos (or after ``max_new_tokens``); the traced function returns the fixed
``(B, P + max_new_tokens)`` buffer and the count, and :meth:`TFGenerationMixin.generate` slices it
to ``(B, P + n)`` like the other backends.

A causal-LM class mixes in :class:`TFGenerationMixin` and declares ``generation_position_rule``
(see :data:`nezha_zoo.generation.POSITION_RULES`).
"""

from __future__ import annotations

import secrets
from typing import Any

import tensorflow as tf

from nezha_zoo.generation import (
    GenerationConfig,
    position_offsets,
    prepare_generation,
)

__all__ = ["TFGenerationMixin", "top_k_filter", "top_p_filter", "process_logits", "greedy_choice"]

_NEG_INF = float("-inf")


def top_k_filter(logits: tf.Tensor, top_k: int) -> tf.Tensor:
    """Set logits below the ``top_k``-th largest of their row to -inf (ties kept); (B, V) -> (B, V)."""
    k = min(max(int(top_k), 1), int(logits.shape[-1]))
    kth = tf.math.top_k(logits, k=k).values[..., -1:]  # (B, 1)
    return tf.where(logits < kth, tf.constant(_NEG_INF, logits.dtype), logits)


def top_p_filter(logits: tf.Tensor, top_p: float) -> tf.Tensor:
    """Nucleus filtering as transformers' ``TopPLogitsWarper`` (``min_tokens_to_keep=1``): (B, V) -> (B, V)."""
    order = tf.argsort(logits, axis=-1, direction="ASCENDING", stable=True)  # (B, V)
    sorted_logits = tf.gather(logits, order, batch_dims=1)
    cumulative = tf.cumsum(tf.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cumulative <= (1.0 - top_p)
    keep_last = tf.range(tf.shape(logits)[-1]) == tf.shape(logits)[-1] - 1  # the most likely token stays
    remove = tf.logical_and(remove, tf.logical_not(keep_last)[None, :])
    remove = tf.gather(remove, tf.argsort(order, axis=-1, stable=True), batch_dims=1)  # vocabulary order
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
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generation_config: GenerationConfig | None = None,
        jit_compile: bool = False,
        **kwargs: Any,
    ) -> tf.Tensor:
        """Continue each prompt row inside one ``tf.function``; returns (B, P + n) int32 ids, prompt included.

        Args:
            input_ids: (B, P) int prompt ids, left-padded in a batch.
            attention_mask: (B, P) 0/1, zeros on the left pads; default ones.
            max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id, pad_token_id:
                override ``generation_config`` (see :class:`nezha_zoo.generation.GenerationConfig`).
                Sampling uses stateless random ops seeded by ``(seed, step)`` (``seed=None``: a fresh
                random seed).
            generation_config (GenerationConfig | None): the base settings.
            jit_compile (bool): compile the loop with XLA.
            **kwargs: not accepted (``TypeError``).

        ``n <= max_new_tokens``: decoding stops once every row has emitted an eos; a finished row
        holds ``pad_token_id`` after its eos.  One trace per (batch, prompt length, settings).
        """
        if kwargs:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(kwargs)}")
        if not isinstance(jit_compile, bool):
            raise TypeError(f"jit_compile must be a bool, got {type(jit_compile).__name__}")
        rule = self._generation_rule()
        gc, ids, mask = prepare_generation(
            self.config,
            rule,
            generation_config,
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        fn = self._compiled_generate(gc, rule, jit_compile)
        seed_value = gc.seed if gc.seed is not None else secrets.randbelow(2**31)
        tokens, steps = fn(tf.constant(ids), tf.constant(mask), tf.constant(seed_value, tf.int32))
        return tokens[:, : ids.shape[1] + int(steps)]

    def _compiled_generate(self, gc: GenerationConfig, rule: str | None, jit_compile: bool):
        """The traced loop for these settings, cached on the instance (the seed is an input)."""
        fns = self.__dict__.get("_nz_generate_fns")
        if fns is None:
            fns = {}
            object.__setattr__(self, "_nz_generate_fns", fns)  # plain dict, outside Keras' tracking
        key = (gc.max_new_tokens, gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.eos_ids, gc.pad_token_id)
        key = (key, rule, jit_compile)
        if key not in fns:
            fns[key] = tf.function(self._decode_fn(gc, position_offsets(rule, self.config)), jit_compile=jit_compile)
        return fns[key]

    def _decode_fn(self, gc: GenerationConfig, offsets: tuple[int, int] | None):
        new = gc.max_new_tokens
        pad = 0 if gc.pad_token_id is None else gc.pad_token_id
        eos = list(gc.eos_ids)

        def forward(cache, tokens, positions, mask):
            inputs = {"attention_mask": mask, "past_key_values": cache}
            if offsets is not None:
                inputs["position_ids"] = positions
            out = self(tokens, **inputs, use_cache=True, return_dict=True, training=False)
            return tf.cast(out.logits[:, -1, :], tf.float32), out.past_key_values  # (B, V)

        def run(ids, mask, seed):
            batch, prompt_len = int(ids.shape[0]), int(ids.shape[1])
            total = prompt_len + new
            full_mask = tf.concat([mask, tf.zeros((batch, new), tf.int32)], axis=1)  # (B, T)
            positions = None
            if offsets is not None:
                positions = tf.where(mask == 1, tf.cumsum(mask, axis=1) + offsets[0], offsets[1])  # (B, P)
            logits, cache = forward(self.init_cache(batch, total), ids, positions, full_mask)
            buffer = tf.fill((batch, new), tf.constant(pad, tf.int32))  # (B, N) generated tokens
            finished = tf.zeros((batch,), tf.bool)
            count = tf.reduce_sum(mask, axis=1)  # (B,) real tokens so far
            eos_ids = tf.constant(eos if eos else [-1], tf.int32)

            def cond(step, logits, cache, buffer, finished, full_mask, count):
                return tf.logical_and(step < new, tf.logical_not(tf.reduce_all(finished)))

            def body(step, logits, cache, buffer, finished, full_mask, count):
                if gc.do_sample:
                    draw = tf.random.stateless_categorical(
                        process_logits(logits, gc), 1, seed=tf.stack([seed, step]), dtype=tf.int32
                    )
                    token = draw[:, 0]
                else:
                    token = greedy_choice(logits)
                token = tf.where(finished, tf.constant(pad, tf.int32), token)
                buffer = tf.where(tf.range(new)[None, :] == step, token[:, None], buffer)
                if eos:
                    finished = tf.logical_or(finished, tf.reduce_any(token[:, None] == eos_ids[None, :], axis=1))
                full_mask = tf.where(tf.range(total)[None, :] == prompt_len + step, 1, full_mask)
                count = count + 1
                step_positions = None if offsets is None else (count + offsets[0])[:, None]  # (B, 1)
                # The last token needs no forward pass (its logits would be thrown away).
                logits, cache = tf.cond(
                    tf.logical_and(step + 1 < new, tf.logical_not(tf.reduce_all(finished))),
                    lambda: forward(cache, token[:, None], step_positions, full_mask),
                    lambda: (logits, cache),
                )
                return step + 1, logits, cache, buffer, finished, full_mask, count

            state = (tf.constant(0, tf.int32), logits, cache, buffer, finished, full_mask, count)
            state = tf.while_loop(cond, body, state)
            return tf.concat([ids, state[3]], axis=1), state[0]

        return run
