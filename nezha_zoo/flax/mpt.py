"""MPT in Flax linen: ALiBi attention, the decoder-only base model, four heads and their wrappers.

MPT is the one decoder-only family, so its attention, block and model live here rather than in the
shared BERT-style blocks.  At the config defaults the numbers are transformers 4.57.6's PyTorch
``MptModel``: pre-LN blocks with weight-only LayerNorms, a fused bias-free ``Wqkv``, ALiBi biases
instead of position embeddings, a float32 softmax, an exact-GELU MLP and ``lm_head`` tied to ``wte``.

The MosaicML (llm-foundry) settings transformers ignores are honoured, as llm-foundry defines them:

- ``no_bias=False``: every linear layer and LayerNorm of the base model has a bias (as the spec says).
- ``expansion_ratio``: the MLP is ``expansion_ratio * d_model`` wide.
- ``attn_config.attn_type="multiquery_attention"``: one key/value head shared by all query heads.
- ``attn_config.qk_ln``: LayerNorms ``q_ln``/``k_ln`` over the whole query/key projections, before
  the heads are split (epsilon ``layer_norm_epsilon``).
- ``attn_config.clip_qkv``: the fused projection is clamped to ``+-clip_qkv`` (before ``qk_ln``).
- ``attn_config.softmax_scale``: the score scale instead of ``1 / sqrt(head_dim)``.
- ``attn_config.alibi_bias_max``: the ALiBi slopes' maximum exponent (transformers always uses 8).
- ``logit_scale``: multiplies the LM logits (a number, or ``"inv_sqrt_d_model"`` = ``1 / sqrt(d_model)``).

Dropouts follow transformers: ``attn_pdrop`` on the attention probabilities, on the attention
output and on the MLP output; ``resid_pdrop`` and ``emb_pdrop`` are not used.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nezha_zoo.families.mpt import MPT
from nezha_zoo.flax.generation import FlaxGenerationMixin
from nezha_zoo.flax.heads import split_qa_logits, tied_embedding_table
from nezha_zoo.flax.layers import (
    ACT2FN,
    POSITIONS_TO_KEEP_DOC,
    Dropout,
    bf16_einsum,
    check_positions_to_keep,
    dense,
    keep_positions,
    layer_norm,
    update_kv_cache,
)
from nezha_zoo.flax.modeling_utils import (
    FlaxHeadModule,
    FlaxPreTrainedModel,
    cache_info,
    finish_output,
    validate_inputs,
)
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
)
from nezha_zoo.validation import InputError, check_length

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "FlaxMptAttention",
    "FlaxMptBlock",
    "FlaxMptModule",
    "FlaxMptForCausalLMModule",
    "FlaxMptForSequenceClassificationModule",
    "FlaxMptForTokenClassificationModule",
    "FlaxMptForQuestionAnsweringModule",
    "FlaxMptPreTrainedModel",
    "FlaxMptModel",
    "FlaxMptForCausalLM",
    "FlaxMptForSequenceClassification",
    "FlaxMptForTokenClassification",
    "FlaxMptForQuestionAnswering",
]


# --- ALiBi ------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int, alibi_bias_max: int = 8) -> np.ndarray:
    """The per-head ALiBi slopes, (num_heads,) float32.

    With ``P`` the next power of two of ``num_heads``, slope ``k`` (1-based) is
    ``2 ** -(k * alibi_bias_max / P)``; when ``P != num_heads`` the odd-indexed slopes come first, then
    the even ones, cut to ``num_heads`` (MosaicML's rule, which transformers copies with the maximum
    fixed at 8).  Computed in float32 as transformers does.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    power = 2 ** math.ceil(math.log2(num_heads))
    base = np.arange(1, power + 1, dtype=np.float32) * np.float32(alibi_bias_max / power)
    slopes = (np.float32(1.0) / np.power(np.float32(2.0), base)).astype(np.float32)
    if power != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def alibi_bias(slopes: np.ndarray, key_length: int, last_position: Any, dtype: Any = jnp.float32) -> jax.Array:
    """ALiBi biases of keys ``0 .. key_length - 1``: (1, heads, 1, key_length).

    Key ``j`` gets ``slope * (j - last_position)``: it depends on the key only (softmax ignores the
    per-row constant), so every query row shares it.  transformers measures from the last key
    (``last_position = past + L - 1``); with a fixed cache the same ``last_position`` gives the same
    numbers on the filled slots.  ``last_position`` may be traced.
    """
    offsets = jnp.arange(key_length, dtype=jnp.int32) - jnp.asarray(last_position, jnp.int32)  # (Lk,)
    bias = jnp.asarray(slopes, jnp.float32)[:, None] * offsets.astype(jnp.float32)[None, :]  # (heads, Lk)
    return bias[None, :, None, :].astype(dtype)


