"""Base wrapper of the Flax backend: params from the spec, checkpoints, input checks, caches.

A ``Flax<Family><Head>`` wrapper holds a plain linen module (``.module``), its ``.params`` and the
``.config``, as transformers' ``FlaxPreTrainedModel`` does.  Everything weight-related is derived from
the family's :class:`~nezha_zoo.spec.param.ModelSpec` through ``LAYOUTS["flax"]``: the params tree
paths, stored shapes, initial values and the conversions to and from canonical checkpoints.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.experimental import checkify

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.dtypes import canonical_dtype
from nezha_zoo.flax.heads import qa_head, token_classifier
from nezha_zoo.flax.layers import (
    PACKED,
    dense,
    dense_compiler_options,
    pack_kernel,
    packable,
    packed_compiler_options,
)
from nezha_zoo.flax.lora import LoraMixin
from nezha_zoo.generation import check_logits_to_keep
from nezha_zoo.inputs import accepts_encodings
from nezha_zoo.io.plan import CHUNK_BYTES
from nezha_zoo.io.shards import DEFAULT_MAX_SHARD_SIZE
from nezha_zoo.outputs import (
    OUTPUT_CLASSES,
    ModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    TokenClassifierOutput,
)
from nezha_zoo.packing import PACKED_MAX_ROWS, packed_linear_enabled
from nezha_zoo.pretrained import load_weights, random_weights, resized_vocab, resolve_config, save_weights
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import Kind, ModelSpec, Param
from nezha_zoo.spec.pooling import FIRST, keeps_positions
from nezha_zoo.spec.registry import Family, family_of_config, register_model_class
from nezha_zoo.validation import (
    ID_INPUTS,
    InputError,
    check_id_dtype,
    check_id_range,
    check_input_shapes,
    check_length,
    id_range_message,
)

__all__ = [
    "FlaxPreTrainedModel",
    "FlaxHeadModule",
    "register_output_pytrees",
    "validate_inputs",
    "spec_params_shape",
    "cache_info",
    "finish_output",
    "backbone_fields",
    "forwarded_inputs",
    "flatten_choices",
]

logger = logging.getLogger("nezha_zoo")

LAYOUT = LAYOUTS["flax"]
#: call signatures whose eager calls :meth:`FlaxPreTrainedModel._apply` counts (least recent dropped)
_JIT_SEEN_SIZE = 256


# --- output classes as pytrees ------------------------------------------------------------------


def register_output_pytrees() -> None:
    """Register every nezha_zoo output class with JAX so outputs pass through ``jit``/``grad``."""
    for cls in OUTPUT_CLASSES:

        def flatten_with_keys(out: ModelOutput):
            return [(jax.tree_util.DictKey(k), v) for k, v in out.items()], tuple(out.keys())

        def flatten(out: ModelOutput):
            return list(out.values()), tuple(out.keys())

        def unflatten(keys, values, cls=cls):
            return cls(**dict(zip(keys, values)))

        try:
            jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
        except ValueError:  # already registered (module re-imported)
            pass


register_output_pytrees()


# --- input checks -------------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as numpy when its values are known (eager), None under tracing."""
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _shape(x: Any) -> tuple[int, ...] | None:
    return None if x is None else tuple(np.shape(x))


def validate_inputs(
    config: PretrainedConfig,
    input_ids: Any = None,
    attention_mask: Any = None,
    token_type_ids: Any = None,
    position_ids: Any = None,
    inputs_embeds: Any = None,
    rank: int = 2,
    past_len: int = 0,
    cache_length: int | None = None,
    embed_width: int | None = None,
    positions: bool = True,
) -> None:
    """Raise :class:`InputError` for inputs that cannot be right, before any framework op.

    Shapes are always checked (they are static under ``jit`` too); id ranges and lengths only when
    values are concrete.  With a key/value cache, ``attention_mask`` covers the cache
    (``(B, cache_length)``, transformers' Flax convention) instead of the ids.  ``positions=False``
    (Nezha: relative positions only) drops the ``max_position_embeddings`` length limit; the cache
    size still bounds cached decoding.
    """
    others = {"token_type_ids": _shape(token_type_ids), "position_ids": _shape(position_ids)}
    if cache_length is None:
        others["attention_mask"] = _shape(attention_mask)
    shape = check_input_shapes(_shape(input_ids), _shape(inputs_embeds), others, embed_width, rank=rank)
    if cache_length is not None and attention_mask is not None:
        want = (*shape[:-1], cache_length)
        if tuple(np.shape(attention_mask)) != want:
            raise InputError(
                f"with a cache, attention_mask must cover the cache: shape {want}, "
                f"got {tuple(np.shape(attention_mask))}"
            )
    ids = _concrete(input_ids)
    if ids is not None and ids.size:
        check_id_range("input_ids", int(ids.min()), int(ids.max()), config.vocab_size)
    types = _concrete(token_type_ids)
    if types is not None and types.size and hasattr(config, "type_vocab_size"):
        check_id_range("token_type_ids", int(types.min()), int(types.max()), config.type_vocab_size, "token types")
    pos = _concrete(position_ids)
    if pos is not None and pos.size and hasattr(config, "max_position_embeddings"):
        check_id_range("position_ids", int(pos.min()), int(pos.max()), config.max_position_embeddings, "positions")
    seq_len = shape[-1]
    if positions and position_ids is None and hasattr(config, "max_position_embeddings"):
        check_length(seq_len, past_len, config.max_position_embeddings)
    if cache_length is not None and seq_len is not None and past_len + seq_len > cache_length:
        raise InputError(
            f"{seq_len} new token(s) after {past_len} cached ones overflow the cache of length {cache_length}"
        )


def check_id_dtypes(inputs: Mapping[str, Any]) -> None:
    """Every id input has an integer dtype (a cast would read 5.7 as 5); a dtype is known when tracing."""
    for name, _, _ in ID_INPUTS:
        t = inputs.get(name)
        if t is not None and hasattr(t, "dtype"):
            check_id_dtype(name, np.dtype(t.dtype).name)


#: Set by :func:`checked` while it traces: the traced input checks then also raise (checkify).
_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("nezha_zoo_flax_checked", default=False)


