"""Nezha for Keras 3: the eight transformers heads, composed from the shared BERT-style blocks.

Nezha's own quirks: embeddings are word + token type only (no absolute positions, no
``position_ids`` argument), and every attention adds the *functional relative position encoding*
(transformers 4.57.6 ``NezhaRelativePositionsEncoding``), a fixed sinusoid of the relative distance:

* ``idx[i, j] = clip(j - (offset + i), -K, K) + K`` with ``K = max_relative_position``; query ``i``
  sits at absolute position ``offset + i`` (``offset`` = cached length in decoders, else 0);
* ``table[p, 0::2] = sin(p * div)``, ``table[p, 1::2] = cos(p * div)`` for ``p = 0 .. 2K`` (the
  shifted index, interleaved columns), ``div = exp(arange(0, d, 2) * -ln(10000) / d)``;
* ``R = table[idx]`` (Lq, Lk, head_dim); scores ``q.k^T + q_i.R[i, j]`` before the ``1/sqrt(d)``
  scaling, context ``sum_j p_ij v_j + sum_j p_ij R[i, j]`` (``p`` after dropout and head mask).

The encoding is computed, not stored (no variable, nothing in the checkpoint), from a (2K+1, d)
table and the (Lq, Lk) index grid of each call, so any length works.  transformers builds a
(max_position_embeddings, max_position_embeddings, d) buffer per layer and fails beyond it; up to
that length the two agree.  transformers applies the same terms in cross-attention (its
``crossattention`` is the same module), where it only runs when the encoder length equals the decoder
length; here cross-attention uses them for any lengths, with query ``i`` at ``offset + i`` and key
``j`` at encoder position ``j``.  transformers' cached path slices the table as if ``Lq == Lk``
(wrong); here cached decoding equals a full pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

from nezha_zoo.families.nezha import NEZHA, NezhaConfig, relative_position_table
from nezha_zoo.outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    NextSentencePredictorOutput,
    NezhaForPreTrainingOutput,
)
from nezha_zoo.spec.blocks import BertLayerNames
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.spec.positions import relative_position_index
from nezha_zoo.tf import losses
from nezha_zoo.tf.heads import (
    TFBertLMPredictionHead,
    TFBertPooler,
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
    POSITIONS_TO_KEEP_DOC,
    BertBackboneMixin,
    Block,
    TFBertAttention,
    TFBertEmbeddings,
    TFBertEncoder,
    TFBertLayer,
    TFBertSelfAttention,
    dense,
    validate_inputs,
)
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, unpack_inputs

__all__ = [
    "relative_position_encoding",
    "TFNezhaPreTrainedModel",
    "TFNezhaMainLayer",
    "TFNezhaModel",
    "TFNezhaForPreTraining",
    "TFNezhaForMaskedLM",
    "TFNezhaForNextSentencePrediction",
    "TFNezhaForSequenceClassification",
    "TFNezhaForMultipleChoice",
    "TFNezhaForTokenClassification",
    "TFNezhaForQuestionAnswering",
]


# --- functional relative positions ----------------------------------------------------------------


def relative_position_encoding(table: Any, q_len: Any, k_len: Any, query_offset: Any = 0) -> tf.Tensor:
    """``R`` (Lq, Lk, depth): ``table[clip(j - (query_offset + i), -K, K) + K]``.

    Only the (Lq, Lk) index grid of this call is built; ``table`` is (2K+1, depth).
    """
    table = tf.convert_to_tensor(table, tf.float32)
    k = (tf.shape(table)[0] - 1) // 2
    q_pos = tf.range(q_len) + tf.cast(query_offset, tf.int32)  # (Lq,) absolute query positions
    index = relative_position_index(q_pos, tf.range(k_len), k, tf.clip_by_value)  # (Lq, Lk) rows of the table
    return tf.gather(table, index)  # (Lq, Lk, depth)


class TFNezhaSelfAttention(TFBertSelfAttention):
    """BERT self-attention plus Nezha's relative-position key and value terms (see the module doc).

    Args:
        config (NezhaConfig): ``hidden_size``, ``num_attention_heads``, ``max_relative_position``.
        names (BertLayerNames): projection names (``query``/``key``/``value``).
        name (str): ``"self"``.

    Call: as :class:`~nezha_zoo.tf.layers.TFBertSelfAttention`.
    """

    def __init__(self, config: NezhaConfig, names: BertLayerNames, name: str, **kwargs: Any) -> None:
        super().__init__(config, names, name=name, **kwargs)
        self.max_relative_position = config.max_relative_position
        self._table = relative_position_table(config.max_relative_position, self.head_dim)  # constant, not a weight

    def relative_embeddings(self, q_len, k_len, query_offset):
        return relative_position_encoding(self._table, q_len, k_len, query_offset)  # (Lq, Lk, hd)


class TFNezhaAttention(TFBertAttention):
    """``attention`` / ``crossattention`` with :class:`TFNezhaSelfAttention` as ``self``."""

    self_attention_class = TFNezhaSelfAttention


class TFNezhaLayer(TFBertLayer):
    """A BERT post-LN layer whose attentions are :class:`TFNezhaAttention`."""

    attention_class = TFNezhaAttention


# --- base model -------------------------------------------------------------------------------------


class _NezhaBackbone(BertBackboneMixin):
    """Creates Nezha's base sub-layers on its owner (a model, or the ``nezha`` main layer)."""

    limits_length = False  # relative positions only: any length works

    def _init_backbone(self, config: NezhaConfig, add_pooling_layer: bool) -> None:
        if config.add_cross_attention and not config.is_decoder:
            raise ValueError("add_cross_attention=True needs is_decoder=True (as transformers' NezhaLayer)")
        self.config = config
        self.embedding_width = config.hidden_size
        self.embeddings = TFBertEmbeddings(config, config.hidden_size, position_embeddings=False, name="embeddings")
        self.encoder = TFBertEncoder(config, layer_class=TFNezhaLayer, name="encoder")
        self.pooler = TFBertPooler(config, name="pooler") if add_pooling_layer else None

    def nezha_forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        pooled = None if self.pooler is None else self.pooler(out.last_hidden_state)  # (B, H)
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=out.last_hidden_state,
            pooler_output=pooled,
            hidden_states=out.hidden_states,
            past_key_values=out.past_key_values,
            attentions=out.attentions,
            cross_attentions=out.cross_attentions,
        )


