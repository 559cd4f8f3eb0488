"""I-BERT's integer-only kernels (PyTorch): quantized embedding, activation, linear, GELU, softmax, LayerNorm.

The maths is that of the I-BERT paper as implemented in transformers 4.57.6 ``ibert/quant_modules.py``;
this module is the reference the TensorFlow and Flax ports match bit for bit, so every rule is written
down here.

Conventions
-----------
Every quantized tensor is a pair ``(x, s)``: ``x = q * s`` where ``q`` is an integer tensor and ``s`` a
float32 scaling factor of shape ``(1,)`` (per tensor) or ``(C,)`` (per channel, last axis).  Modules
take and return such pairs, as transformers' do, so the model code reads like transformers'.  In float
mode (``quant_mode=False``) the scaling factor is ``None`` and the modules compute plain float ops.

Where this code differs from transformers (deliberately): transformers emulates the integers in
float32 tensors, so any integer above 2**24 is rounded, and it never re-rounds ``x / s`` (so its
"integers" carry float noise).  Here every integer ``q`` is *exact*:

* with autograd (and for inputs that do not come from these kernels) ``q`` is recovered from
  ``(x, s)`` as ``round(x / s)`` and carried in **float64**, which holds every integer below 2**53
  exactly (the widest integers of the pipeline: linear accumulators < 2**32, the LayerNorm variance
  < 2**32 after its shift, GELU products ~2**40, softmax exponentials up to ~2**52);
* in inference the kernels compute in **integer dtypes** instead (issue #23): each output ``x``
  carries the exact integers it was made from (:func:`integer_of`: int8 for 8-bit activations, int32
  for 16/22-bit ones and int8 products, int64 for GELU products, LayerNorm outputs and sums that may
  pass 2**31), and the next kernel takes them.  ``floor(v / 2**k)`` is an arithmetic right shift,
  the GELU/LayerNorm/softmax polynomials run in int64, the softmax exponentials come from an int32
  table.  Each kernel first checks that the float64 rule is exact for its operands (every
  intermediate integer below 2**53; else it takes the float64 path), so both paths give the same
  integers bit for bit.  Float64 remains where it is the definition: the dyadic product of a
  requantization (:func:`requantize_int`) and the per-row scalars (mean, ``sqrt`` of the variance);
  the dequantized outputs keep their dtypes (float64 for linear, GELU and LayerNorm outputs).
  Each kernel's integer-dtype rule is its ``_forward_int`` (integers and scale in, integers and scale
  out, None where the rule does not apply); an eval-mode I-BERT layer chains them without
  dequantizing in between (:mod:`nezha_zoo.pt.ibert`), and the constants they derive from frozen
  scales and weights (multipliers, bias integers, output scales) are kept between calls
  (:class:`EvalConstants`);
* integer matrix products are exact: on CPUs with int8 dot-product units (VNNI/AMX,
  :func:`nezha_zoo.families.ibert.int8_products`) the linear layers' int8 x int8 products run as
  ``torch._int_mm`` with int32 accumulation (:func:`int8_matmul`; exact below 2**17 terms); otherwise
  (and with autograd) int8 x int8 products are summed in float32 chunks of at most
  :data:`EXACT_CHUNK` terms (every partial sum stays below 2**24, so float32 is exact), chunks summed
  in float64 (see :func:`integer_matmul`).  Same integers either way;
* the constants derived from a scaling factor (``floor(coeff / s)``, the bias integers, ``1 // s``)
  are computed exactly as transformers does, in float32 elementwise IEEE arithmetic, so they are the
  same numbers in every framework;
* requantization (:func:`fixed_point_requantize`) is transformers' dyadic rule: the float64 ratio of
  the scales is split by ``frexp`` into a 31-bit integer mantissa ``m`` (rounded half up) and an
  exponent ``e``; ``q_out = round_half_even(fl64(q * m) / 2**e)``, clamped to the output bit width.
  ``fl64(q * m)`` is exact for ``|q| < 2**22`` and rounded to 53 bits above (GELU and softmax inputs):
  that rounding is part of the definition (float64 multiply, IEEE round to nearest even).

Rounding: ``round`` is round-half-to-even (``torch.round``), ``floor`` is floor.  Both have
straight-through gradients (identity), as in transformers, so quantization-aware training works:
:func:`round_ste`, :func:`floor_ste`; weight quantization passes ``grad / scale``; requantization passes
``grad / s_out`` (so ``q_out * s_out`` has an identity gradient).

Consequence: at small sizes transformers' float32 emulation is exact for the requantized 8/16/22-bit
tensors and the two agree bit for bit; at roberta-base sizes transformers' float32 rounding (sums above
2**24 in the 3072-wide ``output.dense``, GELU products ~2**40, LayerNorm ``y * factor`` ~2**35) makes
rare elements differ by one quantization step.  Ours is the exact integer result.

Bit widths in I-BERT (``nezha_zoo/pt/ibert.py``): weights 8 (per output channel for linears, per tensor
for embeddings), biases 32 (scale = weight scale x input scale), embedding sums 16, activations 8,
LayerNorm inputs 22, LayerNorm outputs 32 bits before the 8-bit ``output_activation``; softmax
exponentials requantized to 16 bits, probabilities 8 bits (scale 2**-8, values 0..256).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from nezha_zoo.families.ibert import (
    EXACT_CHUNK,
    EXP_COEFFS,
    EXP_SHIFT,
    EXP_TABLE_SIZE,
    EXP_X0,
    GELU_COEFFS,
    GELU_SHIFT,
    GELU_SQRT2,
    INT8_MAX,
    INT8_MIN,
    INT32_EXACT_TERMS,
    MASKED_SCORE,
    MAX_BIT,
    SOFTMAX_EXP_BIT,
    UNCALIBRATED_RANGE,
    int8_products,
)
from nezha_zoo.pt.layers import linear

__all__ = [
    "EXACT_CHUNK",
    "symmetric_scale",
    "symmetric_quantize",
    "round_ste",
    "floor_ste",
    "EvalConstants",
    "to_integer",
    "integer_of",
    "attach_integer",
    "requantize_int",
    "frexp_multiplier",
    "fixed_point_requantize",
    "integer_matmul",
    "as_int8",
    "int8_matmul",
    "QuantEmbedding",
    "QuantAct",
    "QuantLinear",
    "IntGELU",
    "IntSoftmax",
    "IntLayerNorm",
]

logger = logging.getLogger("nezha_zoo")


# --- scaling factors and rounding ----------------------------------------------------------------


def symmetric_scale(num_bits: int, x_min: torch.Tensor, x_max: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Symmetric scaling factor ``max(|x_min|, |x_max|) / (2**(b-1) - 1)``, at least ``1e-8 / n``.

    Args:
        num_bits (int): bit width ``b``.
        x_min, x_max (float32 Tensor (1,) or (C,)): range; per channel when ``per_channel``.
    Returns:
        float32 Tensor of the same shape (no gradient).
    """
    with torch.no_grad():
        n = 2 ** (num_bits - 1) - 1
        scale = torch.maximum(x_min.abs(), x_max.abs())
        return torch.clamp(scale, min=1e-8) / n


