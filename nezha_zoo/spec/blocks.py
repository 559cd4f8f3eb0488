"""Parameter builders for the blocks families share.

Each builder returns the params of one block under a dotted prefix, with the names of transformers'
PyTorch modules.  Families compose them and declare only their differences (names, pre-/post-norm,
extra tables).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nezha_zoo.spec.param import Kind, ModelSpec, Param, prefixed

__all__ = [
    "dense",
    "layer_norm",
    "embedding",
    "BertLayerNames",
    "bert_attention",
    "bert_layer",
    "cross_attention_names",
    "bert_encoder",
    "pooler",
    "XLM_ROBERTA_XL_NAMES",
    "MPNET_NAMES",
    "roberta_lm_head",
    "classification_head",
    "roberta_family_spec",
]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def dense(name: str, in_dim: int, out_dim: int, in_axis: str, out_axis: str, bias: bool = True) -> list[Param]:
    """A linear layer: ``weight`` (out, in) and optional ``bias`` (out,)."""
    ps = [Param(f"{name}.weight", (out_dim, in_dim), (out_axis, in_axis), Kind.DENSE)]
    if bias:
        ps.append(Param(f"{name}.bias", (out_dim,), (out_axis,), Kind.BIAS))
    return ps


def layer_norm(name: str, dim: int, axis: str = "hidden", bias: bool = True) -> list[Param]:
    ps = [Param(f"{name}.weight", (dim,), (axis,), Kind.NORM_SCALE)]
    if bias:
        ps.append(Param(f"{name}.bias", (dim,), (axis,), Kind.NORM_BIAS))
    return ps


def embedding(name: str, rows: int, dim: int, row_axis: str, dim_axis: str = "embed", padding_idx=None) -> list[Param]:
    return [Param(f"{name}.weight", (rows, dim), (row_axis, dim_axis), Kind.EMBEDDING, padding_idx=padding_idx)]


@dataclass(frozen=True)
class BertLayerNames:
    """Module names of a BERT-style layer; families that rename them declare their own."""

    self_attn: str = "attention.self"
    query: str = "query"
    key: str = "key"
    value: str = "value"
    attn_out: str = "attention.output.dense"
    attn_norm: str | None = "attention.output.LayerNorm"  # post-LN after attention
    pre_attn_norm: str | None = None  # pre-LN before attention (XLM-R-XL)
    cross: str = "crossattention"
    intermediate: str = "intermediate.dense"
    output: str = "output.dense"
    out_norm: str | None = "output.LayerNorm"  # post-LN after the FFN
    pre_ffn_norm: str | None = None  # pre-LN before the FFN (XLM-R-XL)
    output_dropout: bool = True  # dropout on the FFN output before its residual add (not XLM-R-XL)


#: XLM-RoBERTa-XL: pre-LN.  ``attention.self_attn_layer_norm`` before self-attention (and
#: ``crossattention.self_attn_layer_norm`` before cross-attention), the layer's own ``LayerNorm`` before
#: the feed-forward, no norm after either residual add, and no dropout on the feed-forward's output
#: (transformers' ``XLMRobertaXLOutput`` is ``dense`` + residual; its attention output keeps its dropout).
XLM_ROBERTA_XL_NAMES = BertLayerNames(
    attn_norm=None,
    pre_attn_norm="attention.self_attn_layer_norm",
    out_norm=None,
    pre_ffn_norm="LayerNorm",
    output_dropout=False,
)

#: MPNet: projections ``q``/``k``/``v`` and the output projection ``o`` all inside ``attention.attn``;
#: the post-attention norm is ``attention.LayerNorm``.  (MPNet has no decoder, so no cross-attention.)
MPNET_NAMES = BertLayerNames(
    self_attn="attention.attn",
    query="q",
    key="k",
    value="v",
    attn_out="attention.attn.o",
    attn_norm="attention.LayerNorm",
)


def bert_attention(prefix: str, hidden: int, names: BertLayerNames, kv_hidden: int | None = None) -> list[Param]:
    """Self- (or cross-) attention: q/k/v projections, output projection, its norm."""
    kv_in = hidden if kv_hidden is None else kv_hidden
    att = _join(prefix, names.self_attn)
    ps: list[Param] = []
    ps += dense(f"{att}.{names.query}", hidden, hidden, "hidden", "kv")
    ps += dense(f"{att}.{names.key}", kv_in, hidden, "hidden", "kv")
    ps += dense(f"{att}.{names.value}", kv_in, hidden, "hidden", "kv")
    ps += dense(_join(prefix, names.attn_out), hidden, hidden, "kv", "hidden")
    if names.attn_norm:
        ps += layer_norm(_join(prefix, names.attn_norm), hidden)
    return ps


def bert_layer(
    prefix: str,
    hidden: int,
    intermediate: int,
    names: BertLayerNames = BertLayerNames(),
    cross_attention: bool = False,
) -> list[Param]:
    """One encoder layer (self-attention, optional cross-attention, feed-forward)."""
    ps: list[Param] = []
    if names.pre_attn_norm:
        ps += layer_norm(_join(prefix, names.pre_attn_norm), hidden)
    ps += bert_attention(prefix, hidden, names)
    if cross_attention:
        cross = cross_attention_names(names)
        if cross.pre_attn_norm:
            ps += layer_norm(_join(prefix, cross.pre_attn_norm), hidden)
        ps += bert_attention(prefix, hidden, cross)
    if names.pre_ffn_norm:
        ps += layer_norm(_join(prefix, names.pre_ffn_norm), hidden)
    ps += dense(_join(prefix, names.intermediate), hidden, intermediate, "hidden", "mlp")
    ps += dense(_join(prefix, names.output), intermediate, hidden, "mlp", "hidden")
    if names.out_norm:
        ps += layer_norm(_join(prefix, names.out_norm), hidden)
    return ps


def cross_attention_names(names: BertLayerNames) -> BertLayerNames:
    """The names of a layer's cross-attention block: the attention block's names re-rooted at ``names.cross``.

    Every path under the self-attention block's first component (``attention.self`` ->
    ``crossattention.self``, ``attention.output.dense`` -> ``crossattention.output.dense``, XLM-R-XL's
    ``attention.self_attn_layer_norm`` -> ``crossattention.self_attn_layer_norm``) moves to the
    ``crossattention`` module, as transformers' decoder layers name it; projection names stay.
    """
    root = names.self_attn.split(".", 1)[0]  # "attention"

    def reroot(path: str | None) -> str | None:
        if path is None:
            return None
        first, dot, rest = path.partition(".")
        return names.cross + dot + rest if first == root else path

    return replace(
        names,
        self_attn=reroot(names.self_attn),
        attn_out=reroot(names.attn_out),
        attn_norm=reroot(names.attn_norm),
        pre_attn_norm=reroot(names.pre_attn_norm),
    )


def bert_encoder(
    prefix: str,
    num_layers: int,
    hidden: int,
    intermediate: int,
    names: BertLayerNames = BertLayerNames(),
    cross_attention: bool = False,
) -> list[Param]:
    ps: list[Param] = []
    for i in range(num_layers):
        ps += bert_layer(_join(prefix, f"layer.{i}"), hidden, intermediate, names, cross_attention)
    return ps


def pooler(prefix: str, hidden: int) -> list[Param]:
    return dense(_join(prefix, "pooler.dense"), hidden, hidden, "hidden", "hidden")


def roberta_lm_head(prefix: str, hidden: int, vocab: int) -> list[Param]:
    """RoBERTa-style masked-LM head: ``dense``, ``layer_norm`` and the output ``bias``.

    The ``decoder`` projection is not declared here: its weight is the word-embedding table and its
    bias is ``<prefix>.bias`` (transformers ties ``decoder.bias`` to it); families declare both as
    ties, or the weight as its own param when the embeddings are untied.
    """
    ps = dense(_join(prefix, "dense"), hidden, hidden, "hidden", "hidden")
    ps += layer_norm(_join(prefix, "layer_norm"), hidden)
    ps.append(Param(_join(prefix, "bias"), (vocab,), ("vocab",), Kind.BIAS))
    return ps


def classification_head(prefix: str, hidden: int, num_labels: int) -> list[Param]:
    """RoBERTa-style sentence classifier: ``dense`` (hidden -> hidden) then ``out_proj`` (-> labels)."""
    ps = dense(_join(prefix, "dense"), hidden, hidden, "hidden", "hidden")
    ps += dense(_join(prefix, "out_proj"), hidden, num_labels, "hidden", "classes")
    return ps


def roberta_family_spec(
    family: str, prefix: str, config, head: str, heads: tuple[str, ...], base: list[Param]
) -> ModelSpec:
    """The spec of a RoBERTa-style family's class (XLM-RoBERTa-XL, I-BERT, MPNet).

    Args:
        family: family key for messages.
        prefix: base-model attribute of head classes (``"roberta"``, ``"ibert"``, ``"mpnet"``).
        config: the family config (``hidden_size``, ``vocab_size``, ``num_labels``, ``tie_word_embeddings``).
        head: head name.
        heads: the family's heads, to reject unknown ones.
        base: the base model's params (no prefix) for this head (pooler included or not).

    The heads: ``lm_head`` (masked/causal LM; ``decoder.weight`` tied to the word embeddings unless
    untied, ``decoder.bias`` tied to ``lm_head.bias``), ``classifier`` (dense + out_proj) for
    sequence classification, ``classifier`` (H -> 1) for multiple choice, ``classifier`` for tokens,
    ``qa_outputs`` for question answering.
    """
    if head not in heads:
        raise ValueError(f"{family} has no head {head!r}; heads: {list(heads)}")
    legacy = ("embeddings.position_ids",)
    if head == "Model":
        return ModelSpec(family, head, "", tuple(base), ignored=legacy)
    H = config.hidden_size
    ps = prefixed(prefix, base)
    ties: dict[str, str] = {}
    if head in ("ForMaskedLM", "ForCausalLM"):
        ps += roberta_lm_head("lm_head", H, config.vocab_size)
        if config.tie_word_embeddings:
            ties["lm_head.decoder.weight"] = f"{prefix}.embeddings.word_embeddings.weight"
        else:
            ps += dense("lm_head.decoder", H, config.vocab_size, "hidden", "vocab", bias=False)
        ties["lm_head.decoder.bias"] = "lm_head.bias"  # the very same Parameter in transformers
    elif head == "ForSequenceClassification":
        ps += classification_head("classifier", H, config.num_labels)
    elif head == "ForMultipleChoice":
        ps += dense("classifier", H, 1, "hidden", "classes")
    elif head == "ForTokenClassification":
        ps += dense("classifier", H, config.num_labels, "hidden", "classes")
    elif head == "ForQuestionAnswering":
        ps += dense("qa_outputs", H, config.num_labels, "hidden", "classes")
    return ModelSpec(family, head, prefix, tuple(ps), ties, ignored=tuple(f"{prefix}.{k}" for k in legacy))
