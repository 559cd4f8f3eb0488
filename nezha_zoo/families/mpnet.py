"""MPNet: config and parameter spec.

Architecture (transformers 4.57.6 ``models/mpnet/modeling_mpnet.py``): a post-LN encoder over word +
position embeddings (no token types), attention projections named ``q``/``k``/``v``/``o``, and one
relative-position bias table (``relative_attention_num_buckets`` x heads) shared by all layers and
added to the scaled attention scores.  The embedding padding row is hard-coded to 1 in transformers,
and position ids are padding-aware from there.  Head classes hold the base model under ``mpnet``.
"""

from __future__ import annotations

import math

import numpy as np

from nezha_zoo.config import (
    Field,
    PretrainedConfig,
    activation,
    check_divisible,
    check_index,
    optional_int,
    positive_float,
    positive_int,
    probability,
)
from nezha_zoo.spec.blocks import (
    MPNET_NAMES,
    bert_encoder,
    embedding,
    layer_norm,
    pooler,
    roberta_family_spec,
)
from nezha_zoo.spec.param import ModelSpec, Param
from nezha_zoo.spec.registry import Family, register_family

__all__ = [
    "MPNetConfig",
    "mpnet_spec",
    "MPNET",
    "HEADS_WITH_POOLER",
    "EMBEDDING_PADDING_IDX",
    "MAX_DISTANCE",
    "relative_position_bucket",
    "relative_bucket_table",
]

HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)

#: transformers' MPNet embeddings use row 1 as the padding row whatever ``pad_token_id`` says.
EMBEDDING_PADDING_IDX = 1

#: T5's bucketing horizon (transformers' ``relative_position_bucket`` default): distances from here on
#: share the last bucket of their direction.
MAX_DISTANCE = 128


def relative_position_bucket(relative_position, num_buckets: int = 32, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """T5's bidirectional buckets of ``relative_position = key - query`` (int array, any shape): int32, same shape.

    Half the buckets serve each direction (keys before the query: ``[0, h)``, after it: ``[h, 2h)``,
    ``h = num_buckets // 2``); inside a half, distances below ``e = h // 2`` keep their own bucket and
    larger ones get ``e + trunc(log(n / e) / log(max_distance / e) * (h - e))``, capped at ``h - 1``.
    Computed in float32 in transformers' order, so the buckets equal transformers PyTorch's for every
    ``num_buckets < 4 * max_distance`` (at or above it transformers divides by ``log(<= 1)``).  With
    ``num_buckets < 4`` there are no exact buckets: each direction is one bucket (transformers divides
    by zero there).  An odd count leaves its last row unused, as in transformers.
    """
    n = -np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    if max_exact == 0:
        return ret.astype(np.int32)
    # maximum(n, 1): the log of the exact distances is never used (and log(0) would be -inf)
    scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)  # float -> int truncates, as torch .long()
    return (ret + np.where(n < max_exact, n, large)).astype(np.int32)


def relative_bucket_table(config: MPNetConfig) -> np.ndarray:
    """Bucket of every key - query distance an input can have: (2S + 1,) int32, ``S = max_position_embeddings``.

    Row ``d + S`` holds ``relative_position_bucket(d)`` for ``d = -S .. S``; a backend looks the
    (L, L) buckets of ``arange(L)`` positions up with
    :func:`~nezha_zoo.spec.positions.relative_position_index` ``(pos, pos, S)`` and its own ops (so
    dynamic lengths work).  Inputs hold at most ``max_position_embeddings - 2`` tokens, so no distance
    is clipped.
    """
    span = config.max_position_embeddings
    return relative_position_bucket(np.arange(-span, span + 1), config.relative_attention_num_buckets)


