"""MPNet for Keras 3: the six transformers heads, composed from the shared BERT-style blocks.

MPNet's own quirks (transformers 4.57.6 ``modeling_mpnet.py``):

* embeddings are word + absolute position (no token types), with RoBERTa-style positions: the
  padding row is hard-coded to 1 (whatever ``pad_token_id`` says), padding tokens sit at position 1
  and real tokens count from 2 (``arange(2, L + 2)`` with ``inputs_embeds``).  So at most
  ``max_position_embeddings - 2`` tokens fit; longer inputs raise ``InputError``.
* attention projections ``attention.attn.{q,k,v,o}`` and ``attention.LayerNorm``
  (:data:`~nezha_zoo.spec.blocks.MPNET_NAMES`).
* one relative-attention bias table ``encoder.relative_attention_bias`` (buckets x heads) shared by
  all layers, looked up once per forward with T5's bidirectional buckets (``max_distance`` 128) of
  ``key - query`` over ``arange`` positions (``position_ids`` are ignored here, as in transformers)
  and added to the attention scores after the ``1/sqrt(d)`` scaling, before the mask.
* the pooler is built only where it is used (``TFMPNetModel``, ``TFMPNetForMultipleChoice``), so
  training any other head gives every variable a gradient (transformers' TF port always builds it).

Deliberate difference: the buckets follow ``config.relative_attention_num_buckets`` everywhere.
transformers PyTorch hard-codes 32 in ``compute_position_bias`` (its table still has
``relative_attention_num_buckets`` rows): with 32 (every released checkpoint) the two agree; with
more, transformers uses only the first 32 rows; with fewer it indexes past the table and fails.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import tensorflow as tf

from nezha_zoo.families.mpnet import (
    EMBEDDING_PADDING_IDX,
    HEADS_WITH_POOLER,
    MPNET,
    MPNetConfig,
    relative_bucket_table,
)
from nezha_zoo.outputs import (
    BaseModelOutputWithPooling,
    SentenceEmbeddingOutput,
)
from nezha_zoo.spec.blocks import MPNET_NAMES
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.spec.positions import relative_position_index
from nezha_zoo.tf.heads import (
    TFBertPooler,
    TFClassificationHead,
    TFRobertaLMHead,
    flatten_choices,
    masked_lm_output,
    mean_pool,
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
    validate_inputs,
)
from nezha_zoo.tf.modeling_utils import TFPreTrainedModel, unpack_inputs

__all__ = [
    "TFMPNetEncoder",
    "TFMPNetMainLayer",
    "TFMPNetPreTrainedModel",
    "TFMPNetModel",
    "TFMPNetForMaskedLM",
    "TFMPNetForSequenceClassification",
    "TFMPNetForMultipleChoice",
    "TFMPNetForTokenClassification",
    "TFMPNetForQuestionAnswering",
]


class TFMPNetEncoder(TFBertEncoder):
    """The post-LN layer stack (``encoder.layer.<i>`` with MPNet's names) plus the shared
    ``relative_attention_bias`` table (``relative_attention_num_buckets`` x heads).

    Args:
        config (MPNetConfig): the model config.
        name (str): ``"encoder"``.

    Call: as :class:`~nezha_zoo.tf.layers.TFBertEncoder`; the position bias is computed here, once
    per forward, from the sequence length of ``hidden_states`` (B, L, H).
    """

    def __init__(self, config: MPNetConfig, name: str = "encoder", **kwargs: Any) -> None:
        super().__init__(config, MPNET_NAMES, name=name, **kwargs)
        self.num_buckets = config.relative_attention_num_buckets
        self.bucket_span = config.max_position_embeddings
        self._bucket_table = relative_bucket_table(config)  # (2S + 1,) constant, not a weight
        self.relative_attention_bias = keras.layers.Embedding(
            config.relative_attention_num_buckets, config.num_attention_heads, name="relative_attention_bias"
        )

    def compute_position_bias(self, hidden_states) -> tf.Tensor:
        """(1, heads, L, L) additive score bias from ``arange`` positions."""
        length = tf.shape(hidden_states)[1]
        positions = tf.range(length)
        index = relative_position_index(positions, positions, self.bucket_span, tf.clip_by_value)  # (L, L)
        bucket = tf.gather(self._bucket_table, index)  # (L, L)
        values = self.relative_attention_bias(bucket)  # (L, L, heads)
        return tf.transpose(values, (2, 0, 1))[None]  # (1, heads, L, L)

    def call(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=False,
        output_attentions=False,
        output_hidden_states=False,
        position_bias=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ):
        if position_bias is None:
            position_bias = self.compute_position_bias(hidden_states)  # (1, heads, L, L), shared by every layer
        return super().call(
            hidden_states,
            attention_mask=attention_mask,
            head_mask=head_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            position_bias=position_bias,
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )


# --- base model -------------------------------------------------------------------------------------


class _MPNetBackbone(BertBackboneMixin):
    """Creates MPNet's base sub-layers on its owner (a model, or the ``mpnet`` main layer)."""

    position_padding_idx = EMBEDDING_PADDING_IDX

    def _init_backbone(self, config: MPNetConfig, add_pooling_layer: bool) -> None:
        self.config = config
        self.embedding_width = config.hidden_size
        self.embeddings = TFBertEmbeddings(
            config,
            config.hidden_size,
            token_type_embeddings=False,
            padding_idx=EMBEDDING_PADDING_IDX,
            position_padding_idx=EMBEDDING_PADDING_IDX,
            name="embeddings",
        )
        self.encoder = TFMPNetEncoder(config, name="encoder")
        self.pooler = TFBertPooler(config, name="pooler") if add_pooling_layer else None

    def mpnet_forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ) -> BaseModelOutputWithPooling:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        pooled = None if self.pooler is None else self.pooler(out.last_hidden_state)  # (B, H)
        return BaseModelOutputWithPooling(
            last_hidden_state=out.last_hidden_state,
            pooler_output=pooled,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


class TFMPNetMainLayer(_MPNetBackbone, Block):
    """The MPNet base model as a layer named ``mpnet`` inside the head classes.

    Args:
        config (MPNetConfig): the model config.
        add_pooling_layer (bool): build ``pooler`` (only ``ForMultipleChoice`` uses it).

    Call: as :class:`TFMPNetModel` (keyword arguments only); returns
    :class:`~nezha_zoo.outputs.BaseModelOutputWithPooling`.
    """

    def __init__(self, config: MPNetConfig, add_pooling_layer: bool = True, name: str = "mpnet", **kwargs: Any):
        Block.__init__(self, name=name, **kwargs)
        self._init_backbone(config, add_pooling_layer)

    def call(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ):
        return self.mpnet_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )


