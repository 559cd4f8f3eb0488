"""MPNet in PyTorch: the shared BERT blocks plus MPNet's relative attention bias and RoBERTa positions.

Differences from BERT (``nezha_zoo/families/mpnet.py``):

* embeddings are word + absolute position only (no token types), both tables with padding row 1
  (hard-coded in transformers whatever ``pad_token_id`` says);
* positions are RoBERTa-style: padding tokens (id 1) sit at position 1, real tokens count from 2
  (also after left padding); with ``inputs_embeds`` they are ``2 .. L + 1``; ``position_ids`` may be
  passed instead.  So the longest sequence is ``max_position_embeddings - 2``;
* the attention projections are ``attention.attn.q/k/v/o`` (``MPNET_NAMES``);
* one table ``encoder.relative_attention_bias`` (buckets x heads), shared by every layer, gives a
  ``(1, heads, L, L)`` bias computed once per forward and added to the scores after the
  ``1/sqrt(d)`` scaling, before the mask.  Buckets are T5's bidirectional ones (``max_distance``
  128) over ``arange`` positions (transformers ignores ``position_ids`` here; so do we).

Deliberate difference from transformers 4.57.6 (hf_implementation_notes §5.2 D): its PyTorch
``compute_position_bias`` hard-codes 32 buckets while the table has
``relative_attention_num_buckets`` rows.  Here the config value is used everywhere (as transformers'
TF code does); at the default 32 the two are identical, with another value our buckets use the whole
table and transformers' do not.

The heads: ``lm_head`` (dense, gelu, layer_norm, decoder tied to the word embeddings, bias),
``classifier`` (dense, tanh, out_proj on the first token) for sequence classification, the pooler +
``classifier`` (H -> 1) for multiple choice, ``classifier`` per token, ``qa_outputs``.  Only
``MPNetModel`` and ``MPNetForMultipleChoice`` build the pooler (``HEADS_WITH_POOLER``).

Sentence embeddings: :meth:`MPNetPreTrainedModel.encode` (mean pooling + L2 normalisation, see
:func:`nezha_zoo.pt.heads.mean_pool`).

``forward`` arguments follow transformers 4.57.6 (no ``token_type_ids``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nezha_zoo.families.mpnet import EMBEDDING_PADDING_IDX, HEADS_WITH_POOLER, MPNET, MPNetConfig, relative_bucket_table
from nezha_zoo.outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SentenceEmbeddingOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from nezha_zoo.pt.heads import (
    MLM_LABELS_DOC,
    POSITIONS_TO_KEEP_DOC,
    QA_LABELS_DOC,
    SEQUENCE_LABELS_DOC,
    TOKEN_LABELS_DOC,
    BertPooler,
    ClassificationHead,
    RobertaLMHead,
    masked_lm_output,
    mean_pool,
    multiple_choice_output,
    question_answering_output,
    sequence_classification_output,
    token_classification_output,
)
from nezha_zoo.pt.layers import (
    BertEmbeddings,
    BertEncoder,
    attach,
    padding_aware_position_ids,
    sequential_position_ids,
)
from nezha_zoo.pt.modeling_utils import PreTrainedModel, prepare_encoder_inputs
from nezha_zoo.spec.blocks import MPNET_NAMES
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.spec.positions import padding_aware_max_length, relative_position_index
from nezha_zoo.validation import InputError

__all__ = [
    "MPNetPreTrainedModel",
    "MPNetModel",
    "MPNetForMaskedLM",
    "MPNetForSequenceClassification",
    "MPNetForMultipleChoice",
    "MPNetForTokenClassification",
    "MPNetForQuestionAnswering",
]

_ARGS_DOC = """
    Forward arguments (B = batch, L = sequence length, L <= max_position_embeddings - 2; all optional
    except one of ``input_ids`` / ``inputs_embeds``; MPNet has no ``token_type_ids``):
        input_ids (LongTensor (B, L)): token ids in ``[0, vocab_size)``; id 1 is padding for positions.
        attention_mask ((B, L)): 1 = attend, 0 = padding; ones when omitted.
        position_ids (LongTensor (B, L)): absolute positions in ``[0, max_position_embeddings)``;
            RoBERTa-style from the ids when omitted (padding 1, tokens 2, 3, ...), ``2 .. L + 1`` with
            ``inputs_embeds``.  The relative attention bias always uses ``arange`` positions.
        head_mask ((heads,) or (layers, heads)): multiplies attention probabilities.
        inputs_embeds ((B, L, hidden_size)): instead of ``input_ids``.
        output_attentions / output_hidden_states / return_dict (bool): config defaults when None.
