"""Shared BERT-style blocks for the Flax linen backend.

Every family whose encoder is BERT-shaped (Nezha, XLM-RoBERTa-XL, Electra, I-BERT, MPNet) composes
these blocks and declares only its differences.  Module names are transformers' PyTorch attribute
names, driven by :class:`nezha_zoo.spec.blocks.BertLayerNames`, so the ``params`` tree path of every
variable equals ``LAYOUTS["flax"].key(p)`` for the family's spec.

Extension points (used by later families, exercised today by Electra's defaults):

* ``BertLayerNames`` renames submodules (MPNet ``attention.attn.{q,k,v,o}``) and switches post-LN to
  pre-LN (XLM-R-XL ``attention.self_attn_layer_norm`` / layer ``LayerNorm``); the encoder takes an
  optional final LayerNorm name.
* ``position_bias`` (B|1, heads, Lq, Lk) is added to the scores after scaling (MPNet).
* ``relative`` = ``(rel_key, rel_value)``, each (Lq, Lk, head_dim): key terms added to the scores
  before scaling and value terms added to the context (Nezha's functional relative positions,
  :func:`nezha_zoo.flax.nezha.relative_position_encoding`); ``cross_relative`` is the same for
  the cross-attention of a decoder layer.
* ``positions_to_keep`` (B, R) int: the last layer runs its queries, attention output and feed-forward
  block at those rows only (keys and values at every row); the encoder's output is (B, R, H)
  (:mod:`nezha_zoo.spec.pooling`, :func:`keep_positions`, :func:`dropout_kept_rows`).
* Decoder mode: causal self-attention, cross-attention on ``encoder_hidden_states`` and a fixed-size
  key/value cache in the ``"cache"`` collection (transformers' Flax semantics, jit-friendly).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nezha_zoo.dtypes import saturates_mask_sum
from nezha_zoo.hardware import CpuFeatures, cpu_features
from nezha_zoo.packing import PACK_BLOCK, PACKED_MAX_ROWS
from nezha_zoo.spec.blocks import BertLayerNames, cross_attention_names
from nezha_zoo.spec.pooling import can_keep_positions
from nezha_zoo.validation import InputError

__all__ = [
    "ACT2FN",
    "padding_aware_position_ids",
    "sequential_position_ids",
    "get_activation",
    "bf16_dot_general",
    "bf16_einsum",
    "PACKED",
    "packable",
    "pack_kernel",
    "PACKED_COMPILER_OPTIONS",
    "packed_compiler_options",
    "DENSE_COMPILER_OPTIONS",
    "dense_compiler_options",
    "inference_jit",
    "Dense",
    "dense",
    "layer_norm",
    "Dropout",
    "dropout_kept_rows",
    "POSITIONS_TO_KEEP_DOC",
    "keep_positions",
    "check_positions_to_keep",
    "add_attention_mask",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertAttention",
    "BertLayer",
    "BertLayerCollection",
    "BertEncoder",
    "cache_index",
    "cache_length",
    "update_kv_cache",
]


def _gelu_fast(x: jax.Array) -> jax.Array:
    # transformers' FastGELUActivation: same tanh approximation, written around x * 0.79788...
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


#: transformers' activation names; "gelu" is the exact erf GELU (flax's nn.gelu defaults to tanh).
ACT2FN: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": partial(nn.gelu, approximate=False),
    "gelu_new": partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(nn.gelu, approximate=True),
    "gelu_fast": _gelu_fast,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
}


def get_activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name`` (identity for None)."""
    if name is None:
        return lambda x: x
    try:
        return ACT2FN[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACT2FN)}") from None


def _both_bf16(*operands: Any) -> bool:
    return all(jnp.result_type(x) == jnp.bfloat16 for x in operands)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs) -> jax.Array:
    """``lax.dot_general`` whose ``bf16 x bf16`` products accumulate in float32 and round back to bfloat16.

    XLA's CPU compiler widens a ``bf16 x bf16 -> bf16`` dot whole to float32 (converts around an f32
    dot) but runs ``bf16 x bf16 -> f32`` natively (YNNPACK, ~0.6x the f32 time); the result is the
    same f32-accumulated product rounded once to bf16.  Any other call (float32 operands, an explicit
    ``preferred_element_type``) keeps ``lax.dot_general``'s dtypes.
    Same signature and result shape/dtype as ``lax.dot_general`` (``nn.Dense(dot_general=...)``).

    ``nn.Dense``'s product, ``lhs`` (..., K) by a (K, N) ``rhs``, runs on ``lhs`` flattened to
    (M, K): the same sums, but autodiff's kernel gradient is then the plain ``x.T @ dy`` of two
    matrices, which XLA's CPU compiler runs without first writing ``dy`` (M, N) out transposed as it
    does for the (B, L, K) x (B, L, N) contraction over two axes (an MLP block's training step 7%
    faster, bit-identical).
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (
        lhs.ndim > 2
        and rhs.ndim == 2
        and not lhs_batch
        and not rhs_batch
        and tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
    ):
        flat = lhs.reshape(math.prod(lhs.shape[:-1]), lhs.shape[-1])  # (M, K)
        out = bf16_dot_general(flat, rhs, (((1,), (0,)), ((), ())), precision, preferred_element_type, **kwargs)
        return out.reshape(lhs.shape[:-1] + rhs.shape[1:])
    if preferred_element_type is None and _both_bf16(lhs, rhs):
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32, **kwargs)
        return out.astype(jnp.bfloat16)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)


def bf16_einsum(subscripts: str, *operands: jax.Array) -> jax.Array:
    """``jnp.einsum`` with :func:`bf16_dot_general`'s rule: all-bf16 operands accumulate in f32, result bf16."""
    if _both_bf16(*operands):
        return jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return jnp.einsum(subscripts, *operands)