# --- layers -----------------------------------------------------------------------------------------


def _norm(name: str, config: Any, dtype: Any) -> nn.LayerNorm:
    """MPT's LayerNorm: weight only unless ``no_bias=False``, epsilon ``layer_norm_epsilon``."""
    return layer_norm(name, config, dtype, eps=config.layer_norm_epsilon, use_bias=not config.no_bias)


def _linear(features: int, name: str, config: Any, dtype: Any) -> nn.Dense:
    """A base-model linear layer: bias-free unless ``no_bias=False``."""
    return dense(features, name, config, dtype, use_bias=not config.no_bias)


class FlaxMptAttention(nn.Module):
    """MPT self-attention (``attn``): fused ``Wqkv``, optional ``q_ln``/``k_ln``, ALiBi, ``out_proj``.

    Causal, with a fixed-size key/value cache in the ``"cache"`` collection (``cached_key`` /
    ``cached_value`` (B, max_length, kv_heads, head_dim), ``cache_index``).

    Attributes:
        config (MptConfig): model configuration (``attn_config`` included).
        dtype (jnp.dtype): computation dtype.

    Call args:
        hidden_states: (B, L, d_model), already normed.
        attention_mask: (B, Lk) 0/1 key mask or None (with a cache Lk is the cache's max_length).
        init_cache (bool): create the cache collection.
        deterministic (bool): dropout off.
        positions_to_keep: (B, R) int or None: queries (and the output) at these rows only; keys and
            values at every row (``Wqkv``'s query columns project the kept rows only).

    Returns:
        ``(output (B, L, d_model), probabilities (B, heads, L, Lk))``; L = R with ``positions_to_keep``.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, hidden_states, attention_mask=None, init_cache=False, deterministic=True, positions_to_keep=None
    ):
        c, ac = self.config, self.config.attn_config
        d, heads = c.d_model, c.n_heads
        head_dim = d // heads
        _, kv_width, _ = c.qkv_widths
        kv_heads = kv_width // head_dim
        bsz, q_len = hidden_states.shape[:2]
        keep = positions_to_keep

        wqkv = _linear(d + 2 * kv_width, "Wqkv", c, self.dtype)
        if keep is not None:
            # The query columns of Wqkv on the kept rows only, its key/value columns on every row (the
            # clip and the LayerNorms act per element and per row: the same numbers as the full product's).
            # The R kept rows take the whole kernel: a column slice of it is a strided copy under XLA
            # (for the key/value columns, 1.8 ms of the 5 ms it saves at d_model 768, 1024 rows).
            q = wqkv(keep_positions(hidden_states, keep))[..., :d]  # (B, R, d)
            kv = wqkv(hidden_states, columns=(d, d + 2 * kv_width))  # (B, L, 2 * kv_width)
            if ac.clip_qkv:
                q, kv = jnp.clip(q, -ac.clip_qkv, ac.clip_qkv), jnp.clip(kv, -ac.clip_qkv, ac.clip_qkv)
            k, v = jnp.split(kv, [kv_width], axis=-1)
        else:
            qkv = wqkv(hidden_states)  # (B, L, d + 2 * kv_width)
            if ac.clip_qkv:
                qkv = jnp.clip(qkv, -ac.clip_qkv, ac.clip_qkv)
            q, k, v = jnp.split(qkv, [d, d + kv_width], axis=-1)  # query | key | value columns
        if ac.qk_ln:
            q = _norm("q_ln", c, self.dtype)(q)
            k = _norm("k_ln", c, self.dtype)(k)
        rows_len = q.shape[1]
        q = q.reshape(bsz, rows_len, heads, head_dim)  # (B, L, d) -> (B, L, heads, head_dim)
        k = k.reshape(bsz, q_len, kv_heads, head_dim)  # (B, L, kv_heads * head_dim) -> (B, L, kv_heads, head_dim)
        v = v.reshape(bsz, q_len, kv_heads, head_dim)

        cached = self.has_variable("cache", "cached_key")
        if cached or init_cache:
            k, v, past = update_kv_cache(self, k, v, cached)
        else:
            past = 0
        k_len = k.shape[1]
        if kv_heads != heads:  # multi-query: every query head reads the one key/value head
            k = jnp.broadcast_to(k, (bsz, k_len, heads, head_dim))
            v = jnp.broadcast_to(v, (bsz, k_len, heads, head_dim))

        scale = ac.softmax_scale if ac.softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        scores = bf16_einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, self.dtype)
        last = jnp.asarray(past, jnp.int32) + q_len - 1  # the newest key's index
        scores = scores + alibi_bias(alibi_slopes(heads, ac.alibi_bias_max), k_len, last, self.dtype)
        # Query i sits at index past + i and sees keys j <= past + i that the mask keeps.
        rows = jnp.arange(q_len, dtype=jnp.int32)[None] if keep is None else keep  # (1, L) or (B, R)
        rows = jnp.asarray(past, jnp.int32) + rows
        visible = (jnp.arange(k_len, dtype=jnp.int32)[None, None, :] <= rows[:, :, None])[:, None]  # (B|1, 1, L, Lk)
        if attention_mask is not None:
            visible = visible & (attention_mask[:, None, None, :] != 0)
        # Hidden scores are replaced, not shifted (transformers' masked_fill): a row with no visible
        # key (a left-pad query) becomes uniform, exactly as there.
        scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        probs = Dropout(ac.attn_pdrop, name="attn_dropout")(probs, deterministic, keep, q_len, axis=2)
        context = bf16_einsum("bhqk,bkhd->bqhd", probs, v).reshape(bsz, rows_len, d)  # merge heads: (B, L, d)
        return _linear(d, "out_proj", c, self.dtype)(context), probs


class FlaxMptMLP(nn.Module):
    """MPT's feed-forward (``ffn``): ``up_proj`` (d -> expansion_ratio * d), exact GELU, ``down_proj``.

    Call args: hidden_states (B, L, d_model).  Returns (B, L, d_model), before dropout and residual.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        c = self.config
        h = ACT2FN["gelu"](_linear(c.expansion_ratio * c.d_model, "up_proj", c, self.dtype)(hidden_states))
        return _linear(c.d_model, "down_proj", c, self.dtype)(h)