class TFMPNetPreTrainedModel(TFPreTrainedModel):
    """Base of the MPNet TF classes: config class, family, dummy inputs and :meth:`encode`."""

    family = MPNET
    config_class = MPNetConfig
    base_model_prefix = "mpnet"
    cross_attention_heads = ()

    def _dummy_inputs(self) -> dict[str, Any]:
        return {"input_ids": tf.constant([[2, 3]], tf.int32)}

    def _build_unused(self) -> None:
        """MPNet has no cross-attention (transformers ignores ``add_cross_attention`` for it)."""

    def _base_forward(self, **inputs) -> BaseModelOutputWithPooling:
        if self.head == "Model":
            return self.mpnet_forward(**inputs)
        return getattr(self, self.base_model_prefix)(**inputs)

    def encode(self, input_ids, attention_mask=None, normalize: bool = True) -> SentenceEmbeddingOutput:
        """Sentence embeddings: the masked mean of the last hidden states, L2-normalised by default
        (sentence-transformers' mean pooling + ``Normalize``; see :func:`nezha_zoo.tf.mean_pool`).

        Args:
            input_ids (tf.Tensor | np.ndarray): (B, L) int token ids.
            attention_mask (tf.Tensor | np.ndarray | None): (B, L) 1 = token, 0 = padding; default ones.
            normalize (bool): unit-length embeddings.

        Returns:
            SentenceEmbeddingOutput: ``embeddings`` (B, H) and ``last_hidden_state`` (B, L, H).
        """
        input_ids = tf.convert_to_tensor(input_ids)
        if attention_mask is not None:
            attention_mask = tf.convert_to_tensor(attention_mask)
        out = self._base_forward(input_ids=input_ids, attention_mask=attention_mask, training=False)
        embeddings = mean_pool(out.last_hidden_state, attention_mask, normalize=normalize)  # (B, H)
        return SentenceEmbeddingOutput(embeddings=embeddings, last_hidden_state=out.last_hidden_state)


_BASE_DOC = """
    Call arguments (transformers' order, no ``token_type_ids``; also accepted packed in the first
    argument as a list/tuple or dict, see :func:`nezha_zoo.tf.modeling_utils.unpack_inputs`):

        input_ids (B, L) int; attention_mask (B, L) 0/1 (default ones); position_ids (B or 1, L)
        (default: RoBERTa-style, pads at 1 and tokens from 2); head_mask (heads,) or
        (layers, heads); inputs_embeds (B, L, H) (positions ``arange(2, L + 2)``);
        output_attentions / output_hidden_states / return_dict (bool); training (bool): dropout on.
        At most ``max_position_embeddings - 2`` tokens.
"""


