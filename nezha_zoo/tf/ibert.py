"""I-BERT for Keras 3: RoBERTa whose embeddings, linears, GELU, softmax and LayerNorm can run integer-only.

``config.quant_mode=False``: every quantized layer of :mod:`nezha_zoo.tf.quant` computes its float op
and the model is RoBERTa (post-LN, padding-aware positions from ``pad_token_id``).
``config.quant_mode=True``: the integer kernels, with transformers' bit widths (embeddings 8, their
sums 16, activations 8, weights 8, biases 32, LayerNorm inputs 22 and outputs 32 bits);
``config.force_dequant`` keeps GELU, softmax, LayerNorm or all three (``"nonlinear"``) in float.
Between layers hidden states are ``(x, scale)`` pairs, ``x = q * scale`` (``scale`` None in float mode).

The layer tree and every variable name mirror transformers' modules (``embeddings_act1`` applied twice,
``embeddings_act2`` and each ``LayerNorm.activation`` built and saved but never applied, as there), so
the variables are exactly the spec's (``nezha_zoo/families/ibert.py``), quantization buffers included
(non-trainable float32), and a transformers checkpoint loads as it is.  The heads and the pooler are
the shared float layers of :mod:`nezha_zoo.tf.heads`.

Calibration: call the model with ``training=True`` (dropout off, e.g. ``hidden_dropout_prob=0``) on a
few representative batches; every ``QuantAct`` updates its running range (also in float mode).  With
``training=False`` the ranges are frozen.  Uncalibrated ranges (+-1e-5) give meaningless quant-mode
outputs, as in transformers.

The numbers are those of :mod:`nezha_zoo.pt.ibert` bit for bit, with its two deliberate departures from
transformers: each layer reads its input at the previous layer's output scale (transformers passes the
embedding scale to every layer), and with ``inputs_embeds`` the token-type embeddings are kept in quant
mode.  Training in float mode works with ``compile()`` + ``fit``; in quant mode the rounding has
straight-through gradients (quantization-aware fine-tuning).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import tensorflow as tf

from nezha_zoo.families.ibert import (
    ACT_BIT,
    BIAS_BIT,
    EMBEDDING_ACT_BIT,
    EMBEDDING_BIT,
    HEADS_WITH_POOLER,
    IBERT,
    LN_INPUT_BIT,
    LN_OUTPUT_BIT,
    WEIGHT_BIT,
    IBertConfig,
)
from nezha_zoo.outputs import BaseModelOutputWithPooling
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.tf.heads import (
    TFBertPooler,
    TFClassificationHead,
    TFRobertaLMHead,
    flatten_choices,
    masked_lm_output,
    multiple_choice_output,
    num_choices,
    question_answering_output,
    sequence_classification_output,
    token_classification_output,
    token_classifier,
)
from nezha_zoo.tf.layers import (
    BertBackboneMixin,
    Block,
    LayerList,
    dense,
    dropout,
    extended_attention_mask,
    from_rows,
    layer_head_masks,
    sublayers,
    to_rows,
    validate_inputs,
)
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, unpack_inputs
from nezha_zoo.tf.quant import (
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantEmbedding,
    QuantLinear,
    attach_integer,
    exact_div,
    exact_or,
    in_xla_context,
    integer_of,
    round_ste,
    xla_in_graph,
)

__all__ = [
    "TFIBertMainLayer",
    "TFIBertPreTrainedModel",
    "TFIBertModel",
    "TFIBertForMaskedLM",
    "TFIBertForSequenceClassification",
    "TFIBertForMultipleChoice",
    "TFIBertForTokenClassification",
    "TFIBertForQuestionAnswering",
]

_F64 = tf.float64


def _linear(config: IBertConfig, in_dim: int, out_dim: int, name: str) -> QuantLinear:
    return QuantLinear(in_dim, out_dim, WEIGHT_BIT, BIAS_BIT, per_channel=True, quant_mode=config.quant_mode, name=name)


def _act(config: IBertConfig, name: str, bits: int = ACT_BIT) -> QuantAct:
    return QuantAct(bits, quant_mode=config.quant_mode, name=name)


def _layer_norm(config: IBertConfig) -> IntLayerNorm:
    return IntLayerNorm(
        config.hidden_size,
        config.layer_norm_eps,
        output_bit=LN_OUTPUT_BIT,
        quant_mode=config.quant_mode,
        force_dequant=config.force_dequant,
        name="LayerNorm",
    )


def _dropout(rate: float) -> keras.layers.Dropout:
    # autocast off: in quant mode the linear outputs are float64 pairs and must stay so.
    return keras.layers.Dropout(rate, name="dropout", autocast=False)


class TFIBertEmbeddings(Block):
    """Word + token-type + position embeddings (16-bit sums), ``LayerNorm``, dropout, 8-bit output.

    Call: ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, H), ``token_type_ids`` (B, L),
    ``position_ids`` (B or 1, L) -> ``(x (B, L, H), scale (1,) or None)``.
    """

    def __init__(self, config: IBertConfig, name: str = "embeddings", **kwargs: Any) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        H, q, pad = config.hidden_size, config.quant_mode, config.pad_token_id
        self.word_embeddings = QuantEmbedding(config.vocab_size, H, pad, EMBEDDING_BIT, q, name="word_embeddings")
        self.token_type_embeddings = QuantEmbedding(
            config.type_vocab_size, H, None, EMBEDDING_BIT, q, name="token_type_embeddings"
        )
        self.position_embeddings = QuantEmbedding(
            config.max_position_embeddings, H, pad, EMBEDDING_BIT, q, name="position_embeddings"
        )
        self.embeddings_act1 = _act(config, "embeddings_act1", EMBEDDING_ACT_BIT)
        self.embeddings_act2 = _act(config, "embeddings_act2", EMBEDDING_ACT_BIT)  # saved, never applied
        self.LayerNorm = _layer_norm(config)
        self.output_activation = _act(config, "output_activation")
        self.dropout = _dropout(config.hidden_dropout_prob)

    def build(self, input_shape=None):
        if not self.embeddings_act2.built:
            self.embeddings_act2.build(None)

    def call(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, training=False):
        if inputs_embeds is None:
            words, words_scale = self.word_embeddings(input_ids, training=training)
        else:
            words, words_scale = tf.cast(inputs_embeds, tf.float32), None
        types, types_scale = self.token_type_embeddings(token_type_ids, training=training)
        positions, positions_scale = self.position_embeddings(position_ids, training=training)
        pairs = (words, words_scale, types, types_scale, positions, positions_scale)
        if words_scale is not None and xla_in_graph(training):
            # the gathers (which raise on bad ids) stay graph ops; the requantizations and the LayerNorm
            # run as one XLA cluster, as the encoder layers (fewer graph kernels at 1 x 128)
            return _xla_call(lambda *pairs: self._sum_and_normalize(*pairs, training=False), *pairs)
        return self._sum_and_normalize(*pairs, training=training)

    def _sum_and_normalize(self, words, words_scale, types, types_scale, positions, positions_scale, training):
        """``embeddings_act1`` twice (words + token types, + positions), ``LayerNorm``, dropout,
        ``output_activation``: ``(x (B, L, H), scale (1,) or None)``."""
        x, scale = self.embeddings_act1(
            words,
            pre_act_scaling_factor=words_scale,
            identity=types,
            identity_scaling_factor=types_scale,
            training=training,
        )
        x, scale = self.embeddings_act1(
            x,
            pre_act_scaling_factor=scale,
            identity=positions,
            identity_scaling_factor=positions_scale,
            training=training,
        )
        x, scale = self.LayerNorm(x, scaling_factor=scale, training=training)
        x = self.dropout(x, training=training)
        return self.output_activation(x, pre_act_scaling_factor=scale, training=training)


class TFIBertSelfAttention(Block):
    """Self-attention with 8-bit q/k/v, integer softmax and 8-bit context.

    Quant mode (integer softmax): scores are the exact integers ``q_int @ k_int^T`` with scale
    ``s_q * s_k / sqrt(head_dim)``; masked keys get ``mask / scale`` added (hugely negative, so the
    integer softmax gives them probability 0); the context is ``prob_int @ v_int`` (after dropout and
    ``head_mask``) at scale ``2**-8 * s_v``, requantized to 8 bits.

    Call: ``hidden`` (B, L, H) with ``scale``, additive ``attention_mask`` (B, 1, 1, L), ``head_mask``
    (1, heads, 1, 1) -> ``((context (B, L, H), scale), probs (B, heads, L, L))``.
    """

    def __init__(self, config: IBertConfig, name: str = "self", **kwargs: Any) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = H // config.num_attention_heads
        self.query = _linear(config, H, H, "query")
        self.key = _linear(config, H, H, "key")
        self.value = _linear(config, H, H, "value")
        self.query_activation = _act(config, "query_activation")
        self.key_activation = _act(config, "key_activation")
        self.value_activation = _act(config, "value_activation")
        self.output_activation = _act(config, "output_activation")
        self.dropout = _dropout(config.attention_probs_dropout_prob)
        self.softmax = IntSoftmax(
            ACT_BIT, quant_mode=config.quant_mode, force_dequant=config.force_dequant, name="softmax"
        )

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(x)
        x = tf.reshape(x, (shape[0], shape[1], self.num_heads, self.head_dim))  # (B, L, heads, hd)
        return tf.transpose(x, (0, 2, 1, 3))  # (B, heads, L, hd)

    def call(self, hidden, scale=None, attention_mask=None, head_mask=None, training=False):
        projected = []
        for proj, act in (
            (self.query, self.query_activation),
            (self.key, self.key_activation),
            (self.value, self.value_activation),
        ):
            x, s = proj(hidden, prev_act_scaling_factor=scale, training=training)
            projected.append(act(x, pre_act_scaling_factor=s, training=training))
        (q, s_q), (k, s_k), (v, s_v) = projected
        # inference: the activations' exact integers (int8), reused instead of recovered from q, k, v
        q_i, k_i, v_i = integer_of(q, s_q), integer_of(k, s_k), integer_of(v, s_v)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        root = math.sqrt(self.head_dim)
        prob_int = None
        if self.softmax.quant_mode:
            s_scores = exact_div(s_q * s_k, root)
            if q_i is not None and k_i is not None:
                q_f, k_f = self._split_heads(tf.cast(q_i, tf.float32)), self._split_heads(tf.cast(k_i, tf.float32))
            else:
                q_f, k_f = round_ste(exact_div(q, s_q)), round_ste(exact_div(k, s_k))
            # exact in float32: |q_int . k_int| <= head_dim * 2**14 < 2**24
            prods = tf.matmul(q_f, k_f, transpose_b=True)  # (B, heads, L, L)

            def scores():  # the float64 rule's scores (inside the branch that reads them, under tf.cond)
                return tf.cast(prods, _F64) + tf.cast(attention_mask, _F64) / tf.cast(s_scores, _F64)

            if q_i is not None and k_i is not None and not in_xla_context():
                # integer softmax on int32 scores where it gives the float64 rule's integers (not under
                # XLA, which fuses the float64 rule's chain into one pass)
                if not self.softmax.built:
                    self.softmax.build(None)  # called by method below: its act's variables under ".../softmax/act"
                scores_int, ok = self.softmax.mask_scores_int(tf.cast(prods, tf.int32), attention_mask, s_scores)
                prob_int, s_p = exact_or(
                    ok,
                    lambda: self.softmax.forward_int(scores_int, s_scores),
                    lambda: self.softmax.forward_int(scores(), s_scores),
                )
                probs = prob_int * s_p  # (B, heads, L, L) dequantized probabilities
            else:
                probs, s_p = self.softmax(scores(), scaling_factor=s_scores, integer_scores=True, training=training)
        else:
            scores = tf.matmul(q, k, transpose_b=True) / root + attention_mask
            probs, s_p = self.softmax(scores, training=training)
        probs = self.dropout(probs, training=training)
        if head_mask is not None:
            probs = probs * head_mask
        if s_p is not None and s_v is not None:
            ctx_scale = s_p * s_v
            if prob_int is not None and v_i is not None and head_mask is None and not training:
                # probs unchanged by dropout: exact integers |prob_int @ v_int| <= 256 * 128 (a row's
                # probabilities sum to at most 2**8), kept for output_activation's integer requantization
                ctx_int = tf.cast(tf.matmul(prob_int, self._split_heads(tf.cast(v_i, tf.float32))), tf.int32)
                ctx_int = tf.transpose(ctx_int, (0, 2, 1, 3))  # (B, L, heads, hd)
                shape = tf.shape(ctx_int)
                ctx_int = tf.reshape(ctx_int, (shape[0], shape[1], self.num_heads * self.head_dim))  # (B, L, H)
                context = attach_integer(ctx_int, ctx_scale)
                return self.output_activation(context, pre_act_scaling_factor=ctx_scale, training=training), probs
            # exact in float32: |prob_int @ v_int| <= 256 * 128 (dropout / head_mask may make it fractional)
            context = tf.matmul(exact_div(probs, s_p), round_ste(exact_div(v, s_v))) * ctx_scale
        else:
            ctx_scale = None
            context = tf.matmul(probs, v)
        context = tf.transpose(context, (0, 2, 1, 3))  # (B, L, heads, hd)
        shape = tf.shape(context)
        context = tf.reshape(context, (shape[0], shape[1], self.num_heads * self.head_dim))  # (B, L, H)
        return self.output_activation(context, pre_act_scaling_factor=ctx_scale, training=training), probs


class TFIBertResidualOutput(Block):
    """``dense``, dropout, 22-bit ``ln_input_act`` adding the residual, ``LayerNorm``, 8-bit
    ``output_activation`` (``attention.output`` and ``output``).

    Call: ``(x (B, L, in_dim), scale)``, residual ``(r (B, L, H), r_scale)`` -> ``(y (B, L, H), scale)``.
    """

    def __init__(self, config: IBertConfig, in_dim: int, name: str = "output", **kwargs: Any) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.dense = _linear(config, in_dim, config.hidden_size, "dense")
        self.ln_input_act = _act(config, "ln_input_act", LN_INPUT_BIT)
        self.LayerNorm = _layer_norm(config)
        self.output_activation = _act(config, "output_activation")
        self.dropout = _dropout(config.hidden_dropout_prob)

    def call(self, x, scale=None, residual=None, residual_scale=None, training=False):
        x, scale = self.dense(x, prev_act_scaling_factor=scale, training=training)
        x = self.dropout(x, training=training)
        x, scale = self.ln_input_act(
            x,
            pre_act_scaling_factor=scale,
            identity=residual,
            identity_scaling_factor=residual_scale,
            training=training,
        )
        x, scale = self.LayerNorm(x, scaling_factor=scale, training=training)
        return self.output_activation(x, pre_act_scaling_factor=scale, training=training)


class TFIBertAttention(Block):
    """``self`` (:class:`TFIBertSelfAttention`) and ``output`` (:class:`TFIBertResidualOutput`)."""

    def __init__(self, config: IBertConfig, name: str = "attention", **kwargs: Any) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.self_attention = TFIBertSelfAttention(config, name="self")
        self.dense_output = TFIBertResidualOutput(config, config.hidden_size, name="output")

    def call(self, hidden, scale=None, attention_mask=None, head_mask=None, training=False):
        (context, context_scale), probs = self.self_attention(
            hidden, scale=scale, attention_mask=attention_mask, head_mask=head_mask, training=training
        )
        out = self.dense_output(context, scale=context_scale, residual=hidden, residual_scale=scale, training=training)
        return out, probs


class TFIBertIntermediate(Block):
    """``dense`` (H -> intermediate), ``intermediate_act_fn`` (:class:`IntGELU`), 8-bit ``output_activation``."""

    def __init__(self, config: IBertConfig, name: str = "intermediate", **kwargs: Any) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.dense = _linear(config, config.hidden_size, config.intermediate_size, "dense")
        self.intermediate_act_fn = IntGELU(config.quant_mode, config.force_dequant, name="intermediate_act_fn")
        self.output_activation = _act(config, "output_activation")

    def call(self, x, scale=None, training=False):
        if scale is not None:  # quant mode: the kernels reshape nothing, and x keeps its attached integers
            x, scale = self.dense(x, prev_act_scaling_factor=scale, training=training)
            x, scale = self.intermediate_act_fn(x, scaling_factor=scale, training=training)
            return self.output_activation(x, pre_act_scaling_factor=scale, training=training)
        # As rows (elementwise and per-tensor maths only): float mode runs one fused MatMul + BiasAdd + GELU.
        rows, scale = self.dense(to_rows(x), prev_act_scaling_factor=scale, training=training)
        rows, scale = self.intermediate_act_fn(rows, scaling_factor=scale, training=training)
        rows, scale = self.output_activation(rows, pre_act_scaling_factor=scale, training=training)
        return from_rows(rows, x), scale


class TFIBertLayer(Block):
    """One post-LN layer in transformers' order: ``attention``, ``pre_intermediate_act``, ``intermediate``,
    ``pre_output_act``, ``output`` (whose residual is the ``pre_intermediate_act`` output)."""

    def __init__(self, config: IBertConfig, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.attention = TFIBertAttention(config, name="attention")
        self.intermediate = TFIBertIntermediate(config, name="intermediate")
        self.ffn_output = TFIBertResidualOutput(config, config.intermediate_size, name="output")
        self.pre_intermediate_act = _act(config, "pre_intermediate_act")
        self.pre_output_act = _act(config, "pre_output_act")

    def call(self, hidden, scale=None, attention_mask=None, head_mask=None, training=False):
        (attn, attn_scale), probs = self.attention(
            hidden, scale=scale, attention_mask=attention_mask, head_mask=head_mask, training=training
        )
        attn, attn_scale = self.pre_intermediate_act(attn, pre_act_scaling_factor=attn_scale, training=training)
        inter, inter_scale = self.intermediate(attn, scale=attn_scale, training=training)
        inter, inter_scale = self.pre_output_act(inter, pre_act_scaling_factor=inter_scale, training=training)
        out = self.ffn_output(inter, scale=inter_scale, residual=attn, residual_scale=attn_scale, training=training)
        return out, probs


def _xla_call(fn, *args):
    """``fn(*args)`` compiled by XLA inside a graph (a quant-mode inference block, :func:`xla_in_graph`)."""
    return tf.function(fn, jit_compile=True, autograph=False)(*args)


def _xla_layer_call(layer: TFIBertLayer, hidden, scale, attention_mask, head_mask):
    """A quant-mode inference call of ``layer`` compiled by XLA inside a graph (:func:`xla_in_graph`).

    The cluster takes the dequantized ``hidden`` (B, L, H) and recovers its integers exactly (the
    float64 rules run under XLA), so NaN or out-of-range values reach the kernels as they would op by
    op.  Returns ``(hidden (B, L, H), scale (1,), probs (B, heads, L, L))``.
    """

    def body(hidden, scale, attention_mask, head_mask):
        (out, out_scale), probs = layer(
            hidden, scale=scale, attention_mask=attention_mask, head_mask=head_mask, training=False
        )
        return out, out_scale, probs

    return _xla_call(body, hidden, scale, attention_mask, head_mask)


class TFIBertEncoder(Block):
    """``layer``: ``num_hidden_layers`` :class:`TFIBertLayer` (each fed the previous layer's output scale).

    Call: ``(hidden (B, L, H), scale)``, additive ``attention_mask``, per-layer ``head_mask`` list ->
    ``(last (B, L, H), all_hidden tuple or None, attentions tuple or None)``.
    """

    def __init__(self, config: IBertConfig, name: str = "encoder", **kwargs: Any) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.layer = LayerList([TFIBertLayer(config, name=str(i)) for i in range(config.num_hidden_layers)], "layer")

    def call(
        self,
        hidden,
        scale=None,
        attention_mask=None,
        head_mask=None,
        output_attentions=False,
        output_hidden_states=False,
        training=False,
    ):
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        with keras.name_scope(self.layer.name):  # variables under ".../layer/<i>/..."
            for i, layer in enumerate(self.layer.items):
                if all_hidden is not None:
                    all_hidden.append(hidden)
                layer_mask = None if head_mask is None else head_mask[i]
                if scale is not None and xla_in_graph(training):
                    hidden, scale, probs = _xla_layer_call(layer, hidden, scale, attention_mask, layer_mask)
                else:
                    (hidden, scale), probs = layer(
                        hidden, scale=scale, attention_mask=attention_mask, head_mask=layer_mask, training=training
                    )
                if all_attn is not None:
                    all_attn.append(probs)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden, None if all_hidden is None else tuple(all_hidden), None if all_attn is None else tuple(all_attn)


# --- base model -------------------------------------------------------------------------------------


class _IBertBackbone(BertBackboneMixin):
    """Creates I-BERT's base sub-layers on its owner (a model, or the ``ibert`` main layer)."""

    def _init_backbone(self, config: IBertConfig, add_pooling_layer: bool) -> None:
        self.config = config
        self.embedding_width = config.hidden_size
        self.position_padding_idx = config.pad_token_id  # RoBERTa positions (and the length cap)
        self.embeddings = TFIBertEmbeddings(config, name="embeddings")
        self.encoder = TFIBertEncoder(config, name="encoder")
        self.pooler = TFBertPooler(config, name="pooler") if add_pooling_layer else None

    def ibert_forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        training=False,
    ) -> BaseModelOutputWithPooling:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else bool(output_attentions)
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else bool(output_hidden_states)
        validate_inputs(
            cfg,
            input_ids,
            inputs_embeds,
            attention_mask,
            token_type_ids,
            position_ids,
            0,
            embed_width=cfg.hidden_size,
            max_length=self.max_sequence_length,
        )
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, seq_len = tf.shape(ref)[0], tf.shape(ref)[1]
        if token_type_ids is None:
            token_type_ids = tf.zeros((batch, seq_len), tf.int32)
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, inputs_embeds, 0)  # (B or 1, L)
        mask = extended_attention_mask(attention_mask, batch, seq_len, 0, False)  # (B, 1, 1, L)
        hidden, scale = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            training=training,
        )
        last, all_hidden, attentions = self.encoder(
            hidden,
            scale=scale,
            attention_mask=mask,
            head_mask=layer_head_masks(head_mask, cfg.num_hidden_layers),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            training=training,
        )
        pooled = None if self.pooler is None else self.pooler(last)  # (B, H)
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=pooled, hidden_states=all_hidden, attentions=attentions
        )


