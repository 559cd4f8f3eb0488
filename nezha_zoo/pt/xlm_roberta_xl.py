"""XLM-RoBERTa-XL in PyTorch: the shared BERT blocks, pre-LN, plus RoBERTa's positions and heads.

Differences from BERT (``nezha_zoo/families/xlm_roberta_xl.py``):

* pre-LayerNorm layers (``XLM_ROBERTA_XL_NAMES``: ``attention.self_attn_layer_norm`` before self-
  and ``crossattention.self_attn_layer_norm`` before cross-attention, the layer's ``LayerNorm``
  before the feed-forward), a final ``encoder.LayerNorm`` and no embedding LayerNorm; no dropout on the
  feed-forward's output (``output_dropout=False``), as transformers' ``XLMRobertaXLOutput``;
* RoBERTa positions: pads keep ``pad_token_id``, tokens count from ``pad_token_id + 1`` (after left
  padding too, and after the cached length when decoding); with ``inputs_embeds`` they are
  ``pad_token_id + 1 ..``.  So the longest input is ``max_position_embeddings - pad_token_id - 1``;
* the pooler only in ``Model`` and ``ForMultipleChoice`` (``HEADS_WITH_POOLER``); ``lm_head``
  (dense, gelu, layer_norm, decoder tied to the word embeddings, bias) for masked and causal LM;
  ``classifier`` (dense, tanh, out_proj on the first token) for sequence classification;
* token classification ignores the labels of positions whose ``attention_mask`` is not 1;
* in a decoder ``use_cache`` defaults to ``config.use_cache`` (transformers' XLM-R-XL does so).

``forward`` arguments follow transformers 4.57.6 (``ForMultipleChoice`` has its own order).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.families.xlm_roberta_xl import HEADS_WITH_POOLER, XLM_ROBERTA_XL, XLMRobertaXLConfig
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    IGNORE_INDEX,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from nezha_zoo.pt import losses
from nezha_zoo.pt.generation import GenerationMixin
from nezha_zoo.pt.heads import (
    MLM_LABELS_DOC,
    POSITIONS_TO_KEEP_DOC,
    QA_LABELS_DOC,
    SEQUENCE_LABELS_DOC,
    BertPooler,
    ClassificationHead,
    RobertaLMHead,
    masked_lm_output,
    multiple_choice_output,
    question_answering_output,
    sequence_classification_output,
    token_classification_output,
)
from nezha_zoo.pt.layers import BertEmbeddings, BertEncoder, padding_aware_position_ids, sequential_position_ids
from nezha_zoo.pt.modeling_utils import PreTrainedModel, prepare_encoder_inputs
from nezha_zoo.spec.blocks import XLM_ROBERTA_XL_NAMES
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.spec.positions import padding_aware_max_length
from nezha_zoo.validation import InputError, check_length

logger = logging.getLogger("nezha_zoo")

__all__ = [
    "XLMRobertaXLPreTrainedModel",
    "XLMRobertaXLModel",
    "XLMRobertaXLForCausalLM",
    "XLMRobertaXLForMaskedLM",
    "XLMRobertaXLForSequenceClassification",
    "XLMRobertaXLForMultipleChoice",
    "XLMRobertaXLForTokenClassification",
    "XLMRobertaXLForQuestionAnswering",
]

_ARGS_DOC = """
    Forward arguments (B = batch, L = sequence length, L <= max_position_embeddings - pad_token_id - 1;
    all optional except one of ``input_ids`` / ``inputs_embeds``):
        input_ids (LongTensor (B, L)): token ids in ``[0, vocab_size)``.
        attention_mask ((B, L)): 1 = attend, 0 = padding; ones when omitted (cached + new positions
            when decoding with a cache).
        token_type_ids (LongTensor (B, L)): segment ids in ``[0, type_vocab_size)``; zeros when omitted.
        position_ids (LongTensor (B, L)): positions; RoBERTa-style from the ids when omitted (pads at
            ``pad_token_id``, tokens from ``pad_token_id + 1``), ``pad_token_id + 1 ..`` with ``inputs_embeds``.
        head_mask ((heads,) or (layers, heads)): multiplies attention probabilities.
        inputs_embeds ((B, L, hidden_size)): instead of ``input_ids``.
        output_attentions / output_hidden_states / return_dict (bool): config defaults when None.
