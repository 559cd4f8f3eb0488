"""Electra for Keras 3: the eight transformers heads, composed from the shared BERT-style blocks.

Electra's own quirks: embeddings of width ``embedding_size`` projected to ``hidden_size`` by
``embeddings_project`` when they differ, no pooler, a GELU classification head, the discriminator
head, and the generator head (always GELU) tied to the word embeddings.  Unlike transformers' TF
port, ``TFElectraForPreTraining`` takes ``labels`` and there is a ``TFElectraForCausalLM``.
"""

from __future__ import annotations

import logging
from typing import Any

import tensorflow as tf

from nezha_zoo.families.electra import ELECTRA, ElectraConfig
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    CausalLMOutputWithCrossAttentions,
    ElectraForPreTrainingOutput,
)
from nezha_zoo.tf import losses
from nezha_zoo.tf.generation import TFGenerationMixin
from nezha_zoo.tf.heads import (
    TFClassificationHead,
    TFLMHeadTransform,
    TFSequenceSummary,
    TFTiedLMOutput,
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
    TFBertEmbeddings,
    TFBertEncoder,
    dense,
    get_activation,
    validate_inputs,
)
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, unpack_inputs

__all__ = [
    "TFElectraPreTrainedModel",
    "TFElectraMainLayer",
    "TFElectraModel",
    "TFElectraForPreTraining",
    "TFElectraForMaskedLM",
    "TFElectraForCausalLM",
    "TFElectraForSequenceClassification",
    "TFElectraForMultipleChoice",
    "TFElectraForTokenClassification",
    "TFElectraForQuestionAnswering",
]

logger = logging.getLogger("nezha_zoo")


class _ElectraBackbone(BertBackboneMixin):
    """Creates Electra's base sub-layers on its owner (a model, or the ``electra`` main layer)."""

    def _init_backbone(self, config: ElectraConfig) -> None:
        self.config = config
        self.embedding_width = config.embedding_size
        self.embeddings = TFBertEmbeddings(config, config.embedding_size, name="embeddings")
        self.embeddings_project = (
            dense(config.hidden_size, "embeddings_project") if config.embedding_size != config.hidden_size else None
        )
        self.encoder = TFBertEncoder(config, name="encoder")

    def after_embeddings(self, hidden, training):
        return hidden if self.embeddings_project is None else self.embeddings_project(hidden)  # (B, L, E) -> (B, L, H)


