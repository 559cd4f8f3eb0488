"""Nezha in PyTorch: the shared BERT blocks plus Nezha's functional relative positions.

Differences from BERT (``nezha_zoo/families/nezha.py``): embeddings are word + token type only (no
absolute position table, no ``position_ids`` argument anywhere); every attention adds a fixed
sinusoidal encoding of the clipped relative distance between query and key positions, to the scores
(``q_i . R[i, j]`` before the ``1/sqrt(d)`` scaling) and to the context (``sum_j p_ij R[i, j]``).

The encoding is computed, never stored: a table of ``2K + 1`` rows (``K = max_relative_position``;
row ``p`` holds ``sin(p * w)`` in even and ``cos(p * w)`` in odd columns, ``w`` the usual inverse
frequencies over ``head_dim``; :func:`nezha_zoo.families.nezha.relative_position_table`) and an
``(Lq, Lk)`` index ``clamp(j - i, -K, K) + K`` into it (:func:`nezha_zoo.spec.positions.
relative_position_index`, :class:`~nezha_zoo.pt.layers.RelativeEmbedding`; up to
:data:`DENSE_RELATIVE_ELEMENTS` the dense tensor is built from it once per forward pass).
transformers 4.57.6 materialises ``(max_position_embeddings, max_position_embeddings, head_dim)``
per layer and so refuses longer inputs; here any length works and equals transformers wherever transformers runs.

Decoding with a cache: query ``i`` of a step sits at absolute position ``past_len + i``, so cached
decoding equals full decoding (transformers' own cached path assumes ``Lq == Lk`` and fails).
Cross-attention: transformers applies the same relative terms between decoder position ``i`` and
encoder position ``j`` (its code only runs when the decoder and encoder lengths are equal); we do the
same for any lengths, with the decoder positions offset by the cache length.

``forward`` arguments follow transformers 4.57.6.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
from torch import nn

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.families.nezha import NEZHA, NezhaConfig, relative_position_table
from nezha_zoo.outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    NextSentencePredictorOutput,
    NezhaForPreTrainingOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from nezha_zoo.pt import losses
from nezha_zoo.pt.heads import (
    POSITIONS_TO_KEEP_DOC,
    QA_LABELS_DOC,
    SEQUENCE_LABELS_DOC,
    TOKEN_LABELS_DOC,
    BertLMPredictionHead,
    BertPooler,
    masked_lm_output,
    multiple_choice_output,
    question_answering_output,
    sequence_classification_output,
    token_classification_output,
)
from nezha_zoo.pt.layers import BertEmbeddings, BertEncoder, RelativeEmbedding
from nezha_zoo.pt.modeling_utils import PreTrainedModel, prepare_encoder_inputs
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.spec.positions import relative_position_index

#: Largest ``Lq * Lk * head_dim`` for which the relative terms use the materialised tensor (16 MiB in
#: float32, built once per forward pass and shared by every layer): both terms are then batched matrix
#: products, about 4x faster than the lookup's gather and scatter-add at 8 x 128 tokens.  Longer inputs
#: use the lookup, whose memory does not grow with ``Lq * Lk * head_dim``.
DENSE_RELATIVE_ELEMENTS = 2**22

logger = logging.getLogger("nezha_zoo")

__all__ = [
    "NezhaPreTrainedModel",
    "NezhaModel",
    "NezhaForPreTraining",
    "NezhaForMaskedLM",
    "NezhaForNextSentencePrediction",
    "NezhaForSequenceClassification",
    "NezhaForMultipleChoice",
    "NezhaForTokenClassification",
    "NezhaForQuestionAnswering",
]


@functools.lru_cache(maxsize=8)
def _table(max_relative_position: int, depth: int) -> torch.Tensor:
    # Built once per (K, depth) on the CPU with torch's float32 maths, as transformers' buffer is; a
    # normal tensor even when first asked for under inference_mode, so that autograd may save it later.
    with torch.inference_mode(False):
        return relative_position_table(max_relative_position, depth, xp=torch)


# --- base ----------------------------------------------------------------------------------------

_ARGS_DOC = """
    Forward arguments (B = batch, L = sequence length, any L; all optional except one of
    ``input_ids`` / ``inputs_embeds``; Nezha has no ``position_ids``):
        input_ids (LongTensor (B, L)): token ids in ``[0, vocab_size)``.
        attention_mask ((B, L)): 1 = attend, 0 = padding; ones when omitted.
        token_type_ids (LongTensor (B, L)): segment ids; zeros when omitted.
        head_mask ((heads,) or (layers, heads)): multiplies attention probabilities.
        inputs_embeds ((B, L, hidden_size)): instead of ``input_ids``.
        output_attentions / output_hidden_states / return_dict (bool): config defaults when None.
