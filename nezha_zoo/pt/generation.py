"""Text generation for the PyTorch causal LMs: an eager loop over the growing key/value cache.

A causal-LM class mixes in :class:`GenerationMixin` and declares ``generation_position_rule``
(see :data:`nezha_zoo.generation.POSITION_RULES`; ``None`` for models without position ids).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nezha_zoo.generation import (
    GenerationConfig,
    position_offsets,
    prepare_generation,
)

__all__ = ["GenerationMixin", "top_k_filter", "top_p_filter", "process_logits", "greedy_choice"]


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set logits below the ``top_k``-th largest of their row to -inf (ties kept); (B, V) -> (B, V)."""
    k = min(max(int(top_k), 1), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (transformers' ``TopPLogitsWarper``, ``min_tokens_to_keep=1``): (B, V) -> (B, V).

    Sorted ascending, the tokens whose cumulative probability stays ``<= 1 - top_p`` are removed;
    the most likely token is always kept.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1.0 - top_p)
    remove[..., -1:] = False
    remove = remove.scatter(-1, order, remove)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, gc: GenerationConfig) -> torch.Tensor:
    """The sampling warpers in transformers' order: temperature, top-k, top-p.  (B, V) float32."""
    logits = logits.float()
    if gc.temperature != 1.0:
        logits = logits / gc.temperature
    if gc.top_k > 0:
        logits = top_k_filter(logits, gc.top_k)
    if gc.top_p < 1.0:
        logits = top_p_filter(logits, gc.top_p)
    return logits


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """Argmax per row, ties to the lowest index (``torch.argmax`` returns the first maximum). (B,) int64."""
    return torch.argmax(logits, dim=-1)


class GenerationMixin:
    """``generate`` for a PyTorch causal LM (the class sets ``generation_position_rule``).

    The model's ``forward`` must take ``input_ids``, ``attention_mask``, ``past_key_values``,
    ``use_cache`` (and ``position_ids`` unless the rule is None) and return ``logits`` and
    ``past_key_values``.
    """

    #: ``"cumsum"``, ``"padding_aware"`` or None; every class declares it (no family checks).
    generation_position_rule: str | None

    def _generation_rule(self) -> str | None:
        try:
            return type(self).generation_position_rule
        except AttributeError:
            raise TypeError(
                f"{type(self).__name__} mixes in GenerationMixin but declares no generation_position_rule"
            ) from None

    @torch.no_grad()
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
        **kwargs: Any,
    ) -> torch.Tensor:
        """Continue each prompt row; returns (B, P + n) int64 ids, the prompt included.

        Args:
            input_ids: (B, P) int prompt ids (tensor or array), left-padded in a batch.
            attention_mask: (B, P) 0/1, zeros on the left pads; default ones.
            max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id, pad_token_id:
                override ``generation_config`` (see :class:`nezha_zoo.generation.GenerationConfig`;
                eos/pad default to the model config's).
            generation_config (GenerationConfig | None): the base settings.
            **kwargs: not accepted (a ``TypeError`` names them, so a misspelt setting fails loudly).

        ``n <= max_new_tokens``: decoding stops once every row has emitted an eos; a finished row
        holds ``pad_token_id`` after its eos.  Sampling with a ``seed`` uses its own
        ``torch.Generator`` (same seed, same tokens); ``seed=None`` uses torch's global RNG.
        """
        if kwargs:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(kwargs)}")
        rule = self._generation_rule()
        gc, ids_np, mask_np = prepare_generation(
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
        device = next(self.parameters()).device
        ids = torch.from_numpy(ids_np.astype(np.int64)).to(device)  # (B, P)
        mask = torch.from_numpy(mask_np.astype(np.int64)).to(device)  # (B, P), grows by one column per step
        offsets = position_offsets(rule, self.config)
        generator = None
        if gc.do_sample and gc.seed is not None:
            generator = torch.Generator(device=device).manual_seed(gc.seed)
        eos = torch.tensor(gc.eos_ids, dtype=torch.int64, device=device)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        was_training = self.training
        self.eval()
        try:
            past, step_ids, out_ids = None, ids, ids
            for _ in range(gc.max_new_tokens):
                inputs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask}
                if offsets is not None:
                    offset, pad_value = offsets
                    positions = torch.where(mask == 1, mask.cumsum(-1) + offset, pad_value)  # (B, P + t)
                    inputs["position_ids"] = positions[:, -step_ids.shape[1] :]
                out = self(**inputs, past_key_values=past, use_cache=True, return_dict=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :]  # (B, V)
                if gc.do_sample:
                    probs = process_logits(logits, gc).softmax(dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                else:
                    token = greedy_choice(logits)
                if gc.pad_token_id is not None:
                    token = torch.where(finished, torch.full_like(token, gc.pad_token_id), token)
                out_ids = torch.cat([out_ids, token[:, None]], dim=1)
                if eos.numel():
                    finished = finished | torch.isin(token, eos)
                    if bool(finished.all()):
                        break
                step_ids = token[:, None]  # (B, 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        finally:
            self.train(was_training)
        return out_ids
