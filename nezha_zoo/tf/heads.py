"""Heads shared by the BERT-style families (Keras 3).

Each head is a named :class:`~nezha_zoo.tf.layers.Block`; names equal transformers' PyTorch
attribute names, and anything a family changes (activation, norm name, output width) is an argument.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from nezha_zoo.config import PretrainedConfig, classifier_dropout_rate
from nezha_zoo.outputs import (
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from nezha_zoo.tf import losses
from nezha_zoo.tf.layers import Block, bf16_matmul, dense, dropout, get_activation, layer_norm

__all__ = [
    "TFClassificationHead",
    "TFSequenceSummary",
    "token_classifier",
    "split_qa_logits",
    "TFLMHeadTransform",
    "TFTiedLMOutput",
    "tied_vocab_logits",
    "TFBertPooler",
    "TFBertLMPredictionHead",
    "flatten_choices",
    "TFRobertaLMHead",
    "mean_pool",
    "num_choices",
    "masked_lm_output",
    "sequence_classification_output",
    "multiple_choice_output",
    "token_classification_output",
    "question_answering_output",
]


class TFClassificationHead(Block):
    """First token -> dropout -> ``dense`` -> activation -> dropout -> ``out_proj``.

    Args:
        config (PretrainedConfig): ``hidden_size``, ``num_labels``, ``classifier_dropout``.
        activation (str): ``"gelu"`` for Electra, ``"tanh"`` for RoBERTa-style heads.
        name (str): ``"classifier"``.

    Call: ``features`` (B, L, H) -> logits (B, num_labels).
    """

    def __init__(self, config: PretrainedConfig, activation: str = "tanh", name: str = "classifier", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.dense = dense(config.hidden_size, "dense")
        self.act = get_activation(activation)
        self.dropout = dropout(classifier_dropout_rate(config))
        self.out_proj = dense(config.num_labels, "out_proj")

    def call(self, features, training=False):
        x = features[:, 0, :]  # (B, H): the first token
        x = self.dropout(x, training=training)
        x = self.act(self.dense(x))
        x = self.dropout(x, training=training)
        return self.out_proj(x)


class TFSequenceSummary(Block):
    """transformers' SequenceSummary: pick/pool a vector, optional ``summary`` projection,
    activation, first/last dropout.

    Args:
        config (PretrainedConfig): ``summary_type`` (first/last/mean/cls_index), ``summary_use_proj``,
            ``summary_proj_to_labels``, ``summary_activation``, ``summary_first_dropout``,
            ``summary_last_dropout``.
        name (str): ``"sequence_summary"``.

    Call: ``hidden_states`` (N, L, H), optional ``cls_index`` (N,) -> (N, width).
    """

    def __init__(self, config: PretrainedConfig, name: str = "sequence_summary", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.summary_type = getattr(config, "summary_type", "last")
        self.summary = None
        if getattr(config, "summary_use_proj", False):
            to_labels = getattr(config, "summary_proj_to_labels", False) and config.num_labels > 0
            self.summary = dense(config.num_labels if to_labels else config.hidden_size, "summary")
        self.act = get_activation(getattr(config, "summary_activation", None) or None)
        first = getattr(config, "summary_first_dropout", 0.0) or 0.0
        last = getattr(config, "summary_last_dropout", 0.0) or 0.0
        self.first_dropout = dropout(first, "first_dropout") if first > 0 else None
        self.last_dropout = dropout(last, "last_dropout") if last > 0 else None

    def call(self, hidden_states, cls_index=None, training=False):
        if self.summary_type == "first":
            out = hidden_states[:, 0]
        elif self.summary_type == "last":
            out = hidden_states[:, -1]
        elif self.summary_type == "mean":
            out = tf.reduce_mean(hidden_states, axis=1)
        elif self.summary_type == "cls_index":
            if cls_index is None:
                out = hidden_states[:, -1]
            else:
                out = tf.gather(hidden_states, tf.cast(cls_index, tf.int32), axis=1, batch_dims=1)
        else:
            raise ValueError(f"summary_type {self.summary_type!r} is not supported")
        if self.first_dropout is not None:
            out = self.first_dropout(out, training=training)
        if self.summary is not None:
            out = self.summary(out)
        out = self.act(out)
        if self.last_dropout is not None:
            out = self.last_dropout(out, training=training)
        return out


def token_classifier(
    config: PretrainedConfig, name: str = "classifier"
) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """The top-level ``dropout`` and ``classifier`` of a token-classification model (B, L, H) -> (B, L, num_labels)."""
    return dropout(classifier_dropout_rate(config)), dense(config.num_labels, name)


def flatten_choices(t: tf.Tensor | None) -> tf.Tensor | None:
    """Multiple-choice inputs (B, C, L[, E]) -> (B*C, L[, E]); None stays None."""
    if t is None:
        return None
    shape = tf.shape(t)
    return tf.reshape(t, tf.concat([[-1], shape[2:]], axis=0))  # (B*C, L[, E])


def split_qa_logits(logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``qa_outputs`` logits (B, L, 2) -> start (B, L), end (B, L)."""
    start, end = tf.split(logits, 2, axis=-1)
    return tf.squeeze(start, -1), tf.squeeze(end, -1)


