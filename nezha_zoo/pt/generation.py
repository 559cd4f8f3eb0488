"""Text generation for the PyTorch causal LMs: an eager loop over the model's key/value cache.

A causal-LM class mixes in :class:`GenerationMixin` and declares ``generation_position_rule``
(see :data:`nezha_zoo.generation.POSITION_RULES`; ``None`` for models without position ids).

Semantics follow transformers 4.57.6's PyTorch ``generate``: greedy decoding and sampling
(``_sample``), beam search (``_beam_search``: ``2 * num_beams`` candidates per row, finished
hypotheses kept per row with the length penalty, ``early_stopping`` True / False / ``"never"``), and
the logits processors in transformers' order (:func:`apply_processors`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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
from nezha_zoo.pt.layers import select_cache_rows

__all__ = ["GenerationMixin", *GENERATION_FUNCTIONS]

#: transformers' beam search marks impossible candidates by adding this (not -inf, so sums stay finite).
_NEG = -1.0e9


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


def apply_repetition_penalty(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: (R, V) scores, (R, L) int64 ids -> (R, V).

    Every token present in its row of ``sequences`` (prompt and pads included) has its score divided
    by ``penalty`` when positive and multiplied by it when negative (once, however often it occurs).
    """
    picked = scores.gather(1, sequences)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, sequences, picked)


def ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """transformers' ``NoRepeatNGramLogitsProcessor``: (R, V) scores -> (R, V).

    Args:
        sequences: (R, >= length) int64 ids; the first ``length`` columns are the sequence so far.
        length (int): filled columns.
        n (int): n-gram size (>= 1).

    A token that would complete an ``n``-gram already present in the row (its last ``n - 1`` tokens
    followed by that token) gets -inf.
    """
    windows = length - n + 1  # n-grams present so far
    if windows < 1:
        return scores
    seq = sequences[:, :length]
    grams = seq.unfold(1, n, 1)  # (R, windows, n)
    prefix = seq[:, length - n + 1 :]  # (R, n - 1): the tokens a new n-gram would start with
    match = (grams[:, :, : n - 1] == prefix[:, None, :]).all(dim=-1)  # (R, windows)
    # scatter_add (not scatter) so that a token both matched and unmatched counts as banned
    hits = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    hits.scatter_add_(1, grams[:, :, -1], match.to(torch.int32))
    return scores.masked_fill(hits > 0, float("-inf"))


def ban_bad_words(
    scores: torch.Tensor, sequences: torch.Tensor, length: int, bad_words_ids: tuple[tuple[int, ...], ...]
) -> torch.Tensor:
    """transformers' ``NoBadWordsLogitsProcessor``: (R, V) scores -> (R, V).

    A one-token entry gets -inf always; a longer one gets -inf for its last token in the rows whose
    first ``length`` columns of ``sequences`` end with its other tokens (skipped while the sequence
    is shorter than the entry).  Pass :func:`nezha_zoo.generation.effective_bad_words` (eos entries
    dropped, as transformers).
    """
    banned = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for word in bad_words_ids:
        if len(word) == 1:
            banned[:, word[0]] = True
        elif len(word) <= length:
            prefix = torch.tensor(word[:-1], dtype=sequences.dtype, device=sequences.device)
            ends_with = (sequences[:, length - len(prefix) : length] == prefix).all(dim=-1)  # (R,)
            banned[:, word[-1]] |= ends_with
    return scores.masked_fill(banned, float("-inf"))