def graph_input_checks(config: PretrainedConfig, inputs: Mapping[str, Any]) -> jax.Array | None:
    """SPEC §6 for traced inputs (``jax.jit``), where id values are unknown and nothing can raise.

    Returns ``bad`` (N,) bool, N = B (B*C for multiple choice): True for an example with an id outside
    its table, whose outputs :func:`poison_rows` turns to NaN; None when no id is traced.  Inside
    :func:`checked` the same conditions are ``checkify`` checks that raise :class:`InputError`.
    (Shapes and lengths are static under ``jit``: :func:`validate_inputs` checks them at trace time.)
    """
    ids = inputs.get("input_ids")
    if not isinstance(ids, jax.core.Tracer):
        return None
    bad = jnp.zeros((math.prod(ids.shape[:-1]),), bool)  # (N,); a symbolic size under jax.export
    for name, size_field, what in ID_INPUTS:
        t = inputs.get(name)
        size = getattr(config, size_field, None)
        if t is None or size is None or jnp.ndim(t) != ids.ndim:
            continue
        t = jnp.asarray(t)
        out_of_range = (t < 0) | (t >= size)
        if _CHECKED.get():
            checkify.check(~jnp.any(out_of_range), id_range_message(name, size, what))
        if name != "position_ids":  # explicit positions may broadcast over the batch
            bad = bad | jnp.any(out_of_range, axis=-1).reshape(-1)
    return bad


def poison_rows(output: Any, bad: jax.Array | None) -> Any:
    """NaN in every float output of the examples flagged in ``bad`` (N,) bool; the others unchanged.

    A leaf's row ``i`` of ``n`` belongs to the examples ``i * N/n .. (i+1) * N/n - 1`` (``n = N``
    per example, ``n = B`` for multiple-choice logits over ``N = B*C``); a scalar, or a leaf whose
    leading size does not divide N, is poisoned when any example is bad.  Integer leaves pass.
    """
    if bad is None:
        return output

    def poison(x):
        if not isinstance(x, jax.Array) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        n, total = (x.shape[0] if x.ndim else 0), bad.shape[0]
        rows = jnp.any(bad.reshape(n, -1), axis=1) if n and total % n == 0 else jnp.full((max(n, 1),), jnp.any(bad))
        rows = rows.reshape(x.shape[:1] + (1,) * (x.ndim - 1)) if x.ndim else rows[0]
        return jnp.where(rows, jnp.asarray(jnp.nan, x.dtype), x)

    return jax.tree_util.tree_map(poison, output)


def checked(fn: Callable) -> Callable:
    """``jax.jit(fn)`` whose model calls raise :class:`InputError` for bad id values instead of NaN.

    Under plain ``jax.jit`` an id outside its table cannot raise, so the model poisons that example's
    outputs with NaN (docs/bad_input.md); ``checked`` traces ``fn`` with ``jax.experimental.checkify``
    checks in the model call instead, and raises after the compiled call.  The same spelling exists
    in ``nezha_zoo.tf`` (graph mode with the asserts on).

    Args:
        fn: a function calling a model wrapper (``lambda ids: model(ids, params=p)``).

    Returns:
        A function with ``fn``'s arguments and outputs (compiled once per shape, as ``jax.jit``).
    """
    compiled = jax.jit(checkify.checkify(fn, errors=checkify.user_checks))

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        token = _CHECKED.set(True)  # read while ``fn`` is traced (first call per shape)
        try:
            err, out = compiled(*args, **kwargs)
        finally:
            _CHECKED.reset(token)
        message = err.get()
        if message is not None:
            raise InputError(message.split(" (`check`", 1)[0].strip())
        return out

    return run


# --- params from the spec -----------------------------------------------------------------------


def _trainable(spec: ModelSpec) -> list[Param]:
    return [p for p in spec if LAYOUT.collection_of(p) == "params"]


#: The variable collection of persistent non-trainable state (``Kind.BUFFER`` params, e.g. I-BERT's
#: quantization state); a wrapper whose spec has any holds them in ``.buffers``.
BUFFERS = LAYOUT.collection[Kind.BUFFER]


def _buffer_params(spec: ModelSpec) -> list[Param]:
    return [p for p in spec if LAYOUT.collection_of(p) == BUFFERS]


def spec_params_shape(spec: ModelSpec, dtype: Any = jnp.float32) -> dict:
    """The nested ``params`` shape tree the spec declares (``jax.ShapeDtypeStruct`` leaves)."""
    return unflatten_dict({LAYOUT.path(p): jax.ShapeDtypeStruct(LAYOUT.shape(p), dtype) for p in _trainable(spec)})


def per_array(previous: Mapping[Any, tuple[weakref.ref, Any]], arrays: Mapping[Any, Any], make: Callable) -> dict:
    """``{key: (weakref to array, make(array))}`` for ``arrays``, reusing ``previous``'s value of a key
    while it holds the same array object (jax arrays are immutable: the value cannot go stale); a new
    array is made again and the entries of absent keys are dropped."""
    out = {}
    for key, array in arrays.items():
        held = previous.get(key)
        out[key] = (weakref.ref(array), held[1] if held is not None and held[0]() is array else make(array))
    return out


def _aval(x: Any) -> tuple:
    """A leaf's part of a call signature: ``(shape, dtype, weak_type)``.

    A jax array's attributes are read directly (~0.3 us a leaf; ``np.shape`` + ``str(dtype)`` took
    ~3.6 us, 0.7 ms of a 1x16 Electra-base call's 199 leaves); numpy arrays and Python scalars take
    the general path.
    """
    if isinstance(x, jax.Array):
        try:
            return x.shape, x.dtype, x.weak_type
        except AttributeError:  # a typed PRNG key array (jax.random.key) has no weak_type
            pass
    return np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "weak_type", False)


@functools.cache
def _call_arguments(module_class: type) -> frozenset[str]:
    """The argument names of a linen module class's ``__call__`` (read once per class)."""
    return frozenset(inspect.signature(module_class.__call__).parameters)


def _path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _rows(inputs: Mapping) -> int:
    """Token rows of a call: ``input_ids`` (..., L) or ``inputs_embeds`` (..., L, E)."""
    ids = inputs.get("input_ids")
    if ids is not None:
        return math.prod(np.shape(ids))
    return math.prod(np.shape(inputs["inputs_embeds"])[:-1])