#: Variable collection holding packed kernels (:func:`pack_kernel`), on the params tree's paths.
PACKED = "packed"


def packable(kernel: Any) -> bool:
    """Whether :func:`pack_kernel` applies: a float32 (in, out) kernel whose ``out`` is a multiple of
    :data:`~nezha_zoo.packing.PACK_BLOCK` (the block products; not the heads' odd widths)."""
    shape = jnp.shape(kernel)
    return len(shape) == 2 and shape[1] % PACK_BLOCK == 0 and jnp.result_type(kernel) == jnp.float32


@jax.jit
def pack_kernel(kernel: jax.Array) -> jax.Array:
    """A copy of ``kernel`` (in, out) in the blocked layout (out / 64, in, 64) :class:`Dense` reads.

    At a few rows a product is bound by reading its weight; XLA's CPU dot reads a row-major (in, out)
    kernel in 64-column panels whose rows lie ``4 * out`` bytes apart, and reads the same bytes
    1.3-1.5x faster when each panel is contiguous (oneDNN's packed weights do the same for PyTorch).
    """
    k, n = kernel.shape
    return kernel.reshape(k, n // PACK_BLOCK, PACK_BLOCK).transpose(1, 0, 2)


#: XLA options for a CPU program that runs packed products.  With YNNPACK's "dot" fusions the broadcast
#: lhs of each blocked product (a few rows, copied once per block) is read inside the fusion; XLA's
#: default materializes it first (2.4 MB per 3072-wide product at 16 rows), which costs all the packed
#: layout saves (Electra-base 1x16, one thread: 40 ms with these options against 49 without, 54 plain).
PACKED_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def packed_compiler_options() -> dict[str, str]:
    """:data:`PACKED_COMPILER_OPTIONS` when XLA's CPU client accepts them, else ``{}`` (an experimental
    option a later jaxlib may rename: the packed products then run with XLA's defaults)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=PACKED_COMPILER_OPTIONS)(jnp.zeros((), jnp.float32))
    except (RuntimeError, ValueError, TypeError):
        return {}
    return dict(PACKED_COMPILER_OPTIONS)


#: XLA options for a float32 inference program on CPU whose products have many rows (the wrapper's
#: compiled forward above ``PACKED_MAX_ROWS`` rows, and :func:`inference_jit`).  This jaxlib hands each
#: dot, with the elementwise ops around it, to a YNNPACK fusion by default; with no YNNPACK fusion
#: types XLA runs its own (Eigen) dots and loop fusions, which on an AVX-512 core is faster for the
#: forward products ((1024, K) x (K, N), one thread: 5-10%; Electra-base width forward 1.10-1.12x at
#: 8x128 and 1x512) but not for the backward ``dY @ W.T`` products (3-5% slower), so a training step
#: gains nothing (0.98-0.99x) and keeps XLA's defaults.
DENSE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def dense_compiler_options(features: CpuFeatures | None = None) -> dict[str, str]:
    """:data:`DENSE_COMPILER_OPTIONS` where they were measured to win, else ``{}`` (XLA's defaults).

    They apply on JAX's CPU backend, on a CPU with AVX-512 (``features``, default
    :func:`nezha_zoo.hardware.cpu_features`; elsewhere unmeasured, so left alone: the options only
    choose which correct kernel runs a dot), and when this jaxlib's XLA accepts them (an
    experimental option a later jaxlib may rename).

    Args:
        features (CpuFeatures | None): the CPU to decide for; ``None`` reads this machine's.
    Returns:
        dict[str, str]: ``compiler_options`` for ``jax.jit``.
    """
    features = cpu_features() if features is None else features
    if jax.default_backend() != "cpu" or not features.avx512f:
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=DENSE_COMPILER_OPTIONS)(jnp.zeros((), jnp.float32))
    except (RuntimeError, ValueError, TypeError):
        return {}
    return dict(DENSE_COMPILER_OPTIONS)


def inference_jit(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`dense_compiler_options` (user options win).

    For a user's own jitted float32 forward, e.g.
    ``inference_jit(lambda params, ids: model(ids, params=params).last_hidden_state)``: the options the
    wrapper's own compiled forward uses (:meth:`FlaxPreTrainedModel.__call__`), which a plain
    ``jax.jit`` does not get.  Not for training steps (no gain measured: use ``jax.jit``) nor
    bfloat16 / integer programs (measured on float32 products only).

    Args:
        fun (Callable): the function to compile, as for ``jax.jit``.
        **jit_kwargs: ``jax.jit`` arguments (``static_argnums``, ``donate_argnums``, ``compiler_options``...).
    Returns:
        Callable: the jitted function.
    """
    options = {**dense_compiler_options(), **(jit_kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options or None, **jit_kwargs)


class Dense(nn.Dense):
    """``nn.Dense`` (same ``kernel`` / ``bias`` params) that runs a small product on a packed kernel.

    When the ``"packed"`` collection (:data:`PACKED`) holds ``kernel`` for this module (the wrapper
    passes it, see :func:`nezha_zoo.packing.set_packed_linear`) and the input has at most
    :data:`~nezha_zoo.packing.PACKED_MAX_ROWS` rows, the product is a batched dot over the (out / 64)
    blocks of :func:`pack_kernel`'s copy: one (rows, in) x (in, 64) product per contiguous panel.  It sums
    in another order than the plain dot: results agree to float32 rounding, not bit for bit.  Otherwise
    it is ``nn.Dense``.

    ``columns=(start, stop)`` computes only those output columns, ``inputs @ kernel[:, start:stop]`` plus
    ``bias[start:stop]``, from the same params: a fused projection whose parts are needed at different
    rows (MPT's ``Wqkv`` under pooled positions: key and value at every row) calls the module once per
    part.  The column slice of the kernel is a strided copy under XLA: for a few rows the whole product,
    sliced, costs less.

    Forward: ``inputs`` (..., in), ``columns`` (start, stop) or None -> (..., out or stop - start).
    """

    @nn.compact
    def __call__(self, inputs: jax.Array, columns: tuple[int, int] | None = None) -> jax.Array:
        rows = math.prod(jnp.shape(inputs)[:-1])
        if columns is not None:
            # declared as nn.Dense declares them, then sliced
            kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
            start, stop = columns
            x, kernel, bias = self.promote_dtype(
                inputs, kernel[:, start:stop], None if bias is None else bias[start:stop], dtype=self.dtype
            )
            y = (self.dot_general or jax.lax.dot_general)(
                x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision
            )
            return y if bias is None else y + bias
        if (
            not self.has_variable(PACKED, "kernel")
            or rows > PACKED_MAX_ROWS
            or jnp.result_type(inputs) != jnp.float32
            or jnp.dtype(self.dtype or jnp.float32) != jnp.float32
        ):
            return super().__call__(inputs)
        packed = self.get_variable(PACKED, "kernel")
        blocks, width, block = packed.shape
        # declared as nn.Dense declares them (checked against the params tree), read from the packed copy
        self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x = jnp.reshape(inputs, (rows, width))
        # (blocks, rows, in) x (blocks, in, 64) -> (blocks, rows, 64): a broadcast lhs of a few rows
        y = jax.lax.dot_general(
            jnp.broadcast_to(x, (blocks, rows, width)),
            packed,
            (((2,), (1,)), ((0,), (0,))),
            precision=self.precision,
        )
        y = jnp.transpose(y, (1, 0, 2)).reshape((*jnp.shape(inputs)[:-1], blocks * block))
        return y if bias is None else y + bias


def dense(features: int, name: str, config: Any, dtype: Any, use_bias: bool = True) -> Dense:
    """A :class:`Dense` with transformers' init (normal(initializer_range) kernel, zero bias).

    Its product is :func:`bf16_dot_general` (native bf16 dots under XLA when ``dtype`` is bfloat16).
    """
    return Dense(
        features,
        dot_general=bf16_dot_general,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=jax.nn.initializers.normal(config.initializer_range),
        bias_init=jax.nn.initializers.zeros,
        name=name,
    )


def layer_norm(name: str, config: Any, dtype: Any, eps: float | None = None, use_bias: bool = True) -> nn.LayerNorm:
    # Two-pass variance, as torch.nn.LayerNorm: the fast E[x^2]-E[x]^2 form drifts by ~1e-6.
    # use_bias=False: a weight-only LayerNorm (MPT's, torch's ``bias=None``).
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps if eps is None else eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        use_bias=use_bias,
        name=name,
    )


