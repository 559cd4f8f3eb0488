"""Electra in PyTorch: the shared BERT blocks plus Electra's differences.

Differences from BERT (``nezha_zoo/families/electra.py``): embeddings of width ``embedding_size``
projected by ``embeddings_project`` when it differs from ``hidden_size``; no pooler; a discriminator
head, a generator head (always exact GELU) tied to the word embeddings, a GELU classification head
and a sequence summary for multiple choice.  ``forward`` arguments follow transformers 4.57.6.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.families.electra import ELECTRA, ElectraConfig
from nezha_zoo.generation import keep_last_positions
from nezha_zoo.outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    ElectraForPreTrainingOutput,
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
    TOKEN_LABELS_DOC,
    ClassificationHead,
    LMHeadTransform,
    SequenceSummary,
    VocabProjection,
    masked_lm_output,
    multiple_choice_output,
    question_answering_output,
    sequence_classification_output,
    token_classification_output,
)
from nezha_zoo.pt.layers import BertEmbeddings, BertEncoder, PackedLinear, get_activation
from nezha_zoo.pt.modeling_utils import PreTrainedModel, prepare_encoder_inputs

logger = logging.getLogger("nezha_zoo")

__all__ = [
    "ElectraPreTrainedModel",
    "ElectraModel",
    "ElectraForPreTraining",
    "ElectraForMaskedLM",
    "ElectraForCausalLM",
    "ElectraForSequenceClassification",
    "ElectraForMultipleChoice",
    "ElectraForTokenClassification",
    "ElectraForQuestionAnswering",
]

_ARGS_DOC = """
    Forward arguments (B = batch, L = sequence length; all optional except one of ``input_ids`` /
    ``inputs_embeds``):
        input_ids (LongTensor (B, L)): token ids in ``[0, vocab_size)``.
        attention_mask ((B, L)): 1 = attend, 0 = padding; ones when omitted.
        token_type_ids (LongTensor (B, L)): segment ids; zeros when omitted.
        position_ids (LongTensor (B, L)): positions; ``arange(past, past + L)`` when omitted.
        head_mask ((heads,) or (layers, heads)): multiplies attention probabilities.
        inputs_embeds ((B, L, embedding_size)): instead of ``input_ids``.
        output_attentions / output_hidden_states / return_dict (bool): config defaults when None.
"""


class ElectraPreTrainedModel(PreTrainedModel):
    """Base of the Electra classes (family ``"electra"``)."""

    family = ELECTRA
    config_class = ElectraConfig


class ElectraModel(ElectraPreTrainedModel):
    """The Electra encoder (no pooler).

    Args:
        config (ElectraConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        encoder_hidden_states ((B, Lenc, hidden_size)): encoder output for cross-attention
            (``is_decoder`` and ``add_cross_attention``).
        encoder_attention_mask ((B, Lenc)): mask of ``encoder_hidden_states``; ones when omitted.
        past_key_values (tuple per layer of (k, v) or (k, v, cross_k, cross_v), each
            (B, heads, Lpast, head_dim)): cached keys/values of earlier positions (decoder).
        use_cache (bool): return ``past_key_values`` (decoder only; off when None, as transformers).
    """
        + POSITIONS_TO_KEEP_DOC
        + """
    Returns BaseModelOutputWithPastAndCrossAttentions: ``last_hidden_state`` (B, L, hidden_size), or
    (B, R, hidden_size) with ``positions_to_keep``.
    """
    )

    head = "Model"

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config, config.embedding_size)
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = PackedLinear(config.embedding_size, config.hidden_size)
        self.encoder = BertEncoder(config, cross_attention=config.add_cross_attention)
        self.post_init()

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
    ) -> BaseModelOutputWithPastAndCrossAttentions | tuple[Any, ...]:
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
            use_cache,
            dtype=self.embeddings.word_embeddings.weight.dtype,
            position_ids=position_ids,
            embed_width=cfg.embedding_size,
        )
        hidden = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            past_key_values_length=prep.past_len,
        )
        if hasattr(self, "embeddings_project"):
            hidden = self.embeddings_project(hidden)  # (B, L, E) -> (B, L, H)
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
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=last,
            past_key_values=presents,
            hidden_states=all_hidden,
            attentions=attentions,
            cross_attentions=cross_attentions,
        )
        return self._finish(out, return_dict)


class ElectraDiscriminatorPredictions(nn.Module):
    """``dense`` (H -> H), ``hidden_act``, ``dense_prediction`` (H -> 1): one logit per token (B, L)."""

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__()
        self.dense = PackedLinear(config.hidden_size, config.hidden_size)  # every token: the blocks' path
        self.activation = get_activation(config.hidden_act)
        self.dense_prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_prediction(self.activation(self.dense(hidden_states))).squeeze(-1)


def _generator_transform(config: ElectraConfig) -> LMHeadTransform:
    # Always exact GELU, whatever hidden_act says (transformers' Flax port uses hidden_act: a bug).
    return LMHeadTransform(config.hidden_size, config.embedding_size, config.layer_norm_eps, activation="gelu")


class ElectraForPreTraining(ElectraPreTrainedModel):
    """Electra discriminator: replaced-token detection logits (B, L).

    Args:
        config (ElectraConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        labels (LongTensor (B, L)): 1 = replaced, 0 = original; loss = BCE over ``attention_mask == 1``.
    """
    )

    head = "ForPreTraining"

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.electra = ElectraModel(config)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(config)
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
    ) -> ElectraForPreTrainingOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        logits = self.discriminator_predictions(base.last_hidden_state)
        loss = None
        if labels is not None:
            loss = losses.replaced_token_detection_loss(logits, labels, attention_mask)
        out = ElectraForPreTrainingOutput(
            loss=loss, logits=logits, hidden_states=base.hidden_states, attentions=base.attentions
        )
        return self._finish(out, return_dict)


class _ElectraGenerator(ElectraPreTrainedModel):
    """Shared construction of the two generator heads (``generator_lm_head`` tied to the embeddings)."""

    def __init__(self, config: ElectraConfig) -> None:
        # tie_word_embeddings=False is refused by the Electra spec (checked in post_init).
        super().__init__(config)
        self.electra = ElectraModel(config)
        self.generator_predictions = _generator_transform(config)
        self.generator_lm_head = VocabProjection(config.embedding_size, config.vocab_size)
        self.post_init()

    def _logits(self, sequence_output: torch.Tensor) -> torch.Tensor:
        # (B, L, H) -> (B, L, E) -> (B, L, vocab)
        return self.generator_lm_head(self.generator_predictions(sequence_output))


class ElectraForMaskedLM(_ElectraGenerator):
    """Electra generator: masked-language-model logits (B, L, vocab_size).

    Args:
        config (ElectraConfig): model configuration.
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + MLM_LABELS_DOC

    head = "ForMaskedLM"

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
    ) -> MaskedLMOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        return self._finish(masked_lm_output(self._logits(base.last_hidden_state), base, labels), return_dict)


class ElectraForCausalLM(GenerationMixin, _ElectraGenerator):
    """Electra generator as a left-to-right LM (set ``is_decoder=True``): logits (B, L, vocab_size).

    Args:
        config (ElectraConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        encoder_hidden_states, encoder_attention_mask, past_key_values, use_cache: as ElectraModel.
        labels (LongTensor (B, L)): next-token targets (not shifted by the caller), -100 ignored.
        logits_to_keep (int): the LM head on the last this many positions only (0: all), without ``labels``.
        **kwargs: ``num_items_in_batch``, ``ignore_index``, ``shift_labels`` for the loss.
    """
    )

    head = "ForCausalLM"
    generation_position_rule = "cumsum"  # learned absolute positions: left pads must not shift them

    def __init__(self, config: ElectraConfig) -> None:
        if not config.is_decoder:
            logger.warning("ElectraForCausalLM without is_decoder=True is not causal; set is_decoder=True")
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
            use_cache = False
        base = self._run_base(locals())
        logits = self._logits(keep_last_positions(base.last_hidden_state, logits_to_keep, labels))
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


