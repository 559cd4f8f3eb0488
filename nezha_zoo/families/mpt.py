"""MPT: config with its nested attention config, and the parameter spec.

Architecture (transformers 4.57.6 ``models/mpt/modeling_mpt.py``): a decoder-only pre-LN transformer
with no position embeddings (ALiBi biases instead), bias-free linear layers, weight-only LayerNorms
and a final ``norm_f``.  Head classes hold the base model under ``transformer``.

transformers' modelling code reads only some of these fields: the MLP is always ``4 * d_model`` wide
whatever ``expansion_ratio`` says, linear layers never have a bias whatever ``no_bias`` says, and of
``attn_config`` only ``attn_pdrop``, ``softmax_scale`` and ``clip_qkv`` change the numbers (ALiBi is
always on with a maximum bias of 8).  The other fields are kept, validated and written back so that
``config.json`` files round-trip.  The parameter spec (:func:`mpt_spec`) honours the four that change
which tensors exist, as MosaicML's llm-foundry does: ``no_bias``, ``expansion_ratio``,
``attn_config.attn_type`` (multi-query) and ``attn_config.qk_ln``; at transformers' defaults it is
exactly transformers' state dict.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from nezha_zoo.config import (
    Field,
    PretrainedConfig,
    boolean,
    check_divisible,
    non_negative_int,
    one_of,
    optional_positive_float,
    positive_float,
    positive_int,
    probability,
    string,
)
from nezha_zoo.spec.blocks import dense, embedding, layer_norm
from nezha_zoo.spec.param import ModelSpec, Param, prefixed
from nezha_zoo.spec.pooling import LAST_NON_PAD
from nezha_zoo.spec.registry import Family, register_family

__all__ = ["MptConfig", "MptAttentionConfig", "mpt_spec", "MPT"]

HEADS = (
    "Model",
    "ForCausalLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
)

ATTN_TYPES = ("multihead_attention", "multiquery_attention")
ATTN_IMPLS = ("torch", "flash", "triton")


class MptAttentionConfig:
    """The ``attn_config`` of an :class:`MptConfig`: how MPT's attention is configured.

    In ``config.json`` it is a nested JSON object; :meth:`to_dict` / :meth:`from_dict` convert.
    Keys this class does not know (transformers writes ``"model_type": ""``) are kept in ``extra``
    and written back.

    Args:
        attn_type (str): ``"multihead_attention"`` or ``"multiquery_attention"`` (transformers'
            MPT computes multi-head attention either way; the spec gives multi-query attention
            llm-foundry's ``(d_model + 2 * head_dim, d_model)`` ``Wqkv``).
        attn_pdrop (float): dropout on attention probabilities (transformers' MPT also uses it on the
            residual branches).
        attn_impl (str): ``"torch"``, ``"flash"`` or ``"triton"`` (an llm-foundry setting; the
            computation is the same here).
        clip_qkv (float | None): clamp the fused query/key/value projection to ``+-clip_qkv``.
        softmax_scale (float | None): attention score scale; ``1 / sqrt(head_dim)`` when None.
        prefix_lm (bool): llm-foundry's prefix-LM flag (kept, not used by the computation).
        qk_ln (bool): llm-foundry's query/key LayerNorm flag (not used by transformers; the spec
            declares llm-foundry's ``attn.q_ln`` / ``attn.k_ln``).
        attn_uses_sequence_id (bool): llm-foundry's sequence-id masking flag (kept, not used).
        alibi (bool): whether ALiBi biases are used.
        alibi_bias_max (int): maximum ALiBi bias exponent.
        **kwargs: any other key, kept in ``extra``.

    Raises:
        ValueError: naming the field (``attn_config.<name>``), for any invalid value.
    """

    fields: tuple[Field, ...] = (
        Field("attn_type", "multihead_attention", one_of(*ATTN_TYPES)),
        Field("attn_pdrop", 0, probability),
        Field("attn_impl", "torch", one_of(*ATTN_IMPLS)),
        Field("clip_qkv", None, optional_positive_float),
        Field("softmax_scale", None, optional_positive_float),
        Field("prefix_lm", False, boolean),
        Field("qk_ln", False, boolean),
        Field("attn_uses_sequence_id", False, boolean),
        Field("alibi", True, boolean),
        Field("alibi_bias_max", 8, positive_int),
    )

    def __init__(
        self,
        attn_type: str = "multihead_attention",
        attn_pdrop: float = 0,
        attn_impl: str = "torch",
        clip_qkv: float | None = None,
        softmax_scale: float | None = None,
        prefix_lm: bool = False,
        qk_ln: bool = False,
        attn_uses_sequence_id: bool = False,
        alibi: bool = True,
        alibi_bias_max: int = 8,
        **kwargs: Any,
    ) -> None:
        self.attn_type = attn_type
        self.attn_pdrop = attn_pdrop
        self.attn_impl = attn_impl
        self.clip_qkv = clip_qkv
        self.softmax_scale = softmax_scale
        self.prefix_lm = prefix_lm
        self.qk_ln = qk_ln
        self.attn_uses_sequence_id = attn_uses_sequence_id
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.extra: dict[str, Any] = copy.deepcopy(kwargs)
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first invalid one."""
        for f in self.fields:
            err = f.check(getattr(self, f.name))
            if err:
                raise ValueError(f"MptConfig.attn_config.{f.name} {err}")

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: unknown keys read like attributes.
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"MptAttentionConfig has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready nested dict of ``config.json`` (unknown keys included)."""
        out = copy.deepcopy(self.extra)
        for f in self.fields:
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MptAttentionConfig:
        """Build from the nested ``attn_config`` dict of a ``config.json``.

        Args:
            data (Mapping[str, Any]): the ``attn_config`` object.
        """
        return cls(**dict(data))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MptAttentionConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.fields)
        return f"MptAttentionConfig({inner})"