class FlaxPreTrainedModel(LoraMixin):
    """Wrapper around a linen module with params, checkpoints and transformers' Flax call convention.

    Subclasses set ``family`` (a registered :class:`Family`), ``head`` (``"Model"``,
    ``"ForMaskedLM"``...) and ``module_class``.

    Args:
        config (PretrainedConfig): the family's config.
        input_shape (tuple[int, ...]): shape of the dummy ids (kept for transformers compatibility;
            params come from the spec, so it does not affect them).
        seed (int): seed of ``self.key``, the rng of the initial params.
        dtype (jnp.dtype | str | None): compute dtype: ``jnp.float32`` (default, also None or
            ``"float32"``), ``jnp.bfloat16`` (``"bfloat16"``) or ``jnp.float16`` (``"float16"``).
        param_dtype (jnp.dtype | str | None): dtype the params are stored in (default: ``dtype``);
            ``param_dtype=jnp.float32, dtype=jnp.bfloat16`` is the float32-master-weights,
            bfloat16-compute recipe (the layers cast the params to ``dtype`` when they use them).
        _do_init (bool): build random params now; with False only the shape tree exists and
            ``init_weights`` must be called by the user.
        gradient_checkpointing (bool): rematerialise each layer in the backward pass.
    """

    family: ClassVar[Family]
    head: ClassVar[str] = "Model"
    module_class: ClassVar[type[nn.Module]]
    #: rank of ``input_ids`` (3 for multiple choice: (B, C, L)).
    input_rank: ClassVar[int] = 2
    #: the family has absolute positions (a ``position_ids`` input and a length limit); Nezha has not.
    has_position_ids: ClassVar[bool] = True
    #: a decoder-only family (MPT): its Model/CausalLM classes decode whatever ``config.is_decoder`` says.
    decoder_only: ClassVar[bool] = False
    #: eager calls of one call signature (shapes, dtypes, settings) run op by op before the next one
    #: compiles it with ``jax.jit``; 0 compiles at the first call, None never compiles (op by op
    #: always, as transformers' Flax classes).  Settable per instance.
    jit_after_calls: int | None = 1
    #: compiled call signatures kept per wrapper (least recently used dropped); 0 never compiles.
    jit_cache_size: int = 8

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:  # model(enc) / model(**enc) with a tokenizer's output (nezha_zoo.inputs)
            cls.__call__ = accepts_encodings(cls.__call__)
        register_model_class(cls, "flax")  # (family, head, "flax") -> cls for nezha_zoo.spec.model_class

    def __init__(
        self,
        config: PretrainedConfig,
        input_shape: tuple[int, ...] = (1, 1),
        seed: int = 0,
        dtype: Any = jnp.float32,
        _do_init: bool = True,
        gradient_checkpointing: bool = False,
        param_dtype: Any = None,
        **kwargs: Any,
    ):
        if config is None:
            raise ValueError("config cannot be None")
        if not isinstance(config, self.family.config_class):
            raise TypeError(f"config must be a {self.family.config_class.__name__}, got {type(config).__name__}")
        self._config = config
        self.dtype = _JNP_DTYPES[canonical_dtype(dtype)]
        self.param_dtype = (
            self.dtype if param_dtype is None else _JNP_DTYPES[canonical_dtype(param_dtype, "param_dtype")]
        )
        dtype = self.dtype
        self.input_shape = tuple(input_shape)
        self.key = jax.random.PRNGKey(seed)
        self._module = self.module_class(
            config=config, dtype=dtype, gradient_checkpointing=gradient_checkpointing, **kwargs
        )
        self._spec = self.family.model_spec(config, self.head)
        self._params_shape_tree = spec_params_shape(self._spec, self.param_dtype)
        self._required_params = {LAYOUT.path(p) for p in _trainable(self._spec)}
        self._buffer_paths = {LAYOUT.path(p) for p in _buffer_params(self._spec)}
        self._missing_keys: set[tuple[str, ...]] = set()
        #: (batch, max_length, dtype) -> the cache collection's shapes (see :meth:`init_cache`)
        self._cache_shapes: dict[tuple[int, int, str], Any] = {}
        #: call signature -> compiled ``module.apply`` / eager calls so far (see :meth:`_apply`)
        self._jit_compiled: OrderedDict[tuple, Callable] = OrderedDict()
        self._jit_seen: OrderedDict[tuple, int] = OrderedDict()
        #: params path -> (weakref to the kernel, its packed copy) (see :meth:`_packed_kernels`)
        self._packed: dict[tuple[str, ...], tuple[weakref.ref, jax.Array]] = {}
        #: (``_packed`` it was built from, params treedef, weakrefs to the params leaves, the collection)
        self._packed_last: tuple | None = None
        self._is_initialized = _do_init
        self._params: dict | None = None
        # buffers are small state: always held, fresh from the spec's constants until loaded
        self._buffers: dict = self.init_buffers()
        if _do_init:
            self.params = self.init_weights(self.key, self.input_shape)

    # --- properties --------------------------------------------------------------------------------

    @property
    def config(self) -> PretrainedConfig:
        return self._config

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def framework(self) -> str:
        return "flax"

    @property
    def params_shape_tree(self) -> dict:
        return self._params_shape_tree

    @property
    def required_params(self) -> set[tuple[str, ...]]:
        return set(self._required_params)

    @property
    def params(self) -> dict:
        if not self._is_initialized:
            raise ValueError(
                f"{type(self).__name__} was created with _do_init=False: it holds no params. Call "
                "init_weights(rng, input_shape[, params]) and pass params= explicitly."
            )
        return self._params  # type: ignore[return-value]

    @params.setter
    def params(self, params: Mapping) -> None:
        if not self._is_initialized:
            raise ValueError(f"{type(self).__name__} was created with _do_init=False; keep params outside the model")
        self._params = self._checked(params)

    def _checked(self, params: Mapping) -> dict:
        """``params`` as a plain nested dict, with exactly the spec's paths and stored shapes."""
        flat = flatten_dict(dict(params))
        missing = self._required_params - set(flat)
        if missing:
            raise ValueError(f"params lack {sorted(_path_str(k) for k in missing)}")
        extra = set(flat) - self._required_params
        if extra:
            raise ValueError(f"params hold unknown entries {sorted(_path_str(k) for k in extra)}")
        for p in _trainable(self._spec):
            got = tuple(np.shape(flat[LAYOUT.path(p)]))
            if got != LAYOUT.shape(p):
                raise ValueError(f"{LAYOUT.key(p)} ({p.name}): shape {got}, the spec needs {LAYOUT.shape(p)}")
        return unflatten_dict(flat)

    # --- initialisation ----------------------------------------------------------------------------

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, ...] | None = None, params: Mapping | None = None):
        """Fresh params by the spec's init rules; with ``params``, fill only what they lack.

        Args:
            rng: PRNG key.
            input_shape: unused (params do not depend on it); kept for transformers' signature.
            params: a partial params tree (e.g. from ``from_pretrained(..., _do_init=False)``).

        Returns:
            The complete nested params dict.
        """
        flat = {} if params is None else dict(flatten_dict(dict(params)))
        # The core's spec-driven init (numpy, seeded from the key): no per-shape compilation, and the
        # values a param gets do not depend on which others were loaded; only absent ones are drawn.
        seed = int.from_bytes(np.asarray(jax.random.key_data(rng), np.uint32).tobytes(), "little")
        absent = {p.name for p in _trainable(self._spec) if LAYOUT.path(p) not in flat}
        if absent:
            fresh = random_weights(self._spec, self.config, seed, names=absent)
            for p in _trainable(self._spec):
                if p.name in fresh:
                    flat[LAYOUT.path(p)] = jnp.asarray(LAYOUT.to_stored(p, fresh.pop(p.name)), self.param_dtype)
        self._missing_keys = set()
        return self._checked(unflatten_dict(flat))

    # --- buffers (persistent non-trainable state) ---------------------------------------------------

    @property
    def has_buffers(self) -> bool:
        """Whether the family's spec declares buffers (the ``"buffers"`` collection)."""
        return bool(self._buffer_paths)

    @property
    def buffers(self) -> dict:
        """The ``"buffers"`` collection (nested dict, float32 leaves); empty when the spec has none."""
        return self._buffers

    @buffers.setter
    def buffers(self, buffers: Mapping) -> None:
        self._buffers = self._checked_buffers(buffers)

    def _checked_buffers(self, buffers: Mapping) -> dict:
        """``buffers`` as a nested dict with exactly the spec's buffer paths and shapes."""
        flat = flatten_dict(dict(buffers))
        missing = self._buffer_paths - set(flat)
        if missing:
            raise ValueError(f"buffers lack {sorted(_path_str(k) for k in missing)}")
        extra = set(flat) - self._buffer_paths
        if extra:
            raise ValueError(f"buffers hold unknown entries {sorted(_path_str(k) for k in extra)}")
        for p in _buffer_params(self._spec):
            got = tuple(np.shape(flat[LAYOUT.path(p)]))
            if got != LAYOUT.shape(p):
                raise ValueError(f"{LAYOUT.key(p)} ({p.name}): shape {got}, the spec needs {LAYOUT.shape(p)}")
        return unflatten_dict(flat)

    def init_buffers(self, buffers: Mapping | None = None) -> dict:
        """The spec's initial buffers (its constants, e.g. I-BERT's ``x_min = -1e-5``); with ``buffers``,
        only the absent ones are filled.  Buffers keep their spec dtype (float32) whatever ``dtype``."""
        flat = {} if buffers is None else dict(flatten_dict(dict(buffers)))
        absent = [p for p in _buffer_params(self._spec) if LAYOUT.path(p) not in flat]
        if absent:
            fresh = random_weights(self._spec, self.config, 0, names={p.name for p in absent})
            for p in absent:
                flat[LAYOUT.path(p)] = jnp.asarray(LAYOUT.to_stored(p, fresh[p.name]), np.dtype(p.dtype))
        return self._checked_buffers(unflatten_dict(flat)) if flat else {}

    def gradient_checkpointing_enable(self) -> None:
        """Rematerialise each layer in the backward pass (``nn.remat``); the params are unchanged."""
        self._module = self._module.clone(gradient_checkpointing=True)

    def gradient_checkpointing_disable(self) -> None:
        """Store activations for the backward pass again (the default)."""
        self._module = self._module.clone(gradient_checkpointing=False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the linen module rematerialises its layers."""
        return bool(self._module.gradient_checkpointing)

    def enable_gradient_checkpointing(self) -> None:
        """Alias of :meth:`gradient_checkpointing_enable` (transformers' Flax name)."""
        self.gradient_checkpointing_enable()

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """A zero key/value cache for ``max_length`` positions (decoders; jit-friendly fixed size).

        Returns the ``"cache"`` collection to pass as ``past_key_values``.
        """
        if not (self.decoder_only or self.config.is_decoder) or not self._accepts("init_cache"):
            raise ValueError(
                f"{type(self).__name__}: init_cache needs a decoder class (Model/CausalLM) with config.is_decoder=True"
            )
        key = (batch_size, max_length, jnp.dtype(self.dtype).name)
        shapes = self._cache_shapes.get(key)
        if shapes is None:  # trace the module once per (batch, length, dtype): generate calls this every time
            ids = jnp.ones(key[:2], jnp.int32)
            shapes = jax.eval_shape(
                lambda: self.module.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids), init_cache=True)
            )["cache"]
            self._cache_shapes[key] = shapes
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes))

    def _accepts(self, argument: str) -> bool:
        return argument in _call_arguments(self.module_class)

    # --- forward -----------------------------------------------------------------------------------

    @accepts_encodings
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        params: Mapping | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Mapping | None = None,
        inputs_embeds=None,
        buffers: Mapping | None = None,
        logits_to_keep: int = 0,
    ):
        """Run the module (transformers' Flax call convention).

        Called outside any trace, the first call of a signature (settings, shapes, dtypes) runs op
        by op and later ones run a cached ``jax.jit`` of it (``jit_after_calls``, ``jit_cache_size``,
        :meth:`clear_jit_cache`); inside the user's ``jax.jit`` / ``jax.grad`` it traces as usual.

        Args:
            input_ids: (B, L) int ids ((B, C, L) for multiple choice), or None with ``inputs_embeds``.
            attention_mask: (B, L) 0/1, default ones; with ``past_key_values`` (B, cache_length).
            token_type_ids: (B, L) int, default zeros.
            position_ids: (B, L) int, default ``arange(past, past + L)``.
            head_mask: (heads,) or (layers, heads) multiplier of the attention probabilities.
            encoder_hidden_states: (B, Le, H) for cross-attention (decoders).
            encoder_attention_mask: (B, Le) 0/1, default ones.
            params: params tree to use instead of ``self.params``.
            dropout_rng: PRNG key for dropout (needed with ``train=True``).
            train: dropout on.
            past_key_values: cache from :meth:`init_cache` or a previous call; the updated cache is
                returned in ``past_key_values``.
            inputs_embeds: (B, L, E) embeddings instead of ``input_ids``.
            buffers: the ``"buffers"`` collection to use instead of ``self.buffers`` (families with
                buffers only).  With ``train=True`` such a family updates it (I-BERT calibrates its
                activation ranges) and the call returns ``(output, {"buffers": updated})``, as
                transformers' Flax models return mutable ``batch_stats``.
            logits_to_keep (int): causal LMs only: the LM head on the last this many positions
                (logits (B, min(L, logits_to_keep), V)); 0, the default, keeps all.  A Python int,
                static (part of the compiled signature).
        """
        return self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            head_mask=head_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            params=params,
            dropout_rng=dropout_rng,
            train=train,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            buffers=buffers,
            logits_to_keep=logits_to_keep,
        )

    def _forward(
        self,
        *,
        input_ids,
        attention_mask,
        token_type_ids,
        head_mask,
        encoder_hidden_states,
        encoder_attention_mask,
        params,
        dropout_rng,
        train,
        output_attentions,
        output_hidden_states,
        return_dict,
        past_key_values,
        inputs_embeds,
        position_ids=None,
        buffers: Mapping | None = None,
        logits_to_keep: int = 0,
    ):
        """The shared body of ``__call__``: checks, defaults from the config, ``module.apply``, the cache.

        A family's wrapper whose call convention differs (Nezha: no ``position_ids``) defines its own
        ``__call__`` and calls this.
        """
        c = self.config
        output_attentions = c.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = c.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = c.return_dict if return_dict is None else return_dict
        past_len, cache_len = 0, None
        if past_key_values is not None:
            past_len, cache_len = cache_info(past_key_values)
            if cache_len is None:
                raise InputError("past_key_values holds no cache; build it with init_cache(batch_size, max_length)")
        allowed = {(c.num_attention_heads,), (c.num_hidden_layers, c.num_attention_heads)}
        if head_mask is not None and tuple(np.shape(head_mask)) not in allowed:
            raise InputError(
                f"head_mask must have shape ({c.num_attention_heads},) or ({c.num_hidden_layers}, "
                f"{c.num_attention_heads}), got {tuple(np.shape(head_mask))}"
            )
        # Flax computes the loss outside the model (nezha_zoo.flax.losses): no labels here
        logits_to_keep = check_logits_to_keep(logits_to_keep, has_labels=False)
        if logits_to_keep and not self._accepts("logits_to_keep"):
            raise InputError(f"{type(self).__name__} takes no logits_to_keep (only the causal LMs do)")
        validate_inputs(
            c,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            rank=self.input_rank,
            past_len=past_len,
            cache_length=cache_len,
            embed_width=getattr(c, "embedding_size", c.hidden_size),
            positions=self.has_position_ids,
        )
        ids_inputs = {"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids}
        check_id_dtypes(ids_inputs)  # after the shapes, as in PyTorch and TF

        def as_int(x):
            if isinstance(x, np.ndarray):
                # numpy (a tokenizer's int64): cast on the host and copy once; jnp.asarray(x, int32) runs
                # a device conversion op per input (0.23 against 0.05 ms each, of a 1x16 call's ~48)
                return jnp.asarray(x.astype(np.int32, copy=False))
            return None if x is None else jnp.asarray(x, jnp.int32)

        # self.params carries the LoRA adapter, if any; given params are used as they are (nezha_zoo.flax.lora)
        variables: dict[str, Any] = {"params": self.apply_lora(self.params) if params is None else params}
        if past_key_values is not None:
            variables["cache"] = past_key_values
        mutable = ["cache"] if past_key_values is not None else []
        if self.has_buffers:
            variables[BUFFERS] = self.buffers if buffers is None else buffers
            if train:  # training mode updates the buffers (I-BERT: activation-range calibration)
                mutable.append(BUFFERS)
        elif buffers is not None:
            raise InputError(f"{type(self).__name__} has no buffers; buffers= must be None")
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        extra: dict[str, Any] = {}
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            if not self._accepts("encoder_hidden_states"):
                raise InputError(f"{type(self).__name__} takes no encoder_hidden_states (only Model and CausalLM do)")
            extra["encoder_hidden_states"] = encoder_hidden_states
            extra["encoder_attention_mask"] = as_int(encoder_attention_mask)
        if inputs_embeds is not None:
            extra["inputs_embeds"] = jnp.asarray(inputs_embeds)
        if self._accepts("token_type_ids"):
            extra["token_type_ids"] = as_int(token_type_ids)
        elif token_type_ids is not None:  # MPNet has no token types
            raise InputError(f"{type(self).__name__} takes no token_type_ids")
        if self.has_position_ids:
            extra["position_ids"] = as_int(position_ids)
        elif position_ids is not None:
            raise InputError(f"{type(self).__name__} takes no position_ids (its positions are relative)")
        if self._accepts("head_mask"):
            extra["head_mask"] = None if head_mask is None else jnp.asarray(head_mask, self.dtype)
        elif head_mask is not None:  # MPT has no head mask
            raise InputError(f"{type(self).__name__} takes no head_mask")
        inputs = {"input_ids": as_int(input_ids), "attention_mask": as_int(attention_mask), **extra}
        static = (
            not train,
            bool(output_attentions),
            bool(output_hidden_states),
            bool(return_dict),
            tuple(mutable),
            logits_to_keep,
        )
        out = self._apply(variables, inputs, rngs, static)
        bad = graph_input_checks(c, ids_inputs)  # jit: NaN for bad examples (SPEC §8)
        if not mutable:
            return poison_rows(out, bad)
        out, updated = out
        out = poison_rows(out, bad)
        if BUFFERS in mutable:
            # transformers' Flax convention for mutable state (batch_stats): (output, {collection: tree})
            return out, {BUFFERS: dict(updated[BUFFERS])}
        cache = dict(updated["cache"])
        if return_dict:
            out["past_key_values"] = cache
            return out
        return out[:1] + (cache,) + out[1:]

    def _apply(self, variables: dict, inputs: dict, rngs: dict, static: tuple) -> Any:
        """``module.apply``, through a cached ``jax.jit`` once a call signature repeats (eager calls only).

        ``static`` is ``(deterministic, output_attentions, output_hidden_states, return_dict, mutable,
        logits_to_keep)``; ``logits_to_keep`` reaches the module only when not 0 (other heads lack it).
        A call with a traced argument (inside the user's ``jax.jit`` / ``grad`` / ``vmap``) runs the
        module as it is, into the user's trace.  An eager call runs op by op for the first
        ``jit_after_calls`` calls of its signature (static settings, tree structure, shapes and
        dtypes of params, inputs and rngs); the next one compiles, and later ones run the compiled
        program (the eager op-by-op call of Electra-base at 1x16 is ~5x slower than compiled, half
        of it in Flax's per-parameter shape checks).  A loop over ever new shapes therefore never
        compiles, and at most ``jit_cache_size`` compiled signatures are kept (least recently used
        dropped).  Calls that update buffers (calibration) always run op by op.  The module and the
        config are read when a signature compiles: after changing ``model.config`` in place, call
        :meth:`clear_jit_cache`.
        """
        deterministic, output_attentions, output_hidden_states, return_dict, mutable, logits_to_keep = static
        module = self.module
        keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}

        def apply(variables, inputs, rngs):
            return module.apply(
                variables,
                **inputs,
                **keep,
                deterministic=deterministic,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                rngs=rngs,
                mutable=list(mutable) or False,
            )

        args = (variables, inputs, rngs)
        leaves, treedef = jax.tree_util.tree_flatten(args)
        no_jit = self.jit_after_calls is None or self.jit_cache_size < 1
        # A call that updates buffers (I-BERT's calibration) stays op by op: the calibrated ranges
        # define the integer model, and XLA's fused rounding would move them off PyTorch's and TF's.
        if no_jit or BUFFERS in mutable or any(isinstance(x, jax.core.Tracer) for x in leaves):
            return apply(*args)
        avals = tuple(map(_aval, leaves))
        # packed kernels (nezha_zoo.packing): compiled float32 inference on CPU only; not with an unmerged LoRA
        # adapter, whose merged kernels are new arrays on every call (each would be packed again)
        packing = (
            packed_linear_enabled()
            and jax.default_backend() == "cpu"
            and deterministic
            and self.dtype == jnp.float32
            and _rows(inputs) <= PACKED_MAX_ROWS  # more rows: the plain program, bit for bit
            and (getattr(self, "lora_config", None) is None or self._lora_merged)
        )
        key = (id(module), static, treedef, avals, packing)
        compiled = self._jit_compiled.get(key)
        if compiled is None:
            seen = self._jit_seen.pop(key, 0)
            if seen < self.jit_after_calls:
                self._jit_seen[key] = seen + 1  # most recent last; bounded below
                while len(self._jit_seen) > _JIT_SEEN_SIZE:
                    self._jit_seen.popitem(last=False)
                return apply(*args)
            # the closure holds ``module``: its id cannot be reused while the entry lives
            if packing:
                options = packed_compiler_options()
            elif self._float_inference(deterministic):  # XLA's own dots for many rows (dense_compiler_options)
                options = dense_compiler_options()
            else:
                options = {}
            compiled = jax.jit(apply, compiler_options=options or None)
            self._jit_compiled[key] = compiled
            while len(self._jit_compiled) > self.jit_cache_size:
                self._jit_compiled.popitem(last=False)
        else:
            self._jit_compiled.move_to_end(key)
        if packing:
            variables = {
                **variables,
                PACKED: self._packed_kernels(variables["params"], self._unread_kernels(variables)),
            }
        if deterministic:
            variables = {**variables, **self._inference_collections(variables)}
        return compiled(variables, inputs, rngs)

    def _float_inference(self, deterministic: bool) -> bool:
        """Whether a compiled call is a float32 inference program (not training, bfloat16 or I-BERT's
        integer-only mode): the programs :func:`~nezha_zoo.flax.layers.dense_compiler_options` was
        measured on."""
        return deterministic and self.dtype == jnp.float32 and not getattr(self.config, "quant_mode", False)

    def _inference_collections(self, variables: Mapping) -> dict:
        """Variable collections a compiled deterministic call adds to ``variables``: values the module
        would compute from the params in every forward, computed once per params array outside the
        program (I-BERT's quantized weights); none by default."""
        return {}

    def _unread_kernels(self, variables: Mapping) -> frozenset[tuple[str, ...]]:
        """Params paths of the ``kernel`` leaves whose module never reads the ``"packed"`` collection (its
        product is not a :class:`~nezha_zoo.flax.layers.Dense`), so packing them would only cost memory;
        none by default."""
        return frozenset()

    def _packed_kernels(self, params: Mapping, unread: frozenset[tuple[str, ...]] = frozenset()) -> dict:
        """The ``"packed"`` collection for ``params``: :func:`~nezha_zoo.flax.layers.pack_kernel` of every
        packable ``kernel``, on its params path, except the ``unread`` paths (:meth:`_unread_kernels`).

        A kernel is packed once and its copy kept while the same array is passed (jax arrays are
        immutable, so the copy cannot go stale); a new array (``model.params = ...``, another ``params=``)
        is packed again on its first call and the old copy dropped.
        """
        # Fast path, every call of an unchanged params tree: the same structure and the same leaf
        # objects as the last call (weakly held) give the same collection (Electra-base: 0.1 ms against
        # 1.4 ms for walking the tree by paths).  A new leaf anywhere takes the per-kernel path below.
        leaves, treedef = jax.tree_util.tree_flatten(params)
        last = self._packed_last
        if (
            last is not None
            and last[0] is self._packed
            and last[1] == treedef
            and len(last[2]) == len(leaves)
            and all(ref() is leaf for ref, leaf in zip(last[2], leaves))
        ):
            return last[3]
        kernels = {path: leaf for path, leaf in flatten_dict(dict(params)).items() if path[-1] == "kernel"}
        packed = {path: k for path, k in kernels.items() if path not in unread and packable(k)}
        self._packed = per_array(self._packed, packed, pack_kernel)
        collection = unflatten_dict({path: held[1] for path, held in self._packed.items()})
        refs = [weakref.ref(leaf) if isinstance(leaf, jax.Array) else (lambda: None) for leaf in leaves]
        self._packed_last = (self._packed, treedef, refs, collection)
        return collection

    def clear_jit_cache(self) -> None:
        """Drop the compiled calls, the call counts of :meth:`__call__` (see ``jit_after_calls``) and the
        packed kernels (:func:`nezha_zoo.packing.set_packed_linear`)."""
        self._jit_compiled.clear()
        self._jit_seen.clear()
        self._packed = {}
        self._packed_last = None

    # --- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        config: PretrainedConfig | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = None,
        input_shape: tuple[int, ...] = (1, 1),
        seed: int = 0,
        _do_init: bool = True,
        strict: bool = False,
        output_loading_info: bool = False,
        gradient_checkpointing: bool = False,
        ignore_mismatched_sizes: bool = False,
        **config_overrides: Any,
    ):
        """Load a transformers-layout checkpoint directory (safetensors, sharded, or ``pytorch_model.bin``).

        Params are read straight from the file in pieces into their final buffers, in ``param_dtype``
        (default ``dtype``; None/float32, bfloat16 or float16, whatever the checkpoint's dtype), and
        the model computes in ``dtype``: no random init first, no
        ``module.init``, no second copy of the weights.  A base checkpoint loads into a head class
        and vice versa.  Missing params are initialised by the spec (``_do_init=True``) or
        left for ``init_weights(rng, shape, params)`` (``_do_init=False``, transformers' behaviour).
        A shape mismatch raises naming the tensor, unless ``ignore_mismatched_sizes``: then the param
        is treated as missing (initialised afresh) and logged with both shapes -- a new head on a
        pretrained body.  ``strict`` also raises on missing/unexpected keys.  Other keywords must be
        config fields (``num_labels=3``), else ``TypeError``.

        Returns:
            ``model`` (``_do_init=True``) or ``(model, params)`` (``_do_init=False``); with
            ``output_loading_info`` the dict ``{"missing_keys", "unexpected_keys", "mismatched_keys"}``
            is appended.
        """
        cfg = resolve_config(
            cls.family, pretrained_model_name_or_path, config, f"{cls.__name__}.from_pretrained", **config_overrides
        )
        model = cls(
            cfg,
            input_shape=input_shape,
            seed=seed,
            dtype=dtype,
            _do_init=False,
            gradient_checkpointing=gradient_checkpointing,
            param_dtype=param_dtype,
        )
        spec = model.spec
        target = np.dtype(model.param_dtype)
        flat: dict[tuple[str, ...], Any] = {}

        def dtype_of(name: str) -> np.dtype:
            # buffers (quantization state) keep their spec dtype whatever the model's dtype
            p = spec[name]
            return np.dtype(p.dtype) if LAYOUT.collection_of(p) == BUFFERS else target

        def write(name: str, index: tuple[slice, ...], piece: np.ndarray) -> None:
            p = spec[name]
            path = LAYOUT.path(p)
            buf = flat.get(path)
            if buf is None:
                shape, dt = LAYOUT.shape(p), dtype_of(name)
                big = int(np.prod(shape, dtype=np.int64)) * dt.itemsize > CHUNK_BYTES
                # A large tensor is filled in place on the device (a donated update per piece), so
                # it never exists twice; a small one is assembled in numpy and copied once.
                buf = flat[path] = jnp.zeros(shape, dt) if big else np.empty(shape, dt)
            if isinstance(buf, np.ndarray):
                buf[index] = piece
            else:
                axis = next((i for i, sl in enumerate(index) if sl != slice(None)), 0)
                start = (index[axis].start or 0) if index else 0
                # Wait for each update: queued ones would each keep their piece alive meanwhile.
                flat[path] = _update_in_place(buf, piece, start, axis).block_until_ready()

        def done(name: str) -> None:
            path = LAYOUT.path(spec[name])
            if isinstance(flat[path], np.ndarray):
                flat[path] = jnp.asarray(flat[path])

        plan = load_weights(
            pretrained_model_name_or_path,
            spec,
            cls.family,
            LAYOUT,
            None,
            model_name=cls.__name__,
            strict=strict,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            write=write,
            dtype_of=dtype_of,
            done=done,
        )
        loaded_buffers = {k: flat.pop(k) for k in list(flat) if k in model._buffer_paths}
        model._buffers = model.init_buffers(unflatten_dict(loaded_buffers) if loaded_buffers else None)
        params = unflatten_dict(flat) if flat else {}
        missing = model._required_params - set(flat)
        if _do_init:
            model._is_initialized = True
            model.params = model.init_weights(model.key, input_shape, params)
            result: tuple = (model,)
        else:
            model._missing_keys = missing
            result = (model, params)
        if output_loading_info:
            result += (plan.info(),)
        return result[0] if len(result) == 1 else result

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        params: Mapping | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        buffers: Mapping | None = None,
    ) -> list[str]:
        """Write ``config.json`` + ``model.safetensors`` in transformers' PyTorch names and layout.

        Tensors are written in the params' dtype, one at a time (no full copy of the params).  A family
        with buffers also writes them (``buffers``, default ``self.buffers``) under their state-dict names.
        """
        flat = flatten_dict(dict(self.params if params is None else params))
        if self.has_buffers:
            flat.update(flatten_dict(dict(self._checked_buffers(self.buffers if buffers is None else buffers))))

        def arrays():
            for p in _trainable(self._spec) + _buffer_params(self._spec):
                path = LAYOUT.path(p)
                if path not in flat:
                    raise ValueError(f"params lack {LAYOUT.key(p)} ({p.name})")
                # The params' own dtype (bfloat16 stays bfloat16); one tensor at a time.
                yield p.name, LAYOUT.from_stored(p, np.asarray(flat[path]))

        return save_weights(save_directory, self.config, self._spec, self.family, arrays(), max_shard_size)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, params: Mapping | None = None
    ) -> dict:
        """Give the vocabulary ``new_num_tokens`` rows (the same rule in every backend).

        Old rows are kept, new ones drawn by the spec's init rule; an untied output projection and
        LM biases are resized too (a tied head reads the embedding, so it follows);
        ``config.vocab_size`` is updated.

        Args:
            new_num_tokens: the new vocabulary size (None: keep it, only pad).
            pad_to_multiple_of: round the size up to a multiple of this.
            params: the params to resize (default and then replaced: ``self.params``).

        Returns:
            dict: the resized params (also stored in ``self.params`` when ``params`` is None).
        """
        flat = dict(flatten_dict(dict(self.params if params is None else params)))
        spec = self._spec
        n = self.config.vocab_size if new_num_tokens is None else new_num_tokens

        def old(name: str) -> np.ndarray:
            return LAYOUT.from_stored(spec[name], np.asarray(flat[LAYOUT.path(spec[name])], np.float32))

        new_config, new_spec, arrays = resized_vocab(self.config, self.family, self.head, n, old, pad_to_multiple_of)
        for name, arr in arrays.items():
            flat[LAYOUT.path(new_spec[name])] = jnp.asarray(LAYOUT.to_stored(new_spec[name], arr), self.param_dtype)
        self._config.vocab_size = new_config.vocab_size  # in place, as transformers (the module reads it)
        self._spec = new_spec
        self._params_shape_tree = spec_params_shape(new_spec, self.param_dtype)
        resized = self._checked(unflatten_dict(flat))
        if params is None:
            self._params = resized
        return resized

    def num_parameters(self) -> int:
        return self._spec.num_parameters(trainable_only=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


_JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _update_in_place(buf: jax.Array, piece: Any, start: int, axis: int) -> jax.Array:
    """``buf`` with ``piece`` written at ``start`` along ``axis``; ``buf``'s memory is reused (donated)."""
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.asarray(piece, buf.dtype), start, axis=axis)


