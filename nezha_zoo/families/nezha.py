"""Nezha: config and parameter spec.

Architecture (transformers 4.57.6 ``models/deprecated/nezha/modeling_nezha.py``): a BERT post-LN
encoder whose embeddings have word and token-type tables only -- no absolute position table, so no
``position_ids`` input.  Every self-attention layer adds a fixed sinusoidal encoding of the relative
distance between query and key positions, clipped to ``+-max_relative_position``, to both the
attention scores and the attended values.  Head classes hold the base model under ``nezha``.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from nezha_zoo.config import (
    Field,
    PretrainedConfig,
    activation,
    boolean,
    check_divisible,
    check_index,
    non_negative_int,
    optional_int,
    optional_probability,
    positive_float,
    positive_int,
    probability,
)
from nezha_zoo.spec.blocks import bert_encoder, dense, embedding, layer_norm, pooler
from nezha_zoo.spec.param import Kind, ModelSpec, Param, prefixed
from nezha_zoo.spec.registry import Family, register_family

__all__ = [
    "NezhaConfig",
    "nezha_spec",
    "NEZHA",
    "HEADS_WITH_POOLER",
    "relative_position_table",
]

HEADS = (
    "Model",
    "ForPreTraining",
    "ForMaskedLM",
    "ForNextSentencePrediction",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)


class NezhaConfig(PretrainedConfig):
    """Configuration of a Nezha model (defaults: ``sijunhe/nezha-cn-base``).

    Args:
        vocab_size (int): token vocabulary size (rows of the word-embedding table).
        hidden_size (int): width of the encoder and the pooler.
        num_hidden_layers (int): encoder layers.
        num_attention_heads (int): attention heads per layer; must divide ``hidden_size``.
        intermediate_size (int): feed-forward inner width.
        hidden_act (str): encoder activation (``"gelu"`` is exact erf GELU).
        hidden_dropout_prob (float): dropout on embeddings, residual branches and the pooler.
        attention_probs_dropout_prob (float): dropout on attention probabilities.
        max_position_embeddings (int): longest input; the relative-position table is built for
            this many positions.
        max_relative_position (int): relative distances are clipped to ``+-max_relative_position``
            before the sinusoidal encoding.
        type_vocab_size (int): rows of the token-type table.
        initializer_range (float): std of the normal initialiser.
        layer_norm_eps (float): LayerNorm epsilon.
        classifier_dropout (float | None): dropout of classification heads (``hidden_dropout_prob``
            when None).
        pad_token_id (int | None): padding token id (the zero row of the word embeddings).
        bos_token_id (int | None): beginning-of-sequence token id.
        eos_token_id (int | None): end-of-sequence token id.
        use_cache (bool): return key/value caches in decoder mode by default.
        **kwargs: the common fields (``is_decoder``, ``add_cross_attention``, ``num_labels``,
            ``id2label``...); any other key is kept and written back to ``config.json``.

    Raises:
        ValueError: naming the field, for any invalid value.
    """

    model_type = "nezha"
    fields = (
        Field("vocab_size", 21128, positive_int),
        Field("hidden_size", 768, positive_int),
        Field("num_hidden_layers", 12, positive_int),
        Field("num_attention_heads", 12, positive_int),
        Field("intermediate_size", 3072, positive_int),
        Field("hidden_act", "gelu", activation),
        Field("hidden_dropout_prob", 0.1, probability),
        Field("attention_probs_dropout_prob", 0.1, probability),
        Field("max_position_embeddings", 512, positive_int),
        Field("max_relative_position", 64, non_negative_int),
        Field("type_vocab_size", 2, positive_int),
        Field("initializer_range", 0.02, positive_float),
        Field("layer_norm_eps", 1e-12, positive_float),
        Field("classifier_dropout", 0.1, optional_probability),
        Field("pad_token_id", 0, optional_int),
        Field("bos_token_id", 2, optional_int),
        Field("eos_token_id", 3, optional_int),
        Field("use_cache", True, boolean),
    )

    @property
    def max_input_length(self) -> int | None:
        """None: relative positions only, so any length works."""
        return None

    def check(self) -> None:
        check_divisible(self, "hidden_size", "num_attention_heads")
        check_index(self, "pad_token_id", "vocab_size")


#: Heads whose base model has the pooler; the others build ``NezhaModel(add_pooling_layer=False)``.
HEADS_WITH_POOLER = (
    "Model",
    "ForPreTraining",
    "ForNextSentencePrediction",
    "ForSequenceClassification",
    "ForMultipleChoice",
)

#: Tensors older checkpoints may carry that hold nothing: the sinusoidal relative-position table is
#: computed from the config (transformers 4.57.6 keeps it as a non-persistent buffer), and
#: ``position_ids`` is a legacy BERT buffer (Nezha has no absolute positions).
# --- functional relative positions (transformers' ``NezhaRelativePositionsEncoding``) ----------------


def relative_position_table(max_relative_position: int, depth: int, xp: ModuleType = np) -> Any:
    """The fixed sinusoid table over the shifted relative distances ``p = 0 .. 2K``: (2K + 1, depth) float32.

    ``table[p, 0::2] = sin(p * w)``, ``table[p, 1::2] = cos(p * w)`` (interleaved columns; an odd
    ``depth`` has one cos column fewer), ``w = exp(arange(0, depth, 2) * -ln(10000) / depth)``, computed
    in float32 in transformers' order.  Row ``p`` encodes the clipped distance ``p - K``: query ``i``
    and key ``j`` use row :func:`~nezha_zoo.spec.positions.relative_position_index` ``= clip(j - i, -K,
    K) + K``.  Not a parameter: it depends on the config only, so the checkpoint holds none.

    Args:
        max_relative_position (int): ``K``, the clipping distance.
        depth (int): the attention head size.
        xp (module): the array library computing it, ``numpy`` (default) or ``torch`` (whose float32
            ``exp``/``sin``/``cos`` round differently in the last bit; PyTorch builds it with torch, as
            transformers does, so its table is bit-identical to transformers').
    """
    rows = 2 * max_relative_position + 1
    position = xp.arange(rows, dtype=xp.float32)[:, None]  # (2K + 1, 1)
    # float32 array times a Python float stays float32 in numpy and torch alike
    div = xp.exp(xp.arange(0, depth, 2, dtype=xp.float32) * (-math.log(10000.0) / depth))  # (ceil(d/2),)
    angles = position * div  # (2K + 1, ceil(d/2))
    table = xp.zeros((rows, depth), dtype=xp.float32)
    table[:, 0::2] = xp.sin(angles)
    table[:, 1::2] = xp.cos(angles)[:, : depth // 2]
    return table


_LEGACY = ("encoder.layer.*.self.relative_positions_encoding.positions_encoding", "embeddings.position_ids")


def _base(c: NezhaConfig, with_pooler: bool) -> list[Param]:
    H = c.hidden_size
    ps = embedding("embeddings.word_embeddings", c.vocab_size, H, "vocab", padding_idx=c.pad_token_id)
    ps += embedding("embeddings.token_type_embeddings", c.type_vocab_size, H, "token_type")
    ps += layer_norm("embeddings.LayerNorm", H)
    ps += bert_encoder("encoder", c.num_hidden_layers, H, c.intermediate_size, cross_attention=c.add_cross_attention)
    if with_pooler:
        ps += pooler("", H)
    return ps


def _mlm_head(c: NezhaConfig, ties: dict[str, str]) -> list[Param]:
    """``cls.predictions``: transform (dense, LayerNorm), decoder tied to the word embeddings, bias."""
    H = c.hidden_size
    ps = dense("cls.predictions.transform.dense", H, H, "hidden", "hidden")
    ps += layer_norm("cls.predictions.transform.LayerNorm", H)
    ps.append(Param("cls.predictions.bias", (c.vocab_size,), ("vocab",), Kind.BIAS))
    if c.tie_word_embeddings:
        ties["cls.predictions.decoder.weight"] = "nezha.embeddings.word_embeddings.weight"
    else:
        ps += dense("cls.predictions.decoder", H, c.vocab_size, "hidden", "vocab", bias=False)
    # transformers makes decoder.bias the very Parameter cls.predictions.bias (save_pretrained keeps
    # only cls.predictions.bias).
    ties["cls.predictions.decoder.bias"] = "cls.predictions.bias"
    return ps


def nezha_spec(c: NezhaConfig, head: str = "Model") -> ModelSpec:
    """All parameters of ``Nezha<head>`` for config ``c`` (transformers 4.57.6 state-dict names)."""
    if head not in HEADS:
        raise ValueError(f"Nezha has no head {head!r}; heads: {list(HEADS)}")
    H = c.hidden_size
    base = _base(c, head in HEADS_WITH_POOLER)
    if head == "Model":
        return ModelSpec("nezha", head, "", tuple(base), ignored=_LEGACY)
    ps = prefixed("nezha", base)
    ties: dict[str, str] = {}
    if head in ("ForPreTraining", "ForMaskedLM"):
        ps += _mlm_head(c, ties)
    if head in ("ForPreTraining", "ForNextSentencePrediction"):
        ps += dense("cls.seq_relationship", H, 2, "hidden", "classes")
    elif head in ("ForSequenceClassification", "ForTokenClassification"):
        ps += dense("classifier", H, c.num_labels, "hidden", "classes")
    elif head == "ForMultipleChoice":
        ps += dense("classifier", H, 1, "hidden", "classes")
    elif head == "ForQuestionAnswering":
        ps += dense("qa_outputs", H, c.num_labels, "hidden", "classes")
    return ModelSpec("nezha", head, "nezha", tuple(ps), ties, ignored=tuple(f"nezha.{k}" for k in _LEGACY))


NEZHA = register_family(
    Family(
        key="nezha",
        model_type="nezha",
        class_prefix="Nezha",
        config_class=NezhaConfig,
        base_prefix="nezha",
        heads=HEADS,
        spec=nezha_spec,
        tokenizer_class="BertTokenizer",
    )
)
