"""Heads shared by the BERT-style families (PyTorch).

Module and attribute names are transformers' (``dense``, ``out_proj``, ``summary``, ``LayerNorm``);
families that rename them pass the names in.  Heads whose parameters sit directly on the model
(``classifier``, ``qa_outputs``) are plain ``nn.Linear`` attributes of the model class; the helpers
here hold the computation around them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.outputs import (
    MaskedLMOutput,
    ModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from nezha_zoo.pt import losses
from nezha_zoo.pt.layers import PackedLinear, get_activation, linear
from nezha_zoo.validation import InputError

__all__ = [
    "MLM_LABELS_DOC",
    "SEQUENCE_LABELS_DOC",
    "TOKEN_LABELS_DOC",
    "QA_LABELS_DOC",
    "ClassificationHead",
    "SequenceSummary",
    "LMHeadTransform",
    "VocabProjection",
    "BertPooler",
    "BertLMPredictionHead",
    "RobertaLMHead",
    "mean_pool",
    "token_classification_logits",
    "split_qa_logits",
    "masked_lm_output",
    "sequence_classification_output",
    "multiple_choice_output",
    "token_classification_output",
    "question_answering_output",
]


class ClassificationHead(nn.Module):
    """Sentence classification on the first token: dropout, ``dense``, activation, dropout, ``out_proj``.

    Args:
        config: a config with ``hidden_size``, ``num_labels``, ``classifier_dropout`` (optional) and
            ``hidden_dropout_prob``.
        activation (str): ``"gelu"`` for Electra, ``"tanh"`` for RoBERTa-style heads.

    Forward: ``features`` (B, L, H) -> logits (B, num_labels).
    """

    def __init__(self, config: Any, activation: str = "tanh") -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(classifier_dropout_rate(config))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.activation = get_activation(activation)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features[:, 0])  # (B, H): the first ([CLS]) token
        x = self.activation(self.dense(x))
        return self.out_proj(self.dropout(x))


class SequenceSummary(nn.Module):
    """One vector per sequence (transformers' ``SequenceSummary``), configured by ``summary_*`` fields.

    ``summary_type``: ``"first"``, ``"last"``, ``"mean"`` or ``"cls_index"`` (the token at
    ``cls_index``, the last one when not given).  Then optional ``summary`` projection (to
    ``num_labels`` with ``summary_proj_to_labels``), ``summary_activation`` and dropouts.

    Forward: ``hidden_states`` (B, L, H), ``cls_index`` (B,) int or None -> (B, H or num_labels).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.summary_type = getattr(config, "summary_type", "last")
        if self.summary_type not in ("first", "last", "mean", "cls_index"):
            raise ValueError(f"summary_type {self.summary_type!r} is not supported")
        if getattr(config, "summary_use_proj", False):
            to_labels = getattr(config, "summary_proj_to_labels", False) and config.num_labels > 0
            self.summary = nn.Linear(config.hidden_size, config.num_labels if to_labels else config.hidden_size)
        self.activation = get_activation(getattr(config, "summary_activation", None))
        first = getattr(config, "summary_first_dropout", 0.0) or 0.0
        last = getattr(config, "summary_last_dropout", 0.0) or 0.0
        self.first_dropout = nn.Dropout(first) if first > 0 else nn.Identity()
        self.last_dropout = nn.Dropout(last) if last > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, cls_index: torch.Tensor | None = None) -> torch.Tensor:
        if self.summary_type == "first":
            out = hidden_states[:, 0]
        elif self.summary_type == "last":
            out = hidden_states[:, -1]
        elif self.summary_type == "mean":
            out = hidden_states.mean(dim=1)
        else:
            if cls_index is None:
                out = hidden_states[:, -1]
            else:
                # (B,) -> (B, 1, H) to gather one position per row
                idx = cls_index.long()[:, None, None].expand(-1, 1, hidden_states.shape[-1])
                out = hidden_states.gather(1, idx).squeeze(1)
        out = self.first_dropout(out)
        if hasattr(self, "summary"):
            out = self.summary(out)
        return self.last_dropout(self.activation(out))


class LMHeadTransform(nn.Module):
    """``dense`` (H -> width), activation, LayerNorm: the transform before a tied vocabulary projection.

    Args:
        in_width (int): input width (``hidden_size``).
        width (int): output width (Electra: ``embedding_size``).
        eps (float): LayerNorm epsilon.
        activation (str): activation name (Electra's generator: always ``"gelu"``).
        norm_name (str): attribute name of the LayerNorm (``"LayerNorm"``, or ``"layer_norm"`` in
            RoBERTa-style ``lm_head``).

    Forward: (B, L, in_width) -> (B, L, width).
    """

    def __init__(
        self, in_width: int, width: int, eps: float, activation: str = "gelu", norm_name: str = "LayerNorm"
    ) -> None:
        super().__init__()
        self.dense = PackedLinear(in_width, width)  # every position's product: the blocks' path
        self.activation = get_activation(activation)
        self._norm = norm_name
        self.add_module(norm_name, nn.LayerNorm(width, eps=eps))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._modules[self._norm](self.activation(self.dense(hidden_states)))