class TFIBertMainLayer(_IBertBackbone, Block):
    """The I-BERT base model as a layer named ``ibert`` inside the head classes.

    Args:
        config (IBertConfig): the model config.
        add_pooling_layer (bool): build ``pooler`` (only ``ForMultipleChoice`` uses it).

    Call: as :class:`TFIBertModel` (keyword arguments only); returns
    :class:`~nezha_zoo.outputs.BaseModelOutputWithPooling`.
    """

    def __init__(self, config: IBertConfig, add_pooling_layer: bool = True, name: str = "ibert", **kwargs: Any) -> None:
        Block.__init__(self, name=name, autocast=False, **kwargs)
        self._init_backbone(config, add_pooling_layer)

    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        training=False,
    ):
        return self.ibert_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            training=training,
        )


class TFIBertPreTrainedModel(TFPreTrainedModel):
    """Base of the I-BERT TF classes (config class, family, dummy inputs).

    Variables are the spec's, the quantization buffers included (non-trainable float32, starting at
    transformers' constants: ``x_min = -1e-5``, ``x_max = 1e-5``, zeros elsewhere).
    ``resize_token_embeddings`` is not supported, as in transformers.
    """

    family = IBERT
    config_class = IBertConfig
    base_model_prefix = "ibert"

    def _dummy_inputs(self) -> dict[str, Any]:
        return {"input_ids": tf.constant([[2, 3]], tf.int32)}

    def _build_unused(self) -> None:
        pass  # no decoder mode: every variable is created by the dummy call

    @property
    def quant_mode(self) -> bool:
        return self.config.quant_mode

    def freeze_integer_weights(self, frozen: bool = True) -> None:
        """Quantize every embedding table and linear kernel once and reuse the stored integers
        (``weight_integer`` and its scale) in inference calls, instead of requantizing them on every
        call as transformers does: the same numbers, less work per forward (quant mode only).

        Training-mode calls still requantize (and refresh the buffers).  Call it again after the
        weights change (loading, an optimizer step); ``frozen=False`` restores the default.
        """
        for layer in sublayers(self):
            if isinstance(layer, (QuantLinear, QuantEmbedding)):
                layer.freeze(frozen)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> None:
        """Not supported (as in transformers): the quantization state is tied to the table size."""
        raise NotImplementedError("resize_token_embeddings is not supported for I-BERT")


