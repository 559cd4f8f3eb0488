"""Shared BERT-style building blocks for the PyTorch backend.

Five families (Nezha, XLM-RoBERTa-XL, Electra, I-BERT, MPNet) are BERT-style encoders.  The blocks
here are parameterised so a family declares only its differences:

* module names come from :class:`nezha_zoo.spec.blocks.BertLayerNames`, so renamed submodules
  (MPNet's ``attention.attn.q``) and pre-LayerNorm layouts (XLM-R-XL's ``self_attn_layer_norm``)
  are a different names object, not a different class;
* :class:`BertSelfAttention` takes optional ``position_bias`` (added after scaling, MPNet) and
  ``relative_key`` / ``relative_value`` terms (added before scaling / to the context, Nezha), given
  as a dense ``(Lq, Lk, d)`` tensor or as a :class:`RelativeEmbedding` (a small table of ``P`` rows
  plus an ``(Lq, Lk)`` index into it, so no ``(Lq, Lk, d)`` tensor is ever built);
* :class:`BertEmbeddings` can drop the position table (Nezha) or the LayerNorm (XLM-R-XL);
* :class:`BertEncoder` takes an optional final LayerNorm (XLM-R-XL) and runs as a decoder with
  cross-attention and a key/value cache.
* the blocks' products are :class:`PackedLinear` (an ``nn.Linear`` whose training products run on
  oneDNN where that is faster, whose inference calls pick a faster product by row count, and can run on
  oneDNN-packed weights, opt-in: :func:`set_packed_linear`; MPT's blocks use it too); other large
  products (LM heads, I-BERT's float mode) call :func:`linear`, the one entry point of every path.

Every parameterised module is attached under the exact dotted path of transformers' PyTorch state
dict, so ``state_dict()`` keys are the spec's canonical names.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nezha_zoo.dtypes import SATURATING_MASK_DTYPES
from nezha_zoo.hardware import cpu_features
from nezha_zoo.packing import (
    FINGERPRINT_RUN,
    FINGERPRINT_SIZE,
    PACKED_LINEAR_ENV,
    fingerprint_step,
    packed_linear,
    packed_linear_setting,
    set_packed_linear,
)
from nezha_zoo.spec.blocks import BertLayerNames, cross_attention_names
from nezha_zoo.spec.pooling import can_keep_positions
from nezha_zoo.validation import InputError

__all__ = [
    "get_activation",
    "Container",
    "attach",
    "extended_attention_mask",
    "encoder_attention_bias",
    "add_attention_mask",
    "expand_head_mask",
    "BertEmbeddings",
    "padding_aware_position_ids",
    "sequential_position_ids",
    "RelativeEmbedding",
    "PackedLinear",
    "linear",
    "linear_route",
    "onednn_training",
    "set_packed_linear",
    "packed_linear",
    "PACKED_LINEAR_ENV",
    "append_to_cache",
    "select_cache_rows",
    "fused_attention",
    "keep_positions",
    "dropout_kept_rows",
    "check_positions_to_keep",
    "BertSelfAttention",
    "BertLayer",
    "BertEncoder",
    "EncoderOutput",
]

logger = logging.getLogger("nezha_zoo")

# --- activations (transformers' ACT2FN spellings; "gelu" is the exact erf GELU) ------------------


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": _gelu_tanh,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def get_activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name``; ``None`` or ``""`` gives the identity."""
    if not name:
        return _identity
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


# --- module tree helpers -------------------------------------------------------------------------


class Container(nn.Module):
    """A parameterless node of the module tree (e.g. ``attention`` in ``attention.output.dense``)."""