def suppress_eos(scores: torch.Tensor, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """Every eos column to -inf (the min-new-tokens rule while too few tokens exist). (R, V) -> (R, V)."""
    if not eos_ids:
        return scores
    scores = scores.clone()
    scores[:, list(eos_ids)] = float("-inf")
    return scores


def apply_processors(
    scores: torch.Tensor, sequences: torch.Tensor, length: int, step: int, gc: GenerationConfig
) -> torch.Tensor:
    """The logits processors in transformers' order: repetition penalty, n-gram ban, bad words, min length.

    Args:
        scores: (R, V) float32: logits (greedy, sampling) or log-probabilities (beam search).
        sequences: (R, >= length) int64 ids so far, prompt (and left pads) included.
        length (int): filled columns of ``sequences``.
        step (int): new tokens generated so far (0 at the first step).
        gc: the settings.

    Returns:
        (R, V) processed scores (sampling warpers not applied: see :func:`process_logits`).
    """
    if gc.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences[:, :length], gc.repetition_penalty)
    if gc.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, sequences, length, gc.no_repeat_ngram_size)
    bad_words = effective_bad_words(gc)
    if bad_words:
        scores = ban_bad_words(scores, sequences, length, bad_words)
    if step < gc.min_new_tokens:
        scores = suppress_eos(scores, gc.eos_ids)
    return scores


def _reorder_cache(past: Any, rows: torch.Tensor, pool: _CachePool | None = None) -> Any:
    """The cache with its batch rows picked by ``rows`` (beam search): every tensor along dim 0.

    A 4-d (B, H, L, D) tensor is gathered into a buffer with free slots that the next step appends to
    in place (from ``pool`` when given, else a fresh one); other tensors by ``index_select``.
    """
    if past is None:
        return None
    if isinstance(past, torch.Tensor):
        if past.dim() != 4:
            return past.index_select(0, rows)
        return select_cache_rows(past, rows) if pool is None else pool.select(past, rows)
    if isinstance(past, (tuple, list)):
        return type(past)(_reorder_cache(p, rows, pool) for p in past)
    if callable(getattr(past, "reorder_cache", None)):  # a cache object that reorders itself
        past.reorder_cache(rows)
        return past
    raise TypeError(f"cannot reorder a past_key_values of type {type(past).__name__} for beam search")


class _CachePool:
    """Beam search's key/value buffers: (R, H, ``capacity``, D) tensors, reused step after step.

    Each reorder gathers a cache tensor's rows into a free buffer of the pool, then returns the
    buffer the tensor lived in to the pool (the loop owns its cache and drops the old one): two
    buffers per tensor alternate over the whole decode.  A fresh buffer every step, as
    :func:`select_cache_rows` alone allocates, is fresh memory from the OS at these sizes (page
    faults and cache misses on every step: about a tenth of a 4-beam decode at batch 8).

    Args:
        capacity (int): positions per buffer: the longest cache of the decode (prompt + new tokens).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def select(self, past: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``past.index_select(0, rows)`` for a (B, H, L, D) cache tensor, as a view of a pool buffer."""
        shape = (rows.numel(), past.shape[1], self.capacity, past.shape[3])
        key = (shape, past.dtype, past.device)
        free = self._free.setdefault(key, [])
        into = free.pop() if free else past.new_empty(shape)
        picked = select_cache_rows(past, rows, into=into)
        base = past._base  # the buffer past is a view of: free again once past is dropped
        if (
            base is not None
            and base is not into
            and tuple(base.shape) == shape
            and base.is_contiguous()
            and past.data_ptr() == base.data_ptr()
        ):
            free.append(base)
        return picked