"""


class MPNetPreTrainedModel(PreTrainedModel):
    """Base of the MPNet classes (family ``"mpnet"``); adds :meth:`encode` for sentence embeddings."""

    family = MPNET
    config_class = MPNetConfig

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> SentenceEmbeddingOutput:
        """Sentence embeddings: mean of the base model's unmasked token vectors, L2-normalised.

        As sentence-transformers' MPNet models (``Transformer`` -> ``Pooling(mean)`` -> ``Normalize``).
        Runs the base model of any MPNet class (the pooler, if any, is not used); gradients flow
        (wrap in ``torch.no_grad()`` for inference).

        Args:
            input_ids (LongTensor (B, L)): token ids.
            attention_mask ((B, L) or None): 1 = token, 0 = padding; ones when omitted.
            normalize (bool): L2-normalise the embeddings.

        Returns:
            SentenceEmbeddingOutput: ``embeddings`` (B, hidden_size), ``last_hidden_state`` (B, L, hidden_size).
        """
        base = self.base_model
        out = base(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        embeddings = mean_pool(out.last_hidden_state, attention_mask, normalize=normalize)
        return SentenceEmbeddingOutput(embeddings=embeddings, last_hidden_state=out.last_hidden_state)


def _check_length(config: MPNetConfig, seq_len: int) -> None:
    limit = padding_aware_max_length(config.max_position_embeddings, EMBEDDING_PADDING_IDX)
    if seq_len > limit:
        raise InputError(
            f"sequence of length {seq_len} exceeds the longest MPNet input, max_position_embeddings - 2 = {limit} "
            f"(positions start at {EMBEDDING_PADDING_IDX + 1})"
        )


class MPNetModel(MPNetPreTrainedModel):
    """The MPNet encoder with an optional pooler.

    Args:
        config (MPNetConfig): model configuration.
        add_pooling_layer (bool): build ``pooler`` (``dense`` + tanh on the first token).
    """

    __doc__ = (
        (__doc__ or "")
        + _ARGS_DOC
        + POSITIONS_TO_KEEP_DOC
        + """
    Returns BaseModelOutputWithPooling: ``last_hidden_state`` (B, L, hidden_size) (or (B, R, hidden_size)
    with ``positions_to_keep``), ``pooler_output`` (B, hidden_size) (its row 0) or None,
    ``hidden_states`` (layers + 1 tensors (B, L, hidden_size)),
    ``attentions`` (layers tensors (B, heads, L, L)).  With ``return_dict=False`` the tuple is
    transformers': ``(last_hidden_state, pooler_output, hidden_states, attentions)`` without the absent
    optional entries, ``pooler_output`` kept (None) when there is no pooler.
    """
    )

    head = "Model"

    def __init__(self, config: MPNetConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(
            config, config.hidden_size, token_types=False, padding_idx=EMBEDDING_PADDING_IDX, position_padding=True
        )
        self.encoder = BertEncoder(config, MPNET_NAMES)
        attach(
            self.encoder,
            "relative_attention_bias",
            nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads),
        )
        self.pooler = BertPooler(config.hidden_size) if add_pooling_layer else None
        # (2S + 1,) bucket of every distance; a constant of the config, not a buffer of the checkpoint
        self._bucket_table = torch.from_numpy(relative_bucket_table(config)).long()
        self.post_init()

    @property
    def spec(self) -> ModelSpec:
        spec = super().spec
        if self.pooler is not None:
            return spec
        # MPNetModel(add_pooling_layer=False): the base of the heads without a pooler.
        params = tuple(p for p in spec if not p.name.startswith("pooler."))
        return ModelSpec(spec.family, spec.head, spec.base_prefix, params, spec.ties, spec.ignored)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def compute_position_bias(self, seq_len: int, like: torch.Tensor) -> torch.Tensor:
        """The shared relative attention bias ``(1, heads, L, L)`` for ``arange(L)`` positions."""
        pos = torch.arange(seq_len, dtype=torch.long, device=like.device)
        span = self.config.max_position_embeddings
        bucket = self._bucket_table.to(like.device)[relative_position_index(pos, pos, span, torch.clamp)]  # (L, L)
        values = self.encoder.relative_attention_bias(bucket)  # (Lq, Lk, heads)
        # (Lq, Lk, heads) -> (1, heads, Lq, Lk), contiguous: every layer adds it to its scores, and a
        # permuted view there costs a strided read per layer.
        return values.permute(2, 0, 1).contiguous()[None]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        positions_to_keep: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        cfg = self.config
        output_attentions, output_hidden_states, return_dict = self._resolve_flags(
            output_attentions, output_hidden_states, return_dict
        )
        prep = prepare_encoder_inputs(
            cfg,
            input_ids,
            inputs_embeds,
            attention_mask,
            None,
            head_mask,
            None,
            None,
            None,
            None,
            dtype=self.embeddings.word_embeddings.weight.dtype,
            position_ids=position_ids,
            embed_width=cfg.hidden_size,
        )
        _check_length(cfg, prep.seq_len)
        if position_ids is None:
            if input_ids is not None:
                position_ids = padding_aware_position_ids(input_ids, EMBEDDING_PADDING_IDX)  # (B, L)
            else:
                position_ids = sequential_position_ids(inputs_embeds.shape, EMBEDDING_PADDING_IDX, inputs_embeds.device)
        hidden = self.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
        bias = self.compute_position_bias(prep.seq_len, hidden).to(hidden.dtype)
        last, _, all_hidden, attentions, _ = self.encoder(
            hidden,
            attention_mask=prep.attention_mask,
            head_mask=prep.head_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            position_bias=bias,
            positions_to_keep=positions_to_keep,
        )
        pooled = self.pooler(last) if self.pooler is not None else None
        if not return_dict:
            return (last, pooled) + tuple(v for v in (all_hidden, attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=pooled, hidden_states=all_hidden, attentions=attentions
        )


# --- heads ---------------------------------------------------------------------------------------


def _base_for(head: str, config: MPNetConfig) -> MPNetModel:
    return MPNetModel(config, add_pooling_layer=head in HEADS_WITH_POOLER)


class MPNetForMaskedLM(MPNetPreTrainedModel):
    """MPNet with the masked-language-model head ``lm_head``: logits (B, L, vocab_size).

    ``lm_head.decoder.weight`` is the word-embedding table (``tie_word_embeddings``) and
    ``lm_head.decoder.bias`` is ``lm_head.bias``.

    Args:
        config (MPNetConfig): model configuration.
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + MLM_LABELS_DOC

    head = "ForMaskedLM"

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = _base_for(self.head, config)
        self.lm_head = RobertaLMHead(config, activation="gelu")  # transformers: always exact gelu
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
        logits = self.lm_head(base.last_hidden_state)  # (B, L, vocab)
        return self._finish(masked_lm_output(logits, base, labels), return_dict)


