"""MPT for Keras 3: the decoder-only family (causal attention with ALiBi, fused ``Wqkv``).

What transformers 4.57.6 computes at MosaicML's default settings, plus the ``MptConfig`` fields
transformers ignores, with llm-foundry's meaning:

- ``expansion_ratio``: ``ffn.up_proj`` is ``expansion_ratio * d_model`` wide (transformers: always 4).
- ``no_bias=False``: every Linear and LayerNorm of the base model has a bias (the spec declares them).
- ``attn_config.attn_type="multiquery_attention"``: one key/value head shared by all query heads.
- ``attn_config.qk_ln``: LayerNorms ``q_ln``/``k_ln`` on the whole query and key projections, before
  the heads are split.
- ``attn_config.alibi_bias_max``: the ALiBi slope exponent range (transformers: always 8).
- ``logit_scale``: multiplies the causal-LM logits (a number, or ``"inv_sqrt_d_model"``).
- ``clip_qkv`` and ``softmax_scale`` are read by transformers too.

ALiBi is always on, as in transformers (``attn_config.alibi`` is kept but not read: llm-foundry's
learned ``wpe`` for ``alibi=False`` is not part of the spec).  Dropouts follow transformers:
``attn_pdrop`` on the attention probabilities, the attention branch and the MLP branch; ``emb_pdrop``
and ``resid_pdrop`` are not used.

Two key/value caches: the growing one, a tuple per block of ``(key, value)`` each
(B, kv_heads, L, head_dim), and the fixed-size :class:`~nezha_zoo.tf.cache.KVCache` of
:meth:`TFMptPreTrainedModel.init_cache`, whose static shapes let a decoding step compile under
``tf.function(jit_compile=True)``.  ALiBi depends only on the key index (key ``j`` of either cache
has index ``j``), so no position ids are needed and left padding works through the mask alone.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.families.mpt import MPT, MptConfig
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    SequenceClassifierOutputWithPast,
)
from nezha_zoo.tf import losses
from nezha_zoo.tf.cache import KVCache, append_kv, init_kv_cache, is_fixed_cache
from nezha_zoo.tf.generation import TFGenerationMixin
from nezha_zoo.tf.heads import question_answering_output, token_classification_output
from nezha_zoo.tf.layers import (
    POSITIONS_TO_KEEP_DOC,
    Block,
    LayerList,
    _checkpointed,
    bf16_matmul,
    check_positions_to_keep,
    dense,
    dropout,
    dropout_kept_rows,
    keep_positions,
    validate_inputs,
)
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, unpack_inputs
from nezha_zoo.validation import InputError, check_length

__all__ = [
    "alibi_slopes",
    "alibi_bias",
    "mpt_attention_mask",
    "last_non_pad_index",
    "TFMptAttention",
    "TFMptMLP",
    "TFMptBlock",
    "TFMptMainLayer",
    "TFMptPreTrainedModel",
    "TFMptModel",
    "TFMptForCausalLM",
    "TFMptForSequenceClassification",
    "TFMptForTokenClassification",
    "TFMptForQuestionAnswering",
]

logger = logging.getLogger("nezha_zoo")


# --- ALiBi and the mask --------------------------------------------------------------------------


def alibi_slopes(num_heads: int, alibi_bias_max: int = 8) -> np.ndarray:
    """MPT's per-head ALiBi slopes, (num_heads,) float32.

    With ``P`` the next power of two >= ``num_heads``, slope ``k`` (1-based) is
    ``2 ** -(k * alibi_bias_max / P)``; when ``P != num_heads`` the odd-indexed slopes come first,
    then the even-indexed ones, truncated to ``num_heads`` (as llm-foundry and transformers).
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    p = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / np.power(2.0, np.arange(1, p + 1, dtype=np.float32) * np.float32(alibi_bias_max / p))
    if p != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.astype(np.float32)