#: Dropout draws this many random bits per element (see :class:`Dropout`).
DROPOUT_BITS = 16


def _random_uint16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform ``uint16`` of ``shape``: each 32-bit random word gives two.

    ``jax.random.bits`` with ``uint16`` hashes one counter per element (threefry in its partitionable
    mode, JAX's default) and drops the other bits; halving the words halves the hashing.
    """
    n = math.prod(shape)
    words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)  # (words, 2) -> (2 * words,)
    return halves[:n].reshape(shape)


class Dropout(nn.Module):
    """Inverted dropout with one mask element per input element, drawn from 16-bit random integers.

    ``flax.linen.Dropout`` draws a float32 uniform (32 random bits) per element; this draws
    ``jax.random.bits`` of ``uint16`` (half the random words: a quarter of the threefry work per
    element, half the bytes) and keeps an element when its bits are ``>= round(rate * 2**16)``.  The keep
    probability is thus ``1 - rate`` rounded to a multiple of ``2**-16`` (within ``2**-17``; float32
    uniforms round it to ``2**-23``); kept elements are scaled by ``1 / (1 - rate)``, as torch and flax do.
    The mask is per element (PyTorch's semantics; transformers' Flax attention broadcasts one over batch
    and heads).  The random stream differs from ``flax.linen.Dropout``'s: same key, other mask.

    Attributes:
        rate (float): drop probability in [0, 1].
        rng_collection (str): the rng stream the mask is drawn from.

    Call args:
        x: array of any shape.
        deterministic (bool): True = identity (eval mode).
        positions, length, axis: ``x`` holds only the rows ``positions`` (B, R) of a tensor with
            ``length`` rows along ``axis``; the mask is drawn at that full shape (see
            :func:`dropout_kept_rows`).  None (default): ``x`` is the whole tensor.

    Returns:
        array of ``x``'s shape and dtype.
    """

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        positions: jax.Array | None = None,
        length: int | None = None,
        axis: int = 1,
    ) -> jax.Array:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"dropout rate must be in [0, 1], got {self.rate!r}")
        if deterministic or self.rate == 0.0:
            return x
        return dropout_kept_rows(self.make_rng(self.rng_collection), self.rate, x, positions, length, axis)


def dropout_kept_rows(
    key: jax.Array,
    rate: float,
    x: jax.Array,
    positions: jax.Array | None = None,
    length: int | None = None,
    axis: int = 1,
) -> jax.Array:
    """:class:`Dropout`'s training-mode body; with ``positions``, its mask drawn at the full shape.

    The pruned last layer (``positions_to_keep``) holds rows ``positions`` (B, R) of tensors whose
    ``axis`` has ``length`` rows.  Its mask is drawn for the full (..., length, ...) shape from the
    same key and its rows kept, so a kept element gets the very mask bit the full computation gives it.

    Args:
        key: PRNG key of this dropout draw.
        rate (float): drop probability in (0, 1].
        x: (B, ..., R, ...) rows ``positions`` along ``axis``, or the whole tensor when ``positions`` is None.
        positions: (B, R) int or None.
        length (int): the full size of ``axis`` (with ``positions``).
        axis (int): the row axis (1 for hidden states (B, L, H), 2 for probabilities (B, heads, Lq, Lk)).

    Returns:
        array of ``x``'s shape and dtype.
    """
    drop = round(rate * (1 << DROPOUT_BITS))  # integer threshold: P(bits < drop) = drop / 2**16
    if drop >= 1 << DROPOUT_BITS:
        return jnp.zeros_like(x)
    if drop == 0:  # rate < 2**-17: the rounded keep probability is 1
        return x / jnp.asarray(1.0 - rate, x.dtype)
    shape = x.shape if positions is None else x.shape[:axis] + (length,) + x.shape[axis + 1 :]
    keep = _random_uint16(key, shape) >= jnp.uint16(drop)
    if positions is not None:
        keep = keep_positions(keep, positions, axis)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def keep_positions(x: jax.Array, positions: jax.Array, axis: int = 1) -> jax.Array:
    """Rows ``positions`` of every batch row of ``x`` along ``axis``: (B, ..., L, ...) -> (B, ..., R, ...).

    Args:
        x: array whose axis 0 is the batch (size B, or 1 to broadcast over it).
        positions: (B, R) int, each in [0, L).
        axis (int): the row axis of ``x`` (>= 1).

    Returns:
        (B, ..., R, ...) the gathered rows.
    """
    batch, rows = positions.shape
    if x.shape[0] != batch:
        x = jnp.broadcast_to(x, (batch,) + x.shape[1:])
    index = positions.reshape((batch,) + (1,) * (axis - 1) + (rows,) + (1,) * (x.ndim - axis - 1))
    return jnp.take_along_axis(x, index, axis=axis)


#: The base modules' docstring entry of ``positions_to_keep`` (appended to their call args).
POSITIONS_TO_KEEP_DOC = """        positions_to_keep: (B, R) int or None: the last layer computes only these rows of
            each sequence, so ``last_hidden_state`` is (B, R, H); not with output_hidden_states,
            output_attentions, a cache or encoder_hidden_states (:mod:`nezha_zoo.spec.pooling`).
"""


def check_positions_to_keep(positions: Any, shape: tuple[int, int], flags: dict[str, bool]) -> jax.Array | None:
    """Check a base model's ``positions_to_keep`` and return it as int32 (None passes through).

    ``positions``: (B, R) int with values in [0, L) for inputs of ``shape`` (B, L) (the range is
    checked when the values are concrete, i.e. outside ``jax.jit``).  ``flags``: the keyword arguments
    of :func:`nezha_zoo.spec.pooling.can_keep_positions` (``output_hidden_states``...), which must allow
    it: those outputs read every position of the last layer.  Raises ``InputError``.
    """
    if positions is None:
        return None
    batch_size, length = shape
    if not can_keep_positions(**flags):
        raise InputError(
            "positions_to_keep cannot be combined with output_hidden_states, output_attentions, a key/value "
            "cache or I-BERT's quant_mode: those read every position of the last layer"
        )
    shape = tuple(jnp.shape(positions))
    if len(shape) != 2 or shape[0] != batch_size or shape[1] < 1:
        raise InputError(f"positions_to_keep must have shape (batch={batch_size}, R >= 1), got {shape}")
    dtype = jnp.result_type(positions)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise InputError(f"positions_to_keep must hold integers, got dtype {dtype}")
    if not isinstance(positions, jax.core.Tracer):
        lo, hi = int(jnp.min(positions)), int(jnp.max(positions))
        if lo < 0 or hi >= length:
            raise InputError(f"positions_to_keep must lie in [0, {length}) (the sequence length), got [{lo}, {hi}]")
    return jnp.asarray(positions, jnp.int32)


def _split(path: str) -> list[str]:
    return path.split(".") if path else []


def cache_index(variables: Any) -> jax.Array | None:
    """The fill level of a decoder's key/value cache (the first ``cache_index`` found), or None."""
    cache = variables.get("cache") if hasattr(variables, "get") else None
    if not cache:
        return None
    stack = [cache]
    while stack:
        node = stack.pop()
        if "cache_index" in node:
            return node["cache_index"]
        stack.extend(v for v in node.values() if hasattr(v, "values"))
    return None


def freeze_padding_row(embedded: jax.Array, ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """Lookups of the padding row pass no gradient to it (torch ``nn.Embedding(padding_idx=...)``).

    The forward value is unchanged; only training differs: PyTorch never updates that row, so neither
    do we.  ``embedded``: (..., width) lookups of ``ids`` (...).
    """
    if padding_idx is None:
        return embedded
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(embedded), embedded)


def padding_aware_position_ids(input_ids: jax.Array, padding_idx: int, past_len: Any = 0) -> jax.Array:
    """RoBERTa-style positions (:mod:`nezha_zoo.spec.positions`): ``input_ids`` (B, L) int -> (B, L) int32.

    Pads get ``padding_idx``; real tokens count up from ``padding_idx + 1 + past_len`` in their row
    (``past_len`` = the cache fill when decoding; it may be traced).
    """
    keep = (input_ids != padding_idx).astype(jnp.int32)
    return (jnp.cumsum(keep, axis=1) + jnp.asarray(past_len, jnp.int32)) * keep + padding_idx  # (B, L)


def sequential_position_ids(shape: tuple[int, ...], padding_idx: int) -> jax.Array:
    """Positions of ``inputs_embeds`` (:mod:`nezha_zoo.spec.positions`): ``padding_idx + 1 ..`` in every row.

    ``shape`` is (B, L); returns (B, L) int32.
    """
    start = padding_idx + 1
    return jnp.broadcast_to(jnp.arange(start, start + shape[-1], dtype=jnp.int32), shape)


def cache_length(variables: Any) -> int | None:
    """The static max length of a decoder's key/value cache (time axis of the first ``cached_key``), or None.

    ``variables`` is a module's variables (``{"cache": ...}``) or a bare cache collection.
    """
    cache = variables.get("cache", variables) if hasattr(variables, "get") else None
    if not cache:
        return None
    stack = [cache]
    while stack:
        node = stack.pop()
        if "cached_key" in node:
            return int(node["cached_key"].shape[1])  # (B, max_length, heads, head_dim)
        stack.extend(v for v in node.values() if hasattr(v, "values"))
    return None


def add_attention_mask(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """``scores`` (B, heads, Lq, Lk) plus an additive ``mask`` broadcastable to them, saturating at the dtype's
    min in :data:`nezha_zoo.dtypes.SATURATING_MASK_DTYPES` (float16: no -inf, so no NaN row); else the plain sum."""
    total = scores + mask
    if saturates_mask_sum(total.dtype):
        total = jnp.maximum(total, jnp.finfo(total.dtype).min)
    return total


class BertEmbeddings(nn.Module):
    """Word + (absolute position) + (token type) embeddings, LayerNorm, dropout.

    Attributes:
        config: family config (``vocab_size``, ``max_position_embeddings``, ``type_vocab_size``...).
        embedding_size (int | None): width of the tables (Electra's ``embedding_size``); ``hidden_size``
            when None.
        use_position (bool): absolute position table (Nezha has none).
        use_token_type (bool): token-type table (MPNet has none).
        use_norm (bool): LayerNorm after the sum (XLM-R-XL has none).
        position_padding_idx (int | None): the position table's padding row, which lookups pass no
            gradient to (RoBERTa-style tables, transformers' ``padding_idx``); none by default.

    Call args:
        input_ids: (B, L) int, or None when ``inputs_embeds`` (B, L, E) is given.
        token_type_ids: (B, L) int.
        position_ids: (B, L) int.

    Returns:
        (B, L, E) embeddings.
    """

    config: Any
    embedding_size: int | None = None
    use_position: bool = True
    use_token_type: bool = True
    use_norm: bool = True
    dtype: Any = jnp.float32
    position_padding_idx: int | None = None

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds=None, deterministic: bool = True):
        c = self.config
        width = self.embedding_size or c.hidden_size
        init = jax.nn.initializers.normal(c.initializer_range)

        def table(rows: int, name: str) -> nn.Embed:
            return nn.Embed(rows, width, dtype=self.dtype, param_dtype=jnp.float32, embedding_init=init, name=name)

        words = table(c.vocab_size, "word_embeddings")
        if inputs_embeds is None:
            ids = input_ids.astype("i4")
            x = freeze_padding_row(words(ids), ids, getattr(c, "pad_token_id", None))
        else:
            x = inputs_embeds.astype(self.dtype)
        if self.use_token_type:
            x = x + table(c.type_vocab_size, "token_type_embeddings")(token_type_ids.astype("i4"))
        if self.use_position:
            pos = position_ids.astype("i4")
            positions = table(c.max_position_embeddings, "position_embeddings")(pos)
            x = x + freeze_padding_row(positions, pos, self.position_padding_idx)
        if self.use_norm:
            x = layer_norm("LayerNorm", c, self.dtype)(x)
        return Dropout(c.hidden_dropout_prob, name="dropout")(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Scaled dot-product attention with q/k/v projections (and, for MPNet, its own output ``o``).

    Attributes:
        config: family config (``hidden_size``, ``num_attention_heads``, dropout probabilities).
        names: ``BertLayerNames``; ``query``/``key``/``value`` name the projections.
        out_name (str | None): name of an output projection owned by this module (MPNet ``o``).
        causal (bool): decoder self-attention (causal mask, key/value cache).
        dtype: computation dtype.

    Call args:
        hidden_states: (B, Lq, H).
        attention_mask: (B, Lk) 0/1 padding mask of the keys (with a cache: (B, max_length)), or None.
        layer_head_mask: (heads,) multiplier of the attention probabilities, or None.
        key_value_states: (B, Lk, H) encoder states for cross-attention, or None.
        position_bias: (B|1, heads, Lq, Lk) added after scaling, or None.
        relative: ``(rel_key, rel_value)`` each (Lq, Lk, head_dim), or None.
        positions_to_keep: (B, R) int or None: queries at these rows of ``hidden_states`` only (keys and
            values at every row); masks, biases and relative terms are taken at the same query rows.

    Returns:
        ``(context (B, Lq, H), probabilities (B, heads, Lq, Lk))``; Lq = R with ``positions_to_keep``.
    """

    config: Any
    names: BertLayerNames = BertLayerNames()
    out_name: str | None = None
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        layer_head_mask=None,
        key_value_states=None,
        position_bias=None,
        relative=None,
        init_cache: bool = False,
        deterministic: bool = True,
        positions_to_keep=None,
    ):
        c = self.config
        heads = c.num_attention_heads
        head_dim = c.hidden_size // heads
        bsz, full_len = hidden_states.shape[:2]
        kv_in = hidden_states if key_value_states is None else key_value_states
        keep = positions_to_keep
        q_in = hidden_states if keep is None else keep_positions(hidden_states, keep)
        q_len = q_in.shape[1]
        if keep is not None and relative is not None:
            # (Lq, Lk, d) -> (B, R, Lk, d): each row's kept query positions
            relative = tuple(r.astype(self.dtype)[keep] for r in relative)

        def split_heads(x):  # (B, L, H) -> (B, L, heads, head_dim)
            return x.reshape(x.shape[:2] + (heads, head_dim))

        q = split_heads(dense(c.hidden_size, self.names.query, c, self.dtype)(q_in))
        k = split_heads(dense(c.hidden_size, self.names.key, c, self.dtype)(kv_in))
        v = split_heads(dense(c.hidden_size, self.names.value, c, self.dtype)(kv_in))

        # 0/1 visibility (B|1, 1, Lq, Lk), combined multiplicatively as transformers PyTorch does.
        visible = None
        if attention_mask is not None:
            visible = attention_mask.astype(self.dtype)[:, None, None, :]
        if self.causal and key_value_states is None:
            cached = self.has_variable("cache", "cached_key")
            if cached or init_cache:
                k, v, past = self._update_cache(k, v, cached)
            else:
                past = 0
            k_len = k.shape[1]
            # Query i sits at absolute position past + i and sees keys j <= past + i.
            if keep is None:
                rows = (past + jnp.arange(q_len)[:, None])[None]  # (1, Lq, 1)
            else:
                rows = past + keep[:, :, None]  # (B, R, 1)
            causal = (jnp.arange(k_len)[None, None, :] <= rows).astype(self.dtype)[:, None]
            visible = causal if visible is None else causal * visible

        rel = "qkd" if keep is None else "bqkd"  # relative terms per query row, or per (row, kept query)
        scores = bf16_einsum("bqhd,bkhd->bhqk", q, k)
        if relative is not None:
            # Nezha: key-position terms join the raw scores before scaling.
            scores = scores + bf16_einsum(f"bqhd,{rel}->bhqk", q, relative[0].astype(self.dtype))
        scores = scores / jnp.asarray(math.sqrt(head_dim), self.dtype)
        if position_bias is not None:
            if keep is not None and position_bias.shape[2] != 1:
                position_bias = keep_positions(position_bias, keep, axis=2)
            scores = scores + position_bias.astype(self.dtype)  # MPNet: after scaling
        if visible is not None:
            scores = add_attention_mask(scores, (1.0 - visible) * jnp.finfo(self.dtype).min)
        # In float32, cast back: as torch's bfloat16 softmax, which accumulates in float32.
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)
        probs = Dropout(c.attention_probs_dropout_prob, name="dropout")(probs, deterministic, keep, full_len, axis=2)
        if layer_head_mask is not None:
            probs = probs * layer_head_mask.astype(self.dtype)[None, :, None, None]

        context = bf16_einsum("bhqk,bkhd->bqhd", probs, v)
        if relative is not None:
            # Plain einsum: jaxlib 0.10's XLA CPU compiler runs this contraction's bf16 x bf16 -> f32 form in a
            # DotThunk that fails at run time (UNIMPLEMENTED); it stays in the widened bf16 form.
            context = context + jnp.einsum(f"bhqk,{rel}->bqhd", probs, relative[1].astype(self.dtype))
        context = context.reshape(bsz, q_len, heads * head_dim)  # merge heads: (B, Lq, H)
        if self.out_name is not None:
            context = dense(c.hidden_size, self.out_name, c, self.dtype)(context)
        return context, probs

    def _update_cache(self, k, v, initialized: bool):
        """Write this step's keys/values at ``cache_index``; return the full cache and the old index."""
        return update_kv_cache(self, k, v, initialized)


def update_kv_cache(module: nn.Module, k: jax.Array, v: jax.Array, initialized: bool):
    """A decoder attention's fixed-size cache, in ``module``'s ``"cache"`` collection.

    ``cached_key``/``cached_value`` (B, max_length, kv_heads, head_dim) and ``cache_index``; call from
    the module's compact ``__call__``.  ``k``/``v`` (B, L, kv_heads, head_dim) are written at
    ``cache_index``.  Returns ``(keys, values, past)``: the whole cache and the index before this write;
    while ``init_cache`` creates the collection (``initialized`` False), this step's own keys/values
    and 0.
    """
    cached_key = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = module.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if not initialized:  # init_cache: shapes only, attend like an uncached forward
        return k, v, 0
    past = index.value
    start = (0, past, 0, 0)  # (B, max_length, heads, head_dim) cache, written along time
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype), start)
    index.value = past + k.shape[1]
    return cached_key.value, cached_value.value, past