"""

_DECODER_DOC = """
        encoder_hidden_states ((B, Lenc, hidden_size)): encoder output for cross-attention
            (``is_decoder`` and ``add_cross_attention``).
        encoder_attention_mask ((B, Lenc)): mask of ``encoder_hidden_states``; ones when omitted.
        past_key_values (tuple per layer of (k, v) or (k, v, cross_k, cross_v), each
            (B, heads, Lpast, head_dim)): cached keys/values of earlier positions (decoder).
        use_cache (bool): return ``past_key_values`` (decoders only; ``config.use_cache`` when None).
"""

TOKEN_LABELS_DOC = """
        labels (LongTensor (B, L)): class ids, -100 = ignored; positions with ``attention_mask != 1``
            are ignored too (transformers' XLM-R-XL); loss = cross-entropy.
    """


def active_token_labels(labels: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Labels (B, L) with -100 wherever ``attention_mask`` (B, L) is not 1 (transformers' XLM-R-XL rule)."""
    if labels is None or attention_mask is None:
        return labels
    if tuple(attention_mask.shape) != tuple(labels.shape):
        raise InputError(
            f"token-classification labels {tuple(labels.shape)} need an attention_mask of the same shape, "
            f"got {tuple(attention_mask.shape)}"
        )
    return torch.where(attention_mask == 1, labels, torch.full_like(labels, IGNORE_INDEX))


class XLMRobertaXLPreTrainedModel(PreTrainedModel):
    """Base of the XLM-RoBERTa-XL classes (family ``"xlm_roberta_xl"``)."""

    family = XLM_ROBERTA_XL
    config_class = XLMRobertaXLConfig


class XLMRobertaXLModel(XLMRobertaXLPreTrainedModel):
    """The XLM-RoBERTa-XL encoder (a decoder with ``is_decoder``) and an optional pooler.

    Args:
        config (XLMRobertaXLConfig): model configuration.
        add_pooling_layer (bool): build ``pooler`` (``dense`` + tanh on the first token).
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + _DECODER_DOC
        + POSITIONS_TO_KEEP_DOC
        + """
    Returns BaseModelOutputWithPoolingAndCrossAttentions: ``last_hidden_state`` (B, L, hidden_size)
    (or (B, R, hidden_size) with ``positions_to_keep``) after the final ``encoder.LayerNorm``,
    ``pooler_output`` (B, hidden_size) (its row 0) or None,
    ``past_key_values``, ``hidden_states`` (layers + 1, the last one final-normed), ``attentions``,
    ``cross_attentions``.  With ``return_dict=False`` the tuple is transformers':
    ``(last_hidden_state, pooler_output, ...)`` with ``pooler_output`` kept (None) without a pooler.
    """
    )

    head = "Model"

    def __init__(self, config: XLMRobertaXLConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        # No embedding LayerNorm: every layer norms its own input, the encoder its output.
        self.embeddings = BertEmbeddings(config, config.hidden_size, layer_norm=False, position_padding=True)
        self.encoder = BertEncoder(
            config, XLM_ROBERTA_XL_NAMES, cross_attention=config.add_cross_attention, final_norm="LayerNorm"
        )
        self.pooler = BertPooler(config.hidden_size) if add_pooling_layer else None
        self.post_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is not None:
            return spec
        # XLMRobertaXLModel(add_pooling_layer=False): the base of the heads without a pooler.
        params = tuple(p for p in spec if not p.name.startswith("pooler."))
        return ModelSpec(spec.family, spec.head, spec.base_prefix, params, spec.ties, spec.ignored)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: tuple[tuple[torch.Tensor, ...], ...] | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        positions_to_keep: torch.Tensor | None = None,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple[Any, ...]:
        cfg = self.config
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict
        )
        prep = prepare_encoder_inputs(
            cfg,
            input_ids,
            inputs_embeds,
            attention_mask,
            token_type_ids,
            head_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            past_key_values,
            cfg.use_cache if use_cache is None else use_cache,
            dtype=self.embeddings.word_embeddings.weight.dtype,
            position_ids=position_ids,
            embed_width=cfg.hidden_size,
        )
        if position_ids is None:
            pad = cfg.pad_token_id
            if input_ids is not None:
                check_length(
                    prep.seq_len,
                    prep.past_len,
                    padding_aware_max_length(cfg.max_position_embeddings, pad),
                    "max_position_embeddings - pad - 1",
                )
                position_ids = padding_aware_position_ids(input_ids, pad, prep.past_len)  # (B, L)
            else:
                # transformers numbers embeddings from pad + 1 whatever the cache holds.
                check_length(
                    prep.seq_len,
                    0,
                    padding_aware_max_length(cfg.max_position_embeddings, pad),
                    "max_position_embeddings - pad - 1",
                )
                position_ids = sequential_position_ids(inputs_embeds.shape, pad, inputs_embeds.device)
        hidden = self.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        last, presents, all_hidden, attentions, cross_attentions = self.encoder(
            hidden,
            attention_mask=prep.attention_mask,
            head_mask=prep.head_mask,
            encoder_hidden_states=prep.encoder_hidden_states,
            encoder_attention_mask=prep.encoder_attention_mask,
            past_key_values=past_key_values,
            use_cache=prep.use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            positions_to_keep=positions_to_keep,
        )
        pooled = self.pooler(last) if self.pooler is not None else None
        if not return_dict:
            rest = (presents, all_hidden, attentions, cross_attentions)
            return (last, pooled) + tuple(v for v in rest if v is not None)
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=last,
            pooler_output=pooled,
            past_key_values=presents,
            hidden_states=all_hidden,
            attentions=attentions,
            cross_attentions=cross_attentions,
        )


def _base_for(head: str, config: XLMRobertaXLConfig) -> XLMRobertaXLModel:
    return XLMRobertaXLModel(config, add_pooling_layer=head in HEADS_WITH_POOLER)


class _LMHeadModel(XLMRobertaXLPreTrainedModel):
    """Shared construction of the two LM heads: ``roberta`` and the tied ``lm_head``."""

    def __init__(self, config: XLMRobertaXLConfig) -> None:
        super().__init__(config)
        self.roberta = _base_for(self.head, config)
        self.lm_head = RobertaLMHead(config, activation="gelu")  # transformers: always exact gelu
        self.post_init()


class XLMRobertaXLForCausalLM(GenerationMixin, _LMHeadModel):
    """XLM-RoBERTa-XL as a left-to-right LM (set ``is_decoder=True``): logits (B, L, vocab_size).

    Args:
        config (XLMRobertaXLConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + _DECODER_DOC
        + """
        labels (LongTensor (B, L)): next-token targets (not shifted by the caller), -100 ignored.
        logits_to_keep (int): the LM head on the last this many positions only (0: all), without ``labels``.
        **kwargs: ``num_items_in_batch``, ``ignore_index``, ``shift_labels`` for the loss.
    """
    )

    head = "ForCausalLM"
    generation_position_rule = "padding_aware"  # RoBERTa positions count from pad_token_id + 1

    def __init__(self, config: XLMRobertaXLConfig) -> None:
        if not config.is_decoder:
            logger.warning("XLMRobertaXLForCausalLM without is_decoder=True is not causal; set is_decoder=True")
        super().__init__(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: tuple[tuple[torch.Tensor, ...], ...] | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        if labels is not None:
            use_cache = False  # as transformers: no cache when computing the loss
        base = self._run_base(locals())
        logits = self.lm_head(keep_last_positions(base.last_hidden_state, logits_to_keep, labels))  # (B, L, vocab)
        loss = None
        if labels is not None:
            known = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
            loss = losses.causal_lm_loss(logits, labels, **known)
        out = CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=base.past_key_values,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
            cross_attentions=base.cross_attentions,
        )
        return self._finish(out, return_dict)


class XLMRobertaXLForMaskedLM(_LMHeadModel):
    """XLM-RoBERTa-XL with the masked-language-model head ``lm_head``: logits (B, L, vocab_size).

    ``lm_head.decoder.weight`` is the word-embedding table (``tie_word_embeddings``) and
    ``lm_head.decoder.bias`` is ``lm_head.bias``.

    Args:
        config (XLMRobertaXLConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        encoder_hidden_states, encoder_attention_mask: as XLMRobertaXLModel (decoder configs).
    """
        + MLM_LABELS_DOC
    )

    head = "ForMaskedLM"

    def __init__(self, config: XLMRobertaXLConfig) -> None:
        if config.is_decoder:
            logger.warning(
                "XLMRobertaXLForMaskedLM with is_decoder=True attends causally; "
                "set is_decoder=False for bi-directional self-attention"
            )
        super().__init__(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        logits = self.lm_head(base.last_hidden_state)  # (B, L, vocab)
        return self._finish(masked_lm_output(logits, base, labels), return_dict)


class XLMRobertaXLForSequenceClassification(XLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL with ``classifier`` (dropout, dense, tanh, dropout, out_proj) on the first token.

    Logits (B, num_labels).

    Args:
        config (XLMRobertaXLConfig): model configuration (``num_labels``, ``problem_type``,
            ``classifier_dropout``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + SEQUENCE_LABELS_DOC

    head = "ForSequenceClassification"

    def __init__(self, config: XLMRobertaXLConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = _base_for(self.head, config)
        self.classifier = ClassificationHead(config, activation="tanh")
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        # The classifier reads position 0 only: the last layer computes just that row.
        base = self._run_base(locals(), positions_to_keep=self._pooled_positions(locals()))
        logits = self.classifier(base.last_hidden_state)  # (B, num_labels)
        out = sequence_classification_output(logits, base, labels, self.num_labels, self.config.problem_type)
        return self._finish(out, return_dict)


class XLMRobertaXLForMultipleChoice(XLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL scoring C choices: dropout + ``classifier`` (H -> 1) on each pooled output; logits (B, C).

    Args:
        config (XLMRobertaXLConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + """
    Forward arguments in transformers' order for this class (``input_ids, token_type_ids,
    attention_mask, labels, position_ids, head_mask, inputs_embeds, ...``), those of the other heads
    with an extra choices axis: ``input_ids``, ``token_type_ids``, ``attention_mask``,
    ``position_ids`` (B, C, L); ``inputs_embeds`` (B, C, L, hidden_size); ``labels`` (B,) the right
    choice (cross-entropy).
    """
    )

    head = "ForMultipleChoice"

    def __init__(self, config: XLMRobertaXLConfig) -> None:
        super().__init__(config)
        self.roberta = _base_for(self.head, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultipleChoiceModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base, num_choices = self._run_base_choices(locals(), pooled=True)
        logits = self.classifier(self.dropout(base.pooler_output))  # (B * C, 1)
        out = multiple_choice_output(logits, num_choices, base, labels)  # logits (B, C)
        return self._finish(out, return_dict)


class XLMRobertaXLForTokenClassification(XLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL with dropout + a per-token ``classifier``: logits (B, L, num_labels).

    Args:
        config (XLMRobertaXLConfig): model configuration (``num_labels``, ``classifier_dropout``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + TOKEN_LABELS_DOC

    head = "ForTokenClassification"

    def __init__(self, config: XLMRobertaXLConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = _base_for(self.head, config)
        self.dropout = nn.Dropout(classifier_dropout_rate(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> TokenClassifierOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        active = active_token_labels(labels, attention_mask)
        out = token_classification_output(self.dropout, self.classifier, base, active)
        return self._finish(out, return_dict)


class XLMRobertaXLForQuestionAnswering(XLMRobertaXLPreTrainedModel):
    """XLM-RoBERTa-XL with ``qa_outputs`` (H -> 2): span start and end logits, each (B, L).

    Args:
        config (XLMRobertaXLConfig): model configuration (``num_labels`` = 2).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + QA_LABELS_DOC

    head = "ForQuestionAnswering"

    def __init__(self, config: XLMRobertaXLConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = _base_for(self.head, config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> QuestionAnsweringModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        out = question_answering_output(self.qa_outputs, base, start_positions, end_positions)
        return self._finish(out, return_dict)
