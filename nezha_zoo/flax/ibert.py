"""I-BERT in Flax linen: the base module, five heads and their wrappers, float and integer-only modes.

``config.quant_mode=False``: the model computes RoBERTa (post-LN, padding-aware positions) in float.
``config.quant_mode=True``: embeddings, linears, GELU, softmax and LayerNorm run the integer kernels of
:mod:`nezha_zoo.flax.quant` with transformers' bit widths (embedding weights 8, embedding sums 16,
activations 8, weights 8, biases 32, LayerNorm input 22 and output 32 bits); ``config.force_dequant``
keeps GELU, softmax, LayerNorm or all three (``"nonlinear"``) in float.  Between modules a tensor is a
pair ``(x, s)`` with ``x = q * s`` (``s`` None in float mode), as in transformers.

The quant-mode forward of the base module runs inside :func:`nezha_zoo.flax.quant.x64_scope` (int64 for
the wide intermediate integers, float64 only where the rules define it; see that module); between the
kernels the quantized tensors are their integer-dtype integers (``quant.integer_of``), dequantized for
the outputs, which are float32.  Integers cannot hold the NaN that the float64 rule gives in some rows
(a LayerNorm row of zero variance, a GELU under overflowing scales): the kernels report those rows
(``with_bad_rows``), the model ORs them along (a bad row reaches its whole sequence through the next
attention, as NaN does) and poisons them in the outputs (hidden states, attentions), so such an input
gives NaN where the float64 rule does, never a plausible number.

The module tree is transformers' PyTorch one, so the params and the ``buffers`` collection (the
quantization state: activation ranges, integer weights, scales, LayerNorm shifts) have the spec's
names: ``embeddings.{word,token_type,position}_embeddings``, ``embeddings_act1`` (applied twice: after
the token types and after the positions), ``embeddings_act2`` (saved, never applied), ``LayerNorm``,
``output_activation``; per layer ``attention.self.{query,key,value,*_activation,softmax.act}``,
``attention.output.{dense,ln_input_act,LayerNorm,output_activation}``, ``pre_intermediate_act``,
``intermediate.{dense,output_activation}``, ``pre_output_act``, ``output.{...}``.  The quantized
layers carry both modes, so I-BERT has its own encoder blocks (the shared BERT blocks have no
quantization state); the pooler, the heads, positions and losses are the shared ones.

Calibration: call the wrapper with ``train=True`` (dropout off, or a ``dropout_rng``) on representative
inputs; it returns ``(output, {"buffers": updated})`` (transformers' Flax convention for mutable
state, as ``batch_stats``) and the updated ranges are set with ``model.buffers = updated["buffers"]``.
Without calibration the ranges are +-1e-5 and quant-mode outputs are meaningless, as in transformers.

Deliberate difference from transformers (shared with the PyTorch backend): with ``inputs_embeds`` in
quant mode, the sum of word and token-type embeddings is quantized (transformers drops the token types).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from nezha_zoo.families.ibert import (
    ACT_BIT,
    BIAS_BIT,
    EMBEDDING_ACT_BIT,
    EMBEDDING_BIT,
    EXACT_CHUNK,
    HEADS_WITH_POOLER,
    IBERT,
    LN_INPUT_BIT,
    LN_OUTPUT_BIT,
    WEIGHT_BIT,
)
from nezha_zoo.flax.heads import BertPooler, ClassificationHead, RobertaLMHead, tied_embedding_table
from nezha_zoo.flax.layers import Dropout, padding_aware_position_ids, sequential_position_ids
from nezha_zoo.flax.modeling_utils import (
    FlaxHeadModule,
    FlaxPreTrainedModel,
    finish_output,
    per_array,
    validate_inputs,
)
from nezha_zoo.flax.quant import (
    BUFFERS,
    QUANTIZED,
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantEmbedding,
    QuantLinear,
    exact_div,
    float_values,
    integer_of,
    quantize_kernel,
    quantize_table,
    standalone_dot,
    x64_scope,
)
from nezha_zoo.outputs import BaseModelOutputWithPoolingAndCrossAttentions, MaskedLMOutput, SequenceClassifierOutput
from nezha_zoo.spec.positions import padding_aware_max_length
from nezha_zoo.validation import check_length

__all__ = [
    "FlaxIBertModule",
    "FlaxIBertForMaskedLMModule",
    "FlaxIBertForSequenceClassificationModule",
    "FlaxIBertForMultipleChoiceModule",
    "FlaxIBertForTokenClassificationModule",
    "FlaxIBertForQuestionAnsweringModule",
    "FlaxIBertPreTrainedModel",
    "FlaxIBertModel",
    "FlaxIBertForMaskedLM",
    "FlaxIBertForSequenceClassification",
    "FlaxIBertForMultipleChoice",
    "FlaxIBertForTokenClassification",
    "FlaxIBertForQuestionAnswering",
]

Scaled = tuple[jax.Array, "jax.Array | None"]


def _act(config: Any, name: str, bits: int = ACT_BIT) -> QuantAct:
    return QuantAct(bits, quant_mode=config.quant_mode, name=name)


def _linear(config: Any, in_dim: int, out_dim: int, name: str, dtype: Any) -> QuantLinear:
    return QuantLinear(
        in_dim,
        out_dim,
        init_std=config.initializer_range,
        weight_bit=WEIGHT_BIT,
        bias_bit=BIAS_BIT,
        quant_mode=config.quant_mode,
        dtype=dtype,
        name=name,
    )


def _layer_norm(config: Any, name: str = "LayerNorm") -> IntLayerNorm:
    return IntLayerNorm(
        config.hidden_size,
        eps=config.layer_norm_eps,
        output_bit=LN_OUTPUT_BIT,
        quant_mode=config.quant_mode,
        force_dequant=config.force_dequant,
        name=name,
    )


def _dropout(rate: float, x: jax.Array, scale: jax.Array | None, deterministic: bool) -> jax.Array:
    """``Dropout(rate)`` of the float values of ``x`` (integers stay integers when it is the identity)."""
    if deterministic or rate == 0.0:
        return x
    return Dropout(rate)(float_values(x, scale), deterministic=deterministic)


def _integers8(x: jax.Array, scale: jax.Array) -> jax.Array:
    """The 8-bit integers of an activation: ``x`` itself in quant mode's integer form, else ``round(x / s)``."""
    return x if integer_of(x) is not None else jnp.round(exact_div(x, scale))