class MPNetConfig(PretrainedConfig):
    """Configuration of an MPNet model (defaults: ``microsoft/mpnet-base``, apart from its 514 positions).

    Args:
        vocab_size (int): token vocabulary size.
        hidden_size (int): width of the encoder and the pooler.
        num_hidden_layers (int): encoder layers.
        num_attention_heads (int): attention heads per layer; must divide ``hidden_size``.
        intermediate_size (int): feed-forward inner width.
        hidden_act (str): encoder activation (``"gelu"`` is exact erf GELU).
        hidden_dropout_prob (float): dropout on embeddings and residual branches.
        attention_probs_dropout_prob (float): dropout on attention probabilities.
        max_position_embeddings (int): rows of the absolute position table.
        initializer_range (float): std of the normal initialiser.
        layer_norm_eps (float): LayerNorm epsilon.
        relative_attention_num_buckets (int): rows of the shared relative-attention bias table
            (at least 2: half the buckets serve each direction).
        pad_token_id (int | None): padding token id.
        bos_token_id (int | None): beginning-of-sequence token id.
        eos_token_id (int | None): end-of-sequence token id.
        **kwargs: the common fields (``num_labels``, ``id2label``...); any other key is kept and
            written back to ``config.json``.

    Raises:
        ValueError: naming the field, for any invalid value.
    """

    model_type = "mpnet"
    fields = (
        Field("vocab_size", 30527, positive_int),
        Field("hidden_size", 768, positive_int),
        Field("num_hidden_layers", 12, positive_int),
        Field("num_attention_heads", 12, positive_int),
        Field("intermediate_size", 3072, positive_int),
        Field("hidden_act", "gelu", activation),
        Field("hidden_dropout_prob", 0.1, probability),
        Field("attention_probs_dropout_prob", 0.1, probability),
        Field("max_position_embeddings", 512, positive_int),
        Field("initializer_range", 0.02, positive_float),
        Field("layer_norm_eps", 1e-12, positive_float),
        Field("relative_attention_num_buckets", 32, positive_int),
        Field("pad_token_id", 1, optional_int),
        Field("bos_token_id", 0, optional_int),
        Field("eos_token_id", 2, optional_int),
    )

    @property
    def max_input_length(self) -> int | None:
        """Positions ``EMBEDDING_PADDING_IDX + 1 .. max_position_embeddings - 1`` (transformers' MPNet)."""
        return self.max_position_embeddings - EMBEDDING_PADDING_IDX - 1

    def check(self) -> None:
        check_divisible(self, "hidden_size", "num_attention_heads")
        check_index(self, "pad_token_id", "vocab_size")
        if self.relative_attention_num_buckets < 2:
            raise ValueError(
                f"MPNetConfig.relative_attention_num_buckets must be at least 2, "
                f"got {self.relative_attention_num_buckets}"
            )
        for name in ("vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= EMBEDDING_PADDING_IDX:
                raise ValueError(
                    f"MPNetConfig.{name} must exceed the embedding padding row {EMBEDDING_PADDING_IDX}, "
                    f"got {getattr(self, name)}"
                )


#: Heads whose base model has the pooler; the others build ``MPNetModel(add_pooling_layer=False)``.
HEADS_WITH_POOLER = ("Model", "ForMultipleChoice")


def _base(c: MPNetConfig, with_pooler: bool) -> list[Param]:
    H = c.hidden_size
    pad = EMBEDDING_PADDING_IDX
    ps = embedding("embeddings.word_embeddings", c.vocab_size, H, "vocab", padding_idx=pad)
    ps += embedding("embeddings.position_embeddings", c.max_position_embeddings, H, "position", padding_idx=pad)
    ps += layer_norm("embeddings.LayerNorm", H)
    ps += bert_encoder("encoder", c.num_hidden_layers, H, c.intermediate_size, MPNET_NAMES)
    # One relative-attention bias table shared by every layer.
    ps += embedding(
        "encoder.relative_attention_bias", c.relative_attention_num_buckets, c.num_attention_heads, "buckets", "heads"
    )
    if with_pooler:
        ps += pooler("", H)
    return ps


def mpnet_spec(c: MPNetConfig, head: str = "Model") -> ModelSpec:
    """All parameters of ``MPNet<head>`` for config ``c`` (transformers 4.57.6 state-dict names)."""
    return roberta_family_spec("mpnet", "mpnet", c, head, HEADS, _base(c, head in HEADS_WITH_POOLER))


MPNET = register_family(
    Family(
        key="mpnet",
        model_type="mpnet",
        class_prefix="MPNet",
        config_class=MPNetConfig,
        base_prefix="mpnet",
        heads=HEADS,
        spec=mpnet_spec,
        tokenizer_class="MPNetTokenizer",
    )
)