class FlaxMptBlock(nn.Module):
    """One pre-LN decoder block: ``norm_1``, ``attn``, residual; ``norm_2``, ``ffn``, residual.

    Positional call args (so ``nn.remat`` can mark the flags static): hidden_states (B, L, d_model),
    attention_mask (B, Lk) 0/1 or None, init_cache, deterministic, positions_to_keep (B, R) int or
    None (queries, residuals and ``ffn`` at those rows only).

    Returns:
        ``(hidden (B, L, d_model), attention probabilities (B, heads, L, Lk))``; L = R with
        ``positions_to_keep``.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, hidden_states, attention_mask=None, init_cache=False, deterministic=True, positions_to_keep=None
    ):
        c = self.config
        keep, length = positions_to_keep, hidden_states.shape[1]
        rate = c.attn_config.attn_pdrop  # transformers uses attn_pdrop on both residual branches
        attn_out, probs = FlaxMptAttention(c, self.dtype, name="attn")(
            _norm("norm_1", c, self.dtype)(hidden_states), attention_mask, init_cache, deterministic, keep
        )
        residual = hidden_states if keep is None else keep_positions(hidden_states, keep)
        h = Dropout(rate, name="resid_attn_dropout")(attn_out, deterministic, keep, length) + residual
        ffn_out = FlaxMptMLP(c, self.dtype, name="ffn")(_norm("norm_2", c, self.dtype)(h))
        return Dropout(rate, name="ffn_dropout")(ffn_out, deterministic, keep, length) + h, probs


class _FlaxMptBlocks(nn.Module):
    """The ``blocks`` list: children ``"0"``, ``"1"``..., optionally rematerialised.

    ``positions_to_keep`` (B, R) int or None reaches the last block only (its output is (B, R, d_model)).

    Returns ``(hidden, per-block inputs (n_layers) or None, per-block probabilities or None)``.
    """

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        positions_to_keep=None,
    ):
        c = self.config
        cache = init_cache or bool(self.variables.get("cache"))
        flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions, use_cache=cache)
        positions_to_keep = check_positions_to_keep(positions_to_keep, hidden_states.shape[:2], flags)
        # static_argnums counts the module as argument 0: init_cache and deterministic.
        block_cls = nn.remat(FlaxMptBlock, static_argnums=(3, 4)) if self.gradient_checkpointing else FlaxMptBlock
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for i in range(c.n_layers):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, probs = block_cls(c, self.dtype, name=str(i))(
                hidden_states,
                attention_mask,
                init_cache,
                deterministic,
                positions_to_keep if i == c.n_layers - 1 else None,
            )
            if output_attentions:
                all_attn += (probs,)
        return hidden_states, all_hidden, all_attn


_MODULE_DOC = """
    Attributes:
        config (MptConfig): model configuration.
        dtype (jnp.dtype): computation dtype (params are float32).
        gradient_checkpointing (bool): rematerialise blocks in the backward pass.

    Call args (all optional but one of ``input_ids``/``inputs_embeds``):
        input_ids: (B, L) int ids.
        attention_mask: (B, L) 0/1, default ones; with a cache (B, max_length) over all cache slots
            (1 = a real token written before or now, 0 = padding or an empty slot).
        inputs_embeds: (B, L, d_model) instead of ``input_ids``.{cache}
        deterministic (bool): dropout off.
        output_attentions, output_hidden_states, return_dict (bool).