def _gather_beams(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j], ...]``: (B, K, ...) with (B, J) indices -> (B, J, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class GenerationMixin:
    """``generate`` for a PyTorch causal LM (the class sets ``generation_position_rule``).

    The model's ``forward`` must take ``input_ids``, ``attention_mask``, ``past_key_values``,
    ``use_cache``, ``logits_to_keep`` (:func:`nezha_zoo.generation.keep_last_positions`; and
    ``position_ids`` unless the rule is None) and return ``logits`` and
    ``past_key_values`` (a tuple per layer of (B, H, L, D) tensors, reordered along dim 0 for beams).
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
        generation_config: GenerationConfig | None = None,
        streamer: Any = None,
        **settings: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Continue each prompt row by greedy decoding, sampling or beam search.

        Args:
            input_ids: (B, P) int prompt ids (tensor or array), left-padded in a batch.
            attention_mask: (B, P) 0/1, zeros on the left pads; default ones.
            generation_config (GenerationConfig | None): the base settings (default: the model
                config's eos/pad).
            streamer: transformers' streamer protocol (``put``/``end``) or a callable: receives the
                prompt (B, P) once, then each new column (B*R,) (int32 numpy), then ``end()``.
                Not with beam search (``ValueError``, as transformers).
            **settings: :class:`nezha_zoo.generation.GenerationConfig` fields overriding
                ``generation_config`` (``max_new_tokens``, ``max_length``, ``min_new_tokens``,
                ``num_beams``, ``repetition_penalty``, ...); an unknown name raises ``TypeError``
                naming close matches.

        Returns:
            By default (B*R, P + n) int64 ids, ``R = num_return_sequences``, the prompt included,
            ``n <= max_new_tokens``.  Greedy/sampling: decoding stops once every row has emitted an
            eos, a finished row holds ``pad_token_id`` after its eos.  Beam search: the best ``R``
            hypotheses per row, best first, shorter ones padded with ``pad_token_id``.
            With ``return_dict_in_generate=True`` a :class:`GenerateDecoderOnlyOutput` (``scores``:
            n processed (B*R, V) tensors with ``output_scores``; ``logits``: n raw ones with
            ``output_logits``) or, for beams, a :class:`GenerateBeamDecoderOnlyOutput`
            (``sequences_scores`` (B*R,) with ``output_scores``; ``scores``/``logits`` n tensors
            (B*num_beams, V); ``beam_indices`` (B*R, n)).

        Sampling with a ``seed`` uses its own ``torch.Generator`` (same seed, same tokens);
        ``seed=None`` uses torch's global RNG.  Every check (settings, prompt, lengths, streamer)
        runs before the first forward pass.
        """
        rule = self._generation_rule()
        gc, ids_np, mask_np = prepare_generation(
            self.config, rule, generation_config, input_ids, attention_mask, **settings
        )
        streamer = check_streamer(streamer, gc)
        device = next(self.parameters()).device
        ids = torch.from_numpy(ids_np.astype(np.int64)).to(device)  # (B, P)
        mask = torch.from_numpy(mask_np.astype(np.int64)).to(device)  # (B, P)
        rows = gc.rows_per_prompt
        if rows > 1:
            ids, mask = ids.repeat_interleave(rows, dim=0), mask.repeat_interleave(rows, dim=0)
        was_training = self.training
        self.eval()
        try:
            if gc.is_beam_search:
                return self._beam_search(ids, mask, gc, rule)
            if streamer is not None:
                streamer.put(ids_np.copy())  # the prompt (B, P), before the rows are repeated
            return self._sample(ids, mask, gc, rule, streamer)
        finally:
            self.train(was_training)

    def _step(self, step_ids: torch.Tensor, mask: torch.Tensor, past: Any, offsets: Any) -> tuple[Any, Any]:
        """One forward pass over the new columns ``step_ids`` (R, S) given the full mask (R, L)."""
        inputs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask}
        if offsets is not None:
            offset, pad_value = offsets
            positions = torch.where(mask == 1, mask.cumsum(-1) + offset, pad_value)  # (R, L)
            inputs["position_ids"] = positions[:, -step_ids.shape[1] :]
        # logits_to_keep=1: the LM head on the last position only (the prompt's pass computes P of them)
        out = self(**inputs, past_key_values=past, use_cache=True, return_dict=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values

    def _sample(
        self, ids: torch.Tensor, mask: torch.Tensor, gc: GenerationConfig, rule: str | None, streamer: Any
    ) -> Any:
        """Greedy decoding or sampling (transformers' ``_sample``) over (R, P) rows."""
        device = ids.device
        offsets = position_offsets(rule, self.config)
        generator = None
        if gc.do_sample and gc.seed is not None:
            generator = torch.Generator(device=device).manual_seed(gc.seed)
        eos = torch.tensor(gc.eos_ids, dtype=torch.int64, device=device)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        all_scores: list[torch.Tensor] = []
        all_logits: list[torch.Tensor] = []
        past, step_ids, out_ids = None, ids, ids
        for step in range(gc.max_new_tokens):
            logits, past = self._step(step_ids, mask, past, offsets)  # (R, V)
            scores = apply_processors(logits, out_ids, out_ids.shape[1], step, gc)
            if gc.do_sample:
                scores = process_logits(scores, gc)
                token = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = greedy_choice(scores)
            if gc.return_dict_in_generate:
                all_scores.append(scores)
                all_logits.append(logits)
            if gc.pad_token_id is not None:
                token = torch.where(finished, torch.full_like(token, gc.pad_token_id), token)
            out_ids = torch.cat([out_ids, token[:, None]], dim=1)
            if streamer is not None:
                streamer.put(token.cpu().numpy().astype(np.int32))
            if eos.numel():
                finished = finished | torch.isin(token, eos)
                if bool(finished.all()):
                    break
            step_ids = token[:, None]  # (R, 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if streamer is not None:
            streamer.end()
        steps = out_ids.shape[1] - ids.shape[1]
        return generate_outputs(gc, ids.shape[1], out_ids, steps, all_scores, all_logits)

    def _beam_search(self, ids: torch.Tensor, mask: torch.Tensor, gc: GenerationConfig, rule: str | None) -> Any:
        """transformers' ``_beam_search`` over (B*K, P) rows (each prompt row repeated K = num_beams times).

        Running beams and finished hypotheses live in (B, K, P + max_new_tokens) buffers; each step
        keeps the top ``max(2, 1 + #eos) * K`` candidates, moves those in the top K that end (eos or
        the last step) into the finished set (scored ``sum_logprobs / new_length ** length_penalty``),
        continues with the best K that do not, and reorders the cache to follow them.
        """
        device = ids.device
        num_beams, prompt_len = gc.num_beams, ids.shape[1]
        batch = ids.shape[0] // num_beams
        max_len = prompt_len + gc.max_new_tokens
        eos = torch.tensor(gc.eos_ids, dtype=torch.int64, device=device)
        keep = max(2, 1 + len(gc.eos_ids)) * num_beams
        in_top = torch.arange(keep, device=device) < num_beams  # (keep,): candidates that may finish
        fill = gc.pad_token_id if gc.pad_token_id is not None else 0  # past a hypothesis' end
        offsets = position_offsets(rule, self.config)
        early, penalty = gc.early_stopping, gc.length_penalty

        running = torch.full((batch, num_beams, max_len), fill, dtype=torch.int64, device=device)
        running[:, :, :prompt_len] = ids.view(batch, num_beams, prompt_len)
        done_seqs = running.clone()
        running_scores = torch.zeros((batch, num_beams), dtype=torch.float32, device=device)
        running_scores[:, 1:] = _NEG  # all beams start equal: only the first one may expand
        done_scores = torch.full((batch, num_beams), _NEG, dtype=torch.float32, device=device)
        done = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
        improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        running_beams = torch.full((batch, num_beams, gc.max_new_tokens), -1, dtype=torch.int32, device=device)
        done_beams = running_beams.clone()
        row_offset = torch.arange(batch, device=device).view(-1, 1) * num_beams
        all_scores: list[torch.Tensor] = []
        all_logits: list[torch.Tensor] = []

        # The K copies of a prompt row are alike until the first choice: run the prompt once per
        # row (a quarter of the prompt's work at 4 beams) and copy its cache rows K times.
        pool = _CachePool(max_len)
        logits, past = self._step(ids[::num_beams], mask[::num_beams], None, offsets)  # (B, V)
        copies = torch.arange(batch, device=device).repeat_interleave(num_beams)  # (B*K,)
        logits, past = logits.index_select(0, copies), _reorder_cache(past, copies, pool)
        cur_len = prompt_len
        while True:
            flat = running[:, :, :cur_len].reshape(batch * num_beams, cur_len)
            log_probs = apply_processors(torch.log_softmax(logits, dim=-1), flat, cur_len, cur_len - prompt_len, gc)
            if gc.return_dict_in_generate:
                all_scores.append(log_probs)
                all_logits.append(logits)
            vocab = log_probs.shape[-1]
            totals = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)

            # the best `keep` continuations over all beams of a row
            cand_scores, cand = torch.topk(totals, k=keep)  # (B, keep)
            cand_beam, cand_token = cand // vocab, cand % vocab
            cand_seqs = _gather_beams(running, cand_beam)
            cand_seqs[:, :, cur_len] = cand_token
            cand_beams = _gather_beams(running_beams, cand_beam)
            cand_beams[:, :, cur_len - prompt_len] = (cand_beam + row_offset).to(torch.int32)
            ends = torch.isin(cand_token, eos) if eos.numel() else torch.zeros_like(cand_token, dtype=torch.bool)
            if cur_len + 1 >= max_len:
                ends = torch.ones_like(ends)

            # running beams for the next step: the best K candidates that did not end
            live_scores = cand_scores + ends.to(torch.float32) * _NEG
            nxt = torch.topk(live_scores, k=num_beams)[1]
            running = _gather_beams(cand_seqs, nxt)
            running_scores = _gather_beams(live_scores, nxt)
            running_beams = _gather_beams(cand_beams, nxt)

            # finished hypotheses: merge the top-K candidates that ended into the best K so far
            just_done = ends & in_top[None, :]
            final = cand_scores / ((cur_len + 1 - prompt_len) ** penalty)
            final += (done.all(dim=-1, keepdim=True) & (early is True)).to(torch.float32) * _NEG
            final += (~improvable).to(torch.float32) * _NEG
            final += (~just_done) * _NEG
            best = torch.topk(torch.cat((done_scores, final), dim=1), k=num_beams)[1]
            done_seqs = _gather_beams(torch.cat((done_seqs, cand_seqs), dim=1), best)
            done_scores = _gather_beams(torch.cat((done_scores, final), dim=1), best)
            done_beams = _gather_beams(torch.cat((done_beams, cand_beams), dim=1), best)
            done = _gather_beams(torch.cat((done, just_done), dim=1), best)

            source = running_beams[:, :, cur_len - prompt_len].reshape(-1).to(torch.int64)
            cur_len += 1
            # can a running beam still beat the worst finished hypothesis?
            if early == "never" and penalty > 0.0:
                best_len = max_len - prompt_len
            else:
                best_len = cur_len - prompt_len
            best_possible = running_scores[:, :1] / (best_len**penalty)
            worst = torch.where(done, torch.min(done_scores, dim=1, keepdim=True)[0], _NEG)
            improvable = improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
            if not (bool(improvable.any()) and not (bool(done.all()) and early is True) and not bool(ends.all())):
                break
            past = _reorder_cache(past, source, pool)
            step_ids = running[:, :, cur_len - 1].reshape(-1, 1)
            mask = torch.cat([mask.index_select(0, source), torch.ones_like(mask[:, :1])], dim=1)
            logits, past = self._step(step_ids, mask, past, offsets)  # (B*K, V)

        count = gc.num_return_sequences
        sequences = done_seqs[:, :count].reshape(batch * count, max_len)
        seq_scores = done_scores[:, :count].reshape(batch * count)
        beam_indices = done_beams[:, :count].reshape(batch * count, gc.max_new_tokens)
        generated = int((beam_indices != -1).sum(dim=1).max())  # counted here: the tensor may be on a GPU
        return generate_outputs(
            gc, prompt_len, sequences, len(all_logits), all_scores, all_logits, seq_scores, beam_indices, generated
        )