class ElectraForSequenceClassification(ElectraPreTrainedModel):
    """Electra with a GELU classification head on the first token: logits (B, num_labels).

    Args:
        config (ElectraConfig): model configuration (``num_labels``, ``problem_type``,
            ``classifier_dropout``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + SEQUENCE_LABELS_DOC

    head = "ForSequenceClassification"

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
        self.classifier = ClassificationHead(config, activation="gelu")
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


class ElectraForMultipleChoice(ElectraPreTrainedModel):
    """Electra scoring C choices: ``sequence_summary`` then ``classifier`` (H -> 1); logits (B, C).

    Args:
        config (ElectraConfig): model configuration (``summary_*`` fields).
    """

    __doc__ = (
        (__doc__ or "")
        + """
    Forward arguments are those of the other heads with an extra choices axis: ``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``position_ids`` (B, C, L); ``inputs_embeds``
    (B, C, L, embedding_size); ``labels`` (B,) the right choice.
    """
    )

    head = "ForMultipleChoice"

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.electra = ElectraModel(config)
        self.sequence_summary = SequenceSummary(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
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
    ) -> MultipleChoiceModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        # summary_type "first" reads position 0 only: the last layer computes just that row.
        first = self.sequence_summary.summary_type == "first"
        base, num_choices = self._run_base_choices(locals(), embed_width=self.config.embedding_size, pooled=first)
        pooled = self.sequence_summary(base.last_hidden_state)  # (B * C, H)
        out = multiple_choice_output(self.classifier(pooled), num_choices, base, labels)  # logits (B, C)
        return self._finish(out, return_dict)


class ElectraForTokenClassification(ElectraPreTrainedModel):
    """Electra with a per-token ``classifier``: logits (B, L, num_labels).

    Args:
        config (ElectraConfig): model configuration (``num_labels``, ``classifier_dropout``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + TOKEN_LABELS_DOC

    head = "ForTokenClassification"

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
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
        out = token_classification_output(self.dropout, self.classifier, base, labels)
        return self._finish(out, return_dict)


class ElectraForQuestionAnswering(ElectraPreTrainedModel):
    """Electra with ``qa_outputs`` (H -> 2): span start and end logits, each (B, L).

    Args:
        config (ElectraConfig): model configuration (``num_labels`` = 2).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + QA_LABELS_DOC

    head = "ForQuestionAnswering"

    def __init__(self, config: ElectraConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.electra = ElectraModel(config)
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