def alibi_bias(num_heads: int, key_length: Any, alibi_bias_max: int = 8) -> tf.Tensor:
    """Additive ALiBi scores (1, heads, 1, Lk): ``slope_h * (j - (Lk - 1))`` for key ``j``.

    It depends only on the key index: softmax is invariant to a per-row constant, so this equals a
    bias on the query-key distance wherever the causal mask lets a key be seen.
    """
    slopes = tf.constant(alibi_slopes(num_heads, alibi_bias_max))[None, :, None, None]  # (1, H, 1, 1)
    offsets = tf.cast(tf.range(key_length) - (key_length - 1), tf.float32)  # (Lk,) from 1 - Lk to 0
    return slopes * offsets[None, None, None, :]


def mpt_attention_mask(attention_mask, q_len: Any, k_len: Any, query_offset: Any) -> tf.Tensor:
    """Boolean (B or 1, 1, Lq, Lk), True where a score is masked.

    Query ``i`` sits at key index ``query_offset + i`` (the cached length, or the fixed cache's fill
    index) and sees keys ``j <= query_offset + i`` whose ``attention_mask`` (B, Lk) entry is nonzero.
    ``attention_mask`` None: every key is real.
    """
    q_pos = tf.cast(query_offset, tf.int32) + tf.range(q_len)  # (Lq,)
    causal = tf.range(k_len)[None, :] <= q_pos[:, None]  # (Lq, Lk)
    # expand_dims, not [None, ...]: TFLite's builtin StridedSlice lacks new axes on dynamic shapes.
    visible = tf.expand_dims(tf.expand_dims(causal, 0), 0)  # (1, 1, Lq, Lk)
    if attention_mask is not None:
        keep = tf.not_equal(tf.cast(attention_mask, tf.float32), 0.0)  # (B, Lk)
        visible = tf.logical_and(visible, tf.expand_dims(tf.expand_dims(keep, 1), 1))  # (B, 1, Lq, Lk)
    return tf.logical_not(visible)


# --- layers --------------------------------------------------------------------------------------


def _norm(config: MptConfig, name: str) -> keras.layers.LayerNormalization:
    # llm-foundry removes every LayerNorm bias with no_bias (transformers: always weight only).
    return keras.layers.LayerNormalization(epsilon=config.layer_norm_epsilon, center=not config.no_bias, name=name)


def _logit_scale(config: MptConfig) -> float | None:
    scale = config.logit_scale
    if scale == "inv_sqrt_d_model":
        return 1.0 / math.sqrt(config.d_model)
    return None if scale is None else float(scale)