"""


class NezhaPreTrainedModel(PreTrainedModel):
    """Base of the Nezha classes (family ``"nezha"``)."""

    family = NEZHA
    config_class = NezhaConfig


class NezhaModel(NezhaPreTrainedModel):
    """The Nezha encoder (or decoder) with an optional pooler.

    Args:
        config (NezhaConfig): model configuration.
        add_pooling_layer (bool): build ``pooler`` (``dense`` + tanh on the first token).
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        encoder_hidden_states ((B, Lenc, hidden_size)): encoder output for cross-attention
            (``is_decoder`` and ``add_cross_attention``).
        encoder_attention_mask ((B, Lenc)): mask of ``encoder_hidden_states``; ones when omitted.
        past_key_values (tuple per layer of (k, v) or (k, v, cross_k, cross_v), each
            (B, heads, Lpast, head_dim)): cached keys/values of earlier positions (decoder); the new
            queries sit at positions ``Lpast ..``; ``attention_mask`` then covers Lpast + L.
        use_cache (bool): return ``past_key_values`` (decoder only; off when None).
    """
        + POSITIONS_TO_KEEP_DOC
        + """
    Returns BaseModelOutputWithPoolingAndCrossAttentions: ``last_hidden_state`` (B, L, hidden_size) (or
    (B, R, hidden_size) with ``positions_to_keep``), ``pooler_output`` (B, hidden_size) (its row 0).
    With ``return_dict=False`` the tuple is transformers':
    ``(last_hidden_state, pooler_output, past_key_values, hidden_states, attentions, cross_attentions)``
    without the absent entries, ``pooler_output`` kept (None) when there is no pooler.
    """
    )

    head = "Model"

    def __init__(self, config: NezhaConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config, config.hidden_size, positions=False)
        self.encoder = BertEncoder(config, cross_attention=config.add_cross_attention)
        self.pooler = BertPooler(config.hidden_size) if add_pooling_layer else None
        self.post_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is not None:
            return spec
        # NezhaModel(add_pooling_layer=False): the base of the heads without a pooler.
        params = tuple(p for p in spec if not p.name.startswith("pooler."))
        return ModelSpec(spec.family, spec.head, spec.base_prefix, params, spec.ties, spec.ignored)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def _relative(
        self, query_len: int, key_len: int, offset: int, like: torch.Tensor
    ) -> RelativeEmbedding | torch.Tensor:
        """Relative positions of ``query_len`` queries at ``offset ..`` against ``key_len`` keys: the dense
        ``(Lq, Lk, head_dim)`` tensor up to :data:`DENSE_RELATIVE_ELEMENTS`, the lookup above."""
        cfg = self.config
        depth = cfg.hidden_size // cfg.num_attention_heads
        table = _table(cfg.max_relative_position, depth).to(like.device, like.dtype)  # (2K + 1, depth)
        q_pos = torch.arange(offset, offset + query_len, device=like.device)  # absolute query positions
        k_pos = torch.arange(key_len, device=like.device)
        index = relative_position_index(q_pos, k_pos, cfg.max_relative_position, torch.clamp)  # (Lq, Lk)
        relative = RelativeEmbedding(table, index)
        return relative.dense() if query_len * key_len * depth <= DENSE_RELATIVE_ELEMENTS else relative

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
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
            use_cache,
            dtype=self.embeddings.word_embeddings.weight.dtype,
            embed_width=cfg.hidden_size,
            positions=False,  # relative positions: no length limit
        )
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds)
        # Self-attention: queries at past_len .. past_len + L - 1, keys at 0 .. past_len + L - 1.
        rel = self._relative(prep.seq_len, prep.past_len + prep.seq_len, prep.past_len, hidden)
        cross_rel = None
        if prep.encoder_hidden_states is not None:
            # Cross-attention (as transformers): the same encoding between decoder and encoder positions.
            cross_rel = self._relative(prep.seq_len, prep.encoder_hidden_states.shape[1], prep.past_len, hidden)
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
            relative_key=rel,
            relative_value=rel,
            cross_relative_key=cross_rel,
            cross_relative_value=cross_rel,
            positions_to_keep=positions_to_keep,
        )
        pooled = self.pooler(last) if self.pooler is not None else None
        if not return_dict:
            # transformers' tuple: the cache comes before the hidden states (unlike the field order).
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


# --- heads ---------------------------------------------------------------------------------------


class NezhaPreTrainingHeads(nn.Module):
    """``cls``: ``predictions`` (MLM, tied to the word embeddings) and ``seq_relationship`` (NSP)."""

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, activation=config.hidden_act)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class NezhaOnlyMLMHead(nn.Module):
    """``cls`` of the masked-LM class: ``predictions`` only."""

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, activation=config.hidden_act)


class NezhaOnlyNSPHead(nn.Module):
    """``cls`` of the next-sentence class: ``seq_relationship`` (H -> 2) only."""

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class NezhaForPreTraining(NezhaPreTrainedModel):
    """Nezha with the pre-training heads: MLM logits (B, L, vocab_size) and NSP logits (B, 2).

    Args:
        config (NezhaConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        labels (LongTensor (B, L)): MLM targets, -100 = ignored.
        next_sentence_label (LongTensor (B,)): 0 = sequence B continues A, 1 = B is random.
        The loss (when both are given) is MLM cross-entropy + NSP cross-entropy.
    """
    )

    head = "ForPreTraining"

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.nezha = NezhaModel(config)
        self.cls = NezhaPreTrainingHeads(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> NezhaForPreTrainingOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base = self._run_base(locals())
        prediction_logits = self.cls.predictions(base.last_hidden_state)  # (B, L, vocab)
        seq_relationship_logits = self.cls.seq_relationship(base.pooler_output)  # (B, 2)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = losses.masked_lm_loss(prediction_logits, labels) + losses.next_sentence_prediction_loss(
                seq_relationship_logits, next_sentence_label
            )
        out = NezhaForPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_relationship_logits,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
        )
        return self._finish(out, return_dict)


class NezhaForMaskedLM(NezhaPreTrainedModel):
    """Nezha with a masked-language-model head: logits (B, L, vocab_size).

    Args:
        config (NezhaConfig): model configuration (``is_decoder=False`` for bidirectional attention).
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        encoder_hidden_states, encoder_attention_mask: as NezhaModel (decoder configs).
        labels (LongTensor (B, L)): target ids, -100 = ignored; loss = cross-entropy.
    """
    )

    head = "ForMaskedLM"

    def __init__(self, config: NezhaConfig) -> None:
        if config.is_decoder:
            logger.warning("NezhaForMaskedLM with is_decoder=True is causal; set is_decoder=False for MLM")
        super().__init__(config)
        self.nezha = NezhaModel(config, add_pooling_layer=False)
        self.cls = NezhaOnlyMLMHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
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
        logits = self.cls.predictions(base.last_hidden_state)  # (B, L, vocab)
        return self._finish(masked_lm_output(logits, base, labels), return_dict)


class NezhaForNextSentencePrediction(NezhaPreTrainedModel):
    """Nezha with the next-sentence head on the pooled output: logits (B, 2).

    Args:
        config (NezhaConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + """
        labels (LongTensor (B,)): 0 = sequence B continues A, 1 = B is random; loss = cross-entropy.
        **kwargs: only the deprecated alias ``next_sentence_label`` (FutureWarning); anything else is
            a TypeError.
    """
    )

    head = "ForNextSentencePrediction"

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.nezha = NezhaModel(config)
        self.cls = NezhaOnlyNSPHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> NextSentencePredictorOutput | tuple[Any, ...]:
        if "next_sentence_label" in kwargs:
            warnings.warn("next_sentence_label is deprecated; use labels", FutureWarning, stacklevel=2)
            labels = kwargs.pop("next_sentence_label")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        # The pooler reads position 0 only: the last layer computes just that row.
        base = self._run_base(locals(), positions_to_keep=self._pooled_positions(locals()))
        logits = self.cls.seq_relationship(base.pooler_output)  # (B, 2)
        loss = losses.next_sentence_prediction_loss(logits, labels) if labels is not None else None
        out = NextSentencePredictorOutput(
            loss=loss, logits=logits, hidden_states=base.hidden_states, attentions=base.attentions
        )
        return self._finish(out, return_dict)


class NezhaForSequenceClassification(NezhaPreTrainedModel):
    """Nezha with dropout + ``classifier`` on the pooled output: logits (B, num_labels).

    Args:
        config (NezhaConfig): model configuration (``num_labels``, ``problem_type``,
            ``classifier_dropout``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + SEQUENCE_LABELS_DOC

    head = "ForSequenceClassification"

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nezha = NezhaModel(config)
        self.dropout = nn.Dropout(classifier_dropout_rate(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        # The pooler reads position 0 only: the last layer computes just that row.
        base = self._run_base(locals(), positions_to_keep=self._pooled_positions(locals()))
        logits = self.classifier(self.dropout(base.pooler_output))  # (B, num_labels)
        out = sequence_classification_output(logits, base, labels, self.num_labels, self.config.problem_type)
        return self._finish(out, return_dict)


class NezhaForMultipleChoice(NezhaPreTrainedModel):
    """Nezha scoring C choices: dropout + ``classifier`` (H -> 1) on each pooled output; logits (B, C).

    Args:
        config (NezhaConfig): model configuration (``classifier_dropout``).
    """

    __doc__ = (
        (__doc__ or "")
        + """
    Forward arguments are those of the other heads with an extra choices axis: ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (B, C, L); ``inputs_embeds`` (B, C, L, hidden_size);
    ``labels`` (B,) the right choice (cross-entropy).
    """
    )

    head = "ForMultipleChoice"

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.nezha = NezhaModel(config)
        self.dropout = nn.Dropout(classifier_dropout_rate(config))
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultipleChoiceModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base, num_choices = self._run_base_choices(locals(), positions=False, pooled=True)
        logits = self.classifier(self.dropout(base.pooler_output))  # (B * C, 1)
        out = multiple_choice_output(logits, num_choices, base, labels)  # logits (B, C)
        return self._finish(out, return_dict)


class NezhaForTokenClassification(NezhaPreTrainedModel):
    """Nezha with dropout + a per-token ``classifier``: logits (B, L, num_labels).

    Args:
        config (NezhaConfig): model configuration (``num_labels``, ``classifier_dropout``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + TOKEN_LABELS_DOC

    head = "ForTokenClassification"

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nezha = NezhaModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(classifier_dropout_rate(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
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


class NezhaForQuestionAnswering(NezhaPreTrainedModel):
    """Nezha with ``qa_outputs`` (H -> 2): span start and end logits, each (B, L).

    Args:
        config (NezhaConfig): model configuration (``num_labels`` = 2).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + QA_LABELS_DOC

    head = "ForQuestionAnswering"

    def __init__(self, config: NezhaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nezha = NezhaModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
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
