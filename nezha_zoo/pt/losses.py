"""Losses of the heads, as transformers 4.57.6 PyTorch computes them (docs/DESIGN.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nezha_zoo.outputs import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "infer_problem_type",
    "sequence_classification_loss",
    "token_classification_loss",
    "masked_lm_loss",
    "causal_lm_loss",
    "question_answering_loss",
    "multiple_choice_loss",
    "next_sentence_prediction_loss",
    "replaced_token_detection_loss",
]


def infer_problem_type(num_labels: int, labels: torch.Tensor, problem_type: str | None = None) -> str:
    """transformers' rule: one label -> regression; integer labels -> single-label; else multi-label.

    Unlike transformers, the inferred type is not written back into the config, so one call's labels
    do not decide the loss of later calls.
    """
    if problem_type is not None:
        return problem_type
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def sequence_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_labels: int, problem_type: str | None = None
) -> torch.Tensor:
    """MSE (regression), cross-entropy (single label, -100 ignored) or BCE-with-logits (multi-label).

    Args:
        logits: (B, num_labels).
        labels: (B,) ints, (B,) / (B, 1) floats for regression, (B, num_labels) floats for multi-label.
    """
    kind = infer_problem_type(num_labels, labels, problem_type)
    if kind == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if kind == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position; logits (B, L, C), labels (B, L), -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


masked_lm_loss = token_classification_loss


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[t + 1]`` (the last predicts nothing).

    With ``num_items_in_batch`` the summed loss is divided by it (gradient accumulation), else the mean.
    """
    logits = logits.float()
    if shift_labels is None:
        # (B, L) -> (B, L): labels moved left by one, the last position padded with ignore_index
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def question_answering_loss(
    start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
) -> torch.Tensor:
    """Mean of start and end cross-entropy; positions outside ``[0, L)`` are clamped to ``L`` and ignored."""
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.shape[1]
    start_positions = start_positions.clamp(0, ignored)
    end_positions = end_positions.clamp(0, ignored)
    start = F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
    end = F.cross_entropy(end_logits, end_positions, ignore_index=ignored)
    return (start + end) / 2


def multiple_choice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over choices; logits (B, C), labels (B,)."""
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def next_sentence_prediction_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next-sentence head; logits (B, 2), labels (B,) (0 = continuation, 1 = random)."""
    return F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def replaced_token_detection_loss(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Electra's discriminator loss: BCE-with-logits over positions where ``attention_mask == 1``.

    Args:
        logits: (B, L); labels: (B, L) with 1 = replaced token; attention_mask: (B, L) or None.
    """
    seq_len = logits.shape[-1]
    logits = logits.reshape(-1, seq_len)
    if attention_mask is None:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype).reshape(-1, seq_len))
    active = attention_mask.reshape(-1, seq_len) == 1
    return F.binary_cross_entropy_with_logits(logits[active], labels.reshape(-1, seq_len)[active].to(logits.dtype))