class TFMptAttention(Block):
    """MPT self-attention: fused ``Wqkv``, optional clip and ``q_ln``/``k_ln``, ALiBi, ``out_proj``.

    Args:
        config (MptConfig): ``d_model``, ``n_heads``, ``no_bias``, ``attn_config`` (``attn_type``,
            ``clip_qkv``, ``qk_ln``, ``softmax_scale``, ``attn_pdrop``).
        name (str): ``"attn"``.

    Call: ``hidden_states`` (B, Lq, d_model); ``attention_mask`` bool (B, 1, Lq, Lk), True = masked;
    ``position_bias`` (1, heads, 1, Lk) ALiBi; ``past_key_value`` ``(k, v)`` each
    (B, kv_heads, Lp, head_dim) or a :class:`KVCache`; ``head_mask`` (1, heads, 1, 1) or None.
    Returns ``(output (B, Lq, d_model), probs (B, heads, Lq, Lk), present)`` where ``present`` is the
    full ``(k, v)`` or the updated :class:`KVCache`.  ``positions_to_keep`` (B, R) int (no cache): the
    queries, scores and output at those rows only (Lq = R in the outputs); keys and values at every row
    (``Wqkv``'s query columns project the kept rows only, its key/value columns every row).
    """

    def __init__(self, config: MptConfig, name: str = "attn", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        ac = config.attn_config
        self.num_heads = config.n_heads
        self.head_dim = config.head_dim
        self.d_model = config.d_model
        self.qkv_widths = config.qkv_widths  # query | key | value columns of Wqkv
        self.kv_width = self.qkv_widths[1]
        self.kv_heads = self.kv_width // self.head_dim
        self.clip_qkv = ac.clip_qkv
        self.softmax_scale = ac.softmax_scale if ac.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        bias = not config.no_bias
        self.Wqkv = dense(self.d_model + 2 * self.kv_width, "Wqkv", use_bias=bias)
        self.q_ln = _norm(config, "q_ln") if ac.qk_ln else None
        self.k_ln = _norm(config, "k_ln") if ac.qk_ln else None
        self.out_proj = dense(self.d_model, "out_proj", use_bias=bias)
        self.attn_dropout = dropout(ac.attn_pdrop, "attn_dropout")

    def _split_heads(self, x: tf.Tensor, heads: int) -> tf.Tensor:
        shape = tf.shape(x)
        x = tf.reshape(x, (shape[0], shape[1], heads, self.head_dim))  # (B, L, heads, hd)
        return tf.transpose(x, (0, 2, 1, 3))  # (B, heads, L, hd)

    def call(
        self,
        hidden_states,
        attention_mask=None,
        position_bias=None,
        past_key_value=None,
        head_mask=None,
        positions_to_keep=None,
        training=False,
    ):
        keep, d = positions_to_keep, self.d_model
        if keep is not None:
            # The query columns of Wqkv on the kept rows only, its key/value columns on every row (the
            # clip and the LayerNorms act per element and per row: the same numbers as the full product's).
            # The R kept rows take the whole kernel: a column slice of it is a strided copy.
            query = self.Wqkv(keep_positions(hidden_states, keep))[..., :d]  # (B, R, d_model)
            kv = self.Wqkv(hidden_states, columns=(d, d + 2 * self.kv_width))  # (B, Lq, 2 * kv_width)
            if self.clip_qkv:
                query = tf.clip_by_value(query, -self.clip_qkv, self.clip_qkv)
                kv = tf.clip_by_value(kv, -self.clip_qkv, self.clip_qkv)
            key, value = tf.split(kv, [self.kv_width, self.kv_width], axis=-1)
        else:
            qkv = self.Wqkv(hidden_states)  # (B, Lq, d_model + 2 * kv_width)
            if self.clip_qkv:
                qkv = tf.clip_by_value(qkv, -self.clip_qkv, self.clip_qkv)
            query, key, value = tf.split(qkv, self.qkv_widths, axis=-1)
        if self.q_ln is not None:  # llm-foundry: on the whole projections, before splitting heads
            query, key = self.q_ln(query), self.k_ln(key)
        query = self._split_heads(query, self.num_heads)  # (B, H, Lq, hd)
        key = self._split_heads(key, self.kv_heads)  # (B, kv_heads, Lq, hd)
        value = self._split_heads(value, self.kv_heads)
        if is_fixed_cache(past_key_value):
            key, value, present = append_kv(past_key_value, key, value)  # (B, kv_heads, max_length, hd)
        else:
            if past_key_value is not None:
                key = tf.concat([past_key_value[0], key], axis=2)  # (B, kv_heads, Lp + Lq, hd)
                value = tf.concat([past_key_value[1], value], axis=2)
            present = (key, value)
        # One key/value head broadcasts over the query heads (batched matmul broadcasts its batch dims).
        scores = bf16_matmul(query, key, transpose_b=True) * self.softmax_scale  # (B, H, Lq, Lk)
        if position_bias is not None:
            scores = scores + position_bias
        if attention_mask is not None and positions_to_keep is not None:
            attention_mask = keep_positions(attention_mask, positions_to_keep, 2)  # the kept query rows
        if attention_mask is not None:  # masked_fill, as transformers: a fully masked row is uniform
            # The scores' own minimum (torch.finfo(dtype).min): float32's overflows to -inf in float16.
            scores = tf.where(attention_mask, tf.constant(scores.dtype.min, scores.dtype), scores)
        probs = tf.cast(tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1), value.dtype)
        if positions_to_keep is None:
            probs = self.attn_dropout(probs, training=training)
        else:  # the mask of the full (B, heads, Lq, Lk) probabilities, at the kept query rows
            length = tf.shape(hidden_states)[1]
            probs = dropout_kept_rows(self.attn_dropout, probs, positions_to_keep, length, training, axis=2)
        if head_mask is not None:
            probs = probs * head_mask
        context = bf16_matmul(probs, value)  # (B, H, Lq, hd)
        context = tf.transpose(context, (0, 2, 1, 3))  # (B, Lq, H, hd)
        shape = tf.shape(context)
        context = tf.reshape(context, (shape[0], shape[1], self.d_model))  # (B, Lq, d_model)
        return self.out_proj(context), probs, present