class BertAttention(nn.Module):
    """Attention block: optional pre-LN, self-attention, output projection, dropout, residual, post-LN.

    The module tree follows ``names`` relative to this block (named after the first component of
    ``names.self_attn``, e.g. ``attention``): ``self`` holds q/k/v, ``output`` holds ``dense`` and
    ``LayerNorm``; MPNet's ``attn.o`` and ``attention.LayerNorm`` and XLM-R-XL's
    ``self_attn_layer_norm`` fall out of the same rules.

    Call args: as :class:`BertSelfAttention`.  Returns ``(hidden (B, Lq, H), probs)``; with
    ``positions_to_keep`` (B, R) the residual, norms and output are at those rows: (B, R, H).
    """

    config: Any
    names: BertLayerNames = BertLayerNames()
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        layer_head_mask=None,
        key_value_states=None,
        position_bias=None,
        relative=None,
        init_cache: bool = False,
        deterministic: bool = True,
        positions_to_keep=None,
    ):
        c, n = self.config, self.names
        self_path = _split(n.self_attn)[1:]  # below this block, e.g. ["self"]
        out_path = _split(n.attn_out)[1:]  # e.g. ["output", "dense"] or ["attn", "o"]
        out_inside_self = out_path[:-1] == self_path
        x = hidden_states
        if n.pre_attn_norm:
            x = layer_norm(_split(n.pre_attn_norm)[-1], c, self.dtype)(x)
        attn = BertSelfAttention(
            c,
            names=n,
            out_name=out_path[-1] if out_inside_self else None,
            causal=self.causal,
            dtype=self.dtype,
            name=self_path[-1],
        )
        keep, full_len = positions_to_keep, hidden_states.shape[1]
        context, probs = attn(
            x,
            attention_mask,
            layer_head_mask,
            key_value_states,
            position_bias,
            relative,
            init_cache,
            deterministic,
            keep,
        )
        residual = hidden_states if keep is None else keep_positions(hidden_states, keep)
        norm_path = _split(n.attn_norm)[1:] if n.attn_norm else None
        if out_inside_self:
            out = context
            norm = layer_norm(norm_path[-1], c, self.dtype) if norm_path else None
        else:
            out_block = _Projection(c, out_path[-1], norm_path[-1] if norm_path else None, self.dtype, name=out_path[0])
            out = out_block(context, residual, deterministic, keep, full_len)
            return out, probs
        out = Dropout(c.hidden_dropout_prob, name="dropout")(out, deterministic, keep, full_len) + residual
        return (norm(out) if norm is not None else out), probs


