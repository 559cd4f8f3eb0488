"""Heads shared by the BERT-style families (Flax linen).

Module and parameter names are transformers' PyTorch attribute names; a family instantiates a head
under the attribute name its PyTorch class uses (``classifier``, ``sequence_summary``,
``generator_predictions``...).  Heads that are a single linear layer directly on the model
(token classification ``classifier``, ``qa_outputs``) are plain :func:`~nezha_zoo.flax.layers.dense`
layers plus the helpers below.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.flax.layers import Dropout, bf16_einsum, dense, get_activation, layer_norm
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import Kind
from nezha_zoo.spec.registry import family_of_config

__all__ = [
    "ClassificationHead",
    "SequenceSummary",
    "LMHeadTransform",
    "TiedLMBias",
    "BertLMPredictionHead",
    "PredictionHead",
    "split_qa_logits",
    "BertPooler",
    "token_classifier",
    "qa_head",
    "lm_decoder",
    "RobertaLMHead",
    "mean_pool",
]


def split_qa_logits(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, L, 2) -> start (B, L), end (B, L)."""
    start, end = jnp.split(logits, 2, axis=-1)
    return start.squeeze(-1), end.squeeze(-1)


def token_classifier(config: Any, hidden_states, deterministic: bool, dtype: Any, name: str = "classifier"):
    """Token classification inside a head's compact ``__call__``: dropout, then ``classifier`` (H -> labels).

    The layers are created in the calling module, so ``classifier`` sits directly on the model as in
    PyTorch.  hidden_states (B, L, H) -> logits (B, L, num_labels).
    """
    h = Dropout(classifier_dropout_rate(config), name="dropout")(hidden_states, deterministic=deterministic)
    return dense(config.num_labels, name, config, dtype)(h)


def qa_head(config: Any, hidden_states, dtype: Any, name: str = "qa_outputs") -> tuple[jax.Array, jax.Array]:
    """Span extraction inside a head's compact ``__call__``: ``qa_outputs`` (H -> 2), split to start/end (B, L)."""
    if config.num_labels != 2:
        raise ValueError(f"question answering needs config.num_labels == 2 (start, end), got {config.num_labels}")
    return split_qa_logits(dense(config.num_labels, name, config, dtype)(hidden_states))


def lm_decoder(head: nn.Module, hidden_states, table=None) -> jax.Array:
    """Vocabulary projection inside an LM head's compact ``__call__``: decoder and ``bias`` (V,).

    ``head`` has ``config``, ``tied`` and ``dtype``.  Tied: ``hidden_states @ table.T`` with ``table``
    (V, H) the word embeddings; else a bias-free ``decoder`` dense layer (H -> V) on ``head``.
    hidden_states (B, L, H) -> logits (B, L, V).
    """
    c = head.config
    bias = head.param("bias", jax.nn.initializers.zeros, (c.vocab_size,), jnp.float32)
    if head.tied:
        logits = bf16_einsum("blh,vh->blv", hidden_states, jnp.asarray(table, head.dtype))  # h @ table.T
    else:
        logits = dense(c.vocab_size, "decoder", c, head.dtype, use_bias=False)(hidden_states)
    return logits + jnp.asarray(bias, head.dtype)


class ClassificationHead(nn.Module):
    """Sentence classification on token 0: dropout, ``dense``, activation, dropout, ``out_proj``.

    Attributes:
        config: needs ``hidden_size``, ``num_labels``, dropout settings.
        activation (str): Electra uses ``"gelu"``; RoBERTa-style heads ``"tanh"``.

    Call args: hidden_states (B, L, H).  Returns logits (B, num_labels).
    """

    config: Any
    activation: str = "tanh"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, deterministic: bool = True):
        c = self.config
        drop = Dropout(classifier_dropout_rate(c), name="dropout")
        x = drop(hidden_states[:, 0, :], deterministic=deterministic)
        x = get_activation(self.activation)(dense(c.hidden_size, "dense", c, self.dtype)(x))
        x = drop(x, deterministic=deterministic)
        return dense(c.num_labels, "out_proj", c, self.dtype)(x)


