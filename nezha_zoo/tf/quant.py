"""I-BERT's integer-only kernels for Keras 3 / TensorFlow: the twins of :mod:`nezha_zoo.pt.quant`.

Every rule (scales, rounding, the dyadic requantization, the integer GELU / softmax / LayerNorm) is
the one documented in ``nezha_zoo/pt/quant.py``, which follows transformers 4.57.6
``ibert/quant_modules.py``.  This module reproduces the same integers bit for bit; only how TensorFlow
gets there is described here.

Where the bits come from
------------------------
* Quantized tensors travel as pairs ``(x, s)`` with ``x = q * s``: ``s`` a float32 tensor (1,) or (C,)
  (per channel on the last axis); ``x`` float32 for integers of at most 22 bits, float64 for the wide
  ones (linear accumulators, GELU products, LayerNorm outputs).  ``q`` is recovered as
  ``round(fl64(x) / fl64(s))``, exact for every width used.
* Constants derived from a scale (``floor(c / s)``, ``1 // s``, bias integers, ``fl32(1/s) * w``) are
  float32 elementwise IEEE operations, the same numbers PyTorch computes.  Python's float floor
  division ``1.0 // s`` (used by transformers' GELU) is *not* TensorFlow's ``floordiv`` (which is
  ``floor(a / b)``): :func:`python_floordiv` reproduces CPython's ``fmod``-based rule.
* TensorFlow has no ``frexp`` / ``ldexp`` / ``log2``: :func:`frexp` reads the float64 exponent bits,
  :func:`pow2` builds exact powers of two from bits, and the LayerNorm shift's ``ceil(log2(v))`` is
  computed from the exponent (exact; ``torch.log2`` can round a value just above a power of two down
  onto it, a case no realistic variance hits).
* ``tf.round`` rounds half to even, as ``torch.round``.
* Integer matrix products: int8 x int8 terms summed in float32 chunks of :data:`EXACT_CHUNK`
  (every partial sum < 2**24, exact in any order), chunks added in float64 (:func:`integer_matmul`).
  Under XLA (``tf.function(jit_compile=True)``), in inference, on CPUs with int8 units
  (:func:`nezha_zoo.families.ibert.int8_products`), the linear layers use int8 x int8 -> int32 matmuls
  instead (:func:`int8_matmul`, the same integers).  Outside XLA TensorFlow runs int8 (and int32)
  matmuls with generic Eigen kernels, ~2.5x slower than float32 GEMM, so the float path stays.

Integer dtypes in inference (issue #23, the twin of the PyTorch port): with ``training=False`` and no
gradient tape recording, each kernel's dequantized output carries the exact integers it was made from
(:func:`attach_integer` / :func:`integer_of`: int8 for 8-bit activations, int32 for 16/22-bit ones and
the attention scores, int64 for linear accumulators plus their 32-bit bias), and the next kernel
computes on those instead of recovering ``round(x / s)`` in float64: requantization casts them once
into its float64 dyadic product (:func:`requantize_int`; that IEEE product is the definition), the
GELU and LayerNorm polynomials run in int64 with arithmetic right shifts (``tf.bitwise.right_shift``
on signed integers) for ``floor(v / 2**k)``, the softmax gathers its 16-bit exponentials from an
int32 table of the clamped scores and normalises in int64.  Where the float64 rule is exact only for
some operands, a cheap scalar predicate on the scales, the per-row sums or the mask picks the
integer or the float64 rule (:func:`exact_or`: a Python branch in eager mode, ``tf.cond`` in graphs
and under XLA), so outputs are bit for bit those of the float64 rules.  The GELU and LayerNorm
kernels hand on float64-held integers (the dtype both rules share); the dequantized outputs no
kernel reads are pruned from ``tf.function`` graphs.  Under XLA the kernels keep the float64 rules
(XLA fuses their chains; the integer rules and their predicates measured 1.1x slower there), with
int8 products.  A ``tf.function`` traced
without a tape and differentiated later has no gradient through these kernels: quantization-aware
training calls the model with ``training=True`` (as ``fit`` does) or under a tape in eager mode.

Gradients are straight-through, as in transformers: ``round``/``floor`` pass the gradient unchanged,
weight quantization passes ``grad / s``, requantization ``grad / s_out``.

Keras specifics: the quantization state is the spec's ``buffer`` params, non-trainable float32
variables under transformers' names (``x_min``, ``x_max``, ``act_scaling_factor``,
``weight_integer``, ``fc_scaling_factor``, ``bias_integer``, ``weight_scaling_factor``, ``shift``),
written by the quant-mode forward as transformers writes its buffers, so ``save_pretrained`` stores
them.  Layers that carry float64 pairs are built with ``autocast=False`` (Keras would otherwise cast
every float input to float32).  ``training=True`` calibrates: every :class:`QuantAct` updates its
running range, in float and quant mode alike.
"""

from __future__ import annotations

import os
from typing import Any

import keras
import tensorflow as tf

from nezha_zoo.families.ibert import (
    EXACT_CHUNK,
    EXP_COEFFS,
    EXP_SHIFT,
    EXP_TABLE_SIZE,
    EXP_X0,
    GELU_COEFFS,
    GELU_SHIFT,
    GELU_SQRT2,
    INT32_EXACT_TERMS,
    MASKED_SCORE,
    MAX_BIT,
    SOFTMAX_EXP_BIT,
    UNCALIBRATED_RANGE,
    int8_products,
)
from nezha_zoo.tf.layers import freeze_padding_row, from_rows, in_xla_context, to_rows

__all__ = [
    "EXACT_CHUNK",
    "pow2",
    "exp2",
    "frexp",
    "python_floordiv",
    "exact_div",
    "computed_once",
    "reciprocal",
    "symmetric_scale",
    "symmetric_quantize",
    "round_ste",
    "floor_ste",
    "to_integer",
    "integer_of",
    "attach_integer",
    "exact_or",
    "xla_in_graph",
    "XLA_IN_GRAPH_ENV",
    "requantize_int",
    "frexp_multiplier",
    "fixed_point_requantize",
    "integer_matmul",
    "int8_matmul",
    "in_xla_context",
    "QuantEmbedding",
    "QuantAct",
    "QuantLinear",
    "IntGELU",
    "IntSoftmax",
    "IntLayerNorm",
]


_F32, _F64 = tf.float32, tf.float64


# --- exact float64 helpers -----------------------------------------------------------------------


def exact_div(a: Any, b: Any) -> tf.Tensor:
    """IEEE-correct float32 ``a / b`` (broadcasting) whatever Grappler or XLA do to the graph.

    Both rewrite a float32 division by a constant or broadcast divisor into a product with its
    rounded reciprocal, one ulp off for ~5% of quotients (the flax twin, :func:`nezha_zoo.flax.quant.exact_div`,
    hides the divisor behind an optimization barrier; TensorFlow has none).  The quotient of two
    float32 numbers computed in float64 rounds to the correctly rounded float32 quotient even when
    the float64 division itself is such a product (its error, ~2**-53, is far below the distance,
    >= ~2**-49 relative, of such a quotient from a float32 rounding boundary).

    Args:
        a, b (float32 Tensor or Python number): dividend and divisor (values exact in float32).

    Returns:
        float32 Tensor: ``fl32(a / b)``, broadcast shape.
    """
    return tf.cast(tf.cast(a, _F64) / tf.cast(b, _F64), _F32)