class _Projection(nn.Module):
    """``dense`` -> optional dropout -> residual add -> optional ``LayerNorm`` (BERT's SelfOutput / Output).

    ``use_dropout=False``: no dropout before the residual add (XLM-R-XL's feed-forward output,
    ``BertLayerNames.output_dropout``).  ``positions``/``length``: ``x`` holds those rows of a
    ``length``-row tensor (the pruned last layer); the dropout mask is drawn at the full shape.
    """

    config: Any
    dense_name: str = "dense"
    norm_name: str | None = "LayerNorm"
    dtype: Any = jnp.float32
    features: int | None = None
    use_dropout: bool = True

    @nn.compact
    def __call__(self, x, residual, deterministic: bool = True, positions=None, length=None):
        c = self.config
        x = dense(self.features or c.hidden_size, self.dense_name, c, self.dtype)(x)
        if self.use_dropout:
            x = Dropout(c.hidden_dropout_prob, name="dropout")(x, deterministic, positions, length)
        x = x + residual
        if self.norm_name:
            x = layer_norm(self.norm_name, c, self.dtype)(x)
        return x


class _Intermediate(nn.Module):
    config: Any
    dense_name: str = "dense"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        return get_activation(c.hidden_act)(dense(c.intermediate_size, self.dense_name, c, self.dtype)(x))