"""
_CACHE_DOC = """
        init_cache (bool): create the ``"cache"`` collection (used by the wrapper's ``init_cache``)."""


class FlaxMptModule(nn.Module):
    """The MPT decoder (``transformer``): ``wte``, the ``blocks``, ``norm_f``; no position embeddings.

    Returns ``BaseModelOutputWithPastAndCrossAttentions``: ``last_hidden_state`` (B, L, d_model) after
    ``norm_f``; ``hidden_states`` (n_layers + 1) x (B, L, d_model) (each block's input, then the
    normed output); ``attentions`` n_layers x (B, heads, L, Lk).  With ``positions_to_keep``
    ``last_hidden_state`` is (B, R, d_model) (``norm_f`` applies to those rows).
    """

    __doc__ += _MODULE_DOC.format(cache=_CACHE_DOC) + POSITIONS_TO_KEEP_DOC

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        positions_to_keep=None,
    ):
        c = self.config
        # Direct module users get the wrapper's checks too (values only when concrete, i.e. not under jit).
        past_len, cache_len = (0, None) if init_cache else cache_info(self.variables.get("cache"))
        validate_inputs(
            c,
            input_ids,
            attention_mask,
            None,
            None,
            inputs_embeds,
            past_len=past_len,
            cache_length=cache_len,
            embed_width=c.d_model,
            positions=False,
        )
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        # transformers' ALiBi table has max_seq_len columns: longer inputs fail there, clearly here.
        check_length(seq_len, past_len, c.max_seq_len, "max_seq_len")
        wte = nn.Embed(
            c.vocab_size,
            c.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(c.initializer_range),
            name="wte",
        )
        h = wte(input_ids.astype("i4")) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        h, all_hidden, all_attn = _FlaxMptBlocks(
            c, self.dtype, gradient_checkpointing=self.gradient_checkpointing, name="blocks"
        )(h, attention_mask, init_cache, deterministic, output_attentions, output_hidden_states, positions_to_keep)
        h = _norm("norm_f", c, self.dtype)(h)
        if output_hidden_states:
            all_hidden += (h,)
        return finish_output(
            BaseModelOutputWithPastAndCrossAttentions,
            return_dict,
            last_hidden_state=h,
            hidden_states=all_hidden,
            attentions=all_attn,
        )


class _MptHead(FlaxHeadModule):
    """Shared fields of the head modules; ``_backbone`` runs the ``transformer`` submodule."""

    backbone_class = FlaxMptModule
    backbone_name = "transformer"


def logit_scale(config: Any) -> float | None:
    """llm-foundry's LM logit multiplier: ``config.logit_scale``, ``"inv_sqrt_d_model"`` -> 1/sqrt(d_model)."""
    scale = config.logit_scale
    if scale == "inv_sqrt_d_model":
        return 1.0 / math.sqrt(config.d_model)
    return None if scale is None else float(scale)