class BertPooler(nn.Module):
    """``pooler``: ``dense`` (H -> H) then tanh on the first token (Nezha, XLM-R-XL, I-BERT, MPNet).

    Forward: (B, L, H) -> (B, H).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))  # (B, H): the first ([CLS]) token


class VocabProjection(nn.Linear):
    """``nn.Linear(in, vocab)`` of an LM head (same ``weight`` / ``bias`` and state-dict names), with faster
    products for the few rows of a decoding step.

    With autograd off and float32 CPU tensors the product is the one :func:`nezha_zoo.pt.layers.linear`
    picks by row count (:func:`~nezha_zoo.pt.layers.linear_route`; no copy of the weight): ``(W x^T)^T`` for
    2-4 rows (2.0-2.9x ``F.linear``'s speed for (vocab, in) = (32000, 512), (30522, 768), (50368, 768), one
    thread), oneDNN on the plain weight for one row (1.5-2.0x) and for more rows (1.7-2.2x at 8-32 rows with
    AVX-512; held to AVX2, 1.3-1.8x with 512 or more inputs, else ``F.linear``).  In training (autograd on)
    the products run as the blocks' do (on oneDNN where that is faster:
    :func:`~nezha_zoo.pt.layers.onednn_training`).  The products sum in different orders: results agree to
    float32 rounding, not bit for bit.  With the switch off (``set_packed_linear(False)``), under autocast,
    for other dtypes or devices, tensor subclasses, ``torch.compile`` / tracing this is ``F.linear``.

    Forward: ``input`` (..., in_features) -> (..., out_features), contiguous.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


class BertLMPredictionHead(nn.Module):
    """BERT's ``cls.predictions``: ``transform`` (dense, activation, LayerNorm), ``decoder``, ``bias``.

    ``decoder`` is a bias-free ``Linear(H, vocab)`` whose weight the model ties to the word
    embeddings and whose ``bias`` it ties to ``bias`` (both via the spec's ``ties``), as transformers.

    Args:
        config: ``hidden_size``, ``vocab_size``, ``layer_norm_eps``.
        activation (str): the transform's activation (``config.hidden_act``).

    Forward: (B, L, H) -> logits (B, L, vocab).
    """

    def __init__(self, config: Any, activation: str) -> None:
        super().__init__()
        H = config.hidden_size
        self.transform = LMHeadTransform(H, H, config.layer_norm_eps, activation=activation)
        self.decoder = VocabProjection(H, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one Parameter under both names

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))  # (B, L, H) -> (B, L, vocab)


