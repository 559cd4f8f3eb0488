"""Shared BERT-style blocks for the Keras 3 backend.

Every layer has an explicit name equal to transformers' PyTorch attribute name, so a variable's
path (minus the model's name) is ``LAYOUTS["keras"].key(param)``.  Names inside a layer come from
:class:`nezha_zoo.spec.blocks.BertLayerNames`, the same object the spec is built from, so a family
that renames modules (MPNet ``attention.attn.q``) or moves norms (XLM-R-XL pre-LN) declares it once.

Extension points kept deliberately small:

* ``TFBertSelfAttention.relative_embeddings`` -> ``R`` (Lq, Lk, hd), used by ``relative_scores``
  (key term ``q_i . R[i, j]`` added before scaling) and ``relative_context`` (value term
  ``sum_j p_ij R[i, j]``); ``None`` by default (absolute-position models).  Nezha's functional
  relative positions override ``relative_embeddings``.  Query ``i`` sits at absolute position
  ``query_offset + i`` (the cached length in decoders), so cached decoding equals a full pass.
* ``TFBertAttention.self_attention_class`` / ``TFBertLayer.attention_class``: the classes a family
  swaps in (with ``TFBertEncoder(layer_class=...)``) to override those hooks.
* ``position_bias``: an additive score bias added after scaling (MPNet), threaded through the
  encoder, layer and attention (and passed as an input under gradient checkpointing, so the table
  it comes from gets gradients).
* RoBERTa-style positions (MPNet, XLM-R-XL, I-BERT): ``BertBackboneMixin.position_padding_idx``
  switches the default ``position_ids`` to :func:`padding_aware_position_ids` (pads at
  ``padding_idx``, tokens from ``padding_idx + 1``; ``inputs_embeds``: :func:`sequential_position_ids`),
  caps the length at ``max_position_embeddings - padding_idx - 1``; ``TFBertEmbeddings`` takes the
  word/position padding rows (no gradient through their lookups).
* pre-LN blocks (``names.pre_attn_norm``/``pre_ffn_norm``), a final encoder norm, an embedding block
  without LayerNorm / token types / positions.
* decoder mode: causal mask, cross-attention, key/value cache as a tuple of
  ``(k, v[, cross_k, cross_v])`` per layer, each ``(B, heads, L, head_dim)``, or the fixed-size
  :class:`~nezha_zoo.tf.cache.KVCache` per layer (``TFPreTrainedModel.init_cache``): static shapes,
  so a decoding step compiles; the attention mask then spans all ``max_length`` slots and query
  ``i`` sits at ``cache.index + i``; cross-attention keys/values are recomputed from the encoder
  states each call (they never change, and nothing grows).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common.symbolic_scope import in_symbolic_scope  # no public spelling
from tensorflow.python.ops import control_flow_util, resource_variable_ops  # no public spelling

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.dtypes import saturates_mask_sum
from nezha_zoo.outputs import BaseModelOutputWithPastAndCrossAttentions, ModelOutput
from nezha_zoo.packing import (
    PACK_BLOCK,
    PACKED_MAX_ROWS,
    fingerprint_indices,
    packed_linear_enabled,
)
from nezha_zoo.spec.blocks import BertLayerNames
from nezha_zoo.spec.pooling import can_keep_positions
from nezha_zoo.spec.positions import padding_aware_max_length
from nezha_zoo.tf.cache import append_kv, fixed_cache_length, is_fixed_cache
from nezha_zoo.validation import (
    ID_INPUTS,
    InputError,
    check_id_dtype,
    check_id_range,
    check_input_shapes,
    check_length,
    id_range_message,
    length_message,
    max_input_length,
)

__all__ = [
    "get_activation",
    "in_xla_context",
    "bf16_matmul",
    "to_rows",
    "from_rows",
    "packable",
    "pack_kernel",
    "Dense",
    "Block",
    "LayerList",
    "TFBertEmbeddings",
    "TFBertSelfAttention",
    "TFResidualOutput",
    "TFBertAttention",
    "TFBertIntermediate",
    "TFBertLayer",
    "TFBertEncoder",
    "BertBackboneMixin",
    "validate_inputs",
    "check_id_dtypes",
    "graph_input_checks",
    "poison_rows",
    "sublayers",
    "add_attention_mask",
    "POSITIONS_TO_KEEP_DOC",
    "keep_positions",
    "dropout_kept_rows",
    "check_positions_to_keep",
    "padding_aware_position_ids",
    "sequential_position_ids",
]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_fast(x: tf.Tensor) -> tf.Tensor:
    return 0.5 * x * (1.0 + tf.tanh(x * _SQRT_2_OVER_PI * (1.0 + 0.044715 * x * x)))


_ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),  # exact erf GELU, as transformers
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_fast": _gelu_fast,
    "relu": tf.nn.relu,
    "silu": tf.nn.silu,
    "swish": tf.nn.silu,
    "tanh": tf.tanh,
    "sigmoid": tf.sigmoid,
}


def get_activation(name: str | None) -> Callable[[tf.Tensor], tf.Tensor]:
    """transformers' ``ACT2FN`` by name; ``None`` is the identity."""
    if name is None:
        return tf.identity
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def in_xla_context() -> bool:
    """True while a function is traced for XLA (``tf.function(jit_compile=True)``, Keras ``fit`` /
    ``predict`` with ``jit_compile=True``, a function nested in one), False otherwise.

    Uses TensorFlow's own test (``control_flow_util.GraphOrParentsInXlaContext``, what its XLA-only
    code paths ask).
    """
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _f32_product(a: tf.Tensor, b: tf.Tensor, transpose_a: bool, transpose_b: bool) -> tf.Tensor:
    # bf16 x bf16 -> f32 (BatchMatMulV3): a kernel exists only under XLA, which runs this form natively.
    out = tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b, output_type=tf.float32)
    return tf.cast(out, tf.bfloat16)


def _unbroadcast(grad: tf.Tensor, like: tf.Tensor, other: tf.Tensor) -> tf.Tensor:
    """``grad`` (output batch dims, ...) summed over the batch dims ``like`` was broadcast along."""
    if like.shape[:-2].is_fully_defined() and like.shape[:-2] == other.shape[:-2]:
        return grad
    reduce, _ = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(like)[:-2], s1=tf.shape(other)[:-2])
    return tf.reshape(tf.reduce_sum(grad, reduce), tf.shape(like))


def _native_bf16_matmul(a: tf.Tensor, b: tf.Tensor, transpose_a: bool, transpose_b: bool) -> tf.Tensor:
    @tf.custom_gradient
    def product(a, b):
        def grad(dy):
            # TensorFlow's own gradient of BatchMatMulV3 mixes f32 and bf16 operands (an error when
            # batched, f32 SparseMatMul otherwise): the two backward products take the same native form.
            dy = tf.cast(dy, tf.bfloat16)
            if transpose_a:
                da = _f32_product(b, dy, transpose_b, True)
            else:
                da = _f32_product(dy, b, False, not transpose_b)
            if transpose_b:
                db = _f32_product(dy, a, True, transpose_a)
            else:
                db = _f32_product(a, dy, not transpose_a, False)
            return _unbroadcast(da, a, b), _unbroadcast(db, b, a)

        return _f32_product(a, b, transpose_a, transpose_b), grad

    return product(a, b)


def bf16_matmul(a: tf.Tensor, b: tf.Tensor, transpose_a: bool = False, transpose_b: bool = False) -> tf.Tensor:
    """``tf.matmul`` whose ``bf16 x bf16`` products, when compiled by XLA, accumulate in float32 and
    round back to bfloat16 (the TF twin of Flax's ``bf16_dot_general`` / ``bf16_einsum``).

    XLA's CPU compiler widens a ``bf16 x bf16 -> bf16`` dot whole to float32 but runs
    ``bf16 x bf16 -> f32`` natively; the result is the same f32-accumulated product rounded once to
    bf16.  That form (``output_type=tf.float32``) has no kernel outside XLA, so it is taken only
    while :func:`in_xla_context`; any other call (float32 operands, eager, a graph without XLA) is
    ``tf.matmul`` unchanged.  Its gradient takes the same form for both backward products.

    Args:
        a (..., M, K), b (..., K, N): operands (transposed first as ``transpose_a``/``transpose_b``
            say); batch dims broadcast as ``tf.matmul``'s; a rank-2 ``b`` under a higher-rank ``a``
            is one (rows, K) product.
    Returns:
        Tensor (..., M, N) in the operands' dtype.
    """
    if not (tf.as_dtype(a.dtype) == tf.as_dtype(b.dtype) == tf.bfloat16 and in_xla_context()):
        return tf.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)  # Keras variables (a tied embedding table)
    if b.shape.rank == 2 and a.shape.rank > 2 and not transpose_a:
        # (B, L, K) @ (K, N) as one (B*L, K) product: a batched one would sum B weight gradients.
        return from_rows(_native_bf16_matmul(to_rows(a), b, False, transpose_b), a)
    batch = a.shape[:-2]
    if a.shape.rank > 3 and batch.is_fully_defined() and batch == b.shape[:-2]:
        # One batch dim: XLA folds a transposed operand (attention heads (B, L, h, d) -> (B, h, L, d))
        # into a dot's batch dims and then widens it; merged, the transpose is materialised first.
        out = _native_bf16_matmul(_merge_batch(a), _merge_batch(b), transpose_a, transpose_b)
        return tf.reshape(out, tf.concat([batch.as_list(), tf.shape(out)[-2:]], 0))
    return _native_bf16_matmul(a, b, transpose_a, transpose_b)