def cache_info(cache: Mapping | None) -> tuple[int, int | None]:
    """``(filled length, max length)`` of a key/value cache; the fill is 0 when traced, None: no cache."""
    if not cache:
        return 0, None
    from nezha_zoo.flax.layers import cache_index

    idx = _concrete(cache_index({"cache": cache}))
    return (int(idx) if idx is not None else 0), _cache_length(cache)


def _cache_length(cache: Mapping) -> int | None:
    """Max length of a cache built by ``init_cache`` (time axis of the first ``cached_key``)."""
    from nezha_zoo.flax.layers import cache_length

    return cache_length({"cache": cache})


# --- helpers the families' head modules and wrappers share ------------------------------------------


def finish_output(out_cls: type[ModelOutput], return_dict: bool, **fields):
    """``out_cls(**fields)``, or its tuple of non-None fields with ``return_dict=False``."""
    out = out_cls(**fields)
    return out if return_dict else out.to_tuple()


def backbone_fields(out: ModelOutput) -> dict:
    """The fields a head passes through from its base model: ``hidden_states`` and ``attentions``."""
    return {"hidden_states": out.hidden_states, "attentions": out.attentions}


#: Keyword arguments a head module forwards to its base module, when the head's ``__call__`` has them.
FORWARDED_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "head_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "inputs_embeds",
    "init_cache",
    "deterministic",
    "output_attentions",
    "output_hidden_states",
)