def _attn_config(v: Any) -> str | None:
    if isinstance(v, MptAttentionConfig):
        return None
    return f"must be an MptAttentionConfig, a dict or None, got {v!r}"


def _logit_scale(v: Any) -> str | None:
    if v is None or v == "inv_sqrt_d_model":
        return None
    err = positive_float(v)
    return None if err is None else f"must be None, a positive number or 'inv_sqrt_d_model', got {v!r}"


def _fraction(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        return f"must be a number in (0, 1], got {v!r}"
    return None


class MptConfig(PretrainedConfig):
    """Configuration of an MPT model (defaults: 24 layers of width 2048, 16 heads).

    ``hidden_size``, ``num_attention_heads`` and ``num_hidden_layers`` are aliases of ``d_model``,
    ``n_heads`` and ``n_layers`` (``attribute_map``), for reading, writing and construction, as in
    transformers; ``config.json`` holds the MPT names.

    Args:
        d_model (int): width of the embeddings and hidden states.
        n_heads (int): attention heads per layer; must divide ``d_model``.
        n_layers (int): decoder layers.
        expansion_ratio (int): llm-foundry's MLP width ratio (transformers always uses 4; the spec
            follows llm-foundry).
        max_seq_len (int): longest input; the ALiBi table is built for this many positions.
        vocab_size (int): token vocabulary size.
        resid_pdrop (float): llm-foundry's residual dropout (transformers uses ``attn_pdrop``).
        layer_norm_epsilon (float): LayerNorm epsilon.
        emb_pdrop (float): llm-foundry's embedding dropout (not used by transformers).
        learned_pos_emb (bool): llm-foundry's learned-position flag (transformers uses ALiBi only).
        attn_config (MptAttentionConfig | dict | None): the attention settings; a dict is converted,
            None gives the defaults.  Written to ``config.json`` as a nested object.
        init_device (str | None): llm-foundry's initialisation device (kept for compatibility).
        logit_scale (float | str | None): llm-foundry's logit scale (kept, not used by transformers).
        no_bias (bool): llm-foundry's flag for bias-free linear layers and LayerNorms (transformers
            never adds biases; the spec follows llm-foundry).
        verbose (int): deprecated logging level (kept).
        embedding_fraction (float): llm-foundry's share of embedding gradients kept, in (0, 1].
        norm_type (str): llm-foundry's LayerNorm flavour (kept).
        use_cache (bool): return key/value caches by default.
        initializer_range (float): std of the normal initialiser.
        **kwargs: the common fields (``num_labels``, ``pad_token_id``, ``id2label``...) and the
            ``attribute_map`` aliases; any other key is kept and written back to ``config.json``.

    Raises:
        ValueError: naming the field, for any invalid value.
    """

    model_type = "mpt"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
    }
    fields = (
        Field("d_model", 2048, positive_int),
        Field("n_heads", 16, positive_int),
        Field("n_layers", 24, positive_int),
        Field("expansion_ratio", 4, positive_int),
        Field("max_seq_len", 2048, positive_int),
        Field("vocab_size", 50368, positive_int),
        Field("resid_pdrop", 0.0, probability),
        Field("layer_norm_epsilon", 1e-05, positive_float),
        Field("emb_pdrop", 0.0, probability),
        Field("learned_pos_emb", True, boolean),
        Field("attn_config", None, _attn_config),
        Field("init_device", "cpu", lambda v: None if v is None else string(v)),
        Field("logit_scale", None, _logit_scale),
        Field("no_bias", True, boolean),
        Field("verbose", 0, non_negative_int),
        Field("embedding_fraction", 1.0, _fraction),
        Field("norm_type", "low_precision_layernorm", string),
        Field("use_cache", False, boolean),
        Field("initializer_range", 0.02, positive_float),
    )

    def __post_init__(self) -> None:
        ac = self.attn_config
        if ac is None:
            self.attn_config = MptAttentionConfig()
        elif isinstance(ac, Mapping):
            self.attn_config = MptAttentionConfig.from_dict(ac)
        elif not isinstance(ac, MptAttentionConfig):
            raise ValueError(f"MptConfig.attn_config must be an MptAttentionConfig, a dict or None, got {ac!r}")

    @property
    def max_input_length(self) -> int | None:
        """Longest input: ``max_seq_len`` (the ALiBi table's size)."""
        return self.max_seq_len

    def check(self) -> None:
        check_divisible(self, "d_model", "n_heads")
        self.attn_config.validate()

    @property
    def head_dim(self) -> int:
        """Width of one attention head (``d_model // n_heads``)."""
        return self.d_model // self.n_heads

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        """The widths of ``attn.Wqkv``'s query, key and value outputs, in that order.

        ``(d_model, kv_width, kv_width)``, ``kv_width`` being ``head_dim`` for multi-query attention
        and ``d_model`` otherwise: the query is the first ``d_model`` output columns (rows of the
        PyTorch weight), which pooled positions project at the kept rows only.
        """
        kv_width = self.head_dim if self.attn_config.attn_type == "multiquery_attention" else self.d_model
        return self.d_model, kv_width, kv_width


