"""I-BERT: config and parameter spec.

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

import os

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
from nezha_zoo.hardware import cpu_features
from nezha_zoo.spec.blocks import dense, embedding, layer_norm, pooler, roberta_family_spec
from nezha_zoo.spec.param import Kind, ModelSpec, Param
from nezha_zoo.spec.registry import Family, register_family

__all__ = [
    "IBertConfig",
    "ibert_spec",
    "IBERT",
    "FORCE_DEQUANT",
    "HEADS_WITH_POOLER",
    "ACT_RANGE_INIT",
    "UNCALIBRATED_RANGE",
    "EMBEDDING_BIT",
    "EMBEDDING_ACT_BIT",
    "ACT_BIT",
    "WEIGHT_BIT",
    "BIAS_BIT",
    "LN_INPUT_BIT",
    "LN_OUTPUT_BIT",
    "SOFTMAX_EXP_BIT",
    "MAX_BIT",
    "EXACT_CHUNK",
    "INT8_MIN",
    "INT8_MAX",
    "INT32_EXACT_TERMS",
    "MASKED_SCORE",
    "INT8_PRODUCTS_ENV",
    "int8_products",
    "set_int8_products",
    "GELU_SQRT2",
    "GELU_COEFFS",
    "GELU_SHIFT",
    "EXP_X0",
    "EXP_COEFFS",
    "EXP_SHIFT",
    "EXP_TABLE_SIZE",
    "INT_BLOCK_BYTES",
]

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

    @property
    def max_input_length(self) -> int | None:
        """RoBERTa positions ``pad_token_id + 1 .. max_position_embeddings - 1``."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def check(self) -> None:
        check_divisible(self, "hidden_size", "num_attention_heads")
        check_index(self, "pad_token_id", "vocab_size", required=True)
        check_index(self, "pad_token_id", "max_position_embeddings", required=True)


#: Heads whose base model has the pooler; the others build ``IBertModel(add_pooling_layer=False)``.
HEADS_WITH_POOLER = ("Model", "ForMultipleChoice")

#: transformers' ``QuantAct`` starts its running range at ``x_min = -1e-5``, ``x_max = +1e-5`` (float32),
#: so that an uncalibrated scaling factor is never a division by zero.
ACT_RANGE_INIT = 1e-5

#: A running range inside ``+-UNCALIBRATED_RANGE`` is still the initial ``+-ACT_RANGE_INIT``: the
#: activation was never calibrated (transformers' ``QuantAct`` test, with a margin over float32 rounding).
UNCALIBRATED_RANGE = 1.1e-5

#: Bit widths of transformers' ``modeling_ibert.py``: embedding tables, their summed activation,
#: activations, weights, biases, and the integer LayerNorm's input and output.
EMBEDDING_BIT = 8
EMBEDDING_ACT_BIT = 16
ACT_BIT = 8
WEIGHT_BIT = 8
BIAS_BIT = 32
LN_INPUT_BIT = 22
LN_OUTPUT_BIT = 32
#: Width of the exponentials inside ``IntSoftmax`` (its ``act``).
SOFTMAX_EXP_BIT = 16
#: Accumulator width of the integer softmax and LayerNorm (their ``max_bit``).
MAX_BIT = 32
#: Longest contraction summed in one float32 product of int8 operands: ``1024 * 128 * 127 < 2**24``, so
#: every partial sum is an exactly representable float32 integer whatever the summation order.
EXACT_CHUNK = 1024

#: int8 operands of the integer products.  A ``QuantAct(ACT_BIT)`` output is clamped to
#: ``[-2**(ACT_BIT-1), 2**(ACT_BIT-1) - 1] = [-128, 127]`` and a ``WEIGHT_BIT`` weight to transformers'
#: ``[-(2**(b-1) - 1), 2**(b-1) - 2] = [-127, 126]``: both are int8 values, so ``QuantLinear``'s product
#: (and the attention scores ``q_int @ k_int.T``) can run on int8 x int8 -> int32 units.  The softmax
#: probabilities (0..256, 9 bits) cannot: ``prob @ v`` stays an exact float32 product.
INT8_MIN, INT8_MAX = -128, 127
#: An int8 x int8 product is at most ``128 * 128 = 2**14`` in magnitude, so an int32 accumulator is exact
#: (no wrap-around, any summation order) for contractions of at most ``2**17 - 1`` terms:
#: ``2**14 * (2**17 - 1) < 2**31``.  Longer contractions take the float path.
INT32_EXACT_TERMS = 2**17 - 1
#: Integer stand-in for a masked attention score in the integer-dtype softmax: ``-MASKED_SCORE`` is
#: added where the additive mask is very negative.  Scores are below ``2**24`` in magnitude, so a
#: masked one stays below its row's maximum by more than ``2**30 - 2**25``, past the exponent clamp
#: ``EXP_SHIFT * x0`` whenever ``EXP_SHIFT * |x0| <= 2**30 - 2**25``, and int32 cannot wrap.
MASKED_SCORE = 2**30
#: Environment switch for :func:`int8_products`: ``"1"`` forces the int8 path, ``"0"`` the float one.
INT8_PRODUCTS_ENV = "NEZHA_ZOO_INT8_PRODUCTS"

