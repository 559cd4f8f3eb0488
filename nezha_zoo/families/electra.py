"""Electra: config and parameter spec.

Architecture (transformers 4.57.6 ``modeling_electra.py``): BERT post-LN encoder over embeddings of
width ``embedding_size`` (projected to ``hidden_size`` by ``embeddings_project`` when they differ),
absolute positions ``arange(past, past + L)``, no pooler.  The generator head's activation is always
exact GELU (transformers' Flax port uses ``hidden_act`` there: a bug not copied).
"""

from __future__ import annotations

from nezha_zoo.config import (
    Field,
    PretrainedConfig,
    activation,
    boolean,
    one_of,
    optional_int,
    optional_probability,
    positive_float,
    positive_int,
    probability,
)
from nezha_zoo.spec.blocks import bert_encoder, dense, embedding, layer_norm
from nezha_zoo.spec.param import Kind, ModelSpec, Param, prefixed
from nezha_zoo.spec.registry import Family, register_family

__all__ = ["ElectraConfig", "electra_spec", "ELECTRA"]

HEADS = (
    "Model",
    "ForPreTraining",
    "ForMaskedLM",
    "ForCausalLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)


class ElectraConfig(PretrainedConfig):
    """Configuration of an Electra model (defaults: ``google/electra-small-discriminator``).

    Args:
        vocab_size (int): token vocabulary size.
        embedding_size (int): width of the embeddings; projected to ``hidden_size`` when different.
        hidden_size (int): width of the encoder.
        num_hidden_layers (int): encoder layers.
        num_attention_heads (int): attention heads; must divide ``hidden_size``.
        intermediate_size (int): feed-forward inner width.
        hidden_act (str): encoder activation (``"gelu"`` is exact erf GELU).
        hidden_dropout_prob (float): dropout on embeddings and residual branches.
        attention_probs_dropout_prob (float): dropout on attention probabilities.
        max_position_embeddings (int): rows of the absolute position table (longest input).
        type_vocab_size (int): rows of the token-type table.
        initializer_range (float): std of the normal initialiser.
        layer_norm_eps (float): LayerNorm epsilon.
        summary_type (str): how ``ForMultipleChoice`` summarises a sequence: ``first``, ``last``,
            ``mean`` or ``cls_index``.
        summary_use_proj (bool): add a dense projection in the summary.
        summary_activation (str | None): activation after the summary projection.
        summary_last_dropout (float): dropout after the summary activation.
        pad_token_id (int): padding token id.
        position_embedding_type (str): only ``"absolute"`` is supported in all three backends.
        use_cache (bool): return key/value caches in decoder mode by default.
        classifier_dropout (float | None): dropout of classification heads (``hidden_dropout_prob``
            when None).
    """

    model_type = "electra"
    fields = (
        Field("vocab_size", 30522, positive_int),
        Field("embedding_size", 128, positive_int),
        Field("hidden_size", 256, positive_int),
        Field("num_hidden_layers", 12, positive_int),
        Field("num_attention_heads", 4, positive_int),
        Field("intermediate_size", 1024, positive_int),
        Field("hidden_act", "gelu", activation),
        Field("hidden_dropout_prob", 0.1, probability),
        Field("attention_probs_dropout_prob", 0.1, probability),
        Field("max_position_embeddings", 512, positive_int),
        Field("type_vocab_size", 2, positive_int),
        Field("initializer_range", 0.02, positive_float),
        Field("layer_norm_eps", 1e-12, positive_float),
        Field("summary_type", "first", one_of("first", "last", "mean", "cls_index")),
        Field("summary_use_proj", True, boolean),
        Field("summary_activation", "gelu", lambda v: None if v is None else activation(v)),
        Field("summary_last_dropout", 0.1, probability),
        Field("pad_token_id", 0, optional_int),
        Field("position_embedding_type", "absolute", one_of("absolute")),
        Field("use_cache", True, boolean),
        Field("classifier_dropout", None, optional_probability),
    )

    def check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ElectraConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"ElectraConfig.pad_token_id {self.pad_token_id} is outside the vocabulary")
        for name in ("summary_proj_to_labels",):
            err = boolean(getattr(self, name, False))
            if err:
                raise ValueError(f"ElectraConfig.{name} {err}")
        err = probability(getattr(self, "summary_first_dropout", 0.0))
        if err:
            raise ValueError(f"ElectraConfig.summary_first_dropout {err}")