class TFLMHeadTransform(Block):
    """``dense`` -> activation -> ``LayerNorm`` (BERT's ``transform``, Electra's generator head).

    Args:
        config (PretrainedConfig): ``layer_norm_eps``.
        units (int): output width (Electra: ``embedding_size``).
        activation (str): activation name (Electra's generator: always ``"gelu"``).
        norm_name (str): ``"LayerNorm"`` (BERT/Electra) or ``"layer_norm"`` (RoBERTa-style).
        name (str): the module name (``"generator_predictions"``).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        units: int,
        activation: str = "gelu",
        norm_name: str = "LayerNorm",
        name: str = "transform",
        **kwargs: Any,
    ):
        super().__init__(name=name, **kwargs)
        self.dense = dense(units, "dense")
        self.act = get_activation(activation)
        self.norm = layer_norm(config, norm_name)

    def call(self, hidden_states):
        return self.norm(self.act(self.dense(hidden_states)))


def tied_vocab_logits(hidden_states: tf.Tensor, embedding_matrix: tf.Tensor) -> tf.Tensor:
    """Vocabulary logits through a tied embedding table: (..., E) x (V, E) -> (..., V), no bias.

    ``hidden_states @ embedding_matrix^T``.  A single row (static shape, e.g. a batch-1 decoding
    step) goes through ``matvec(embedding_matrix, row)`` instead: XLA rewrites ``row @ table^T``
    with the table as a transposed right operand and, once the head's bias add is fused into that
    product, materialises the transposed (E, V) table on every call -- inside a decoding loop, every
    step (3x the whole step at XLM-R-XL's 32000 x 512 table).  With the table on the left no copy
    is made.  The same dot products (a different kernel may round their sums differently in the
    last bit, as any two matmul kernels do).  Both forms go through :func:`bf16_matmul`, so bf16
    products stay native under XLA.
    """
    rows = hidden_states.shape[:-1].num_elements()
    if rows == 1:
        column = tf.reshape(hidden_states, (-1, 1))  # (E, 1)
        logits = bf16_matmul(embedding_matrix, column)  # (V, 1): ``matvec``, native bf16 under XLA
        return tf.reshape(logits, hidden_states.shape[:-1].concatenate(logits.shape[:1]))
    return bf16_matmul(hidden_states, embedding_matrix, transpose_b=True)


class TFTiedLMOutput(Block):
    """Vocabulary logits through the (tied) word-embedding matrix plus this layer's own ``bias``.

    Args:
        vocab_size (int): V.
        name (str): the module name (``"generator_lm_head"``); its only variable is ``bias`` (V,).

    Call: ``hidden_states`` (B, L, E), ``embedding_matrix`` (V, E) -> (B, L, V).
    """

    def __init__(self, vocab_size: int, name: str, **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.vocab_size = vocab_size

    def build(self, input_shape=None):
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")

    def call(self, hidden_states, embedding_matrix):
        logits = tied_vocab_logits(hidden_states, embedding_matrix)  # (B, L, V)
        return logits + self.bias


class TFBertPooler(Block):
    """BERT pooler: the first token through ``dense`` (H -> H) and ``tanh``.

    Args:
        config (PretrainedConfig): ``hidden_size``.
        name (str): ``"pooler"``.

    Call: ``hidden_states`` (B, L, H) -> (B, H).
    """

    def __init__(self, config: PretrainedConfig, name: str = "pooler", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.dense = dense(config.hidden_size, "dense")

    def call(self, hidden_states):
        return tf.tanh(self.dense(hidden_states[:, 0]))  # (B, L, H) -> (B, H)


class TFBertLMPredictionHead(Block):
    """BERT's ``predictions``: ``transform`` (dense, activation, LayerNorm), then the vocabulary
    projection -- the word-embedding matrix (tied) or an own bias-free ``decoder`` -- plus ``bias``.

    Args:
        config (PretrainedConfig): ``hidden_size``, ``vocab_size``, ``hidden_act``,
            ``layer_norm_eps``, ``tie_word_embeddings``.
        name (str): ``"predictions"``; its variables are ``transform/...``, ``bias`` (V,) and, when
            untied, ``decoder/kernel`` (H, V).

    Call: ``hidden_states`` (B, L, H), ``embedding_matrix`` (V, H) (ignored when untied) -> (B, L, V).
    """

    def __init__(self, config: PretrainedConfig, name: str = "predictions", **kwargs: Any):
        super().__init__(name=name, **kwargs)
        self.vocab_size = config.vocab_size
        self.transform = TFLMHeadTransform(config, config.hidden_size, activation=config.hidden_act, name="transform")
        tied = getattr(config, "tie_word_embeddings", True)
        self.decoder = None if tied else dense(config.vocab_size, "decoder", use_bias=False)

    def build(self, input_shape=None):
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")

    def call(self, hidden_states, embedding_matrix=None):
        hidden_states = self.transform(hidden_states)
        if self.decoder is None:
            logits = tied_vocab_logits(hidden_states, embedding_matrix)  # (B, L, V)
        else:
            logits = self.decoder(hidden_states)
        return logits + self.bias


class TFRobertaLMHead(TFLMHeadTransform):
    """RoBERTa-style ``lm_head`` (MPNet, XLM-R-XL, I-BERT): ``dense`` (H -> H), exact GELU,
    ``layer_norm``, then the vocabulary projection ``decoder`` -- the word-embedding matrix when tied
    (the default), an own bias-free ``decoder`` otherwise -- plus ``bias`` (transformers ties
    ``decoder.bias`` to it, so one variable).

    Args:
        config (PretrainedConfig): ``hidden_size``, ``vocab_size``, ``layer_norm_eps``,
            ``tie_word_embeddings``.
        name (str): ``"lm_head"``; variables ``dense/{kernel,bias}``, ``layer_norm/{gamma,beta}``,
            ``bias`` (V,) and, when untied, ``decoder/kernel`` (H, V).

    Call: ``features`` (B, L, H), ``embedding_matrix`` (V, H) (ignored when untied) -> (B, L, V).
    """

    def __init__(self, config: PretrainedConfig, name: str = "lm_head", **kwargs: Any):
        # transformers hard-codes the erf GELU here, whatever hidden_act says.
        super().__init__(config, config.hidden_size, activation="gelu", norm_name="layer_norm", name=name, **kwargs)
        self.vocab_size = config.vocab_size
        tied = getattr(config, "tie_word_embeddings", True)
        self.decoder = None if tied else dense(config.vocab_size, "decoder", use_bias=False)

    def build(self, input_shape=None):
        self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer="zeros")

    def call(self, features, embedding_matrix=None):
        x = super().call(features)  # (B, L, H)
        if self.decoder is None:
            logits = tied_vocab_logits(x, embedding_matrix)  # (B, L, V)
        else:
            logits = self.decoder(x)
        return logits + self.bias


def mean_pool(last_hidden_state, attention_mask=None, normalize: bool = True, eps: float = 1e-12) -> tf.Tensor:
    """Sentence embeddings: the mean of the token vectors the mask keeps, optionally L2-normalised.

    Equals sentence-transformers' ``Pooling(pooling_mode_mean_tokens=True)`` followed by
    ``Normalize()``: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)`` then ``x / max(||x||_2, eps)``.

    Args:
        last_hidden_state (tf.Tensor): (B, L, H) float token vectors.
        attention_mask (tf.Tensor | np.ndarray | None): (B, L), 1 = real token, 0 = padding;
            ``None`` keeps every token.
        normalize (bool): divide each embedding by its L2 norm (unit vectors for cosine similarity).
        eps (float): lower bound of the norm, so an all-zero vector stays zero instead of NaN.

    Returns:
        tf.Tensor: (B, H) float32 embeddings.
    """
    hidden = tf.cast(tf.convert_to_tensor(last_hidden_state), tf.float32)
    if attention_mask is None:
        mask = tf.ones(tf.shape(hidden)[:2], tf.float32)
    else:
        mask = tf.cast(tf.convert_to_tensor(attention_mask), tf.float32)
    summed = tf.reduce_sum(hidden * mask[:, :, None], axis=1)  # (B, L, H) -> (B, H)
    counts = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1e-9)  # (B, 1)
    pooled = summed / counts
    if normalize:
        norm = tf.sqrt(tf.reduce_sum(tf.square(pooled), axis=-1, keepdims=True))  # (B, 1)
        pooled = pooled / tf.maximum(norm, eps)
    return pooled


# --- loss + output object of the standard heads (``out``: the base layer's output) ---------------


def masked_lm_output(logits, labels, out) -> MaskedLMOutput:
    """``logits`` (B, L, V); ``labels`` (B, L), -100 ignored -> mean cross-entropy ``loss``."""
    loss = None if labels is None else losses.masked_lm_loss(logits, labels)
    return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


def sequence_classification_output(config: PretrainedConfig, logits, labels, out) -> SequenceClassifierOutput:
    """``logits`` (B, num_labels); the loss follows ``config.num_labels`` / ``config.problem_type``."""
    loss = None
    if labels is not None:
        loss = losses.sequence_classification_loss(logits, labels, config.num_labels, config.problem_type)
    return SequenceClassifierOutput(
        loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
    )


def num_choices(input_ids, inputs_embeds) -> tf.Tensor:
    """C of multiple-choice inputs (B, C, L) or embeddings (B, C, L, E)."""
    ref = input_ids if input_ids is not None else inputs_embeds
    return tf.shape(ref)[1]


def multiple_choice_output(scores, choices, labels, out) -> MultipleChoiceModelOutput:
    """Per-row scores (B*C, 1) -> ``logits`` (B, C); ``labels`` (B,) the right choice."""
    logits = tf.reshape(scores, (-1, choices))  # (B*C, 1) -> (B, C)
    loss = None if labels is None else losses.cross_entropy(logits, labels)
    return MultipleChoiceModelOutput(
        loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
    )


def token_classification_output(config: PretrainedConfig, logits, labels, out) -> TokenClassifierOutput:
    """``logits`` (B, L, num_labels); ``labels`` (B, L), -100 ignored."""
    loss = None
    if labels is not None:
        n = config.num_labels
        loss = losses.cross_entropy(tf.reshape(logits, (-1, n)), tf.reshape(labels, (-1,)))  # (B*L, n)
    return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


def question_answering_output(logits, start_positions, end_positions, out) -> QuestionAnsweringModelOutput:
    """``qa_outputs`` logits (B, L, 2) -> ``start_logits``/``end_logits`` (B, L); the loss needs both positions."""
    start_logits, end_logits = split_qa_logits(logits)
    loss = None
    if start_positions is not None and end_positions is not None:
        loss = losses.question_answering_loss(start_logits, end_logits, start_positions, end_positions)
    return QuestionAnsweringModelOutput(
        loss=loss,
        start_logits=start_logits,
        end_logits=end_logits,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
    )