def _block(p: str, c: MptConfig) -> list[Param]:
    """One pre-LN block, with llm-foundry's names.

    transformers' MPT is the MosaicML defaults (``no_bias=True``, ``expansion_ratio=4``, multi-head,
    no ``qk_ln``); the other settings give the tensors llm-foundry's ``MPTBlock`` holds:

    - ``no_bias=False``: every linear layer and every LayerNorm of the base model has a ``bias``.
    - ``expansion_ratio``: ``ffn.up_proj`` is ``(expansion_ratio * d_model, d_model)``.
    - ``attn_type="multiquery_attention"``: one key/value head, so ``attn.Wqkv`` is
      ``(d_model + 2 * head_dim, d_model)`` (query, key, value rows in that order).
    - ``qk_ln``: ``attn.q_ln`` over ``d_model`` and ``attn.k_ln`` over the key width (``d_model``, or
      ``head_dim`` for multi-query attention), applied to the query and key after ``Wqkv``.
    """
    d, ac = c.d_model, c.attn_config
    bias = not c.no_bias
    kv_width = c.qkv_widths[1]
    ps = layer_norm(f"{p}.norm_1", d, bias=bias)
    ps += dense(f"{p}.attn.Wqkv", d, d + 2 * kv_width, "hidden", "qkv", bias=bias)
    if ac.qk_ln:
        ps += layer_norm(f"{p}.attn.q_ln", d, "kv", bias=bias)
        ps += layer_norm(f"{p}.attn.k_ln", kv_width, "kv", bias=bias)
    ps += dense(f"{p}.attn.out_proj", d, d, "kv", "hidden", bias=bias)
    ps += layer_norm(f"{p}.norm_2", d, bias=bias)
    ps += dense(f"{p}.ffn.up_proj", d, c.expansion_ratio * d, "hidden", "mlp", bias=bias)
    ps += dense(f"{p}.ffn.down_proj", c.expansion_ratio * d, d, "mlp", "hidden", bias=bias)
    return ps


def _base(c: MptConfig) -> list[Param]:
    # No position table: ALiBi (llm-foundry's learned ``wpe`` exists only with alibi off, which neither
    # transformers nor these backends implement; such a checkpoint reports ``wpe`` as unexpected).
    ps = embedding("wte", c.vocab_size, c.d_model, "vocab")
    for i in range(c.n_layers):
        ps += _block(f"blocks.{i}", c)
    ps += layer_norm("norm_f", c.d_model, bias=not c.no_bias)
    return ps


def mpt_spec(c: MptConfig, head: str = "Model") -> ModelSpec:
    """All parameters of ``Mpt<head>`` for config ``c``.

    At transformers' defaults the names and shapes are transformers 4.57.6's state dict; the MosaicML
    settings transformers ignores are honoured as in llm-foundry (see :func:`_block`).  The heads are
    transformers' and do not depend on ``no_bias``.
    """
    if head not in HEADS:
        raise ValueError(f"MPT has no head {head!r}; heads: {list(HEADS)}")
    d = c.d_model
    if head == "Model":
        return ModelSpec("mpt", head, "", tuple(_base(c)))
    ps = prefixed("transformer", _base(c))
    ties: dict[str, str] = {}
    if head == "ForCausalLM":
        if c.tie_word_embeddings:
            ties["lm_head.weight"] = "transformer.wte.weight"
        else:
            ps += dense("lm_head", d, c.vocab_size, "hidden", "vocab", bias=False)
    elif head == "ForSequenceClassification":
        ps += dense("score", d, c.num_labels, "hidden", "classes", bias=False)
    elif head == "ForTokenClassification":
        ps += dense("classifier", d, c.num_labels, "hidden", "classes")
    elif head == "ForQuestionAnswering":
        # transformers' MptForQuestionAnswering is Linear(d_model, 2) whatever num_labels says.
        ps += dense("qa_outputs", d, 2, "hidden", "classes")
    return ModelSpec("mpt", head, "transformer", tuple(ps), ties)


MPT = register_family(
    Family(
        key="mpt",
        model_type="mpt",
        class_prefix="Mpt",
        config_class=MptConfig,
        base_prefix="transformer",
        heads=HEADS,
        spec=mpt_spec,
        tokenizer_class="GPTNeoXTokenizer",
        pooling=LAST_NON_PAD,  # a causal model: each row's last token has seen the whole row
    )
)