class TFNezhaMainLayer(_NezhaBackbone, Block):
    """The Nezha base model as a layer named ``nezha`` inside the head classes.

    Args:
        config (NezhaConfig): the model config.
        add_pooling_layer (bool): build ``pooler`` (heads that use the pooled output).

    Call: as :class:`TFNezhaModel` (keyword arguments only); returns
    :class:`~nezha_zoo.outputs.BaseModelOutputWithPoolingAndCrossAttentions`.
    """

    def __init__(self, config: NezhaConfig, add_pooling_layer: bool = True, name: str = "nezha", **kwargs: Any):
        Block.__init__(self, name=name, **kwargs)
        self._init_backbone(config, add_pooling_layer)

    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ):
        return self.nezha_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )


class TFNezhaPreTrainedModel(TFPreTrainedModel):
    """Base of the Nezha TF classes (config class, family, dummy inputs)."""

    family = NEZHA
    config_class = NezhaConfig
    base_model_prefix = "nezha"
    cross_attention_heads = ("Model", "ForMaskedLM")

    def _dummy_inputs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input_ids": tf.constant([[2, 3]], tf.int32)}
        if self.config.add_cross_attention and self.head in self.cross_attention_heads:
            out["encoder_hidden_states"] = tf.zeros((1, 2, self.config.hidden_size))
        return out


_BASE_DOC = """
    Call arguments (transformers' PyTorch order, no ``position_ids``; also accepted packed in the
    first argument as a list/tuple or dict, see :func:`nezha_zoo.tf.modeling_utils.unpack_inputs`):

        input_ids (B, L) int; attention_mask (B, L) 0/1 (default ones); token_type_ids (B, L)
        (default zeros); head_mask (heads,) or (layers, heads); inputs_embeds (B, L, H);
        output_attentions / output_hidden_states / return_dict (bool); training (bool): dropout on.
        Any length L works (no ``max_position_embeddings`` limit).
"""


