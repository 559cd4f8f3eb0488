"""I-BERT: config (the parameter spec is declared later).

Architecture (transformers 4.57.6 ``models/ibert/modeling_ibert.py``): RoBERTa (post-LN, padding-
aware position ids, head classes hold the base model under ``ibert``) whose embeddings, linear
layers, GELU, softmax and LayerNorm have integer-only approximations switched on by ``quant_mode``;
with ``quant_mode=False`` the model computes in float.  ``force_dequant`` keeps selected
non-linearities in float even in quant mode.

Where this config is stricter than transformers' own: transformers accepts any ``hidden_act`` and
``position_embedding_type`` in ``IBertConfig`` but raises when a model is built from a value other
than ``"gelu"`` / ``"absolute"``.  A config that cannot build any model is of no use, so
``IBertConfig`` raises ``ValueError`` naming the field at construction (and so on ``from_pretrained``
of such a ``config.json``) instead of deferring the error to the model.
"""

from __future__ import annotations

from nezha_zoo.config import (
    Field,
    PretrainedConfig,
    boolean,
    check_divisible,
    check_index,
    one_of,
    optional_int,
    positive_float,
    positive_int,
    probability,
)
from nezha_zoo.spec.registry import Family, register_family

__all__ = ["IBertConfig", "IBERT", "FORCE_DEQUANT"]

HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)

#: Values of ``force_dequant``: which non-linearities stay in float when ``quant_mode`` is on.
FORCE_DEQUANT = ("none", "gelu", "softmax", "layernorm", "nonlinear")


class IBertConfig(PretrainedConfig):
    """Configuration of an I-BERT model (defaults close to ``kssteven/ibert-roberta-base``).

    Args:
        vocab_size (int): token vocabulary size.
        hidden_size (int): width of the encoder and the pooler.
        num_hidden_layers (int): encoder layers.
        num_attention_heads (int): attention heads per layer; must divide ``hidden_size``.
        intermediate_size (int): feed-forward inner width.
        hidden_act (str): must be ``"gelu"`` (the only activation with an integer kernel).
        hidden_dropout_prob (float): dropout on embeddings, residual branches and the pooler.
        attention_probs_dropout_prob (float): dropout on attention probabilities.
        max_position_embeddings (int): rows of the absolute position table.
        type_vocab_size (int): rows of the token-type table.
        initializer_range (float): std of the normal initialiser.
        layer_norm_eps (float): LayerNorm epsilon (the published checkpoints use 1e-5).
        pad_token_id (int): padding token id; also the padding row of the position table.
        bos_token_id (int | None): beginning-of-sequence token id.
        eos_token_id (int | None): end-of-sequence token id.
        position_embedding_type (str): must be ``"absolute"``.
        quant_mode (bool): run the integer-only approximations (True) or plain float (False).
        force_dequant (str): one of ``"none"``, ``"gelu"``, ``"softmax"``, ``"layernorm"``,
            ``"nonlinear"`` (all three); the named non-linearities run in float in quant mode.
        **kwargs: the common fields (``num_labels``, ``id2label``...); any other key is kept and
            written back to ``config.json``.

    Raises:
        ValueError: naming the field, for any invalid value, including ``hidden_act`` other than
            ``"gelu"`` and ``position_embedding_type`` other than ``"absolute"`` (see the module
            docstring).
    """

    model_type = "ibert"
    fields = (
        Field("vocab_size", 30522, positive_int),
        Field("hidden_size", 768, positive_int),
        Field("num_hidden_layers", 12, positive_int),
        Field("num_attention_heads", 12, positive_int),
        Field("intermediate_size", 3072, positive_int),
        Field("hidden_act", "gelu", one_of("gelu")),
        Field("hidden_dropout_prob", 0.1, probability),
        Field("attention_probs_dropout_prob", 0.1, probability),
        Field("max_position_embeddings", 512, positive_int),
        Field("type_vocab_size", 2, positive_int),
        Field("initializer_range", 0.02, positive_float),
        Field("layer_norm_eps", 1e-12, positive_float),
        Field("pad_token_id", 1, optional_int),
        Field("bos_token_id", 0, optional_int),
        Field("eos_token_id", 2, optional_int),
        Field("position_embedding_type", "absolute", one_of("absolute")),
        Field("quant_mode", False, boolean),
        Field("force_dequant", "none", one_of(*FORCE_DEQUANT)),
    )

    def check(self) -> None:
        check_divisible(self, "hidden_size", "num_attention_heads")
        check_index(self, "pad_token_id", "vocab_size", required=True)
        check_index(self, "pad_token_id", "max_position_embeddings", required=True)


IBERT = register_family(
    Family(
        key="ibert",
        model_type="ibert",
        class_prefix="IBert",
        config_class=IBertConfig,
        base_prefix="ibert",
        heads=HEADS,
        spec=None,
    )
)
