"""Losses of the heads as pure JAX functions, computed exactly as transformers PyTorch does.

Flax models return no loss (transformers' convention); these functions take the logits and labels
and are safe under ``jax.jit`` and ``jax.grad``.  Every mean is over the positions that count
(labels != ``ignore_index``), like ``torch.nn.CrossEntropyLoss(reduction="mean")``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nezha_zoo.outputs import IGNORE_INDEX

__all__ = [
    "cross_entropy",
    "masked_lm_loss",
    "causal_lm_loss",
    "sequence_classification_loss",
    "token_classification_loss",
    "multiple_choice_loss",
    "question_answering_loss",
    "electra_pretraining_loss",
    "next_sentence_prediction_loss",
    "nezha_pretraining_loss",
    "binary_cross_entropy_with_logits",
]


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean cross-entropy of ``logits`` (..., C) against int ``labels`` (...), skipping ``ignore_index``."""
    logits = logits.astype(jnp.float32)
    labels = jnp.asarray(labels)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None].astype(jnp.int32), axis=-1)
    nll = jnp.where(valid, nll[..., 0], 0.0)
    return nll.sum() / valid.sum()  # NaN when nothing counts, as torch


def binary_cross_entropy_with_logits(logits: jax.Array, labels: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """Mean ``BCEWithLogitsLoss`` (optionally only where ``where`` is True)."""
    x = logits.astype(jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    per = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))  # stable form, as torch
    if where is None:
        return per.mean()
    where = jnp.asarray(where, bool)
    return jnp.where(where, per, 0.0).sum() / where.sum()


def masked_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Masked LM: logits (B, L, V), labels (B, L) with -100 on positions that do not count."""
    return cross_entropy(logits, labels)


def causal_lm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Next-token loss: position t predicts ``labels[t + 1]`` (transformers' ``ForCausalLMLoss``).

    logits (B, L, V); labels (B, L), usually the input ids, -100 where ignored.
    """
    labels = jnp.asarray(labels)
    pad = jnp.full(labels.shape[:-1] + (1,), ignore_index, labels.dtype)
    shifted = jnp.concatenate([labels[..., 1:], pad], axis=-1)  # (B, L): last position predicts nothing
    return cross_entropy(logits, shifted, ignore_index)


def sequence_classification_loss(
    logits: jax.Array, labels: jax.Array, num_labels: int | None = None, problem_type: str | None = None
) -> jax.Array:
    """Sequence classification by ``problem_type`` (inferred as transformers does when None).

    ``regression`` (num_labels == 1): MSE; ``single_label_classification`` (int labels (B,)):
    cross-entropy; ``multi_label_classification`` (float labels (B, num_labels)): BCE with logits.
    """
    labels = jnp.asarray(labels)
    num_labels = logits.shape[-1] if num_labels is None else num_labels
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        x = logits.astype(jnp.float32)
        y = labels.astype(jnp.float32)
        if num_labels == 1:
            x, y = jnp.squeeze(x), jnp.squeeze(y)
        return jnp.mean((x - y) ** 2)
    if problem_type == "single_label_classification":
        return cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    if problem_type == "multi_label_classification":
        return binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"unknown problem_type {problem_type!r}")


def token_classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Token classification: logits (B, L, num_labels), labels (B, L) with -100 ignored."""
    return cross_entropy(logits, labels)


def multiple_choice_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Multiple choice: logits (B, C), labels (B,) choice indices."""
    return cross_entropy(logits, labels)


def question_answering_loss(
    start_logits: jax.Array, end_logits: jax.Array, start_positions: jax.Array, end_positions: jax.Array
) -> jax.Array:
    """Span extraction: mean of start and end cross-entropy.

    Positions outside ``[0, L]`` are clamped to L, which is then ignored (transformers' rule).
    """
    seq_len = start_logits.shape[-1]

    def one(logits, positions):
        positions = jnp.asarray(positions).reshape(-1)  # (B,) even when given as (B, 1)
        return cross_entropy(logits, jnp.clip(positions, 0, seq_len), ignore_index=seq_len)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2


def electra_pretraining_loss(
    logits: jax.Array, labels: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Replaced-token detection: BCE of logits (B, L) vs 0/1 labels over ``attention_mask == 1`` positions."""
    where = None if attention_mask is None else jnp.asarray(attention_mask).reshape(logits.shape) == 1
    return binary_cross_entropy_with_logits(logits, labels, where)


def next_sentence_prediction_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Next-sentence prediction: logits (B, 2), labels (B,) with 0 = continuation, 1 = random (-100 ignored).

    ``CrossEntropyLoss()(logits.view(-1, 2), labels.view(-1))``, as transformers' Nezha/BERT NSP heads.
    """
    return cross_entropy(logits.reshape(-1, 2), jnp.asarray(labels).reshape(-1))


def nezha_pretraining_loss(
    prediction_logits: jax.Array,
    seq_relationship_logits: jax.Array,
    labels: jax.Array,
    next_sentence_label: jax.Array,
) -> jax.Array:
    """``NezhaForPreTraining``'s loss: masked-LM cross-entropy + next-sentence cross-entropy (a sum).

    prediction_logits (B, L, V); seq_relationship_logits (B, 2); labels (B, L) with -100 ignored;
    next_sentence_label (B,).
    """
    vocab = prediction_logits.shape[-1]
    mlm = cross_entropy(prediction_logits.reshape(-1, vocab), jnp.asarray(labels).reshape(-1))
    return mlm + next_sentence_prediction_loss(seq_relationship_logits, next_sentence_label)