class BertLayer(nn.Module):
    """One encoder (or decoder) layer: self-attention, optional cross-attention, feed-forward.

    Positional call args (positional so ``nn.remat`` can mark init_cache, deterministic and
    output_attentions static):
        hidden_states (B, L, H), attention_mask (B, Lk) 0/1 or None, layer_head_mask (heads,) or None,
        encoder_hidden_states (B, Le, H) or None, encoder_attention_mask (B, Le) or None,
        position_bias or None, relative (self-attention) or None, init_cache, deterministic,
        output_attentions, cross_relative (cross-attention, each (L, Le, head_dim)) or None,
        positions_to_keep (B, R) int or None (queries, attention output and feed-forward at those
        rows only; not with cross-attention).

    Returns:
        ``(hidden (B, L, H), self_attention_probs | None, cross_attention_probs | None)``; hidden is
        (B, R, H) with ``positions_to_keep``.
    """

    config: Any
    names: BertLayerNames = BertLayerNames()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        layer_head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        position_bias=None,
        relative=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        cross_relative=None,
        positions_to_keep=None,
    ):
        c, n = self.config, self.names
        keep, full_len = positions_to_keep, hidden_states.shape[1]
        attn = BertAttention(c, names=n, causal=c.is_decoder, dtype=self.dtype, name=_split(n.self_attn)[0])
        h, self_probs = attn(
            hidden_states,
            attention_mask,
            layer_head_mask,
            None,
            position_bias,
            relative,
            init_cache,
            deterministic,
            keep,
        )
        cross_probs = None
        if encoder_hidden_states is not None and keep is not None:
            raise InputError("positions_to_keep cannot be combined with encoder_hidden_states (cross-attention)")
        if encoder_hidden_states is not None:
            if not c.add_cross_attention:
                raise ValueError("encoder_hidden_states needs a model built with config.add_cross_attention=True")
            cross = BertAttention(c, names=cross_attention_names(n), causal=False, dtype=self.dtype, name=n.cross)
            h, cross_probs = cross(
                h,
                encoder_attention_mask,
                layer_head_mask,
                encoder_hidden_states,
                None,
                cross_relative,
                False,
                deterministic,
            )
        elif c.add_cross_attention and self.is_initializing():
            # The params exist whether or not this call attends to an encoder (as in PyTorch and the spec):
            # create them on the layer's own states and drop the result.
            cross = BertAttention(c, names=cross_attention_names(n), causal=False, dtype=self.dtype, name=n.cross)
            cross(h, key_value_states=h)
        x = h
        if n.pre_ffn_norm:
            x = layer_norm(_split(n.pre_ffn_norm)[-1], c, self.dtype)(x)
        inter_path, out_path = _split(n.intermediate), _split(n.output)
        x = _Intermediate(c, inter_path[-1], self.dtype, name=inter_path[0])(x)
        out_norm = _split(n.out_norm)[-1] if n.out_norm else None
        ffn_out = _Projection(c, out_path[-1], out_norm, self.dtype, use_dropout=n.output_dropout, name=out_path[0])
        x = ffn_out(x, h, deterministic, keep, full_len)
        if not output_attentions:
            return x, None, None
        return x, self_probs, cross_probs


