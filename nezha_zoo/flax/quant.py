"""I-BERT's integer-only kernels in Flax linen: quantized embedding, activation, linear, GELU, softmax, LayerNorm.

The rules are those of transformers 4.57.6 ``ibert/quant_modules.py`` as written down (and made exact)
in :mod:`nezha_zoo.pt.quant`; this module follows them step for step so that the integers are the
PyTorch backend's, bit for bit.  Conventions as there: a quantized tensor travels as a pair
``(x, s)`` with ``x = q * s`` (``q`` integer, ``s`` a float32 scale of shape (1,) or per channel
(C,)); float mode passes ``s = None`` and computes the plain float op.

Width and exactness (why float64, and where):

* every requantized tensor fits float32 / int32 (8, 16 and 22 bits), but several intermediate integers
  do not: linear accumulators plus 32-bit biases (~2**32), LayerNorm outputs (``2**30 * sqrt(n)`` plus
  the folded bias, ~2**35), GELU products (~2**40), softmax exponentials (up to ~2**52) and the dyadic
  requantization products ``q * m`` (``m`` a 31-bit mantissa, so up to ~2**83, rounded to 53 bits by
  definition, as in transformers' ``FixedPointMul`` and :func:`nezha_zoo.pt.quant.fixed_point_requantize`).
  Reproducing those, including the float64 rounding that is part of the definition, needs float64.
* JAX computes in 32 bits unless ``jax_enable_x64`` is on.  Instead of turning it on globally, the
  quant-mode forward of an I-BERT module runs inside the scoped switch :func:`x64_scope`
  (``jax.enable_x64(True)``): within it the kernels below hold those integers in float64, exactly as
  the PyTorch backend; outside it every array stays 32-bit (params, outputs, float mode).  This works
  inside ``jax.jit`` (the switch is read at trace time).  Backends without float64 (TPU) cannot run
  quant mode this way.
* the linear layers' matrix products are real integer products where the CPU has int8 units
  (:func:`nezha_zoo.families.ibert.int8_products`, read at trace time): ``jax.lax.dot_general`` of
  int8 operands with int32 accumulation (:func:`int8_matmul`, exact below 2**17 terms); elsewhere
  float32 chunks summed in float64 (:func:`integer_matmul`), the same integers.  The attention
  scores are int8 dots too (``_int_bmm`` in ``ibert.py``); the probability x value product uses
  float32, exact for integer operands (|.| <= 256 * 128 * L < 2**24 for L < 512).
* scale-derived constants (``floor(coeff / s)``, bias integers, ``1 // s``) are float32 elementwise
  IEEE operations, the same numbers in every framework.

Calibration: a :class:`QuantAct` updates its running range ``x_min``/``x_max`` (``buffers`` collection)
when called with ``deterministic=False`` *and* the ``buffers`` collection mutable (the wrapper's
``train=True``), as transformers' training-mode ``QuantAct``; in quant mode it then also writes the
derived buffers (``act_scaling_factor``, ``weight_integer``...) that transformers refreshes on every
call.  Gradients: rounding here has zero gradient (quantization-aware training is the PyTorch
backend's); float mode trains normally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nezha_zoo.families.ibert import (
    ACT_RANGE_INIT,
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
from nezha_zoo.flax.layers import freeze_padding_row
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import Kind

__all__ = [
    "BUFFERS",
    "x64_scope",
    "symmetric_scale",
    "symmetric_quantize",
    "to_integer",
    "exact_div",
    "rdiv",
    "frexp_multiplier",
    "fixed_point_requantize",
    "integer_matmul",
    "int8_matmul",
    "QuantEmbedding",
    "QuantAct",
    "QuantLinear",
    "IntGELU",
    "IntSoftmax",
    "IntLayerNorm",
]

_LAYOUT = LAYOUTS["flax"]
#: The variable collection of the quantization state (the flax layout's home of ``Kind.BUFFER``).
BUFFERS = _LAYOUT.collection[Kind.BUFFER]
_KERNEL, _EMBEDDING = _LAYOUT.leaf[Kind.DENSE], _LAYOUT.leaf[Kind.EMBEDDING]
_SCALE, _BIAS = _LAYOUT.leaf[Kind.NORM_SCALE], "bias"


@contextlib.contextmanager
def x64_scope() -> Iterator[None]:
    """Float64 available for the code inside (``jax.enable_x64(True)``), the global setting untouched."""
    with jax.enable_x64(True):
        yield


def _f64(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float64)


def exact_div(a: Any, b: Any) -> jax.Array:
    """IEEE-correct ``a / b`` (broadcasting).

    XLA rewrites a division by a broadcast divisor (a scalar or a per-channel vector) into a
    multiplication by its reciprocal, which is off by one ulp for ~5% of float32 quotients; the
    integer rules here (``floor(q / x0)``, scales ``max / 127``, dyadic ratios) need the correctly
    rounded quotient that torch computes.  Materialising the divisor behind an optimisation barrier
    keeps the real division.
    """
    a, b = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b))
    return a / jax.lax.optimization_barrier(b)


def rdiv(c: float, t: jax.Array) -> jax.Array:
    """``c / t`` for a Python number ``c`` as torch computes it: ``fl(fl(1 / t) * c)`` in ``t``'s dtype.

    (torch's ``Tensor.__rtruediv__`` is ``reciprocal(t) * c``: two roundings, not one; transformers'
    constants ``floor(coeff / s)`` are defined by it.)
    """
    return (1.0 / t) * jnp.asarray(c, t.dtype)


# --- scaling factors and rounding ----------------------------------------------------------------


def symmetric_scale(num_bits: int, x_min: jax.Array, x_max: jax.Array) -> jax.Array:
    """``max(|x_min|, |x_max|, 1e-8) / (2**(b-1) - 1)`` in float32, elementwise ((1,) or (C,))."""
    n = 2 ** (num_bits - 1) - 1
    scale = jnp.maximum(jnp.abs(x_min), jnp.abs(x_max)).astype(jnp.float32)
    return exact_div(jnp.maximum(scale, jnp.float32(1e-8)), jnp.float32(n))


def symmetric_quantize(x: jax.Array, num_bits: int, scale: jax.Array) -> jax.Array:
    """``clamp(round(fl32(1/s) * x), -n, n - 1)`` with ``n = 2**(b-1) - 1`` (float32 integers).

    Args:
        x (float32 (out, in) with ``scale`` (out,), or any shape with ``scale`` (1,) / (C,) on the last axis).
        num_bits (int): bit width (8 for weights, 32 for biases).
        scale (float32 array): the scaling factor.
    """
    n = 2 ** (num_bits - 1) - 1
    s = scale.reshape(-1, 1) if x.ndim == 2 and scale.shape[0] != 1 else scale
    q = jnp.round((jnp.float32(1.0) / s) * x.astype(jnp.float32))
    return jnp.clip(q, -n, n - 1)


def to_integer(x: jax.Array, scale: jax.Array) -> jax.Array:
    """The exact integer ``q = round(x / s)`` of a dequantized pair, float64 (call inside :func:`x64_scope`)."""
    return jnp.round(exact_div(_f64(x), _f64(scale)))


def frexp_multiplier(ratio: jax.Array, max_bit: int = 31) -> tuple[jax.Array, jax.Array]:
    """Dyadic form ``ratio ~= m / 2**e`` of a float64 ratio: integer ``m`` below ``2**max_bit``.

    ``ratio = f * 2**k`` (``frexp``, ``0.5 <= |f| < 1``), ``m = sign(f) * floor(|f| * 2**max_bit + 0.5)``
    (transformers' ``decimal.ROUND_HALF_UP``), ``e = max_bit - k``.  Returns float64 ``(m, e)``.
    """
    f, k = jnp.frexp(ratio)
    m = jnp.sign(f) * jnp.floor(jnp.abs(f) * float(2**max_bit) + 0.5)
    return m, float(max_bit) - k.astype(jnp.float64)


def fixed_point_requantize(
    q: jax.Array,
    scale: jax.Array,
    num_bits: int,
    out_scale: jax.Array,
    identity_q: jax.Array | None = None,
    identity_scale: jax.Array | None = None,
) -> jax.Array:
    """Integer rescale of ``q`` (scale ``s``) to ``out_scale``, plus an optional residual integer.

    ``clamp(R(q, s) + R(q_id, s_id), -2**(b-1), 2**(b-1) - 1)`` with
    ``R(q, s) = round_half_even(fl64(q * m) * 2**-e)``, ``(m, e) = frexp_multiplier(fl64(s) / fl64(s_out))``.

    Args:
        q (float64 (..., C)): exact integers.
        scale (float32 (1,) or (C,)): scale of ``q``.
        num_bits (int): output bit width ``b``.
        out_scale (float32 (1,)): output scale.
        identity_q, identity_scale: a second integer tensor (float64) and its scale.
    Returns:
        float64 integers shaped like ``q``.
    """
    n = 2 ** (num_bits - 1) - 1
    s_out = _f64(out_scale)
    m, e = frexp_multiplier(exact_div(_f64(scale), s_out))
    out = jnp.round(jnp.ldexp(q * m, (-e).astype(jnp.int32)))
    if identity_q is not None:
        m1, e1 = frexp_multiplier(exact_div(_f64(identity_scale), s_out))
        out = out + jnp.round(jnp.ldexp(identity_q * m1, (-e1).astype(jnp.int32)))
    return jnp.clip(out, -n - 1, n)


def integer_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact ``a @ b`` of 8-bit integers without int8 units: float32 chunks, float64 sum (in :func:`x64_scope`).

    The contraction is split into chunks of :data:`EXACT_CHUNK` terms, whose float32 sums are exact
    in any order; the chunk results are added in float64.

    Args:
        a (..., K), b (K, N): integer-valued arrays within [-128, 127] (any dtype).
    Returns:
        float64 (..., N).
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    K = a.shape[-1]
    out = None
    for k0 in range(0, K, EXACT_CHUNK):
        part = jnp.matmul(a[..., k0 : k0 + EXACT_CHUNK], b[k0 : k0 + EXACT_CHUNK]).astype(jnp.float64)
        out = part if out is None else out + part
    return out


def int8_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact ``a @ b`` on int8 units: int8 x int8 ``dot_general`` with int32 accumulation.

    Args:
        a (..., K), b (K, N): integer-valued arrays within [-128, 127] (any dtype; cast to int8),
            ``K <= INT32_EXACT_TERMS`` so the int32 sums cannot wrap.
    Returns:
        int32 (..., N).
    """
    if a.shape[-1] > INT32_EXACT_TERMS:
        raise ValueError(
            f"int8_matmul: {a.shape[-1]} terms may overflow the int32 accumulator (limit {INT32_EXACT_TERMS})"
        )
    dims = (((a.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(a.astype(jnp.int8), b.astype(jnp.int8), dims, preferred_element_type=jnp.int32)


# --- modules -------------------------------------------------------------------------------------


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class QuantAct(nn.Module):
    """Activation (re)quantization to ``activation_bit`` bits with a calibrated running range.

    Buffers (``buffers`` collection, transformers' names): ``x_min``, ``x_max`` (1,) (start at
    -1e-5 / +1e-5), ``act_scaling_factor`` (1,).  Calibration (``deterministic=False`` with a mutable
    ``buffers`` collection, float or quant mode): the first update (range still inside +-1.1e-5) adds
    the batch min/max of ``x + identity`` to the initial range, later ones are the EMA
    ``r * momentum + batch * (1 - momentum)``; otherwise the range is frozen.  Quant mode:
    ``s = symmetric_scale(bits, x_min, x_max)``; with ``pre_act_scaling_factor`` the integers are
    rescaled by :func:`fixed_point_requantize` (the residual ``identity`` added in the integer
    domain), without it ``x + identity`` is quantized directly (``round(fl32(1/s) * x)``).

    Attributes:
        activation_bit (int): output bit width.
        quant_mode (bool): quantize (True) or pass ``x + identity`` through.
        act_range_momentum (float): EMA momentum (-1: running min/max).

    Call: ``x`` (..., C), ``pre_act_scaling_factor`` (1,)/(C,) or None, ``identity`` (..., C) and its
    scale, ``deterministic`` -> ``(x_out float32 (..., C), s (1,) or None)``.
    """

    activation_bit: int
    quant_mode: bool = False
    act_range_momentum: float = 0.95

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        pre_act_scaling_factor: jax.Array | None = None,
        identity: jax.Array | None = None,
        identity_scaling_factor: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array | None]:
        x_min = self.variable(BUFFERS, "x_min", lambda: jnp.full((1,), -ACT_RANGE_INIT, jnp.float32))
        x_max = self.variable(BUFFERS, "x_max", lambda: jnp.full((1,), ACT_RANGE_INIT, jnp.float32))
        act_scale = self.variable(BUFFERS, "act_scaling_factor", lambda: jnp.zeros((1,), jnp.float32))
        x_act = x if identity is None else identity + x
        update = not deterministic and self.is_mutable_collection(BUFFERS)
        if update:
            lo = jax.lax.stop_gradient(jnp.min(x_act)).astype(jnp.float32)
            hi = jax.lax.stop_gradient(jnp.max(x_act)).astype(jnp.float32)
            r_min, r_max = x_min.value, x_max.value
            fresh = (jnp.min(r_min) > -UNCALIBRATED_RANGE) & (jnp.max(r_max) < UNCALIBRATED_RANGE)
            m = self.act_range_momentum
            if m == -1:
                ema_min, ema_max = jnp.minimum(r_min, lo), jnp.maximum(r_max, hi)
            else:
                ema_min, ema_max = r_min * m + lo * (1 - m), r_max * m + hi * (1 - m)
            x_min.value = jnp.where(fresh, r_min + lo, ema_min).astype(jnp.float32)
            x_max.value = jnp.where(fresh, r_max + hi, ema_max).astype(jnp.float32)
        if not self.quant_mode:
            return x_act, None
        scale = symmetric_scale(self.activation_bit, x_min.value, x_max.value)
        if update:
            act_scale.value = scale
        if pre_act_scaling_factor is None:
            q = symmetric_quantize(x_act, self.activation_bit, scale)
        else:
            q_id = None if identity is None else to_integer(identity, identity_scaling_factor)
            q = fixed_point_requantize(
                to_integer(x, pre_act_scaling_factor),
                pre_act_scaling_factor,
                self.activation_bit,
                scale,
                q_id,
                identity_scaling_factor,
            ).astype(jnp.float32)
        return q * scale, scale


class QuantEmbedding(nn.Module):
    """Embedding table with symmetric per-tensor 8-bit weight quantization in quant mode.

    Params: ``embedding`` (rows, dim).  Buffers: ``weight_scaling_factor`` (1,), ``weight_integer``
    (rows, dim) (written when ``buffers`` is mutable).

    Attributes:
        num_embeddings (int), features (int): table shape.
        padding_idx (int | None): row that receives no gradient.
        init_std (float): normal init std.
        weight_bit (int): weight bit width (8).
        quant_mode (bool): quantized lookup (True) or plain lookup (False).

    Call: ``ids`` int (...,) -> ``(x float32 (..., dim), s (1,) or None)``; quant mode
    ``x = weight_integer[ids] * s``.
    """

    num_embeddings: int
    features: int
    padding_idx: int | None = None
    init_std: float = 0.02
    weight_bit: int = 8
    quant_mode: bool = False

    @nn.compact
    def __call__(self, ids: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
        table = self.param(_EMBEDDING, _normal(self.init_std), (self.num_embeddings, self.features), jnp.float32)
        w_scale = self.variable(BUFFERS, "weight_scaling_factor", lambda: jnp.zeros((1,), jnp.float32))
        w_int_buf = self.variable(BUFFERS, "weight_integer", lambda: jnp.zeros(table.shape, jnp.float32))
        if not self.quant_mode:
            return freeze_padding_row(jnp.take(table, ids, axis=0), ids, self.padding_idx), None
        w = jax.lax.stop_gradient(table)
        scale = symmetric_scale(self.weight_bit, jnp.min(w)[None], jnp.max(w)[None])
        w_int = symmetric_quantize(w, self.weight_bit, scale)
        if not deterministic and self.is_mutable_collection(BUFFERS):
            w_scale.value, w_int_buf.value = scale, w_int
        return jnp.take(w_int, ids, axis=0) * scale, scale


class QuantLinear(nn.Module):
    """Linear layer with 8-bit per-output-channel weights and 32-bit biases in quant mode.

    Params: ``kernel`` (in, out), ``bias`` (out,).  Buffers: ``weight_integer`` (out, in),
    ``fc_scaling_factor`` (out,), ``bias_integer`` (out,).  Quant mode: ``s_w`` per output row of
    ``W = kernel.T``, ``W_int = symmetric_quantize(W, 8, s_w)``, ``s_out = s_w * s_in``,
    ``b_int = symmetric_quantize(b, 32, s_out)``, ``acc = x_int @ W_int.T + b_int`` (int8 x int8 ->
    int32 product, exact); returns ``(acc * s_out as float64, s_out (out,))`` (call inside
    :func:`x64_scope`).

    Attributes:
        in_features (int), features (int): input and output widths.
        init_std (float): kernel init std.
        weight_bit (int), bias_bit (int): 8 and 32.
        quant_mode (bool): integer (True) or float ``x @ kernel + bias`` (False).
        dtype: float-mode computation dtype.

    Call: ``x`` (..., in), ``prev_act_scaling_factor`` (1,) (required in quant mode) -> ``(y (..., out), s)``.
    """

    in_features: int
    features: int
    init_std: float = 0.02
    weight_bit: int = 8
    bias_bit: int = 32
    quant_mode: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, prev_act_scaling_factor: jax.Array | None = None, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param(_KERNEL, _normal(self.init_std), (self.in_features, self.features), jnp.float32)
        bias = self.param(_BIAS, nn.initializers.zeros, (self.features,), jnp.float32)
        w_int_buf = self.variable(
            BUFFERS, "weight_integer", lambda: jnp.zeros((self.features, self.in_features), jnp.float32)
        )
        fc_scale = self.variable(BUFFERS, "fc_scaling_factor", lambda: jnp.zeros((self.features,), jnp.float32))
        b_int_buf = self.variable(BUFFERS, "bias_integer", lambda: jnp.zeros((self.features,), jnp.float32))
        if not self.quant_mode:
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
            return y, None
        if prev_act_scaling_factor is None or tuple(prev_act_scaling_factor.shape) != (1,):
            raise ValueError(
                "QuantLinear: prev_act_scaling_factor must be a per-tensor scale of shape (1,), got "
                f"{None if prev_act_scaling_factor is None else tuple(prev_act_scaling_factor.shape)}"
            )
        w = jax.lax.stop_gradient(kernel).T  # (in, out) -> canonical (out, in)
        w_scale = symmetric_scale(self.weight_bit, jnp.min(w, axis=1), jnp.max(w, axis=1))  # (out,)
        w_int = symmetric_quantize(w, self.weight_bit, w_scale)  # (out, in)
        out_scale = w_scale * prev_act_scaling_factor  # (out,) float32
        b_int = symmetric_quantize(bias, self.bias_bit, out_scale)
        if not deterministic and self.is_mutable_collection(BUFFERS):
            w_int_buf.value, fc_scale.value, b_int_buf.value = w_int, w_scale, b_int
        x_int = jnp.round(x.astype(jnp.float32) / prev_act_scaling_factor)  # |x_int| <= 128: exact
        if int8_products() and self.in_features <= INT32_EXACT_TERMS:
            acc = int8_matmul(x_int, w_int.T).astype(jnp.float64)  # int8 units, exact int32 sums
        else:
            acc = integer_matmul(x_int, w_int.T)
        acc = acc + _f64(b_int)
        return acc * _f64(out_scale), out_scale


class IntGELU(nn.Module):
    """GELU; integer-only in quant mode: ``x * (1 + erf_int(x / sqrt 2)) / 2`` (I-BERT's polynomial erf).

    See :class:`nezha_zoo.pt.quant.IntGELU` for the integer rule (``a = -0.2888``, ``b = -1.769``,
    shift ``2**14``); ``q_out`` (~2**40) is float64.

    Attributes:
        quant_mode (bool): integer GELU; False, or ``force_dequant`` in ("gelu", "nonlinear"): exact erf GELU.
        force_dequant (str): config value.

    Call: ``(x (..., C), s)`` -> ``(q_out * s_out as float64, s_out)`` or ``(gelu(x) float32, None)``.
    """

    quant_mode: bool = True
    force_dequant: str = "none"

    @property
    def active(self) -> bool:
        return self.quant_mode and self.force_dequant not in ("nonlinear", "gelu")

    def __call__(self, x: jax.Array, scaling_factor: jax.Array | None = None):
        if not self.active:
            return jax.nn.gelu(x.astype(jnp.float32), approximate=False), None
        (a, b), const = GELU_COEFFS, GELU_SHIFT
        q = to_integer(x, scaling_factor)
        s_e = exact_div(scaling_factor, jnp.float32(GELU_SQRT2))  # float32
        b_int = _f64(jnp.floor(rdiv(b, s_e)))
        c_int = _f64(jnp.floor(rdiv(1.0 / a, s_e**2)))
        abs_int = jnp.minimum(jnp.abs(q), -b_int)
        y = jnp.sign(q) * ((abs_int + b_int) ** 2 + c_int)
        y = jnp.floor(y / 2**const)
        s_y = s_e**2 * a * 2**const  # float32
        one = _f64(jnp.floor_divide(jnp.float32(1.0), s_y))  # float32 floor division, as Python/torch
        q = q * (y + one)
        out_scale = scaling_factor * s_y / 2
        return q * _f64(out_scale), out_scale


class IntSoftmax(nn.Module):
    """Softmax over the last axis; integer-only in quant mode with ``output_bit``-bit probabilities.

    See :class:`nezha_zoo.pt.quant.IntSoftmax` for the rule (``exp`` by ``2**-k`` and a quadratic,
    exponentials requantized to 16 bits by ``act``, normalised by ``floor(2**32 / sum)``, scale
    ``2**-output_bit``).  Submodule ``act`` (:class:`QuantAct`, 16 bits, calibrated on the
    exponentials themselves, as transformers).

    Attributes:
        output_bit (int): probability bit width (8).
        quant_mode (bool), force_dequant (str): ``"softmax"``/``"nonlinear"`` keep the float softmax.

    Call: :meth:`forward_int` ``(q float64 integer scores (..., L), s (1,))`` -> ``(prob float32
    integers, 2**-output_bit)``; ``__call__(x float scores, None)`` -> ``(softmax(x), None)``.
    """

    output_bit: int = 8
    quant_mode: bool = False
    force_dequant: str = "none"

    @property
    def active(self) -> bool:
        return self.quant_mode and self.force_dequant not in ("nonlinear", "softmax")

    def setup(self) -> None:
        self.act = QuantAct(SOFTMAX_EXP_BIT, quant_mode=self.active)

    def __call__(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, None]:
        # Float path; the act's range is still calibrated on nothing (transformers never calls it here).
        return jax.nn.softmax(x, axis=-1), None

    def forward_int(self, q: jax.Array, scale: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        x0_c, const, max_bit = EXP_X0, EXP_SHIFT, MAX_BIT
        a, b, c = EXP_COEFFS
        coef0, coef1, coef2 = a, b / a, c / a
        q = q - jnp.max(q, axis=-1, keepdims=True)
        x0 = _f64(jnp.floor(rdiv(x0_c, scale)))
        b_int = _f64(jnp.floor(rdiv(coef1, scale)))
        c_int = _f64(jnp.floor(rdiv(coef2, scale**2)))
        q = jnp.maximum(q, const * x0)
        k = jnp.floor(exact_div(q, x0))
        r = q - x0 * k
        p = (r + b_int) * r + c_int
        e = jnp.maximum(jnp.floor(jnp.ldexp(p, (const - k).astype(jnp.int32))), 0.0)  # exact * 2**(30 - k)
        s_e = coef0 * scale**2 / 2**const  # float32
        e16, s16 = self.act(e, s_e, deterministic=deterministic)
        e16 = to_integer(e16, s16)
        f = jnp.floor(rdiv(2.0**max_bit, jnp.sum(e16, axis=-1, keepdims=True)))
        prob = jnp.floor(e16 * f / 2.0 ** (max_bit - self.output_bit))
        return prob.astype(jnp.float32), jnp.full((1,), 2.0**-self.output_bit, jnp.float32)


class IntLayerNorm(nn.Module):
    """LayerNorm over the last axis; integer-only in quant mode (32-bit output, per-channel scale).

    Params ``scale``/``bias`` (n,); buffer ``shift`` (1,) (raised in calibration when the variance
    overflows 32 bits); submodule ``activation`` (its buffers are saved, never used, as transformers).
    See :class:`nezha_zoo.pt.quant.IntLayerNorm` for the integer rule.  Float mode is transformers'
    hand-written LayerNorm ``(x - mean) / sqrt(eps + var) * w + b``.

    Attributes:
        features (int): width ``n``.
        eps (float): float-mode epsilon.
        output_bit (int): bit width of the unused ``activation``.
        quant_mode (bool), force_dequant (str): ``"layernorm"``/``"nonlinear"`` keep the float LayerNorm.

    Call: ``(x (B, L, n), s (1,))``, ``deterministic`` -> ``(q_out * s_out as float64, s_out (n,))`` or
    ``(layer_norm(x), None)``.
    """

    features: int
    eps: float = 1e-12
    output_bit: int = 32
    quant_mode: bool = False
    force_dequant: str = "none"

    @property
    def active(self) -> bool:
        return self.quant_mode and self.force_dequant not in ("nonlinear", "layernorm")

    @nn.compact
    def __call__(self, x: jax.Array, scaling_factor: jax.Array | None = None, deterministic: bool = True):
        weight = self.param(_SCALE, nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param(_BIAS, nn.initializers.zeros, (self.features,), jnp.float32)
        shift = self.variable(BUFFERS, "shift", lambda: jnp.zeros((1,), jnp.float32))
        QuantAct(self.output_bit, quant_mode=self.active, name="activation")  # declared, never applied
        if not self.active:
            x = x.astype(jnp.float32)
            y = x - jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(y**2, axis=-1, keepdims=True)
            return y / jnp.sqrt(self.eps + var) * weight + bias, None
        max_bit = MAX_BIT
        n = x.shape[-1]
        q = to_integer(x, scaling_factor)
        mean = jnp.round(exact_div(jnp.sum(q, axis=-1, keepdims=True), jnp.float64(n)))
        y = q - mean

        def variance(s):
            return jnp.sum(jnp.floor(jnp.ldexp(y, -s.astype(jnp.int32))) ** 2, axis=-1, keepdims=True)

        s_val = shift.value
        var = variance(s_val)
        if not deterministic and self.is_mutable_collection(BUFFERS):
            # transformers' overflow fallback: widen the shift so the variance fits 32 bits
            full = jnp.sum(y**2, axis=-1, keepdims=True)
            needed = jnp.max(jnp.ceil(jnp.log2(jnp.sqrt(full / 2.0**max_bit)))).astype(jnp.float32)
            overflow = jnp.max(var) >= 2.0**max_bit
            s_val = jnp.where(overflow, jnp.maximum(s_val, needed), s_val)
            shift.value = s_val
            var = jnp.where(overflow, variance(s_val), var)
        std = jnp.ldexp(jnp.floor(jnp.sqrt(var)), s_val.astype(jnp.int32))
        factor = jnp.floor(rdiv(2.0**31, std))
        y = jnp.floor(y * factor / 2)
        scale = jnp.sqrt(jnp.float32(n)) / jnp.float32(2**30)
        bias_int = _f64(jnp.floor(exact_div(bias / weight, scale)))
        y = y + bias_int
        out_scale = scale * weight  # (n,)
        return y * _f64(out_scale), out_scale