class TFElectraMainLayer(_ElectraBackbone, Block):
    """The Electra base model as a layer named ``electra`` inside the head classes.

    Args:
        config (ElectraConfig): the model config.

    Call: as :class:`TFElectraModel` (keyword arguments only); returns
    :class:`~nezha_zoo.outputs.BaseModelOutputWithPastAndCrossAttentions`.
    """

    def __init__(self, config: ElectraConfig, name: str = "electra", **kwargs: Any) -> None:
        Block.__init__(self, name=name, **kwargs)
        self._init_backbone(config)

    def call(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
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
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
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


class TFElectraPreTrainedModel(TFPreTrainedModel):
    """Base of the Electra TF classes (config class, family, dummy inputs)."""

    family = ELECTRA
    config_class = ElectraConfig
    base_model_prefix = "electra"
    cross_attention_heads = ("Model", "ForCausalLM")

    def _dummy_inputs(self) -> dict[str, Any]:
        ids = tf.constant([[2, 3]], tf.int32)
        out: dict[str, Any] = {"input_ids": ids}
        if self.config.add_cross_attention and self.head in self.cross_attention_heads:
            out["encoder_hidden_states"] = tf.zeros((1, 2, self.config.hidden_size))
        return out


_BASE_DOC = """
    Call arguments (transformers' order; also accepted packed in the first argument as a list/tuple
    or dict, see :func:`nezha_zoo.tf.modeling_utils.unpack_inputs`):

        input_ids (B, L) int; attention_mask (B, L) 0/1 (B, past + L with a cache); token_type_ids
        (B, L); position_ids (B or 1, L); head_mask (heads,) or (layers, heads); inputs_embeds
        (B, L, embedding_size); output_attentions / output_hidden_states / return_dict (bool);
        training (bool): dropout on.
"""


class TFElectraModel(_ElectraBackbone, TFElectraPreTrainedModel):
    __doc__ = (
        """Bare Electra encoder (or decoder with ``config.is_decoder``): last hidden state (B, L, H).

    Args:
        config (ElectraConfig): the model config.
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
        + """
        encoder_hidden_states (B, Le, H) and encoder_attention_mask (B, Le): cross-attention inputs;
        past_key_values: per layer ``(k, v[, cross_k, cross_v])`` each (B, heads, Lp, hd);
        use_cache (bool): return the updated cache (decoders only; default False, as transformers PyTorch).
"""
        + POSITIONS_TO_KEEP_DOC
    )

    head = "Model"

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_backbone(config)
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
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
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


class TFElectraDiscriminatorPredictions(Block):
    """``dense`` (H -> H) -> ``hidden_act`` -> ``dense_prediction`` (H -> 1), squeezed to (B, L)."""

    def __init__(self, config: ElectraConfig, name: str = "discriminator_predictions", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.dense = dense(config.hidden_size, "dense")
        self.act = get_activation(config.hidden_act)
        self.dense_prediction = dense(1, "dense_prediction")

    def call(self, hidden_states):
        return tf.squeeze(self.dense_prediction(self.act(self.dense(hidden_states))), -1)  # (B, L, 1) -> (B, L)


class TFElectraForPreTraining(TFElectraPreTrainedModel):
    __doc__ = (
        """Replaced-token detection: ``logits`` (B, L); ``labels`` (B, L) 1 = replaced give a BCE
    ``loss`` over positions with ``attention_mask == 1``.

    Args:
        config (ElectraConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForPreTraining"
    label_names = ("labels",)

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.electra = TFElectraMainLayer(config, name="electra")
        self.discriminator_predictions = TFElectraDiscriminatorPredictions(config)
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
        logits = self.discriminator_predictions(out.last_hidden_state)
        loss = None if labels is None else losses.replaced_token_detection_loss(logits, labels, attention_mask)
        result = ElectraForPreTrainingOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return self._finish(result, return_dict)


class _GeneratorMixin:
    """Generator head: ``generator_predictions`` (dense H->E, GELU, LayerNorm) and the tied
    ``generator_lm_head`` (word embeddings^T + bias)."""

    def _init_generator(self, config: ElectraConfig) -> None:
        # transformers hard-codes GELU here whatever hidden_act says (its Flax port does not: a bug).
        self.generator_predictions = TFLMHeadTransform(
            config, config.embedding_size, activation="gelu", name="generator_predictions"
        )
        self.generator_lm_head = TFTiedLMOutput(config.vocab_size, name="generator_lm_head")

    def _lm_logits(self, hidden):
        table = self.electra.embeddings.word_embeddings.embeddings  # (V, E), shared with the input side
        return self.generator_lm_head(self.generator_predictions(hidden), table)


class TFElectraForMaskedLM(_GeneratorMixin, TFElectraPreTrainedModel):
    __doc__ = (
        """Generator (masked LM): ``logits`` (B, L, V); ``labels`` (B, L), -100 ignored.

    Args:
        config (ElectraConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMaskedLM"
    label_names = ("labels",)

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.electra = TFElectraMainLayer(config, name="electra")
        self._init_generator(config)
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
        logits = self._lm_logits(out.last_hidden_state)
        result = masked_lm_output(logits, labels, out)
        return self._finish(result, return_dict)


class TFElectraForCausalLM(TFGenerationMixin, _GeneratorMixin, TFElectraPreTrainedModel):
    __doc__ = (
        """Generator as a left-to-right LM (set ``config.is_decoder``): ``logits`` (B, L, V); ``labels``
    (B, L) give the next-token loss (shifted inside, -100 ignored).

    Args:
        config (ElectraConfig): the model config.
"""
        + _BASE_DOC
        + """
        encoder_hidden_states, encoder_attention_mask, past_key_values, use_cache: as TFElectraModel.
        logits_to_keep (int): the LM head on the last this many positions only (0: all; logits
        (B, min(L, logits_to_keep), V)), without ``labels``.
"""
    )

    head = "ForCausalLM"
    label_names = ("labels",)
    generation_position_rule = "cumsum"  # learned absolute positions: left pads must not shift them

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if not config.is_decoder:
            logger.warning("TFElectraForCausalLM is meant to be used with config.is_decoder=True")
        self.electra = TFElectraMainLayer(config, name="electra")
        self._init_generator(config)
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
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
        logits_to_keep: int = 0,
    ):
        if labels is not None:
            use_cache = False  # as transformers: no cache when computing the loss
        out = self._base_call(locals())
        logits = self._lm_logits(keep_last_positions(out.last_hidden_state, logits_to_keep, labels))  # (B, L', V)
        loss = None if labels is None else losses.causal_lm_loss(logits, labels)
        result = CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            cross_attentions=out.cross_attentions,
        )
        return self._finish(result, return_dict)


class TFElectraForSequenceClassification(TFElectraPreTrainedModel):
    __doc__ = (
        """Sentence classification/regression on the first token: ``logits`` (B, num_labels).
    ``labels``: (B,) int (cross-entropy), (B,) float with ``num_labels == 1`` (MSE), or
    (B, num_labels) float (multi-label BCE); ``config.problem_type`` overrides the inference.

    Args:
        config (ElectraConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForSequenceClassification"
    label_names = ("labels",)

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.electra = TFElectraMainLayer(config, name="electra")
        self.classifier = TFClassificationHead(config, activation="gelu", name="classifier")
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
        out = self._base_call(locals(), pooled=True)
        logits = self.classifier(out.last_hidden_state, training=training)
        result = sequence_classification_output(self.config, logits, labels, out)
        return self._finish(result, return_dict)


class TFElectraForMultipleChoice(TFElectraPreTrainedModel):
    __doc__ = (
        """Multiple choice: inputs (B, C, L) (``inputs_embeds`` (B, C, L, E)), ``logits`` (B, C);
    ``labels`` (B,) the right choice.  Hidden states/attentions are over the B*C flattened rows.

    Args:
        config (ElectraConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMultipleChoice"
    label_names = ("labels",)

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.electra = TFElectraMainLayer(config, name="electra")
        self.sequence_summary = TFSequenceSummary(config, name="sequence_summary")
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
        position_ids=None,
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
            embed_width=self.config.embedding_size,
        )
        choices = num_choices(input_ids, inputs_embeds)
        # summary_type "first" reads position 0 only: the last layer computes just that row.
        first = self.sequence_summary.summary_type == "first"
        out = self._base_call(locals(), flatten=flatten_choices, pooled=first)
        pooled = self.sequence_summary(out.last_hidden_state, training=training)  # (B*C, H)
        result = multiple_choice_output(self.classifier(pooled), choices, labels, out)  # (B*C, 1) -> (B, C)
        return self._finish(result, return_dict)


class TFElectraForTokenClassification(TFElectraPreTrainedModel):
    __doc__ = (
        """Per-token classification: ``logits`` (B, L, num_labels); ``labels`` (B, L), -100 ignored.

    Args:
        config (ElectraConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForTokenClassification"
    label_names = ("labels",)

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.electra = TFElectraMainLayer(config, name="electra")
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
        logits = self.classifier(self.dropout(out.last_hidden_state, training=training))
        result = token_classification_output(self.config, logits, labels, out)
        return self._finish(result, return_dict)


class TFElectraForQuestionAnswering(TFElectraPreTrainedModel):
    __doc__ = (
        """Extractive QA: ``start_logits``/``end_logits`` (B, L); ``start_positions`` and
    ``end_positions`` (B,) give the mean start/end cross-entropy (positions clamped to [0, L],
    L ignored).

    Args:
        config (ElectraConfig): the model config (``num_labels == 2``).
"""
        + _BASE_DOC
    )

    head = "ForQuestionAnswering"
    label_names = ("start_positions", "end_positions")

    def __init__(self, config: ElectraConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.electra = TFElectraMainLayer(config, name="electra")
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
        result = question_answering_output(logits, start_positions, end_positions, out)
        return self._finish(result, return_dict)
