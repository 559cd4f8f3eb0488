"""Nezha: config (the parameter spec is declared later).

Architecture (transformers 4.57.6 ``models/deprecated/nezha/modeling_nezha.py``): a BERT post-LN
encoder whose embeddings have word and token-type tables only -- no absolute position table, so no
``position_ids`` input.  Every self-attention layer adds a fixed sinusoidal encoding of the relative
distance between query and key positions, clipped to ``+-max_relative_position``, to both the
attention scores and the attended values.  Head classes hold the base model under ``nezha``.
"""

from __future__ import annotations

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
from nezha_zoo.spec.registry import Family, register_family

__all__ = ["NezhaConfig", "NEZHA"]

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

    def check(self) -> None:
        check_divisible(self, "hidden_size", "num_attention_heads")
        check_index(self, "pad_token_id", "vocab_size")


NEZHA = register_family(
    Family(
        key="nezha",
        model_type="nezha",
        class_prefix="Nezha",
        config_class=NezhaConfig,
        base_prefix="nezha",
        heads=HEADS,
        spec=None,
    )
)