def computed_once(x: tf.Tensor) -> tf.Tensor:
    """``x`` itself (a float per-tensor or per-channel constant), evaluated in an XLA kernel of its own.

    XLA's CPU fusion re-evaluates the cheap producers of a broadcast operand for every element of the
    consumer: a per-channel dyadic multiplier (``frexp`` and the power of two, ~30 ops) or a kernel's
    scale-derived integers cost their whole expression per element of the activation (measured: most
    of a 1024 x 768 requantization's time).  A float division is an expensive op to the fusion pass,
    never fused into a consumer that reuses its elements (a broadcast), so ``x / 1`` ends the chain in
    its own kernel.  The ``1`` is ``max(sign(|x|), 1)``, which no rewrite folds; exact for every ``x``
    (infinities and NaN included), and elsewhere (eager, graph ops) one cheap op on a small tensor.
    The twin of :func:`nezha_zoo.flax.quant.computed_once`.

    Args:
        x (float Tensor (1,) or (C,)): a constant derived from scales or frozen buffers.

    Returns:
        ``x`` (same dtype and shape); gradient 1.
    """
    return x / tf.maximum(tf.sign(tf.abs(x)), tf.ones_like(x))


def reciprocal(t: tf.Tensor) -> tf.Tensor:
    """``fl32(1 / t)`` for float32 ``t``, correctly rounded under any graph rewrite (:func:`exact_div`)."""
    return exact_div(1.0, t)


def _rdiv(c: float, t: tf.Tensor) -> tf.Tensor:
    """``c / t`` for a Python number ``c`` as torch computes it: ``fl32(fl32(1 / t) * fl32(c))`` (float32 ``t``).

    torch's ``Tensor.__rtruediv__`` is ``reciprocal(t) * c`` (two roundings), and transformers'
    integer constants ``floor(coeff / s)`` are defined by it; a true division differs by one ulp
    for some ``s``, which moves ``floor`` by one.  Grappler refolds ``(1 / t) * c`` into ``c / t``
    (one rounding), so the product is formed in float64 (exact: two 24-bit significands) and
    rounded once to float32, from a reciprocal no rewrite can change.
    """
    c32 = tf.cast(tf.constant(c, _F32), _F64)
    return tf.cast(tf.cast(reciprocal(t), _F64) * c32, _F32)


def pow2(k: tf.Tensor) -> tf.Tensor:
    """Exact ``2.0 ** k`` (float64) for integer-valued ``k`` in [-1022, 1023], built from its bits."""
    k = tf.cast(k, tf.int64)
    return tf.bitcast((k + 1023) * (2**52), _F64)  # exponent field only: an exact power of two


@tf.custom_gradient
def exp2(t: tf.Tensor) -> tf.Tensor:
    """``2.0 ** t`` for integer-valued float64 ``t``, exact (:func:`pow2`), with the gradient of
    ``2 ** t`` (``ln 2 * 2 ** t``) as ``torch.pow`` has: the integer softmax's only gradient path."""
    value = pow2(t)
    return value, lambda g: g * value * 0.6931471805599453


