"""Losses exactly as transformers PyTorch computes them: scalar means, ``-100`` ignored.

All functions take logits and labels as tensors and return a float32 scalar.
"""

from __future__ import annotations

import tensorflow as tf

from nezha_zoo.outputs import IGNORE_INDEX  # noqa: E402

__all__ = [
    "cross_entropy",
    "mse",
    "bce_with_logits",
    "sequence_classification_loss",
    "masked_lm_loss",
    "causal_lm_loss",
    "question_answering_loss",
    "replaced_token_detection_loss",
]


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX) -> tf.Tensor:
    """``torch.nn.CrossEntropyLoss(ignore_index)``: mean over targets != ignore_index.

    Args:
        logits: (N, C) float.
        labels: (N,) int.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.int32)
    valid = tf.not_equal(labels, ignore_index)
    safe = tf.where(valid, labels, tf.zeros_like(labels))  # any class; masked out below
    per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    weights = tf.cast(valid, tf.float32)
    # PyTorch gives nan when every target is ignored (0 / 0); so does this.
    return tf.reduce_sum(per * weights) / tf.reduce_sum(weights)


def mse(pred, target) -> tf.Tensor:
    pred = tf.cast(pred, tf.float32)
    return tf.reduce_mean(tf.square(pred - tf.cast(target, tf.float32)))


def bce_with_logits(logits, targets, weights=None) -> tf.Tensor:
    """``torch.nn.BCEWithLogitsLoss`` (mean); ``weights`` (0/1) selects the elements averaged."""
    logits = tf.cast(logits, tf.float32)
    targets = tf.cast(targets, tf.float32)
    # max(x, 0) - x * z + log(1 + exp(-|x|)): the stable form PyTorch uses.
    per = tf.nn.relu(logits) - logits * targets + tf.math.log1p(tf.exp(-tf.abs(logits)))
    if weights is None:
        return tf.reduce_mean(per)
    weights = tf.cast(weights, tf.float32)
    return tf.reduce_sum(per * weights) / tf.reduce_sum(weights)


def sequence_classification_loss(logits, labels, num_labels: int, problem_type: str | None) -> tf.Tensor:
    """transformers' rule: regression (MSE) when ``num_labels == 1``, cross-entropy for integer
    labels, multi-label BCE otherwise; an explicit ``problem_type`` wins.

    Args:
        logits: (B, num_labels).
        labels: (B,) int, (B,) / (B, 1) float for regression, (B, num_labels) float for multi-label.
    """
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype.is_integer:
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return mse(tf.reshape(logits, (-1,)), tf.reshape(labels, (-1,)))  # PyTorch squeezes both
        return mse(logits, labels)
    if problem_type == "single_label_classification":
        return cross_entropy(tf.reshape(logits, (-1, num_labels)), tf.reshape(labels, (-1,)))
    return bce_with_logits(logits, labels)


def masked_lm_loss(logits, labels) -> tf.Tensor:
    """Cross-entropy over every position whose label is not -100. logits (B, L, V), labels (B, L)."""
    vocab = tf.shape(logits)[-1]
    return cross_entropy(tf.reshape(logits, (-1, vocab)), tf.reshape(labels, (-1,)))


def causal_lm_loss(logits, labels) -> tf.Tensor:
    """Next-token loss: position t predicts label t + 1 (transformers' ``ForCausalLMLoss``)."""
    labels = tf.cast(labels, tf.int32)
    pad = tf.fill((tf.shape(labels)[0], 1), IGNORE_INDEX)
    shifted = tf.concat([labels[:, 1:], pad], axis=1)  # (B, L): label of the next position
    return masked_lm_loss(logits, shifted)


def question_answering_loss(start_logits, end_logits, start_positions, end_positions) -> tf.Tensor:
    """Mean of start and end cross-entropy; positions clamped to [0, L], L itself ignored."""
    seq_len = tf.shape(start_logits)[1]

    def one(logits, positions):
        positions = tf.cast(positions, tf.int32)
        if positions.shape.rank is not None and positions.shape.rank > 1:
            positions = tf.reshape(positions, (-1,))  # PyTorch squeezes a trailing singleton
        positions = tf.clip_by_value(positions, 0, seq_len)
        valid = tf.not_equal(positions, seq_len)
        safe = tf.where(valid, positions, tf.zeros_like(positions))
        per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=tf.cast(logits, tf.float32))
        w = tf.cast(valid, tf.float32)
        return tf.reduce_sum(per * w) / tf.reduce_sum(w)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2.0


def replaced_token_detection_loss(logits, labels, attention_mask=None) -> tf.Tensor:
    """Electra discriminator loss: BCE over positions with ``attention_mask == 1`` (all without one)."""
    weights = None if attention_mask is None else tf.equal(tf.cast(attention_mask, tf.int32), 1)
    return bce_with_logits(logits, labels, weights)
