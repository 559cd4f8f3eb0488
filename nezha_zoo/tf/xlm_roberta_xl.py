"""XLM-RoBERTa-XL for Keras 3: the seven transformers heads, composed from the shared BERT-style blocks.

The family's own choices (``nezha_zoo/families/xlm_roberta_xl.py``): pre-LN layers
(``XLM_ROBERTA_XL_NAMES``, cross-attention pre-normed too, no dropout on the feed-forward's output:
``output_dropout=False``), a final ``encoder.LayerNorm``, no embedding LayerNorm, RoBERTa positions
from ``pad_token_id`` (pads keep it, tokens count from ``pad_token_id + 1``, continuing after the
cached length), the pooler only in ``Model`` and ``ForMultipleChoice``, the tied RoBERTa ``lm_head``
and the tanh ``classifier``.  Token classification ignores the labels where ``attention_mask`` is not
1, and decoders return a cache by default (``config.use_cache``), as transformers' PyTorch XLM-R-XL
does.  transformers has no TF port of this family; the behaviour is its PyTorch one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import tensorflow as tf

from nezha_zoo.families.xlm_roberta_xl import HEADS_WITH_POOLER, XLM_ROBERTA_XL, XLMRobertaXLConfig
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    IGNORE_INDEX,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    TokenClassifierOutput,
)
from nezha_zoo.spec.blocks import XLM_ROBERTA_XL_NAMES
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.tf import losses
from nezha_zoo.tf.generation import TFGenerationMixin
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
    token_classifier,
)
from nezha_zoo.tf.layers import (
    POSITIONS_TO_KEEP_DOC,
    BertBackboneMixin,
    Block,
    TFBertEmbeddings,
    TFBertEncoder,
    dense,
    dropout,
    validate_inputs,
)
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, unpack_inputs
from nezha_zoo.validation import InputError

__all__ = [
    "TFXLMRobertaXLMainLayer",
    "TFXLMRobertaXLPreTrainedModel",
    "TFXLMRobertaXLModel",
    "TFXLMRobertaXLForCausalLM",
    "TFXLMRobertaXLForMaskedLM",
    "TFXLMRobertaXLForSequenceClassification",
    "TFXLMRobertaXLForMultipleChoice",
    "TFXLMRobertaXLForTokenClassification",
    "TFXLMRobertaXLForQuestionAnswering",
]

logger = logging.getLogger("nezha_zoo")


def active_token_labels(labels, attention_mask):
    """Labels (B, L) with -100 wherever ``attention_mask`` (B, L) is not 1 (transformers' XLM-R-XL rule)."""
    if labels is None or attention_mask is None:
        return labels
    if attention_mask.shape.rank != labels.shape.rank:
        raise InputError(
            f"token-classification labels {tuple(labels.shape)} need an attention_mask of the same shape, "
            f"got {tuple(attention_mask.shape)}"
        )
    labels = tf.cast(labels, tf.int64)
    keep = tf.equal(tf.cast(attention_mask, tf.int64), 1)
    return tf.where(keep, labels, tf.fill(tf.shape(labels), tf.constant(IGNORE_INDEX, tf.int64)))


# --- base model -------------------------------------------------------------------------------------


class _XLMRobertaXLBackbone(BertBackboneMixin):
    """Creates XLM-R-XL's base sub-layers on its owner (a model, or the ``roberta`` main layer)."""

    def _init_backbone(self, config: XLMRobertaXLConfig, add_pooling_layer: bool) -> None:
        self.config = config
        self.embedding_width = config.hidden_size
        # RoBERTa positions count from the padding row (and cap the length below the table size).
        self.position_padding_idx = config.pad_token_id
        self.embeddings = TFBertEmbeddings(
            config,
            config.hidden_size,
            use_layer_norm=False,  # pre-LN layers norm their own inputs
            position_padding_idx=config.pad_token_id,
            name="embeddings",
        )
        self.encoder = TFBertEncoder(config, XLM_ROBERTA_XL_NAMES, final_norm_name="LayerNorm", name="encoder")
        self.pooler = TFBertPooler(config, name="pooler") if add_pooling_layer else None

    def roberta_forward(
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
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        if use_cache is None:
            # transformers' XLM-R-XL: decoders return a cache unless told not to (none while training with
            # gradient checkpointing, which a cache would switch off).
            use_cache = self.config.use_cache and not (gradient_checkpointing and training)
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
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        pooled = None if self.pooler is None else self.pooler(out.last_hidden_state)  # (B, H)
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=out.last_hidden_state,
            pooler_output=pooled,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            cross_attentions=out.cross_attentions,
        )


class TFXLMRobertaXLMainLayer(_XLMRobertaXLBackbone, Block):
    """The XLM-RoBERTa-XL base model as a layer named ``roberta`` inside the head classes.

    Args:
        config (XLMRobertaXLConfig): the model config.
        add_pooling_layer (bool): build ``pooler`` (only ``ForMultipleChoice`` uses it).

    Call: as :class:`TFXLMRobertaXLModel` (keyword arguments only); returns
    :class:`~nezha_zoo.outputs.BaseModelOutputWithPoolingAndCrossAttentions`.
    """

    def __init__(
        self, config: XLMRobertaXLConfig, add_pooling_layer: bool = True, name: str = "roberta", **kwargs: Any
    ) -> None:
        Block.__init__(self, name=name, **kwargs)
        self._init_backbone(config, add_pooling_layer)

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
        return self.roberta_forward(
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


class TFXLMRobertaXLPreTrainedModel(TFPreTrainedModel):
    """Base of the XLM-RoBERTa-XL TF classes (config class, family, dummy inputs)."""

    family = XLM_ROBERTA_XL
    config_class = XLMRobertaXLConfig
    base_model_prefix = "roberta"
    cross_attention_heads = ("Model", "ForCausalLM", "ForMaskedLM")

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
        (B, L) in ``[0, type_vocab_size)``; position_ids (B or 1, L) (default RoBERTa-style: pads at
        ``pad_token_id``, tokens from ``pad_token_id + 1``; ``inputs_embeds``: ``pad_token_id + 1 ..``);
        head_mask (heads,) or (layers, heads); inputs_embeds (B, L, H); output_attentions /
        output_hidden_states / return_dict (bool); training (bool): dropout on.
        At most ``max_position_embeddings - pad_token_id - 1`` tokens.
"""

_DECODER_DOC = """
        encoder_hidden_states (B, Le, H) and encoder_attention_mask (B, Le): cross-attention inputs;
        past_key_values: per layer ``(k, v[, cross_k, cross_v])`` each (B, heads, Lp, hd);
        use_cache (bool): return the updated cache (decoders only; ``config.use_cache`` when None).
"""


class TFXLMRobertaXLModel(_XLMRobertaXLBackbone, TFXLMRobertaXLPreTrainedModel):
    __doc__ = (
        """Bare XLM-RoBERTa-XL encoder (or decoder with ``config.is_decoder``): ``last_hidden_state``
    (B, L, H) after the final ``encoder.LayerNorm`` and ``pooler_output`` (B, H).

    Args:
        config (XLMRobertaXLConfig): the model config.
        add_pooling_layer (bool): build the pooler (``pooler_output`` is None without it).
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
        + _DECODER_DOC
        + POSITIONS_TO_KEEP_DOC
        + """
    With ``return_dict=False`` the tuple is transformers': ``(last_hidden_state, pooler_output, ...)``
    with ``pooler_output`` kept (None) without a pooler.
"""
    )

    head = "Model"

    def __init__(self, config: XLMRobertaXLConfig, add_pooling_layer: bool = True, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_backbone(config, add_pooling_layer)
        self._finish_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is None:  # XLMRobertaXLModel(add_pooling_layer=False): no pooler weights
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
        out = self.roberta_forward(
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
        if (self.config.return_dict if return_dict is None else return_dict) or out.pooler_output is not None:
            return self._finish(out, return_dict)
        # transformers keeps the (None) pooler_output slot in the tuple.
        rest = (out.past_key_values, out.hidden_states, out.attentions, out.cross_attentions)
        return (out.last_hidden_state, None) + tuple(v for v in rest if v is not None)


class _XLMRobertaXLHead(TFXLMRobertaXLPreTrainedModel):
    """A head class over the ``roberta`` main layer (pooler only where ``HEADS_WITH_POOLER`` says)."""

    def _init_base(self, config: XLMRobertaXLConfig) -> None:
        self.roberta = TFXLMRobertaXLMainLayer(config, add_pooling_layer=self.head in HEADS_WITH_POOLER, name="roberta")

    def _lm_logits(self, hidden):
        table = self.roberta.embeddings.word_embeddings.embeddings  # (V, H), shared with the input side
        return self.lm_head(hidden, table)  # (B, L, V)


class TFXLMRobertaXLForCausalLM(TFGenerationMixin, _XLMRobertaXLHead):
    __doc__ = (
        """Left-to-right LM (set ``config.is_decoder``): ``logits`` (B, L, V) from the tied ``lm_head``;
    ``labels`` (B, L) give the next-token loss (shifted inside, -100 ignored).

    Args:
        config (XLMRobertaXLConfig): the model config.
"""
        + _BASE_DOC
        + _DECODER_DOC
        + """        logits_to_keep (int): the LM head on the last this many positions only (0: all; logits
        (B, min(L, logits_to_keep), V)), without ``labels``.
"""
    )

    head = "ForCausalLM"
    label_names = ("labels",)
    generation_position_rule = "padding_aware"  # RoBERTa positions count from pad_token_id + 1

    def __init__(self, config: XLMRobertaXLConfig, **kwargs: Any) -> None:
        if not config.is_decoder:
            logger.warning("TFXLMRobertaXLForCausalLM without is_decoder=True is not causal; set is_decoder=True")
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


class TFXLMRobertaXLForMaskedLM(_XLMRobertaXLHead):
    __doc__ = (
        """Masked LM: ``logits`` (B, L, V) from ``lm_head`` (dense, GELU, layer_norm, the tied word
    embeddings, bias); ``labels`` (B, L), -100 ignored, give the mean cross-entropy ``loss``.

    Args:
        config (XLMRobertaXLConfig): the model config.
"""
        + _BASE_DOC
        + """
        encoder_hidden_states, encoder_attention_mask: as TFXLMRobertaXLModel (decoder configs).
"""
    )

    head = "ForMaskedLM"
    label_names = ("labels",)

    def __init__(self, config: XLMRobertaXLConfig, **kwargs: Any) -> None:
        if config.is_decoder:
            logger.warning(
                "TFXLMRobertaXLForMaskedLM with is_decoder=True attends causally; "
                "set is_decoder=False for bi-directional self-attention"
            )
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
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        training=False,
    ):
        out = self._base_call(locals())
        result = masked_lm_output(self._lm_logits(out.last_hidden_state), labels, out)
        return self._finish(result, return_dict)


class TFXLMRobertaXLForSequenceClassification(_XLMRobertaXLHead):
    __doc__ = (
        """Sentence classification/regression on the first token through ``classifier`` (dense, tanh,
    out_proj): ``logits`` (B, num_labels).  ``labels``: (B,) int (cross-entropy), (B,) float with
    ``num_labels == 1`` (MSE), or (B, num_labels) float (multi-label BCE); ``config.problem_type``
    overrides the inference.

    Args:
        config (XLMRobertaXLConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForSequenceClassification"
    label_names = ("labels",)

    def __init__(self, config: XLMRobertaXLConfig, **kwargs: Any) -> None:
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
        out = self._base_call(locals(), pooled=True)
        logits = self.classifier(out.last_hidden_state, training=training)  # (B, num_labels)
        result = sequence_classification_output(self.config, logits, labels, out)
        return self._finish(result, return_dict)


class TFXLMRobertaXLForMultipleChoice(_XLMRobertaXLHead):
    __doc__ = (
        """Multiple choice on the pooled output: inputs (B, C, L) (``inputs_embeds`` (B, C, L, H)),
    ``logits`` (B, C); ``labels`` (B,) the right choice.  Hidden states/attentions are over the B*C
    flattened rows.  Argument order as transformers' PyTorch class: ``input_ids, token_type_ids,
    attention_mask, labels, position_ids, head_mask, inputs_embeds, ...``.

    Args:
        config (XLMRobertaXLConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMultipleChoice"
    label_names = ("labels",)

    def __init__(self, config: XLMRobertaXLConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.dropout = dropout(config.hidden_dropout_prob)  # transformers: not classifier_dropout here
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
            max_length=self.roberta.max_sequence_length,
        )
        choices = num_choices(input_ids, inputs_embeds)
        out = self._base_call(locals(), flatten=flatten_choices, pooled=True)
        pooled = self.dropout(out.pooler_output, training=training)  # (B*C, H)
        result = multiple_choice_output(self.classifier(pooled), choices, labels, out)  # (B*C, 1) -> (B, C)
        return self._finish(result, return_dict)


class TFXLMRobertaXLForTokenClassification(_XLMRobertaXLHead):
    __doc__ = (
        """Per-token classification: ``logits`` (B, L, num_labels); ``labels`` (B, L), -100 ignored,
    and ignored wherever ``attention_mask`` is not 1 (transformers' XLM-R-XL rule).

    Args:
        config (XLMRobertaXLConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForTokenClassification"
    label_names = ("labels",)

    def __init__(self, config: XLMRobertaXLConfig, **kwargs: Any) -> None:
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
        loss = None
        active = active_token_labels(labels, attention_mask)
        if active is not None:
            n = self.config.num_labels
            loss = losses.cross_entropy(tf.reshape(logits, (-1, n)), tf.reshape(active, (-1,)))  # (B*L, n)
        result = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return self._finish(result, return_dict)


class TFXLMRobertaXLForQuestionAnswering(_XLMRobertaXLHead):
    __doc__ = (
        """Extractive QA: ``start_logits``/``end_logits`` (B, L); ``start_positions`` and
    ``end_positions`` (B,) give the mean start/end cross-entropy (positions clamped to [0, L],
    L ignored).

    Args:
        config (XLMRobertaXLConfig): the model config (``num_labels == 2``).
"""
        + _BASE_DOC
    )

    head = "ForQuestionAnswering"
    label_names = ("start_positions", "end_positions")

    def __init__(self, config: XLMRobertaXLConfig, **kwargs: Any) -> None:
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
        result = question_answering_output(logits, start_positions, end_positions, out)
        return self._finish(result, return_dict)