def _either(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """``a | b`` of two ``bad`` row masks (broadcasting), either of which may be None (no bad rows)."""
    return b if a is None else a if b is None else a | b


def _poison(x: jax.Array, bad: jax.Array | None) -> jax.Array:
    """NaN in the rows of float ``x`` flagged in ``bad`` (broadcastable bool), as the float64 rule gives."""
    return x if bad is None else jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)


def _int_bmm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b^T`` per (batch, head) of 8-bit integers: (B, h, Lq, d) x (B, h, Lk, d) -> int32 (B, h, Lq, Lk).

    A float32 product for ``d <= EXACT_CHUNK`` (every partial sum an integer of magnitude at most
    ``d * 128 * 128 <= 2**24``, exact in any order), else an int8 x int8 -> int32 one: XLA's CPU runs a
    batched int8 dot as a plain loop nest, no GEMM (roberta-base heads at 8x128: 4.5-11 ms a layer
    against ~1 ms for the float32 product).
    """
    dims = (((3,), (3,)), ((0, 1), (0, 1)))
    if a.shape[-1] <= EXACT_CHUNK:
        f32 = jnp.float32
        return standalone_dot(a.astype(f32), b.astype(f32), dims, f32, jax.lax.Precision.HIGHEST).astype(jnp.int32)
    return standalone_dot(a.astype(jnp.int8), b.astype(jnp.int8), dims, jnp.int32)


class FlaxIBertEmbeddings(nn.Module):
    """Word + token-type + position embeddings (16-bit sums), ``LayerNorm``, dropout, 8-bit ``output_activation``.

    Call: ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, H), ``token_type_ids``/``position_ids`` (B, L)
    -> ``(x (B, L, H), s (1,) or None)``.
    """

    config: Any

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds=None, deterministic: bool = True):
        c = self.config
        H, q, std = c.hidden_size, c.quant_mode, c.initializer_range

        def table(rows: int, pad: int | None, name: str):
            module = QuantEmbedding(rows, H, pad, std, EMBEDDING_BIT, q, name=name)
            # quant mode: the int8 integers travel to the next kernels (see ``quant.integer_of``)
            return lambda ids, deterministic: module(ids, deterministic, integer_output=True)

        words_table = table(c.vocab_size, c.pad_token_id, "word_embeddings")
        types_table = table(c.type_vocab_size, None, "token_type_embeddings")
        positions_table = table(c.max_position_embeddings, c.pad_token_id, "position_embeddings")
        act1 = _act(c, "embeddings_act1", EMBEDDING_ACT_BIT)
        if inputs_embeds is None:
            words, words_scale = words_table(input_ids, deterministic)
        else:
            words, words_scale = inputs_embeds.astype(jnp.float32), None
        types, types_scale = types_table(token_type_ids, deterministic)
        x, s = act1(words, words_scale, types, types_scale, deterministic)
        positions, positions_scale = positions_table(position_ids, deterministic)
        x, s = act1(x, s, positions, positions_scale, deterministic)
        x, s, bad = _layer_norm(c)(x, s, deterministic, with_bad_rows=True)
        x = _dropout(c.hidden_dropout_prob, x, s, deterministic)
        return (*_act(c, "output_activation")(x, s, deterministic=deterministic), bad)


class FlaxIBertSelfAttention(nn.Module):
    """Self-attention with 8-bit q/k/v, integer softmax and an 8-bit context (quant mode).

    Quant mode: scores are the exact int32 products ``q_int @ k_int^T`` of the int8 integers with scale
    ``s_q * s_k / sqrt(head_dim)``; masked keys get ``mask / scale`` added in float64 (so the integer
    softmax clamps them to its smallest exponent); the context is ``prob_int @ v_int`` (exact in
    float32) with scale ``2**-8 * s_v``, requantized to 8 bits.

    Call: ``(x (B, L, H), s)``, additive ``mask`` (B, 1, 1, L), ``head_mask`` (1, h, 1, 1) or None ->
    ``((context (B, L, H), s), probs (B, h, L, L))``.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, scale, mask, head_mask=None, deterministic: bool = True, bad=None):
        c = self.config
        H, h = c.hidden_size, c.num_attention_heads
        d = H // h

        def project(name: str):
            y, s = _linear(c, H, H, name, self.dtype)(hidden, scale, deterministic)
            y, s = _act(c, f"{name}_activation")(y, s, deterministic=deterministic)
            B, L, _ = y.shape
            return y.reshape(B, L, h, d).transpose(0, 2, 1, 3), s  # (B, L, H) -> (B, h, L, d)

        (q, s_q), (k, s_k), (v, s_v) = project("query"), project("key"), project("value")
        if bad is not None:
            # a row that is NaN in the float64 rule NaNs every score of its sequence (its key),
            # hence the whole attention of that sequence
            bad = jnp.broadcast_to(jnp.any(bad, axis=1, keepdims=True), bad.shape)
        root = math.sqrt(d)
        softmax = IntSoftmax(ACT_BIT, quant_mode=c.quant_mode, force_dequant=c.force_dequant, name="softmax")
        if softmax.active:
            # q, k are the int8 integers of their activations; the mask is added in the softmax
            s_scores = exact_div(s_q * s_k, jnp.float32(root))
            scores = _int_bmm(_integers8(q, s_q), _integers8(k, s_k))
            prob_int, s_p = softmax.forward_int(scores, s_scores, deterministic, mask=mask)
            probs = prob_int * s_p
            # the rule's zero-sum softmax row is NaN (integer contexts cannot say so): its query row
            bad = _either(bad, jnp.any(jnp.isnan(prob_int[..., :1]), axis=1))  # (B, L, 1)
        else:
            q, k = float_values(q, s_q), float_values(k, s_k)
            scores = jnp.matmul(q, k.transpose(0, 1, 3, 2)) / root + mask
            probs, s_p = softmax(scores, deterministic)
        probs = _poison(probs, None if bad is None else bad[:, None])  # (B, 1, L, 1): query rows
        probs = Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        if head_mask is not None:
            probs = probs * head_mask
        if s_p is not None and s_v is not None:
            ctx_scale = s_p * s_v
            if head_mask is None and (deterministic or c.attention_probs_dropout_prob == 0.0):
                # integer probabilities (<= 256, summing to <= 2**8) times 8-bit values: exact in
                # float32, |context| <= 2**15: int32 integers
                dims = (((3,), (2,)), ((0, 1), (0, 1)))
                v_int = _integers8(v, s_v).astype(jnp.float32)
                context = standalone_dot(prob_int, v_int, dims, jnp.float32).astype(jnp.int32)
            else:
                context = jnp.matmul(exact_div(probs, s_p), _integers8(v, s_v).astype(jnp.float32)) * ctx_scale
        else:
            ctx_scale = None
            context = jnp.matmul(probs, float_values(v, s_v))
        B, _, L, _ = context.shape
        context = context.transpose(0, 2, 1, 3).reshape(B, L, H)  # (B, h, L, d) -> (B, L, H)
        out = _act(c, "output_activation")(context, ctx_scale, deterministic=deterministic)
        return (*out, bad), probs