class SequenceSummary(nn.Module):
    """transformers' ``SequenceSummary``: pick/average tokens, optional ``summary`` projection, activation.

    ``summary_type``: ``first`` (token 0), ``last`` (token -1), ``mean`` (all tokens) or ``cls_index``
    (token ``cls_index``, default the last).  Projection width is ``num_labels`` with
    ``summary_proj_to_labels``, else ``hidden_size``.

    Call args: hidden_states (B, L, H); cls_index (B,) int or None.  Returns (B, width).
    """

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, cls_index=None, deterministic: bool = True):
        c = self.config
        kind = getattr(c, "summary_type", "last")
        if kind == "first":
            x = hidden_states[:, 0]
        elif kind == "last":
            x = hidden_states[:, -1]
        elif kind == "mean":
            x = hidden_states.mean(axis=1)
        elif kind == "cls_index":
            if cls_index is None:
                x = hidden_states[:, -1]
            else:
                idx = jnp.asarray(cls_index, jnp.int32)[:, None, None]  # (B, 1, 1) for take_along_axis
                x = jnp.take_along_axis(hidden_states, idx, axis=1)[:, 0]
        else:
            raise ValueError(f"summary_type {kind!r} is not supported")
        first = getattr(c, "summary_first_dropout", 0.0) or 0.0
        if first > 0:
            x = Dropout(first, name="first_dropout")(x, deterministic=deterministic)
        if getattr(c, "summary_use_proj", False):
            to_labels = getattr(c, "summary_proj_to_labels", False) and c.num_labels > 0
            x = dense(c.num_labels if to_labels else c.hidden_size, "summary", c, self.dtype)(x)
        x = get_activation(getattr(c, "summary_activation", None) or None)(x)
        last = getattr(c, "summary_last_dropout", 0.0) or 0.0
        if last > 0:
            x = Dropout(last, name="last_dropout")(x, deterministic=deterministic)
        return x


class LMHeadTransform(nn.Module):
    """LM-head transform: ``dense`` (to ``features``), activation, ``LayerNorm``.

    Electra's ``generator_predictions`` (features = embedding_size, activation always exact GELU);
    BERT-style ``cls.predictions.transform`` / ``lm_head`` use the same block.

    Call args: hidden_states (B, L, H).  Returns (B, L, features).
    """

    config: Any
    features: int
    activation: str = "gelu"
    dense_name: str = "dense"
    norm_name: str = "LayerNorm"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        c = self.config
        x = get_activation(self.activation)(dense(self.features, self.dense_name, c, self.dtype)(hidden_states))
        return layer_norm(self.norm_name, c, self.dtype)(x)


class TiedLMBias(nn.Module):
    """Output projection tied to the word embeddings: ``x @ table.T + bias``; only ``bias`` is stored.

    Call args: x (B, L, E); table (V, E), the word-embedding matrix.  Returns logits (B, L, V).
    """

    vocab_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, table):
        bias = self.param("bias", jax.nn.initializers.zeros, (self.vocab_size,), jnp.float32)
        x = jnp.asarray(x, self.dtype)
        return bf16_einsum("ble,ve->blv", x, jnp.asarray(table, self.dtype)) + jnp.asarray(bias, self.dtype)


class PredictionHead(nn.Module):
    """Two dense layers: ``dense`` (H -> H), activation, ``dense_prediction`` (H -> out), squeezed.

    Electra's ``discriminator_predictions`` (out = 1, activation ``hidden_act``).
    Call args: hidden_states (B, L, H).  Returns (B, L) when ``out == 1`` else (B, L, out).
    """

    config: Any
    out: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        c = self.config
        x = get_activation(c.hidden_act)(dense(c.hidden_size, "dense", c, self.dtype)(hidden_states))
        x = dense(self.out, "dense_prediction", c, self.dtype)(x)
        return x.squeeze(-1) if self.out == 1 else x


