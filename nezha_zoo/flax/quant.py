"""I-BERT's integer-only kernels in Flax linen: quantized embedding, activation, linear, GELU, softmax, LayerNorm.

The rules are those of transformers 4.57.6 ``ibert/quant_modules.py`` as written down (and made exact)
in :mod:`nezha_zoo.pt.quant`; this module follows them step for step so that the integers are the
PyTorch backend's, bit for bit.  Conventions as there: a quantized tensor travels as a pair
``(x, s)`` with ``x = q * s`` (``q`` integer, ``s`` a float32 scale of shape (1,) or per channel
(C,)); float mode passes ``s = None`` and computes the plain float op.

Width and exactness (integer dtypes, and where float64 remains):

* every requantized tensor fits int8/int16/int32 (8, 16 and 22 bits), but several intermediate integers
  do not fit 32 bits: linear accumulators plus 32-bit biases (~2**32), LayerNorm outputs
  (``2**30 * sqrt(n)`` plus the folded bias, ~2**35), GELU products (~2**40), softmax exponentials (up
  to ~2**52) and the dyadic requantization products ``q * m`` (``m`` a 31-bit mantissa, so up to
  ~2**83, rounded to 53 bits by definition, as in transformers' ``FixedPointMul`` and
  :func:`nezha_zoo.pt.quant.fixed_point_requantize`).
* JAX has no 64-bit types unless ``jax_enable_x64`` is on.  Instead of turning it on globally, the
  quant-mode forward of an I-BERT module runs inside the scoped switch :func:`x64_scope`
  (``jax.enable_x64(True)``, read at trace time, so it works inside ``jax.jit`` and costs nothing once
  traced); outside it every array stays 32-bit (params, outputs, float mode).
* inference in integer dtypes (issue #23): inside the model a quantized tensor travels as its
  integers (:func:`integer_of`: int8/int16/int32 requantized activations, int32 contexts, int64 linear,
  GELU and LayerNorm outputs) and the kernels compute on them: the linear bias in int64, the GELU and
  LayerNorm polynomials in int64 with arithmetic right shifts for ``floor(/ 2**k)``, the softmax
  exponent steps in int32/int64 and its normalisation in int64.  Each of those kernels tests (scalar
  tests on the scales and maxima) that the float64 rule is exact for its operands and otherwise takes
  that rule through :func:`jax.lax.cond`, so the integers are the float64 rule's bit for bit (and the
  PyTorch backend's).  Float64 remains where it is the definition: the dyadic product of a
  requantization (one multiply and round per element, :func:`requantize_int`), the softmax ``act``'s
  division of the exponentials by their scale, and per-row / per-channel scalars.  A kernel given the
  dequantized float ``x`` (its public form) recovers the integers in float64 (:func:`to_integer`) and
  follows the float64 rules, returning float64 ``q * s`` as before.
* the linear layers' matrix products are real integer products where the CPU has int8 units
  (:func:`nezha_zoo.families.ibert.int8_products`, read at trace time): ``jax.lax.dot_general`` of
  int8 operands with int32 accumulation (:func:`int8_matmul`, exact below 2**17 terms); elsewhere
  float32 chunks summed in int32 (:func:`integer_matmul`), the same integers.  The attention scores
  are exact float32 products of the int8 integers (``_int_bmm`` in ``ibert.py``: XLA's CPU has no
  GEMM for a batched int8 dot); the probability x value product uses float32,
  exact for integer operands (|.| <= 256 * 128 < 2**24: the probabilities sum to at most 2**8).  Every
  such product is a :func:`standalone_dot` (XLA's fused dots are not GEMMs).
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
import functools
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
    INT8_MIN,
    INT32_EXACT_TERMS,
    MASKED_SCORE,
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
    "QUANTIZED",
    "x64_scope",
    "symmetric_scale",
    "symmetric_quantize",
    "to_integer",
    "integer_of",
    "dequantize",
    "float_values",
    "exact_div",
    "computed_once",
    "materialized",
    "rdiv",
    "frexp_multiplier",
    "fixed_point_requantize",
    "requantize_int",
    "integer_matmul",
    "int8_matmul",
    "standalone_dot",
    "quantize_table",
    "quantize_kernel",
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
#: Variable collection of the weight quantizations of inference calls (:func:`quantize_kernel` of each
#: :class:`QuantLinear` kernel, on its params path: ``kernel_int8``, ``fc_scaling_factor``;
#: :func:`quantize_table` of each :class:`QuantEmbedding` table: ``weight_integer``,
#: ``weight_scaling_factor``), computed once per params array by the wrapper outside the compiled
#: forward, as the packed kernels.
QUANTIZED = "quantized"


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


def computed_once(x: jax.Array) -> jax.Array:
    """``x`` itself (a float per-tensor / per-channel / per-row array), evaluated in an XLA kernel of its own.

    XLA's CPU fusion re-evaluates the cheap producers of a broadcast operand for every element of the
    consumer (optimization barriers are gone by then): a per-channel dyadic multiplier (``frexp`` and
    ``ldexp``, ~100 ops) or a kernel's scale-derived constants would cost their whole expression per
    element of the activation (7x on a 128 x 3072 requantization).  A float division is an expensive op
    to the fusion pass, never duplicated into a consumer that reuses its elements, so ``x / 1`` (the
    ``1`` behind :func:`exact_div`'s barrier, not folded) ends the chain in its own kernel: exact for
    every ``x``, infinities and NaN included.
    """
    x = jnp.asarray(x)
    return exact_div(x, jnp.ones_like(x))


def materialized(x: jax.Array) -> jax.Array:
    """``x`` itself (an activation-sized array), written to memory once under ``jax.jit``.

    XLA's CPU fusion duplicates a cheap elementwise producer into every fusion that reads it: a
    requantization (dyadic multiply, round, clamp, conversions; for the embeddings also the gathers and
    the position ids) read by a LayerNorm's sum, variance and output fusions was recomputed in each of
    them, per element.  A conditional's operands and results are buffers, never fused, so a
    :func:`jax.lax.cond` that returns ``x`` ends the producer's chain in one kernel and its consumers
    read the result.  Its predicate (True) sits behind an optimisation barrier and its other branch
    (zeros, never taken) differs from the first, so XLA neither folds nor removes it (same numbers).
    Op by op (no tracer) it is ``x``.
    """
    if not isinstance(x, jax.core.Tracer):
        return x
    keep = jax.lax.optimization_barrier(jnp.bool_(True))
    return jax.lax.cond(keep, lambda v: v, jnp.zeros_like, x)


def rdiv(c: float, t: jax.Array) -> jax.Array:
    """``c / t`` for a Python number ``c`` as torch computes it: ``fl(fl(1 / t) * c)`` in ``t``'s dtype.

    (torch's ``Tensor.__rtruediv__`` is ``reciprocal(t) * c``: two roundings, not one; transformers'
    constants ``floor(coeff / s)`` are defined by it.)
    """
    return exact_div(jnp.asarray(1.0, t.dtype), t) * jnp.asarray(c, t.dtype)


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
    q = jnp.round(exact_div(jnp.float32(1.0), s) * x.astype(jnp.float32))
    return jnp.clip(q, -n, n - 1)


def _int_dtype(num_bits: int) -> Any:
    """The narrowest signed integer dtype of ``num_bits``-bit integers (int8, int16, int32)."""
    return jnp.int8 if num_bits <= 8 else jnp.int16 if num_bits <= 16 else jnp.int32


def integer_of(x: jax.Array, scale: jax.Array | None = None) -> jax.Array | None:
    """The exact integers of a quantized pair ``(x, scale)`` when ``x`` holds them in an integer dtype, else None.

    The kernels' inference form: inside the model a quantized tensor travels as its integers (int8,
    int16, int32 for requantized activations, int32 for attention contexts, int64 for linear, GELU and
    LayerNorm outputs) beside its float32 scale, and each kernel computes on them in integer dtypes; a
    float ``x`` is the dequantized ``q * scale`` (the kernels' public form), whose integers are
    recovered by :func:`to_integer`.  (``scale`` is accepted for the PyTorch backend's signature.)
    """
    return x if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer) else None


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """``q * scale`` of integer-dtype ``q``: float64 for int64 ``q`` (the wide linear, GELU and
    LayerNorm integers, whose dequantized values were float64), float32 otherwise (requantized
    activations, embeddings, contexts).  Call inside :func:`x64_scope` for int64 ``q``."""
    if q.dtype == jnp.int64:
        return q.astype(jnp.float64) * _f64(scale)
    return q.astype(jnp.float32) * scale


def float_values(x: jax.Array, scale: jax.Array | None) -> jax.Array:
    """``x`` itself when it is a float array, else the dequantized float values of integer-dtype ``x``
    (:func:`dequantize`: what the kernel that made them returned before, float32 or float64)."""
    return x if integer_of(x) is None else dequantize(x, scale)


def to_integer(x: jax.Array, scale: jax.Array) -> jax.Array:
    """The exact integer ``q = round(x / s)`` of a dequantized pair, float64 (call inside :func:`x64_scope`)."""
    return jnp.round(exact_div(_f64(x), _f64(scale)))


def _integers(x: jax.Array, scale: jax.Array) -> jax.Array:
    """:func:`integer_of` ``x``, else its integers recovered in float64 by :func:`to_integer`."""
    q = integer_of(x, scale)
    return to_integer(x, scale) if q is None else q


def frexp_multiplier(ratio: jax.Array, max_bit: int = 31) -> tuple[jax.Array, jax.Array]:
    """Dyadic form ``ratio ~= m / 2**e`` of a float64 ratio: integer ``m`` below ``2**max_bit``.

    ``ratio = f * 2**k`` (``frexp``, ``0.5 <= |f| < 1``), ``m = sign(f) * floor(|f| * 2**max_bit + 0.5)``
    (transformers' ``decimal.ROUND_HALF_UP``), ``e = max_bit - k``.  Returns float64 ``(m, e)``.
    """
    f, k = jnp.frexp(ratio)
    m = jnp.sign(f) * jnp.floor(jnp.abs(f) * float(2**max_bit) + 0.5)
    return m, float(max_bit) - k.astype(jnp.float64)


def _dyadic(scale: jax.Array, out_scale: jax.Array) -> jax.Array:
    """``m * 2**-e`` (float64, exact: a 31-bit ``m`` times a power of two) of ``frexp_multiplier(s / s_out)``,
    :func:`computed_once` (it multiplies every element of a requantization)."""
    m, e = frexp_multiplier(exact_div(_f64(scale), _f64(out_scale)))
    return computed_once(jnp.ldexp(m, (-e).astype(jnp.int32)))


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
    ``fl64(q * m) * 2**-e`` is computed as the one float64 product ``fl64(q * (m * 2**-e))``: scaling by a
    power of two commutes with the rounding (no subnormals: the ratio of two float32 scales is above
    2**-300), so these are the same numbers with one elementwise multiply.

    Args:
        q ((..., C), float64 or an integer dtype): exact integers below 2**53.
        scale (float32 (1,) or (C,)): scale of ``q``.
        num_bits (int): output bit width ``b``.
        out_scale (float32 (1,)): output scale.
        identity_q, identity_scale: a second integer tensor (float64 or an integer dtype) and its scale.
    Returns:
        float64 integers shaped like ``q``.
    """
    n = 2 ** (num_bits - 1) - 1
    out = jnp.round(_f64(q) * _dyadic(scale, out_scale))
    if identity_q is not None:
        out = out + jnp.round(_f64(identity_q) * _dyadic(identity_scale, out_scale))
    return jnp.clip(out, -n - 1, n)


def requantize_int(
    q: jax.Array,
    scale: jax.Array,
    num_bits: int,
    out_scale: jax.Array,
    identity_q: jax.Array | None = None,
    identity_scale: jax.Array | None = None,
) -> jax.Array:
    """:func:`fixed_point_requantize` to the narrowest integer dtype (int8, int16 or int32 by ``num_bits``).

    The float64 product ``fl64(q * m)`` is the rule's definition (it rounds for ``|q| >= 2**22``), so
    the rescaling stays one float64 multiply and round per element, fused with the conversions.
    """
    out = fixed_point_requantize(q, scale, num_bits, out_scale, identity_q, identity_scale)
    return out.astype(_int_dtype(num_bits))


def integer_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact ``a @ b`` of 8-bit integers without int8 units: float32 chunks summed in int32.

    The contraction is split into chunks of :data:`EXACT_CHUNK` terms, whose float32 sums are exact
    in any order (``|.| < 2**24``); the chunk results are converted to int32 and added there, exact for
    at most :data:`INT32_EXACT_TERMS` terms.

    Args:
        a (..., K), b (K, N): integer-valued arrays within [-128, 127] (any dtype).
    Returns:
        int32 (..., N).
    """
    if a.shape[-1] > INT32_EXACT_TERMS:
        raise ValueError(f"integer_matmul: {a.shape[-1]} terms may overflow the int32 sum (limit {INT32_EXACT_TERMS})")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    K = a.shape[-1]
    out = None
    dims = (((a.ndim - 1,), (0,)), ((), ()))
    for k0 in range(0, K, EXACT_CHUNK):
        part = standalone_dot(a[..., k0 : k0 + EXACT_CHUNK], b[k0 : k0 + EXACT_CHUNK], dims, jnp.float32)
        part = part.astype(jnp.int32)
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
    return standalone_dot(a.astype(jnp.int8), b.astype(jnp.int8), dims, jnp.int32)


def standalone_dot(a: jax.Array, b: jax.Array, dims: Any, out_dtype: Any, precision: Any = None) -> jax.Array:
    """``jax.lax.dot_general(a, b, dims, precision)`` with ``out_dtype`` results, kept out of XLA's fusions.

    XLA CPU fuses the elementwise producers of a dot's operands (the weight quantization, the int8
    conversions) and its consumers into it, and a fused dot leaves the library GEMM for a naive loop
    nest: an int8 768 x 3072 product at 1024 rows took 135 ms fused against 35 ms standalone.
    Optimisation barriers on the operands and the result keep the GEMM a GEMM (same numbers).
    """
    a, b = jax.lax.optimization_barrier((a, b))
    out = jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(out)


def _exact_or_rule(exact: jax.Array, in_integers: Any, in_float64: Any) -> jax.Array:
    """``in_integers()`` where the scalar test ``exact`` holds, else ``in_float64()`` (the float64 rule).

    Under tracing (``jax.jit``) a :func:`jax.lax.cond`; op by op a Python branch on the concrete test
    (a ``lax.cond`` of fresh closures would be traced and compiled again on every call).
    """
    if isinstance(exact, jax.core.Tracer):
        return jax.lax.cond(exact, in_integers, in_float64)
    return in_integers() if bool(exact) else in_float64()


def _rule_as_int64(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The float64 rule's integers ``v`` (..., C) as int64, and its ``bad`` rows (..., 1) bool.

    int64 cannot hold what the rule gives in a bad row: NaN (a LayerNorm row of zero variance, a GELU
    ``0 * inf`` under scales whose constants overflow float32) or an infinity (which the next
    requantization turns into NaN when its ratio of scales is 0, as after such a GELU).  Such a row is
    ``bad`` (its integers 0 here) and the model poisons it (NaN, see ``nezha_zoo.flax.ibert``) rather
    than carry a plausible number.  Finite values beyond int64 (an uncalibrated GELU) saturate at
    +-2**63: the next requantization clamps them as it clamps the rule's values (its ratio of scales
    is far above 2**-56).
    """
    bad = jnp.any(~jnp.isfinite(v), axis=-1, keepdims=True)
    v = jnp.clip(jnp.where(bad, 0.0, v), -(2.0**63), 2.0**63 - 1024)  # the largest float64 below 2**63
    return v.astype(jnp.int64), bad


def _no_bad_rows(q: jax.Array) -> jax.Array:
    """``bad`` (..., 1) all False for integers ``q`` (..., C) of an exact integer branch."""
    return jnp.zeros(q.shape[:-1] + (1,), bool)


def _fl32_exact(v: jax.Array) -> jax.Array:
    """The float32 rounding of float64 ``v`` with IEEE gradual underflow, as float64 (call inside :func:`x64_scope`).

    XLA's CPU code runs with denormals flushed to zero, so a float32 scale below ``2**-126`` (the
    softmax exponentials' ``0.358 * s**2 / 2**30`` of an uncalibrated model) is 0 there, while torch
    keeps the subnormal; the integer rules divide by such scales.  Computed in float64 (exact for a
    float32 product, and a float64 quotient rounded again to float32 is the correctly rounded float32
    quotient: 53 >= 2 * 24 + 2), then rounded here: to float32's subnormal grid ``2**-149`` (half to
    even, exact in float64) below ``2**-126``, by the float32 conversion above (infinities on overflow).
    """
    v = _f64(v)
    subnormal = jnp.round(v * 2.0**149) * 2.0**-149
    return jnp.where(jnp.abs(v) < 2.0**-126, subnormal, v.astype(jnp.float32).astype(jnp.float64))


def _below(bound: jax.Array, limit: float) -> jax.Array:
    """Scalar predicate ``all(bound < limit)`` of a (float) bound, for :func:`jax.lax.cond`."""
    return jnp.all(bound < limit)


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
    scale, ``deterministic`` -> ``(x_out float32 (..., C), s (1,) or None)``.  Integer-dtype ``x`` or
    ``identity`` (:func:`integer_of`) are the integers themselves and the output is then the
    requantized integers (int8 / int16 / int32 by ``activation_bit``), the same numbers;
    ``integer_output`` forces one form or the other.
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
        integer_output: bool | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        x_min = self.variable(BUFFERS, "x_min", lambda: jnp.full((1,), -ACT_RANGE_INIT, jnp.float32))
        x_max = self.variable(BUFFERS, "x_max", lambda: jnp.full((1,), ACT_RANGE_INIT, jnp.float32))
        act_scale = self.variable(BUFFERS, "act_scaling_factor", lambda: jnp.zeros((1,), jnp.float32))
        integers = integer_of(x) is not None or (identity is not None and integer_of(identity) is not None)
        update = not deterministic and self.is_mutable_collection(BUFFERS)
        x_act = None
        if update or not self.quant_mode or pre_act_scaling_factor is None:
            # the float values (as dequantized by the kernels that made them): calibration, float mode,
            # and a float input quantized directly
            x_act = float_values(x, pre_act_scaling_factor)
            if identity is not None:
                x_act = float_values(identity, identity_scaling_factor) + x_act
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
        if integer_output is not None:
            integers = integer_output
        if pre_act_scaling_factor is None:
            q = symmetric_quantize(x_act, self.activation_bit, scale)  # float32 integers
            return (q.astype(_int_dtype(self.activation_bit)), scale) if integers else (q * scale, scale)
        q_id = None if identity is None else _integers(identity, identity_scaling_factor)
        q = requantize_int(
            _integers(x, pre_act_scaling_factor),
            pre_act_scaling_factor,
            self.activation_bit,
            scale,
            q_id,
            identity_scaling_factor,
        )
        # read by several kernels (a LayerNorm's sum, variance and output; a linear and a residual)
        q = materialized(q)
        return (q, scale) if integers else (q.astype(jnp.float32) * scale, scale)


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
    ``x = weight_integer[ids] * s``, or with ``integer_output`` the int8 ``weight_integer[ids]``.
    When the :data:`QUANTIZED` collection holds this table's ``weight_integer`` and
    ``weight_scaling_factor`` (:func:`quantize_table`; the wrapper's compiled inference calls), they are
    used instead of quantizing the table in the call.
    """

    num_embeddings: int
    features: int
    padding_idx: int | None = None
    init_std: float = 0.02
    weight_bit: int = 8
    quant_mode: bool = False

    @nn.compact
    def __call__(
        self, ids: jax.Array, deterministic: bool = True, integer_output: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        table = self.param(_EMBEDDING, _normal(self.init_std), (self.num_embeddings, self.features), jnp.float32)
        w_scale = self.variable(BUFFERS, "weight_scaling_factor", lambda: jnp.zeros((1,), jnp.float32))
        w_int_buf = self.variable(BUFFERS, "weight_integer", lambda: jnp.zeros(table.shape, jnp.float32))
        if not self.quant_mode:
            return freeze_padding_row(jnp.take(table, ids, axis=0), ids, self.padding_idx), None
        if self.has_variable(QUANTIZED, "weight_integer"):  # the wrapper's inference calls: quantized once
            w_int = self.get_variable(QUANTIZED, "weight_integer")
            scale = self.get_variable(QUANTIZED, "weight_scaling_factor")
        else:
            w_int, scale = _table_quantization(jax.lax.stop_gradient(table), self.weight_bit)
        if not deterministic and self.is_mutable_collection(BUFFERS):
            w_scale.value, w_int_buf.value = scale, w_int.astype(jnp.float32)
        q = jnp.take(w_int, ids, axis=0)
        return (q.astype(_int_dtype(self.weight_bit)), scale) if integer_output else (q * scale, scale)


def _table_quantization(table: jax.Array, weight_bit: int) -> tuple[jax.Array, jax.Array]:
    """``(W_int, s)`` of a :class:`QuantEmbedding` table (rows, dim), per tensor: float32 integers
    (rows, dim), float32 (1,)."""
    scale = symmetric_scale(weight_bit, jnp.min(table)[None], jnp.max(table)[None])
    return symmetric_quantize(table, weight_bit, scale), scale


@functools.partial(jax.jit, static_argnums=1)
def quantize_table(table: jax.Array, weight_bit: int = 8) -> dict[str, jax.Array]:
    """The :data:`QUANTIZED` entries of a :class:`QuantEmbedding` table: what its quant-mode call computes
    from ``table`` when they are absent, done once outside the forward.

    Args:
        table: float32 (rows, dim).
        weight_bit (int): the table's bit width (8 for I-BERT).
    Returns:
        ``{"weight_integer": W_int (rows, dim) in the narrowest signed integer dtype of ``weight_bit``
        bits, "weight_scaling_factor": s float32 (1,)}``.
    """
    w_int, scale = _table_quantization(jnp.asarray(table, jnp.float32), weight_bit)
    return {"weight_integer": w_int.astype(_int_dtype(weight_bit)), "weight_scaling_factor": scale}


def _kernel_quantization(kernel: jax.Array, weight_bit: int) -> tuple[jax.Array, jax.Array]:
    """``(W_int.T, s_w)`` of a :class:`QuantLinear` kernel (in, out): per output channel, in the kernel's
    own layout (no transposes; the scale broadcasts on the last axis of the (1, in, out) view).

    Returns:
        float32 integers (in, out), float32 (out,).
    """
    w_scale = symmetric_scale(weight_bit, jnp.min(kernel, axis=0), jnp.max(kernel, axis=0))
    return symmetric_quantize(kernel[None], weight_bit, w_scale)[0], w_scale


@functools.partial(jax.jit, static_argnums=1)
def quantize_kernel(kernel: jax.Array, weight_bit: int = 8) -> dict[str, jax.Array]:
    """The :data:`QUANTIZED` entries of a :class:`QuantLinear` kernel: what its quant-mode call computes
    from ``kernel`` when they are absent (the same integers and scale), done once outside the forward.

    Args:
        kernel: float32 (in, out).
        weight_bit (int): the layer's weight bit width (8 for I-BERT).
    Returns:
        ``{"kernel_int8": W_int.T (in, out) in the narrowest signed integer dtype of ``weight_bit`` bits,
        "fc_scaling_factor": s_w float32 (out,)}``.
    """
    w_int_t, w_scale = _kernel_quantization(jnp.asarray(kernel, jnp.float32), weight_bit)
    return {"kernel_int8": w_int_t.astype(_int_dtype(weight_bit)), "fc_scaling_factor": w_scale}


class QuantLinear(nn.Module):
    """Linear layer with 8-bit per-output-channel weights and 32-bit biases in quant mode.

    Params: ``kernel`` (in, out), ``bias`` (out,).  Buffers: ``weight_integer`` (out, in),
    ``fc_scaling_factor`` (out,), ``bias_integer`` (out,).  Quant mode: ``s_w`` per output row of
    ``W = kernel.T``, ``W_int = symmetric_quantize(W, 8, s_w)``, ``s_out = s_w * s_in``,
    ``b_int = symmetric_quantize(b, 32, s_out)``, ``acc = x_int @ W_int.T + b_int`` (int8 x int8 ->
    int32 product, exact, plus the bias in int64); returns ``(acc * s_out as float64, s_out (out,))``,
    or the int64 ``acc`` itself for integer-dtype ``x`` (call inside :func:`x64_scope`).  When the
    :data:`QUANTIZED` collection holds this layer's ``kernel_int8`` and ``fc_scaling_factor``
    (:func:`quantize_kernel`; the wrapper's compiled inference calls), they are used instead of
    quantizing ``kernel`` in the call.

    Attributes:
        in_features (int), features (int): input and output widths.
        init_std (float): kernel init std.
        weight_bit (int), bias_bit (int): 8 and 32.
        quant_mode (bool): integer (True) or float ``x @ kernel + bias`` (False).
        dtype: float-mode computation dtype.

    Call: ``x`` (..., in), ``prev_act_scaling_factor`` (1,) (required in quant mode) -> ``(y (..., out), s)``;
    with ``with_bound=True``, ``(y, s, bound)``: ``bound`` (float64 scalar) ``in * 2**(w-1) * 128 +
    max|b_int|`` bounds ``|acc|`` (None in float mode).
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
        self,
        x: jax.Array,
        prev_act_scaling_factor: jax.Array | None = None,
        deterministic: bool = True,
        with_bound: bool = False,
    ) -> tuple:
        kernel = self.param(_KERNEL, _normal(self.init_std), (self.in_features, self.features), jnp.float32)
        bias = self.param(_BIAS, nn.initializers.zeros, (self.features,), jnp.float32)
        w_int_buf = self.variable(
            BUFFERS, "weight_integer", lambda: jnp.zeros((self.features, self.in_features), jnp.float32)
        )
        fc_scale = self.variable(BUFFERS, "fc_scaling_factor", lambda: jnp.zeros((self.features,), jnp.float32))
        b_int_buf = self.variable(BUFFERS, "bias_integer", lambda: jnp.zeros((self.features,), jnp.float32))
        if not self.quant_mode:
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
            return (y, None, None) if with_bound else (y, None)
        if prev_act_scaling_factor is None or tuple(prev_act_scaling_factor.shape) != (1,):
            raise ValueError(
                "QuantLinear: prev_act_scaling_factor must be a per-tensor scale of shape (1,), got "
                f"{None if prev_act_scaling_factor is None else tuple(prev_act_scaling_factor.shape)}"
            )
        if self.has_variable(QUANTIZED, "kernel_int8"):  # the wrapper's inference calls: quantized once
            w_int_t = self.get_variable(QUANTIZED, "kernel_int8")
            w_scale = self.get_variable(QUANTIZED, "fc_scaling_factor")
        else:
            w_int_t, w_scale = _kernel_quantization(jax.lax.stop_gradient(kernel), self.weight_bit)
        out_scale = w_scale * prev_act_scaling_factor  # (out,) float32
        b_int = computed_once(symmetric_quantize(bias, self.bias_bit, out_scale))
        if not deterministic and self.is_mutable_collection(BUFFERS):
            w_int_buf.value, fc_scale.value, b_int_buf.value = w_int_t.T.astype(jnp.float32), w_scale, b_int
        x_int = integer_of(x)
        integers = x_int is not None
        if not integers:
            x_int = jnp.round(exact_div(x.astype(jnp.float32), prev_act_scaling_factor))  # |x_int| <= 128: exact
        if int8_products() and self.in_features <= INT32_EXACT_TERMS:
            acc = int8_matmul(x_int, w_int_t)  # int8 units, exact int32 sums
        else:
            acc = integer_matmul(x_int, w_int_t)  # float32 chunks, exact int32 sums
        # |acc| <= K * 2**14 plus a 32-bit bias: int64 (fused into the next kernel under jit)
        acc = acc.astype(jnp.int64) + b_int.astype(jnp.int64)
        out = (acc if integers else dequantize(acc, out_scale)), out_scale
        if not with_bound:
            return out
        products = self.in_features * 2 ** (self.weight_bit - 1) * -INT8_MIN  # bound of |x_int @ W_int|
        return (*out, products + jnp.max(jnp.abs(_f64(b_int))))


class IntGELU(nn.Module):
    """GELU; integer-only in quant mode: ``x * (1 + erf_int(x / sqrt 2)) / 2`` (I-BERT's polynomial erf).

    See :class:`nezha_zoo.pt.quant.IntGELU` for the integer rule (``a = -0.2888``, ``b = -1.769``,
    shift ``2**14``).  The polynomial runs in int64 (``floor(/ 2**14)`` an arithmetic right shift)
    when the float64 rule is exact for the operands (every intermediate below 2**53: a scalar test on
    the scales and ``max|q|``), else (:func:`jax.lax.cond`) in float64 as that rule: the same integers.

    Attributes:
        quant_mode (bool): integer GELU; False, or ``force_dequant`` in ("gelu", "nonlinear"): exact erf GELU.
        force_dequant (str): config value.

    Call: ``(x (..., C), s)`` -> ``(q_out * s_out as float64, s_out)`` (``s_out`` float32 values held in
    float64, subnormals included: :func:`_fl32_exact`) or ``(gelu(x) float32, None)``;
    an integer-dtype ``x`` (:func:`integer_of`) gives the int64 ``q_out``; ``with_bad_rows=True``
    appends ``bad`` (..., 1) bool, the rows where the float64 rule gives NaN or an infinity (None unless
    ``x`` is integer-dtype in quant mode), as :class:`IntLayerNorm`.  ``q_bound`` (float64 scalar, or
    None): a bound on ``max|q|`` of integer-dtype ``x`` that the caller knows (:class:`QuantLinear`'s
    ``with_bound``), used in the exactness test instead of ``max|q|``, which costs a pass over ``q``
    (XLA's CPU writes ``|q|`` out in int64 for the reduction: ~7 ms a layer at 8x128, roberta-base).
    """

    quant_mode: bool = True
    force_dequant: str = "none"

    @property
    def active(self) -> bool:
        return self.quant_mode and self.force_dequant not in ("nonlinear", "gelu")

    def __call__(
        self,
        x: jax.Array,
        scaling_factor: jax.Array | None = None,
        with_bad_rows: bool = False,
        q_bound: jax.Array | None = None,
    ):
        if not self.active:
            out = jax.nn.gelu(float_values(x, scaling_factor).astype(jnp.float32), approximate=False), None
            return (*out, None) if with_bad_rows else out
        (a, b), const = GELU_COEFFS, GELU_SHIFT
        integers = integer_of(x) is not None
        q = _integers(x, scaling_factor)
        s_e = exact_div(scaling_factor, jnp.float32(GELU_SQRT2))  # float32
        # per-channel constants, each computed once (not per element by XLA's fusion: computed_once)
        b_f = computed_once(jnp.floor(rdiv(b, s_e)))  # float32 integers, <= 0
        c_f = computed_once(jnp.floor(rdiv(1.0 / a, s_e**2)))
        s_y = s_e**2 * a * 2**const  # float32
        one_f = computed_once(jnp.floor_divide(jnp.float32(1.0), s_y))  # float32 floor division, as Python/torch

        def in_float64():
            b_int, c_int = _f64(b_f), _f64(c_f)
            qf = _f64(q)
            abs_int = jnp.minimum(jnp.abs(qf), -b_int)
            y = jnp.sign(qf) * ((abs_int + b_int) ** 2 + c_int)
            y = jnp.floor(y / 2**const)
            return qf * (y + _f64(one_f))

        def in_int64():
            qi = q.astype(jnp.int64)
            b_int = b_f.astype(jnp.int64)
            t = jnp.minimum(jnp.abs(qi), -b_int) + b_int  # in [b_int, 0]
            y = jnp.sign(qi) * (t * t + c_f.astype(jnp.int64))
            return qi * (jnp.right_shift(y, const) + one_f.astype(jnp.int64))

        # torch's float32 ``s * s_y / 2``, subnormal for tiny input scales (an uncalibrated layer whose
        # weight row is ~1e-4): in float64 (_fl32_exact), as the softmax's exponential scale
        out_scale = _fl32_exact(_fl32_exact(_f64(scaling_factor) * _f64(s_y)) / 2)
        if not integers:
            out = in_float64() * _f64(out_scale), out_scale  # the dequantized form: the float64 rule
            return (*out, None) if with_bad_rows else out
        # float64 bounds of the rule's intermediates: the polynomial, then q * (y + one)
        b_max, c_max, one_max = (jnp.max(jnp.abs(_f64(v))) for v in (b_f, c_f, one_f))
        poly = b_max * b_max + c_max
        q_max = jnp.max(jnp.abs(q)).astype(jnp.float64) if q_bound is None else _f64(q_bound)
        exact = _below(jnp.stack([poly, one_max, q_max * (poly / 2**const + 1 + one_max)]), 2.0**53)
        q_out, bad = _exact_or_rule(
            exact, lambda: (q_int := in_int64(), _no_bad_rows(q_int)), lambda: _rule_as_int64(in_float64())
        )
        return (q_out, out_scale, bad) if with_bad_rows else (q_out, out_scale)


class IntSoftmax(nn.Module):
    """Softmax over the last axis; integer-only in quant mode with ``output_bit``-bit probabilities.

    See :class:`nezha_zoo.pt.quant.IntSoftmax` for the rule (``exp`` by ``2**-k`` and a quadratic,
    exponentials requantized to 16 bits by ``act``, normalised by ``floor(2**32 / sum)``, scale
    ``2**-output_bit``).  Submodule ``act`` (:class:`QuantAct`, 16 bits, calibrated on the
    exponentials themselves, as transformers).

    Integer-dtype scores (:func:`integer_of`, the int32 ``q_int @ k_int^T`` of the model) with their
    additive ``mask`` run the exponent's integer steps in int32/int64 (masked keys get
    ``-MASKED_SCORE``, as :meth:`nezha_zoo.pt.quant.IntSoftmax.mask_scores_int`) when the float64
    rule is exact for them (scalar tests on the scales and the mask), else that rule; the
    exponentials then go through ``act`` in float64, as its definition (``act`` divides them by their
    scale), and the normalisation is integer (int64 products, right shift).

    Attributes:
        output_bit (int): probability bit width (8).
        quant_mode (bool), force_dequant (str): ``"softmax"``/``"nonlinear"`` keep the float softmax.

    Call: :meth:`forward_int` ``(q integer scores (..., L) (float64, or int32 with an additive
    ``mask`` broadcastable to them), s (1,))`` -> ``(prob float32 integers, 2**-output_bit)``;
    ``__call__(x float scores, None)`` -> ``(softmax(x), None)``.
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

    def forward_int(
        self, q: jax.Array, scale: jax.Array, deterministic: bool = True, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        x0_c, const, max_bit = EXP_X0, EXP_SHIFT, MAX_BIT
        a, b, c = EXP_COEFFS
        coef0, coef1, coef2 = a, b / a, c / a
        # float32 integers (1,), < 0 for x0, each computed once (computed_once)
        x0_f, b_f, c_f = (
            computed_once(jnp.floor(rdiv(c, t))) for c, t in ((x0_c, scale), (coef1, scale), (coef2, scale**2))
        )

        def in_float64():
            x = _f64(q)
            if mask is not None:
                x = x + _f64(mask) / _f64(scale)
            x = x - jnp.max(x, axis=-1, keepdims=True)
            x0 = _f64(x0_f)
            x = jnp.maximum(x, const * x0)
            k = jnp.floor(exact_div(x, x0))
            r = x - x0 * k
            p = (r + _f64(b_f)) * r + _f64(c_f)
            return jnp.maximum(jnp.floor(jnp.ldexp(p, (const - k).astype(jnp.int32))), 0.0)  # * 2**(30 - k)

        def in_integers():
            # |scores| < 2**24; masked ones get -MASKED_SCORE: int32 cannot wrap (see MASKED_SCORE)
            x = q.astype(jnp.int32)
            if mask is not None:
                x = x + jnp.where(visible, 0, -MASKED_SCORE).astype(jnp.int32)
            x = x - jnp.max(x, axis=-1, keepdims=True)
            x0 = x0_f.astype(jnp.int32)
            x = jnp.maximum(x, const * x0)  # 30 * |x0| < 2**30: no wrap
            # k = floor(x / x0) in [0, 30] without an int32 floor_divide (a scalar division per element on
            # x86): a float32 estimate, within one of k (relative error ~2**-22 on a quotient <= 30),
            # corrected by the remainder x - k * x0, which lies in (x0, 0] for the exact k (x0 < 0)
            k = jnp.floor(x.astype(jnp.float32) * (1.0 / x0_f)).astype(jnp.int32)
            rest = x - x0 * k  # |k| <= 31: no wrap
            k = k - (rest > 0).astype(jnp.int32) + (rest <= x0).astype(jnp.int32)
            r = (x - x0 * k).astype(jnp.int64)
            p = (r + b_f.astype(jnp.int64)) * r + c_f.astype(jnp.int64)
            # p * 2**(30 - k): an exact float64 product by a power of two (as ldexp), > 0
            return jnp.maximum(p.astype(jnp.float64) * jnp.left_shift(1, const - k).astype(jnp.float64), 0.0)

        update = not deterministic and self.is_mutable_collection(BUFFERS)
        if integer_of(q) is None or update:
            e = in_float64()  # calibration stays op by op on the float64 rule
        else:
            x0_max = jnp.abs(_f64(x0_f))
            exact = _below(const * x0_max, 2.0**30 - 2**25)
            p_max = (x0_max + jnp.abs(_f64(b_f))) * x0_max + jnp.abs(_f64(c_f))
            exact = exact & _below(p_max, 2.0**53)
            visible = None
            if mask is not None:
                # float64 rule: + mask / s; a masked score (<= -MASKED_SCORE) falls to the exponent
                # clamp whatever its value, provided its row has a visible key
                masked = _f64(mask) / _f64(scale)
                visible = masked == 0
                exact = exact & jnp.all(visible | (masked <= -MASKED_SCORE)) & jnp.all(jnp.any(visible, axis=-1))
            e = _exact_or_rule(exact, in_integers, in_float64)
        # torch's float32 ``coef0 * s**2 / 2**30``, subnormal for an uncalibrated model's scores: held
        # in float64 (_fl32_exact), since XLA's CPU flushes float32 subnormals to zero
        s64 = _f64(scale)
        s_e = _fl32_exact(_fl32_exact(jnp.float32(coef0) * _fl32_exact(s64 * s64)) / 2.0**const)
        e16, _ = self.act(e, s_e, deterministic=deterministic, integer_output=True)  # int16
        total = jnp.sum(e16.astype(jnp.int64), axis=-1, keepdims=True)
        # floor(fl64(1 / total) * 2**32) == 2**32 // total (the float64 error is far below 1 / total)
        f = jnp.floor_divide(jnp.int64(2**max_bit), jnp.maximum(total, 1))
        prob = jnp.right_shift(e16.astype(jnp.int64) * f, max_bit - self.output_bit)  # e16 * f <= 2**32
        prob = jnp.where(total > 0, prob.astype(jnp.float32), jnp.nan)  # 0 * inf in the float64 rule
        return prob, jnp.full((1,), 2.0**-self.output_bit, jnp.float32)


class IntLayerNorm(nn.Module):
    """LayerNorm over the last axis; integer-only in quant mode (32-bit output, per-channel scale).

    Params ``scale``/``bias`` (n,); buffer ``shift`` (1,) (raised in calibration when the variance
    overflows 32 bits); submodule ``activation`` (its buffers are saved, never used, as transformers).
    See :class:`nezha_zoo.pt.quant.IntLayerNorm` for the integer rule.  Float mode is transformers'
    hand-written LayerNorm ``(x - mean) / sqrt(eps + var) * w + b``.  Outside calibration the
    elementwise steps run in int64 (``floor(/ 2**k)`` arithmetic right shifts; the per-row mean, std
    and factor in float64, as the rule) when the float64 rule is exact (variance in ``[1, 2**53)``,
    bias integers below ``2**53 - 2**33``: scalar tests), else (:func:`jax.lax.cond`) in float64.

    Attributes:
        features (int): width ``n``.
        eps (float): float-mode epsilon.
        output_bit (int): bit width of the unused ``activation``.
        quant_mode (bool), force_dequant (str): ``"layernorm"``/``"nonlinear"`` keep the float LayerNorm.

    Call: ``(x (B, L, n), s (1,))``, ``deterministic`` -> ``(q_out * s_out as float64, s_out (n,))`` or
    ``(layer_norm(x), None)``; an integer-dtype ``x`` (:func:`integer_of`) gives the int64 ``q_out``.
    ``with_bad_rows=True`` appends ``bad`` (B, L, 1) bool, the rows where the float64 rule gives NaN
    (a zero variance) or an infinity, which ``q_out`` cannot hold (:func:`_rule_as_int64`); None unless
    ``x`` is integer-dtype in quant mode (float values carry their NaN).
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
    def __call__(
        self,
        x: jax.Array,
        scaling_factor: jax.Array | None = None,
        deterministic: bool = True,
        with_bad_rows: bool = False,
    ):
        out = self._layer_norm(x, scaling_factor, deterministic)
        return out if with_bad_rows else out[:2]

    def _layer_norm(self, x: jax.Array, scaling_factor: jax.Array | None, deterministic: bool):
        """``(y, s_out, bad)``: ``bad`` (..., 1) bool for integer-dtype ``x`` (:func:`_rule_as_int64`), else None."""
        weight = self.param(_SCALE, nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param(_BIAS, nn.initializers.zeros, (self.features,), jnp.float32)
        shift = self.variable(BUFFERS, "shift", lambda: jnp.zeros((1,), jnp.float32))
        QuantAct(self.output_bit, quant_mode=self.active, name="activation")  # declared, never applied
        if not self.active:
            x = float_values(x, scaling_factor).astype(jnp.float32)
            y = x - jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(y**2, axis=-1, keepdims=True)
            return y / jnp.sqrt(self.eps + var) * weight + bias, None, None
        max_bit = MAX_BIT
        n = x.shape[-1]
        integers = integer_of(x) is not None
        q = _integers(x, scaling_factor)
        scale = jnp.sqrt(jnp.float32(n)) / jnp.float32(2**30)
        bias_f = computed_once(jnp.floor(exact_div(bias / weight, scale)))  # float32 integers (n,)
        out_scale = scale * weight  # (n,)
        # the per-row mean in float64, as the rule (an integer-dtype sum is exact; checked below 2**53)
        total = jnp.sum(q.astype(jnp.int64) if integers else q, axis=-1, keepdims=True)
        mean = jnp.round(exact_div(_f64(total), jnp.float64(n)))

        def std_factor(var, s_val):  # per row (B, L, 1), float64
            std = jnp.ldexp(jnp.floor(jnp.sqrt(var)), s_val.astype(jnp.int32))
            return jnp.floor(rdiv(2.0**31, std))

        def in_float64(s_val, var=None):
            y = _f64(q) - mean
            if var is None:
                var = jnp.sum(jnp.floor(jnp.ldexp(y, -s_val.astype(jnp.int32))) ** 2, axis=-1, keepdims=True)
            y = jnp.floor(y * std_factor(var, s_val) / 2)
            return y + _f64(bias_f)

        s_val = shift.value
        if not deterministic and self.is_mutable_collection(BUFFERS):
            # calibration (op by op), the float64 rule with transformers' overflow fallback: widen the
            # shift so that the variance fits 32 bits
            y = _f64(q) - mean

            def variance(s):
                return jnp.sum(jnp.floor(jnp.ldexp(y, -s.astype(jnp.int32))) ** 2, axis=-1, keepdims=True)

            var = variance(s_val)
            full = jnp.sum(y**2, axis=-1, keepdims=True)
            needed = jnp.max(jnp.ceil(jnp.log2(jnp.sqrt(full / 2.0**max_bit)))).astype(jnp.float32)
            overflow = jnp.max(var) >= 2.0**max_bit
            s_val = jnp.where(overflow, jnp.maximum(s_val, needed), s_val)
            shift.value = s_val
            var = jnp.where(overflow, variance(s_val), var)
            y = in_float64(s_val, var)
            if not integers:
                return y * _f64(out_scale), out_scale, None
            q_out, bad = _rule_as_int64(y)
            return q_out, out_scale, bad
        if not integers:
            return in_float64(s_val) * _f64(out_scale), out_scale, None  # the dequantized form: the float64 rule
        y = q.astype(jnp.int64) - mean.astype(jnp.int64)  # |y| <= 2 * max|q|
        shift_ok = (s_val >= 0) & (s_val < 62) & (jnp.floor(s_val) == s_val)
        s_int = jnp.where(shift_ok, s_val, 0).astype(jnp.int64)
        y_shifted = jnp.right_shift(y, s_int)
        var = jnp.sum(y_shifted * y_shifted, axis=-1, keepdims=True)  # int64: squares < 2**48, n < 2**15

        def in_int64():
            factor = std_factor(_f64(var), s_val).astype(jnp.int64)
            # std >= 1 bounds |y| * factor below 3 * 2**31
            return jnp.right_shift(y * factor, 1) + bias_f.astype(jnp.int64)

        exact = (
            jnp.all(shift_ok)
            & (jnp.max(var) < 2**53)
            & (jnp.min(var) >= 1)
            & _below(jnp.max(jnp.abs(_f64(bias_f))), 2.0**53 - 2.0**33)
            & _below(jnp.max(jnp.abs(_f64(total))), 2.0**53)
        )
        q_out, bad = _exact_or_rule(
            exact, lambda: (q_int := in_int64(), _no_bad_rows(q_int)), lambda: _rule_as_int64(in_float64(s_val))
        )
        return q_out, out_scale, bad