def frexp(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``x = f * 2**k`` with ``0.5 <= |f| < 1`` (``numpy.frexp``) for finite normal float64 ``x``; (0, 0) at 0.

    Returns ``(f float64, k float64)`` shaped like ``x``.
    """
    x = tf.cast(x, _F64)
    bits = tf.bitcast(tf.abs(x), tf.int64)
    k = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 52), 0x7FF) - 1022  # (..,) int64
    zero = tf.equal(x, 0.0)
    k = tf.where(zero, tf.zeros_like(k), k)
    f = x * pow2(-k)  # exact: a power-of-two rescale of a normal number
    return f, tf.cast(k, _F64)


def python_floordiv(a: Any, b: tf.Tensor) -> tf.Tensor:
    """CPython / PyTorch float floor division ``a // b`` (``fmod``-based), elementwise in ``b``'s dtype.

    ``div = (a - fmod(a, b)) / b``, minus one when the remainder's sign differs from ``b``'s, then
    floored and corrected upwards when more than 0.5 below ``div``.  Differs from ``floor(a / b)``
    when ``a / b`` rounds up onto an integer (``1.0 // 0.1 == 9``).
    """
    a = tf.cast(a, b.dtype) * tf.ones_like(b)
    mod = tf.truncatemod(a, b)  # std::fmod
    div = (a - mod) / b
    div = tf.where(tf.logical_and(mod != 0, (b < 0) != (mod < 0)), div - 1, div)
    floordiv = tf.floor(div)
    return tf.where(div - floordiv > 0.5, floordiv + 1, floordiv)


def _ceil_log2(v: tf.Tensor) -> tf.Tensor:
    """Exact ``ceil(log2(v))`` of positive float64 ``v`` (from the exponent: ``v = f * 2**k``)."""
    f, k = frexp(v)
    return tf.where(tf.equal(f, 0.5), k - 1.0, k)


# --- scaling factors and rounding ----------------------------------------------------------------


def symmetric_scale(num_bits: int, x_min: tf.Tensor, x_max: tf.Tensor) -> tf.Tensor:
    """``max(|x_min|, |x_max|, 1e-8) / (2**(b-1) - 1)`` elementwise (float32, no gradient).

    Args:
        num_bits (int): bit width ``b``.
        x_min, x_max (float32 Tensor (1,) or (C,)): the range (per channel for weights).
    """
    n = float(2 ** (num_bits - 1) - 1)
    scale = tf.maximum(tf.abs(tf.cast(x_min, _F32)), tf.abs(tf.cast(x_max, _F32)))
    return tf.stop_gradient(computed_once(exact_div(tf.maximum(scale, 1e-8), n)))


def symmetric_quantize(x: tf.Tensor, num_bits: int, scale: tf.Tensor) -> tf.Tensor:
    """Integer image ``clamp(round(fl32(1/s) * x), -(2**(b-1) - 1), 2**(b-1) - 2)`` (float32).

    Args:
        x (float32 Tensor (..., C)): weights in Keras layout ``(in, out)`` with a per-output scale on
            the last axis, or a bias / activation.
        num_bits (int): 8 for weights, 32 for biases, the activation width otherwise.
        scale (float32 Tensor (1,) or (C,)): scaling factor.

    The clamp range is transformers' asymmetric ``[-n, n - 1]``.  Gradient ``grad / s`` (STE).
    """
    n = float(2 ** (num_bits - 1) - 1)
    inv = reciprocal(scale)  # the float32 reciprocal times x, as transformers' linear_quantize

    @tf.custom_gradient
    def quantize(x):
        return tf.clip_by_value(tf.round(inv * x), -n, n - 1), lambda g: g * inv

    return quantize(x)


# Straight-through rounding as custom gradients (one op in the forward pass, not three).
@tf.custom_gradient
def round_ste(x: tf.Tensor) -> tf.Tensor:
    """Round half to even with an identity gradient."""
    return tf.round(x), lambda g: g


@tf.custom_gradient
def floor_ste(x: tf.Tensor) -> tf.Tensor:
    """Floor with an identity gradient."""
    return tf.floor(x), lambda g: g


def to_integer(x: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """The exact integers ``round(fl64(x) / fl64(s))`` of a pair (float64; gradient ``1 / s``)."""
    return round_ste(tf.cast(x, _F64) / tf.cast(scale, _F64))


def integer_of(x: tf.Tensor, scale: tf.Tensor) -> tf.Tensor | None:
    """The exact integers a kernel attached to its dequantized output ``x = q * scale``, or None.

    Inference only (see the module docstring): an integer-dtype tensor (int8/int32/int64), or a
    float64 tensor of exact integers (the GELU and LayerNorm outputs), shaped like ``x``.  None when
    ``x`` carries nothing or carries integers at another scale than ``scale`` (the same object).
    """
    attached = getattr(x, "_nz_int", None)
    if attached is None or attached[1] is not scale:
        return None
    return attached[0]


def _attach(x: tf.Tensor, q: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    x._nz_int = (q, scale)  # a plain Python attribute: eager and graph tensors both take it
    return x


def attach_integer(q: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """The dequantized ``q * scale`` (in ``scale``'s dtype) of exact integers ``q``, carrying ``q``.

    Args:
        q (integer or float64 Tensor (..., C)): exact integers, exactly representable in
            ``scale``'s dtype (below 2**24 for a float32 scale).
        scale (float Tensor (1,) or (C,)): their scale.
    """
    return _attach(tf.cast(q, scale.dtype) * scale, q, scale)


def _inference(training: Any) -> bool:
    """The integer-dtype paths apply: not training, no gradient tape recording (eager; at trace time),
    and not under XLA, which fuses the float64 rules' chains (measured: the integer rules, with their
    exactness predicates, are 1.1x slower there)."""
    if training or in_xla_context():
        return False
    try:
        from tensorflow.python.eager import record
    except ImportError:  # pragma: no cover - TensorFlow moved its internals: keep the differentiable path
        return False
    return not record.could_possibly_record()


#: Environment switch of :func:`xla_in_graph` (``"0"``: graph-mode quant inference runs its kernels op by op).
XLA_IN_GRAPH_ENV = "NEZHA_ZOO_TF_QUANT_XLA"


def xla_in_graph(training: Any) -> bool:
    """Whether a quant-mode block should run as one XLA cluster (``tf.function(jit_compile=True)``) here.

    True in inference (as :func:`_inference`) inside a ``tf.function`` graph traced without XLA, unless
    :data:`XLA_IN_GRAPH_ENV` is ``"0"``.  There TensorFlow runs one kernel per op, and its integer and
    float64 elementwise kernels and int8 matmuls are generic (measured: the integer kernels op by op
    1.6-1.8x float time, against ~1.0x compiled, with int8 units); XLA fuses the float64 rules' chains
    and runs the int8 products on int8 units: the same integers (``tests/tf/test_ibert_int_dtypes_tf.py``).
    Eager calls keep the integer kernels op by op (no compilation per call or per new shape).
    """
    env = os.environ.get(XLA_IN_GRAPH_ENV)
    if env is not None and env not in ("0", "1"):
        raise ValueError(f"{XLA_IN_GRAPH_ENV} must be '0' or '1', got {env!r}")
    return env != "0" and not tf.executing_eagerly() and _inference(training)


def exact_or(pred: Any, int_fn, float_fn):
    """``int_fn()`` where the scalar predicate ``pred`` holds, else ``float_fn()`` (same structure and dtypes).

    Eager: a Python branch on ``bool(pred)``; in graphs and under XLA: ``tf.cond`` (one branch runs).
    """
    return _choose(pred, int_fn, float_fn)


def _choose(pred: Any, true_fn, false_fn):
    if tf.executing_eagerly():
        return true_fn() if bool(pred) else false_fn()
    return tf.cond(pred, true_fn, false_fn)


def frexp_multiplier(ratio: tf.Tensor, max_bit: int = 31) -> tuple[tf.Tensor, tf.Tensor]:
    """Dyadic ``ratio ~= m / 2**e``: ``m = sign(f) * floor(|f| * 2**max_bit + 0.5)``, ``e = max_bit - k``.

    transformers' ``batch_frexp`` (``decimal.ROUND_HALF_UP`` on ``f * 2**31``, exact in float64).
    ``ratio`` float64 -> ``(m, e)`` float64 of the same shape.
    """
    f, k = frexp(ratio)
    m = tf.sign(f) * tf.floor(tf.abs(f) * float(2**max_bit) + 0.5)
    return m, float(max_bit) - k


def _rescale(q: tf.Tensor, ratio: tf.Tensor) -> tf.Tensor:
    m, e = frexp_multiplier(ratio)
    # fl64(q * m) * 2**-e == fl64(q * (m * 2**-e)): a power-of-two scaling is exact, and the small
    # (C,) multiplier is scaled once instead of the activation-sized product
    return tf.round(q * computed_once(m * pow2(-e)))


def fixed_point_requantize(
    q: tf.Tensor,
    scale: tf.Tensor,
    num_bits: int,
    out_scale: tf.Tensor,
    identity_q: tf.Tensor | None = None,
    identity_scale: tf.Tensor | None = None,
) -> tf.Tensor:
    """``clamp(R(q, s) + R(q_id, s_id), -2**(b-1), 2**(b-1) - 1)``, ``R(q, s) = round(fl64(q * m) / 2**e)``
    with ``(m, e) = frexp_multiplier(fl64(s) / fl64(s_out))``.

    Args:
        q (float64 Tensor (..., C)): exact integers; ``scale`` (float32 (1,) or (C,)) their scale.
        num_bits (int): output width ``b``; ``out_scale`` (float32 (1,)): output scale.
        identity_q, identity_scale: a residual integer tensor and its scale, rescaled and added.
    Returns:
        float64 integers (no gradient).
    """
    n = float(2 ** (num_bits - 1) - 1)
    s_out = tf.cast(out_scale, _F64)
    out = _rescale(q, tf.cast(scale, _F64) / s_out)
    if identity_q is not None:
        out = out + _rescale(identity_q, tf.cast(identity_scale, _F64) / s_out)
    return tf.stop_gradient(tf.clip_by_value(out, -n - 1, n))


def requantize_int(
    q: tf.Tensor,
    scale: tf.Tensor,
    num_bits: int,
    out_scale: tf.Tensor,
    identity_q: tf.Tensor | None = None,
    identity_scale: tf.Tensor | None = None,
) -> tf.Tensor:
    """:func:`fixed_point_requantize` of exact integers in any dtype, to the narrowest integer dtype.

    ``q`` (and ``identity_q``): integer-dtype or float64 exact integers, ``|q| < 2**53``; each is cast
    once to float64 (exact) inside the dyadic product, whose float64 rounding is the definition.

    Returns:
        int8 Tensor when ``num_bits <= 8``, else int32 (``num_bits <= 32``); no gradient.
    """
    q_id = None if identity_q is None else tf.cast(identity_q, _F64)
    out = fixed_point_requantize(tf.cast(q, _F64), scale, num_bits, out_scale, q_id, identity_scale)
    return tf.cast(out, tf.int8 if num_bits <= 8 else tf.int32)


def _integer_matmul_int32(a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor:
    """:func:`integer_matmul` in inference: the same exact float32 chunks, summed in int32 (no gradient).

    ``|a|, |b| <= 128`` and at most :data:`INT32_EXACT_TERMS` terms, so every chunk (< 2**24) and the
    total (< 2**31) are exact.  Returns int32 (..., N).
    """
    k = a.shape[-1]
    if k is not None and k > INT32_EXACT_TERMS:
        raise ValueError(f"integer matmul: {k} terms may overflow the int32 accumulator (limit {INT32_EXACT_TERMS})")
    if k is None or k <= EXACT_CHUNK:
        return tf.cast(tf.matmul(a, b, transpose_b=transpose_b), tf.int32)
    out = None
    for k0 in range(0, k, EXACT_CHUNK):
        part_b = b[:, k0 : k0 + EXACT_CHUNK] if transpose_b else b[k0 : k0 + EXACT_CHUNK]
        part = tf.cast(tf.matmul(a[..., k0 : k0 + EXACT_CHUNK], part_b, transpose_b=transpose_b), tf.int32)
        out = part if out is None else out + part
    return out


def integer_matmul(a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor:
    """Exact ``a @ b`` of float32 tensors holding integers of at most 8 bits (|.| <= 128).

    ``a`` (..., K), ``b`` (K, N) (or (N, K) with ``transpose_b``).  Chunks of :data:`EXACT_CHUNK` terms
    are summed in float32 (exact), the chunk results in float64.  Returns float64 (..., N);
    differentiable.  (Exact ``int32`` / ``quint8`` matmuls exist in TensorFlow, but on CPUs without
    VNNI they are 2-2.5x slower than float32 GEMM; see ``benchmarks/ibert_quant.py``.)
    """
    k = a.shape[-1]
    if k is None or k <= EXACT_CHUNK:
        return tf.cast(tf.matmul(a, b, transpose_b=transpose_b), _F64)
    out = None
    for k0 in range(0, k, EXACT_CHUNK):
        part_b = b[:, k0 : k0 + EXACT_CHUNK] if transpose_b else b[k0 : k0 + EXACT_CHUNK]
        part = tf.cast(tf.matmul(a[..., k0 : k0 + EXACT_CHUNK], part_b, transpose_b=transpose_b), _F64)
        out = part if out is None else out + part
    return out


def int8_matmul(a: tf.Tensor, b: tf.Tensor, transpose_b: bool = False) -> tf.Tensor:
    """Exact ``a @ b`` on int8 units: int8 x int8 matmul with int32 accumulation (no gradient).

    Args:
        a (..., K), b (K, N) (or (N, K) with ``transpose_b``): integer-valued tensors within [-128, 127]
            (any dtype; cast to int8), ``K <= INT32_EXACT_TERMS`` so the int32 sums cannot wrap.
    Returns:
        int32 Tensor (..., N).
    """
    k = a.shape[-1]
    if k is not None and k > INT32_EXACT_TERMS:
        raise ValueError(f"int8_matmul: {k} terms may overflow the int32 accumulator (limit {INT32_EXACT_TERMS})")
    return tf.linalg.matmul(tf.cast(a, tf.int8), tf.cast(b, tf.int8), transpose_b=transpose_b, output_type=tf.int32)


def _buffer(layer: keras.layers.Layer, name: str, shape: tuple[int, ...], value: float = 0.0) -> keras.Variable:
    # Spec BUFFER params: float32 whatever the dtype policy, never trained; values come from the spec.
    return layer.add_weight(
        name=name, shape=shape, dtype="float32", initializer=keras.initializers.Constant(value), trainable=False
    )


def _build_child(layer: keras.layers.Layer) -> None:
    """Create the variables of a sub-layer its parent never calls (transformers saves them all the same)."""
    if not layer.built:
        layer.build(None)  # Keras opens the child's name scope around build


# --- layers --------------------------------------------------------------------------------------


class QuantEmbedding(keras.layers.Layer):
    """Embedding table with symmetric per-tensor 8-bit weight quantization.

    Variables: ``embeddings`` (rows, dim) trainable; buffers ``weight_scaling_factor`` (1,) and
    ``weight_integer`` (rows, dim), written on every quant-mode forward.

    Args:
        num_embeddings (int), embedding_dim (int): table size.
        padding_idx (int | None): a row whose lookups pass no gradient (torch ``padding_idx``).
        weight_bit (int): weight bit width (8).
        quant_mode (bool): quantize (True) or plain lookup (False).
        name (str): the PyTorch attribute name (``"word_embeddings"``).

    Call: ``ids`` (B, L) int -> ``(x (B, L, dim) float32, scale (1,) or None)``; quant mode
    ``x = weight_integer[ids] * weight_scaling_factor``.  After :meth:`freeze` inference calls reuse
    the stored integers instead of requantizing the table.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        weight_bit: int = 8,
        quant_mode: bool = False,
        name: str = "embeddings",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.weight_bit = weight_bit
        self.quant_mode = quant_mode
        self.frozen = False  # see freeze()

    def freeze(self, frozen: bool = True) -> None:
        """Quantize the table now and reuse ``weight_integer`` in later inference calls (True), or
        requantize on every call as transformers does (False).  Call again after changing the table."""
        if frozen and self.quant_mode:
            self.quantized_weight()
        self.frozen = frozen and self.quant_mode

    def build(self, input_shape=None):
        shape = (self.num_embeddings, self.embedding_dim)
        self.embeddings = self.add_weight(name="embeddings", shape=shape, initializer="zeros")
        self.weight_scaling_factor = _buffer(self, "weight_scaling_factor", (1,))
        self.weight_integer = _buffer(self, "weight_integer", shape)

    def quantized_weight(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(w_int (rows, dim), scale (1,))`` of the current table (and the buffers updated)."""
        w = tf.cast(self.embeddings, _F32)
        scale = symmetric_scale(self.weight_bit, tf.reduce_min(w)[None], tf.reduce_max(w)[None])
        w_int = symmetric_quantize(w, self.weight_bit, scale)
        self.weight_scaling_factor.assign(scale)
        self.weight_integer.assign(tf.stop_gradient(w_int))
        return w_int, scale

    def call(self, ids, training=False):
        if not self.quant_mode:
            out = tf.gather(self.embeddings, ids)
            return freeze_padding_row(out, ids, self.padding_idx), None
        if self.frozen and not training:
            w_int, scale = tf.convert_to_tensor(self.weight_integer), tf.convert_to_tensor(self.weight_scaling_factor)
        else:
            w_int, scale = self.quantized_weight()
        if _inference(training) and self.weight_bit <= 8:
            q = tf.gather(w_int, ids)  # no gradient to freeze: the padding row's lookups are values only
            return _attach(q * scale, tf.cast(q, tf.int8), scale), scale
        out = freeze_padding_row(tf.gather(w_int, ids), ids, self.padding_idx)
        return out * scale, scale


class QuantAct(keras.layers.Layer):
    """Activation (re)quantization to ``activation_bit`` bits with a calibrated running range.

    Buffers ``x_min``/``x_max`` (1,) (start at -1e-5 / +1e-5) and ``act_scaling_factor`` (1,).
    ``training=True`` calibrates from the batch min/max of ``x + identity`` (in float and quant mode):
    the first update adds the batch values to the initial range, later ones are an EMA with
    ``act_range_momentum`` (-1: running min/max).  Quant mode sets ``act_scaling_factor =
    symmetric_scale(bits, x_min, x_max)`` and returns ``q * act_scaling_factor``: ``q`` the dyadic
    requantization of the input pair (plus the residual pair), or ``round(x / s)`` for a float input.

    Args:
        activation_bit (int): output bit width.
        act_range_momentum (float): EMA momentum of the range.
        quant_mode (bool): quantize (True) or pass ``x + identity`` through (False).
        name (str): the PyTorch attribute name.

    Call: ``x`` (..., C) float32/float64; ``pre_act_scaling_factor`` (1,) or (C,) (None: ``x`` is a
    float input); ``identity`` / ``identity_scaling_factor``: residual pair; ``specified_min`` /
    ``specified_max`` override the range; ``training`` (bool).  Returns ``(x_out float32, scale (1,))``
    (``(x + identity, None)`` in float mode).  With a float input and an ``identity``, ``x + identity``
    is quantized (transformers drops the identity there; see ``nezha_zoo/pt/quant.py``).
    """

    def __init__(
        self,
        activation_bit: int,
        act_range_momentum: float = 0.95,
        quant_mode: bool = False,
        name: str = "activation",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.activation_bit = activation_bit
        self.act_range_momentum = act_range_momentum
        self.quant_mode = quant_mode

    def build(self, input_shape=None):
        self.x_min = _buffer(self, "x_min", (1,), -1e-5)
        self.x_max = _buffer(self, "x_max", (1,), 1e-5)
        self.act_scaling_factor = _buffer(self, "act_scaling_factor", (1,))

    def update_range(self, x_act: tf.Tensor) -> None:
        """One calibration step from ``x_act`` (any shape); see the class docstring."""
        x_act = tf.stop_gradient(x_act)
        lo = tf.cast(tf.reduce_min(x_act), _F32)
        hi = tf.cast(tf.reduce_max(x_act), _F32)
        lo = tf.debugging.check_numerics(lo, f"{self.name}: NaN/inf in the activation while calibrating")
        hi = tf.debugging.check_numerics(hi, f"{self.name}: NaN/inf in the activation while calibrating")
        x_min, x_max = tf.convert_to_tensor(self.x_min), tf.convert_to_tensor(self.x_max)
        first = tf.logical_and(tf.reduce_min(x_min) > -UNCALIBRATED_RANGE, tf.reduce_max(x_max) < UNCALIBRATED_RANGE)
        if self.act_range_momentum == -1:
            run_min, run_max = tf.minimum(x_min, lo), tf.maximum(x_max, hi)
        else:
            m = tf.constant(self.act_range_momentum, _F32)
            one_m = tf.constant(1 - self.act_range_momentum, _F32)  # the float64 1 - m rounded, as torch
            run_min, run_max = x_min * m + lo * one_m, x_max * m + hi * one_m
        self.x_min.assign(tf.where(first, x_min + lo, run_min))
        self.x_max.assign(tf.where(first, x_max + hi, run_max))

    def call(
        self,
        x,
        pre_act_scaling_factor=None,
        identity=None,
        identity_scaling_factor=None,
        specified_min=None,
        specified_max=None,
        training=False,
    ):
        inference = _inference(training) and self.quant_mode and pre_act_scaling_factor is not None
        if identity is None or inference:
            x_act = x  # an inference requantization adds the two integer tensors instead
        else:
            wide = _F64 if _F64 in (x.dtype, identity.dtype) else x.dtype  # torch's type promotion
            x_act = tf.cast(identity, wide) + tf.cast(x, wide)
        if training:
            self.update_range(x_act)
        if not self.quant_mode:
            return x_act, None
        x_min = self.x_min if specified_min is None else specified_min
        x_max = self.x_max if specified_max is None else specified_max
        scale = symmetric_scale(self.activation_bit, x_min, x_max)
        self.act_scaling_factor.assign(scale)
        if pre_act_scaling_factor is None:
            q = symmetric_quantize(tf.cast(x_act, _F32), self.activation_bit, scale)
            if _inference(training) and self.activation_bit <= 32:
                return _attach(q * scale, tf.cast(q, tf.int8 if self.activation_bit <= 8 else tf.int32), scale), scale
            return q * scale, scale
        bits, s_in, s_id = self.activation_bit, pre_act_scaling_factor, identity_scaling_factor
        if inference and bits <= 32:
            # integer dtypes end to end (the same integers as the float64 path below)
            q_in = integer_of(x, s_in)
            q_in = to_integer(x, s_in) if q_in is None else q_in
            q_id = None
            if identity is not None:
                q_id = integer_of(identity, s_id)
                q_id = to_integer(identity, s_id) if q_id is None else q_id
            q = requantize_int(q_in, s_in, bits, scale, q_id, s_id)
            return attach_integer(q, scale), scale

        # straight-through: d q / d x = 1 / s_out (and for the residual), as transformers' FixedPointMul
        @tf.custom_gradient
        def requantize(x, *residual):
            q_in = tf.round(tf.cast(x, _F64) / tf.cast(s_in, _F64))
            q_id = None if not residual else tf.round(tf.cast(residual[0], _F64) / tf.cast(s_id, _F64))
            q = tf.cast(fixed_point_requantize(q_in, s_in, bits, scale, q_id, s_id), _F32)

            def grad(g):
                g = g / scale
                return (tf.cast(g, x.dtype), *(tf.cast(g, r.dtype) for r in residual))

            return q, grad

        q = requantize(x) if identity is None else requantize(x, identity)
        return q * scale, scale


class QuantLinear(keras.layers.Layer):
    """Linear layer with 8-bit per-output-channel weights and 32-bit biases.

    Variables: ``kernel`` (in, out) and ``bias`` (out,) trainable; buffers ``weight_integer``
    (out, in) -- the spec's canonical layout, as transformers stores it --, ``fc_scaling_factor``
    (out,) and ``bias_integer`` (out,), written on every quant-mode forward.

    Quant mode: ``s_w`` per output channel, ``w_int = symmetric_quantize(w, 8, s_w)``,
    ``s_out = s_w * s_in``, ``b_int = symmetric_quantize(b, 32, s_out)``, ``acc = x_int @ w_int + b_int``
    exactly (:func:`integer_matmul`); returns ``(acc * s_out as float64, s_out (out,))``.

    Args:
        in_features (int), out_features (int): sizes.
        weight_bit (int), bias_bit (int): bit widths (8, 32).
        per_channel (bool): one weight scale per output channel (else per tensor).
        quant_mode (bool): quantize (True) or ``x @ kernel + bias`` (False).
        name (str): the PyTorch attribute name (``"query"``).

    Call: ``x`` (..., in), ``prev_act_scaling_factor`` (1,) (required in quant mode) ->
    ``(y (..., out), scale (out,) or None)``.  After :meth:`freeze` inference calls reuse the stored
    integer kernel instead of requantizing it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_bit: int = 8,
        bias_bit: int = 32,
        per_channel: bool = True,
        quant_mode: bool = False,
        name: str = "dense",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.in_features, self.out_features = in_features, out_features
        self.weight_bit, self.bias_bit = weight_bit, bias_bit
        self.per_channel = per_channel
        self.quant_mode = quant_mode
        self.frozen = False  # see freeze()
        self._kernel_int8 = None  # int8 copy of the frozen kernel (see freeze())

    def freeze(self, frozen: bool = True) -> None:
        """Quantize the kernel now and reuse ``weight_integer`` / ``fc_scaling_factor`` in later inference
        calls (True), or requantize on every call as transformers does (False).  The bias is always
        requantized (its scale follows the input's range).  Call again after changing the kernel."""
        if frozen and self.quant_mode:
            self.quantized_weight()
        self.frozen = frozen and self.quant_mode
        # int8 copy for the int8 units (eager freeze only): casting the float32 buffer costs a pass
        # over the whole kernel on every call, as long as the product itself at 1x128
        self._kernel_int8 = None
        if self.frozen and tf.executing_eagerly():
            self._kernel_int8 = tf.cast(tf.convert_to_tensor(self.weight_integer), tf.int8)  # (out, in)

    def _frozen_int8_kernel(self) -> tf.Tensor:
        """The frozen integer kernel (out, in) as int8 (the cached copy, else cast from the buffer)."""
        cached = getattr(self, "_kernel_int8", None)
        return cached if cached is not None else tf.cast(tf.convert_to_tensor(self.weight_integer), tf.int8)

    def build(self, input_shape=None):
        self.kernel = self.add_weight(name="kernel", shape=(self.in_features, self.out_features), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(self.out_features,), initializer="zeros")
        self.weight_integer = _buffer(self, "weight_integer", (self.out_features, self.in_features))
        self.fc_scaling_factor = _buffer(self, "fc_scaling_factor", (self.out_features,))
        self.bias_integer = _buffer(self, "bias_integer", (self.out_features,))

    def quantized_weight(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(w_int (in, out) float32 integers, s_w (out,))`` (buffers updated)."""
        w = tf.cast(self.kernel, _F32)  # (in, out)
        if self.per_channel:
            scale = symmetric_scale(self.weight_bit, tf.reduce_min(w, axis=0), tf.reduce_max(w, axis=0))
        else:
            scale = symmetric_scale(self.weight_bit, tf.reduce_min(w)[None], tf.reduce_max(w)[None])
        w_int = symmetric_quantize(w, self.weight_bit, scale)  # per output channel: the last axis
        self.weight_integer.assign(tf.transpose(tf.stop_gradient(w_int)))  # (out, in), the buffer's layout
        self.fc_scaling_factor.assign(scale * tf.ones((self.out_features,), _F32))
        return w_int, scale

    def call(self, x, prev_act_scaling_factor=None, training=False):
        if not self.quant_mode:
            # A rank-2 MatMul + BiasAdd (to_rows): a broadcasting BatchMatMulV2 over (B, L, in) is slower on CPU.
            return from_rows(tf.nn.bias_add(tf.matmul(to_rows(x), self.kernel), self.bias), x), None
        shape = None if prev_act_scaling_factor is None else tuple(prev_act_scaling_factor.shape)
        if shape != (1,):
            raise ValueError(
                f"QuantLinear {self.name}: prev_act_scaling_factor must be a per-tensor scale of shape (1,), "
                f"got {shape}"
            )
        if _inference(training):
            return self._call_int(x, prev_act_scaling_factor)
        x_int = round_ste(exact_div(x, prev_act_scaling_factor))  # |x_int| <= 2**21: exact in float32
        int8 = not training and self.in_features <= INT32_EXACT_TERMS and int8_products() and in_xla_context()
        if int8 and self.frozen:
            # int8 units under XLA (8-bit activations and weights, int32 sums: exact), inference only
            scale = tf.convert_to_tensor(self.fc_scaling_factor)
            acc = tf.cast(int8_matmul(x_int, self._frozen_int8_kernel(), transpose_b=True), _F64)
        elif int8:
            w_int, scale = self.quantized_weight()
            acc = tf.cast(int8_matmul(x_int, w_int), _F64)
        elif self.frozen and not training:
            scale = tf.convert_to_tensor(self.fc_scaling_factor)
            acc = integer_matmul(x_int, tf.convert_to_tensor(self.weight_integer), transpose_b=True)  # (..., out)
        else:
            w_int, scale = self.quantized_weight()
            acc = integer_matmul(x_int, w_int)  # (..., out) float64
        out_scale = scale * prev_act_scaling_factor  # (out,)
        b_int = computed_once(symmetric_quantize(tf.cast(self.bias, _F32), self.bias_bit, out_scale))
        self.bias_integer.assign(tf.stop_gradient(b_int))
        acc = acc + tf.cast(b_int, _F64)
        return acc * tf.cast(out_scale, _F64), out_scale

    def _call_int(self, x: tf.Tensor, s_in: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Inference: the same integers in integer dtypes; ``(acc * s_out float64 carrying int64 acc, s_out)``.

        The int8 (or other) integers ``x`` carries are used as they are, else recovered (float32,
        exact).  The product is int32 (int8 units under XLA, or exact float32 chunks summed in int32);
        the 32-bit bias is added in int64, since ``K * 2**14 + 2**31`` may pass 2**31.
        """
        x_int = integer_of(x, s_in)
        if x_int is None:
            x_int = tf.round(exact_div(x, s_in))  # |x_int| <= 2**21: exact in float32
        if self.frozen:
            scale = tf.convert_to_tensor(self.fc_scaling_factor)
            w_int, transpose_b = tf.convert_to_tensor(self.weight_integer), True  # (out, in)
        else:
            w_int, scale = self.quantized_weight()
            transpose_b = False
        if self.in_features <= INT32_EXACT_TERMS and int8_products() and in_xla_context():
            w_int = self._frozen_int8_kernel() if self.frozen else w_int
            acc = int8_matmul(x_int, w_int, transpose_b=transpose_b)  # int8 units under XLA
        else:
            acc = _integer_matmul_int32(tf.cast(x_int, _F32), w_int, transpose_b=transpose_b)
        out_scale = scale * s_in  # (out,)
        b_int = computed_once(symmetric_quantize(tf.cast(self.bias, _F32), self.bias_bit, out_scale))
        self.bias_integer.assign(b_int)
        acc = tf.cast(acc, tf.int64) + tf.cast(b_int, tf.int64)  # |acc| <= K * 2**14 + 2**31: int64
        return _attach(tf.cast(acc, _F64) * tf.cast(out_scale, _F64), acc, out_scale), out_scale


class IntGELU(keras.layers.Layer):
    """GELU, integer-only in quant mode: ``x * (1 + erf_int(x / sqrt 2)) / 2`` (no variables).

    The second-order erf polynomial and every constant are those of :class:`nezha_zoo.pt.quant.IntGELU`;
    ``1.0 // s_y`` is Python's floor division (:func:`python_floordiv`).  The ~2**40 products are exact
    in float64.

    Args:
        quant_mode (bool): integer GELU (True) or exact erf GELU (False).
        force_dequant (str): ``"gelu"`` or ``"nonlinear"`` keep the float GELU in quant mode.

    Call: ``(x (..., C), scaling_factor (C,) or (1,))`` -> ``(q_out * s_out float64, s_out)``; float mode
    ``(gelu(x), None)``.
    """

    def __init__(
        self, quant_mode: bool = True, force_dequant: str = "none", name: str = "intermediate_act_fn", **kwargs
    ):
        super().__init__(name=name, autocast=False, **kwargs)
        self.quant_mode = quant_mode and force_dequant not in ("nonlinear", "gelu")
        self.k = GELU_SQRT2
        self.const = GELU_SHIFT
        self.coeff = (*GELU_COEFFS, 1.0 / GELU_COEFFS[0])  # a, b, c / a with c = 1

    def int_erf(self, q: tf.Tensor, scale: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Integer erf of ``q * scale``: ``(y float64 integers, s_y float32)``."""
        b_int = tf.cast(computed_once(tf.floor(_rdiv(self.coeff[1], scale))), _F64)
        c_int = tf.cast(computed_once(tf.floor(_rdiv(self.coeff[2], tf.square(scale)))), _F64)
        sign = tf.sign(q)
        abs_int = tf.minimum(tf.abs(q), -b_int)
        y = sign * (tf.square(abs_int + b_int) + c_int)
        y = floor_ste(y / 2.0**self.const)
        s_y = tf.square(scale) * self.coeff[0] * 2.0**self.const
        return y, s_y

    def _forward_int(self, q: tf.Tensor, scaling_factor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Inference on exact integers ``q`` (int64 accumulators): ``(q_out float64 integers, s_out)``.

        int64 with an arithmetic right shift for ``floor(y / 2**14)`` where the float64 rule is exact
        (checked on the per-channel constants and ``max|q|``: ``b_int**2 + |c_int| < 2**53`` bounds
        the polynomial, ``max|q| * max|y + one| < 2**53`` the output), else that float64 rule;
        ``sign(0) = 0`` needs no care since ``q = 0`` gives ``q_out = 0``.
        """
        scale = exact_div(tf.stop_gradient(scaling_factor), self.k)
        b_f = computed_once(tf.floor(_rdiv(self.coeff[1], scale)))  # float32, <= 0
        c_f = computed_once(tf.floor(_rdiv(self.coeff[2], tf.square(scale))))  # float32, <= 0
        s_y = tf.square(scale) * self.coeff[0] * 2.0**self.const
        one_f = computed_once(python_floordiv(1.0, s_y))
        b_max = tf.cast(tf.reduce_max(tf.abs(b_f)), _F64)
        c_max = tf.cast(tf.reduce_max(tf.abs(c_f)), _F64)
        one_max = tf.cast(tf.reduce_max(tf.abs(one_f)), _F64)
        y_max = (b_max * b_max + c_max) / 2.0**self.const + 1.0 + one_max
        q_max = tf.cast(tf.reduce_max(tf.abs(q)), _F64)
        exact = (b_max * b_max + c_max < 2.0**53) & (one_max < 2.0**53) & (q_max * y_max < 2.0**53)
        if q.dtype not in (tf.int8, tf.int32, tf.int64):
            exact = tf.constant(False)  # float64-held integers: the float64 rule

        def int_rule():
            q64 = tf.cast(q, tf.int64)
            b_int = tf.cast(b_f, tf.int64)
            t = tf.minimum(tf.abs(q64), -b_int) + b_int  # in [b_int, 0]
            y = (t * t + tf.cast(c_f, tf.int64)) * tf.sign(q64)
            y = tf.bitwise.right_shift(y, tf.constant(self.const, tf.int64)) + tf.cast(one_f, tf.int64)
            return tf.cast(y * q64, _F64)

        def float_rule():
            q64 = tf.cast(q, _F64)
            y, _ = self.int_erf(q64, scale)
            return q64 * (y + tf.cast(one_f, _F64))

        q_out = exact_or(exact, int_rule, float_rule)
        return q_out, scaling_factor * s_y / 2

    def call(self, x, scaling_factor=None, training=False):
        if not self.quant_mode:
            return tf.nn.gelu(tf.cast(x, _F32), approximate=False), None
        q_int = integer_of(x, scaling_factor) if _inference(training) else None
        if q_int is not None:
            q, out_scale = self._forward_int(q_int, scaling_factor)
            return _attach(q * tf.cast(out_scale, _F64), q, out_scale), out_scale
        q = to_integer(x, scaling_factor)
        y, s_y = self.int_erf(q, exact_div(tf.stop_gradient(scaling_factor), self.k))
        one = tf.cast(tf.stop_gradient(computed_once(python_floordiv(1.0, s_y))), _F64)
        q = q * (y + one)
        out_scale = scaling_factor * s_y / 2
        return q * tf.cast(out_scale, _F64), out_scale


class IntSoftmax(keras.layers.Layer):
    """Softmax over the last axis, integer-only in quant mode (``output_bit``-bit probabilities).

    The integer ``exp`` (``2**-k`` times a second-order polynomial of the remainder), the 16-bit
    ``act`` requantization and the ``floor(2**32 / sum)`` normalisation are those of
    :class:`nezha_zoo.pt.quant.IntSoftmax`.

    Args:
        output_bit (int): probability bit width (8).
        quant_mode (bool): integer (True) or float softmax (False).
        force_dequant (str): ``"softmax"`` or ``"nonlinear"`` keep the float softmax in quant mode.

    Call: ``(x (..., L) scores plus additive mask, scaling_factor (1,))`` -> ``(prob * 2**-8 float32,
    2**-8 (1,))``; float mode ``(softmax(x), None)``.  ``integer_scores=True``: ``x`` already holds the
    float64 integer scores (mask included).
    """

    def __init__(
        self, output_bit: int, quant_mode: bool = False, force_dequant: str = "none", name: str = "softmax", **kwargs
    ):
        super().__init__(name=name, autocast=False, **kwargs)
        self.output_bit = output_bit
        self.max_bit = MAX_BIT
        self.quant_mode = quant_mode and force_dequant not in ("nonlinear", "softmax")
        self.act = QuantAct(SOFTMAX_EXP_BIT, quant_mode=self.quant_mode, name="act")
        self.x0 = EXP_X0
        self.const = EXP_SHIFT
        a, b, c = EXP_COEFFS
        self.coef = (a, b / a, c / a)

    def build(self, input_shape=None):
        _build_child(self.act)  # float mode never calls it; its range is saved all the same

    def int_exp(self, q: tf.Tensor, scale: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Integer ``exp`` of non-positive float64 integers ``q`` (scale ``scale``): ``(e float64, s_e float32)``."""
        scale = tf.stop_gradient(scale)
        x0 = tf.cast(computed_once(tf.floor(_rdiv(self.x0, scale))), _F64)
        b_int = tf.cast(computed_once(tf.floor(_rdiv(self.coef[1], scale))), _F64)
        c_int = tf.cast(computed_once(tf.floor(_rdiv(self.coef[2], tf.square(scale)))), _F64)
        q = tf.maximum(q, self.const * x0)
        k = floor_ste(q / x0)
        r = q - x0 * k
        p = (r + b_int) * r + c_int
        e = tf.maximum(floor_ste(p * exp2(self.const - k)), 0.0)
        return e, self.coef[0] * tf.square(scale) / 2.0**self.const

    def _exp16_lookup(self, q: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
        """Inference, same integers: the 16-bit exponentials of non-positive int32 scores ``q``, gathered
        from an int32 table of every clamped score ``0, -1, ..., 30 * x0`` (the exponential is a function
        of the clamped integer score alone).  The table has ``-30 * x0 + 1`` entries, a data-dependent
        size (so not under XLA); :meth:`forward_int` takes it when that is at most the scores' size
        and :data:`EXP_TABLE_SIZE` (graphs keep no table between calls, so a larger one costs more
        than it saves)."""
        x0 = tf.floor(_rdiv(self.x0, tf.stop_gradient(scale)))  # float32 (1,)
        size = tf.cast(tf.reshape(-self.const * x0, ()), tf.int32) + 1
        e, s_e = self.int_exp(-tf.cast(tf.range(size), _F64), scale)
        e16, s16 = self.act(e, pre_act_scaling_factor=s_e, training=False)
        table = tf.cast(to_integer(e16, s16), tf.int32) if integer_of(e16, s16) is None else integer_of(e16, s16)
        return tf.gather(table, -tf.maximum(q, -(size - 1)))  # the clamp of int_exp, as a table index

    def mask_scores_int(
        self, scores: tf.Tensor, attention_mask: tf.Tensor, scale: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Integer scores plus an additive 0 / very-negative mask, in int32, for :meth:`forward_int`.

        The float64 rule adds ``mask / s`` to the scores; a masked score then lies so far below its
        row's maximum that the exponent clamp at ``30 * x0`` takes it, whatever its value.  So where
        every mask value is 0 or below ``-MASKED_SCORE`` (in score units), every row has an unmasked
        entry and ``30 * |x0| < MASKED_SCORE - 2**25``, adding ``-2**30`` gives the same probabilities
        (``nezha_zoo.pt.quant.IntSoftmax.mask_scores_int``).

        Args:
            scores (int32 Tensor (B, h, Lq, Lk)): ``q_int @ k_int^T``, ``|.| < 2**24``.
            attention_mask (float Tensor broadcastable to ``scores``): additive mask.
            scale (float32 Tensor (1,)): scale of the scores.
        Returns:
            ``(masked int32 scores, ok)``: ``ok`` a scalar bool Tensor, False where the caller must
            take the float64 rule (:func:`exact_or`).
        """
        x0 = tf.reshape(tf.floor(_rdiv(self.x0, tf.stop_gradient(scale))), ())
        masked = tf.cast(attention_mask, _F64) / tf.cast(scale, _F64)
        visible = tf.equal(masked, 0.0)
        reach = -self.const * x0  # |30 * x0|, float32
        ok = reach < MASKED_SCORE - 2**25
        ok = ok & tf.reduce_all(tf.reduce_any(visible, axis=-1))
        ok = ok & tf.reduce_all(visible | (masked <= -MASKED_SCORE))
        return scores + tf.where(visible, 0, -MASKED_SCORE), ok

    def forward_int(self, q: tf.Tensor, scale: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Integer softmax of integer scores ``q`` (..., L): ``(prob float32 integers, 2**-b (1,))``.

        ``q`` float64 integers: the float64 rule.  ``q`` int32 (inference, from :meth:`mask_scores_int`
        where it is ``ok``): the table of :meth:`_exp16_lookup` and an int64 normalisation, the same
        integers (``e16 <= sum(e16) < 2**53``, so ``e16 * f <= 2**32`` is exact in int64 and
        ``floor(v / 2**k)`` is a right shift; a zero sum gives NaN rows, as the float64 rule).
        """
        if q.dtype.is_integer:
            q = q - tf.reduce_max(q, axis=-1, keepdims=True)
            x0 = tf.reshape(tf.floor(_rdiv(self.x0, tf.stop_gradient(scale))), ())
            size = -self.const * tf.cast(x0, _F64) + 1.0
            small = size <= tf.minimum(tf.cast(tf.size(q), _F64), float(EXP_TABLE_SIZE))

            def direct():  # the float64 exponential of every score, requantized to 16-bit integers
                e, s_e = self.int_exp(tf.cast(q, _F64), scale)
                e16, s16 = self.act(e, pre_act_scaling_factor=s_e, training=False)
                return integer_of(e16, s16)

            e16 = direct() if in_xla_context() else _choose(small, lambda: self._exp16_lookup(q, scale), direct)
            e16 = tf.cast(e16, tf.int64)
            total = tf.reduce_sum(e16, axis=-1, keepdims=True)
            positive = total > 0
            f = tf.floor(2.0**self.max_bit / tf.cast(total, _F64))
            f = tf.cast(tf.where(positive, f, 0.0), tf.int64)
            prob = tf.bitwise.right_shift(e16 * f, tf.constant(self.max_bit - self.output_bit, tf.int64))
            prob = tf.where(positive, tf.cast(prob, _F32), float("nan"))
            return prob, tf.constant([2.0**-self.output_bit], _F32)
        q = q - tf.reduce_max(q, axis=-1, keepdims=True)
        e, s_e = self.int_exp(q, scale)
        e16, s16 = self.act(e, pre_act_scaling_factor=s_e, training=training)
        e16 = to_integer(e16, s16)
        f = floor_ste(2.0**self.max_bit / tf.reduce_sum(e16, axis=-1, keepdims=True))
        prob = floor_ste(e16 * f / 2.0 ** (self.max_bit - self.output_bit))
        return tf.cast(prob, _F32), tf.constant([2.0**-self.output_bit], _F32)

    def call(self, x, scaling_factor=None, integer_scores=False, training=False):
        if not self.quant_mode:
            return tf.nn.softmax(x, axis=-1), None
        q = x if integer_scores else tf.round(tf.cast(x, _F64) / tf.cast(scaling_factor, _F64))
        prob, s = self.forward_int(q, scaling_factor, training)
        return prob * s, s


class IntLayerNorm(keras.layers.Layer):
    """LayerNorm over the last axis, integer-only in quant mode (32-bit output, per-channel scale).

    Variables ``gamma``/``beta`` (n,) trainable (transformers' ``weight``/``bias``); buffer ``shift``
    (1,) (the variance's dynamic right shift, raised in training when the 32-bit variance would
    overflow); sub-layer ``activation`` (a ``QuantAct`` transformers builds and saves but never
    applies).  The integer rule is :class:`nezha_zoo.pt.quant.IntLayerNorm`'s.

    Args:
        normalized_shape (int): width ``n``.
        eps (float): float-mode epsilon.
        output_bit (int): bit width of the unused ``activation``.
        quant_mode (bool): integer (True) or float LayerNorm (False).
        force_dequant (str): ``"layernorm"`` or ``"nonlinear"`` keep the float LayerNorm in quant mode.
        name (str): ``"LayerNorm"``.

    Call: ``(x (..., n), scaling_factor (1,))``, ``training`` -> ``(q_out * s_out float64, s_out (n,))``;
    float mode ``(layer_norm(x) float32, None)``.
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float,
        output_bit: int = 8,
        quant_mode: bool = False,
        force_dequant: str = "none",
        name: str = "LayerNorm",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, autocast=False, **kwargs)
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.quant_mode = quant_mode and force_dequant not in ("nonlinear", "layernorm")
        self.output_bit = output_bit
        self.max_bit = MAX_BIT
        self.activation = QuantAct(output_bit, quant_mode=self.quant_mode, name="activation")

    def build(self, input_shape=None):
        self.gamma = self.add_weight(name="gamma", shape=(self.normalized_shape,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(self.normalized_shape,), initializer="zeros")
        self.shift = _buffer(self, "shift", (1,))
        _build_child(self.activation)

    def _variance(self, y: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
        shifted = floor_ste(y / pow2(tf.cast(shift, _F64)))
        return tf.reduce_sum(tf.square(shifted), axis=-1, keepdims=True)

    def call(self, x, scaling_factor=None, training=False):
        if not self.quant_mode:
            x = tf.cast(x, _F32)
            mean = tf.reduce_mean(x, axis=-1, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)
            return (x - mean) * tf.math.rsqrt(var + self.eps) * self.gamma + self.beta, None
        q_int = integer_of(x, scaling_factor) if _inference(training) else None
        if q_int is not None:
            y, out_scale = self._forward_int(q_int, scaling_factor)
            return _attach(y * tf.cast(out_scale, _F64), y, out_scale), out_scale
        y, out_scale = self._integer_rule(to_integer(x, scaling_factor), training)
        return y * tf.cast(out_scale, _F64), out_scale

    def _forward_int(self, q: tf.Tensor, scaling_factor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Inference on exact integers ``q`` (int32, 22-bit) at scale ``scaling_factor`` (which the
        rule does not read): ``(q_out float64 integers, s_out (n,))``.

        int64 where the float64 rule is exact (checked on per-row and per-channel values: the sums
        and ``sum(y_shifted**2)`` below 2**53, a variance of at least 1, an integral shift in [0, 62),
        bias integers below ``2**53 - 2**33``; ``|y| * factor < 3 * 2**31`` follows), else that rule.
        ``floor(v / 2**k)`` is an arithmetic right shift; the per-row scalars (mean, std, factor) stay
        in float64, as in the float64 rule.  int32 inputs make ``max|q| * n < 2**53`` hold for
        ``n < 2**22``.
        """
        n = q.shape[-1]
        shift = tf.reshape(tf.convert_to_tensor(self.shift), ())  # float32
        scale = tf.sqrt(tf.constant(float(n), _F32)) / 2.0**30
        gamma, beta = tf.cast(self.gamma, _F32), tf.cast(self.beta, _F32)
        bias_f = computed_once(tf.floor(exact_div(exact_div(beta, gamma), scale)))
        shift_i = tf.clip_by_value(tf.cast(shift, tf.int64), 0, 62)
        q64 = tf.cast(q, tf.int64)
        mean = tf.round(tf.cast(tf.reduce_sum(q64, axis=-1, keepdims=True), _F64) / float(n))
        y = q64 - tf.cast(mean, tf.int64)
        y_shifted = tf.bitwise.right_shift(y, shift_i)
        var = tf.reduce_sum(y_shifted * y_shifted, axis=-1, keepdims=True)  # squares < 2**46: no wrap
        exact = tf.constant(q.dtype in (tf.int8, tf.int32) and n < 2**22)
        exact = exact & tf.equal(shift, tf.round(shift)) & (shift >= 0) & (shift < 62)
        exact = exact & (tf.reduce_max(var) < 2**53) & (tf.reduce_min(var) >= 1)
        exact = exact & (tf.cast(tf.reduce_max(tf.abs(bias_f)), _F64) < 2.0**53 - 2.0**33)

        def int_rule():
            std = tf.floor(tf.sqrt(tf.cast(var, _F64))) * pow2(tf.cast(shift, _F64))
            factor = tf.cast(tf.floor(2.0**31 / std), tf.int64)
            out = tf.bitwise.right_shift(y * factor, tf.constant(1, tf.int64)) + tf.cast(bias_f, tf.int64)
            return tf.cast(out, _F64)

        def float_rule():
            return self._integer_rule(tf.cast(q, _F64), training=False)[0]

        return exact_or(exact, int_rule, float_rule), scale * gamma

    def _integer_rule(self, q: tf.Tensor, training: Any) -> tuple[tf.Tensor, tf.Tensor]:
        """The float64 rule on float64 integers ``q`` (..., n): ``(q_out float64 integers, s_out (n,))``;
        ``training`` raises the shift on overflow."""
        n = q.shape[-1]
        mean = round_ste(tf.reduce_sum(q, axis=-1, keepdims=True) / float(n))
        y = q - mean
        shift = tf.convert_to_tensor(self.shift)
        var = self._variance(y, shift)
        if training:  # transformers' overflow fallback: raise the shift until the variance fits 32 bits
            overflow = tf.reduce_max(var) >= 2.0**self.max_bit
            full = tf.stop_gradient(tf.reduce_sum(tf.square(y), axis=-1, keepdims=True))
            wanted = tf.cast(tf.reduce_max(_ceil_log2(tf.sqrt(full / 2.0**self.max_bit))), _F32)
            shift = tf.where(overflow, tf.maximum(shift, wanted), shift)
            self.shift.assign(shift)
            var = self._variance(y, shift)
            check = tf.debugging.assert_less(
                tf.reduce_max(var),
                tf.constant(2.0**self.max_bit + 0.1, _F64),
                message=f"{self.name}: the variance still overflows 32 bits after the shift adjustment",
            )
            with tf.control_dependencies([check]):
                var = tf.identity(var)
        std = floor_ste(tf.sqrt(var)) * pow2(tf.cast(shift, _F64))
        factor = floor_ste(2.0**31 / std)
        y = floor_ste(y * factor / 2.0)
        scale = tf.sqrt(tf.constant(float(n), _F32)) / 2.0**30
        gamma, beta = tf.cast(self.gamma, _F32), tf.cast(self.beta, _F32)
        bias_int = tf.cast(tf.stop_gradient(computed_once(tf.floor((beta / gamma) / scale))), _F64)
        y = y + bias_int
        out_scale = scale * gamma  # (n,): gamma's gradient flows through the scale
        return y, out_scale