class FlaxIBertResidualOutput(nn.Module):
    """``dense``, dropout, 22-bit ``ln_input_act`` adding the residual, ``LayerNorm``, 8-bit ``output_activation``.

    Call: ``(x (B, L, in_dim), s)``, residual ``(r (B, L, H), r_s)`` -> ``(y (B, L, H), s)``.
    """

    config: Any
    in_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, scale, residual, residual_scale, deterministic: bool = True, bad=None):
        c = self.config
        x, scale = _linear(c, self.in_dim, c.hidden_size, "dense", self.dtype)(x, scale, deterministic)
        x = _dropout(c.hidden_dropout_prob, x, scale, deterministic)
        x, scale = _act(c, "ln_input_act", LN_INPUT_BIT)(x, scale, residual, residual_scale, deterministic)
        x, scale, ln_bad = _layer_norm(c)(x, scale, deterministic, with_bad_rows=True)
        return (*_act(c, "output_activation")(x, scale, deterministic=deterministic), _either(bad, ln_bad))


class FlaxIBertAttention(nn.Module):
    """``self`` (:class:`FlaxIBertSelfAttention`) and ``output`` (:class:`FlaxIBertResidualOutput`)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, scale, mask, head_mask=None, deterministic: bool = True, bad=None):
        (context, context_scale, ctx_bad), probs = FlaxIBertSelfAttention(self.config, self.dtype, name="self")(
            hidden, scale, mask, head_mask, deterministic, bad
        )
        output = FlaxIBertResidualOutput(self.config, self.config.hidden_size, self.dtype, name="output")
        return output(context, context_scale, hidden, scale, deterministic, ctx_bad), probs


class FlaxIBertIntermediate(nn.Module):
    """``dense`` (H -> intermediate), integer GELU, 8-bit ``output_activation``."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, scale, deterministic: bool = True, bad=None):
        c = self.config
        dense = _linear(c, c.hidden_size, c.intermediate_size, "dense", self.dtype)
        x, scale, bound = dense(x, scale, deterministic, with_bound=True)
        # the linear's bound on its integers spares the GELU a pass over them
        x, scale, gelu_bad = IntGELU(quant_mode=c.quant_mode, force_dequant=c.force_dequant)(
            x, scale, with_bad_rows=True, q_bound=bound
        )
        return (*_act(c, "output_activation")(x, scale, deterministic=deterministic), _either(bad, gelu_bad))