def _view_scale(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    # transformers' reshaping: per-row for 2-D weights, flat otherwise.
    return scale.view(-1, 1) if ndim == 2 else scale.view(-1)


class _SymmetricQuant(torch.autograd.Function):
    """``clamp(round((1/s) * x), -n, n - 1)``; backward ``grad / s`` (transformers' STE)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, num_bits: int, scale: torch.Tensor) -> torch.Tensor:
        n = 2 ** (num_bits - 1) - 1
        s = _view_scale(scale, x.dim())
        ctx.save_for_backward(s)
        # float32 reciprocal times x, exactly as transformers' linear_quantize (not x / s).
        return torch.clamp(torch.round((1.0 / s) * x), -n, n - 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (s,) = ctx.saved_tensors
        return grad / s, None, None


def symmetric_quantize(x: torch.Tensor, num_bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Integer image of a float tensor: ``clamp(round(fl32(1/s) * x), -(2**(b-1) - 1), 2**(b-1) - 2)``.

    Args:
        x (float32 Tensor): weights (``(out, in)`` with per-row ``scale``) or a bias/activation.
        num_bits (int): bit width (8 for weights, 32 for biases).
        scale (float32 Tensor (1,) or (rows,)): scaling factor.
    Returns:
        float32 Tensor of integers (exact: |q| < 2**31 and, for 32-bit biases, whatever float32 gives
        for ``(1/s) * x``, an integer once it exceeds 2**23).  The clamp range is transformers'
        asymmetric ``[-n, n - 1]``.  Gradient: ``grad / scale``.
    """
    return _SymmetricQuant.apply(x, num_bits, scale)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _FloorSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, identity gradient."""
    return _RoundSTE.apply(x)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor, identity gradient."""
    return _FloorSTE.apply(x)


def _attach(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Remember the exact integer ``q`` behind ``x = q * scale`` (inference only: saves recovering it)."""
    if not x.requires_grad:
        x._nz_int = (q, scale)
    return x


def to_integer(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exact integer ``q`` of a dequantized pair: ``round(x / s)`` in float64 (gradient ``1/s``).

    When ``x`` came from one of this module's kernels without autograd, the integer it was made from
    is reused instead of recomputed (same value, fewer passes over the tensor).

    Args:
        x (Tensor (..., C)): ``q * s`` (float32 for <= 22-bit integers, float64 for wider ones).
        scale (float32 Tensor (1,) or (C,)): its scaling factor (broadcast on the last axis).
    Returns:
        float64 Tensor of integers, same shape as ``x``.
    """
    attached = getattr(x, "_nz_int", None)
    if attached is not None and attached[1] is scale and not x.requires_grad:
        return attached[0].double()
    return round_ste(x.double() / scale.double())


def integer_of(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The exact integer tensor (an integer dtype) a kernel attached to ``x = q * scale``, or None.

    Inference only (a tensor that requires grad has none): the kernels below then compute on these
    integers in int8/int32/int64 instead of recovering float64 ones.
    """
    attached = getattr(x, "_nz_int", None)
    if attached is None or attached[1] is not scale or x.requires_grad:
        return None
    q = attached[0]
    return None if q.is_floating_point() else q


def _inference(*xs: torch.Tensor | None) -> bool:
    """No autograd graph is recorded for these tensors (eval and no_grad/inference_mode forwards)."""
    return not torch.is_grad_enabled() or not any(x is not None and x.requires_grad for x in xs)


def _tensor_key(t: torch.Tensor | None) -> tuple:
    """What identifies a tensor's contents between calls: the object, its storage and its version
    counter (inference tensors have none; the ones keyed here are scales the kernels made and never
    modify)."""
    if t is None:
        return (None,)
    return (id(t), t.data_ptr(), -1 if t.is_inference() else t._version)


class EvalConstants:
    """Constants an eval-mode kernel derives from tensors that stay fixed between calls (a frozen
    range, the weights, an upstream kernel's scale): computed once, recomputed when any of those
    tensors is replaced or modified in place.  The last :attr:`SIZE` results are kept (a module applied
    at two places, such as I-BERT's ``embeddings_act1``, sees two sets of inputs); holding their
    tensors keeps those identities from being reused.

    PyTorch runs one op at a time, and at I-BERT's sizes the few dozen small ops that derive a
    kernel's multipliers and integer constants cost as much as its pass over the activations.
    """

    SIZE = 4
    __slots__ = ("entries",)

    def __init__(self) -> None:
        # ((key, deps, value), ...), oldest first; replaced whole, so concurrent callers see a
        # consistent tuple (at worst one recomputes)
        self.entries: tuple[tuple, ...] = ()

    def __reduce__(self):
        return (EvalConstants, ())  # copies and pickles start empty: the constants are recomputed on use

    def get(self, deps: tuple[torch.Tensor | None, ...], compute):
        """``compute()``'s cached value while every tensor of ``deps`` is the one it was computed from."""
        key = tuple(_tensor_key(t) for t in deps)
        for entry in self.entries:
            if entry[0] == key:
                return entry[2]
        # ordinary tensors even under inference_mode: an eval forward with autograd may save them
        with torch.inference_mode(False), torch.no_grad():
            value = compute()
        self.entries = (*self.entries[-(self.SIZE - 1) :], (key, deps, value))
        return value


def frexp_multiplier(ratio: torch.Tensor, max_bit: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """Dyadic form of a positive float64 ratio: ``ratio ~= m / 2**e`` with integer ``m < 2**max_bit``.

    ``ratio = f * 2**k`` with ``0.5 <= |f| < 1`` (``frexp``); ``m = sign(f) * floor(|f| * 2**max_bit + 0.5)``
    (round half away from zero, exact in float64), ``e = max_bit - k``.  (The ratio is negative after
    :class:`IntGELU`, whose scale is negative.)  transformers' ``batch_frexp`` does the
    same per element in Python with ``decimal.ROUND_HALF_UP``; this is its vectorised twin.

    Returns:
        ``(m, e)``, float64 Tensors shaped like ``ratio``.
    """
    f, k = torch.frexp(ratio)
    m = torch.sign(f) * torch.floor(torch.abs(f) * float(2**max_bit) + 0.5)
    return m, float(max_bit) - k.to(torch.float64)


def fixed_point_requantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    num_bits: int,
    out_scale: torch.Tensor,
    identity_q: torch.Tensor | None = None,
    identity_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer rescale of ``q`` (scale ``s``) to ``out_scale``, plus an optional residual integer.

    ``q_out = clamp(R(q, s) + R(q_id, s_id), -2**(b-1), 2**(b-1) - 1)`` with
    ``R(q, s) = round_half_even(fl64(q * m) * 2**-e)`` and ``(m, e) = frexp_multiplier(fl64(s) / fl64(s_out))``.

    Args:
        q (float64 or integer-dtype Tensor (..., C)): exact integers (below 2**53).
        scale (float32 Tensor (1,) or (C,)): scale of ``q`` (per channel on the last axis).
        num_bits (int): output bit width ``b``.
        out_scale (float32 Tensor (1,)): output scaling factor.
        identity_q, identity_scale: a second integer tensor and its scale, added after rescaling.
    Returns:
        float64 Tensor of integers (no gradient).
    """
    with torch.no_grad():
        multiplier = _requant_multiplier(scale, out_scale)
        identity_multiplier = None if identity_q is None else _requant_multiplier(identity_scale, out_scale)
        return _rescale_int(q, multiplier, num_bits, identity_q, identity_multiplier)


def _requant_multiplier(scale: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """``m * 2**-e`` (float64, exact) with ``(m, e) = frexp_multiplier(fl64(scale) / fl64(out_scale))``."""
    m, e = frexp_multiplier(scale.double() / out_scale.double())
    return torch.ldexp(m, -e)


def _rescale_int(
    q: torch.Tensor,
    multiplier: torch.Tensor,
    num_bits: int,
    identity_q: torch.Tensor | None = None,
    identity_multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """The integer part of :func:`fixed_point_requantize`, from its multipliers: float64 integers."""
    n = 2 ** (num_bits - 1) - 1
    # fl64(q * m) * 2**-e == fl64(q * (m * 2**-e)): scaling by a power of two is exact; an integer
    # dtype q converts exactly (|q| < 2**53) in a fresh float64 copy, rescaled in place
    out = q.to(torch.float64, copy=True).mul_(multiplier).round_()
    if identity_q is not None:
        out.add_(identity_q.to(torch.float64, copy=True).mul_(identity_multiplier).round_())
    return out.clamp_(-n - 1, n)


@torch.no_grad()
def requantize_int(
    q: torch.Tensor,
    scale: torch.Tensor,
    num_bits: int,
    out_scale: torch.Tensor,
    identity_q: torch.Tensor | None = None,
    identity_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fixed_point_requantize` of integer-dtype tensors, to the narrowest integer dtype.

    The same integers: ``q`` (int8/int32, or int64 below 2**53) converts exactly to float64 inside
    the one fused multiply ``fl64(q) * (m * 2**-e)`` (the float64 product's rounding is part of the
    definition), rounded and clamped in place.

    Args:
        q (integer Tensor (..., C)): exact integers, ``|q| < 2**53``.
        scale, num_bits, out_scale, identity_q, identity_scale: as :func:`fixed_point_requantize`
            (``identity_q`` an integer Tensor too).
    Returns:
        int8 Tensor when ``num_bits <= 8``, else int32 (``num_bits <= 32``).
    """
    out = fixed_point_requantize(q, scale, num_bits, out_scale, identity_q, identity_scale)
    return out.to(torch.int8 if num_bits <= 8 else torch.int32)


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in ``scale``'s dtype (float32 or float64) for an integer-dtype ``q``: one conversion,
    then an in-place multiply (a mixed-dtype ``q * scale`` would make a converted temporary too)."""
    return q.to(scale.dtype).mul_(scale)


def attach_integer(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dequantized ``q * scale`` (float32) of an integer-dtype ``q``, carrying ``q`` (see :func:`integer_of`).

    Args:
        q (integer Tensor (..., C)): exact integers below 2**24 in magnitude (exact in float32).
        scale (float32 Tensor (1,) or (C,)): their scale.
    """
    return _attach(_dequantize(q, scale), q, scale)


def _integer_or_recover(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`integer_of` ``x``, else its integers recovered as float64 (:func:`to_integer`)."""
    q = integer_of(x, scale)
    return to_integer(x, scale) if q is None else q


def _has_integers(x: torch.Tensor | None, scale: torch.Tensor | None) -> bool:
    """Whether ``x`` (None counts) has an integer form: attached integers, or only finite values.

    A float64 rule can give NaN or an infinity (a LayerNorm row of zero variance); an integer dtype
    cannot hold it, so such a tensor must take the float path, which carries it on as transformers does.
    """
    return x is None or integer_of(x, scale) is not None or bool(torch.isfinite(x).all())


class _Requant(torch.autograd.Function):
    """Forward: :func:`fixed_point_requantize` of dequantized inputs; backward ``grad / s_out`` (transformers)."""

    @staticmethod
    def forward(ctx, x, scale, num_bits, out_scale, identity, identity_scale):
        ctx.has_identity = identity is not None
        ctx.save_for_backward(out_scale)
        q = to_integer(x, scale)
        q_id = None if identity is None else to_integer(identity, identity_scale)
        return fixed_point_requantize(q, scale, num_bits, out_scale, q_id, identity_scale)

    @staticmethod
    def backward(ctx, grad):
        (s_out,) = ctx.saved_tensors
        g = grad / s_out.double()
        return g, None, None, None, (g if ctx.has_identity else None), None


def integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of integer-valued tensors with |a|, |b| <= 128: float32 chunks, float64 sum.

    ``a`` (..., K), ``b`` (K, N), both float32 holding integers of at most 8 bits.  The contraction is
    split into chunks of :data:`EXACT_CHUNK` terms, where float32 sums are exact in any order; the
    chunk results are added in float64.  (:func:`int8_matmul` is the int8-unit path, taken by
    :class:`QuantLinear` in inference where the CPU has VNNI/AMX; without them torch's ``_int_mm`` is
    ~60x slower than float32 GEMM.)

    Returns:
        float64 Tensor (..., N).  Differentiable (float32 matmuls).
    """
    K = a.shape[-1]
    if K <= EXACT_CHUNK:
        return torch.matmul(a, b).double()
    out = None
    for k0 in range(0, K, EXACT_CHUNK):
        part = torch.matmul(a[..., k0 : k0 + EXACT_CHUNK], b[k0 : k0 + EXACT_CHUNK]).double()
        out = part if out is None else out + part
    return out


def as_int8(x: torch.Tensor) -> torch.Tensor | None:
    """int8 copy of an integer-valued tensor when every value lies in ``[-128, 127]``, else None.

    Args:
        x (float Tensor): integers (e.g. a requantized 8-bit activation).
    Returns:
        int8 Tensor shaped like ``x``, or None (empty tensors included: nothing to gain).
    """
    if x.numel() == 0:
        return None
    lo, hi = torch.aminmax(x)
    if not (float(lo) >= INT8_MIN and float(hi) <= INT8_MAX):  # NaN fails too: int8 cannot hold it
        return None
    return x.to(torch.int8)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` on int8 units: ``torch._int_mm``, int32 accumulation (no autograd).

    Args:
        a (int8 Tensor (..., K)), b (int8 Tensor (K, N)), on the CPU; ``K <= INT32_EXACT_TERMS`` so
            the int32 sums cannot wrap (see :mod:`nezha_zoo.families.ibert`).
    Returns:
        int32 Tensor (..., N).
    """
    K = a.shape[-1]
    if K > INT32_EXACT_TERMS:
        raise ValueError(f"int8_matmul: {K} terms may overflow the int32 accumulator (limit {INT32_EXACT_TERMS})")
    return torch._int_mm(a.reshape(-1, K), b).reshape(*a.shape[:-1], b.shape[-1])


def _add_bias_int(acc: torch.Tensor, b_int: torch.Tensor | None, acc_bound: int) -> torch.Tensor:
    """int32 accumulator ``acc`` (``|acc| <= acc_bound``) plus the float32-held integer bias, exact.

    In place in int32 when the sum provably fits (``acc_bound + max|b_int| < 2**31``), else in int64.
    """
    if b_int is None:
        return acc
    b = b_int.detach()
    if acc_bound + float(b.abs().max()) < 2**31:
        return acc.add_(b.to(torch.int32))
    return acc.to(torch.int64).add_(b.to(torch.int64))


# --- modules -------------------------------------------------------------------------------------


class QuantEmbedding(nn.Module):
    """Embedding table with symmetric per-tensor 8-bit weight quantization.

    Buffers (persistent, transformers' names): ``weight_scaling_factor`` (1,) and ``weight_integer``
    (rows, dim), written on every quant-mode forward.

    Args:
        num_embeddings (int), embedding_dim (int), padding_idx (int | None): as ``nn.Embedding``.
        weight_bit (int): weight bit width (8).
        quant_mode (bool): quantize (True) or plain lookup (False).

    Forward: ``ids`` (LongTensor (B, L)) -> ``(x (B, L, dim) float32, scale (1,) or None)``, with
    ``x = weight_integer[ids] * weight_scaling_factor`` in quant mode.  Without autograd the table's
    quantization is cached until the weight changes (transformers re-quantizes the whole table on
    every forward).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        weight_bit: int = 8,
        quant_mode: bool = False,
    ) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.weight_bit = weight_bit
        self.quant_mode = quant_mode
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim))
        self.register_buffer("weight_scaling_factor", torch.zeros(1))
        self.register_buffer("weight_integer", torch.zeros(num_embeddings, embedding_dim))
        self._cache: tuple | None = None  # (weight version, w_int, scale) in inference

    @torch.no_grad()
    def _forward_int(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The eval-mode lookup without dequantizing: ``(int8 (B, L, dim), scale (1,))``, or None
        outside quant mode or for weights wider than 8 bits."""
        if not self.quant_mode or self.weight_bit > 8:
            return None
        w_int, scale = self._quantized_table(False)
        return F.embedding(ids, w_int, self.padding_idx), scale

    def _quantized_table(self, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_int, scale)``, written to the buffers; without autograd cached until the weight changes
        (int8 then)."""
        key = (self.weight._version, self.weight.data_ptr())
        if not differentiable and self._cache is not None and self._cache[0] == key:
            return self._cache[1:]  # the table's quantization is cached until the weight changes
        w = self.weight.detach()
        scale = symmetric_scale(self.weight_bit, w.min().expand(1), w.max().expand(1))
        w_int = symmetric_quantize(self.weight, self.weight_bit, scale)
        with torch.no_grad():
            self.weight_scaling_factor.copy_(scale)
            self.weight_integer.copy_(w_int)
        if not differentiable and self.weight_bit <= 8:
            w_int = w_int.to(torch.int8)  # inference: the downstream kernels take integer dtypes
        self._cache = None if differentiable else (key, w_int, scale)
        return w_int, scale

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.quant_mode:
            return F.embedding(ids, self.weight, self.padding_idx), None
        differentiable = torch.is_grad_enabled() and self.weight.requires_grad
        w_int, scale = self._quantized_table(differentiable)
        q = F.embedding(ids, w_int, self.padding_idx)
        return _attach(_dequantize(q, scale), q, scale), scale


class QuantAct(nn.Module):
    """Activation (re)quantization to ``activation_bit`` bits with a calibrated running range.

    Calibration (transformers' rule): in training mode every call (float or quant mode) updates the
    float32 buffers ``x_min``/``x_max`` from the batch min/max of ``x + identity``: the first update
    (range still within +-1.1e-5 of the initial +-1e-5) adds the batch values to the initial ones; later
    ones are an EMA ``r * momentum + batch * (1 - momentum)`` (momentum 0.95; -1 means running
    min/max).  In eval mode the range is frozen.  Quant mode then sets
    ``act_scaling_factor = symmetric_scale(bits, x_min, x_max)`` and returns
    ``q_out * act_scaling_factor``.

    Args:
        activation_bit (int): output bit width.
        act_range_momentum (float): EMA momentum of the range.
        quant_mode (bool): quantize (True) or pass ``x + identity`` through (False).

    Forward: ``x`` (..., C) with ``pre_act_scaling_factor`` (1,) or (C,) (None: ``x`` is a float input,
    quantized directly with ``round(x / s)``); optional residual ``identity`` with its
    ``identity_scaling_factor``; ``specified_min``/``specified_max`` override the range.  Returns
    ``(x_out float32, act_scaling_factor (1,))`` (``(x + identity, None)`` in float mode).

    Deliberate difference from transformers: with ``pre_act_scaling_factor=None`` and an ``identity``
    (only ``inputs_embeds`` in quant mode), transformers quantizes ``x`` alone and drops the residual
    (so token-type embeddings vanish); here ``x + identity`` is quantized.
    """

    def __init__(self, activation_bit: int, act_range_momentum: float = 0.95, quant_mode: bool = False) -> None:
        super().__init__()
        self.activation_bit = activation_bit
        self.act_range_momentum = act_range_momentum
        self.quant_mode = quant_mode
        self.register_buffer("x_min", torch.full((1,), -1e-5))
        self.register_buffer("x_max", torch.full((1,), 1e-5))
        self.register_buffer("act_scaling_factor", torch.zeros(1))
        self._frozen_scale = EvalConstants()  # eval: the scale of the frozen range
        self._multipliers = EvalConstants()  # eval: the requantization multipliers of the last input scales

    def extra_repr(self) -> str:
        return f"activation_bit={self.activation_bit}, quant_mode={self.quant_mode}"

    def _output_scale(
        self, specified_min: torch.Tensor | None = None, specified_max: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``act_scaling_factor`` for this call, written to the buffer; in eval mode (frozen range) the
        same tensor object on every call until the range changes, so that the kernels downstream can
        keep the constants they derive from it."""
        if self.training or specified_min is not None or specified_max is not None:
            x_min = self.x_min if specified_min is None else specified_min
            x_max = self.x_max if specified_max is None else specified_max
            return self._write_scale(x_min, x_max)
        return self._frozen_scale.get((self.x_min, self.x_max), lambda: self._write_scale(self.x_min, self.x_max))

    def _write_scale(self, x_min: torch.Tensor, x_max: torch.Tensor) -> torch.Tensor:
        scale = symmetric_scale(self.activation_bit, x_min, x_max)
        with torch.no_grad():
            self.act_scaling_factor.copy_(scale)
        return scale

    @torch.no_grad()
    def _forward_int(
        self,
        q: torch.Tensor,
        scaling_factor: torch.Tensor,
        identity_q: torch.Tensor | None = None,
        identity_scaling_factor: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode requantization of exact integers (and a residual's), without dequantizing.

        Args:
            q (integer Tensor (..., C), or float64 holding integers): ``|q| < 2**53``.
            scaling_factor (float32 Tensor (1,) or (C,)): its scale.
            identity_q, identity_scaling_factor: the residual's integers and scale, or None.
        Returns:
            ``(q_out, act_scaling_factor)``: int8 for ``activation_bit <= 8``, else int32; the same
            integers as :func:`requantize_int` (its multipliers kept between calls).
        """
        scale = self._output_scale()
        multipliers = self._multipliers.get(
            (scaling_factor, identity_scaling_factor, scale),
            lambda: (
                _requant_multiplier(scaling_factor, scale),
                None if identity_q is None else _requant_multiplier(identity_scaling_factor, scale),
            ),
        )
        bits = self.activation_bit
        out = _rescale_int(q, multipliers[0], bits, identity_q, multipliers[1])
        return out.to(torch.int8 if bits <= 8 else torch.int32), scale

    @torch.no_grad()
    def update_range(self, x_act: torch.Tensor) -> None:
        """One calibration step from ``x_act`` (any shape); see the class docstring."""
        lo, hi = x_act.min().float(), x_act.max().float()
        # reading the values is a graph break under torch.compile: the check is eager's
        if not torch.compiler.is_compiling() and (torch.isnan(lo) or torch.isnan(hi)):
            raise ValueError("QuantAct: NaN in the activation while calibrating its range")
        if self.act_range_momentum == -1:
            new_min, new_max = torch.minimum(self.x_min, lo), torch.maximum(self.x_max, hi)
        else:
            m = self.act_range_momentum
            new_min, new_max = self.x_min * m + lo * (1 - m), self.x_max * m + hi * (1 - m)
        # the first update adds the batch range to the initial one; a select, not a branch on values,
        # so that a compiled training step stays one graph
        fresh = (self.x_min.min() > -UNCALIBRATED_RANGE) & (self.x_max.max() < UNCALIBRATED_RANGE)
        self.x_min.copy_(torch.where(fresh, self.x_min + lo, new_min))
        self.x_max.copy_(torch.where(fresh, self.x_max + hi, new_max))

    def forward(
        self,
        x: torch.Tensor,
        pre_act_scaling_factor: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
        identity_scaling_factor: torch.Tensor | None = None,
        specified_min: torch.Tensor | None = None,
        specified_max: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # the sum is needed to calibrate, in float mode and for a float input; an eval-mode
        # requantization adds the two integer tensors instead
        lazy = identity is not None and not self.training and self.quant_mode and pre_act_scaling_factor is not None
        x_act = x if identity is None or lazy else identity + x
        if self.training:
            self.update_range(x_act.detach())
        if not self.quant_mode:
            return x_act, None
        scale = self._output_scale(specified_min, specified_max)
        if pre_act_scaling_factor is None:
            q = symmetric_quantize(x_act.float(), self.activation_bit, scale)
        elif (
            _inference(x, identity)
            and self.activation_bit <= 32
            and _has_integers(x, pre_act_scaling_factor)
            and _has_integers(identity, identity_scaling_factor)
        ):
            # integer dtypes end to end (same integers as _Requant's float64 path)
            q_id = None if identity is None else _integer_or_recover(identity, identity_scaling_factor)
            q_x = _integer_or_recover(x, pre_act_scaling_factor)
            if self.training or specified_min is not None or specified_max is not None:
                q = requantize_int(
                    q_x, pre_act_scaling_factor, self.activation_bit, scale, q_id, identity_scaling_factor
                )
            else:
                q, scale = self._forward_int(q_x, pre_act_scaling_factor, q_id, identity_scaling_factor)
            return _attach(_dequantize(q, scale), q, scale), scale
        else:
            q = _Requant.apply(
                x, pre_act_scaling_factor, self.activation_bit, scale, identity, identity_scaling_factor
            ).float()
        return _attach(q * scale, q, scale), scale


class QuantLinear(nn.Module):
    """Linear layer with 8-bit (per-output-channel) weights and 32-bit biases.

    Quant mode: ``s_w = symmetric_scale(8, w.min(1), w.max(1))`` per output row (per tensor if not
    ``per_channel``), ``w_int = symmetric_quantize(w, 8, s_w)``; ``s_out = s_w * s_in``;
    ``b_int = symmetric_quantize(b, 32, s_out)``; ``acc = x_int @ w_int.T + b_int`` exactly
    (:func:`integer_matmul`); returns ``(acc * s_out as float64, s_out (out,))``.  The buffers
    ``weight_integer``, ``fc_scaling_factor`` and ``bias_integer`` are written on every quant-mode
    forward; in eval mode the weight quantization is cached until the weight changes.

    Args:
        in_features (int), out_features (int), bias (bool): as ``nn.Linear``.
        weight_bit (int), bias_bit (int): bit widths (8, 32).
        per_channel (bool): one weight scale per output row.
        quant_mode (bool): quantize (True) or the float product :func:`nezha_zoo.pt.layers.linear` (False).

    Forward: ``x`` (..., in) and ``prev_act_scaling_factor`` (1,) (required in quant mode: the input
    must be per-tensor quantized) -> ``(y (..., out), scale (out,) or None)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_bit: int = 8,
        bias_bit: int = 32,
        per_channel: bool = True,
        quant_mode: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_bit, self.bias_bit = weight_bit, bias_bit
        self.per_channel = per_channel
        self.quant_mode = quant_mode
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.register_buffer("weight_integer", torch.zeros(out_features, in_features))
        self.register_buffer("fc_scaling_factor", torch.zeros(out_features))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            self.register_buffer("bias_integer", torch.zeros(out_features))
        else:
            self.bias = None
        # (weight version, w_int.T float32 (in, out), scale, w_int.T int8 or None) in inference
        self._cache: tuple | None = None
        self._int_bias = EvalConstants()  # eval: (out_scale, bias integers to add to the accumulator)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant_mode={self.quant_mode}"

    def _weight_scale(self) -> torch.Tensor:
        w = self.weight.detach()
        if self.per_channel:
            return symmetric_scale(self.weight_bit, w.min(dim=1).values, w.max(dim=1).values, per_channel=True)
        return symmetric_scale(self.weight_bit, w.min().expand(1), w.max().expand(1))

    def _quantized_weight(self, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(w_int.T (in, out) float32, scale (out,), int8 copy or None)``, written to the buffers;
        without autograd cached until the weight changes."""
        key = (self.weight._version, self.weight.data_ptr())
        if not differentiable and self._cache is not None and self._cache[0] == key:
            return self._cache[1:]
        scale = self._weight_scale()
        w_int = symmetric_quantize(self.weight, self.weight_bit, scale)  # (out, in)
        with torch.no_grad():
            self.weight_integer.copy_(w_int)
            self.fc_scaling_factor.copy_(scale)
        w_int_t = w_int.t() if differentiable else w_int.t().contiguous()
        self._cache = None if differentiable else (key, w_int_t, scale, None)  # int8 copy made on first use
        return w_int_t, scale, None

    def _int8_weight(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(w_int.T int8 (in, out) or None, scale (out,))`` for the int8 path (inference)."""
        w_int_t, scale, w8_t = self._quantized_weight(False)
        if w8_t is None:
            w8_t = as_int8(w_int_t)  # 8-bit weights always fit ([-127, 126])
            self._cache = (*self._cache[:3], w8_t)
        return w8_t, scale

    @torch.no_grad()
    def _forward_int(
        self, q: torch.Tensor, prev_act_scaling_factor: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The inference product of int8 activations, without dequantizing: on the CPU's int8 units
        where it has them (:func:`int8_matmul`), else as exact float32 products.

        Args:
            q (int8 Tensor (..., in)): the requantized activation's integers.
            prev_act_scaling_factor (float32 Tensor (1,)): their scale.
        Returns:
            ``(acc, out_scale (out,))``: ``acc = q @ w_int.T + b_int`` exactly, int32 where its bound
            (``in * 2**(w-1) * 128 + max|b_int|``) allows, else int64; None outside quant mode or for
            another input dtype.
        """
        if not self.quant_mode or q.dtype != torch.int8:
            return None
        K = q.shape[-1]
        w8_t = None
        if q.device.type == "cpu" and K <= INT32_EXACT_TERMS and int8_products():
            w8_t, scale = self._int8_weight()
        if w8_t is None:
            w_int_t, scale, _ = self._quantized_weight(False)

        def bias_constants():
            out_scale = scale * prev_act_scaling_factor  # (out,)
            products = K * 2 ** (self.weight_bit - 1) * -INT8_MIN  # bound of |q @ w_int.T|
            if self.bias is None:
                return out_scale, None, products
            b_int = symmetric_quantize(self.bias, self.bias_bit, out_scale)
            self.bias_integer.copy_(b_int)
            return out_scale, b_int, products + float(b_int.abs().max())

        out_scale, b_int, bound = self._int_bias.get((scale, prev_act_scaling_factor, self.bias), bias_constants)
        wide = torch.int32 if bound < 2**31 else torch.int64
        if w8_t is not None:  # int8 x int8 -> int32 (exact), then the 32-bit bias in integers
            acc = int8_matmul(q, w8_t)
            if b_int is not None:
                acc = acc.to(wide).add_(b_int.to(wide))
        elif bound < 2**24:  # every partial sum, bias included, an exact float32 integer: one GEMM
            x = q.reshape(-1, K).float()
            acc = torch.mm(x, w_int_t) if b_int is None else torch.addmm(b_int, x, w_int_t)
            acc = acc.reshape(*q.shape[:-1], -1).to(torch.int32)
        else:
            acc = integer_matmul(q.float(), w_int_t)  # float32 chunks, float64 sums: exact
            if b_int is not None:
                acc = acc.add_(b_int.double())
            acc = acc.to(wide)
        return acc, out_scale

    def forward(
        self, x: torch.Tensor, prev_act_scaling_factor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.quant_mode:  # float mode: the blocks' product (training on oneDNN where faster)
            return linear(x, self.weight, self.bias), None
        if prev_act_scaling_factor is None or tuple(prev_act_scaling_factor.shape) != (1,):
            raise ValueError(
                "QuantLinear: prev_act_scaling_factor must be a per-tensor scale of shape (1,), got "
                f"{None if prev_act_scaling_factor is None else tuple(prev_act_scaling_factor.shape)}"
            )
        differentiable = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        q8 = None if differentiable else integer_of(x, prev_act_scaling_factor)
        done = None if q8 is None else self._forward_int(q8, prev_act_scaling_factor)
        if done is not None:
            acc, out_scale = done
            return _attach(_dequantize(acc, out_scale.double()), acc, out_scale), out_scale
        w_int_t, scale, w8_t = self._quantized_weight(differentiable)
        out_scale = scale * prev_act_scaling_factor  # (out,)
        attached = None if differentiable else integer_of(x, prev_act_scaling_factor)
        if attached is None:
            attached = getattr(x, "_nz_int", None)
            attached = attached[0] if attached is not None and attached[1] is prev_act_scaling_factor else None
        if attached is not None and not differentiable:
            x_int = attached  # the requantized activation's integers (an integer dtype or float32)
        else:
            x_int = round_ste(x / prev_act_scaling_factor).float()  # exact: |x_int| <= 2**(b-1) <= 2**21
        b_int = None
        if self.bias is not None:
            b_int = symmetric_quantize(self.bias, self.bias_bit, out_scale)
            with torch.no_grad():
                self.bias_integer.copy_(b_int)
        K = x_int.shape[-1]
        x8 = None
        if not differentiable and x.device.type == "cpu" and K <= INT32_EXACT_TERMS and int8_products():
            w8_t, _ = self._int8_weight()
            # an int8 activation (QuantAct of <= 8 bits) is used as it is; others are range-checked
            x8 = None if w8_t is None else (x_int if x_int.dtype == torch.int8 else as_int8(x_int))
        if x8 is not None:
            # int8 x int8 -> int32 on the CPU's int8 units (exact), then the 32-bit bias in integers
            acc = _add_bias_int(int8_matmul(x8, w8_t), b_int, K * 2 ** (self.weight_bit - 1) * -INT8_MIN)
            return _attach(_dequantize(acc, out_scale.double()), acc, out_scale), out_scale
        x_int = x_int.float()
        fused = False
        if b_int is not None and not differentiable:
            bound = K * 2 ** (self.weight_bit - 1) * float(x_int.abs().max()) + float(b_int.detach().abs().max())
            fused = bound < 2**24
        if fused:
            # every partial sum, bias included, is an exact float32 integer: one fused GEMM
            acc = torch.addmm(b_int, x_int.reshape(-1, K), w_int_t).reshape(*x_int.shape[:-1], -1)
            acc = acc.to(torch.int32)  # |acc| < 2**24 (inference only): the next kernels use integers
        else:
            acc = integer_matmul(x_int, w_int_t)  # (..., out) float64, exact
            if b_int is not None:
                acc = acc + b_int.double()
            # exact: |acc| <= K * 2**14 + 2**31; a NaN/inf input row (a float64 rule upstream can give
            # one) has no int64 form and stays float64, carried on as transformers carries it
            if not differentiable and bool(torch.isfinite(acc).all()):
                acc = acc.to(torch.int64)
        return _attach(_dequantize(acc, out_scale.double()), acc, out_scale), out_scale


class IntGELU(nn.Module):
    """GELU, integer-only in quant mode: ``x * (1 + erf_int(x / sqrt 2)) / 2``.

    ``erf`` is the second-order polynomial ``sign(x) * (a * (min(|x|, -b) + b)**2 + 1)`` with
    ``a = -0.2888``, ``b = -1.769`` (I-BERT).  With ``q`` the exact input integer and ``s`` its scale
    (per channel allowed):

    * ``s_e = fl32(s / 1.4142)``; ``b_int = floor(fl32(b / s_e))``; ``c_int = floor(fl32((1/a) / s_e**2))``;
    * ``y = sign(q) * ((min(|q|, -b_int) + b_int)**2 + c_int)``; ``y = floor(y / 2**14)``,
      ``s_y = fl32(fl32(s_e**2 * a) * 2**14)``;
    * ``one = 1.0 // s_y`` (float32 floor division, Python/numpy semantics); ``q_out = q * (y + one)``;
      ``s_out = fl32(s * s_y / 2)``.

    ``q_out`` reaches ~2**40: it is carried exactly in float64 (transformers rounds it to float32).

    Args:
        quant_mode (bool): integer GELU (True) or exact erf GELU (False).
        force_dequant (str): ``"gelu"`` or ``"nonlinear"`` keep the float GELU in quant mode.

    Forward: ``(x (..., C), s)`` -> ``(q_out * s_out as float64, s_out)``; float mode ``(gelu(x), None)``.
    """

    def __init__(self, quant_mode: bool = True, force_dequant: str = "none") -> None:
        super().__init__()
        self.quant_mode = quant_mode and force_dequant not in ("nonlinear", "gelu")
        self.k = GELU_SQRT2
        self.const = GELU_SHIFT
        self.coeff = [*GELU_COEFFS, 1.0 / GELU_COEFFS[0]]  # a, b, c / a with c = 1
        self._constants = EvalConstants()  # eval: _int_constants of the last input scale

    def int_erf(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer erf of ``q * scale``: returns ``(y float64 integers, s_y float32)``."""
        with torch.no_grad():
            b_int = torch.floor(self.coeff[1] / scale).double()
            c_int = torch.floor(self.coeff[2] / scale**2).double()
        sign = torch.sign(q)
        abs_int = torch.minimum(torch.abs(q), -b_int)
        y = sign * ((abs_int + b_int) ** 2 + c_int)
        y = floor_ste(y / 2**self.const)
        s_y = scale**2 * self.coeff[0] * 2**self.const
        return y, s_y

    @torch.no_grad()
    def _forward_int(self, q: torch.Tensor, scaling_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The quant-mode forward on an integer-dtype ``q`` (int32/int64 accumulators), in int32/int64.

        The same integers as the float64 path whenever that path is exact, which is checked first
        (None otherwise, and the caller takes the float64 path): ``b_int**2 + |c_int| < 2**53`` bounds
        the polynomial, ``max|q| * max|y + one| < 2**53`` the output.  ``floor(y / 2**14)`` is an
        arithmetic right shift; ``sign(0) = 0`` needs no care since ``q = 0`` gives ``q_out = 0``.
        """
        if q.numel() == 0 or not self.quant_mode:
            return None
        constants = self._constants.get((scaling_factor,), lambda: self._int_constants(scaling_factor))
        if constants is None:
            return None
        b_int, c_int, one, y_max, out_scale = constants
        # |q| < 2**31 for an int32 accumulator: the bound then needs no pass over q
        q_bound = 2.0**31 if q.dtype in (torch.int8, torch.int16, torch.int32) else None
        if q_bound is None or q_bound * y_max >= 2**53:
            lo, hi = torch.aminmax(q)
            if max(-float(lo), float(hi)) * y_max >= 2**53:
                return None
        q = q.to(torch.int64)  # one conversion; every step below is in place in int64
        t = q.abs()
        t = torch.minimum(t, -b_int, out=t).add_(b_int)  # in [b_int, 0]
        y = t.mul_(t).add_(c_int).mul_(torch.sign(q))
        y.bitwise_right_shift_(self.const).add_(one)
        return y.mul_(q), out_scale

    def _int_constants(self, scaling_factor: torch.Tensor) -> tuple | None:
        """``(b_int, c_int, one)`` (int64, per channel), the bound ``max|y + one|`` and the output scale
        for :meth:`_forward_int`; None where the int64 rule is not provably exact."""
        scale = scaling_factor / self.k
        b_f = torch.floor(self.coeff[1] / scale)  # float32, <= 0
        c_f = torch.floor(self.coeff[2] / scale**2)  # float32, <= 0
        s_y = scale**2 * self.coeff[0] * 2**self.const
        one_f = 1.0 // s_y
        b_max, c_max = float(b_f.abs().max()), float(c_f.abs().max())
        one_max = float(one_f.abs().max())
        if not (b_max * b_max + c_max < 2**53 and one_max < 2**53):
            return None
        y_max = (b_max * b_max + c_max) / 2**self.const + 1 + one_max
        ints = (b_f.to(torch.int64), c_f.to(torch.int64), one_f.to(torch.int64))
        return (*ints, y_max, scaling_factor * s_y / 2)

    def forward(self, x: torch.Tensor, scaling_factor: torch.Tensor | None = None):
        if not self.quant_mode:
            return F.gelu(x.float()), None
        q_int = integer_of(x, scaling_factor) if _inference(x, scaling_factor) else None
        done = None if q_int is None else self._forward_int(q_int, scaling_factor)
        if done is not None:
            q, out_scale = done
            return _attach(_dequantize(q, out_scale.double()), q, out_scale), out_scale
        q = to_integer(x, scaling_factor)
        y, s_y = self.int_erf(q, scaling_factor / self.k)
        with torch.no_grad():
            one = (1.0 // s_y).double()  # float32 floor division (fmod-based, as Python and numpy)
        q = q * (y + one)
        out_scale = scaling_factor * s_y / 2
        return _attach(q * out_scale.double(), q, out_scale), out_scale


class IntSoftmax(nn.Module):
    """Softmax over the last axis, integer-only in quant mode (``output_bit``-bit probabilities).

    With ``q`` the exact integer scores (masked entries very negative) and ``s`` their scale (1,):

    * ``q = q - max(q)``; ``x0 = floor(fl32(-0.6931 / s))``; ``q = max(q, 30 * x0)``;
    * ``k = floor(q / x0)``, ``r = q - x0 * k`` (so ``exp = 2**-k * exp(r)``);
    * ``b = floor(fl32((0.96963238/0.35815147) / s))``, ``c = floor(fl32((1/0.35815147) / s**2))``:
      ``p = (r + b) * r + c``, scale ``fl32(0.35815147 * s**2)``;
    * ``e = max(floor(p * 2**(30 - k)), 0)``, scale ``s_e = fl32(0.35815147 * s**2) / 2**30``;
    * ``act`` (``QuantAct(16)``, calibrated on ``e`` itself, as transformers) requantizes: its input
      value is ``e`` with scale ``s_e``, i.e. ``round(e / s_e)`` in float64, giving 16-bit ``e16``;
    * ``f = floor(2**32 / sum(e16))``; ``prob = floor(e16 * f / 2**(32 - output_bit))``, scale
      ``2**-output_bit``.

    Args:
        output_bit (int): probability bit width (8).
        quant_mode (bool): integer (True) or float softmax (False).
        force_dequant (str): ``"softmax"`` or ``"nonlinear"`` keep the float softmax in quant mode.

    Forward: ``(x (..., L) dequantized scores plus additive mask, s (1,))`` -> ``(prob * 2**-8
    float32, tensor 2**-8)``; float mode ``(softmax(x), None)``.  :meth:`forward_int` takes the integer
    scores directly.
    """

    def __init__(self, output_bit: int, quant_mode: bool = False, force_dequant: str = "none") -> None:
        super().__init__()
        self.output_bit = output_bit
        self.max_bit = MAX_BIT
        self.quant_mode = quant_mode and force_dequant not in ("nonlinear", "softmax")
        self.act = QuantAct(SOFTMAX_EXP_BIT, quant_mode=self.quant_mode)
        self.x0 = EXP_X0
        self.const = EXP_SHIFT
        a, b, c = EXP_COEFFS
        self.coef = [a, b / a, c / a]
        self._table: tuple | None = None  # (key, int32 exponential table, its scale): see _exp16_lookup
        self._prob_scale = EvalConstants()  # the constant 2**-output_bit, one tensor object

    def probability_scale(self, device: torch.device) -> torch.Tensor:
        """The probabilities' scale ``2**-output_bit`` (float32 (1,)), the same tensor on every call."""
        return self._prob_scale.get((), lambda: torch.full((1,), 2.0**-self.output_bit)).to(device)

    def int_exp(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer ``exp`` of non-positive integer ``q`` (scale ``scale``): ``(e float64, s_e float32)``."""
        with torch.no_grad():
            x0 = torch.floor(self.x0 / scale).double()
            b_int = torch.floor(self.coef[1] / scale).double()
            c_int = torch.floor(self.coef[2] / scale**2).double()
        q = torch.maximum(q, self.const * x0)
        k = floor_ste(q / x0)
        r = q - x0 * k
        p = (r + b_int) * r + c_int
        e = torch.clamp(floor_ste(p * 2 ** (self.const - k)), min=0)
        return e, self.coef[0] * scale**2 / 2**self.const

    @torch.no_grad()
    def _exp16_lookup(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
        """Inference shortcut, same integers: the 16-bit exponential is a function of the clamped
        integer score alone (``30 * x0 <= q <= 0``), so it is tabulated and gathered; the table is
        kept while the scale and ``act``'s range stay the same.  None when the table would be larger
        than both the scores and :data:`EXP_TABLE_SIZE`.  Returns int32 (the 16-bit exponentials), shaped like ``q``."""
        x0 = float(torch.floor(self.x0 / scale))
        size = int(-self.const * x0) + 1
        if size >= max(q.numel(), EXP_TABLE_SIZE):
            return None
        if q.is_floating_point() and not bool(torch.isfinite(q).all()):
            return None  # a NaN score (from a NaN row upstream) has no table index; the rule carries it
        act = self.act
        key = (float(scale), float(act.x_min), float(act.x_max), act.training, q.device)
        if self._table is not None and self._table[0] == key:
            _, table, s16 = self._table  # same scale and frozen range: the same table
            act.act_scaling_factor.copy_(s16)
        else:
            table_q = -torch.arange(size, dtype=torch.float64, device=q.device)  # 0, -1, ..., 30 * x0
            e, s_e = self.int_exp(table_q, scale)
            e16, s16 = act(e, s_e)
            table = to_integer(e16, s16).to(torch.int32)  # 16-bit integers
            self._table = (key, table, s16)
        idx = torch.clamp(q, min=-(size - 1)).neg_()  # the clamp of int_exp, as a table index
        idx = idx.to(torch.int32 if q.dtype == torch.int32 else torch.int64)
        return table.index_select(0, idx.reshape(-1)).view(idx.shape)

    @torch.no_grad()
    def mask_scores_int(
        self, scores: torch.Tensor, attention_mask: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor | None:
        """Integer scores plus an additive 0 / very-negative mask, in int32, for :meth:`forward_int`.

        The float64 rule adds ``mask / s`` to the scores; a masked score then lies so far below its
        row's maximum (an unmasked score) that the exponent clamp at ``30 * x0`` takes it, whatever
        its value.  So where every mask value is 0 or below ``-MASKED_SCORE`` (in score units) and
        every row has an unmasked entry, adding ``-2**30`` instead gives the same probabilities.
        Otherwise (None) the caller takes the float64 rule.

        Args:
            scores (int32 Tensor (B, h, Lq, Lk)): ``q_int @ k_int^T``, ``|.| < 2**24``.
            attention_mask (float Tensor broadcastable to ``scores``): additive mask.
            scale (float32 Tensor (1,)): scale of the scores.
        Returns:
            ``scores`` itself (updated in place), or None.
        """
        x0 = float(torch.floor(self.x0 / scale))
        masked = attention_mask.double() / scale.double()
        visible = masked == 0
        # |score| < 2**24 on both sides of the subtraction of the row maximum: 2**25 of slack
        if -self.const * x0 >= MASKED_SCORE - 2**25 or not bool(visible.any(dim=-1).all()):
            return None
        if not bool((visible | (masked <= -MASKED_SCORE)).all()):
            return None
        return scores.add_(torch.where(visible, 0, -MASKED_SCORE).to(torch.int32))

    def forward_int(self, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer softmax of float64 integer scores ``q`` (..., L), scale (1,): ``(prob float32 ints, 2**-b)``."""
        q = q - q.max(dim=-1, keepdim=True).values
        e16 = None
        if not self.training and not (torch.is_grad_enabled() and q.requires_grad):
            e16 = self._exp16_lookup(q, scale)
        if e16 is None:
            q = q if q.is_floating_point() else q.double()
            e, s_e = self.int_exp(q, scale)
            e16, s16 = self.act(e, s_e)  # dequantized e16 * s16 (float32)
            e16 = to_integer(e16, s16)
        if not e16.is_floating_point():
            # integer dtypes: e16 <= sum(e16) < 2**53, so e16 * f <= 2**32 is exact in int64 and
            # floor(v / 2**k) is a right shift (the same integers as the float64 rule below)
            total = e16.sum(dim=-1, keepdim=True, dtype=torch.int64)
            if bool((total > 0).all()):
                f = torch.floor(2**self.max_bit / total.double()).to(torch.int64)
                prob = e16.to(torch.int64).mul_(f).bitwise_right_shift_(self.max_bit - self.output_bit)
                return prob.float(), self.probability_scale(q.device)
            e16 = e16.double()
        f = floor_ste(2**self.max_bit / e16.sum(dim=-1, keepdim=True))
        prob = floor_ste(e16 * f / 2 ** (self.max_bit - self.output_bit))
        return prob.float(), self.probability_scale(q.device)

    def forward(self, x: torch.Tensor, scaling_factor: torch.Tensor | None = None):
        if not self.quant_mode:
            return torch.softmax(x, dim=-1), None
        prob, s = self.forward_int(torch.round(x.double() / scaling_factor.double()), scaling_factor)
        return prob * s, s


class IntLayerNorm(nn.Module):
    """LayerNorm over the last axis, integer-only in quant mode (32-bit output, per-channel scale).

    With ``q`` (22-bit) the exact input integers, ``n`` the width, ``shift`` the buffer:

    * ``mu = round(sum(q) / n)``, ``y = q - mu``; ``var = sum(floor(y / 2**shift)**2)``;
    * training only: if ``max(var) >= 2**32``, ``shift = max(shift, max(ceil(log2(sqrt(sum(y**2) /
      2**32)))))`` and ``var`` is recomputed (transformers' overflow fallback);
    * ``std = floor(sqrt(var)) * 2**shift``; ``f = floor(2**31 / std)``; ``y = floor(y * f / 2)``;
    * scale ``s = fl32(sqrt(fl32(n)) / 2**30)``; ``b_int = floor(fl32(fl32(bias / weight) / s))``;
      ``q_out = y + b_int``; output scale ``s * weight`` (C,).

    All integers are exact (float64; the variance is < 2**32 and ``y * f`` < 2**37).

    Args:
        normalized_shape (int): width ``n``.
        eps (float): float-mode epsilon.
        output_bit (int): kept for transformers' signature (the ``activation`` buffers are saved but,
            as in transformers, never used).
        quant_mode (bool): integer (True) or ``F.layer_norm`` (False).
        force_dequant (str): ``"layernorm"`` or ``"nonlinear"`` keep the float LayerNorm in quant mode.

    Forward: ``(x (B, L, n), s (1,))`` -> ``(q_out * s_out as float64, s_out (n,))``; float mode
    ``(layer_norm(x), None)``.
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float,
        output_bit: int = 8,
        quant_mode: bool = False,
        force_dequant: str = "none",
    ) -> None:
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.quant_mode = quant_mode and force_dequant not in ("nonlinear", "layernorm")
        self.register_buffer("shift", torch.zeros(1))
        self.output_bit = output_bit
        self.max_bit = MAX_BIT
        self.activation = QuantAct(output_bit, quant_mode=self.quant_mode)
        self._constants = EvalConstants()  # eval: (bias integers, output scale) of the parameters

    def _variance(self, y: torch.Tensor) -> torch.Tensor:
        y_shifted = floor_ste(y / 2 ** self.shift.double())
        return (y_shifted**2).sum(dim=-1, keepdim=True)

    @torch.no_grad()
    def _forward_int(self, q: torch.Tensor, scaling_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The eval-mode quant forward on an integer-dtype ``q`` (22-bit), in int32/int64.

        Same integers as the float64 path where that one is exact (checked, else None): the sums and
        ``sum(y_shifted**2)`` below 2**53 (exact in int64 in any order), ``|y| * factor < 2**53``
        and the bias integers below 2**53.  ``floor(v / 2**k)`` is an arithmetic right shift; the
        per-row scalars (mean, std, factor) stay in float64, as in the float64 path.
        """
        n = q.shape[-1]
        shift = float(self.shift)
        if q.numel() == 0 or not self.quant_mode or shift != int(shift) or not 0 <= shift < 62:
            return None
        lo, hi = torch.aminmax(q)
        q_max = max(-int(lo), int(hi))
        # the sums below 2**53; the squares' int64 sum cannot wrap ((2 * q_max)**2 * n < 2**63)
        if q_max * n >= 2**53 or (2 * q_max) ** 2 * n >= 2**63:
            return None
        mean = torch.round(q.sum(dim=-1, keepdim=True, dtype=torch.int64).double() / n)
        y = q.to(torch.int64, copy=True).sub_(mean.to(torch.int64))  # |y| <= 2 * q_max; q untouched
        y_shifted = torch.bitwise_right_shift(y, int(shift))
        # a float64 sum of non-negative exact terms is exact when the total is below 2**53
        var = y_shifted.mul_(y_shifted).sum(dim=-1, keepdim=True)
        lo, hi = torch.aminmax(var)
        if int(hi) >= 2**53 or int(lo) < 1:
            return None
        var = var.double()
        std = torch.floor(torch.sqrt(var)) * 2**shift
        factor = torch.floor(2**31 / std)
        constants = self._constants.get((self.weight, self.bias), lambda: self._int_constants(n, q.device))
        if constants is None:
            return None
        bias_int, out_scale = constants
        # std >= 1 bounds |y| * factor: |y| < (sqrt(var) + 1) * 2**shift, so |y * factor| < 3 * 2**31
        y.mul_(factor.to(torch.int64)).bitwise_right_shift_(1).add_(bias_int)
        return y, out_scale

    def _int_constants(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(bias integers int64 (n,), output scale (n,))`` for :meth:`_forward_int`; None where the
        bias integers are too large for its int64 sums to be exact."""
        scale = torch.sqrt(torch.tensor(float(n))).to(device) / 2**30  # float32, as transformers
        bias_f = torch.floor((self.bias / self.weight) / scale)
        if not float(bias_f.abs().max()) < 2**53 - 2**33:
            return None
        return bias_f.to(torch.int64), scale * self.weight

    def forward(self, x: torch.Tensor, scaling_factor: torch.Tensor | None = None):
        if not self.quant_mode:
            return F.layer_norm(x.float(), (self.normalized_shape,), self.weight, self.bias, self.eps), None
        inference = not self.training and _inference(x, scaling_factor, self.weight, self.bias)
        q_int = integer_of(x, scaling_factor) if inference else None
        done = None if q_int is None else self._forward_int(q_int, scaling_factor)
        if done is not None:
            y, out_scale = done
            return _attach(_dequantize(y, out_scale.double()), y, out_scale), out_scale
        n = x.shape[-1]
        q = to_integer(x, scaling_factor)
        mean = round_ste(q.sum(dim=-1, keepdim=True) / n)
        y = q - mean
        var = self._variance(y)
        if self.training and var.max() >= 2**self.max_bit:
            with torch.no_grad():
                full = (y**2).sum(dim=-1, keepdim=True)
                shift = torch.ceil(torch.log2(torch.sqrt(full / 2**self.max_bit))).max().float()
                old = float(self.shift)
                self.shift.copy_(torch.maximum(self.shift, shift))
                logger.info("IntLayerNorm: dynamic shift %d -> %d", int(old), int(self.shift))
            var = self._variance(y)
            if var.max() >= 2**self.max_bit + 0.1:
                raise RuntimeError("IntLayerNorm: variance still overflows 32 bits after the shift adjustment")
        std = floor_ste(torch.sqrt(var)) * 2 ** self.shift.double()
        factor = floor_ste(2**31 / std)
        y = floor_ste(y * factor / 2)
        scale = torch.sqrt(torch.tensor(float(n))).to(x.device) / 2**30  # float32, as transformers
        with torch.no_grad():
            bias_int = torch.floor((self.bias / self.weight) / scale).double()
        y = y + bias_int
        out_scale = scale * self.weight  # (n,): the weight's gradient flows through the scale
        return _attach(y * out_scale.double(), y, out_scale), out_scale
