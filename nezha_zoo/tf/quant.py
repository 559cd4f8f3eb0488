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

from typing import Any

import keras
import tensorflow as tf

from nezha_zoo.families.ibert import (
    EXACT_CHUNK,
    EXP_COEFFS,
    EXP_SHIFT,
    EXP_X0,
    GELU_COEFFS,
    GELU_SHIFT,
    GELU_SQRT2,
    INT32_EXACT_TERMS,
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
    "symmetric_scale",
    "symmetric_quantize",
    "round_ste",
    "floor_ste",
    "to_integer",
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


def _rdiv(c: float, t: tf.Tensor) -> tf.Tensor:
    """``c / t`` for a Python number ``c`` as torch computes it: ``fl(fl(1 / t) * c)`` in ``t``'s dtype.

    torch's ``Tensor.__rtruediv__`` is ``reciprocal(t) * c`` (two roundings), and transformers'
    integer constants ``floor(coeff / s)`` are defined by it; a true division differs by one ulp
    for some ``s``, which moves ``floor`` by one.
    """
    return (1.0 / t) * tf.constant(c, t.dtype)


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
    return tf.stop_gradient(tf.maximum(scale, 1e-8) / n)


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
    inv = 1.0 / scale  # the float32 reciprocal times x, as transformers' linear_quantize

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
    return tf.round(q * m * pow2(-e))  # ldexp(q * m, -e): exact power-of-two scaling


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
        if identity is None:
            x_act = x
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
            return q * scale, scale
        bits, s_in, s_id = self.activation_bit, pre_act_scaling_factor, identity_scaling_factor

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

    def freeze(self, frozen: bool = True) -> None:
        """Quantize the kernel now and reuse ``weight_integer`` / ``fc_scaling_factor`` in later inference
        calls (True), or requantize on every call as transformers does (False).  The bias is always
        requantized (its scale follows the input's range).  Call again after changing the kernel."""
        if frozen and self.quant_mode:
            self.quantized_weight()
        self.frozen = frozen and self.quant_mode

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
        x_int = round_ste(tf.cast(x, _F32) / prev_act_scaling_factor)  # |x_int| <= 2**21: exact in float32
        int8 = not training and self.in_features <= INT32_EXACT_TERMS and int8_products() and in_xla_context()
        if int8 and self.frozen:
            # int8 units under XLA (8-bit activations and weights, int32 sums: exact), inference only
            scale = tf.convert_to_tensor(self.fc_scaling_factor)
            acc = tf.cast(int8_matmul(x_int, tf.convert_to_tensor(self.weight_integer), transpose_b=True), _F64)
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
        b_int = symmetric_quantize(tf.cast(self.bias, _F32), self.bias_bit, out_scale)
        self.bias_integer.assign(tf.stop_gradient(b_int))
        acc = acc + tf.cast(b_int, _F64)
        return acc * tf.cast(out_scale, _F64), out_scale


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
        b_int = tf.cast(tf.floor(_rdiv(self.coeff[1], scale)), _F64)
        c_int = tf.cast(tf.floor(_rdiv(self.coeff[2], tf.square(scale))), _F64)
        sign = tf.sign(q)
        abs_int = tf.minimum(tf.abs(q), -b_int)
        y = sign * (tf.square(abs_int + b_int) + c_int)
        y = floor_ste(y / 2.0**self.const)
        s_y = tf.square(scale) * self.coeff[0] * 2.0**self.const
        return y, s_y

    def call(self, x, scaling_factor=None):
        if not self.quant_mode:
            return tf.nn.gelu(tf.cast(x, _F32), approximate=False), None
        q = to_integer(x, scaling_factor)
        y, s_y = self.int_erf(q, tf.stop_gradient(scaling_factor) / self.k)
        one = tf.cast(tf.stop_gradient(python_floordiv(1.0, s_y)), _F64)
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
        x0 = tf.cast(tf.floor(_rdiv(self.x0, scale)), _F64)
        b_int = tf.cast(tf.floor(_rdiv(self.coef[1], scale)), _F64)
        c_int = tf.cast(tf.floor(_rdiv(self.coef[2], tf.square(scale))), _F64)
        q = tf.maximum(q, self.const * x0)
        k = floor_ste(q / x0)
        r = q - x0 * k
        p = (r + b_int) * r + c_int
        e = tf.maximum(floor_ste(p * exp2(self.const - k)), 0.0)
        return e, self.coef[0] * tf.square(scale) / 2.0**self.const

    def forward_int(self, q: tf.Tensor, scale: tf.Tensor, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Integer softmax of float64 integer scores ``q`` (..., L): ``(prob float32 integers, 2**-b (1,))``."""
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
        n = x.shape[-1]
        q = to_integer(x, scaling_factor)
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
        bias_int = tf.cast(tf.stop_gradient(tf.floor((beta / gamma) / scale)), _F64)
        y = y + bias_int
        out_scale = scale * gamma  # (n,): gamma's gradient flows through the scale
        return y * tf.cast(out_scale, _F64), out_scale
