"""XLM-RoBERTa-XL: config and parameter spec.

Architecture (transformers 4.57.6 ``models/xlm_roberta_xl/modeling_xlm_roberta_xl.py``): RoBERTa
with pre-LayerNorm blocks -- ``attention.self_attn_layer_norm`` before self-attention and the layer's
``LayerNorm`` before the feed-forward -- no LayerNorm in the embeddings and a final
``encoder.LayerNorm``.  Position ids are padding-aware (pads keep ``pad_token_id``, tokens count from
``pad_token_id + 1``), so the longest input is ``max_position_embeddings - pad_token_id - 1``.  Head
classes hold the base model under ``roberta``.
"""

from __future__ import annotations

from nezha_zoo.config import (
    Field,
    PretrainedConfig,
    activation,
    boolean,
    check_divisible,
    check_index,
    one_of,
    optional_int,
    optional_probability,
    positive_float,
    positive_int,
    probability,
)
from nezha_zoo.spec.blocks import (
    XLM_ROBERTA_XL_NAMES,
    bert_encoder,
    embedding,
    layer_norm,
    pooler,
    roberta_family_spec,
)
from nezha_zoo.spec.param import ModelSpec, Param
from nezha_zoo.spec.registry import Family, register_family

__all__ = [
    "XLMRobertaXLConfig",
    "xlm_roberta_xl_spec",
    "XLM_ROBERTA_XL",
    "POSITION_EMBEDDING_TYPES",
    "HEADS_WITH_POOLER",
]

HEADS = (
    "Model",
    "ForCausalLM",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)

#: Position encodings every backend implements.  transformers also documents ``"relative_key"`` and
#: ``"relative_key_query"``; none of the published checkpoints uses them, and a config asking for
#: them is refused here (rather than building a model that silently ignores the setting).
POSITION_EMBEDDING_TYPES = ("absolute",)


class XLMRobertaXLConfig(PretrainedConfig):
    """Configuration of an XLM-RoBERTa-XL model (defaults: ``facebook/xlm-roberta-xl``).

    Args:
        vocab_size (int): token vocabulary size.
        hidden_size (int): width of the encoder and the pooler.
        num_hidden_layers (int): encoder layers.
        num_attention_heads (int): attention heads per layer; must divide ``hidden_size``.
        intermediate_size (int): feed-forward inner width.
        hidden_act (str): encoder activation (``"gelu"`` is exact erf GELU).
        hidden_dropout_prob (float): dropout on embeddings, residual branches and the pooler.
        attention_probs_dropout_prob (float): dropout on attention probabilities.
        max_position_embeddings (int): rows of the absolute position table.
        type_vocab_size (int): rows of the token-type table.
        initializer_range (float): std of the normal initialiser.
        layer_norm_eps (float): LayerNorm epsilon.
        pad_token_id (int): padding token id; also the padding row of the position table, so it
            must index both the vocabulary and the position table.
        bos_token_id (int | None): beginning-of-sequence token id.
        eos_token_id (int | None): end-of-sequence token id.
        position_embedding_type (str): only ``"absolute"`` (see ``POSITION_EMBEDDING_TYPES``).
        use_cache (bool): return key/value caches in decoder mode by default.
        classifier_dropout (float | None): dropout of classification heads (``hidden_dropout_prob``
            when None).
        **kwargs: the common fields (``is_decoder``, ``add_cross_attention``, ``num_labels``,
            ``id2label``...); any other key is kept and written back to ``config.json``.

    Raises:
        ValueError: naming the field, for any invalid value.
    """

    model_type = "xlm-roberta-xl"
    fields = (
        Field("vocab_size", 250880, positive_int),
        Field("hidden_size", 2560, positive_int),
        Field("num_hidden_layers", 36, positive_int),
        Field("num_attention_heads", 32, positive_int),
        Field("intermediate_size", 10240, positive_int),
        Field("hidden_act", "gelu", activation),
        Field("hidden_dropout_prob", 0.1, probability),
        Field("attention_probs_dropout_prob", 0.1, probability),
        Field("max_position_embeddings", 514, positive_int),
        Field("type_vocab_size", 1, positive_int),
        Field("initializer_range", 0.02, positive_float),
        Field("layer_norm_eps", 1e-05, positive_float),
        Field("pad_token_id", 1, optional_int),
        Field("bos_token_id", 0, optional_int),
        Field("eos_token_id", 2, optional_int),
        Field("position_embedding_type", "absolute", one_of(*POSITION_EMBEDDING_TYPES)),
        Field("use_cache", True, boolean),
        Field("classifier_dropout", None, optional_probability),
    )

    @property
    def max_input_length(self) -> int | None:
        """RoBERTa positions ``pad_token_id + 1 .. max_position_embeddings - 1``."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def check(self) -> None:
        check_divisible(self, "hidden_size", "num_attention_heads")
        # Padding-aware position ids need a pad id inside both tables.
        check_index(self, "pad_token_id", "vocab_size", required=True)
        check_index(self, "pad_token_id", "max_position_embeddings", required=True)


#: Heads whose base model has the pooler; the others build ``XLMRobertaXLModel(add_pooling_layer=False)``.
HEADS_WITH_POOLER = ("Model", "ForMultipleChoice")


def _base(c: XLMRobertaXLConfig, with_pooler: bool) -> list[Param]:
    H = c.hidden_size
    ps = embedding("embeddings.word_embeddings", c.vocab_size, H, "vocab", padding_idx=c.pad_token_id)
    ps += embedding(
        "embeddings.position_embeddings", c.max_position_embeddings, H, "position", padding_idx=c.pad_token_id
    )
    ps += embedding("embeddings.token_type_embeddings", c.type_vocab_size, H, "token_type")
    # No embedding LayerNorm: pre-LN layers, then the final encoder.LayerNorm.
    ps += bert_encoder(
        "encoder", c.num_hidden_layers, H, c.intermediate_size, XLM_ROBERTA_XL_NAMES, c.add_cross_attention
    )
    ps += layer_norm("encoder.LayerNorm", H)
    if with_pooler:
        ps += pooler("", H)
    return ps


def xlm_roberta_xl_spec(c: XLMRobertaXLConfig, head: str = "Model") -> ModelSpec:
    """All parameters of ``XLMRobertaXL<head>`` for config ``c`` (transformers 4.57.6 state-dict names)."""
    return roberta_family_spec("xlm_roberta_xl", "roberta", c, head, HEADS, _base(c, head in HEADS_WITH_POOLER))


XLM_ROBERTA_XL = register_family(
    Family(
        key="xlm_roberta_xl",
        model_type="xlm-roberta-xl",
        class_prefix="XLMRobertaXL",
        config_class=XLMRobertaXLConfig,
        base_prefix="roberta",
        heads=HEADS,
        spec=xlm_roberta_xl_spec,
        tokenizer_class="XLMRobertaTokenizer",
    )
)