class TFMptMLP(Block):
    """``up_proj`` (d_model -> expansion_ratio * d_model), exact GELU, ``down_proj`` back.

    Args:
        config (MptConfig): ``d_model``, ``expansion_ratio``, ``no_bias``.
        name (str): ``"ffn"``.

    Call: (B, L, d_model) -> (B, L, d_model).
    """

    def __init__(self, config: MptConfig, name: str = "ffn", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        bias = not config.no_bias
        self.up_proj = dense(config.expansion_ratio * config.d_model, "up_proj", use_bias=bias)
        self.down_proj = dense(config.d_model, "down_proj", use_bias=bias)

    def call(self, hidden_states):
        return self.down_proj(tf.nn.gelu(self.up_proj(hidden_states), approximate=False))


class TFMptBlock(Block):
    """One pre-LN block: ``h = x + drop(attn(norm_1(x)))``, ``out = h + drop(ffn(norm_2(h)))``.

    Args:
        config (MptConfig): the model config (dropouts: ``attn_config.attn_pdrop``, as transformers).
        name (str): ``str(index)``.

    Call: as :class:`TFMptAttention` (the first argument (B, L, d_model)); returns
    ``(hidden (B, L, d_model), probs (B, heads, Lq, Lk), present)``; with ``positions_to_keep`` (B, R)
    ``hidden`` is (B, R, d_model) (dropout masks drawn at the full length: :func:`dropout_kept_rows`).
    """

    def __init__(self, config: MptConfig, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        rate = config.attn_config.attn_pdrop
        self.norm_1 = _norm(config, "norm_1")
        self.attn = TFMptAttention(config, name="attn")
        self.norm_2 = _norm(config, "norm_2")
        self.ffn = TFMptMLP(config, name="ffn")
        self.resid_attn_dropout = dropout(rate, "resid_attn_dropout")
        self.ffn_dropout = dropout(rate, "ffn_dropout")

    def call(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        position_bias=None,
        past_key_value=None,
        positions_to_keep=None,
        training=False,
    ):
        attn_out, probs, present = self.attn(
            self.norm_1(hidden_states),
            attention_mask=attention_mask,
            position_bias=position_bias,
            past_key_value=past_key_value,
            head_mask=head_mask,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        if positions_to_keep is None:
            hidden = hidden_states + self.resid_attn_dropout(attn_out, training=training)
            return hidden + self.ffn_dropout(self.ffn(self.norm_2(hidden)), training=training), probs, present
        keep, length = positions_to_keep, tf.shape(hidden_states)[1]
        hidden = keep_positions(hidden_states, keep) + dropout_kept_rows(
            self.resid_attn_dropout, attn_out, keep, length, training
        )
        ffn = self.ffn(self.norm_2(hidden))  # (B, R, d_model)
        return hidden + dropout_kept_rows(self.ffn_dropout, ffn, keep, length, training), probs, present


# --- base model ----------------------------------------------------------------------------------


def _static(t: Any, axis: int) -> int | None:
    return t.shape[axis] if t is not None and t.shape.rank is not None else None


class _MptBackbone:
    """Creates MPT's base sub-layers (``wte``, ``blocks``, ``norm_f``) on its owner and runs them."""

    config: MptConfig

    def _init_backbone(self, config: MptConfig) -> None:
        self.config = config
        self.wte = keras.layers.Embedding(config.vocab_size, config.d_model, name="wte")
        self.blocks = LayerList([TFMptBlock(config, name=str(i)) for i in range(config.n_layers)], "blocks")
        self.norm_f = _norm(config, "norm_f")

    def _check_past(self, past_key_values) -> bool:
        """Validate a cache; True for the fixed-size form."""
        n = self.config.n_layers
        if not isinstance(past_key_values, (tuple, list)) or len(past_key_values) != n:
            raise InputError(f"past_key_values must be a tuple of {n} per-block caches, got {type(past_key_values)}")
        fixed = [is_fixed_cache(p) for p in past_key_values]
        if any(fixed) and not all(fixed):
            raise InputError("past_key_values mixes KVCache and (key, value) entries")
        kv_heads, head_dim = self.blocks[0].attn.kv_heads, self.config.head_dim
        for i, p in enumerate(past_key_values):
            if not fixed[0] and (not isinstance(p, (tuple, list)) or len(p) != 2):
                raise InputError(f"past_key_values[{i}] must be a (key, value) pair or a KVCache")
            for t in p[:2]:
                shape = tuple(tf.convert_to_tensor(t).shape)
                if len(shape) != 4 or shape[1] != kv_heads or shape[3] != head_dim:
                    raise InputError(
                        f"past_key_values[{i}] tensors must be (B, {kv_heads}, L, {head_dim}), got {shape}"
                    )
        return fixed[0]

    def backbone(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else bool(output_attentions)
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else bool(output_hidden_states)
        use_cache = cfg.use_cache if use_cache is None else bool(use_cache)
        # Plain lists / numpy arrays as keyword arguments: tensors, so every shape check below applies.
        input_ids, attention_mask, inputs_embeds = (
            None if t is None else tf.convert_to_tensor(t) for t in (input_ids, attention_mask, inputs_embeds)
        )
        shape = validate_inputs(cfg, input_ids, inputs_embeds, embed_width=cfg.d_model, positions=False)
        ref = input_ids if input_ids is not None else inputs_embeds
        positions_to_keep = check_positions_to_keep(
            positions_to_keep,
            *shape[:2],
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            use_cache=use_cache or past_key_values is not None,
        )
        q_len = tf.shape(ref)[1]
        fixed = past_key_values is not None and self._check_past(past_key_values)
        if past_key_values is not None and not fixed:
            past_key_values = tuple((tf.convert_to_tensor(k), tf.convert_to_tensor(v)) for k, v in past_key_values)
        if fixed:
            query_offset = past_key_values[0].index
            want_mask = k_len = _static(past_key_values[0].key, 2)  # static max_length, as init_cache makes it
            if k_len is None:
                k_len = tf.shape(past_key_values[0].key)[2]
            else:
                check_length(k_len, 0, cfg.max_seq_len, "max_seq_len")
                check_length(shape[-1], 0, k_len, "fixed cache's max_length")
        else:
            past_len = 0 if past_key_values is None else _static(past_key_values[0][0], 2)
            if past_len is None:  # traced with an unknown cached length
                past_len = tf.shape(past_key_values[0][0])[2]
                want_mask = None
            else:
                check_length(shape[-1], past_len, cfg.max_seq_len, "max_seq_len")
                want_mask = None if shape[-1] is None else past_len + shape[-1]
            k_len, query_offset = past_len + q_len, past_len
        if attention_mask is not None:
            mshape = tuple(attention_mask.shape)
            bad_width = want_mask is not None and mshape[-1:] != (want_mask,) and mshape[-1:] != (None,)
            bad_batch = len(mshape) == 2 and None not in (mshape[0], shape[0]) and mshape[0] != shape[0]
            if len(mshape) != 2 or bad_width or bad_batch:
                what = "the fixed cache's max_length" if fixed else "cached + new positions"
                raise InputError(
                    f"attention_mask has shape {mshape}; it must be (batch {shape[0]}, {want_mask}): {what}"
                )
        hidden = self.wte(input_ids) if inputs_embeds is None else tf.cast(inputs_embeds, tf.float32)
        mask = mpt_attention_mask(attention_mask, q_len, k_len, query_offset)  # (B or 1, 1, Lq, Lk)
        alibi = alibi_bias(cfg.n_heads, k_len, cfg.attn_config.alibi_bias_max)  # (1, H, 1, Lk)
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        presents = [] if use_cache else None
        checkpoint = gradient_checkpointing and training and not use_cache and not output_attentions
        last = len(self.blocks.items) - 1
        with keras.name_scope(self.blocks.name):  # variables under ".../blocks/<i>/..."
            for i, block in enumerate(self.blocks.items):
                if all_hidden is not None:
                    all_hidden.append(hidden)
                keep = positions_to_keep if i == last else None
                if checkpoint and past_key_values is None:
                    hidden = _checkpointed(block, hidden, mask, None, None, None, alibi, training, keep)
                    continue
                hidden, probs, present = block(
                    hidden,
                    attention_mask=mask,
                    position_bias=alibi,
                    past_key_value=None if past_key_values is None else past_key_values[i],
                    positions_to_keep=keep,
                    training=training,
                )
                if presents is not None:
                    presents.append(present)
                if all_attn is not None:
                    all_attn.append(probs)
        hidden = self.norm_f(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden,
            past_key_values=None if presents is None else tuple(presents),
            hidden_states=None if all_hidden is None else tuple(all_hidden),
            attentions=None if all_attn is None else tuple(all_attn),
        )


class TFMptMainLayer(_MptBackbone, Block):
    """The MPT base model as a layer named ``transformer`` inside the head classes.

    Args:
        config (MptConfig): the model config.

    Call: as :class:`TFMptModel` (keyword arguments only); returns
    :class:`~nezha_zoo.outputs.BaseModelOutputWithPastAndCrossAttentions`.
    """

    def __init__(self, config: MptConfig, name: str = "transformer", **kwargs: Any) -> None:
        Block.__init__(self, name=name, **kwargs)
        self._init_backbone(config)

    def call(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ):
        return self.backbone(
            input_ids=input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )


class TFMptPreTrainedModel(TFPreTrainedModel):
    """Base of the MPT TF classes: config class, family, dummy inputs and :meth:`init_cache`."""

    family = MPT
    config_class = MptConfig
    base_model_prefix = "transformer"

    def _dummy_inputs(self) -> dict[str, Any]:
        return {"input_ids": tf.constant([[2, 3]], tf.int32)}

    def build(self, input_shape=None):
        # Sub-layers build on the first call (as Block does); without this Keras warns that the
        # Model's direct ``wte``/``norm_f`` are unbuilt when it marks the model built.
        pass

    def _build_unused(self) -> None:
        """Nothing to build: MPT has no cross-attention (``add_cross_attention`` is not read)."""

    def init_cache(self, batch_size: int, max_length: int) -> tuple[KVCache, ...]:
        """An empty fixed-size cache: one :class:`KVCache` per block, each key/value
        (batch_size, kv_heads, max_length, head_dim) zeros with index 0 (kv_heads 1 for multi-query).

        Pass it as ``past_key_values`` with ``use_cache=True`` and an ``attention_mask`` of width
        ``max_length`` (1 = a token already written or written now, 0 = padding or an empty slot).

        Raises:
            ValueError: ``batch_size`` or ``max_length`` not a positive int, or ``max_length`` above
                ``config.max_seq_len``.
        """
        for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if max_length > self.config.max_seq_len:
            raise ValueError(f"max_length {max_length} exceeds config.max_seq_len ({self.config.max_seq_len})")
        kv_heads = 1 if self.config.attn_config.attn_type == "multiquery_attention" else self.config.n_heads
        return tuple(
            init_kv_cache(int(batch_size), kv_heads, int(max_length), self.config.head_dim)
            for _ in range(self.config.n_layers)
        )


_BASE_DOC = """
    Call arguments (transformers' order; also accepted packed in the first argument as a list/tuple
    or dict, see :func:`nezha_zoo.tf.modeling_utils.unpack_inputs`):

        input_ids (B, L) int; past_key_values: per block ``(key, value)`` each (B, kv_heads, Lp,
        head_dim), or the fixed cache of :meth:`init_cache`; attention_mask (B, Lp + L) 0/1 over every
        key (width ``max_length`` with the fixed cache; left padding works); inputs_embeds
        (B, L, d_model); use_cache (bool, default ``config.use_cache``): return the updated cache;
        output_attentions / output_hidden_states / return_dict (bool); training (bool): dropout on.
"""


class TFMptModel(_MptBackbone, TFMptPreTrainedModel):
    __doc__ = (
        """Bare MPT decoder: ``last_hidden_state`` (B, L, d_model) after ``norm_f``.

    Args:
        config (MptConfig): the model config.
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
        + POSITIONS_TO_KEEP_DOC
    )

    head = "Model"

    def __init__(self, config: MptConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_backbone(config)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        positions_to_keep=None,
        training=False,
    ):
        out = self.backbone(
            input_ids=input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=self.gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        return self._finish(out, return_dict)


class TFMptForCausalLM(TFGenerationMixin, TFMptPreTrainedModel):
    __doc__ = (
        """MPT language model: ``logits`` (B, L, vocab_size) from ``lm_head`` (tied to ``transformer.wte``
    unless ``tie_word_embeddings=False``), times ``config.logit_scale`` when set; ``labels`` (B, L)
    give the next-token loss (shifted inside, -100 ignored).

    Args:
        config (MptConfig): the model config.
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
        + """        logits_to_keep (int): the LM head on the last this many positions only (0: all; logits
        (B, min(L, logits_to_keep), V)), without ``labels``.
"""
    )

    head = "ForCausalLM"
    label_names = ("labels",)
    generation_position_rule = None  # ALiBi: no position ids, left padding works through the mask

    def __init__(self, config: MptConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.transformer = TFMptMainLayer(config, name="transformer")
        self.lm_head = None if config.tie_word_embeddings else dense(config.vocab_size, "lm_head", use_bias=False)
        self.logit_scale = _logit_scale(config)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
        logits_to_keep: int = 0,
    ):
        out = self._base_call(locals())
        hidden = keep_last_positions(out.last_hidden_state, logits_to_keep, labels)  # (B, L', d)
        if self.lm_head is None:
            logits = bf16_matmul(hidden, self.transformer.wte.embeddings, transpose_b=True)  # (B, L, V)
        else:
            logits = self.lm_head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        loss = None if labels is None else losses.causal_lm_loss(logits, labels)
        result = CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return self._finish(result, return_dict)


def last_non_pad_index(input_ids, pad_token_id: int) -> tf.Tensor:
    """(B,) int32: the rightmost position whose id is not ``pad_token_id`` (0 when all are pads),
    as transformers' ``argmax(arange(L) * (ids != pad))``."""
    not_pad = tf.cast(tf.not_equal(tf.cast(input_ids, tf.int64), pad_token_id), tf.int32)  # (B, L)
    positions = tf.range(tf.shape(input_ids)[-1], dtype=tf.int32)[None, :]  # (1, L)
    return tf.argmax(positions * not_pad, axis=-1, output_type=tf.int32)


class TFMptForSequenceClassification(TFMptPreTrainedModel):
    __doc__ = (
        """Sequence classification on the last non-padding token: ``score`` (d_model -> num_labels, no
    bias) at the rightmost position whose id differs from ``config.pad_token_id`` (the last position
    with ``inputs_embeds`` or without a ``pad_token_id``); ``logits`` (B, num_labels).
    ``labels``: (B,) int (cross-entropy), (B,) float with ``num_labels == 1`` (MSE), or
    (B, num_labels) float (multi-label BCE); ``config.problem_type`` overrides the inference.

    Args:
        config (MptConfig): the model config.
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.

    Raises:
        ValueError: a batch of more than one row without ``config.pad_token_id``.
"""
        + _BASE_DOC
    )

    head = "ForSequenceClassification"
    label_names = ("labels",)

    def __init__(self, config: MptConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.transformer = TFMptMainLayer(config, name="transformer")
        self.score = dense(config.num_labels, "score", use_bias=False)
        self._finish_init()

    def _pooled_index(self, input_ids, ref) -> tf.Tensor:
        """(B,) int32: the position each row's logits are read at (``ref`` the ids or embeddings)."""
        pad = self.config.pad_token_id
        if pad is not None and input_ids is not None:
            return last_non_pad_index(input_ids, pad)  # (B,)
        if pad is not None:
            logger.warning("%s cannot see padding in inputs_embeds: pooling the last position", type(self).__name__)
        return tf.fill(tf.shape(ref)[:1], tf.shape(ref)[1] - 1)

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        ref = input_ids if input_ids is not None else inputs_embeds
        # The last layer runs at each row's pooled position only (nezha_zoo.spec.pooling.LAST_NON_PAD), on
        # inputs of the right rank (others reach the base model's checks unchanged).
        well_formed = isinstance(ref, tf.Tensor) and ref.shape.rank == (2 if input_ids is not None else 3)
        index = self._pooled_index(input_ids, ref) if well_formed else None  # (B,)
        keep = None if index is None else self._pooled_positions(locals(), last_index=index)
        out = self._base_call(locals(), positions_to_keep=keep)
        logits = self.score(out.last_hidden_state)  # (B, L, num_labels), (B, 1, num_labels) when pruned
        pad = self.config.pad_token_id
        if pad is None:
            batch = ref.shape[0]
            message = "Cannot handle batch sizes > 1 if no padding token is defined (set config.pad_token_id)."
            if batch is not None and batch != 1:
                raise ValueError(message)
            if batch is None:
                tf.debugging.assert_equal(tf.shape(ref)[0], 1, message=message)
        if keep is None:
            index = self._pooled_index(input_ids, ref) if index is None else index
            pooled = tf.gather(logits, index, axis=1, batch_dims=1)  # (B, num_labels)
        else:
            pooled = logits[:, 0]  # (B, num_labels): the only row computed
        loss = None
        if labels is not None:
            labels = tf.convert_to_tensor(labels)
            cfg = self.config
            loss = losses.sequence_classification_loss(pooled, labels, cfg.num_labels, cfg.problem_type)
        result = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return self._finish(result, return_dict)


class TFMptForTokenClassification(TFMptPreTrainedModel):
    __doc__ = (
        """Per-token classification: dropout (``classifier_dropout``, else ``hidden_dropout``, else 0.1,
    as transformers) then ``classifier``; ``logits`` (B, L, num_labels); ``labels`` (B, L), -100 ignored.

    Args:
        config (MptConfig): the model config.
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
    )

    head = "ForTokenClassification"
    label_names = ("labels",)

    def __init__(self, config: MptConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.transformer = TFMptMainLayer(config, name="transformer")
        self.dropout = dropout(classifier_dropout_rate(config))
        self.classifier = dense(config.num_labels, "classifier")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        logits = self.classifier(self.dropout(out.last_hidden_state, training=training))
        result = token_classification_output(self.config, logits, labels, out)
        return self._finish(result, return_dict)


class TFMptForQuestionAnswering(TFMptPreTrainedModel):
    __doc__ = """Extractive QA: ``qa_outputs`` (d_model -> 2) gives ``start_logits``/``end_logits`` (B, L);
    ``start_positions`` and ``end_positions`` (B,) give the mean start/end cross-entropy (positions
    clamped to [0, L], L ignored).  No cache arguments, as transformers.

    Args:
        config (MptConfig): the model config.
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.

    Call arguments: input_ids (B, L) int; attention_mask (B, L) 0/1; inputs_embeds (B, L, d_model);
    start_positions, end_positions (B,) int; output_attentions / output_hidden_states / return_dict
    (bool); training (bool).  Also accepted packed in the first argument.
"""

    head = "ForQuestionAnswering"
    label_names = ("start_positions", "end_positions")

    def __init__(self, config: MptConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.transformer = TFMptMainLayer(config, name="transformer")
        self.qa_outputs = dense(2, "qa_outputs")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        logits = self.qa_outputs(out.last_hidden_state)  # (B, L, 2)
        result = question_answering_output(logits, start_positions, end_positions, out)
        return self._finish(result, return_dict)