class FlaxIBertLayer(nn.Module):
    """One post-LN layer in transformers' order: attention, ``pre_intermediate_act``, intermediate,
    ``pre_output_act``, output (its residual is the ``pre_intermediate_act`` output).

    Call: ``(hidden (B, L, H), s)``, mask, head mask -> ``((hidden, s), probs (B, h, L, L))``.
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, scale, mask, head_mask=None, deterministic: bool = True, bad=None):
        c = self.config
        (attn, attn_scale, bad), probs = FlaxIBertAttention(c, self.dtype, name="attention")(
            hidden, scale, mask, head_mask, deterministic, bad
        )
        attn, attn_scale = _act(c, "pre_intermediate_act")(attn, attn_scale, deterministic=deterministic)
        inter, inter_scale, bad = FlaxIBertIntermediate(c, self.dtype, name="intermediate")(
            attn, attn_scale, deterministic, bad
        )
        inter, inter_scale = _act(c, "pre_output_act")(inter, inter_scale, deterministic=deterministic)
        output = FlaxIBertResidualOutput(c, c.intermediate_size, self.dtype, name="output")
        return output(inter, inter_scale, attn, attn_scale, deterministic, bad), probs


class FlaxIBertLayerCollection(nn.Module):
    """``layer``: ``num_hidden_layers`` :class:`FlaxIBertLayer` named ``"0"``, ``"1"``...

    Call: ``(hidden, s)``, mask, ``head_mask`` (layers, heads) or None -> ``((hidden, s), all_hidden,
    all_attentions)`` (tuples or None by the output flags; ``hidden`` holds quant mode's integers).
    """

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self, hidden, scale, mask, head_mask, deterministic, output_attentions, output_hidden_states, bad=None
    ):
        c = self.config
        # deterministic is a Python bool: static under remat (argument 5, self being 0)
        layer_cls = nn.remat(FlaxIBertLayer, static_argnums=(5,)) if self.gradient_checkpointing else FlaxIBertLayer
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        for i in range(c.num_hidden_layers):
            if output_hidden_states:
                all_hidden += (_poison(float_values(hidden, scale).astype(jnp.float32), bad),)
            layer_mask = None if head_mask is None else head_mask[i][None, :, None, None]  # (1, h, 1, 1)
            (hidden, scale, bad), probs = layer_cls(c, self.dtype, name=str(i))(
                hidden, scale, mask, layer_mask, deterministic, bad
            )
            if output_attentions:
                all_attn += (probs.astype(jnp.float32),)
        if output_hidden_states:
            all_hidden += (_poison(float_values(hidden, scale).astype(jnp.float32), bad),)
        return (hidden, scale, bad), all_hidden, all_attn


class FlaxIBertEncoder(nn.Module):
    """``encoder``: holds ``layer`` (:class:`FlaxIBertLayerCollection`)."""

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self, hidden, scale, mask, head_mask, deterministic, output_attentions, output_hidden_states, bad=None
    ):
        layers = FlaxIBertLayerCollection(self.config, self.dtype, self.gradient_checkpointing, name="layer")
        return layers(hidden, scale, mask, head_mask, deterministic, output_attentions, output_hidden_states, bad)


_MODULE_DOC = """
    Attributes:
        config (IBertConfig): model configuration (``quant_mode``, ``force_dequant``).
        dtype (jnp.dtype): float-mode computation dtype of the linears (params are float32).
        gradient_checkpointing (bool): rematerialise encoder layers in the backward pass.

    Call args (all optional but one of ``input_ids``/``inputs_embeds``; at most
    ``max_position_embeddings - pad_token_id - 1`` tokens):
        input_ids: (B, L) int ids{mc}.
        attention_mask: (B, L) 0/1, default ones.
        token_type_ids: (B, L) int in ``[0, type_vocab_size)``, default zeros.
        position_ids: (B, L) int, default RoBERTa-style from the ids (pads ``pad_token_id``, tokens
            from ``pad_token_id + 1``), ``pad_token_id + 1 ..`` with ``inputs_embeds``.
        head_mask: (heads,) or (layers, heads), multiplies the attention probabilities.
        inputs_embeds: (B, L, H) instead of ``input_ids``.
        deterministic (bool): dropout off; with False and ``mutable=["buffers"]`` the activation
            ranges are calibrated (transformers' training mode).
        output_attentions, output_hidden_states, return_dict (bool).
"""


class FlaxIBertModule(nn.Module):
    """The I-BERT encoder (``ibert``): ``embeddings``, ``encoder``, optional float ``pooler``.

    Returns ``BaseModelOutputWithPoolingAndCrossAttentions``: ``last_hidden_state`` (B, L, H)
    (dequantized in quant mode), ``pooler_output`` (B, H) (with ``add_pooling_layer``),
    ``hidden_states`` (layers + 1) x (B, L, H), ``attentions`` layers x (B, h, L, L).
    """

    __doc__ += _MODULE_DOC.format(mc="") + "        add_pooling_layer (bool, attribute): build the ``pooler``.\n"

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ):
        c = self.config
        validate_inputs(
            c, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, embed_width=c.hidden_size
        )
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros(shape, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(shape, jnp.int32)
        if position_ids is None:
            limit = padding_aware_max_length(c.max_position_embeddings, c.pad_token_id)
            check_length(shape[-1], 0, limit, "max_position_embeddings - pad_token_id - 1")
            if input_ids is not None:
                position_ids = padding_aware_position_ids(jnp.asarray(input_ids), c.pad_token_id)
            else:
                position_ids = sequential_position_ids(shape, c.pad_token_id)
        # additive mask (B, 1, 1, L), transformers PyTorch's (1 - mask) * finfo(float32).min
        mask = (1.0 - jnp.asarray(attention_mask, jnp.float32)[:, None, None, :]) * jnp.finfo(jnp.float32).min
        if head_mask is not None:
            head_mask = jnp.asarray(head_mask, jnp.float32)
            if head_mask.ndim == 1:  # (heads,) -> (layers, heads)
                head_mask = jnp.broadcast_to(head_mask, (c.num_hidden_layers, head_mask.shape[0]))
        # quant mode: float64 for the wide intermediate integers, inside this scope only
        with x64_scope() if c.quant_mode else contextlib.nullcontext():
            h, s, bad = FlaxIBertEmbeddings(c, name="embeddings")(
                input_ids, token_type_ids, position_ids, inputs_embeds, deterministic
            )
            (h, s, bad), all_hidden, all_attn = FlaxIBertEncoder(
                c, self.dtype, self.gradient_checkpointing, name="encoder"
            )(h, s, mask, head_mask, deterministic, output_attentions, output_hidden_states, bad)
            # rows where the float64 rule gives NaN, which the integers cannot hold (quant.IntLayerNorm)
            h = _poison(float_values(h, s).astype(jnp.float32), bad)
        pooled = BertPooler(c, dtype=self.dtype, name="pooler")(h) if self.add_pooling_layer else None
        return finish_output(
            BaseModelOutputWithPoolingAndCrossAttentions,
            return_dict,
            last_hidden_state=h,
            pooler_output=pooled,
            hidden_states=all_hidden,
            attentions=all_attn,
        )


class _IBertHead(FlaxHeadModule):
    """Shared fields of the head modules; ``_backbone`` runs the ``ibert`` submodule."""

    backbone_class = FlaxIBertModule
    backbone_name = "ibert"
    head_name = "Model"

    def _backbone_options(self) -> dict:
        # Only Model and ForMultipleChoice carry the pooler (transformers' add_pooling_layer).
        return {"add_pooling_layer": self.head_name in HEADS_WITH_POOLER}


class FlaxIBertForMaskedLMModule(_IBertHead):
    """Masked LM: float ``lm_head`` (dense, GELU, ``layer_norm``, decoder tied to the word embeddings, ``bias``)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForMaskedLM"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
    ):
        def head(ibert, out):
            c = self.config
            table = tied_embedding_table(ibert, c) if c.tie_word_embeddings else None  # (V, H)
            lm_head = RobertaLMHead(c, tied=c.tie_word_embeddings, dtype=self.dtype, name="lm_head")
            return {"logits": lm_head(out.last_hidden_state, table)}

        return self._head_output(locals(), MaskedLMOutput, head)


class FlaxIBertForSequenceClassificationModule(_IBertHead):
    """Sequence classification: float ``classifier`` (dense, tanh, ``out_proj``) on token 0 -> (B, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForSequenceClassification"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
    ):
        def head(_, out):
            classifier = ClassificationHead(self.config, activation="tanh", dtype=self.dtype, name="classifier")
            return {"logits": classifier(out.last_hidden_state, deterministic=deterministic)}

        return self._head_output(locals(), SequenceClassifierOutput, head)


class FlaxIBertForMultipleChoiceModule(_IBertHead):
    """Multiple choice: pooler output, dropout, ``classifier`` (H -> 1) per choice -> (B, C).

    Inputs (B, C, L) run flattened as (B * C, L); hidden states and attentions are returned flattened.
    """

    __doc__ += _MODULE_DOC.format(mc=" of shape (B, C, L); every input likewise has a choice axis")
    head_name = "ForMultipleChoice"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
    ):
        def pool(out):  # dropout on the pooler output (B * C, H)
            dropout = Dropout(self.config.hidden_dropout_prob, name="dropout")
            return dropout(out.pooler_output, deterministic=deterministic)

        # Every position (not pooled): training calibrates the activation ranges over all rows, float mode too.
        return self._multiple_choice(locals(), pool)


class FlaxIBertForTokenClassificationModule(_IBertHead):
    """Token classification: dropout + ``classifier`` -> (B, L, num_labels)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForTokenClassification"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
    ):
        return self._token_classification(locals())