def summary_width(c: ElectraConfig) -> int:
    """Output width of ``sequence_summary.summary`` (transformers' SequenceSummary rule)."""
    if getattr(c, "summary_proj_to_labels", False) and c.num_labels > 0:
        return c.num_labels
    return c.hidden_size


def _base(c: ElectraConfig) -> list[Param]:
    E, H = c.embedding_size, c.hidden_size
    ps = embedding("embeddings.word_embeddings", c.vocab_size, E, "vocab", padding_idx=c.pad_token_id)
    ps += embedding("embeddings.position_embeddings", c.max_position_embeddings, E, "position")
    ps += embedding("embeddings.token_type_embeddings", c.type_vocab_size, E, "token_type")
    ps += layer_norm("embeddings.LayerNorm", E, "embed")
    if E != H:
        ps += dense("embeddings_project", E, H, "embed", "hidden")
    ps += bert_encoder("encoder", c.num_hidden_layers, H, c.intermediate_size, cross_attention=c.add_cross_attention)
    return ps


def _generator(c: ElectraConfig) -> list[Param]:
    E, H = c.embedding_size, c.hidden_size
    ps = dense("generator_predictions.dense", H, E, "hidden", "embed")
    ps += layer_norm("generator_predictions.LayerNorm", E, "embed")
    # The weight is tied to the word embeddings (stored once); only the bias is the head's own.
    ps.append(Param("generator_lm_head.bias", (c.vocab_size,), ("vocab",), Kind.BIAS))
    return ps


def electra_spec(c: ElectraConfig, head: str = "Model") -> ModelSpec:
    """All parameters of ``Electra<head>`` for config ``c``."""
    H = c.hidden_size
    if head == "Model":
        return ModelSpec("electra", head, "", tuple(_base(c)), ignored=("embeddings.position_ids",))
    ps = prefixed("electra", _base(c))
    ties: dict[str, str] = {}
    if head == "ForPreTraining":
        ps += dense("discriminator_predictions.dense", H, H, "hidden", "hidden")
        ps += dense("discriminator_predictions.dense_prediction", H, 1, "hidden", "classes")
    elif head in ("ForMaskedLM", "ForCausalLM"):
        if not c.tie_word_embeddings:
            # Every published Electra generator ties its output projection to the embeddings, and the
            # backends compute logits through the embedding table; refuse rather than ignore an
            # untied checkpoint's own projection.
            raise ValueError(
                f"ElectraConfig.tie_word_embeddings=False is not supported by Electra{head}: "
                "generator_lm_head.weight is the word-embedding matrix"
            )
        ps += _generator(c)
        ties["generator_lm_head.weight"] = "electra.embeddings.word_embeddings.weight"
    elif head == "ForSequenceClassification":
        ps += dense("classifier.dense", H, H, "hidden", "hidden")
        ps += dense("classifier.out_proj", H, c.num_labels, "hidden", "classes")
    elif head == "ForMultipleChoice":
        if c.summary_use_proj:
            ps += dense("sequence_summary.summary", H, summary_width(c), "hidden", "hidden")
        ps += dense("classifier", H, 1, "hidden", "classes")
    elif head == "ForTokenClassification":
        ps += dense("classifier", H, c.num_labels, "hidden", "classes")
    elif head == "ForQuestionAnswering":
        if c.num_labels != 2:
            # qa_outputs' two columns are the start and end logits.
            raise ValueError(f"ElectraForQuestionAnswering needs num_labels=2 (start, end), got {c.num_labels}")
        ps += dense("qa_outputs", H, c.num_labels, "hidden", "classes")
    else:
        raise ValueError(f"Electra has no head {head!r}; heads: {list(HEADS)}")
    return ModelSpec("electra", head, "electra", tuple(ps), ties, ignored=("electra.embeddings.position_ids",))


ELECTRA = register_family(
    Family(
        key="electra",
        model_type="electra",
        class_prefix="Electra",
        config_class=ElectraConfig,
        base_prefix="electra",
        heads=HEADS,
        spec=electra_spec,
        tokenizer_class="ElectraTokenizer",
    )
)