def forwarded_inputs(scope: Mapping[str, Any]) -> dict:
    """The base module's keyword arguments out of a head's ``locals()`` (heads lack some of them)."""
    return {k: scope[k] for k in FORWARDED_INPUTS if k in scope}


def flatten_choices(
    kwargs: dict,
    names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds"),
) -> dict:
    """Multiple choice: every input in ``names`` from (B, C, L[, E]) to (B * C, L[, E]), in place."""
    for name in names:
        x = kwargs.get(name)
        if x is not None:
            kwargs[name] = x.reshape((-1,) + x.shape[2:])  # (B, C, L[, E]) -> (B * C, L[, E])
    return kwargs


class FlaxHeadModule(nn.Module):
    """Base of a family's head modules: shared fields and the base-model submodule.

    Subclasses set ``backbone_class`` (the family's base linen module) and ``backbone_name`` (its
    PyTorch attribute name, e.g. ``electra``, ``nezha``), and may override ``_backbone_options``.  A
    head's compact ``__call__`` keeps its explicit signature and returns :meth:`_head_output` (or one
    of the shared bodies :meth:`_token_classification`, :meth:`_question_answering`,
    :meth:`_multiple_choice`) on its ``locals()``.
    """

    config: Any
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    backbone_class: ClassVar[type[nn.Module]]
    backbone_name: ClassVar[str]

    def _backbone(self, options: Mapping[str, Any] | None = None, **kwargs):
        """Create and run the base module inside the subclass's compact ``__call__``.

        ``options`` are extra constructor fields (Nezha's ``add_pooling_layer``).  Returns
        ``(base module, its output with return_dict=True)``.
        """
        base = self.backbone_class(
            self.config,
            dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            name=self.backbone_name,
            **dict(options or {}),
        )
        kwargs["return_dict"] = True
        return base, base(**kwargs)

    def _backbone_options(self) -> dict:
        """Extra constructor fields of the base module for this head (default none); families override."""
        return {}

    def _pooled_positions(self, scope: Mapping[str, Any], last_index: Any = None) -> jax.Array | None:
        """A sequence-level head's ``positions_to_keep`` (issue #23, :mod:`nezha_zoo.spec.pooling`).

        Args:
            scope (Mapping[str, Any]): the head's ``__call__`` arguments (its ``locals()``).
            last_index (int32 array (N,) | int | None): the position each row's head reads, for the
                family's :data:`~nezha_zoo.spec.pooling.LAST_NON_PAD` rule (MPT; the int -1: the last
                position); unused for ``FIRST``.

        Returns:
            int32 array (N, 1) or None.  N counts every row the base module runs (multiple choice: B * C):
            zeros for :data:`~nezha_zoo.spec.pooling.FIRST`, ``last_index`` for ``LAST_NON_PAD``.  None
            (every position) when :func:`~nezha_zoo.spec.pooling.keeps_positions` forbids it (hidden
            states, attentions, a cache, I-BERT's quant mode).
        """
        cache = bool(scope.get("init_cache")) or bool(self.variables.get("cache"))  # Flax's cache: a collection
        if not keeps_positions(scope, self.config, cache=cache):
            return None
        ids, embeds = scope["input_ids"], scope.get("inputs_embeds")
        shape = ids.shape if ids is not None else embeds.shape[:-1]
        batch, length = math.prod(shape[:-1]), shape[-1]
        if family_of_config(self.config).pooling == FIRST:
            return jnp.zeros((batch, 1), jnp.int32)
        if last_index is None:
            return None
        index = jnp.asarray(length - 1 if isinstance(last_index, int) and last_index < 0 else last_index, jnp.int32)
        return jnp.broadcast_to(index.reshape(-1, 1), (batch, 1))

    def _head_output(
        self,
        scope: Mapping[str, Any],
        out_cls: type[ModelOutput],
        head_fn,
        choices: bool = False,
        positions_to_keep: jax.Array | None = None,
    ):
        """The shared body of a head's compact ``__call__``: base module, head, output object.

        Args:
            scope: the head's ``locals()`` (its call arguments).
            out_cls: the output class; ``hidden_states`` and ``attentions`` come from the base output.
            head_fn: ``(base module, base output) -> dict`` of the head's own output fields; layers it
                creates sit directly on this module.
            choices (bool): multiple choice: inputs (B, C, L[, E]) run flattened as (B * C, L[, E]).
            positions_to_keep: (B, R) int (B * C rows with ``choices``) from :meth:`_pooled_positions`:
                the base model's last layer computes only these rows, and ``last_hidden_state`` is
                (B, R, H); None (default) computes every position.

        Returns:
            ``out_cls`` (``return_dict``) or its tuple of non-None fields.
        """
        kwargs = forwarded_inputs(scope)
        if choices:
            kwargs = flatten_choices(kwargs)
        if positions_to_keep is not None:
            kwargs["positions_to_keep"] = positions_to_keep
        base, out = self._backbone(self._backbone_options(), **kwargs)
        return finish_output(out_cls, scope["return_dict"], **head_fn(base, out), **backbone_fields(out))

    def _token_classification(self, scope: Mapping[str, Any]):
        """Dropout + ``classifier`` on the last hidden states -> ``TokenClassifierOutput`` logits (B, L, labels)."""

        def head(_, out):
            return {"logits": token_classifier(self.config, out.last_hidden_state, scope["deterministic"], self.dtype)}

        return self._head_output(scope, TokenClassifierOutput, head)

    def _question_answering(self, scope: Mapping[str, Any]):
        """``qa_outputs`` -> ``QuestionAnsweringModelOutput`` ``start_logits`` (B, L), ``end_logits`` (B, L)."""

        def head(_, out):
            start, end = qa_head(self.config, out.last_hidden_state, self.dtype)
            return {"start_logits": start, "end_logits": end}

        return self._head_output(scope, QuestionAnsweringModelOutput, head)

    def _multiple_choice(self, scope: Mapping[str, Any], pool, pooled: bool = False):
        """Multiple choice: ``pool`` each flattened choice, ``classifier`` (H -> 1) -> logits (B, C).

        ``pool``: base output -> (B * C, H), e.g. dropout on the pooler output.  Hidden states and
        attentions are returned flattened to (B * C, ...), as transformers does.  ``pooled``: ``pool``
        reads only the pooled position of the last layer, which then computes only that row where it may
        (:meth:`_pooled_positions`); False (default): every position.
        """
        ids = scope["input_ids"]
        num_choices = (ids if ids is not None else scope["inputs_embeds"]).shape[1]

        def head(_, out):
            logits = dense(1, "classifier", self.config, self.dtype)(pool(out))
            return {"logits": logits.reshape(-1, num_choices)}  # (B * C, 1) -> (B, C)

        keep = self._pooled_positions(scope) if pooled else None
        return self._head_output(scope, MultipleChoiceModelOutput, head, choices=True, positions_to_keep=keep)