class FlaxIBertForQuestionAnsweringModule(_IBertHead):
    """Extractive QA: ``qa_outputs`` -> ``start_logits`` (B, L), ``end_logits`` (B, L)."""

    __doc__ += _MODULE_DOC.format(mc="")
    head_name = "ForQuestionAnswering"

    @nn.compact
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        deterministic=True,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
    ):
        return self._question_answering(locals())


# --- wrappers ------------------------------------------------------------------------------------


class FlaxIBertPreTrainedModel(FlaxPreTrainedModel):
    """Base of the I-BERT wrappers (see :class:`~nezha_zoo.flax.modeling_utils.FlaxPreTrainedModel`).

    Besides ``params`` an I-BERT wrapper holds ``buffers``, the quantization state (transformers'
    persistent buffers), loaded and saved with the params.  ``train=True`` calibrates it and returns
    ``(output, {"buffers": updated})``.
    """

    family = IBERT
    base_model_prefix = "ibert"
    #: module path of each QuantLinear / QuantEmbedding -> (weakref to its weight, its QUANTIZED entries)
    _quantized: dict = {}  # replaced, never mutated (per_array returns a new dict)

    @property
    def quant_mode(self) -> bool:
        return self.config.quant_mode

    def _inference_collections(self, variables: Mapping) -> dict:
        """Quant mode: the :data:`~nezha_zoo.flax.quant.QUANTIZED` collection, :func:`quantize_kernel` of
        every :class:`QuantLinear` kernel (the modules with a ``fc_scaling_factor`` buffer) and
        :func:`quantize_table` of every :class:`QuantEmbedding` table (``weight_scaling_factor``), computed
        once per weight array and kept while the same array is passed (as the packed kernels), so the compiled
        forward does not quantize the weights again in every call (PyTorch's cached ``QuantLinear``
        quantization, TF's frozen int8 kernel)."""
        if not self.quant_mode:
            return {}
        params = flatten_dict(dict(variables["params"]))
        kernels, tables = {}, {}  # module path -> its QuantLinear kernel / QuantEmbedding table
        for path in flatten_dict(dict(variables[BUFFERS])):
            if path[-1] == "fc_scaling_factor":
                kernels[path[:-1]] = params[path[:-1] + ("kernel",)]
            elif path[-1] == "weight_scaling_factor":
                tables[path[:-1]] = params[path[:-1] + ("embedding",)]
        held = self._quantized
        self._quantized = {
            **per_array(held, kernels, functools.partial(quantize_kernel, weight_bit=WEIGHT_BIT)),
            **per_array(held, tables, functools.partial(quantize_table, weight_bit=EMBEDDING_BIT)),
        }
        return {QUANTIZED: unflatten_dict({path: held[1] for path, held in self._quantized.items()})}

    def _unread_kernels(self, variables: Mapping) -> frozenset[tuple[str, ...]]:
        """Every :class:`QuantLinear` kernel (the modules with a ``fc_scaling_factor`` buffer): in either mode it
        computes its own product (float: ``x @ kernel``; quant: the int8 kernel), never from a packed copy."""
        buffers = flatten_dict(dict(variables.get(BUFFERS, {})))
        return frozenset(path[:-1] + ("kernel",) for path in buffers if path[-1] == "fc_scaling_factor")

    def clear_jit_cache(self) -> None:
        """As :meth:`FlaxPreTrainedModel.clear_jit_cache`, and the quantized weights (see
        :meth:`_inference_collections`)."""
        super().clear_jit_cache()
        self._quantized = {}

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> None:
        """Not supported (as in transformers): the quantization state is tied to the table size."""
        raise NotImplementedError("resize_token_embeddings is not supported for I-BERT")