class FlaxMptForCausalLMModule(_MptHead):
    """Causal LM: ``lm_head`` (tied to ``transformer.wte`` unless ``tie_word_embeddings=False``) -> (B, L, V).

    The logits are multiplied by ``logit_scale`` when the config sets one (llm-foundry);
    ``logits_to_keep`` (static int): the head on the last this many positions only (0: all).
    Returns ``CausalLMOutputWithCrossAttentions``.
    """

    __doc__ += _MODULE_DOC.format(cache=_CACHE_DOC)

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        logits_to_keep: int = 0,
    ):
        c = self.config

        def head(base, out):
            h = keep_last_positions(out.last_hidden_state, logits_to_keep)  # (B, L', d)
            table = tied_embedding_table(base, c, "ForCausalLM")  # (V, d) or None when untied
            if table is None:
                logits = dense(c.vocab_size, "lm_head", c, self.dtype, use_bias=False)(h)
            else:
                logits = bf16_einsum("bld,vd->blv", h, jnp.asarray(table, self.dtype))  # h @ wte.T
            scale = logit_scale(c)
            if scale is not None:
                logits = logits * jnp.asarray(scale, logits.dtype)
            return {"logits": logits}

        return self._head_output(locals(), CausalLMOutputWithCrossAttentions, head)


def last_token_index(config: Any, input_ids, batch_size: int):
    """The position each row's sequence classification reads, as transformers' MPT computes it.

    The rightmost token that is not ``pad_token_id`` (left or right padding alike; 0 for a row of
    pads); the last position when there are no ids (``inputs_embeds``) or no ``pad_token_id``, which
    is only allowed for a batch of one.  Returns (B,) int32 indices or the int -1.
    """
    if config.pad_token_id is None:
        if batch_size != 1:
            raise ValueError(
                "sequence classification pools the last non-padding token: with a batch of "
                f"{batch_size}, config.pad_token_id must be set (it is None)"
            )
        return -1
    if input_ids is None:
        return -1  # no ids to find padding in (transformers warns and does the same)
    positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
    return jnp.argmax(positions * (input_ids != config.pad_token_id).astype(jnp.int32), axis=-1)


class FlaxMptForSequenceClassificationModule(_MptHead):
    """Sequence classification: ``score`` (no bias) on the last non-padding token -> (B, num_labels).

    Returns ``SequenceClassifierOutputWithPast``.  A batch of more than one needs
    ``config.pad_token_id`` (ValueError otherwise, as transformers).
    """

    __doc__ += _MODULE_DOC.format(cache=_CACHE_DOC)

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        c = self.config
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        index = last_token_index(c, input_ids, batch_size)  # checked before the model runs
        # The last layer computes only the row the score reads: the output is (B, 1, d_model).
        keep = self._pooled_positions(locals(), index)
        read = index if keep is None else 0

        def head(_, out):
            logits = dense(c.num_labels, "score", c, self.dtype, use_bias=False)(out.last_hidden_state)
            return {"logits": logits[jnp.arange(batch_size), read]}  # (B, L, labels) -> (B, labels)

        return self._head_output(locals(), SequenceClassifierOutputWithPast, head, positions_to_keep=keep)