def attach(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Register ``module`` under dotted ``path`` below ``root``, creating :class:`Container` nodes.

    This is how blocks take their submodule names from a :class:`BertLayerNames` instead of from
    hard-coded attribute names; an existing node on the way (e.g. an attention core that should also
    own MPNet's output projection ``o``) is reused.
    """
    *parents, leaf = path.split(".")
    node = root
    for name in parents:
        child = node._modules.get(name)
        if child is None:
            child = Container()
            node.add_module(name, child)
        node = child
    if leaf in node._modules:
        raise ValueError(f"module {path!r} attached twice")
    node.add_module(leaf, module)
    return module


# --- masks ---------------------------------------------------------------------------------------


def extended_attention_mask(
    attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype, causal: bool = False
) -> torch.Tensor:
    """Additive self-attention mask ``(B, 1, Lq or 1, Lk)``: 0 where visible, ``finfo.min`` where not.

    Args:
        attention_mask: ``(B, Lk)`` with 1 = attend (``Lk`` = cached + new positions), or a
            ``(B, Lq, Lk)`` mask used as is.
        query_len: number of new (query) positions ``Lq``; they are the last ``Lq`` of ``Lk``.
        dtype: floating dtype of the scores.
        causal: decoder mode: query ``i`` sees keys ``<= past_len + i`` (cached positions visible).
    """
    if attention_mask.dim() == 3:
        mask = attention_mask[:, None, :, :].to(dtype)  # (B, 1, Lq, Lk)
    else:
        mask = attention_mask[:, None, None, :].to(dtype)  # (B, 1, 1, Lk)
        if causal:
            key_len = attention_mask.shape[-1]
            past = key_len - query_len
            q_pos = torch.arange(query_len, device=attention_mask.device)[:, None] + past
            k_pos = torch.arange(key_len, device=attention_mask.device)[None, :]
            mask = mask * (k_pos <= q_pos).to(dtype)[None, None]  # (B, 1, Lq, Lk)
    # Same constant as transformers PyTorch, so padded rows agree bit for bit.
    return (1.0 - mask) * torch.finfo(dtype).min


def encoder_attention_bias(encoder_attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive cross-attention mask ``(B, 1, 1, Lenc)`` (or ``(B, 1, Lq, Lenc)`` for a 3-D mask)."""
    if encoder_attention_mask.dim() == 3:
        mask = encoder_attention_mask[:, None, :, :].to(dtype)
    else:
        mask = encoder_attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


#: The torch dtypes of :data:`nezha_zoo.dtypes.SATURATING_MASK_DTYPES` (a set lookup per eager call).
_SATURATING = frozenset(getattr(torch, name) for name in SATURATING_MASK_DTYPES)


def _fits_in_place(target: torch.Tensor, other: torch.Tensor) -> bool:
    """``target + other`` has ``target``'s shape and dtype, so ``target.add_(other)`` gives the same tensor.

    Plain shape and dtype comparisons: ``torch.broadcast_shapes`` / ``torch.result_type`` return
    non-tensors, which break a ``torch.compile`` graph at every call.
    """
    if other.dtype != target.dtype or other.dim() > target.dim():
        return False
    return all(o in (1, t) for o, t in zip(reversed(other.shape), reversed(target.shape)))


def add_attention_mask(scores: torch.Tensor, mask: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``scores + mask`` for an additive ``mask`` (or bias) broadcastable to ``scores`` (B, heads, Lq, Lk).

    In float16 (:data:`nezha_zoo.dtypes.SATURATING_MASK_DTYPES`) the sum saturates at ``finfo.min``: a masked
    score no longer overflows to -inf, so a row with no visible key is uniform, not NaN.  Other dtypes: the
    plain sum.  ``in_place``: the caller owns ``scores`` (a fresh product no backward needs), so the sum
    overwrites it unless the mask widens its shape or dtype; the same values without a new (B, heads, Lq, Lk)
    tensor.
    """
    if in_place and _fits_in_place(scores, mask):
        total = scores.add_(mask)
    else:
        total = scores + mask
    if total.dtype in _SATURATING:
        total = total.clamp_min_(torch.finfo(total.dtype).min)  # -inf -> min; a fresh tensor, safe in place
    return total


def expand_head_mask(
    head_mask: torch.Tensor | None, num_layers: int, dtype: torch.dtype, num_heads: int | None = None
) -> list[Any]:
    """Per-layer head masks ``(1, heads, 1, 1)`` from ``(heads,)`` or ``(layers, heads)``."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None].expand(num_layers, -1)  # (layers, heads)
    if head_mask.dim() != 2 or head_mask.shape[0] != num_layers or (num_heads and head_mask.shape[1] != num_heads):
        raise InputError(
            f"head_mask must have shape ({num_heads},) or ({num_layers}, {num_heads}), got {tuple(head_mask.shape)}"
        )
    head_mask = head_mask.to(dtype)
    return [head_mask[i][None, :, None, None] for i in range(num_layers)]  # each (1, heads, 1, 1)


# --- linear layers ---------------------------------------------------------------------------------

#: Whether this PyTorch build has oneDNN's packed-weight ops (probed once, see :func:`_packing_available`),
#: and whether oneDNN runs AVX-512 kernels on this machine (probed once, see :func:`_onednn_avx512`).
#: The on/off switch itself is process-wide and shared by every backend: :mod:`nezha_zoo.packing`.
_PACKING: dict[str, bool | None] = {"available": None, "onednn_avx512": None}

#: oneDNN's own ISA cap (``ONEDNN_MAX_CPU_ISA``, formerly ``DNNL_...``): a value below AVX-512 makes an
#: AVX-512 CPU an AVX2 one for oneDNN, where its training products are slower than MKL's.
_ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _packing_available() -> bool:
    if _PACKING["available"] is None:
        try:  # the ops exist only in builds with oneDNN (mkldnn)
            ok = torch.backends.mkldnn.is_available() and bool(
                torch.ops.mkldnn._reorder_linear_weight and torch.ops.mkldnn._linear_pointwise
            )
        except (AttributeError, RuntimeError):
            ok = False
        _PACKING["available"] = ok
    return bool(_PACKING["available"])


def _onednn_enabled() -> bool:
    """Whether oneDNN's kernels may run now: this build has the ops (:func:`_packing_available`, probed once)
    and ``torch.backends.mkldnn.enabled`` is on, read on every call (a C getter, tens of nanoseconds) so that
    ``torch.backends.mkldnn.flags(enabled=False)`` turns every oneDNN product of :func:`linear` off for its
    block, as it does PyTorch's own."""
    return _packing_available() and torch._C._get_mkldnn_enabled()


def _onednn_avx512() -> bool:
    """Whether oneDNN may run its AVX-512 kernels here: the CPU has AVX-512F
    (:func:`nezha_zoo.hardware.cpu_features`) and ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` does not
    hold oneDNN below AVX-512.  Probed once per process.  The one machine test both oneDNN paths read:

    * training (:func:`onednn_training`): Electra-base width, 1024 rows, one thread, float32, on an AMD
      EPYC with AVX-512 (session 12), oneDNN ran the forward / ``g W`` / ``g^T x`` products 2.2 / 1.9-2.3 /
      1.3-2.0x as fast as MKL and a whole training step 1.81x (7 rounds, 1.66-1.94x); held to AVX2 the
      forward was 1.12-1.15x but the backward products 0.52-0.91x and the step 0.91x (0.87-0.93x).
      Session 9's AVX-512 machine: a step 1.07x;
    * inference (:func:`linear_route`): with AVX-512 oneDNN's ``x W^T`` wins at most row counts, held to
      AVX2 only its left-weight form and only at 2-64 rows (the EPYC's MKL runs AVX2 code).
    """
    if _PACKING["onednn_avx512"] is None:
        cap = next((os.environ[k] for k in _ONEDNN_ISA_ENV if os.environ.get(k)), "ALL").upper()
        capped = cap not in ("ALL", "DEFAULT") and not cap.startswith(("AVX512", "AVX10"))
        _PACKING["onednn_avx512"] = cpu_features().avx512f and not capped
    return bool(_PACKING["onednn_avx512"])


def onednn_training() -> bool:
    """Whether training products (autograd on) of :func:`linear` run on oneDNN (:class:`_OneDNNLinear`):
    the switch :func:`set_packed_linear` when set, else (``None``, the default) whether oneDNN is faster
    here (:func:`_onednn_avx512`: an AVX-512 CPU, oneDNN not capped below it)."""
    setting = packed_linear_setting()
    return _onednn_avx512() if setting is None else setting


# Thresholds of :func:`linear_route`, measured one thread, no grad, each weight read from DRAM (copies
# cycled through 400 MB, as in a base model's forward) on Electra-base's and MPT-125M's block products
# (768->768, 768->2304, 768->3072, 3072->768) and vocabulary projections, with oneDNN's AVX-512 kernels
# and held to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``), speeds against ``F.linear``'s (MKL) on an AMD EPYC
# (session 12, docs/benchmarks/small_shapes.md).

#: Fewest weight elements (out x in) for which :func:`linear` leaves ``F.linear`` without autograd: a oneDNN
#: call costs about 13 us more than MKL's, and at 128x128 and 256x256 every other product took 0.35-1.0x
#: ``F.linear``'s speed at 1-16 rows; from 256x1024 and 512x512 on they win.
FAST_MIN_WEIGHT_ELEMENTS = 1 << 18
#: Most rows for which a product with at most :data:`WX_MAX_IN_FEATURES` inputs runs as ``addmm`` with the
#: weight on the left, ``(W x^T)^T``: 1.6-2.1x at 2-4 rows on the block products and 1.9-2.9x on vocabulary
#: projections (512->32000, 768->30522, 768->50368), either ISA; at 5 rows it ties oneDNN, at 8 it is 0.6-0.9x.
WX_MAX_ROWS = 4
#: Widest input for the ``addmm`` ``(W x^T)^T`` product: with 3072 inputs it took 0.65x ``F.linear``'s speed at
#: 4 rows, while every product with 512 or 768 inputs won at 2-4 rows.
WX_MAX_IN_FEATURES = 1024
#: Most rows for oneDNN's product with the weight as its left operand (``_linear_pointwise(W, x)``, then
#: transposed): held to AVX2 it ran the block products at 1.3-1.6x at 8-32 rows, 1.1-1.2x at 64 rows, where
#: oneDNN's ``x W^T`` took 0.92-1.13x; with AVX-512 1.9-2.2x at 16-32 rows against 1.5-1.8x for ``x W^T``.
ONEDNN_WX_MAX_ROWS = 64
#: Fewest rows for the left-weight oneDNN product where oneDNN has AVX-512: below it oneDNN's ``x W^T`` is as
#: fast or faster (3072->768 at 2-6 rows: 1.5-2.1x against 1.4-1.8x; the two tie at 8 rows).
ONEDNN_WX_MIN_ROWS_AVX512 = 9
#: Narrowest input for the left-weight oneDNN product: with 256 inputs (256->1024) it took 0.73-1.14x at 2-16
#: rows against 1.05-1.39x for oneDNN's ``x W^T``; with 512 or more it is as fast or faster (512->512 at
#: 16 rows: 1.47x against 1.31x).
ONEDNN_WX_MIN_IN_FEATURES = 512


def linear_route(rows: int, in_features: int, out_features: int) -> str:
    """Which product :func:`linear` runs for a float32 CPU inference call (autograd off) of ``rows`` rows
    with the switch unset (:func:`set_packed_linear`), or on for a caller with no packed copy.

    * ``"onednn"``, oneDNN's ``_linear_pointwise(x, W)`` on the plain weight (oneDNN reads the (out, in)
      layout as it is: no packed copy): one row (1.1-2.0x ``F.linear``'s speed, either ISA), and where
      oneDNN has AVX-512 (:func:`_onednn_avx512`) every row count not named below (1.5-2.1x at 2-8 rows,
      2.0-2.3x at 64-4096 rows; the EPYC's MKL runs AVX2 code);
    * ``"wx"``, ``addmm`` with the weight on the left, ``(W x^T)^T``: 2 to :data:`WX_MAX_ROWS` rows with at
      most :data:`WX_MAX_IN_FEATURES` inputs;
    * ``"onednn_wx"``, ``_linear_pointwise(W, x)`` transposed: at least :data:`ONEDNN_WX_MIN_IN_FEATURES`
      inputs, up to :data:`ONEDNN_WX_MAX_ROWS` rows, from :data:`ONEDNN_WX_MIN_ROWS_AVX512` where oneDNN has
      AVX-512, from 2 where it has AVX2 only;
    * ``"linear"``, ``F.linear``: weights under :data:`FAST_MIN_WEIGHT_ELEMENTS` elements, other products
      where oneDNN has AVX2 only, no oneDNN in this build, or oneDNN turned off
      (``torch.backends.mkldnn.enabled`` False, read at each call).

    Args:
        rows (int): the product's rows (the input's elements over ``in_features``), >= 1.
        in_features (int): the weight's input width.
        out_features (int): the weight's output width.
    Returns:
        str: ``"onednn"``, ``"wx"``, ``"onednn_wx"`` or ``"linear"``.
    """
    if in_features * out_features < FAST_MIN_WEIGHT_ELEMENTS:
        return "linear"
    if 1 < rows <= WX_MAX_ROWS and in_features <= WX_MAX_IN_FEATURES:
        return "wx"
    if not _onednn_enabled():
        return "linear"
    if rows == 1:
        return "onednn"
    avx512 = _onednn_avx512()
    wide = in_features >= ONEDNN_WX_MIN_IN_FEATURES
    if wide and rows <= ONEDNN_WX_MAX_ROWS and (rows >= ONEDNN_WX_MIN_ROWS_AVX512 or not avx512):
        return "onednn_wx"
    return "onednn" if avx512 else "linear"


def _fast_operands(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Operands every faster product takes: outside ``torch.compile`` / tracing / scripting (checked first,
    so compiled code reads no switch), not under autocast, plain (no ``DTensor`` or fake tensor) float32 CPU
    tensors, a contiguous (out, in) ``weight`` and a non-empty ``input`` (..., in)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return (
        weight.dim() == 2
        and input.dim() >= 2
        and input.shape[-1] == weight.shape[-1]
        and input.numel() > 0
        and input.dtype == weight.dtype == torch.float32
        and input.device.type == weight.device.type == "cpu"
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and _plain_tensors(input, weight, bias)
    )


def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed_weight: Callable[[], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``F.linear(input, weight, bias)``, on the fastest product measured for the call: the one entry point
    of :class:`PackedLinear`, the LM heads' ``VocabProjection`` and I-BERT's float-mode ``QuantLinear``.

    Which product runs (the switch is :func:`set_packed_linear`, process-wide):

    * ``F.linear`` bit for bit with the switch off (``False``, ``NEZHA_ZOO_PACKED_LINEAR=0``), under
      ``torch.compile`` / tracing / scripting / autocast, for tensor subclasses (FSDP's ``DTensor``), other
      dtypes or devices, a non-contiguous weight, an empty input, or a bad width (``F.linear``'s error);
    * autograd on (training): the forward product and both backward products on oneDNN on the plain
      ``weight`` (:class:`_OneDNNLinear`; no copy: the weight changes every optimizer step) when
      :func:`onednn_training` says so: the switch on, or unset on an AVX-512 CPU (an Electra-base training
      step 1.81x as fast as on ``F.linear``, one thread; not on AVX2-only CPUs, where it was 0.91x);
      otherwise ``F.linear``;
    * autograd off, switch on and a ``packed_weight`` callable (a :class:`PackedLinear`'s copy reordered into
      oneDNN's blocked layout) that returns a tensor: oneDNN on that copy (1.2-1.6x ``F.linear`` on a base
      model's products at 16 and 1024 rows with AVX-512, 1.0-1.3x held to AVX2);
    * autograd off otherwise (switch unset, or on without a packed copy): the product :func:`linear_route`
      picks for the row count, on the plain weight with no copy made or kept (``(W x^T)^T`` at 2-4 rows,
      1.6-2.9x; oneDNN at one row, 1.1-2.0x, and at more rows 1.5-2.3x with AVX-512; see
      ``docs/benchmarks/small_shapes.md``).

    With oneDNN turned off, ``torch.backends.mkldnn.enabled = False`` or inside
    ``torch.backends.mkldnn.flags(enabled=False)`` (read at each call), no oneDNN kernel runs: training
    products and the packed path are ``F.linear``'s, bit for bit, and the no-grad routes those of a build
    without oneDNN (``F.linear``, or MKL's ``(W x^T)^T`` at 2-4 rows); a backward whose forward ran on
    oneDNN runs its products on MKL.

    The faster products sum in different orders: they agree with ``F.linear`` to float32 rounding, not bit
    for bit.

    Args:
        input (Tensor (..., in)).
        weight (Tensor (out, in)).
        bias (Tensor (out,) or None).
        packed_weight (callable () -> Tensor or None, optional): the caller's oneDNN-packed copy of
            ``weight``, made on demand (None where it cannot keep one).
    Returns:
        Tensor (..., out), contiguous.
    """
    if not _fast_operands(input, weight, bias):  # first: under torch.compile no switch is read
        return F.linear(input, weight, bias)
    setting = packed_linear_setting()
    if setting is False:
        return F.linear(input, weight, bias)
    if torch.is_grad_enabled():
        if onednn_training() and _onednn_enabled():
            return _OneDNNLinear.apply(input, weight, bias)
        return F.linear(input, weight, bias)
    if setting and packed_weight is not None and _onednn_enabled():
        packed = packed_weight()
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], "")
    return _linear_by_rows(input, weight, bias)


def _linear_by_rows(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The inference product :func:`linear_route` picks, for operands :func:`_fast_operands` accepts."""
    in_features = weight.shape[-1]
    rows = input.numel() // in_features
    route = linear_route(rows, in_features, weight.shape[0])
    if route == "onednn":
        return torch.ops.mkldnn._linear_pointwise(input.contiguous(), weight, bias, "none", [], "")
    if route == "linear":
        return F.linear(input, weight, bias)
    flat = input.reshape(rows, in_features)
    if route == "wx":
        flat = flat.t()  # (in, rows)
        out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)  # (out, rows)
        out = out.t().contiguous()
    else:  # "onednn_wx": the weight as oneDNN's input, the rows as its weight: (out, rows)
        out = torch.ops.mkldnn._linear_pointwise(weight, flat.contiguous(), None, "none", [], "").t().contiguous()
        if bias is not None:
            out.add_(bias)
    return out.view(*input.shape[:-1], weight.shape[0])


def _fingerprint_view(weight: torch.Tensor) -> torch.Tensor:
    """The :data:`~nezha_zoo.packing.FINGERPRINT_SIZE` elements of a contiguous ``weight`` (out, in) that
    :func:`~nezha_zoo.packing.fingerprint_indices` names, as a strided view of its storage (no copy) holding
    their bits (int32: NaN and -0.0 compare too); all of it when it is that small.
    """
    flat = weight.detach().view(torch.int32).view(-1)
    step = fingerprint_step(tuple(weight.shape))
    if step is None:
        return flat.view(1, flat.numel())
    runs = FINGERPRINT_SIZE // FINGERPRINT_RUN
    return flat.as_strided((runs, FINGERPRINT_RUN), (step, 1), flat.storage_offset())


class PackedLinear(nn.Linear):
    """``nn.Linear`` (same ``weight`` / ``bias`` parameters and state-dict names) whose products are
    :func:`linear`'s: faster training products where oneDNN's are faster, faster inference products on the
    plain weight by row count, and an opt-in inference path on a packed copy of the weight.

    By default (the switch :func:`set_packed_linear` unset) an inference call (autograd off) runs the float32
    CPU product :func:`linear_route` picks for its row count (``(W x^T)^T`` or oneDNN, on the plain
    ``weight``: no copy), and a training call runs on oneDNN on AVX-512 CPUs (:func:`onednn_training`).

    :func:`set_packed_linear`, ``with packed_linear():`` or ``NEZHA_ZOO_PACKED_LINEAR=1`` turn the packed
    path on.  Then, with autograd off (``torch.no_grad`` / ``inference_mode``), a float32 CPU input and a
    oneDNN build of PyTorch, the product runs on a copy of ``weight`` reordered once into oneDNN's blocked
    layout (``mkldnn._linear_pointwise``): 1.2-1.6x the speed of ``F.linear`` on the products of a base
    model at 16 and 1024 rows on an AVX512 machine, 1.0-1.3x with oneDNN held to AVX2.  The copy costs one
    more copy of the weight in memory while the model is in eval mode; ``train()`` and
    :meth:`drop_packed_weight` free it.

    The copy is made again whenever ``weight`` is replaced, changed in place (its version counter:
    optimizer steps, ``load_state_dict``, LoRA merges) or written through ``weight.data`` (EMA updates,
    ``.data.normal_()``), which bypasses the counter: each packed call compares a fingerprint of
    :data:`FINGERPRINT_SIZE` elements spread over ``weight`` (16 runs of 16) with the one taken at packing
    time.  A write
    through ``.data`` that leaves all of those elements bit for bit unchanged (a few rows or columns, say)
    is not seen; call :meth:`drop_packed_weight` after such a write.

    With gradients on (training), the forward product and both backward products run on oneDNN on the
    plain ``weight`` (:func:`linear`; no copy is kept: the weight changes every optimizer step) by default
    on CPUs where that is faster (AVX-512: an Electra-base training step 1.8x as fast as on ``F.linear``,
    one thread; not on AVX2-only CPUs, where it was 0.91x: :func:`onednn_training`), and everywhere with
    the switch on.  ``set_packed_linear(False)`` / ``NEZHA_ZOO_PACKED_LINEAR=0`` give ``F.linear`` for
    every call, inference included.  Under ``torch.compile`` / tracing / autocast, for tensor subclasses
    (FSDP's ``DTensor``) or other dtypes or devices this is ``F.linear`` too, and with
    ``torch.backends.mkldnn.enabled`` False no product runs on oneDNN (see :func:`linear`).  The paths sum in different
    orders: results agree to float32 rounding, not bit for bit.

    Forward: ``input`` (..., in_features) -> (..., out_features).
    """

    #: (weakref to the weight, its version, its data_ptr, a view of its sampled elements, their values when
    #: packed, the packed weight).
    _packed: tuple[Any, int, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def drop_packed_weight(self) -> None:
        """Forget the packed copy of ``weight`` (it is rebuilt on the next inference call)."""
        self._packed = None

    def train(self, mode: bool = True) -> PackedLinear:
        if mode:
            self._packed = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_packed", None)  # an opaque oneDNN tensor: neither picklable nor worth copying
        return state

    def _packed_weight(self) -> torch.Tensor | None:
        w = self.weight
        if w.is_inference() or not w.is_contiguous():  # no version counter to watch / no flat view to sample
            return None
        cached = self._packed
        if (
            cached is not None
            and cached[0]() is w
            and cached[1] == w._version
            and cached[2] == w.data_ptr()
            and torch.equal(cached[3], cached[4])  # the weight's sampled bits now vs at packing time
        ):
            return cached[5]
        sample = _fingerprint_view(w)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        self._packed = (weakref.ref(w), w._version, w.data_ptr(), sample, sample.clone(), packed)
        return packed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias, self._packed_weight)  # the packed copy only with the switch on


def _plain_tensors(*tensors: torch.Tensor | None) -> bool:
    """No tensor subclass (``DTensor``, fake or functorch-wrapped tensors) among ``tensors``: oneDNN's ops
    take dense tensors only, and a subclass's own dispatch must see ``F.linear``."""
    return all(t is None or type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` for training whose three products run on oneDNN.

    On this project's AVX512 machines oneDNN's float32 kernels ran a base model's training products at
    1.05-1.2x (session 9) and 1.3-2.3x (session 12) MKL's rate (which ``F.linear`` and its backward use),
    one thread, 1024 rows (see :func:`_onednn_avx512`):

    * forward ``x W^T + b``: ``mkldnn._linear_pointwise`` on the plain ``W`` (oneDNN lays it out itself;
      no copy is kept, the weight changes every optimizer step);
    * ``g W``: the same op with ``W^T`` (a view) as its weight;
    * ``g^T x``: the same op on the views ``g^T`` (out, N) and ``x^T`` (in, N), giving (out, in) directly;
    * ``sum(g)`` for the bias.

    Under ``create_graph=True`` (a double backward) the backward runs ``F.linear``'s own differentiable
    ops instead, as oneDNN's op has no derivative, and MKL's products where oneDNN was turned off
    (``torch.backends.mkldnn.enabled``) after the forward.  Results agree with ``F.linear``'s to float32 rounding
    (different summation orders), not bit for bit.

    Shapes: ``input`` (..., in), ``weight`` (out, in), ``bias`` (out,) or None -> (..., out).
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(input.contiguous(), weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        flat = grad.reshape(-1, grad.shape[-1])  # (N, out)
        rows = input.reshape(-1, input.shape[-1])  # (N, in)
        # with create_graph, differentiable ops; with oneDNN turned off since the forward, MKL's
        onednn = not torch.is_grad_enabled() and torch._C._get_mkldnn_enabled()
        if ctx.needs_input_grad[0]:
            if onednn:  # (N, out) x (out, in): W^T is the op's (in, out) "weight"
                grad_input = torch.ops.mkldnn._linear_pointwise(flat, weight.t(), None, "none", [], "")
                grad_input = grad_input.view(*grad.shape[:-1], input.shape[-1])
            else:
                grad_input = grad.matmul(weight)  # (..., out) -> (..., in)
        if ctx.needs_input_grad[1]:
            if onednn:  # (out, N) x (N, in), both transposed views
                grad_weight = torch.ops.mkldnn._linear_pointwise(flat.t(), rows.t(), None, "none", [], "")
            else:
                grad_weight = flat.t().mm(rows)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0)
        return grad_input, grad_weight, grad_bias


# --- embeddings ----------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Word (+ position) (+ token-type) embeddings, then LayerNorm and dropout.

    Args:
        config: a BERT-family config (``vocab_size``, ``max_position_embeddings``,
            ``type_vocab_size``, ``pad_token_id``, ``layer_norm_eps``, ``hidden_dropout_prob``).
        width (int): embedding width (Electra: ``embedding_size``; others: ``hidden_size``).
        positions (bool): keep an absolute position table (False for Nezha's relative positions).
        layer_norm (bool): apply ``LayerNorm`` (False for XLM-R-XL's pre-LN stack).
        token_types (bool): keep a token-type table (False for MPNet, which has none).
        padding_idx (int | None | "config"): the word table's padding row (no gradient through it);
            ``"config"`` reads ``config.pad_token_id`` (MPNet passes its hard-coded 1).
        position_padding (bool): the position table has the same padding row (RoBERTa-style tables).

    Forward: ``input_ids`` (B, L) int or ``inputs_embeds`` (B, L, width); ``token_type_ids`` and
    ``position_ids`` (B, L) int; returns (B, L, width).
    """

    def __init__(
        self,
        config: Any,
        width: int,
        positions: bool = True,
        layer_norm: bool = True,
        token_types: bool = True,
        padding_idx: int | None | str = "config",
        position_padding: bool = False,
    ) -> None:
        super().__init__()
        pad = config.pad_token_id if padding_idx == "config" else padding_idx
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=pad)
        if positions:
            pos_pad = pad if position_padding else None
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, width, padding_idx=pos_pad)
        if token_types:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width)
        if layer_norm:
            self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values_length: int = 0,
    ) -> torch.Tensor:
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, seq_len = ref.shape[0], ref.shape[1]
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds
        if hasattr(self, "token_type_embeddings"):
            if token_type_ids is None:
                token_type_ids = torch.zeros((batch, seq_len), dtype=torch.long, device=ref.device)
            # Summation order as transformers: (words + types) + positions.
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if hasattr(self, "position_embeddings"):
            if position_ids is None:
                position_ids = torch.arange(
                    past_key_values_length, past_key_values_length + seq_len, dtype=torch.long, device=ref.device
                )[None]  # (1, L), broadcast over the batch
            positions = self.position_embeddings(position_ids)
            if embeddings is not inputs_embeds and _fits_in_place(embeddings, positions):
                # The sum above is ours and no backward needs it: add in place (as transformers' ``+=``),
                # no second (B, L, width) tensor.
                embeddings = embeddings.add_(positions)
            else:
                embeddings = embeddings + positions
        if hasattr(self, "LayerNorm"):
            embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)


def padding_aware_position_ids(input_ids: torch.Tensor, padding_idx: int, past_len: int = 0) -> torch.Tensor:
    """RoBERTa-style positions (:mod:`nezha_zoo.spec.positions`): ``(B, L)`` ids -> ``(B, L)`` long.

    Pads get ``padding_idx``; real tokens count up from ``padding_idx + 1 + past_len`` in their row.
    """
    mask = input_ids.ne(padding_idx).long()  # (B, L): 1 for real tokens
    return (torch.cumsum(mask, dim=1) + past_len) * mask + padding_idx


def sequential_position_ids(shape: Sequence[int], padding_idx: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions of ``inputs_embeds`` (:mod:`nezha_zoo.spec.positions`): ``padding_idx + 1 ..`` in every row, (B, L)."""
    batch, seq_len = shape[0], shape[1]
    pos = torch.arange(padding_idx + 1, seq_len + padding_idx + 1, dtype=torch.long, device=device)
    return pos[None].expand(batch, seq_len)  # (L,) -> (B, L)


# --- attention -----------------------------------------------------------------------------------


class RelativeEmbedding:
    """Relative-position embeddings as a lookup: ``R[i, j] = table[index[i, j]]``.

    Args:
        table (Tensor (P, head_dim)): one embedding per relative-position bucket.
        index (LongTensor (Lq, Lk) or (B, Lq, Lk)): bucket of each (query, key) pair, in ``[0, P)``
            (per batch row when the queries are each row's kept positions, ``positions_to_keep``).

    The attention terms are computed through the ``P`` buckets instead of a materialised
    ``(Lq, Lk, head_dim)`` tensor: ``q . R[i, j]`` is a gather from ``q @ table.T`` (B, heads, Lq, P),
    and ``sum_j p_ij R[i, j]`` is ``(sum of p_ij per bucket) @ table``.  Memory is
    ``O(B * heads * Lq * (Lk + P))`` whatever the sequence length.
    """

    __slots__ = ("table", "index")

    def __init__(self, table: torch.Tensor, index: torch.Tensor) -> None:
        if table.dim() != 2 or index.dim() not in (2, 3):
            raise ValueError(
                f"need table (P, d) and index (Lq, Lk) or (B, Lq, Lk), got {tuple(table.shape)}, {tuple(index.shape)}"
            )
        self.table = table
        self.index = index

    def dense(self) -> torch.Tensor:
        """The materialised ``([B,] Lq, Lk, head_dim)`` tensor (for tests and small inputs)."""
        return self.table[self.index]

    def _index(self, lead: Sequence[int]) -> torch.Tensor:
        index = self.index if self.index.dim() == 2 else self.index[:, None]  # (Lq, Lk) or (B, 1, Lq, Lk)
        return index.expand(*lead, *self.index.shape[-2:])

    def keep_positions(self, positions: torch.Tensor) -> RelativeEmbedding:
        """The terms of the query rows ``positions`` (B, R): index (B, R, Lk)."""
        return RelativeEmbedding(self.table, keep_positions(self.index[None], positions))

    def key_scores(self, query: torch.Tensor) -> torch.Tensor:
        """``q_i . R[i, j]``: (B, heads, Lq, d) -> (B, heads, Lq, Lk)."""
        per_bucket = torch.matmul(query, self.table.t())  # (B, heads, Lq, P)
        idx = self._index(query.shape[:2])  # (B, heads, Lq, Lk), a view
        return per_bucket.gather(-1, idx)

    def value_context(self, probs: torch.Tensor) -> torch.Tensor:
        """``sum_j p_ij R[i, j]``: (B, heads, Lq, Lk) -> (B, heads, Lq, d)."""
        idx = self._index(probs.shape[:2])  # (B, heads, Lq, Lk), a view
        buckets = probs.new_zeros((*probs.shape[:-1], self.table.shape[0]))  # (B, heads, Lq, P)
        buckets = buckets.scatter_add(-1, idx, probs)
        return torch.matmul(buckets, self.table)


def _relative_key_scores(query: torch.Tensor, relative: torch.Tensor | RelativeEmbedding) -> torch.Tensor:
    if isinstance(relative, RelativeEmbedding):
        return relative.key_scores(query)
    if relative.dim() == 4:  # per row (B, Lq, Lk, d): the kept query rows
        return torch.einsum("bhqd,bqkd->bhqk", query, relative)
    # (B, heads, Lq, d) x (Lq, Lk, d) -> (B, heads, Lq, Lk)
    return torch.einsum("bhqd,qkd->bhqk", query, relative)


def _relative_value_context(probs: torch.Tensor, relative: torch.Tensor | RelativeEmbedding) -> torch.Tensor:
    if isinstance(relative, RelativeEmbedding):
        return relative.value_context(probs)
    if relative.dim() == 4:  # per row (B, Lq, Lk, d): the kept query rows
        return torch.einsum("bhqk,bqkd->bhqd", probs, relative)
    # (B, heads, Lq, Lk) x (Lq, Lk, d) -> (B, heads, Lq, d)
    return torch.einsum("bhqk,qkd->bhqd", probs, relative)


def _relative_rows(
    relative: torch.Tensor | RelativeEmbedding | None, positions: torch.Tensor
) -> torch.Tensor | RelativeEmbedding | None:
    """The relative terms of the query rows ``positions`` (B, R): (B, R, Lk, d) or an index (B, R, Lk)."""
    if relative is None:
        return None
    if isinstance(relative, RelativeEmbedding):
        return relative.keep_positions(positions)
    return keep_positions(relative[None], positions)


#: Attribute on a cache buffer: how many positions along the cache axis hold keys/values so far.
_FILLED = "_nezha_zoo_cache_filled"


def append_to_cache(past: torch.Tensor, new: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """``torch.cat([past, new], dim)`` for a growing key/value cache, without copying ``past`` each step.

    Outside autograd (``torch.no_grad`` / ``inference_mode``, as in ``generate``) the result is a view
    of the first positions of a larger buffer whose capacity along ``dim`` doubles when it fills up; the
    next call with that view as ``past`` writes ``new`` into the free slots behind it, so a decoding
    step copies only its own keys/values instead of the whole cache.  Writes only ever go past the
    longest view handed out of a buffer: a shorter (older) view, continued again, is copied into a new
    buffer, so every returned tensor keeps the values it had (the ``past_key_values`` contract of a
    tuple of plain tensors per layer is unchanged).  With gradients on, or under ``torch.compile`` or tracing, it
    is ``torch.cat`` (an in-place write would bump the version of views autograd saved).

    Args:
        past: (B, heads, P, head_dim) cached keys or values (any layout; ``dim`` is the position axis).
        new: (B, heads, L, head_dim) this step's keys or values, same dtype and device.
        dim: the position axis.

    Returns:
        (B, heads, P + L, head_dim), equal to ``torch.cat([past, new], dim)``.
    """
    same_rest = past.shape[:dim] == new.shape[:dim] and past.shape[dim + 1 :] == new.shape[dim + 1 :]
    if (
        not _reuses_buffers()  # a traced graph has no buffers to reuse across calls
        or not same_rest
        or past.dtype != new.dtype
        or past.device != new.device
    ):
        return torch.cat([past, new], dim)
    n, added = past.shape[dim], new.shape[dim]
    base = past._base
    in_place = (
        base is not None
        and getattr(base, _FILLED, None) == n  # past is the longest view of its buffer: the rest is free
        and base.shape[dim] >= n + added
        and past.data_ptr() == base.data_ptr()
        and past.stride() == base.stride()
        and past.shape[:dim] == base.shape[:dim]
        and past.shape[dim + 1 :] == base.shape[dim + 1 :]
    )
    if not in_place:
        shape = list(past.shape)
        shape[dim] = 2 * (n + added)  # geometric growth: amortised O(L) copying over a decode
        base = past.new_empty(shape)
        base.narrow(dim, 0, n).copy_(past)
    base.narrow(dim, n, added).copy_(new)
    setattr(base, _FILLED, n + added)
    return base.narrow(dim, 0, n + added)


def _reuses_buffers() -> bool:
    """Whether the cache helpers may write into buffers they handed out (not under autograd, compile, tracing)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing())


def select_cache_rows(
    past: torch.Tensor, rows: torch.Tensor, dim: int = 2, into: torch.Tensor | None = None
) -> torch.Tensor:
    """``past.index_select(0, rows)`` for a growing key/value cache (beam search's reorder), with room to grow.

    The picked rows are written straight into the first positions of a new buffer that has free slots
    along ``dim`` (as many as ``past``'s own buffer, else twice the length plus one), registered like
    :func:`append_to_cache`'s, so that the next step's append writes into it in place: a beam step
    copies the cache once (the gather) instead of gathering it and then copying it again into a
    larger buffer.  ``past`` itself is not modified.  With gradients on, or under ``torch.compile``
    or tracing, it is ``index_select``.

    Args:
        past: (B, heads, P, head_dim) cached keys or values (``dim`` is the position axis).
        rows: (R,) int64 row indices into ``past``'s first axis.
        dim: the position axis.
        into: None, or the buffer to write into instead of a new one: contiguous, ``past``'s shape
            but ``R`` rows and at least ``P`` positions along ``dim``, not sharing memory with
            ``past``; whatever it held is overwritten (the caller owns it).

    Returns:
        (R, heads, P, head_dim), equal to ``past.index_select(0, rows)``.

    Raises:
        ValueError: ``into`` has the wrong shape, dtype, device or layout.
    """
    n = past.shape[dim]
    if into is not None:
        want = list(past.shape)
        want[0] = rows.numel()
        got = list(into.shape)
        fits = len(got) == len(want) and got[dim] >= n and got[:dim] + got[dim + 1 :] == want[:dim] + want[dim + 1 :]
        if not fits or into.dtype != past.dtype or into.device != past.device or not into.is_contiguous():
            raise ValueError(
                f"into must be a contiguous {past.dtype} buffer on {past.device} of shape {tuple(want)} with at least "
                f"{n} positions along dim {dim}, got {into.dtype} {tuple(into.shape)} on {into.device}"
            )
    if not _reuses_buffers() or dim == 0:
        return past.index_select(0, rows)
    if into is None:
        base = past._base
        capacity = (
            base.shape[dim] if base is not None and base.dim() == past.dim() and base.shape[dim] > n else 2 * n + 2
        )
        shape = list(past.shape)
        shape[0], shape[dim] = rows.numel(), capacity
        into = past.new_empty(shape)
    picked = into.narrow(dim, 0, n)
    torch.index_select(past, 0, rows, out=picked)  # writes through the view: one gather, no second copy
    setattr(into, _FILLED, n)
    return picked


# --- pooled positions (issue #23; the contract is nezha_zoo.spec.pooling) ----------------------------


def keep_positions(x: torch.Tensor, positions: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Rows ``positions`` of ``x`` along axis ``dim``: (B, L, ...) and int (B, R) -> (B, R, ...).

    ``x`` may be a broadcast operand (an additive mask or bias): a query axis (``dim`` other than 1) of
    size 1 is returned as is (broadcast, the same values as the gather), and a batch axis of size 1 is
    expanded (a view) to the ``B`` rows of ``positions``.

    Args:
        x (Tensor): (B or 1, ..., L or 1 at ``dim``, ...).
        positions (Tensor (B, R)): integer positions in ``[0, L)`` per row.
        dim (int): the position axis (1 for hidden states, 2 for (B, heads, Lq, Lk) scores).

    Returns:
        Tensor: ``x`` with ``R`` rows along ``dim``.
    """
    if dim != 1 and x.shape[dim] == 1:
        return x
    if x.shape[0] != positions.shape[0]:
        x = x.expand(positions.shape[0], *x.shape[1:])
    moved = x.movedim(dim, 1) if dim != 1 else x
    index = positions.long().view(*positions.shape, *([1] * (moved.dim() - 2)))
    kept = moved.gather(1, index.expand(*positions.shape, *moved.shape[2:]))
    return kept.movedim(1, dim) if dim != 1 else kept


def dropout_kept_rows(
    x: torch.Tensor, positions: torch.Tensor, full_len: int, p: float, training: bool, dim: int = 1
) -> torch.Tensor:
    """Dropout of the kept rows ``x`` as the full tensor's dropout would give them.

    The mask is drawn at the full shape (``full_len`` along ``dim``), by ``F.dropout`` of ones (on CPU
    ``empty_like(x).bernoulli_(1 - p).div_(1 - p)``, the draw ``F.dropout`` of the full tensor makes), and
    its rows ``positions`` multiply ``x``: the random stream, and on CPU every kept value, are the full
    computation's, bit for bit.

    Args:
        x (Tensor): the kept rows, (B, R, ...) with ``R`` along ``dim``.
        positions (Tensor (B, R)): their positions in the full tensor.
        full_len (int): the full tensor's length ``L`` along ``dim``.
        p (float): dropout rate.
        training (bool): dropout is on.
        dim (int): the position axis.

    Returns:
        Tensor: shaped as ``x``.
    """
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[dim] = full_len
    noise = F.dropout(x.new_ones(shape), p, training=True)  # the full draw: 0 or 1 / (1 - p)
    return x * keep_positions(noise, positions, dim)


def check_positions_to_keep(
    positions: torch.Tensor, batch: int, seq_len: int, *, pooled_ok: bool, why: str = ""
) -> None:
    """Refuse a bad ``positions_to_keep`` for a (``batch``, ``seq_len``) input with :class:`InputError`.

    Shape and dtype are checked always; the range (a data-dependent check) in eager mode only.
    ``pooled_ok`` is :func:`nezha_zoo.spec.pooling.can_keep_positions` (plus the caller's own conditions,
    named in ``why``) for this call.
    """
    if not pooled_ok:
        raise InputError(
            "positions_to_keep needs output_hidden_states, output_attentions and use_cache off" + (why or "")
        )
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[0] != batch:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise InputError(f"positions_to_keep must be an integer tensor of shape ({batch}, R), got {shape}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise InputError(f"positions_to_keep must hold integers, got {positions.dtype}")
    if positions.shape[1] < 1:
        raise InputError("positions_to_keep must keep at least one position per row")
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= seq_len:
            raise InputError(f"positions_to_keep must lie in [0, {seq_len}), got values in [{low}, {high}]")


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
    positions_to_keep: torch.Tensor | None = None,
    query_len: int = 0,
) -> torch.Tensor:
    """``dropout(softmax(q k^T * scale + mask), dropout_p) v`` without returning the probabilities.

    ``scaled_dot_product_attention`` unless dropout is on for a float32 CPU tensor: PyTorch has no fused CPU
    kernel with dropout, and its fallback scales ``q`` and ``k`` apart and runs a "safe" softmax
    (``isneginf``, ``all``, ``where`` over every score) forward and backward; the four plain ops here
    are the same sum (the masks use ``finfo.min``, never a row of ``-inf``) at about 0.85x its time,
    and draw the dropout mask as ``nn.Dropout`` on the probabilities does (transformers' eager path).

    Args:
        query: (B, heads, Lq, head_dim).
        key, value: (B, kv_heads, Lk, head_dim); ``kv_heads`` divides ``heads`` with ``enable_gqa``
            (1: multi-query attention, broadcast over the heads).
        mask: additive, broadcastable to (B, heads, Lq, Lk), or None.
        scale: the factor of the scores.
        dropout_p: dropout rate of the probabilities (0 in eval mode).
        enable_gqa: key/value heads are shared by groups of query heads.
        positions_to_keep: (B, R) or None: the queries are these rows of ``query_len`` positions; the
            dropout mask is drawn at the full (B, heads, ``query_len``, Lk) shape and its rows kept
            (:func:`dropout_kept_rows`), on every device.
        query_len: the full number of query positions (with ``positions_to_keep``).

    Returns:
        (B, heads, Lq, head_dim).
    """
    plain = dropout_p > 0.0 and query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64)
    kept = dropout_p > 0.0 and positions_to_keep is not None  # the full-shape draw needs the probabilities
    if (plain or kept) and (not enable_gqa or key.shape[1] in (1, query.shape[1])):
        scores = torch.matmul(query * scale, key.transpose(-1, -2))  # (B, heads, Lq, Lk)
        if mask is not None:
            scores = add_attention_mask(scores, mask, in_place=True)  # the product's backward needs q, k only
        probs = torch.softmax(scores, dim=-1)
        if kept:
            probs = dropout_kept_rows(probs, positions_to_keep, query_len, dropout_p, True, dim=2)
        else:
            probs = F.dropout(probs, dropout_p, training=True)
        return torch.matmul(probs, value)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
    )


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate q/k/v projections.

    Args:
        config: a BERT-family config (``hidden_size``, ``num_attention_heads``,
            ``attention_probs_dropout_prob``).
        names (BertLayerNames): supplies the projection names (``query``/``key``/``value`` or MPNet's
            ``q``/``k``/``v``).
        kv_width (int | None): input width of keys/values (cross-attention); ``hidden_size`` if None.

    Forward:
        hidden_states: (B, Lq, H) queries (and keys/values for self-attention).
        attention_mask: additive (B, 1, Lq or 1, Lk) or None.
        head_mask: (1, heads, 1, 1) multiplier of the probabilities, or None.
        key_value_states: (B, Lk, H_kv) for cross-attention, or None.
        past_key_value: cached ``(k, v)``, each (B, heads, Lpast, head_dim).  For self-attention the
            new keys are appended; for cross-attention they are reused as they are.
        position_bias: additive (B or 1, heads, Lq, Lk) term added after scaling (MPNet).
        relative_key: (Lq, Lk, head_dim) tensor or :class:`RelativeEmbedding`; ``q_i . R[i, j]`` is
            added to the scores before scaling (Nezha).
        relative_value: (Lq, Lk, head_dim) tensor or :class:`RelativeEmbedding`; ``sum_j p_ij R[i, j]``
            (probabilities after dropout and head mask) is added to the context (Nezha).
        need_weights: return the probabilities.  Without them, and with no head mask or relative
            term, attention runs as one fused ``scaled_dot_product_attention`` and ``probs`` is None.
        positions_to_keep: (B, R) int or None: queries at these rows of ``hidden_states`` only (keys and
            values at every row); masks, bias and relative terms are taken at those query rows, and the
            probabilities' dropout mask is drawn at the full shape (:func:`dropout_kept_rows`).

    Returns ``(context (B, Lq or R, H), probs (B, heads, Lq or R, Lk) or None, (k, v))``.
    """

    def __init__(self, config: Any, names: BertLayerNames = BertLayerNames(), kv_width: int | None = None) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = hidden // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        kv_width = hidden if kv_width is None else kv_width
        self._proj = (names.query, names.key, names.value)
        self.add_module(names.query, PackedLinear(hidden, self.all_head_size))
        self.add_module(names.key, PackedLinear(kv_width, self.all_head_size))
        self.add_module(names.value, PackedLinear(kv_width, self.all_head_size))
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, heads * head_dim) -> (B, heads, L, head_dim)
        b, n = x.shape[0], x.shape[1]
        return x.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_bias: torch.Tensor | None = None,
        relative_key: torch.Tensor | RelativeEmbedding | None = None,
        relative_value: torch.Tensor | RelativeEmbedding | None = None,
        need_weights: bool = True,
        positions_to_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        q_proj, k_proj, v_proj = (self._modules[n] for n in self._proj)
        keep = positions_to_keep
        full_len = hidden_states.shape[1]
        if keep is not None:
            if attention_mask is not None:
                attention_mask = keep_positions(attention_mask, keep, dim=2)  # (B, 1, R or 1, Lk)
            if position_bias is not None:
                position_bias = keep_positions(position_bias, keep, dim=2)  # (B, heads, R, Lk)
            relative_key, relative_value = _relative_rows(relative_key, keep), _relative_rows(relative_value, keep)
        query = self._heads(q_proj(hidden_states if keep is None else keep_positions(hidden_states, keep)))
        is_cross = key_value_states is not None
        if is_cross and past_key_value is not None:
            key, value = past_key_value  # encoder keys/values do not change between decoding steps
        else:
            source = key_value_states if is_cross else hidden_states
            key = self._heads(k_proj(source))
            value = self._heads(v_proj(source))
            if past_key_value is not None:
                key = append_to_cache(past_key_value[0], key)  # (B, heads, Lpast + Lq, head_dim)
                value = append_to_cache(past_key_value[1], value)

        if not need_weights and head_mask is None and relative_key is None and relative_value is None:
            context = self._fused(query, key, value, attention_mask, position_bias, keep, full_len)
            b, _, n, _ = context.shape
            return context.transpose(1, 2).reshape(b, n, self.all_head_size), None, (key, value)  # (B, Lq, H)

        scores = torch.matmul(query, key.transpose(-1, -2))  # (B, heads, Lq, Lk)
        if relative_key is not None:
            # In place: scores is a fresh product nobody saved for backward, and both terms have its dtype; a
            # new (B, heads, Lq, Lk) tensor per layer costs more than the add (Nezha at 8 x 128).
            scores = scores.add_(_relative_key_scores(query, relative_key))  # (B, heads, Lq, Lk)
        scores = scores / math.sqrt(self.attention_head_size)
        if position_bias is not None:
            scores = scores + position_bias
        if attention_mask is not None:
            scores = add_attention_mask(scores, attention_mask)
        probs = F.softmax(scores, dim=-1)
        if keep is None:
            probs = self.dropout(probs)
        else:
            probs = dropout_kept_rows(probs, keep, full_len, self.dropout.p, self.training, dim=2)
        if head_mask is not None:
            probs = probs * head_mask

        context = torch.matmul(probs, value)  # (B, heads, Lq, head_dim)
        if relative_value is not None:
            context = context.add_(_relative_value_context(probs, relative_value))  # (B, heads, Lq, head_dim)
        b, _, n, _ = context.shape
        context = context.transpose(1, 2).reshape(b, n, self.all_head_size)  # (B, Lq, H)
        return context, probs, (key, value)

    def _fused(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_bias: torch.Tensor | None,
        positions_to_keep: torch.Tensor | None = None,
        query_len: int = 0,
    ) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d) + bias + mask) v`` in one fused kernel, (B, heads, Lq, head_dim).

        The same sum as the unfused path (the bias and the mask are both added after scaling), without
        materialising the probabilities; used when nobody asked for them.
        """
        mask = attention_mask
        if position_bias is not None:
            mask = position_bias if mask is None else add_attention_mask(position_bias, mask)  # (B|1, heads, Lq, Lk)
        p = self.dropout.p if self.training else 0.0
        scale = 1.0 / math.sqrt(self.attention_head_size)
        keep = positions_to_keep
        return fused_attention(query, key, value, mask, scale, p, positions_to_keep=keep, query_len=query_len)


class _AttentionBlock:
    """Paths of one attention sub-block (self or cross) inside a layer; not a module itself."""

    def __init__(self, prefix: str, names: BertLayerNames) -> None:
        def join(name: str | None) -> str | None:
            if name is None:
                return None
            return f"{prefix}.{name}" if prefix else name

        self.core = join(names.self_attn)
        self.out = join(names.attn_out)
        self.post_norm = join(names.attn_norm)
        self.pre_norm = join(names.pre_attn_norm)


class BertLayer(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, feed-forward.

    Post-LN (BERT: ``LN(x + f(x))``) where ``names`` gives post-norms, pre-LN
    (XLM-R-XL: ``x + f(LN(x))``) where it gives pre-norms.

    Args:
        config: a BERT-family config (``hidden_size``, ``intermediate_size``, ``hidden_act``,
            ``layer_norm_eps``, ``hidden_dropout_prob``, ...).
        names (BertLayerNames): submodule names, the spec's.
        cross_attention (bool): add a ``crossattention`` block (decoder with an encoder).

    Forward: ``hidden_states`` (B, Lq, H); masks, head mask and hooks as
    :class:`BertSelfAttention`; ``past_key_value`` ``(k, v)`` or ``(k, v, cross_k, cross_v)``;
    ``cross_relative_key`` / ``cross_relative_value`` are the relative hooks of the cross-attention
    (queries x encoder positions; Nezha); ``need_weights`` as :class:`BertSelfAttention`.
    ``positions_to_keep`` (B, R) int or None: the layer's output at these rows only (self-attention's
    queries, the residuals, LayerNorms and feed-forward block on (B, R, H); keys and values at every row;
    every dropout mask drawn at the full shape, :func:`dropout_kept_rows`); no cross-attention then.
    Returns ``(hidden (B, Lq or R, H), self_probs or None, cross_probs or None, present)``.
    """

    def __init__(self, config: Any, names: BertLayerNames = BertLayerNames(), cross_attention: bool = False) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self._self = _AttentionBlock("", names)
        if names.pre_attn_norm:
            attach(self, names.pre_attn_norm, nn.LayerNorm(hidden, eps=eps))
        attach(self, names.self_attn, BertSelfAttention(config, names))
        attach(self, names.attn_out, PackedLinear(hidden, hidden))
        if names.attn_norm:
            attach(self, names.attn_norm, nn.LayerNorm(hidden, eps=eps))
        self._cross = None
        if cross_attention:
            cnames = cross_attention_names(names)  # rooted at names.cross, relative to this layer
            self._cross = _AttentionBlock("", cnames)
            if self._cross.pre_norm:
                attach(self, self._cross.pre_norm, nn.LayerNorm(hidden, eps=eps))
            attach(self, self._cross.core, BertSelfAttention(config, cnames))
            attach(self, self._cross.out, PackedLinear(hidden, hidden))
            if self._cross.post_norm:
                attach(self, self._cross.post_norm, nn.LayerNorm(hidden, eps=eps))
        self._ffn = (names.pre_ffn_norm, names.intermediate, names.output, names.out_norm)
        if names.pre_ffn_norm:
            attach(self, names.pre_ffn_norm, nn.LayerNorm(hidden, eps=eps))
        attach(self, names.intermediate, PackedLinear(hidden, config.intermediate_size))
        attach(self, names.output, PackedLinear(config.intermediate_size, hidden))
        if names.out_norm:
            attach(self, names.out_norm, nn.LayerNorm(hidden, eps=eps))
        self.act = get_activation(config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self._output_dropout = names.output_dropout

    def _attention(
        self,
        block: _AttentionBlock,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        head_mask: torch.Tensor | None,
        kv: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        positions_to_keep: torch.Tensor | None = None,
        **hooks: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        h = self.get_submodule(block.pre_norm)(x) if block.pre_norm else x
        if positions_to_keep is None:
            context, probs, present = self.get_submodule(block.core)(h, mask, head_mask, kv, past, **hooks)
            out = self.dropout(self.get_submodule(block.out)(context)) + x
        else:
            keep = positions_to_keep
            core = self.get_submodule(block.core)
            context, probs, present = core(h, mask, head_mask, kv, past, positions_to_keep=keep, **hooks)
            out = self._dropout_kept_rows(self.get_submodule(block.out)(context), keep, x.shape[1])
            out = out + keep_positions(x, keep)  # (B, R, H)
        if block.post_norm:
            out = self.get_submodule(block.post_norm)(out)
        return out, probs, present

    def _dropout_kept_rows(self, x: torch.Tensor, positions: torch.Tensor, full_len: int) -> torch.Tensor:
        return dropout_kept_rows(x, positions, full_len, self.dropout.p, self.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, ...] | None = None,
        position_bias: torch.Tensor | None = None,
        relative_key: torch.Tensor | RelativeEmbedding | None = None,
        relative_value: torch.Tensor | RelativeEmbedding | None = None,
        cross_relative_key: torch.Tensor | RelativeEmbedding | None = None,
        cross_relative_value: torch.Tensor | RelativeEmbedding | None = None,
        need_weights: bool = True,
        positions_to_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...]]:
        if positions_to_keep is not None and encoder_hidden_states is not None:
            raise ValueError("positions_to_keep is not supported with cross-attention")
        self_past = past_key_value[:2] if past_key_value is not None else None
        x, self_probs, present = self._attention(
            self._self,
            hidden_states,
            attention_mask,
            head_mask,
            None,
            self_past,
            positions_to_keep,
            position_bias=position_bias,
            relative_key=relative_key,
            relative_value=relative_value,
            need_weights=need_weights,
        )
        cross_probs = None
        if encoder_hidden_states is not None:
            if self._cross is None:
                raise ValueError("encoder_hidden_states given, but the model has no cross-attention layers")
            cross_past = past_key_value[2:4] if past_key_value is not None and len(past_key_value) == 4 else None
            # transformers applies the layer's head mask to cross-attention too.
            x, cross_probs, cross_present = self._attention(
                self._cross,
                x,
                encoder_attention_mask,
                head_mask,
                encoder_hidden_states,
                cross_past,
                relative_key=cross_relative_key,
                relative_value=cross_relative_value,
                need_weights=need_weights,
            )
            present = present + cross_present
        pre, inter, out, post = self._ffn
        h = self.get_submodule(pre)(x) if pre else x
        h = self.get_submodule(out)(self.act(self.get_submodule(inter)(h)))
        if positions_to_keep is None:
            h = self.dropout(h) if self._output_dropout else h
        elif self._output_dropout:
            h = self._dropout_kept_rows(h, positions_to_keep, hidden_states.shape[1])
        h = h + x
        if post:
            h = self.get_submodule(post)(h)
        return h, self_probs, cross_probs, present


class EncoderOutput(tuple):
    """``(last_hidden_state, presents, hidden_states, attentions, cross_attentions)``; None when off."""

    __slots__ = ()


class BertEncoder(nn.Module):
    """A stack of :class:`BertLayer` in ``layer`` (names ``layer.0``, ``layer.1``...).

    Args:
        config: a BERT-family config (``num_hidden_layers`` and the layer's fields).
        names (BertLayerNames): layer submodule names.
        cross_attention (bool): layers get cross-attention.
        final_norm (str | None): name of a LayerNorm applied after the last layer (XLM-R-XL).

    ``gradient_checkpointing`` (set by the model) recomputes each layer in the backward pass.
    Forward hooks (``position_bias``, ``relative_*``, ``cross_relative_*``) are passed to every layer.
    ``positions_to_keep`` (B, R) int or None goes to the last layer only (:class:`BertLayer`): the output
    (after the final LayerNorm, if any) is then (B, R, H); it needs ``use_cache``, ``output_attentions``,
    ``output_hidden_states`` off and no cross-attention (:class:`InputError` otherwise).
    """

    def __init__(
        self,
        config: Any,
        names: BertLayerNames = BertLayerNames(),
        cross_attention: bool = False,
        final_norm: str | None = None,
    ) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, names, cross_attention) for _ in range(config.num_hidden_layers)])
        self._final_norm = final_norm
        if final_norm:
            attach(self, final_norm, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps))
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head_mask: Sequence[torch.Tensor | None] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Sequence[tuple[torch.Tensor, ...]] | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        position_bias: torch.Tensor | None = None,
        relative_key: torch.Tensor | RelativeEmbedding | None = None,
        relative_value: torch.Tensor | RelativeEmbedding | None = None,
        cross_relative_key: torch.Tensor | RelativeEmbedding | None = None,
        cross_relative_value: torch.Tensor | RelativeEmbedding | None = None,
        positions_to_keep: torch.Tensor | None = None,
    ) -> EncoderOutput:
        if positions_to_keep is not None:
            ok = can_keep_positions(
                output_hidden_states=output_hidden_states, output_attentions=output_attentions, use_cache=use_cache
            )
            check_positions_to_keep(
                positions_to_keep,
                hidden_states.shape[0],
                hidden_states.shape[1],
                pooled_ok=ok and encoder_hidden_states is None and past_key_values is None,
                why=", and no encoder_hidden_states or past_key_values",
            )
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and use_cache:
            logger.warning("use_cache=True is incompatible with gradient checkpointing; not returning a cache")
            use_cache = False
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        all_cross = [] if output_attentions and encoder_hidden_states is not None else None
        presents = [] if use_cache else None
        for i, layer in enumerate(self.layer):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            args = (
                hidden_states,
                attention_mask,
                head_mask[i] if head_mask is not None else None,
                encoder_hidden_states,
                encoder_attention_mask,
                past_key_values[i] if past_key_values is not None else None,
                position_bias,
                relative_key,
                relative_value,
                cross_relative_key,
                cross_relative_value,
                output_attentions,
                positions_to_keep if i == len(self.layer) - 1 else None,
            )
            if checkpointing:
                hidden_states, probs, cross_probs, present = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states, probs, cross_probs, present = layer(*args)
            if all_attn is not None:
                all_attn.append(probs)
            if all_cross is not None:
                all_cross.append(cross_probs)
            if presents is not None:
                presents.append(present)
        if self._final_norm:
            hidden_states = self.get_submodule(self._final_norm)(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)

        def tup(xs: list | None) -> tuple | None:
            return tuple(xs) if xs is not None else None

        return EncoderOutput((hidden_states, tup(presents), tup(all_hidden), tup(all_attn), tup(all_cross)))