class FlaxIBertModel(FlaxIBertPreTrainedModel):
    """The bare I-BERT encoder (with pooler).

    Wraps :class:`FlaxIBertModule`; arguments as :class:`FlaxIBertPreTrainedModel`.
    """

    head = "Model"
    module_class = FlaxIBertModule


class FlaxIBertForMaskedLM(FlaxIBertPreTrainedModel):
    """I-BERT masked language model.

    Wraps :class:`FlaxIBertForMaskedLMModule`; arguments as :class:`FlaxIBertPreTrainedModel`.
    """

    head = "ForMaskedLM"
    module_class = FlaxIBertForMaskedLMModule


class FlaxIBertForSequenceClassification(FlaxIBertPreTrainedModel):
    """I-BERT sequence classifier.

    Wraps :class:`FlaxIBertForSequenceClassificationModule`; arguments as :class:`FlaxIBertPreTrainedModel`.
    """

    head = "ForSequenceClassification"
    module_class = FlaxIBertForSequenceClassificationModule


class FlaxIBertForMultipleChoice(FlaxIBertPreTrainedModel):
    """I-BERT multiple choice.

    Wraps :class:`FlaxIBertForMultipleChoiceModule`; arguments as :class:`FlaxIBertPreTrainedModel`.
    """

    head = "ForMultipleChoice"
    module_class = FlaxIBertForMultipleChoiceModule
    input_rank = 3


class FlaxIBertForTokenClassification(FlaxIBertPreTrainedModel):
    """I-BERT token classifier.

    Wraps :class:`FlaxIBertForTokenClassificationModule`; arguments as :class:`FlaxIBertPreTrainedModel`.
    """

    head = "ForTokenClassification"
    module_class = FlaxIBertForTokenClassificationModule


class FlaxIBertForQuestionAnswering(FlaxIBertPreTrainedModel):
    """I-BERT extractive question answering.

    Wraps :class:`FlaxIBertForQuestionAnsweringModule`; arguments as :class:`FlaxIBertPreTrainedModel`.
    """

    head = "ForQuestionAnswering"
    module_class = FlaxIBertForQuestionAnsweringModule