class TFNezhaModel(_NezhaBackbone, TFNezhaPreTrainedModel):
    __doc__ = (
        """Bare Nezha encoder (or decoder with ``config.is_decoder``): ``last_hidden_state`` (B, L, H) and
    ``pooler_output`` (B, H).

    Args:
        config (NezhaConfig): the model config.
        add_pooling_layer (bool): build the pooler (``pooler_output`` is None without it).
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
        + """
        encoder_hidden_states (B, Le, H) and encoder_attention_mask (B, Le): cross-attention inputs
        (decoder with ``config.add_cross_attention``); past_key_values: per layer
        ``(k, v[, cross_k, cross_v])`` each (B, heads, Lp, hd), with attention_mask then (B, Lp + L);
        use_cache (bool): return the updated cache (decoders only; default False).
"""
        + POSITIONS_TO_KEEP_DOC
    )

    head = "Model"

    def __init__(self, config: NezhaConfig, add_pooling_layer: bool = True, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_backbone(config, add_pooling_layer)
        self._finish_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is None:  # NezhaModel(add_pooling_layer=False): no pooler weights
            spec = dataclasses.replace(spec, params=tuple(p for p in spec if not p.name.startswith("pooler.")))
        return spec

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        positions_to_keep=None,
        training=False,
    ):
        out = self.nezha_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=self.gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        return self._finish(out, return_dict)


class TFNezhaPreTrainingHeads(Block):
    """``cls``: ``predictions`` (MLM: transform, tied word embeddings, ``bias``) and/or
    ``seq_relationship`` (NSP, H -> 2).

    Args:
        config (NezhaConfig): the model config.
        mlm (bool), nsp (bool): which of the two heads to build.

    Call: ``sequence_output`` (B, L, H) or None, ``pooled_output`` (B, H) or None,
    ``embedding_matrix`` (V, H) -> ``(prediction_logits (B, L, V) or None, seq_relationship_logits
    (B, 2) or None)``.
    """

    def __init__(self, config: NezhaConfig, mlm: bool = True, nsp: bool = True, name: str = "cls", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.predictions = TFBertLMPredictionHead(config, name="predictions") if mlm else None
        self.seq_relationship = dense(2, "seq_relationship") if nsp else None

    def call(self, sequence_output=None, pooled_output=None, embedding_matrix=None):
        mlm = None if self.predictions is None else self.predictions(sequence_output, embedding_matrix)
        nsp = None if self.seq_relationship is None else self.seq_relationship(pooled_output)
        return mlm, nsp


def _word_embeddings(model) -> tf.Tensor:
    return model.nezha.embeddings.word_embeddings.embeddings  # (V, H), shared with the input side


class TFNezhaForPreTraining(TFNezhaPreTrainedModel):
    __doc__ = (
        """Masked LM + next-sentence prediction: ``prediction_logits`` (B, L, V) and
    ``seq_relationship_logits`` (B, 2).  With both ``labels`` (B, L) (-100 ignored) and
    ``next_sentence_label`` (B,) (0 = B continues A, 1 = random), ``loss`` = MLM CE + NSP CE.

    Args:
        config (NezhaConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForPreTraining"
    label_names = ("labels", "next_sentence_label")

    def __init__(self, config: NezhaConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.nezha = TFNezhaMainLayer(config, add_pooling_layer=True, name="nezha")
        self.cls = TFNezhaPreTrainingHeads(config)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        next_sentence_label=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        prediction_logits, seq_logits = self.cls(
            sequence_output=out.last_hidden_state,
            pooled_output=out.pooler_output,
            embedding_matrix=_word_embeddings(self),
        )  # (B, L, V), (B, 2)
        loss = None
        if labels is not None and next_sentence_label is not None:  # as transformers: both or none
            loss = losses.masked_lm_loss(prediction_logits, labels) + losses.cross_entropy(
                seq_logits, tf.reshape(next_sentence_label, (-1,))
            )
        result = NezhaForPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return self._finish(result, return_dict)


class TFNezhaForMaskedLM(TFNezhaPreTrainedModel):
    __doc__ = (
        """Masked LM: ``logits`` (B, L, V); ``labels`` (B, L), -100 ignored.

    Args:
        config (NezhaConfig): the model config.
"""
        + _BASE_DOC
        + """
        encoder_hidden_states (B, Le, H), encoder_attention_mask (B, Le): cross-attention inputs of a
        decoder config with ``add_cross_attention``.
"""
    )

    head = "ForMaskedLM"
    label_names = ("labels",)

    def __init__(self, config: NezhaConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.nezha = TFNezhaMainLayer(config, add_pooling_layer=False, name="nezha")
        self.cls = TFNezhaPreTrainingHeads(config, nsp=False)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        logits, _ = self.cls(sequence_output=out.last_hidden_state, embedding_matrix=_word_embeddings(self))
        result = masked_lm_output(logits, labels, out)
        return self._finish(result, return_dict)


class TFNezhaForNextSentencePrediction(TFNezhaPreTrainedModel):
    __doc__ = (
        """Next-sentence prediction on the pooled output: ``logits`` (B, 2); ``labels`` (B,)
    (0 = B continues A, 1 = random) give the cross-entropy ``loss``.

    Args:
        config (NezhaConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForNextSentencePrediction"
    label_names = ("labels",)

    def __init__(self, config: NezhaConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.nezha = TFNezhaMainLayer(config, add_pooling_layer=True, name="nezha")
        self.cls = TFNezhaPreTrainingHeads(config, mlm=False)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals(), pooled=True)
        _, logits = self.cls(pooled_output=out.pooler_output)  # (B, 2)
        loss = None if labels is None else losses.cross_entropy(logits, tf.reshape(labels, (-1,)))
        result = NextSentencePredictorOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return self._finish(result, return_dict)


class TFNezhaForSequenceClassification(TFNezhaPreTrainedModel):
    __doc__ = (
        """Sequence classification/regression on the pooled output (dropout, ``classifier``):
    ``logits`` (B, num_labels).  ``labels``: (B,) int (cross-entropy), (B,) float with
    ``num_labels == 1`` (MSE), or (B, num_labels) float (multi-label BCE); ``config.problem_type``
    overrides the inference.

    Args:
        config (NezhaConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForSequenceClassification"
    label_names = ("labels",)

    def __init__(self, config: NezhaConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.nezha = TFNezhaMainLayer(config, add_pooling_layer=True, name="nezha")
        self.dropout, self.classifier = token_classifier(config)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals(), pooled=True)
        logits = self.classifier(self.dropout(out.pooler_output, training=training))  # (B, num_labels)
        result = sequence_classification_output(self.config, logits, labels, out)
        return self._finish(result, return_dict)


class TFNezhaForMultipleChoice(TFNezhaPreTrainedModel):
    __doc__ = (
        """Multiple choice on the pooled output: inputs (B, C, L) (``inputs_embeds`` (B, C, L, H)),
    ``logits`` (B, C); ``labels`` (B,) the right choice.  Hidden states/attentions are over the
    B*C flattened rows.

    Args:
        config (NezhaConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMultipleChoice"
    label_names = ("labels",)

    def __init__(self, config: NezhaConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.nezha = TFNezhaMainLayer(config, add_pooling_layer=True, name="nezha")
        self.dropout, _ = token_classifier(config)
        self.classifier = dense(1, "classifier")
        self._finish_init()

    def _dummy_inputs(self) -> dict[str, Any]:
        return {"input_ids": tf.constant([[[2, 3]]], tf.int32)}

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
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
            positions=False,
        )
        choices = num_choices(input_ids, inputs_embeds)
        out = self._base_call(locals(), flatten=flatten_choices, pooled=True)
        pooled = self.dropout(out.pooler_output, training=training)  # (B*C, H)
        result = multiple_choice_output(self.classifier(pooled), choices, labels, out)  # (B*C, 1) -> (B, C)
        return self._finish(result, return_dict)


class TFNezhaForTokenClassification(TFNezhaPreTrainedModel):
    __doc__ = (
        """Per-token classification: ``logits`` (B, L, num_labels); ``labels`` (B, L), -100 ignored.

    Args:
        config (NezhaConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForTokenClassification"
    label_names = ("labels",)

    def __init__(self, config: NezhaConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.nezha = TFNezhaMainLayer(config, add_pooling_layer=False, name="nezha")
        self.dropout, self.classifier = token_classifier(config)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
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
        result = token_classification_output(self.config, logits, labels, out)
        return self._finish(result, return_dict)


class TFNezhaForQuestionAnswering(TFNezhaPreTrainedModel):
    __doc__ = (
        """Extractive QA: ``start_logits``/``end_logits`` (B, L); ``start_positions`` and
    ``end_positions`` (B,) give the mean start/end cross-entropy (positions clamped to [0, L],
    L ignored).

    Args:
        config (NezhaConfig): the model config (``num_labels == 2``).
"""
        + _BASE_DOC
    )

    head = "ForQuestionAnswering"
    label_names = ("start_positions", "end_positions")

    def __init__(self, config: NezhaConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.nezha = TFNezhaMainLayer(config, add_pooling_layer=False, name="nezha")
        self.qa_outputs = dense(config.num_labels, "qa_outputs")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
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
        result = question_answering_output(logits, start_positions, end_positions, out)
        return self._finish(result, return_dict)