class RobertaLMHead(LMHeadTransform):
    """RoBERTa-style ``lm_head``: ``dense``, activation, ``layer_norm``, ``decoder`` and ``bias``.

    Flat module names as transformers' ``RobertaLMHead`` / ``MPNetLMHead`` (MPNet, XLM-R-XL, I-BERT).
    ``decoder`` is a bias-free ``Linear(H, vocab)`` whose weight the model ties to the word embeddings
    (unless ``tie_word_embeddings=False``) and whose ``bias`` is this head's ``bias`` (the spec's ties).

    Args:
        config: ``hidden_size``, ``vocab_size``, ``layer_norm_eps``.
        activation (str): activation after ``dense`` (transformers: always exact ``"gelu"``).

    Forward: (B, L, H) -> logits (B, L, vocab).
    """

    def __init__(self, config: Any, activation: str = "gelu") -> None:
        H = config.hidden_size
        super().__init__(H, H, config.layer_norm_eps, activation=activation, norm_name="layer_norm")
        self.decoder = VocabProjection(H, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one Parameter under both names

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(super().forward(hidden_states))  # (B, L, H) -> (B, L, vocab)


def mean_pool(
    last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None, normalize: bool = True
) -> torch.Tensor:
    """Sentence embeddings: the mean of the unmasked token vectors, optionally L2-normalised.

    sentence-transformers' ``Pooling(mode="mean")`` followed by ``Normalize()``:
    ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``, then ``x / max(||x||_2, 1e-12)``.

    Args:
        last_hidden_state (Tensor (B, L, H)): token vectors.
        attention_mask (Tensor (B, L) or None): 1 = real token, 0 = padding; None = every token.
        normalize (bool): divide each row by its L2 norm (guarded by 1e-12).

    Returns:
        Tensor (B, H).  A row with no unmasked token is zeros.

    Raises:
        InputError: if the shapes do not fit together.
    """
    if last_hidden_state.dim() != 3:
        raise InputError(f"last_hidden_state must have shape (B, L, H), got {tuple(last_hidden_state.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones(last_hidden_state.shape[:2], device=last_hidden_state.device)
    if tuple(attention_mask.shape) != tuple(last_hidden_state.shape[:2]):
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, the hidden states "
            f"{tuple(last_hidden_state.shape)} need {tuple(last_hidden_state.shape[:2])}"
        )
    mask = attention_mask.to(last_hidden_state.dtype)[:, :, None]  # (B, L) -> (B, L, 1)
    summed = (last_hidden_state * mask).sum(dim=1)  # (B, H)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    pooled = summed / counts
    if normalize:
        pooled = pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
    return pooled


def token_classification_logits(
    dropout: nn.Module, classifier: nn.Module, sequence_output: torch.Tensor
) -> torch.Tensor:
    """(B, L, H) -> (B, L, num_labels): dropout then the classifier, as every family does."""
    return classifier(dropout(sequence_output))


def split_qa_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, 2) -> start (B, L), end (B, L)."""
    start, end = logits.split(1, dim=-1)
    return start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()


# Head docstrings' label lines, appended to the families' forward-argument docs.
#: The base models' ``positions_to_keep`` argument (issue #23).
POSITIONS_TO_KEEP_DOC = """
        positions_to_keep (LongTensor (B, R)): the last layer computes only these positions of each row
            (its keys and values still cover every position): ``last_hidden_state`` is then (B, R, hidden_size)
            (issue #23, :mod:`nezha_zoo.spec.pooling`); needs ``use_cache``, ``output_attentions`` and
            ``output_hidden_states`` off.  None: every position.
    """
MLM_LABELS_DOC = """
        labels (LongTensor (B, L)): target ids, -100 = ignored; loss = cross-entropy.
    """
SEQUENCE_LABELS_DOC = """
        labels ((B,)): class ids (cross-entropy), floats for regression (``num_labels == 1``, MSE), or
            (B, num_labels) floats for multi-label (BCE); see ``config.problem_type``.
    """
TOKEN_LABELS_DOC = """
        labels (LongTensor (B, L)): class ids, -100 = ignored; loss = cross-entropy.
    """
QA_LABELS_DOC = """
        start_positions, end_positions (LongTensor (B,)): span bounds; outside ``[0, L)`` ignored;
            loss = mean of the start and end cross-entropies.
    """


# --- head forwards: logits, loss and output object from the base model's output ------------------
# ``base`` is the base model's output object (``return_dict=True``); ``hidden_states`` and
# ``attentions`` are passed through to the head's output.


def masked_lm_output(logits: torch.Tensor, base: ModelOutput, labels: torch.Tensor | None) -> MaskedLMOutput:
    """MLM ``logits`` (B, L, vocab); cross-entropy over ``labels`` (B, L) (-100 ignored) when given."""
    loss = losses.masked_lm_loss(logits, labels) if labels is not None else None
    return MaskedLMOutput(loss=loss, logits=logits, hidden_states=base.hidden_states, attentions=base.attentions)


def sequence_classification_output(
    logits: torch.Tensor, base: ModelOutput, labels: torch.Tensor | None, num_labels: int, problem_type: str | None
) -> SequenceClassifierOutput:
    """``logits`` (B, num_labels); the ``problem_type`` loss (CE, MSE or BCE) over ``labels`` when given."""
    loss = None
    if labels is not None:
        loss = losses.sequence_classification_loss(logits, labels, num_labels, problem_type)
    return SequenceClassifierOutput(
        loss=loss, logits=logits, hidden_states=base.hidden_states, attentions=base.attentions
    )


def multiple_choice_output(
    logits: torch.Tensor, num_choices: int, base: ModelOutput, labels: torch.Tensor | None
) -> MultipleChoiceModelOutput:
    """One score per flattened choice (B * C, 1) -> logits (B, C); cross-entropy over ``labels`` (B,)."""
    logits = logits.view(-1, num_choices)  # (B * C, 1) -> (B, C)
    loss = losses.multiple_choice_loss(logits, labels) if labels is not None else None
    return MultipleChoiceModelOutput(
        loss=loss, logits=logits, hidden_states=base.hidden_states, attentions=base.attentions
    )


def token_classification_output(
    dropout: nn.Module, classifier: nn.Module, base: ModelOutput, labels: torch.Tensor | None
) -> TokenClassifierOutput:
    """Dropout + ``classifier`` on ``base.last_hidden_state``: (B, L, H) -> logits (B, L, num_labels).

    Loss: cross-entropy over ``labels`` (B, L), -100 ignored, when given.
    """
    logits = token_classification_logits(dropout, classifier, base.last_hidden_state)
    loss = losses.token_classification_loss(logits, labels) if labels is not None else None
    return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=base.hidden_states, attentions=base.attentions)


def question_answering_output(
    qa_outputs: nn.Module,
    base: ModelOutput,
    start_positions: torch.Tensor | None,
    end_positions: torch.Tensor | None,
) -> QuestionAnsweringModelOutput:
    """``qa_outputs`` (H -> 2) on ``base.last_hidden_state``: start and end logits, each (B, L).

    Loss (when both positions (B,) are given): mean of the start and end cross-entropies, positions
    outside ``[0, L)`` ignored.
    """
    start_logits, end_logits = split_qa_logits(qa_outputs(base.last_hidden_state))
    loss = None
    if start_positions is not None and end_positions is not None:
        loss = losses.question_answering_loss(start_logits, end_logits, start_positions, end_positions)
    return QuestionAnsweringModelOutput(
        loss=loss,
        start_logits=start_logits,
        end_logits=end_logits,
        hidden_states=base.hidden_states,
        attentions=base.attentions,
    )