class MPNetForSequenceClassification(MPNetPreTrainedModel):
    """MPNet with ``classifier`` (dropout, dense, tanh, dropout, out_proj) on the first token: (B, num_labels).

    Args:
        config (MPNetConfig): model configuration (``num_labels``, ``problem_type``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + SEQUENCE_LABELS_DOC

    head = "ForSequenceClassification"

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mpnet = _base_for(self.head, config)
        self.classifier = ClassificationHead(config, activation="tanh")
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
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


class MPNetForMultipleChoice(MPNetPreTrainedModel):
    """MPNet scoring C choices: dropout + ``classifier`` (H -> 1) on each pooled output; logits (B, C).

    Args:
        config (MPNetConfig): model configuration.
    """

    __doc__ = (
        (__doc__ or "")
        + """
    Forward arguments are those of the other heads with an extra choices axis: ``input_ids``,
    ``attention_mask``, ``position_ids`` (B, C, L); ``inputs_embeds`` (B, C, L, hidden_size);
    ``labels`` (B,) the right choice (cross-entropy).
    """
    )

    head = "ForMultipleChoice"

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.mpnet = _base_for(self.head, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultipleChoiceModelOutput | tuple[Any, ...]:
        _, _, return_dict = self._resolve_flags(output_attentions, output_hidden_states, return_dict)
        base, num_choices = self._run_base_choices(locals(), pooled=True)
        logits = self.classifier(self.dropout(base.pooler_output))  # (B * C, 1)
        out = multiple_choice_output(logits, num_choices, base, labels)  # logits (B, C)
        return self._finish(out, return_dict)


class MPNetForTokenClassification(MPNetPreTrainedModel):
    """MPNet with dropout + a per-token ``classifier``: logits (B, L, num_labels).

    Args:
        config (MPNetConfig): model configuration (``num_labels``).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + TOKEN_LABELS_DOC

    head = "ForTokenClassification"

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mpnet = _base_for(self.head, config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
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


class MPNetForQuestionAnswering(MPNetPreTrainedModel):
    """MPNet with ``qa_outputs`` (H -> 2): span start and end logits, each (B, L).

    Args:
        config (MPNetConfig): model configuration (``num_labels`` = 2).
    """

    __doc__ = (__doc__ or "") + _ARGS_DOC + QA_LABELS_DOC

    head = "ForQuestionAnswering"

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mpnet = _base_for(self.head, config)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
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