class FlaxMptForTokenClassificationModule(_MptHead):
    """Token classification: dropout + ``classifier`` -> (B, L, num_labels).

    The dropout rate is ``classifier_dropout``, else ``hidden_dropout``, else 0.1 (transformers' MPT).
    """

    __doc__ += _MODULE_DOC.format(cache="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        return self._token_classification(locals())


class FlaxMptForQuestionAnsweringModule(_MptHead):
    """Extractive QA: ``qa_outputs`` (d_model -> 2, whatever ``num_labels``) -> start/end logits (B, L)."""

    __doc__ += _MODULE_DOC.format(cache="")

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        def head(_, out):
            logits = dense(2, "qa_outputs", self.config, self.dtype)(out.last_hidden_state)  # (B, L, 2)
            start, end = split_qa_logits(logits)
            return {"start_logits": start, "end_logits": end}

        return self._head_output(locals(), QuestionAnsweringModelOutput, head)


# --- wrappers ---------------------------------------------------------------------------------------


class FlaxMptPreTrainedModel(FlaxPreTrainedModel):
    """Base of the MPT wrappers (see :class:`~nezha_zoo.flax.modeling_utils.FlaxPreTrainedModel`).

    MPT is decoder-only: ``FlaxMptModel``, ``FlaxMptForCausalLM`` and
    ``FlaxMptForSequenceClassification`` take a fixed-size cache from ``init_cache(batch_size,
    max_length)`` (``max_length <= config.max_seq_len``) whatever ``config.is_decoder`` says.
    """

    family = MPT
    base_model_prefix = "transformer"
    has_position_ids = False  # ALiBi: key index only
    decoder_only = True

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        past_key_values=None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        params=None,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        logits_to_keep: int = 0,
    ):
        """Run the module (transformers' MPT arguments plus the Flax extras).

        Args:
            input_ids: (B, L) int ids, or None with ``inputs_embeds``.
            attention_mask: (B, L) 0/1, default ones; with ``past_key_values`` (B, max_length) over the
                whole cache (1 = a real token already written or written now, 0 = padding or empty).
            inputs_embeds: (B, L, d_model) embeddings instead of ``input_ids``.
            past_key_values: cache from :meth:`init_cache` or a previous call (Model, CausalLM and
                SequenceClassification); the updated cache is returned in ``past_key_values``.
            output_attentions, output_hidden_states, return_dict (bool | None): config defaults when None.
            params: params tree to use instead of ``self.params``.
            dropout_rng: PRNG key for dropout (needed with ``train=True``).
            train (bool): dropout on.
            logits_to_keep (int): ``FlaxMptForCausalLM`` only: the LM head on the last this many
                positions (logits (B, min(L, logits_to_keep), V)); 0, the default, keeps all.
        """
        if past_key_values is not None and not self._accepts("init_cache"):
            raise InputError(
                f"{type(self).__name__} takes no past_key_values (cached decoding: FlaxMptModel, "
                "FlaxMptForCausalLM, FlaxMptForSequenceClassification)"
            )
        return self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=None,
            head_mask=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            params=params,
            dropout_rng=dropout_rng,
            train=train,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            logits_to_keep=logits_to_keep,
        )

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """A zero key/value cache for ``max_length`` positions (at most ``config.max_seq_len``).

        Returns the ``"cache"`` collection to pass as ``past_key_values``; with it, ``attention_mask``
        is (batch_size, max_length).
        """
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}")
        if max_length > self.config.max_seq_len:
            raise ValueError(
                f"init_cache: max_length {max_length} exceeds the model's max_seq_len ({self.config.max_seq_len})"
            )
        return super().init_cache(int(batch_size), int(max_length))


class FlaxMptModel(FlaxMptPreTrainedModel):
    """The bare MPT decoder.

    Wraps :class:`FlaxMptModule`; arguments as :class:`FlaxMptPreTrainedModel`.
    """

    head = "Model"
    module_class = FlaxMptModule


# ALiBi: no position ids; left padding works through the mask alone.
class FlaxMptForCausalLM(FlaxGenerationMixin, FlaxMptPreTrainedModel):
    """MPT causal LM.

    Wraps :class:`FlaxMptForCausalLMModule`; arguments as :class:`FlaxMptPreTrainedModel`.
    """

    head = "ForCausalLM"
    module_class = FlaxMptForCausalLMModule
    generation_position_rule = None


class FlaxMptForSequenceClassification(FlaxMptPreTrainedModel):
    """MPT sequence classifier (last token).

    Wraps :class:`FlaxMptForSequenceClassificationModule`; arguments as :class:`FlaxMptPreTrainedModel`.
    """

    head = "ForSequenceClassification"
    module_class = FlaxMptForSequenceClassificationModule


class FlaxMptForTokenClassification(FlaxMptPreTrainedModel):
    """MPT token classifier.

    Wraps :class:`FlaxMptForTokenClassificationModule`; arguments as :class:`FlaxMptPreTrainedModel`.
    """

    head = "ForTokenClassification"
    module_class = FlaxMptForTokenClassificationModule


class FlaxMptForQuestionAnswering(FlaxMptPreTrainedModel):
    """MPT extractive question answering.

    Wraps :class:`FlaxMptForQuestionAnsweringModule`; arguments as :class:`FlaxMptPreTrainedModel`.
    """

    head = "ForQuestionAnswering"
    module_class = FlaxMptForQuestionAnsweringModule