def _merge_batch(x: tf.Tensor) -> tf.Tensor:
    """(..., M, K) -> (prod(...), M, K)."""
    return tf.reshape(x, tf.concat([[-1], tf.shape(x)[-2:]], 0))


def to_rows(x: tf.Tensor) -> tf.Tensor:
    """``x`` (..., d) as a matrix (N, d), N the product of the leading dims (see :func:`from_rows`).

    A dense layer fed rows runs one rank-2 ``MatMul`` + ``BiasAdd``, which TensorFlow's CPU graph
    optimiser fuses with a following activation (GELU, ReLU...) into one oneDNN call; a rank-3
    input goes through Tensordot's reshapes (Keras ``Dense``) or a broadcasting ``BatchMatMulV2``
    instead, and the activation then makes its own passes over the (B, L, intermediate) tensor.
    The values are the same products and sums.
    """
    return x if x.shape.rank == 2 else tf.reshape(x, (-1, x.shape[-1]))


def from_rows(rows: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """``rows`` (N, k) back to ``like``'s leading dims: (..., k), the inverse of :func:`to_rows`."""
    if like.shape.rank == 2:
        return rows
    out = tf.reshape(rows, tf.concat([tf.shape(like)[:-1], tf.shape(rows)[-1:]], 0))
    out.set_shape(like.shape[:-1].concatenate(rows.shape[-1:]))  # keep the static dims for later layers
    return out


def _leaf(dotted: str | None) -> str | None:
    return None if dotted is None else dotted.rsplit(".", 1)[-1]


class Block(keras.layers.Layer):
    """A layer whose sub-layers build on first call, inside this layer's name scope."""

    def build(self, input_shape=None):  # noqa: D401  (sub-layers build themselves when called)
        pass


class LayerList(Block):
    """A named container of child layers named ``"0"``, ``"1"``... (PyTorch ``ModuleList``).

    Args:
        items (Sequence[keras.layers.Layer]): the children, already named ``str(i)``.
        name (str): the PyTorch attribute name of the list (``"layer"``).
    """

    def __init__(self, items: Sequence[keras.layers.Layer], name: str, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> keras.layers.Layer:
        return self.items[i]


def packable(kernel: Any) -> bool:
    """Whether :func:`pack_kernel` applies: a float32 (in, out) kernel whose ``out`` is a multiple of
    :data:`~nezha_zoo.packing.PACK_BLOCK` (the block products; not the heads' odd widths)."""
    shape = tuple(kernel.shape)
    return len(shape) == 2 and shape[1] % PACK_BLOCK == 0 and tf.as_dtype(kernel.dtype) == tf.float32


def pack_kernel(kernel: tf.Tensor) -> tf.Tensor:
    """A copy of ``kernel`` (in, out) in the blocked layout (out / 64, in, 64) :class:`Dense` reads.

    At a few rows a product is bound by reading its weight, and a row-major (in, out) kernel is read in
    64-column panels whose rows lie ``4 * out`` bytes apart; stored as contiguous panels the same bytes
    read faster (oneDNN's packed weights do the same for PyTorch, ``flax.layers.pack_kernel`` for Flax).
    """
    k, n = kernel.shape
    return tf.transpose(tf.reshape(kernel, (k, n // PACK_BLOCK, PACK_BLOCK)), (1, 0, 2))


def _fingerprint(kernel: tf.Tensor, indices: np.ndarray) -> tf.Tensor:
    """The bits (int32: NaN and -0.0 compare too) of ``kernel``'s elements at the flat ``indices``."""
    return tf.bitcast(tf.gather(tf.reshape(kernel, (-1,)), indices), tf.int32)


def _untracked_variable(next_creator: Callable, **kwargs: Any) -> tf.Variable:
    # A variable made outside tf.function's creator stack: a packed copy may first be needed while a later
    # trace of a function runs (rows <= PACKED_MAX_ROWS after a wide call), where tf.function refuses new
    # variables; this one is a singleton held by its layer, which is what that rule protects.
    return resource_variable_ops.ResourceVariable(
        initial_value=kwargs["initial_value"], trainable=False, name=kwargs.get("name")
    )


@functools.cache
def _accelerators() -> bool:
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


@tf.custom_gradient
def _packed_product(rows: tf.Tensor, kernel: tf.Tensor, packed: tf.Tensor):
    """``rows @ kernel`` (N, in) x (in, out) -> (N, out), read from ``packed`` (:func:`pack_kernel` of ``kernel``).

    One ``BatchMatMulV2`` over the (out / 64) panels: (1, N, in) x (blocks, in, 64) -> (blocks, N, 64), the
    few input rows broadcast to every panel without a copy.  Gradients are the plain product's (to ``rows``
    and ``kernel``; none to the copy), so a tape over an inference call still sees the kernel.
    """
    blocks, width, block = packed.shape
    y = tf.matmul(rows[None], packed)  # (blocks, N, 64)
    y = tf.reshape(tf.transpose(y, (1, 0, 2)), (-1, blocks * block))  # (N, out)

    def grad(dy):
        return tf.matmul(dy, kernel, transpose_b=True), tf.matmul(rows, dy, transpose_a=True), None

    return y, grad


class Dense(keras.layers.Dense):
    """``keras.layers.Dense`` (same ``kernel`` / ``bias`` variables and names) with native bfloat16
    products under XLA and an opt-in faster float32 inference path for a few rows.

    A bfloat16 call compiled by XLA runs :func:`bf16_matmul`'s native ``bf16 x bf16 -> f32`` form
    (rounded back to bfloat16 once; XLA would widen the plain product whole).

    When :func:`nezha_zoo.packing.set_packed_linear` is on and a call is float32 inference (``training``
    not true) of at most :data:`~nezha_zoo.packing.PACKED_MAX_ROWS` rows (static shape), on a machine
    without GPU/TPU, outside XLA (``jit_compile``: 3.6x slower there) and distribution strategies, with a
    packable kernel (:func:`packable`), no unmerged LoRA and no Keras quantization, the product runs on a
    blocked copy of the kernel (:func:`pack_kernel`, held in an untracked, non-trainable ``tf.Variable``
    made on the first such call): 1.1-1.35x faster products at 16 rows on one AVX512 core.  Otherwise the call is
    ``keras.layers.Dense``'s, bit for bit.  The two paths sum in different orders: results agree to float32
    rounding, not bit for bit.  The switch is read when a call is traced: a ``tf.function`` (or
    ``model.predict``'s) traced before the switch changed keeps the path it traced.

    The copy never outlives the kernel's values as far as the guard sees: every packed call (eager,
    ``tf.function``, ``predict``) compares the bits of :data:`~nezha_zoo.packing.FINGERPRINT_SIZE` elements
    spread over the kernel (16 runs of 16, :func:`~nezha_zoo.packing.fingerprint_indices`) with those taken
    at packing time and packs again, inside the same call, when any differs; so ``assign``, ``set_weights``,
    ``load_weights``, optimizer steps and LoRA merges are seen wherever they run.  A write that leaves all
    of those elements bit for bit unchanged (a few rows or columns written through the underlying
    ``tf.Variable``, say) is not seen: call :meth:`drop_packed_weight` after it
    (``TFPreTrainedModel.set_weights`` / ``load_weights`` and LoRA merges do).  A kernel variable replaced
    by another one gets a new copy.  The copy holds one more copy of the kernel in memory for the layer's
    lifetime (functions traced with it keep it alive).  Being untracked, it cannot be saved: the serving
    export (``model.export``, every axis dynamic) never packs; save a function traced on a static shape
    of a few rows with the switch off.

    ``columns=(start, stop)`` computes only those output columns, ``inputs @ kernel[:, start:stop]`` plus
    ``bias[start:stop]``, from the same variables (LoRA's adapted kernel included; under Keras
    quantization the whole product is sliced): a fused projection whose parts are needed at different rows
    (MPT's ``Wqkv`` under pooled positions: key and value at every row) calls the layer once per part.  The
    column slice of the kernel is a strided copy: for a few rows the whole product, sliced, costs less.

    Forward: ``inputs`` (..., in), ``columns`` (start, stop) or None -> (..., out or stop - start).
    """

    #: (weakref to the kernel variable, the packed copy (out / 64, in, 64), its fingerprint, the indices)
    _nz_packed: tuple[weakref.ref, tf.Variable, tf.Variable, np.ndarray] | None = None

    def drop_packed_weight(self) -> None:
        """Mark the packed copy of ``kernel`` stale: the next packed call packs it again (also in functions
        traced before)."""
        if self._nz_packed is not None:
            fingerprint = self._nz_packed[2]
            fingerprint.assign(tf.bitwise.invert(fingerprint))  # differs from any kernel in every element

    def _packs(self, inputs: Any, training: Any) -> bool:
        if not packed_linear_enabled() or training or not isinstance(inputs, tf.Tensor) or in_symbolic_scope():
            return False
        rows = inputs.shape[:-1]
        return (
            rows.is_fully_defined()
            and rows.num_elements() <= PACKED_MAX_ROWS
            and inputs.dtype == tf.float32
            and self.compute_dtype == "float32"
            and self.quantization_mode is None
            and not self.lora_enabled
            and packable(self._kernel)
            and not _accelerators()
            and not tf.distribute.has_strategy()  # the copy is one plain variable, not a mirrored one
            and not in_xla_context()
        )

    def _packed_state(self) -> tuple[tf.Variable, tf.Variable, np.ndarray]:
        state = self._nz_packed
        if state is None or state[0]() is not self._kernel:
            with tf.init_scope(), tf.variable_creator_scope(_untracked_variable):
                kernel = tf.convert_to_tensor(self._kernel)
                indices = fingerprint_indices(tuple(kernel.shape))
                packed = tf.Variable(pack_kernel(kernel), trainable=False, name="packed_kernel")
                fingerprint = tf.Variable(_fingerprint(kernel, indices), trainable=False, name="packed_fingerprint")
            state = (weakref.ref(self._kernel), packed, fingerprint, indices)
            object.__setattr__(self, "_nz_packed", state)  # not tracked: neither a weight nor saved
        return state[1:]

    def call(self, inputs, training=None, columns=None):
        if columns is not None:
            return self._columns_call(inputs, *columns)
        if self.compute_dtype == "bfloat16" and not self.quantization_mode and in_xla_context():
            x = bf16_matmul(inputs, tf.cast(self.kernel, self.compute_dtype))  # a mixed policy keeps f32 weights
            if self.bias is not None:
                x = x + tf.cast(self.bias, x.dtype)
            return x if self.activation is None else self.activation(x)
        if not self._packs(inputs, training):
            return super().call(inputs)
        packed, fingerprint, indices = self._packed_state()
        kernel = tf.convert_to_tensor(self._kernel)
        sample = _fingerprint(kernel, indices)

        def repack():
            packed.assign(pack_kernel(kernel))
            fingerprint.assign(sample)
            return tf.constant(True)

        # in a function, the read below follows this (automatic control dependencies on ``packed``)
        tf.cond(tf.reduce_any(tf.not_equal(sample, fingerprint)), repack, lambda: tf.constant(False))
        x = _packed_product(tf.reshape(inputs, (-1, inputs.shape[-1])), kernel, packed.read_value())
        x = tf.reshape(x, (*inputs.shape[:-1], self.units))
        if self.bias is not None:
            x = keras.ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _columns_call(self, inputs: tf.Tensor, start: int, stop: int) -> tf.Tensor:
        if self.quantization_mode:  # Keras's quantized product has its own kernel layout and scales
            return super().call(inputs)[..., start:stop]
        # ``kernel`` reads ``kernel + scaling * a @ b`` under LoRA; bf16_matmul is tf.matmul outside XLA's bf16.
        x = bf16_matmul(inputs, tf.cast(self.kernel, self.compute_dtype)[:, start:stop])
        if self.bias is not None:
            x = x + tf.cast(self.bias, x.dtype)[start:stop]
        return x if self.activation is None else self.activation(x)


def dense(units: int, name: str, use_bias: bool = True) -> Dense:
    """A :class:`Dense` (``keras.layers.Dense`` with the opt-in packed inference path).

    Values are set from the spec after building (TFPreTrainedModel.init_weights).
    """
    return Dense(units, use_bias=use_bias, name=name)


def layer_norm(config: PretrainedConfig, name: str) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=config.layer_norm_eps, name=name)


def dropout(rate: float, name: str = "dropout") -> keras.layers.Dropout:
    return keras.layers.Dropout(rate, name=name)


# --- pooled positions (nezha_zoo.spec.pooling) ------------------------------------------------------


#: The base models' ``positions_to_keep`` argument, appended to their docstrings.
POSITIONS_TO_KEEP_DOC = """
        positions_to_keep (B, R) int or None: the positions of each row the last layer computes (its
        keys and values still cover every position; :mod:`nezha_zoo.spec.pooling`); ``last_hidden_state``
        is then (B, R, H), its rows those positions, and a pooler reads row 0.  Not with
        output_hidden_states, output_attentions or a cache (:class:`~nezha_zoo.validation.InputError`).
"""


def keep_positions(x: tf.Tensor, positions: tf.Tensor, axis: int = 1) -> tf.Tensor:
    """The rows ``positions`` of every batch row of ``x``: (B, L, ...) -> (B, R, ...) along ``axis``.

    Args:
        x (B or 1, ..., L, ...): the tensor; a batch dim of 1 (a bias or mask shared by the batch) is
            broadcast to B first; a size-1 ``axis`` (broadcast along it) is returned unchanged.
        positions (B, R) int: the positions kept in each batch row.
        axis (int): the position axis of ``x`` (1 for hidden states, 2 for (B, heads, Lq, Lk) scores).

    Returns:
        Tensor with ``axis`` of size R (or ``x`` when that axis has size 1).
    """
    if x.shape[axis] == 1:
        return x
    if x.shape[0] == 1:
        x = tf.broadcast_to(x, tf.concat([tf.shape(positions)[:1], tf.shape(x)[1:]], 0))
    return tf.gather(x, positions, axis=axis, batch_dims=1)


def dropout_kept_rows(
    layer: keras.layers.Dropout | None,
    x: tf.Tensor,
    positions: tf.Tensor,
    length: Any,
    training: Any = False,
    axis: int = 1,
) -> tf.Tensor:
    """``layer``'s dropout of the full-length tensor, at the kept rows only: ``x`` (B, R, ...) holds the rows
    ``positions`` (B, R) of a (B, L, ...) tensor along ``axis``.

    The mask is drawn at the full shape (``length`` L along ``axis``) from the layer's own seed generator, so
    the random stream and the kept rows' masks are those of the unpruned layer (``x * mask * scale`` is the
    product ``stateless_dropout`` forms, bit for bit).
    """
    if layer is None or not training or layer.rate == 0:
        return x
    full = shape_list(x)
    full[axis] = length
    mask = layer(tf.ones(full, x.dtype), training=training)  # 0 or 1 / (1 - rate)
    return x * keep_positions(mask, positions, axis)


def check_positions_to_keep(positions_to_keep: Any, batch: Any, length: Any, **flags: bool) -> tf.Tensor | None:
    """``positions_to_keep`` as (B, R) int32 after SPEC section 6 checks; ``None`` passes.

    Args:
        positions_to_keep: ``None`` or (B, R) int, the positions of each row the last layer computes.
        batch, length: the input's B and L (ints where static; other values skip their check).
        flags: the caller's ``output_hidden_states`` / ``output_attentions`` / ``use_cache``.

    Raises:
        InputError: a rank other than 2, another batch size, a float dtype, a position outside
            ``[0, length)`` (concrete values, eager), or a flag of
            :func:`nezha_zoo.spec.pooling.can_keep_positions` set (the last layer at every position is
            then asked for).
    """
    if positions_to_keep is None:
        return None
    if not can_keep_positions(**flags):
        asked = ", ".join(k for k, v in flags.items() if v)
        raise InputError(f"positions_to_keep prunes the last layer; it does not combine with {asked}")
    positions = tf.convert_to_tensor(positions_to_keep)
    if positions.shape.rank != 2:
        raise InputError(f"positions_to_keep must be (batch, rows) int, got shape {tuple(positions.shape)}")
    if isinstance(batch, int) and positions.shape[0] not in (None, batch):
        raise InputError(f"positions_to_keep has {positions.shape[0]} rows; the input has batch {batch}")
    check_id_dtype("positions_to_keep", positions.dtype.name)
    if _concrete(positions) and isinstance(length, int) and int(tf.size(positions)) > 0:
        check_id_range(
            "positions_to_keep", int(tf.reduce_min(positions)), int(tf.reduce_max(positions)), length, "positions"
        )
    return tf.cast(positions, tf.int32)


# --- embeddings ----------------------------------------------------------------------------------


def freeze_padding_row(embedded: tf.Tensor, ids: tf.Tensor, padding_idx: int | None) -> tf.Tensor:
    """Lookups of the padding row pass no gradient to it (torch ``nn.Embedding(padding_idx=...)``).

    The forward value is unchanged; only training differs: PyTorch never updates that row, so neither
    do we.  ``embedded``: (..., width) lookups of ``ids`` (...).
    """
    if padding_idx is None:
        return embedded
    is_pad = tf.expand_dims(tf.equal(tf.cast(ids, tf.int64), padding_idx), -1)
    return tf.where(is_pad, tf.stop_gradient(embedded), embedded)


class TFBertEmbeddings(Block):
    """Word + token-type + absolute position embeddings, then LayerNorm and dropout.

    Args:
        config (PretrainedConfig): ``vocab_size``, ``max_position_embeddings``, ``type_vocab_size``,
            ``layer_norm_eps``, ``hidden_dropout_prob``.
        embedding_size (int): width E of the tables (Electra's ``embedding_size``).
        position_embeddings (bool): add the absolute position table.
        token_type_embeddings (bool): add the token-type table.
        use_layer_norm (bool): apply ``LayerNorm`` (False for XLM-R-XL).
        padding_idx (int | None): the word table's padding row (no gradient through its lookups);
            default ``config.pad_token_id`` (MPNet hard-codes 1).
        position_padding_idx (int | None): the position table's padding row (RoBERTa-style
            positions: ``nn.Embedding(..., padding_idx=...)`` in transformers); default none.

    Call: ``input_ids`` (B, L) int or ``inputs_embeds`` (B, L, E); ``token_type_ids`` (B, L);
    ``position_ids`` (B or 1, L).  Returns (B, L, E).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        embedding_size: int,
        *,
        position_embeddings: bool = True,
        token_type_embeddings: bool = True,
        use_layer_norm: bool = True,
        padding_idx: int | None | str = "config",
        position_padding_idx: int | None = None,
        name: str = "embeddings",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.padding_idx = getattr(config, "pad_token_id", None) if padding_idx == "config" else padding_idx
        self.position_padding_idx = position_padding_idx
        self.word_embeddings = keras.layers.Embedding(config.vocab_size, embedding_size, name="word_embeddings")
        self.position_embeddings = (
            keras.layers.Embedding(config.max_position_embeddings, embedding_size, name="position_embeddings")
            if position_embeddings
            else None
        )
        self.token_type_embeddings = (
            keras.layers.Embedding(config.type_vocab_size, embedding_size, name="token_type_embeddings")
            if token_type_embeddings
            else None
        )
        self.LayerNorm = layer_norm(config, "LayerNorm") if use_layer_norm else None
        self.dropout = dropout(config.hidden_dropout_prob)

    def call(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, training=False):
        if inputs_embeds is None:
            inputs_embeds = freeze_padding_row(self.word_embeddings(input_ids), input_ids, self.padding_idx)
        embeddings = inputs_embeds
        if self.token_type_embeddings is not None:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            positions = self.position_embeddings(position_ids)
            embeddings = embeddings + freeze_padding_row(positions, position_ids, self.position_padding_idx)
        if self.LayerNorm is not None:
            embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings, training=training)


# --- attention -----------------------------------------------------------------------------------


def shape_list(x: tf.Tensor) -> list[int | tf.Tensor]:
    """``x``'s shape, a Python int for every dimension known statically (all of them in eager mode)
    and a scalar ``tf.shape`` entry for the others (a graph traced with unknown batch or length).

    Why: an eager ``tf.reshape`` to a shape mixing ints and tensors misses TF's fast path and packs
    the shape op by op (about a dozen extra conversions per attention layer and call).
    """
    static = x.shape.as_list()
    if None not in static:
        return static
    dynamic = tf.shape(x)
    return [dynamic[i] if d is None else d for i, d in enumerate(static)]


class TFBertSelfAttention(Block):
    """Multi-head scaled dot-product attention with separate q/k/v projections.

    Args:
        config (PretrainedConfig): ``hidden_size``, ``num_attention_heads``,
            ``attention_probs_dropout_prob``.
        names (BertLayerNames): ``query``/``key``/``value`` give the projection names.
        name (str): this layer's name (``"self"``).

    Call: ``hidden_states`` (B, Lq, H); ``attention_mask`` additive, broadcastable to
    (B, heads, Lq, Lk); ``head_mask`` (1, heads, 1, 1); ``encoder_hidden_states`` (B, Le, H) for
    cross-attention; ``past_key_value`` ``(k, v)`` each (B, heads, Lp, hd) or a :class:`KVCache`
    (self-attention only: keys/values written at its index, all ``max_length`` slots attended); ``position_bias``
    additive, broadcastable to the scores, added after scaling; ``query_offset`` (int or scalar
    tensor): absolute position of query 0 for relative-position terms (default: ``Lk - Lq`` in
    self-attention, i.e. the cached length; 0 in cross-attention); ``positions_to_keep`` (B, R) int:
    queries (and the mask's, bias's and relative terms' query rows) at those rows only, keys and values
    at every row, so Lq = R in the outputs.  Returns ``(context (B, Lq, H), probs (B, heads, Lq, Lk),
    (k, v))``, or the updated :class:`KVCache` in place of ``(k, v)`` when one was passed.
    """

    def __init__(self, config: PretrainedConfig, names: BertLayerNames, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_heads * self.head_dim
        self.query = dense(self.all_head_size, names.query)
        self.key = dense(self.all_head_size, names.key)
        self.value = dense(self.all_head_size, names.value)
        self.dropout = dropout(config.attention_probs_dropout_prob)

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        batch, length = shape_list(x)[:2]
        x = tf.reshape(x, (batch, length, self.num_heads, self.head_dim))  # (B, L, heads, hd)
        return tf.transpose(x, (0, 2, 1, 3))  # (B, heads, L, hd)

    def relative_embeddings(self, q_len: Any, k_len: Any, query_offset: Any) -> tf.Tensor | None:
        """Relative-position embeddings ``R`` (Lq, Lk, hd) of key ``j`` seen from query ``i`` (at
        absolute position ``query_offset + i``); ``None`` (the default) for absolute-position models."""
        return None

    def relative_scores(self, query: tf.Tensor, relative: tf.Tensor) -> tf.Tensor:
        """Key term added to ``q . k^T`` before scaling: ``s[b, h, i, j] = q[b, h, i] . R[i, j]``.

        ``query`` (B, heads, Lq, hd), ``relative`` (Lq, Lk, hd) or per row (B, Lq, Lk, hd) (the kept
        query rows of a pruned layer) -> (B, heads, Lq, Lk).
        """
        if relative.shape.rank == 4:
            return tf.einsum("bhid,bijd->bhij", query, relative)
        return tf.einsum("bhid,ijd->bhij", query, relative)

    def relative_context(self, probs: tf.Tensor, relative: tf.Tensor) -> tf.Tensor:
        """Value term added to the context: ``c[b, h, i] = sum_j p[b, h, i, j] R[i, j]``.

        ``probs`` (B, heads, Lq, Lk) after dropout and head mask, ``relative`` (Lq, Lk, hd) or
        (B, Lq, Lk, hd) -> (B, heads, Lq, hd).
        """
        if relative.shape.rank == 4:
            return tf.einsum("bhij,bijd->bhid", probs, relative)
        return tf.einsum("bhij,ijd->bhid", probs, relative)

    def call(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        past_key_value=None,
        position_bias=None,
        query_offset=None,
        positions_to_keep=None,
        training=False,
    ):
        # Pruned (positions_to_keep (B, R)): queries at the kept rows, keys and values at every row.
        q_rows = hidden_states if positions_to_keep is None else keep_positions(hidden_states, positions_to_keep)
        query = self._split_heads(self.query(q_rows))
        present = None
        if encoder_hidden_states is None and is_fixed_cache(past_key_value):
            key = self._split_heads(self.key(hidden_states))
            value = self._split_heads(self.value(hidden_states))
            key, value, present = append_kv(past_key_value, key, value)  # (B, heads, max_length, hd)
            if query_offset is None:
                query_offset = past_key_value.index
        elif encoder_hidden_states is not None and past_key_value is not None:
            key, value = past_key_value  # cross-attention keys/values of the encoder never change
        else:
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            key = self._split_heads(self.key(source))
            value = self._split_heads(self.value(source))
            if past_key_value is not None:
                key = tf.concat([past_key_value[0], key], axis=2)  # (B, heads, Lp + Lq, hd)
                value = tf.concat([past_key_value[1], value], axis=2)
        scores = bf16_matmul(query, key, transpose_b=True)  # (B, heads, Lq, Lk)
        q_len, k_len = shape_list(hidden_states)[1], shape_list(key)[2]  # Lq: every query position
        if query_offset is None:
            query_offset = 0 if encoder_hidden_states is not None else k_len - q_len
        relative = self.relative_embeddings(q_len, k_len, query_offset)  # (Lq, Lk, hd) or None
        if relative is not None:
            relative = tf.cast(relative, query.dtype)  # a fixed float32 table (Nezha) in a bf16 model
            if positions_to_keep is not None:
                relative = keep_positions(relative[None], positions_to_keep)  # (B, R, Lk, hd)
            scores = scores + self.relative_scores(query, relative)
        scores = scores / math.sqrt(self.head_dim)
        if positions_to_keep is not None:  # the query rows of the bias and mask (unchanged where broadcast)
            position_bias = None if position_bias is None else keep_positions(position_bias, positions_to_keep, 2)
            attention_mask = None if attention_mask is None else keep_positions(attention_mask, positions_to_keep, 2)
        if position_bias is not None:
            scores = scores + tf.cast(position_bias, scores.dtype)
        if attention_mask is not None:
            scores = add_attention_mask(scores, attention_mask)
        # In float32, cast back: as torch's bfloat16 softmax, which accumulates in float32.
        probs = tf.cast(tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1), scores.dtype)
        if positions_to_keep is None:
            probs = self.dropout(probs, training=training)
        else:  # the mask of the full (B, heads, Lq, Lk) probabilities, at the kept query rows
            probs = dropout_kept_rows(self.dropout, probs, positions_to_keep, q_len, training, axis=2)
        if head_mask is not None:
            probs = probs * head_mask
        context = bf16_matmul(probs, value)  # (B, heads, Lq, hd)
        if relative is not None:
            context = context + self.relative_context(probs, relative)
        context = tf.transpose(context, (0, 2, 1, 3))  # (B, Lq, heads, hd)
        batch, q_len = shape_list(context)[:2]
        context = tf.reshape(context, (batch, q_len, self.all_head_size))  # (B, Lq, H)
        return context, probs, (key, value) if present is None else present


class TFResidualOutput(Block):
    """``dense`` -> optional dropout -> residual add -> optional ``LayerNorm`` (BERT's SelfOutput / Output).

    Args:
        config (PretrainedConfig): ``hidden_size``, ``hidden_dropout_prob``, ``layer_norm_eps``.
        dense_name (str): name of the projection (``"dense"``).
        norm_name (str | None): name of the post-LN (``"LayerNorm"``); ``None`` for pre-LN blocks.
        use_dropout (bool): dropout on the projection before the residual add (``False`` for
            XLM-R-XL's feed-forward output: ``BertLayerNames.output_dropout``).

    Call: ``hidden_states`` (B, L, in), ``input_tensor`` (B, L, H) -> (B, L, H).  With
    ``positions_to_keep`` (B, R) both hold the kept rows (B, R, ...) of a length-``length`` sequence,
    and the dropout mask is drawn at the full length (:func:`dropout_kept_rows`).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        dense_name: str,
        norm_name: str | None,
        name: str,
        use_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.dense = dense(config.hidden_size, dense_name)
        self.LayerNorm = layer_norm(config, norm_name) if norm_name else None
        self.dropout = dropout(config.hidden_dropout_prob) if use_dropout else None

    def call(self, hidden_states, input_tensor, positions_to_keep=None, length=None, training=False):
        hidden_states = self.dense(hidden_states)
        if positions_to_keep is not None:
            hidden_states = dropout_kept_rows(self.dropout, hidden_states, positions_to_keep, length, training)
        elif self.dropout is not None:
            hidden_states = self.dropout(hidden_states, training=training)
        hidden_states = hidden_states + input_tensor
        return hidden_states if self.LayerNorm is None else self.LayerNorm(hidden_states)


class TFBertAttention(Block):
    """Self- or cross-attention block: optional pre-LN, attention, output projection and residual.

    Args:
        config (PretrainedConfig): the family config.
        names (BertLayerNames): module names; ``self_attn``/``attn_out``/``attn_norm`` below this
            block (``attention.self``, ``attention.output.dense``, ``attention.output.LayerNorm``).
        name (str): ``"attention"`` or ``"crossattention"``.
        pre_norm_name (str | None): name of a LayerNorm applied to the input first (pre-LN).

    Call: as :class:`TFBertSelfAttention`; returns ``(output (B, Lq, H), probs, (k, v))`` (with
    ``positions_to_keep`` (B, R): the residual at the kept rows, ``output`` (B, R, H)).
    """

    #: The attention core; a family with extra attention terms (Nezha) sets a subclass.
    self_attention_class: type[TFBertSelfAttention] = TFBertSelfAttention

    def __init__(
        self,
        config: PretrainedConfig,
        names: BertLayerNames,
        name: str,
        pre_norm_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        out_path = names.attn_out.split(".")  # [attention, output, dense]
        # BERT keeps the post-LN beside the output projection (attention.output.LayerNorm); MPNet
        # keeps it one level up (attention.LayerNorm, with the projection at attention.attn.o).
        parent = names.attn_out.rsplit(".", 1)[0]
        norm_beside_out = names.attn_norm is not None and names.attn_norm.rsplit(".", 1)[0] == parent
        self.pre_norm = layer_norm(config, pre_norm_name) if pre_norm_name else None
        self.self_attention = self.self_attention_class(config, names, name=_leaf(names.self_attn))
        self.dense_output = TFResidualOutput(
            config, out_path[-1], _leaf(names.attn_norm) if norm_beside_out else None, name=out_path[-2]
        )
        self.post_norm = layer_norm(config, _leaf(names.attn_norm)) if names.attn_norm and not norm_beside_out else None

    def call(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        past_key_value=None,
        position_bias=None,
        query_offset=None,
        positions_to_keep=None,
        training=False,
    ):
        normed = hidden_states if self.pre_norm is None else self.pre_norm(hidden_states)
        context, probs, present = self.self_attention(
            normed,
            attention_mask=attention_mask,
            head_mask=head_mask,
            encoder_hidden_states=encoder_hidden_states,
            past_key_value=past_key_value,
            position_bias=position_bias,
            query_offset=query_offset,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        if positions_to_keep is None:
            out = self.dense_output(context, hidden_states, training=training)
        else:  # the residual at the kept rows: (B, R, H)
            residual = keep_positions(hidden_states, positions_to_keep)
            length = shape_list(hidden_states)[1]
            out = self.dense_output(
                context, residual, positions_to_keep=positions_to_keep, length=length, training=training
            )
        return (out if self.post_norm is None else self.post_norm(out)), probs, present


class TFBertIntermediate(Block):
    """``dense`` (H -> intermediate) then the config's activation."""

    def __init__(self, config: PretrainedConfig, dense_name: str, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.dense = dense(config.intermediate_size, dense_name)
        self.act = get_activation(config.hidden_act)

    def call(self, hidden_states):
        # As rows: one fused MatMul + BiasAdd + activation on CPU (to_rows).
        return from_rows(self.act(self.dense(to_rows(hidden_states))), hidden_states)


class TFBertLayer(Block):
    """One encoder (or decoder) layer: attention, optional cross-attention, feed-forward.

    Args:
        config (PretrainedConfig): ``is_decoder``/``add_cross_attention`` select decoder mode.
        names (BertLayerNames): module names (post-LN BERT by default; pre-LN when
            ``pre_attn_norm``/``pre_ffn_norm`` are set).
        name (str): ``str(index)``.

    Call returns ``(hidden (B, L, H), self_probs, cross_probs or None, present)`` where ``present``
    is ``(k, v)`` or ``(k, v, cross_k, cross_v)``.  Query ``i`` sits at absolute position
    ``Lp + i`` (``Lp`` the cached self-attention length) in both attentions.

    ``positions_to_keep`` (B, R) int (no cache, no cross-attention): the layer computes only those
    rows (keys and values still at every row); ``hidden`` is then (B, R, H) and ``self_probs``
    (B, heads, R, L).
    """

    #: The attention block class for self- and cross-attention (a family may set a subclass).
    attention_class: type[TFBertAttention] = TFBertAttention

    def __init__(self, config: PretrainedConfig, names: BertLayerNames, name: str, **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.is_decoder = config.is_decoder
        pre = _leaf(names.pre_attn_norm)
        self.attention = self.attention_class(config, names, name=names.self_attn.split(".")[0], pre_norm_name=pre)
        self.crossattention = (
            self.attention_class(config, _below(names), name=names.cross, pre_norm_name=pre)
            if config.add_cross_attention
            else None
        )
        self.pre_ffn_norm = layer_norm(config, names.pre_ffn_norm) if names.pre_ffn_norm else None
        inter = names.intermediate.split(".")
        self.intermediate = TFBertIntermediate(config, inter[-1], name=inter[0])
        out = names.output.split(".")
        self.ffn_output = TFResidualOutput(
            config, out[-1], _leaf(names.out_norm), name=out[0], use_dropout=names.output_dropout
        )

    def call(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_value=None,
        position_bias=None,
        positions_to_keep=None,
        training=False,
    ):
        fixed = is_fixed_cache(past_key_value)
        if fixed:  # KVCache: keys live in max_length slots; the fill index is the query offset
            self_past, query_offset = past_key_value, past_key_value.index
        else:
            self_past = None if past_key_value is None else tuple(past_key_value[:2])
            query_offset = 0 if self_past is None else past_length((self_past,))  # cached positions
        hidden, probs, present = self.attention(
            hidden_states,
            attention_mask=attention_mask,
            head_mask=head_mask,
            past_key_value=self_past,
            position_bias=position_bias,
            query_offset=query_offset,
            positions_to_keep=positions_to_keep,
            training=training,
        )
        cross_probs = None
        if self.is_decoder and encoder_hidden_states is not None:
            if positions_to_keep is not None:
                raise InputError("positions_to_keep does not combine with cross-attention (encoder_hidden_states)")
            if self.crossattention is None:
                raise ValueError("encoder_hidden_states need cross-attention layers: set config.add_cross_attention")
            no_cross_past = fixed or past_key_value is None or len(past_key_value) < 4
            cross_past = None if no_cross_past else tuple(past_key_value[2:])
            hidden, cross_probs, cross_present = self.crossattention(
                hidden,
                attention_mask=encoder_attention_mask,
                head_mask=head_mask,
                encoder_hidden_states=encoder_hidden_states,
                past_key_value=cross_past,
                query_offset=query_offset,
                training=training,
            )
            if not fixed:  # with a KVCache the encoder's keys are recomputed, not cached
                present = tuple(present) + tuple(cross_present)
        ffn_in = hidden if self.pre_ffn_norm is None else self.pre_ffn_norm(hidden)
        if positions_to_keep is None:
            out = self.ffn_output(self.intermediate(ffn_in), hidden, training=training)
        else:
            length = shape_list(hidden_states)[1]
            out = self.ffn_output(
                self.intermediate(ffn_in), hidden, positions_to_keep=positions_to_keep, length=length, training=training
            )
        return out, probs, cross_probs, present if fixed else tuple(present)


def _below(names: BertLayerNames) -> BertLayerNames:
    """Cross-attention uses the same names as self-attention below its own container."""
    from dataclasses import replace

    return replace(names, pre_attn_norm=None)


class TFBertEncoder(Block):
    """A stack of :class:`TFBertLayer` in a list named ``layer``, optional final LayerNorm.

    Args:
        config (PretrainedConfig): ``num_hidden_layers`` and the layer settings.
        names (BertLayerNames): layer module names.
        final_norm_name (str | None): name of a LayerNorm after the last layer (pre-LN models).
        layer_class (type): the layer class (families with custom attention pass a subclass).

    Call: ``positions_to_keep`` ``None`` (every position) or (B, R) int: the last layer computes only
    those rows (see :mod:`nezha_zoo.spec.pooling`; checked by the base model), and
    ``last_hidden_state`` is (B, R, H) (the final norm applied to those rows).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        names: BertLayerNames = BertLayerNames(),
        final_norm_name: str | None = None,
        layer_class: type[TFBertLayer] = TFBertLayer,
        name: str = "encoder",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        layers = [layer_class(config, names, name=str(i)) for i in range(config.num_hidden_layers)]
        self.layer = LayerList(layers, "layer")
        self.final_norm = layer_norm(config, final_norm_name) if final_norm_name else None

    def call(
        self,
        hidden_states,
        attention_mask=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=False,
        output_attentions=False,
        output_hidden_states=False,
        position_bias=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ):
        all_hidden = [] if output_hidden_states else None
        last = len(self.layer.items) - 1
        all_attn = [] if output_attentions else None
        all_cross = [] if output_attentions and encoder_hidden_states is not None else None
        presents = [] if use_cache else None
        checkpoint = gradient_checkpointing and training and not use_cache and not output_attentions
        # Enter the list's scope so the children's variables live under ".../layer/<i>/...".
        with keras.name_scope(self.layer.name):
            for i, layer in enumerate(self.layer.items):
                if all_hidden is not None:
                    all_hidden.append(hidden_states)
                layer_head_mask = None if head_mask is None else head_mask[i]
                keep = positions_to_keep if i == last else None
                if checkpoint:
                    hidden_states = _checkpointed(
                        layer,
                        hidden_states,
                        attention_mask,
                        layer_head_mask,
                        encoder_hidden_states,
                        encoder_attention_mask,
                        position_bias,
                        training,
                        keep,
                    )
                    continue
                past = None if past_key_values is None else past_key_values[i]
                hidden_states, probs, cross_probs, present = layer(
                    hidden_states,
                    attention_mask=attention_mask,
                    head_mask=layer_head_mask,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    past_key_value=past,
                    position_bias=position_bias,
                    positions_to_keep=keep,
                    training=training,
                )
                if presents is not None:
                    presents.append(present)
                if all_attn is not None:
                    all_attn.append(probs)
                    if all_cross is not None:
                        all_cross.append(cross_probs)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            past_key_values=None if presents is None else tuple(presents),
            hidden_states=None if all_hidden is None else tuple(all_hidden),
            attentions=None if all_attn is None else tuple(all_attn),
            cross_attentions=None if all_cross is None else tuple(all_cross),
        )


def _checkpointed(layer, hidden, mask, head_mask, enc, enc_mask, position_bias, training, keep=None):
    """Run ``layer`` under ``tf.recompute_grad``: activations are recomputed in the backward pass.

    ``keep``: the layer's ``positions_to_keep`` (the last layer of a pruned stack), or None.

    The dropout seed states are rewound before the recomputation so it draws the same masks as the
    forward pass (as PyTorch's checkpoint preserves the RNG state).
    """
    generators = [getattr(sub, "seed_generator", None) for sub in sublayers(layer, include_self=True)]
    seeds = [g.state for g in generators if g is not None]  # rate-0 dropouts have none
    saved = [tf.identity(v.value) for v in seeds] if training else []

    def rewind():
        for var, value in zip(seeds, saved):
            var.assign(value)

    def run(h, **inputs):
        rewind()
        return layer(h, attention_mask=mask, head_mask=head_mask, positions_to_keep=keep, training=training, **inputs)[
            0
        ]

    if enc is None and position_bias is None:
        return tf.recompute_grad(lambda h: run(h))(hidden)
    if enc is None:  # the bias is an input so that its table (MPNet relative_attention_bias) gets gradients
        return tf.recompute_grad(lambda h, bias: run(h, position_bias=bias))(hidden, position_bias)

    def fn_cross(h, e):  # the encoder states are an input so that they receive gradients too
        return run(h, encoder_hidden_states=e, encoder_attention_mask=enc_mask, position_bias=position_bias)

    return tf.recompute_grad(fn_cross)(hidden, enc)


# --- input checks and the shared base-model forward ----------------------------------------------


def _shape(t: Any) -> tuple[int | None, ...] | None:
    if t is None:
        return None
    return tuple(t.shape.as_list()) if isinstance(t.shape, tf.TensorShape) else tuple(t.shape)


def _concrete(t: Any) -> bool:
    return t is not None and tf.executing_eagerly() and hasattr(t, "numpy")


def past_length(past_key_values: Any) -> int | tf.Tensor:
    """Cached positions: the key length of layer 0 (0 without a cache; a KVCache's fill index)."""
    if past_key_values is None:
        return 0
    if is_fixed_cache(past_key_values[0]):
        return past_key_values[0].index
    n = past_key_values[0][0].shape[-2]
    return n if n is not None else tf.shape(past_key_values[0][0])[-2]


def validate_inputs(
    config: PretrainedConfig,
    input_ids=None,
    inputs_embeds=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    past_len: int | tf.Tensor = 0,
    rank: int = 2,
    embed_width: int | None = None,
    positions: bool = True,
    max_length: int | None = None,
) -> tuple[int | None, ...]:
    """SPEC §6 checks, before any model op: shapes always, id values when they are concrete.

    ``max_length``: the longest sequence (cache included) the model takes; default
    ``config.max_position_embeddings`` (RoBERTa-style positions start at ``padding_idx + 1``, so
    they allow ``max_position_embeddings - padding_idx - 1``).

    Returns the ids' shape ``(B, L)`` (or ``(B, C, L)`` with ``rank=3``).
    """
    static_past = past_len if isinstance(past_len, int) else None
    others = {"token_type_ids": _shape(token_type_ids), "position_ids": None}
    mask_shape = _shape(attention_mask)
    if mask_shape is not None and len(mask_shape) == rank and not static_past:
        others["attention_mask"] = mask_shape
    shape = check_input_shapes(_shape(input_ids), _shape(inputs_embeds), others, embed_width, rank)
    check_id_dtypes({"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids})
    if mask_shape is not None and static_past:
        want = (shape[0], static_past + shape[-1]) if shape[-1] is not None else None
        differs = want is not None and any(None not in (a, b) and a != b for a, b in zip(mask_shape, want))
        if len(mask_shape) != 2 or differs:
            raise InputError(
                f"attention_mask has shape {mask_shape}; with {static_past} cached positions it must be {want}"
            )
    if _concrete(input_ids) and int(tf.size(input_ids)) > 0:
        ids = input_ids.numpy()
        check_id_range("input_ids", int(ids.min()), int(ids.max()), config.vocab_size)
    if _concrete(token_type_ids) and int(tf.size(token_type_ids)) > 0 and getattr(config, "type_vocab_size", None):
        tt = token_type_ids.numpy()
        check_id_range("token_type_ids", int(tt.min()), int(tt.max()), config.type_vocab_size, "token types")
    if positions and static_past is not None:
        if max_length is None:
            check_length(shape[-1], static_past, config.max_position_embeddings)
        else:
            check_length(
                shape[-1],
                static_past,
                max_length,
                f"usable positions (max_position_embeddings {config.max_position_embeddings} minus the padding offset)",
            )
    if _concrete(position_ids) and positions and int(tf.size(position_ids)) > 0:
        pos = position_ids.numpy()
        check_id_range("position_ids", int(pos.min()), int(pos.max()), config.max_position_embeddings, "positions")
    return shape


def check_id_dtypes(inputs: dict[str, Any]) -> None:
    """Every id input has an integer dtype (a cast would read 5.7 as 5); a dtype is known when tracing.

    Not inside Keras' own shape inference (``SymbolicScope``): ``fit`` under a ``tf.distribute``
    strategy builds the model once on placeholders that describe the integer batch as float32
    (``Trainer._symbolic_build``); nothing is computed there, and the real steps are checked.
    """
    if in_symbolic_scope():
        return
    for name, _, _ in ID_INPUTS:
        t = inputs.get(name)
        if t is not None and hasattr(t, "dtype"):
            check_id_dtype(name, getattr(t.dtype, "name", t.dtype))


def graph_input_checks(config: PretrainedConfig, inputs: dict[str, Any]):
    """SPEC §6 for traced inputs (``tf.function``, XLA), where values and dynamic shapes are unknown.

    Adds ``tf.debugging`` asserts (they raise ``InvalidArgumentError`` with the library's wording in
    graph mode; XLA drops them) for ids outside their tables, a too-long input and an
    ``attention_mask``/``token_type_ids`` whose dynamic shape differs from the ids'.  The id inputs
    are passed on behind the asserts, so no lookup runs before them.

    Args:
        config: the model's config (table sizes, :func:`~nezha_zoo.validation.max_input_length`).
        inputs: the call's keyword arguments (``input_ids`` (B, L) or (B, C, L) int...).

    Returns:
        ``(inputs, bad)``: the inputs with the ids behind the asserts, and ``bad`` (N,) bool, N = B
        (B*C for multiple choice): True for an example that breaks a value rule, whose outputs
        :func:`poison_rows` turns to NaN (what XLA gives instead of the error).  None without ids or
        embeddings to check.
    """
    ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if not isinstance(ref, tf.Tensor) or ref.shape.rank is None:
        return inputs, None
    rank = ref.shape.rank - (1 if ids is None else 0)
    ref_shape = tf.shape(ref)[:rank]  # (B[, C], L)
    bad = tf.zeros(tf.reduce_prod(ref_shape[:-1])[None], tf.bool)  # (N,)
    asserts = []
    for name, size_field, what in ID_INPUTS:
        t = inputs.get(name)
        size = getattr(config, size_field, None)
        if not isinstance(t, tf.Tensor) or size is None or t.shape.rank != rank:
            continue
        out_of_range = tf.logical_or(t < 0, t >= tf.cast(size, t.dtype))
        asserts.append(
            tf.debugging.Assert(tf.logical_not(tf.reduce_any(out_of_range)), [id_range_message(name, size, what)])
        )
        if name != "position_ids":  # explicit positions may broadcast over the batch
            bad = tf.logical_or(bad, tf.reshape(tf.reduce_any(out_of_range, axis=-1), [-1]))
    past = past_length(inputs.get("past_key_values"))
    limit = max_input_length(config)
    static_length = isinstance(past, int) and ref.shape[rank - 1] is not None  # checked when tracing
    if limit is not None and not static_length:
        too_long = tf.cast(past, tf.int32) + ref_shape[-1] > limit
        asserts.append(tf.debugging.Assert(tf.logical_not(too_long), [length_message(limit)]))
        bad = tf.logical_or(bad, too_long)
    # Inputs that must have the ids' shape (with a cache the mask spans the cache: checked elsewhere).
    same_shape = [] if inputs.get("past_key_values") is not None else ["attention_mask", "token_type_ids"]
    same_shape = [n for n in same_shape if isinstance(inputs.get(n), tf.Tensor) and inputs[n].shape.rank == rank]
    for name in same_shape:
        same = tf.reduce_all(tf.equal(tf.shape(inputs[name]), ref_shape))
        asserts.append(
            tf.debugging.Assert(same, [f"{name} and the ids differ in shape:", tf.shape(inputs[name]), ref_shape])
        )
    if not asserts:
        return inputs, bad
    with tf.control_dependencies(asserts):
        checked = {k: tf.identity(v) if isinstance(v, tf.Tensor) else v for k, v in inputs.items()}
        for name in same_shape:
            if not (checked[name].shape.is_fully_defined() and ref.shape[:rank].is_fully_defined()):
                # XLA drops the assert: reshaped to the ids' shape, a mismatch fails its compilation
                # instead (static shapes are compared when tracing, by validate_inputs).
                checked[name] = tf.reshape(checked[name], ref_shape)
    return checked, bad


def poison_rows(output: Any, bad: tf.Tensor | None) -> Any:
    """NaN in every float output of the examples flagged in ``bad`` (N,) bool; the others unchanged.

    A tensor's row ``i`` of ``n`` belongs to the examples ``i * N/n .. (i+1) * N/n - 1`` (``n = N``
    per example, ``n = B`` for multiple-choice logits over ``N = B*C``, ``n = 1`` for a pooled loss);
    a scalar is poisoned when any example is bad.  Non-float leaves (cache indices) pass unchanged.
    """
    if bad is None:
        return output
    if isinstance(output, ModelOutput):
        return type(output)(**{k: poison_rows(v, bad) for k, v in output.items()})
    if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        return type(output)(poison_rows(v, bad) for v in output)
    if not isinstance(output, tf.Tensor) or not output.dtype.is_floating:
        return output
    nan = tf.constant(float("nan"), output.dtype)
    if output.shape.rank == 0:
        return tf.where(tf.reduce_any(bad), nan, output)
    n, total = output.shape[0], bad.shape[0]
    if n is not None and total is not None and (n == 0 or total % n):
        rows = tf.fill([n], tf.reduce_any(bad))  # not per example: poison all if any is bad
    else:
        rows = tf.reduce_any(tf.reshape(bad, [tf.shape(output)[0], -1]), axis=1)  # (n,)
    rows = tf.reshape(rows, tf.concat([tf.shape(rows), tf.ones([output.shape.rank - 1], tf.int32)], 0))
    return tf.where(rows, nan, output)


def padding_aware_position_ids(input_ids, padding_idx: int, past_len: Any = 0) -> tf.Tensor:
    """RoBERTa-style positions (:mod:`nezha_zoo.spec.positions`): ``input_ids`` (B, L) int -> (B, L) int32.

    Pads get ``padding_idx``; real tokens count up from ``padding_idx + 1 + past_len`` in their row.
    """
    not_pad = tf.cast(tf.not_equal(tf.cast(input_ids, tf.int64), padding_idx), tf.int32)  # (B, L) 1 = token
    return (tf.cumsum(not_pad, axis=1) + tf.cast(past_len, tf.int32)) * not_pad + padding_idx


def sequential_position_ids(seq_len: Any, padding_idx: int) -> tf.Tensor:
    """Positions of ``inputs_embeds`` (pads cannot be seen): ``arange(padding_idx + 1, L + padding_idx + 1)``
    as (1, L) int32, as transformers' ``create_position_ids_from_inputs_embeds``."""
    return tf.range(padding_idx + 1, seq_len + padding_idx + 1)[None, :]  # (1, L)


def extended_attention_mask(
    attention_mask,
    batch: Any,
    q_len: Any,
    past_len: Any,
    is_decoder: bool,
    dtype: tf.DType = tf.float32,
    key_length: int | None = None,
) -> tf.Tensor:
    """Additive mask (B, 1, Lq or 1, Lk): 0 where visible, ``dtype``'s min where masked (causal in decoders).

    ``dtype`` is the scores' dtype (``finfo(dtype).min`` as transformers PyTorch: float32's min would
    overflow to -inf in bfloat16).  The mask is built in float32 and cast at the end.

    ``key_length``: the slot count of a fixed-size cache (``Lk``); query ``i`` then sits at slot
    ``past_len + i`` (``past_len`` the cache's fill index) and sees the slots up to it.
    """
    if attention_mask is None:
        attention_mask = tf.ones((batch, past_len + q_len if key_length is None else key_length), tf.float32)
    mask = tf.cast(attention_mask, tf.float32)
    # expand_dims, not [:, None, ...]: TFLite's builtin StridedSlice lacks new axes on dynamic shapes.
    if mask.shape.rank == 3:
        ext = tf.expand_dims(mask, 1)  # (B, 1, Lq, Lk)
    elif is_decoder and key_length is not None:
        rows = tf.cast(past_len, tf.int32) + tf.range(q_len)  # (Lq,) slot of each query
        causal = tf.cast(tf.range(key_length)[None, :] <= rows[:, None], tf.float32)  # (Lq, Lk)
        ext = causal * tf.expand_dims(tf.expand_dims(mask, 1), 1)  # (B, 1, Lq, Lk)
    elif is_decoder:
        causal = tf.linalg.band_part(tf.ones((q_len, q_len), tf.float32), -1, 0)  # (Lq, Lq) lower triangle
        causal = tf.concat([tf.ones((q_len, past_len), tf.float32), causal], axis=1)  # cached keys are visible
        ext = causal * tf.expand_dims(tf.expand_dims(mask, 1), 1)  # (B, 1, Lq, Lk)
    else:
        ext = tf.expand_dims(tf.expand_dims(mask, 1), 1)  # (B, 1, 1, Lk)
    return tf.cast((1.0 - ext) * dtype.min, dtype)


def sublayers(layer: keras.Layer, include_self: bool = False) -> list[keras.Layer]:
    """Every layer under ``layer`` (depth first, each once), and ``layer`` itself first if ``include_self``."""
    # Keras 3 has no public recursive walk (``Model.layers`` is one level): its private walker, called only here.
    return list(layer._flatten_layers(include_self=include_self))


def add_attention_mask(scores: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """``scores`` (B, heads, Lq, Lk) plus an additive ``mask`` broadcastable to them, saturating at the dtype's
    min in :data:`nezha_zoo.dtypes.SATURATING_MASK_DTYPES` (float16: no -inf, so no NaN row); else the plain sum."""
    total = scores + mask
    if saturates_mask_sum(total.dtype.name):
        total = tf.maximum(total, tf.constant(total.dtype.min, total.dtype))
    return total


def check_fixed_cache_inputs(attention_mask, input_shape: tuple | None, slots: int) -> None:
    """With a :class:`KVCache` of ``slots`` slots: the mask must be (B, slots) and the input fit."""
    mask_shape = _shape(attention_mask)
    if mask_shape is not None and (len(mask_shape) != 2 or mask_shape[-1] not in (None, slots)):
        raise InputError(
            f"attention_mask has shape {mask_shape}; with a fixed-size cache it must be (batch, {slots}): "
            "one column per cache slot (1 = a token written before or now, 0 = padding or empty)"
        )
    if input_shape is not None and input_shape[1] is not None and input_shape[1] > slots:
        raise InputError(f"{input_shape[1]} new positions do not fit the fixed cache's {slots} slots")


def layer_head_masks(head_mask, num_layers: int) -> list | None:
    """``(heads,)`` or ``(layers, heads)`` -> one ``(1, heads, 1, 1)`` multiplier per layer."""
    if head_mask is None:
        return None
    head_mask = tf.cast(head_mask, tf.float32)
    if head_mask.shape.rank == 1:
        return [head_mask[None, :, None, None]] * num_layers
    if head_mask.shape.rank == 2:
        return [head_mask[i][None, :, None, None] for i in range(num_layers)]
    raise InputError(f"head_mask must have shape (heads,) or (layers, heads), got {tuple(head_mask.shape)}")


class BertBackboneMixin:
    """The base-model forward shared by BERT-style families.

    The owner (a Keras layer or model) has ``config``, ``embeddings`` and ``encoder`` and may
    override :meth:`after_embeddings` (Electra's ``embeddings_project``).  ``limits_length`` False
    (Nezha: relative positions only) accepts inputs longer than ``max_position_embeddings``.
    """

    config: PretrainedConfig
    embedding_width: int
    limits_length: bool = True
    #: RoBERTa-style positions (MPNet, XLM-R-XL, I-BERT): the padding index they count from;
    #: ``None`` (BERT, Electra) gives ``arange(past, past + L)``.
    position_padding_idx: int | None = None

    def after_embeddings(self, hidden: tf.Tensor, training: bool) -> tf.Tensor:
        return hidden

    @property
    def max_sequence_length(self) -> int | None:
        """Longest input (cache included); ``None`` means ``config.max_position_embeddings``."""
        if self.position_padding_idx is None:
            return None
        return padding_aware_max_length(self.config.max_position_embeddings, self.position_padding_idx)

    def default_position_ids(self, input_ids, inputs_embeds, past_len: Any) -> tf.Tensor:
        """Positions when ``position_ids`` is not given: (B or 1, L) int."""
        if self.position_padding_idx is not None:
            if input_ids is not None:
                return padding_aware_position_ids(input_ids, self.position_padding_idx, past_len)  # (B, L)
            return sequential_position_ids(tf.shape(inputs_embeds)[1], self.position_padding_idx)  # (1, L)
        ref = input_ids if input_ids is not None else inputs_embeds
        return tf.range(past_len, past_len + tf.shape(ref)[1])[None, :]  # (1, L)

    def backbone(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        past_key_values=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        gradient_checkpointing=False,
        positions_to_keep=None,
        training=False,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else bool(output_attentions)
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else bool(output_hidden_states)
        # As transformers PyTorch: a cache only when asked for (use_cache=True) and only in decoders.
        use_cache = bool(use_cache) and cfg.is_decoder
        past_len = past_length(past_key_values)
        slots = fixed_cache_length(past_key_values)  # None unless a KVCache: then the mask spans its slots
        validate_inputs(
            cfg,
            input_ids,
            inputs_embeds,
            attention_mask if slots is None else None,  # a KVCache's mask is checked below
            token_type_ids,
            position_ids,
            past_len,
            embed_width=self.embedding_width,
            positions=self.limits_length,
            max_length=self.max_sequence_length,
        )
        ref = input_ids if input_ids is not None else inputs_embeds
        positions_to_keep = check_positions_to_keep(
            positions_to_keep,
            *_shape(ref)[:2],
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            use_cache=use_cache or past_key_values is not None,
        )
        batch, seq_len = tf.shape(ref)[0], tf.shape(ref)[1]
        if token_type_ids is None:
            token_type_ids = tf.zeros((batch, seq_len), tf.int32)
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, inputs_embeds, past_len)  # (B or 1, L)
        dtype = tf.as_dtype(getattr(self, "compute_dtype", None) or "float32")  # the model's dtype policy
        if slots is not None:
            check_fixed_cache_inputs(attention_mask, _shape(ref), slots)
        mask = extended_attention_mask(attention_mask, batch, seq_len, past_len, cfg.is_decoder, dtype, slots)
        enc_mask = None
        if cfg.is_decoder and encoder_hidden_states is not None:
            if encoder_attention_mask is None:
                encoder_attention_mask = tf.ones(tf.shape(encoder_hidden_states)[:2], tf.float32)
            enc = tf.cast(encoder_attention_mask, tf.float32)
            enc = tf.expand_dims(enc, 1) if enc.shape.rank == 3 else tf.expand_dims(tf.expand_dims(enc, 1), 1)
            enc_mask = tf.cast((1.0 - enc) * dtype.min, dtype)
        hidden = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            training=training,
        )
        hidden = self.after_embeddings(hidden, training)
        return self.encoder(
            hidden,
            attention_mask=mask,
            head_mask=layer_head_masks(head_mask, cfg.num_hidden_layers),
            encoder_hidden_states=encoder_hidden_states if cfg.is_decoder else None,
            encoder_attention_mask=enc_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            gradient_checkpointing=gradient_checkpointing,
            positions_to_keep=positions_to_keep,
            training=training,
        )