_int8_override: list[bool | None] = [None]


def int8_products() -> bool:
    """Whether quant mode computes its 8-bit integer products on int8 units (the backends' ``int8_matmul``).

    Order: :func:`set_int8_products`, then the environment variable :data:`INT8_PRODUCTS_ENV`
    (``"0"``/``"1"``), then the CPU: True where it has an int8 dot-product unit (AVX512-VNNI, AVX-VNNI,
    AMX-INT8; :func:`nezha_zoo.hardware.cpu_features`).  Without one, int8 GEMMs are slower than float32
    ones (torch's ``_int_mm`` ~60x on AVX2), and the exact float32 path is used.  Both paths give the
    same integers, so this only changes speed.
    """
    if _int8_override[0] is not None:
        return _int8_override[0]
    env = os.environ.get(INT8_PRODUCTS_ENV)
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"{INT8_PRODUCTS_ENV} must be '0' or '1', got {env!r}")
        return env == "1"
    return cpu_features().int8_dot


def set_int8_products(enabled: bool | None) -> bool | None:
    """Force the int8 product path on (True) or off (False), or back to automatic (None).

    Read when a kernel runs (or, under ``tf.function`` / ``jax.jit``, when it is traced).
    Returns the previous setting.
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_int8_products expects True, False or None, got {enabled!r}")
    previous, _int8_override[0] = _int8_override[0], enabled
    return previous


#: I-GELU (transformers' ``IntGELU``): ``erf(x / k)`` with ``k = GELU_SQRT2`` is approximated by
#: ``sign(x) * (a * (min(|x / k|, -b) + b)**2 + 1)``, ``(a, b) = GELU_COEFFS``, and the integer result
#: is shifted right by ``GELU_SHIFT`` bits.
GELU_SQRT2 = 1.4142
GELU_COEFFS = (-0.2888, -1.769)
GELU_SHIFT = 14

#: I-exp of ``IntSoftmax``: ``x = z * EXP_X0 + p`` (``EXP_X0 ~ -ln 2``) and ``exp(p) ~ a * (p + b)**2 + c``
#: with ``(a, b, c) = EXP_COEFFS``, scaled by ``2**EXP_SHIFT``; inputs below ``EXP_SHIFT * x0`` saturate.
EXP_X0 = -0.6931
EXP_COEFFS = (0.35815147, 0.96963238, 1.0)
EXP_SHIFT = 30
#: Inference tabulates the 16-bit exponential of every clamped integer score (``EXP_SHIFT * |x0| + 1``
#: entries, kept while the scales stay the same) when the table is smaller than the scores or than
#: this many entries (4 MiB of int32).
EXP_TABLE_SIZE = 2**20
#: Eager integer inference (PyTorch) runs over groups of sequences and blocks of rows whose widest
#: temporaries (int64/float64 rows) stay within this many bytes per intra-op thread, so that each of
#: its one-op-at-a-time passes works in cache.  Measured at roberta-base width on the 2-core AVX-512
#: EPYC: a layer at 8x128 took 50 ms (1 thread) and 32 ms (2 threads) with 4 MiB per thread, 94 and
#: 54 ms unblocked; 2-8 MiB per thread were within 5%.
INT_BLOCK_BYTES = 2**22

# --- quantization state (persistent buffers of transformers' quant_modules.py) ---------------------
# Every buffer is float32 in transformers' state dict, the "integer" ones included.


def _buffer(name: str, shape: tuple[int, ...], axes: tuple[str, ...], init_value: float | None = None) -> Param:
    return Param(name, shape, axes, Kind.BUFFER, init_value=init_value)


def _quant_act(name: str) -> list[Param]:
    """``QuantAct``: running activation range (EMA, updated in training) and its scaling factor."""
    return [
        _buffer(f"{name}.x_min", (1,), ("scalar",), -ACT_RANGE_INIT),
        _buffer(f"{name}.x_max", (1,), ("scalar",), ACT_RANGE_INIT),
        _buffer(f"{name}.act_scaling_factor", (1,), ("scalar",)),
    ]


def _quant_embedding(name: str, rows: int, dim: int, row_axis: str, padding_idx: int | None = None) -> list[Param]:
    """``QuantEmbedding``: the table, its per-tensor scale and its integer image."""
    ps = embedding(name, rows, dim, row_axis, padding_idx=padding_idx)
    ps.append(_buffer(f"{name}.weight_scaling_factor", (1,), ("scalar",)))
    ps.append(_buffer(f"{name}.weight_integer", (rows, dim), (row_axis, "embed")))
    return ps


def _quant_linear(name: str, in_dim: int, out_dim: int, in_axis: str, out_axis: str) -> list[Param]:
    """``QuantLinear``: weight and bias, the integer weight, per-output-channel scale, integer bias."""
    ps = dense(name, in_dim, out_dim, in_axis, out_axis)
    ps.append(_buffer(f"{name}.weight_integer", (out_dim, in_dim), (out_axis, in_axis)))
    ps.append(_buffer(f"{name}.fc_scaling_factor", (out_dim,), (out_axis,)))
    ps.append(_buffer(f"{name}.bias_integer", (out_dim,), (out_axis,)))
    return ps


def _int_layer_norm(name: str, dim: int) -> list[Param]:
    """``IntLayerNorm``: weight and bias, the dynamic right ``shift``, the output ``activation``."""
    ps = layer_norm(name, dim)
    ps.append(_buffer(f"{name}.shift", (1,), ("scalar",)))
    ps += _quant_act(f"{name}.activation")
    return ps


def _layer(p: str, H: int, inter: int) -> list[Param]:
    ps: list[Param] = []
    att = f"{p}.attention.self"
    for proj in ("query", "key", "value"):
        ps += _quant_linear(f"{att}.{proj}", H, H, "hidden", "kv")
    for act in ("query_activation", "key_activation", "value_activation", "output_activation", "softmax.act"):
        ps += _quant_act(f"{att}.{act}")
    out = f"{p}.attention.output"
    ps += _quant_linear(f"{out}.dense", H, H, "kv", "hidden")
    ps += _quant_act(f"{out}.ln_input_act")
    ps += _int_layer_norm(f"{out}.LayerNorm", H)
    ps += _quant_act(f"{out}.output_activation")
    ps += _quant_linear(f"{p}.intermediate.dense", H, inter, "hidden", "mlp")
    ps += _quant_act(f"{p}.intermediate.output_activation")
    ps += _quant_linear(f"{p}.output.dense", inter, H, "mlp", "hidden")
    ps += _quant_act(f"{p}.output.ln_input_act")
    ps += _int_layer_norm(f"{p}.output.LayerNorm", H)
    ps += _quant_act(f"{p}.output.output_activation")
    ps += _quant_act(f"{p}.pre_intermediate_act")
    ps += _quant_act(f"{p}.pre_output_act")
    return ps


def _base(c: IBertConfig, with_pooler: bool) -> list[Param]:
    H = c.hidden_size
    ps = _quant_embedding("embeddings.word_embeddings", c.vocab_size, H, "vocab", c.pad_token_id)
    ps += _quant_embedding("embeddings.token_type_embeddings", c.type_vocab_size, H, "token_type")
    ps += _quant_embedding("embeddings.position_embeddings", c.max_position_embeddings, H, "position", c.pad_token_id)
    # embeddings_act2 is built (and saved) by transformers but never applied.
    ps += _quant_act("embeddings.embeddings_act1")
    ps += _quant_act("embeddings.embeddings_act2")
    ps += _int_layer_norm("embeddings.LayerNorm", H)
    ps += _quant_act("embeddings.output_activation")
    for i in range(c.num_hidden_layers):
        ps += _layer(f"encoder.layer.{i}", H, c.intermediate_size)
    if with_pooler:
        ps += pooler("", H)  # float nn.Linear, no quantization state
    return ps


def ibert_spec(c: IBertConfig, head: str = "Model") -> ModelSpec:
    """All tensors of ``IBert<head>`` for config ``c``: parameters and the persistent quantization buffers.

    The heads and the pooler are plain float layers (no quantization state).
    """
    return roberta_family_spec("ibert", "ibert", c, head, HEADS, _base(c, head in HEADS_WITH_POOLER))


IBERT = register_family(
    Family(
        key="ibert",
        model_type="ibert",
        class_prefix="IBert",
        config_class=IBertConfig,
        base_prefix="ibert",
        heads=HEADS,
        spec=ibert_spec,
        tokenizer_class="RobertaTokenizer",
    )
)