class BertPooler(nn.Module):
    """``pooler``: ``tanh(dense(hidden[:, 0]))``: (B, L, H) -> (B, H)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        return jnp.tanh(dense(self.config.hidden_size, "dense", self.config, self.dtype)(hidden_states[:, 0]))


class BertLMPredictionHead(nn.Module):
    """BERT-style ``cls.predictions``: ``transform`` (dense, ``hidden_act``, LayerNorm), ``decoder``, ``bias``.

    With ``tied`` (``config.tie_word_embeddings``) the decoder is the word-embedding matrix passed in
    and only ``bias`` is stored (transformers ties ``decoder.weight`` to the embeddings and
    ``decoder.bias`` to ``bias``); otherwise ``decoder`` is its own bias-free dense layer.

    Call args: hidden_states (B, L, H); table (V, H) word embeddings (used when tied).
    Returns logits (B, L, V).
    """

    config: Any
    tied: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, table=None):
        c = self.config
        h = LMHeadTransform(c, c.hidden_size, c.hidden_act, dtype=self.dtype, name="transform")(hidden_states)
        return lm_decoder(self, h, table)


class RobertaLMHead(nn.Module):
    """RoBERTa-style ``lm_head`` (MPNet, XLM-R-XL, I-BERT): ``dense``, exact GELU, ``layer_norm``, decoder, ``bias``.

    The activation is always exact GELU (transformers hard-codes ``gelu`` there, whatever
    ``hidden_act``).  With ``tied`` (``config.tie_word_embeddings``) the decoder is the word-embedding
    matrix passed in and only ``bias`` is stored (transformers ties ``decoder.bias`` to ``bias``);
    otherwise ``decoder`` is its own bias-free dense layer.

    Call args: hidden_states (B, L, H); table (V, H) word embeddings (used when tied).
    Returns logits (B, L, V).
    """

    config: Any
    tied: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, table=None):
        c = self.config
        h = get_activation("gelu")(dense(c.hidden_size, "dense", c, self.dtype)(hidden_states))
        h = layer_norm("layer_norm", c, self.dtype)(h)
        return lm_decoder(self, h, table)


def mean_pool(
    last_hidden_state: jax.Array, attention_mask: jax.Array | None = None, normalize: bool = True
) -> jax.Array:
    """Sentence embeddings: the mean of the unmasked token states, optionally L2-normalised.

    sentence-transformers' ``Pooling(mean)`` followed by ``Normalize()``: the token count is clamped
    to at least 1e-9 (a fully masked row gives zeros, not NaN) and the norm to at least 1e-12
    (``torch.nn.functional.normalize``).  Pure JAX: safe under ``jax.jit`` and ``jax.grad``.

    Args:
        last_hidden_state: (B, L, H) token states.
        attention_mask: (B, L) 0/1, or None for all ones; tokens with 0 are left out.
        normalize (bool): divide each embedding by its L2 norm.

    Returns:
        (B, H) embeddings (float32 or the states' dtype).
    """
    if attention_mask is None:
        attention_mask = jnp.ones(last_hidden_state.shape[:2], last_hidden_state.dtype)
    mask = jnp.asarray(attention_mask).astype(last_hidden_state.dtype)[..., None]  # (B, L, 1)
    summed = jnp.sum(last_hidden_state * mask, axis=1)  # (B, H)
    count = jnp.maximum(jnp.sum(mask, axis=1), 1e-9)  # (B, 1)
    pooled = summed / count
    if normalize:
        norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))  # (B, 1)
        pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


def tied_embedding_table(base: nn.Module, config: Any, head: str = "ForMaskedLM") -> jax.Array | None:
    """The word-embedding table an LM head's output projection is tied to, found through the spec.

    The family's ``head`` spec (default ``ForMaskedLM``; MPT, which has none, passes ``ForCausalLM``)
    says which embedding its tied alias points at; its Flax path (minus the base-model prefix) locates
    the array among ``base``'s params.  ``base`` must have run.  Returns None when the config unties
    the head (``tie_word_embeddings=False``).
    """
    family = family_of_config(config)
    spec = family.model_spec(config, head)
    targets = [spec[t] for t in spec.ties.values() if spec[t].kind is Kind.EMBEDDING]
    if not targets:
        return None  # the config unties the head: it owns its decoder weight
    if len(targets) != 1:
        raise ValueError(f"{family.key}: expected one embedding behind the LM head's ties, found {targets}")
    prefix, *path = LAYOUTS["flax"].path(targets[0])
    if prefix != family.base_prefix:
        raise ValueError(f"{targets[0].name}: expected the base-model prefix {family.base_prefix!r}")
    node = base.variables["params"]
    for key in path:
        node = node[key]
    return node  # (V, E)
