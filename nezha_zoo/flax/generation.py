"""Text generation for the Flax causal LMs: the whole decoding loop under one ``jax.jit``.

The prompt is run once through a fixed-size cache of ``P + max_new_tokens`` slots (the wrapper's
``init_cache``), then a ``lax.while_loop`` appends one token per iteration with static shapes.  The
loop stops when every row has emitted an eos (or after ``max_new_tokens``); the compiled function
returns the fixed ``(B, P + max_new_tokens)`` buffer and the count, and :meth:`generate` slices it to
``(B, P + n)`` like the other backends.

A causal-LM wrapper class lists :class:`FlaxGenerationMixin` as its first base and declares
``generation_position_rule`` (see :data:`nezha_zoo.generation.POSITION_RULES`).
"""

from __future__ import annotations

import secrets
from typing import Any

import jax
import jax.numpy as jnp

from nezha_zoo.generation import (
    GenerationConfig,
    position_offsets,
    prepare_generation,
)

__all__ = [
    "FlaxGenerationMixin",
    "top_k_filter",
    "top_p_filter",
    "process_logits",
    "greedy_choice",
]

_NEG_INF = float("-inf")


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Set logits below the ``top_k``-th largest of their row to -inf (ties kept); (B, V) -> (B, V)."""
    k = min(max(int(top_k), 1), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # (B, 1)
    return jnp.where(logits < kth, _NEG_INF, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering as transformers' ``TopPLogitsWarper`` (``min_tokens_to_keep=1``): (B, V) -> (B, V)."""
    order = jnp.argsort(logits, axis=-1)  # ascending, stable
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cumulative <= (1.0 - top_p)
    remove = remove.at[..., -1].set(False)  # the most likely token always stays
    inverse = jnp.argsort(order, axis=-1)  # sorted position of each vocabulary entry
    remove = jnp.take_along_axis(remove, inverse, axis=-1)
    return jnp.where(remove, _NEG_INF, logits)


def process_logits(logits: jax.Array, gc: GenerationConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (transformers' warper order). (B, V) float32."""
    logits = logits.astype(jnp.float32)
    if gc.temperature != 1.0:
        logits = logits / gc.temperature
    if gc.top_k > 0:
        logits = top_k_filter(logits, gc.top_k)
    if gc.top_p < 1.0:
        logits = top_p_filter(logits, gc.top_p)
    return logits


def greedy_choice(logits: jax.Array) -> jax.Array:
    """Argmax per row; ``jnp.argmax`` returns the first maximum, i.e. ties go to the lowest id. (B,) int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


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
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generation_config: GenerationConfig | None = None,
        params: Any = None,
        **kwargs: Any,
    ) -> jax.Array:
        """Continue each prompt row under ``jax.jit``; returns (B, P + n) int32 ids, the prompt included.

        Args:
            input_ids: (B, P) int prompt ids, left-padded in a batch.
            attention_mask: (B, P) 0/1, zeros on the left pads; default ones.
            max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id, pad_token_id:
                override ``generation_config`` (see :class:`nezha_zoo.generation.GenerationConfig`).
                Sampling draws from ``jax.random.PRNGKey(seed)`` (``seed=None``: a fresh random seed).
            generation_config (GenerationConfig | None): the base settings.
            params: a params tree instead of ``self.params``.
            **kwargs: not accepted (``TypeError``).

        ``n <= max_new_tokens``: decoding stops once every row has emitted an eos; a finished row
        holds ``pad_token_id`` after its eos.  One compilation per (batch, prompt length, settings).
        """
        if kwargs:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(kwargs)}")
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
        batch, prompt_len = ids.shape
        cache = self.init_cache(batch, prompt_len + gc.max_new_tokens)
        key = jax.random.PRNGKey(gc.seed if gc.seed is not None else secrets.randbelow(2**31))
        fn = self._compiled_generate(gc, rule)
        tokens, steps = fn(
            self.apply_lora(self.params) if params is None else params, jnp.asarray(ids), jnp.asarray(mask), cache, key
        )
        return tokens[:, : prompt_len + int(steps)]

    def _compiled_generate(self, gc: GenerationConfig, rule: str | None):
        """The jitted loop for these settings (cached on the instance; the seed is not part of the key)."""
        settings = (gc.max_new_tokens, gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.eos_ids, gc.pad_token_id)
        compiled = self.__dict__.setdefault("_generate_fns", {})
        if (settings, rule) not in compiled:
            compiled[(settings, rule)] = jax.jit(self._decode_fn(gc, position_offsets(rule, self.config)))
        return compiled[(settings, rule)]

    def _decode_fn(self, gc: GenerationConfig, offsets: tuple[int, int] | None):
        module = self.module
        new = gc.max_new_tokens
        pad = 0 if gc.pad_token_id is None else gc.pad_token_id
        eos = jnp.asarray(gc.eos_ids, jnp.int32) if gc.eos_ids else None

        def forward(params, cache, tokens, positions, mask):
            inputs = {"input_ids": tokens, "attention_mask": mask}
            if offsets is not None:
                inputs["position_ids"] = positions
            out, updated = module.apply(
                {"params": params, "cache": cache}, **inputs, deterministic=True, mutable=["cache"]
            )
            return out["logits"][:, -1, :].astype(jnp.float32), updated["cache"]  # (B, V)

        def positions_of(mask):
            if offsets is None:
                return None
            offset, pad_value = offsets
            return jnp.where(mask == 1, jnp.cumsum(mask, axis=1) + offset, pad_value).astype(jnp.int32)

        def run(params, ids, mask, cache, key):
            batch, prompt_len = ids.shape
            full_mask = jnp.zeros((batch, prompt_len + new), jnp.int32).at[:, :prompt_len].set(mask)  # (B, T)
            logits, cache = forward(params, cache, ids, positions_of(mask), full_mask)
            buffer = jnp.full((batch, new), pad, jnp.int32)  # (B, N) generated tokens
            finished = jnp.zeros((batch,), bool)
            count = jnp.sum(mask, axis=1).astype(jnp.int32)  # (B,) real tokens so far

            def cond(state):
                step, finished = state[0], state[4]
                return (step < new) & ~jnp.all(finished)

            def body(state):
                step, logits, cache, buffer, finished, full_mask, count, key = state
                key, sub = jax.random.split(key)
                if gc.do_sample:
                    token = jax.random.categorical(sub, process_logits(logits, gc), axis=-1).astype(jnp.int32)
                else:
                    token = greedy_choice(logits)
                token = jnp.where(finished, pad, token)
                buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, step))
                if eos is not None:
                    finished = finished | jnp.any(token[:, None] == eos[None, :], axis=1)
                full_mask = jax.lax.dynamic_update_slice(
                    full_mask, jnp.ones((batch, 1), jnp.int32), (0, prompt_len + step)
                )
                count = count + 1
                positions = None
                if offsets is not None:
                    positions = (count + offsets[0])[:, None]  # (B, 1) the new token's position
                # The last token needs no forward pass (its logits would be thrown away).
                logits, cache = jax.lax.cond(
                    (step + 1 < new) & ~jnp.all(finished),
                    lambda: forward(params, cache, token[:, None], positions, full_mask),
                    lambda: (logits, cache),
                )
                return step + 1, logits, cache, buffer, finished, full_mask, count, key

            state = (jnp.int32(0), logits, cache, buffer, finished, full_mask, count, key)
            state = jax.lax.while_loop(cond, body, state)
            return jnp.concatenate([ids, state[3]], axis=1), state[0]

        return run