_BASE_DOC = """
    Call arguments (transformers' order; also accepted packed in the first argument as a list/tuple
    or dict, see :func:`nezha_zoo.tf.modeling_utils.unpack_inputs`):

        input_ids (B, L) int; attention_mask (B, L) 0/1; token_type_ids (B, L) in
        ``[0, type_vocab_size)``; position_ids (B or 1, L) (default RoBERTa-style: pads at
        ``pad_token_id``, tokens from ``pad_token_id + 1``; ``inputs_embeds``: ``pad_token_id + 1 ..``);
        head_mask (heads,) or (layers, heads); inputs_embeds (B, L, H); output_attentions /
        output_hidden_states / return_dict (bool); training (bool): dropout on and, in both modes,
        calibration of the activation ranges.  At most ``max_position_embeddings - pad_token_id - 1``
        tokens.  In quant mode ``last_hidden_state`` and ``hidden_states`` are the dequantized 8-bit
        integers (float32).
"""


class TFIBertModel(_IBertBackbone, TFIBertPreTrainedModel):
    __doc__ = (
        """Bare I-BERT encoder: ``last_hidden_state`` (B, L, H) and ``pooler_output`` (B, H) (float
    ``dense`` + tanh on the first token).

    Args:
        config (IBertConfig): the model config (``quant_mode``, ``force_dequant``).
        add_pooling_layer (bool): build the pooler (``pooler_output`` is None without it).
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
    )

    head = "Model"

    def __init__(self, config: IBertConfig, add_pooling_layer: bool = True, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_backbone(config, add_pooling_layer)
        self._finish_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is None:  # IBertModel(add_pooling_layer=False): no pooler weights
            spec = dataclasses.replace(spec, params=tuple(p for p in spec if not p.name.startswith("pooler.")))
        return spec

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self.ibert_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            training=training,
        )
        if (self.config.return_dict if return_dict is None else return_dict) or out.pooler_output is not None:
            return self._finish(out, return_dict)
        # transformers keeps the (None) pooler_output slot in the tuple.
        return (out.last_hidden_state, None) + tuple(v for v in (out.hidden_states, out.attentions) if v is not None)


class _IBertHead(TFIBertPreTrainedModel):
    """A head class over the ``ibert`` main layer (pooler only where ``HEADS_WITH_POOLER`` says)."""

    def _init_base(self, config: IBertConfig) -> None:
        self.ibert = TFIBertMainLayer(config, add_pooling_layer=self.head in HEADS_WITH_POOLER, name="ibert")


class TFIBertForMaskedLM(_IBertHead):
    __doc__ = (
        """Masked LM: ``logits`` (B, L, V) from the float ``lm_head`` (dense, GELU, layer_norm, the tied word
    embeddings, bias); ``labels`` (B, L), -100 ignored, give the mean cross-entropy ``loss``.

    Args:
        config (IBertConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMaskedLM"
    label_names = ("labels",)

    def __init__(self, config: IBertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.lm_head = TFRobertaLMHead(config, name="lm_head")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        table = self.ibert.embeddings.word_embeddings.embeddings  # (V, H): the float table, tied
        logits = self.lm_head(out.last_hidden_state, table)  # (B, L, V)
        return self._finish(masked_lm_output(logits, labels, out), return_dict)


class TFIBertForSequenceClassification(_IBertHead):
    __doc__ = (
        """Sentence classification/regression on the first token through ``classifier`` (dense, tanh,
    out_proj): ``logits`` (B, num_labels).  ``labels``: (B,) int (cross-entropy), (B,) float with
    ``num_labels == 1`` (MSE), or (B, num_labels) float (multi-label BCE); ``config.problem_type``
    overrides the inference.

    Args:
        config (IBertConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForSequenceClassification"
    label_names = ("labels",)

    def __init__(self, config: IBertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.classifier = TFClassificationHead(config, activation="tanh", name="classifier")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        logits = self.classifier(out.last_hidden_state, training=training)  # (B, num_labels)
        return self._finish(sequence_classification_output(self.config, logits, labels, out), return_dict)


class TFIBertForMultipleChoice(_IBertHead):
    __doc__ = (
        """Multiple choice on the pooled output: inputs (B, C, L) (``inputs_embeds`` (B, C, L, H)),
    ``logits`` (B, C); ``labels`` (B,) the right choice.  Hidden states/attentions are over the B*C
    flattened rows.  Argument order as transformers' PyTorch class: ``input_ids, token_type_ids,
    attention_mask, labels, position_ids, head_mask, inputs_embeds, ...``.

    Args:
        config (IBertConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMultipleChoice"
    label_names = ("labels",)

    def __init__(self, config: IBertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.dropout = dropout(config.hidden_dropout_prob)
        self.classifier = dense(1, "classifier")
        self._finish_init()

    def _dummy_inputs(self) -> dict[str, Any]:
        return {"input_ids": tf.constant([[[2, 3]]], tf.int32)}

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        token_type_ids=None,
        attention_mask=None,
        labels=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        validate_inputs(
            self.config,
            input_ids,
            inputs_embeds,
            attention_mask,
            token_type_ids,
            None,
            rank=3,
            embed_width=self.config.hidden_size,
            max_length=self.ibert.max_sequence_length,
        )
        choices = num_choices(input_ids, inputs_embeds)
        out = self._base_call(locals(), flatten=flatten_choices)
        pooled = self.dropout(out.pooler_output, training=training)  # (B*C, H)
        result = multiple_choice_output(self.classifier(pooled), choices, labels, out)  # (B*C, 1) -> (B, C)
        return self._finish(result, return_dict)


class TFIBertForTokenClassification(_IBertHead):
    __doc__ = (
        """Per-token classification: ``logits`` (B, L, num_labels); ``labels`` (B, L), -100 ignored.

    Args:
        config (IBertConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForTokenClassification"
    label_names = ("labels",)

    def __init__(self, config: IBertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.dropout, self.classifier = token_classifier(config)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        logits = self.classifier(self.dropout(out.last_hidden_state, training=training))  # (B, L, num_labels)
        return self._finish(token_classification_output(self.config, logits, labels, out), return_dict)


class TFIBertForQuestionAnswering(_IBertHead):
    __doc__ = (
        """Extractive QA: ``start_logits``/``end_logits`` (B, L); ``start_positions`` and
    ``end_positions`` (B,) give the mean start/end cross-entropy (positions clamped to [0, L],
    L ignored).

    Args:
        config (IBertConfig): the model config (``num_labels == 2``).
"""
        + _BASE_DOC
    )

    head = "ForQuestionAnswering"
    label_names = ("start_positions", "end_positions")

    def __init__(self, config: IBertConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.qa_outputs = dense(config.num_labels, "qa_outputs")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
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
        return self._finish(question_answering_output(logits, start_positions, end_positions, out), return_dict)