class BertLayerCollection(nn.Module):
    """The ``layer`` list: children named ``"0"``, ``"1"``..., optionally rematerialised.

    ``positions_to_keep`` (B, R) int or None reaches the last layer only (its output is (B, R, H)).

    Returns ``(hidden, all_hidden_states | None, all_attentions | None, all_cross_attentions | None)``.
    """

    config: Any
    names: BertLayerNames = BertLayerNames()
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        position_bias=None,
        relative=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cross_relative=None,
        positions_to_keep=None,
    ):
        c = self.config
        cache = init_cache or bool(self.variables.get("cache"))
        flags = dict(output_hidden_states=output_hidden_states, output_attentions=output_attentions, use_cache=cache)
        positions_to_keep = check_positions_to_keep(positions_to_keep, hidden_states.shape[:2], flags)
        last = c.num_hidden_layers - 1
        # static_argnums counts the module as argument 0: init_cache, deterministic, output_attentions.
        layer_cls = nn.remat(BertLayer, static_argnums=(8, 9, 10)) if self.gradient_checkpointing else BertLayer
        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_cross = () if (output_attentions and encoder_hidden_states is not None) else None
        for i in range(c.num_hidden_layers):
            if output_hidden_states:
                all_hidden += (hidden_states,)
            layer = layer_cls(c, names=self.names, dtype=self.dtype, name=str(i))
            hidden_states, probs, cross_probs = layer(
                hidden_states,
                attention_mask,
                None if head_mask is None else head_mask[i],
                encoder_hidden_states,
                encoder_attention_mask,
                position_bias,
                relative,
                init_cache,
                deterministic,
                output_attentions,
                cross_relative,
                positions_to_keep if i == last else None,
            )
            if output_attentions:
                all_attn += (probs,)
                if all_cross is not None:
                    all_cross += (cross_probs,)
        return hidden_states, all_hidden, all_attn, all_cross