class TFMPNetModel(_MPNetBackbone, TFMPNetPreTrainedModel):
    __doc__ = (
        """Bare MPNet encoder: ``last_hidden_state`` (B, L, H) and ``pooler_output`` (B, H).

    Args:
        config (MPNetConfig): the model config.
        add_pooling_layer (bool): build the pooler (``pooler_output`` is None without it).
        seed, gradient_checkpointing, name: see :class:`~nezha_zoo.tf.modeling_utils.TFPreTrainedModel`.
"""
        + _BASE_DOC
        + POSITIONS_TO_KEEP_DOC
    )

    head = "Model"

    def __init__(self, config: MPNetConfig, add_pooling_layer: bool = True, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_backbone(config, add_pooling_layer)
        self._finish_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is None:  # MPNetModel(add_pooling_layer=False): no pooler weights
            spec = dataclasses.replace(spec, params=tuple(p for p in spec if not p.name.startswith("pooler.")))
        return spec

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        positions_to_keep=None,
        training=False,
    ):
        out = self.mpnet_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            head_mask=head_mask,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=self.gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        return self._finish(out, return_dict)


class _MPNetHead(TFMPNetPreTrainedModel):
    """A head class over the ``mpnet`` main layer (pooler only where ``HEADS_WITH_POOLER`` says)."""

    def _init_base(self, config: MPNetConfig) -> None:
        self.mpnet = TFMPNetMainLayer(config, add_pooling_layer=self.head in HEADS_WITH_POOLER, name="mpnet")


class TFMPNetForMaskedLM(_MPNetHead):
    __doc__ = (
        """Masked LM: ``logits`` (B, L, V) from ``lm_head`` (dense, GELU, layer_norm, the tied word
    embeddings, bias); ``labels`` (B, L), -100 ignored, give the mean cross-entropy ``loss``.

    Args:
        config (MPNetConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMaskedLM"
    label_names = ("labels",)

    def __init__(self, config: MPNetConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.lm_head = TFRobertaLMHead(config, name="lm_head")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
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
        table = self.mpnet.embeddings.word_embeddings.embeddings  # (V, H), shared with the input side
        logits = self.lm_head(out.last_hidden_state, table)  # (B, L, V)
        result = masked_lm_output(logits, labels, out)
        return self._finish(result, return_dict)


class TFMPNetForSequenceClassification(_MPNetHead):
    __doc__ = (
        """Sentence classification/regression on the first token through ``classifier`` (dense, tanh,
    out_proj): ``logits`` (B, num_labels).  ``labels``: (B,) int (cross-entropy), (B,) float with
    ``num_labels == 1`` (MSE), or (B, num_labels) float (multi-label BCE); ``config.problem_type``
    overrides the inference.

    Args:
        config (MPNetConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForSequenceClassification"
    label_names = ("labels",)

    def __init__(self, config: MPNetConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.classifier = TFClassificationHead(config, activation="tanh", name="classifier")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
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


class TFMPNetForMultipleChoice(_MPNetHead):
    __doc__ = (
        """Multiple choice on the pooled output: inputs (B, C, L) (``inputs_embeds`` (B, C, L, H),
    ``position_ids`` (B, C, L)), ``logits`` (B, C); ``labels`` (B,) the right choice.  Hidden
    states/attentions are over the B*C flattened rows.

    Args:
        config (MPNetConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForMultipleChoice"
    label_names = ("labels",)

    def __init__(self, config: MPNetConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
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
            None,
            None,
            rank=3,
            embed_width=self.config.hidden_size,
            max_length=self.mpnet.max_sequence_length,
        )
        choices = num_choices(input_ids, inputs_embeds)
        out = self._base_call(locals(), flatten=flatten_choices, pooled=True)
        pooled = self.dropout(out.pooler_output, training=training)  # (B*C, H)
        result = multiple_choice_output(self.classifier(pooled), choices, labels, out)  # (B*C, 1) -> (B, C)
        return self._finish(result, return_dict)


class TFMPNetForTokenClassification(_MPNetHead):
    __doc__ = (
        """Per-token classification: ``logits`` (B, L, num_labels); ``labels`` (B, L), -100 ignored.

    Args:
        config (MPNetConfig): the model config.
"""
        + _BASE_DOC
    )

    head = "ForTokenClassification"
    label_names = ("labels",)

    def __init__(self, config: MPNetConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.dropout, self.classifier = token_classifier(config)
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
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
        result = token_classification_output(self.config, logits, labels, out)
        return self._finish(result, return_dict)


class TFMPNetForQuestionAnswering(_MPNetHead):
    __doc__ = (
        """Extractive QA: ``start_logits``/``end_logits`` (B, L); ``start_positions`` and
    ``end_positions`` (B,) give the mean start/end cross-entropy (positions clamped to [0, L],
    L ignored).

    Args:
        config (MPNetConfig): the model config (``num_labels == 2``).
"""
        + _BASE_DOC
    )

    head = "ForQuestionAnswering"
    label_names = ("start_positions", "end_positions")

    def __init__(self, config: MPNetConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._init_base(config)
        self.qa_outputs = dense(config.num_labels, "qa_outputs")
        self._finish_init()

    @unpack_inputs
    def call(
        self,
        input_ids=None,
        attention_mask=None,
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