class BertEncoder(nn.Module):
    """``encoder``: the ``layer`` list plus an optional final LayerNorm (XLM-R-XL ``encoder.LayerNorm``).

    Call args:
        hidden_states (B, L, H); attention_mask (B, Lk) 0/1; head_mask (layers, heads), (heads,) or None;
        encoder_hidden_states (B, Le, H); encoder_attention_mask (B, Le); position_bias; relative;
        cross_relative (relative terms of the cross-attention); positions_to_keep (B, R) int or None:
        the last layer (and the final LayerNorm) at those rows only (:mod:`nezha_zoo.spec.pooling`).

    Returns:
        ``(last_hidden (B, L, H), all_hidden_states, all_attentions, all_cross_attentions)``; the last
        entry of ``all_hidden_states`` is the (final-normed) output; last_hidden is (B, R, H) with
        ``positions_to_keep``.
    """

    config: Any
    names: BertLayerNames = BertLayerNames()
    final_norm: str | None = None
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        position_bias=None,
        relative=None,
        init_cache: bool = False,
        deterministic: bool = True,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cross_relative=None,
        positions_to_keep=None,
    ):
        c = self.config
        if head_mask is not None:
            head_mask = jnp.asarray(head_mask)
            if head_mask.ndim == 1:  # one mask for every layer
                head_mask = jnp.broadcast_to(head_mask, (c.num_hidden_layers, head_mask.shape[0]))
        h, all_hidden, all_attn, all_cross = BertLayerCollection(
            c, names=self.names, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing, name="layer"
        )(
            hidden_states,
            attention_mask,
            head_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            position_bias,
            relative,
            init_cache,
            deterministic,
            output_attentions,
            output_hidden_states,
            cross_relative,
            positions_to_keep,
        )
        if self.final_norm:
            h = layer_norm(self.final_norm, c, self.dtype)(h)
        if output_hidden_states:
            all_hidden += (h,)
        return h, all_hidden, all_attn, all_cross
