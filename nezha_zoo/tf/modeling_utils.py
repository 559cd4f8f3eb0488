"""Base class of every Keras 3 model of the zoo: checkpoints, input conventions, ``fit`` integration.

Checkpoint logic lives in :mod:`nezha_zoo.pretrained`; this module only maps spec params to Keras
variables through ``LAYOUTS["keras"]`` (``variable.path`` minus the model's own first component).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import numpy as np
import optree
import tensorflow as tf

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"nezha_zoo.tf needs Keras' TensorFlow backend, but KERAS_BACKEND is {keras.backend.backend()!r}; "
        "set KERAS_BACKEND=tensorflow before importing keras"
    )

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.dtypes import canonical_dtype, numpy_dtype
from nezha_zoo.inputs import NON_MODEL_INPUTS, merge_encoding
from nezha_zoo.io.shards import DEFAULT_MAX_SHARD_SIZE
from nezha_zoo.outputs import OUTPUT_CLASSES, ModelOutput
from nezha_zoo.pretrained import load_weights, resized_vocab, resolve_config, save_weights
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import Init, Kind, ModelSpec
from nezha_zoo.spec.pooling import FIRST, keeps_positions
from nezha_zoo.spec.registry import Family, register_model_class
from nezha_zoo.tf.layers import Dense, graph_input_checks, poison_rows, sublayers
from nezha_zoo.tf.lora import LoraMixin, is_lora_key
from nezha_zoo.validation import ID_INPUTS, InputError

__all__ = [
    "TFPreTrainedModel",
    "unpack_inputs",
    "register_outputs",
    "variable_key",
    "KERAS_LAYOUT",
    "dtype_policy_scope",
    "resolve_dtype_policy",
    "MIXED_POLICIES",
]

logger = logging.getLogger("nezha_zoo")

KERAS_LAYOUT = LAYOUTS["keras"]

#: The package name every model class is registered under with Keras (``"nezha_zoo>TFElectraModel"``).
KERAS_PACKAGE = "nezha_zoo"


# --- output classes through Keras' tree utilities (optree, namespace "keras") ----------------------


def _flatten_output(out: ModelOutput):
    keys = tuple(out.keys())
    return tuple(out.values()), keys, keys


def _unflatten_output(cls: type[ModelOutput]) -> Callable[[Any, Any], ModelOutput]:
    def unflatten(keys, values):
        return cls(zip(keys, values))

    return unflatten


def register_outputs() -> None:
    """Make nezha_zoo output classes nested structures for Keras (``predict`` concatenates fields).

    ``tf.nest`` already treats them as mappings (they are ``OrderedDict`` subclasses whose
    constructor accepts key/value pairs); Keras 3 uses optree, which needs exact-type registration.
    """
    for cls in (ModelOutput, *OUTPUT_CLASSES):
        try:
            optree.register_pytree_node(cls, _flatten_output, _unflatten_output(cls), namespace="keras")
        except ValueError:  # already registered (module re-imported)
            pass


register_outputs()


# --- input conventions --------------------------------------------------------------------------


def _to_tensor(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return tf.convert_to_tensor(v)
    return v


def unpack_inputs(call: Callable) -> Callable:
    """Decorator giving ``call`` transformers' TF input conventions.

    The first argument may hold every input: a single tensor (``input_ids``), a list/tuple in
    argument order, or a Mapping keyed by argument name (what ``model.fit`` passes; a tokenizer's
    ``BatchEncoding``).  Keyword arguments work as usual.  Numpy arrays become tensors.  Keys are
    handled by :func:`nezha_zoo.inputs.merge_encoding`: tokenizer-only keys (``offset_mapping``...)
    are dropped, other unknown keys raise ``TypeError``.
    """
    sig = inspect.signature(call)
    names = [n for n in sig.parameters if n != "self"]
    main = names[0]

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in names or k not in NON_MODEL_INPUTS}
        bound = sig.bind_partial(self, *args, **kwargs).arguments
        bound.pop("self")
        first = bound.get(main)
        if isinstance(first, (list, tuple)) and not isinstance(first, ModelOutput):
            bound.pop(main)
            if len(first) > len(names):
                raise TypeError(f"{type(self).__name__} takes at most {len(names)} inputs, got {len(first)}")
            for k, v in zip(names, first):
                if k in bound and bound[k] is not None and k != "training":
                    raise TypeError(f"{k!r} given both in the packed inputs and as an argument")
                bound[k] = v
        else:
            merge_encoding(type(self).__name__, names, main, bound)
        bound = {k: _to_tensor(v) for k, v in bound.items()}
        return _checked_call(call, self, bound)

    return wrapper


def _checked_call(call: Callable, model: Any, inputs: dict[str, Any]):
    """``call(model, **inputs)`` under SPEC §6 when traced (``tf.function``, XLA): the value asserts of
    :func:`~nezha_zoo.tf.layers.graph_input_checks`, and NaN for the examples they flag (what XLA, which
    drops asserts, returns instead of an error).  Shapes, dtypes and concrete (eager) values are checked
    by the model's ``validate_inputs``."""
    config = getattr(model, "config", None)
    if tf.executing_eagerly() or config is None:
        return call(model, **inputs)
    inputs, bad = graph_input_checks(config, inputs)
    return poison_rows(call(model, **inputs), bad)


_OWN_SUBJECTS = "|".join([name for name, _, _ in ID_INPUTS] + ["attention_mask", "sequence "])
#: The text of a failed assert of graph_input_checks: "assertion failed: [<message>] <values>".
_OWN_ASSERT = re.compile(rf"assertion failed: \[((?:{_OWN_SUBJECTS})[^\]]*)\]([^\n]*)")


def checked(fn: Callable) -> Callable:
    """``tf.function(fn)`` whose model calls raise :class:`InputError` for bad inputs instead of NaN.

    Under XLA (``jit_compile=True``) the input asserts are dropped and a bad example's outputs are NaN
    (docs/bad_input.md); ``checked`` runs ``fn`` as a graph without XLA, where the asserts of
    :func:`~nezha_zoo.tf.layers.graph_input_checks` run, and raises their failure as
    :class:`InputError`.  The same spelling exists in ``nezha_zoo.flax`` (``checkify``).

    Args:
        fn: a function calling a model (``lambda ids: model(ids)``), or a ``tf.function`` of one
            (its Python function is run without XLA).

    Returns:
        A function with ``fn``'s arguments and outputs.
    """
    inner = getattr(fn, "python_function", fn)
    graph = tf.function(inner, jit_compile=False)

    @functools.wraps(inner)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return graph(*args, **kwargs)
        except tf.errors.InvalidArgumentError as e:
            own = _OWN_ASSERT.search(e.message)
            if own is None:
                raise
            raise InputError((own.group(1) + own.group(2)).strip()) from None

    return run


def variable_key(variable: keras.Variable) -> str:
    """A Keras variable's key in ``LAYOUTS["keras"]``: its path minus the model's own name."""
    return variable.path.split("/", 1)[1]


# --- dtype ---------------------------------------------------------------------------------------


#: Keras mixed-precision policies a model accepts: float32 variables, compute in the low dtype.
MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")


def resolve_dtype_policy(dtype: Any) -> str:
    """The Keras dtype policy name a model runs under: ``"float32"``, ``"bfloat16"``, ``"float16"`` or a mixed one.

    Args:
        dtype: ``None`` (Keras' global policy, ``keras.mixed_precision.set_global_policy``), a
            :data:`MIXED_POLICIES` name or ``keras.DTypePolicy``, or any spelling of float32 /
            bfloat16 / float16 that :func:`~nezha_zoo.dtypes.canonical_dtype` accepts.

    Raises:
        ValueError: an unsupported dtype or policy (float64, quantized policies...),
            also when it is the global policy.
        TypeError: something that is not a dtype.
    """
    if dtype is None:
        policy = keras.config.dtype_policy()
        if policy.name in MIXED_POLICIES:
            return policy.name
        try:
            return canonical_dtype(policy.name)
        except ValueError:
            raise ValueError(
                f"Keras' global dtype policy {policy.name!r} is not supported; models run in float32, bfloat16, "
                f"float16, {' or '.join(MIXED_POLICIES)} "
                "(keras.mixed_precision.set_global_policy or the dtype= argument)"
            ) from None
    name = getattr(dtype, "name", dtype) if isinstance(dtype, keras.DTypePolicy) else dtype
    if isinstance(name, str) and name.strip().lower() in MIXED_POLICIES:
        return name.strip().lower()
    try:
        return canonical_dtype(name)
    except ValueError:
        raise ValueError(
            f"dtype={dtype!r} is not supported; models run in float32, bfloat16, float16, {' or '.join(MIXED_POLICIES)}"
        ) from None


@contextlib.contextmanager
def dtype_policy_scope(dtype: Any) -> Iterator[str]:
    """Make ``dtype``'s policy (see :func:`resolve_dtype_policy`) Keras' default dtype policy inside.

    Every layer created in the scope takes it (variables in the policy's variable dtype, compute in
    its compute dtype) unless it is given a dtype of its own; Keras keeps the default per thread.
    ``None`` keeps the global policy.  Yields the policy name.
    """
    policy = resolve_dtype_policy(dtype)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield policy
    finally:
        keras.config.set_dtype_policy(previous)


class _Uninitialized(keras.initializers.Initializer):
    """Allocates a variable's memory without writing it: ``from_pretrained`` assigns every value next.

    Untouched pages cost no resident memory, so creating a variable this way holds no second copy of
    it (a random initializer builds the whole value, then the variable copies it) and computes nothing.
    """

    def __call__(self, shape, dtype=None):
        return tf.raw_ops.Empty(shape=shape, dtype=tf.as_dtype(dtype or "float32"), init=False)


_INITIALIZER_ATTRS = ("kernel_initializer", "bias_initializer", "embeddings_initializer")
_INITIALIZER_ATTRS += ("gamma_initializer", "beta_initializer")


@contextlib.contextmanager
def _uninitialized_variables(model: keras.Layer) -> Iterator[None]:
    """While building ``model``, its layers' initializers allocate without initialising (restored after)."""
    saved = []
    for layer in sublayers(model):
        for attr in _INITIALIZER_ATTRS:
            if getattr(layer, attr, None) is not None:
                saved.append((layer, attr, getattr(layer, attr)))
                setattr(layer, attr, _Uninitialized())
    try:
        yield
    finally:
        for layer, attr, value in saved:
            setattr(layer, attr, value)


def _scoped_init(init: Callable) -> Callable:
    """Run a model class's ``__init__`` under the dtype policy of its ``dtype=`` argument.

    The outermost constructor call also records its arguments for :meth:`TFPreTrainedModel.get_config`.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if "_init_arguments" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs).arguments
            bound.pop(next(iter(signature.parameters)))  # self
            varkw = next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
            bound.update(bound.pop(varkw, {}))
            # Plain data, kept out of Keras' attribute tracking.
            self.__dict__["_init_arguments"] = bound
        with dtype_policy_scope(kwargs.get("dtype")):
            init(self, *args, **kwargs)

    wrapper._dtype_scoped = True  # type: ignore[attr-defined]
    return wrapper


# --- base model ----------------------------------------------------------------------------------


class TFPreTrainedModel(LoraMixin, keras.Model):
    """Base of every TF model: spec-driven variables, ``from_pretrained``/``save_pretrained``, ``fit``.

    Subclasses set ``family`` (a :class:`~nezha_zoo.spec.registry.Family`), ``head`` (``"Model"``,
    ``"ForMaskedLM"``...), ``label_names`` (the ``call`` arguments that are labels),
    ``base_model_prefix`` (the base layer's attribute name in head classes),
    ``cross_attention_heads`` (heads whose ``call`` takes ``encoder_hidden_states``) and implement
    ``_dummy_inputs``.

    Args:
        config (PretrainedConfig): the family config.
        seed (int | None): seed of the spec-driven initialisation (normal(0, initializer_range),
            zeros, ones, zeroed padding row); ``None`` draws a fresh one.
        gradient_checkpointing (bool): recompute each encoder layer in the backward pass
            (``tf.recompute_grad``); same gradients, less activation memory.
        name (str | None): Keras name of the model (the first component of every variable path).
        dtype (str | tf.DType | keras.DTypePolicy | None): weights and compute dtype:
            ``"float32"`` or ``"bfloat16"``, or a Keras mixed policy (``"mixed_float16"``,
            ``"mixed_bfloat16"``: float32 variables, compute in the low dtype; ``compile`` adds loss
            scaling for float16).  None follows Keras' global policy.  Every layer built by the
            model's constructor (a family's own layers included) gets it through Keras' dtype
            policy; see :func:`dtype_policy_scope`.

    Keras lifecycle: every subclass is registered with Keras (package ``"nezha_zoo"``), and
    :meth:`get_config` carries the model config as a plain dict, so ``model.save("x.keras")`` /
    ``keras.models.load_model``, ``ModelCheckpoint`` and ``keras.models.clone_model`` work without
    ``custom_objects``.
    """

    family: Family
    head: str = "Model"
    label_names: tuple[str, ...] = ()
    config_class: type[PretrainedConfig]
    base_model_prefix: str = ""
    cross_attention_heads: tuple[str, ...] = ("Model",)

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        seed: int | None = None,
        gradient_checkpointing: bool = False,
        name: str | None = None,
        dtype: Any = None,
        _skip_init: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        policy = resolve_dtype_policy(dtype)
        super().__init__(name=name or _snake(type(self).__name__), dtype=policy, **kwargs)
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self._init_seed = seed
        # from_pretrained fills every variable from the checkpoint: no spec init to compute first.
        self._skip_init = _skip_init

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each class's own constructor runs in its dtype's policy scope, so sub-layers created there
        # (by shared blocks or a family's own layers) take the model's dtype without passing it on.
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_dtype_scoped", False):
            cls.__init__ = _scoped_init(init)
        register_model_class(cls, "tf")
        # load_model / clone_model find the class by this name, without custom_objects.
        keras.saving.register_keras_serializable(package=KERAS_PACKAGE, name=cls.__name__)(cls)

    # -- Keras serialization -----------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """Everything :meth:`from_config` needs to rebuild this model (JSON-ready).

        ``"config"`` is the model config as a plain dict (``config.json``'s layout); the other keys
        are the constructor's arguments (``seed``, ``add_pooling_layer``...), ``name``, ``dtype``
        (the dtype policy's name) and ``trainable``.  The weights are not in it.
        """
        arguments = dict(self.__dict__.get("_init_arguments", {}))
        for internal in ("config", "_skip_init"):
            arguments.pop(internal, None)
        arguments.update(
            config=self.config.to_dict(),
            name=self.name,
            dtype=self.dtype_policy.name,
            trainable=self.trainable,
            gradient_checkpointing=bool(self.gradient_checkpointing),
        )
        return arguments

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None):
        """A new model (spec-initialised weights) from :meth:`get_config`'s dict.

        Raises:
            ValueError: ``config`` has no ``"config"`` entry (the model config).
        """
        config = dict(config)
        if "config" not in config:
            raise ValueError(f"{cls.__name__}.from_config needs the model config under 'config', got {sorted(config)}")
        model_config = config.pop("config")
        if not isinstance(model_config, PretrainedConfig):
            model_config = cls.config_class.from_dict(model_config)
        return cls(model_config, **config)

    def summary(self, *args: Any, **kwargs: Any) -> None:
        """Keras' ``summary`` (same arguments), with every layer's output shape for inputs of any
        batch size and length: ``(None, None, hidden)`` rather than ``?``."""
        self._record_output_shapes()
        return super().summary(*args, **kwargs)

    def _record_output_shapes(self) -> None:
        """Trace one call on (batch, length)-dynamic inputs; give each sub-layer the static shape of
        its (first) output as ``output_shape``, where Keras' summary reads it.

        Subclassed layers have no symbolic output Keras could show; tracing once costs no compute.
        """
        specs = {}
        for key, value in self._dummy_inputs().items():
            value = tf.convert_to_tensor(value)
            shape = [None] * value.shape.rank
            if value.dtype.is_floating:  # encoder_hidden_states (B, L, H): the width is fixed
                shape[-1] = value.shape[-1]
            specs[key] = tf.TensorSpec(shape, value.dtype, name=key)
        shapes: dict[int, tuple] = {}

        def recording(layer: keras.Layer, call: Callable) -> Callable:
            @functools.wraps(call)
            def wrapped(*args, **kwargs):
                out = call(*args, **kwargs)
                first = next((t for t in tf.nest.flatten(out) if hasattr(t, "shape")), None)
                if first is not None:
                    shapes.setdefault(id(layer), tuple(first.shape.as_list()))
                return out

            return wrapped

        layers = sublayers(self)
        for layer in layers:  # an instance attribute wins over the class's call (Keras calls self.call)
            layer.__dict__["call"] = recording(layer, layer.call)
        try:
            tf.function(lambda inputs: self(**inputs, training=False)).get_concrete_function(specs)
        finally:
            for layer in layers:
                del layer.__dict__["call"]
        for layer in layers:
            if id(layer) in shapes:
                layer.__dict__["output_shape"] = shapes[id(layer)]
                # Built without input shapes (Dropout): summary would print "?".  Keras's summary tests this private
                # attribute itself, and its only public writer, build(), would build the layer again.
                if not layer._build_shapes_dict:
                    layer._build_shapes_dict = {"output_shape": shapes[id(layer)]}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Keras only sees through plain dicts: a tokenizer's BatchEncoding (ours, a dict subclass, or
        # transformers', a UserDict) becomes one before Keras checks the positional inputs; Keras binds
        # keywords to ``call``'s signature itself, so tokenizer-only keys are dropped here.
        if args and isinstance(args[0], Mapping) and not isinstance(args[0], ModelOutput):
            args = (dict(args[0]), *args[1:])
        kwargs = {k: v for k, v in kwargs.items() if k not in NON_MODEL_INPUTS}
        return super().__call__(*args, **kwargs)

    # -- construction ------------------------------------------------------------------------------

    def _dummy_inputs(self) -> dict[str, Any]:
        raise NotImplementedError

    def _finish_init(self) -> None:
        """Create every variable (one call on dummy inputs) and initialise them as the spec says."""
        with _uninitialized_variables(self) if self._skip_init else contextlib.nullcontext():
            self(**self._dummy_inputs(), training=False)
            with keras.name_scope(self.name):  # same variable paths as inside the model's own call
                self._build_unused()
        if not self._skip_init:
            self.init_weights(self._init_seed)

    def _build_unused(self) -> None:
        """Build sub-layers the dummy call does not reach: the cross-attention of a decoder config in
        a head class that takes no encoder states (transformers still declares and loads those weights)."""
        if self.config.add_cross_attention and self.head not in self.cross_attention_heads:
            states = tf.zeros((1, 2, self.config.hidden_size))
            getattr(self, self.base_model_prefix)(input_ids=tf.constant([[2, 3]]), encoder_hidden_states=states)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        """An empty fixed-size key/value cache for a BERT-style decoder (``config.is_decoder``).

        One :class:`~nezha_zoo.tf.cache.KVCache` per layer, key/value (batch_size, heads, max_length,
        head_dim) zeros in the model's compute dtype, index 0.  Pass it as ``past_key_values`` with
        ``use_cache=True`` and an ``attention_mask`` of width ``max_length`` (1 = a token written
        before or now, 0 = padding or an empty slot); shapes never change, so decoding steps compile.
        Families with their own attention layout (MPT) override this.

        Args:
            batch_size (int): rows.
            max_length (int): slots (prompt + new tokens), at most the model's maximum length.

        Raises:
            ValueError: not a decoder config, a non-positive size, or ``max_length`` too long.
        """
        from nezha_zoo.tf.cache import init_kv_cache

        cfg = self.config
        if not getattr(cfg, "is_decoder", False):
            raise ValueError(f"{type(self).__name__}: init_cache needs config.is_decoder=True")
        for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"init_cache: {arg} must be a positive int, got {value!r}")
        base = getattr(self, self.base_model_prefix, self) if self.base_model_prefix else self
        if getattr(base, "limits_length", True):
            limit = getattr(base, "max_sequence_length", None) or cfg.max_position_embeddings
            if max_length > limit:
                raise ValueError(f"init_cache: max_length {max_length} exceeds the model's maximum length {limit}")
        heads = cfg.num_attention_heads
        dtype = tf.as_dtype(self.compute_dtype or "float32")
        return tuple(
            init_kv_cache(int(batch_size), heads, int(max_length), cfg.hidden_size // heads, dtype)
            for _ in range(cfg.num_hidden_layers)
        )

    def _finish(self, output: ModelOutput, return_dict: bool | None):
        """The output object, or ``output.to_tuple()`` when ``return_dict`` (else the config's) is False."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _base(self, **inputs):
        """Run the base layer (``self.<base_model_prefix>``) of a head class."""
        return getattr(self, self.base_model_prefix)(gradient_checkpointing=self.gradient_checkpointing, **inputs)

    def _pooled_positions(self, call_args: dict[str, Any], last_index: Any = None) -> tf.Tensor | None:
        """A sequence-level head's ``positions_to_keep`` (issue #23, :mod:`nezha_zoo.spec.pooling`).

        Args:
            call_args (dict[str, Any]): the head's ``call`` arguments (its ``locals()``).
            last_index (int tensor (N,) | None): the position each row's head reads, for the family's
                :data:`~nezha_zoo.spec.pooling.LAST_NON_PAD` rule (MPT); unused for ``FIRST``.

        Returns:
            int32 tensor (N, 1) or None.  N counts every row the base layer runs (multiple choice: B * C):
            zeros for :data:`~nezha_zoo.spec.pooling.FIRST`, ``last_index`` for ``LAST_NON_PAD``.  None
            (every position) when :func:`~nezha_zoo.spec.pooling.keeps_positions` forbids it (hidden
            states, attentions, a cache, cross-attention, I-BERT's quant mode) or there is no input (the
            base layer reports it).
        """
        if not keeps_positions(call_args, self.config):
            return None
        if self.family.pooling != FIRST:
            return None if last_index is None else tf.cast(last_index, tf.int32)[:, None]  # (N,) -> (N, 1)
        ref, embeds = call_args.get("input_ids"), call_args.get("inputs_embeds")
        ref = embeds if ref is None else ref
        if ref is None:
            return None
        lead_dims = 2 if ref is embeds else 1  # (..., L[, E])
        rows = tf.reduce_prod(tf.shape(ref)[: len(ref.shape) - lead_dims])
        return tf.zeros(tf.stack([rows, 1]), tf.int32)  # (N, 1): position 0

    def _base_call(
        self,
        call_args: dict[str, Any],
        flatten: Callable[[Any], Any] | None = None,
        pooled: bool = False,
        positions_to_keep: Any = None,
    ):
        """Run the base layer on a head's own ``call`` arguments (pass ``locals()``).

        Only the names the base layer's ``call`` takes are forwarded (labels, ``return_dict`` and other
        locals are dropped), so each head keeps its explicit transformers signature without writing
        the dozen keyword arguments out.  ``flatten`` (multiple choice: ``flatten_choices``) maps the
        per-token inputs (B, C, L[, E]) -> (B*C, L[, E]); ``head_mask`` and the flags pass unchanged.

        ``pooled`` (a head that reads one position per row, ``family.pooling``): the last layer computes
        only :meth:`_pooled_positions` where they are not None (``last_hidden_state`` (N, 1, H)); a head
        that builds its own passes ``positions_to_keep`` ((N, R) int or None) instead.
        """
        base = getattr(self, self.base_model_prefix)
        accepted = inspect.signature(type(base).call).parameters
        inputs = {k: v for k, v in call_args.items() if k in accepted and k not in ("self", "gradient_checkpointing")}
        if flatten is not None:
            inputs.update({k: flatten(inputs[k]) for k in _PER_TOKEN_INPUTS if k in inputs})
        if pooled:
            positions_to_keep = self._pooled_positions(call_args)
        if positions_to_keep is not None:
            inputs["positions_to_keep"] = positions_to_keep
        return self._base(**inputs)

    @property
    def spec(self) -> ModelSpec:
        """The declaration of this class for its current config."""
        return self.family.model_spec(self.config, self.head)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each encoder layer in the backward pass (as the ``gradient_checkpointing``
        constructor argument); a ``tf.function`` traced before keeps its old choice."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Store activations for the backward pass again (the default)."""
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether encoder layers are recomputed in the backward pass."""
        return bool(self.gradient_checkpointing)

    def drop_packed_weights(self) -> None:
        """Mark every packed kernel copy stale (:meth:`nezha_zoo.tf.layers.Dense.drop_packed_weight`): the next
        packed call packs again.  ``set_weights``, ``load_weights`` and LoRA merges call it; needed only after
        a write its fingerprint cannot see (see :class:`~nezha_zoo.tf.layers.Dense`)."""
        for layer in sublayers(self):
            if isinstance(layer, Dense):
                layer.drop_packed_weight()

    def set_weights(self, weights: list) -> None:
        """Keras' ``set_weights``, then :meth:`drop_packed_weights`."""
        super().set_weights(weights)
        self.drop_packed_weights()

    def load_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras' ``load_weights``, then :meth:`drop_packed_weights`."""
        out = super().load_weights(filepath, *args, **kwargs)
        self.drop_packed_weights()
        return out

    def variables_by_key(self) -> dict[str, keras.Variable]:
        """Every weight, keyed by its ``LAYOUTS["keras"]`` key."""
        return {variable_key(v): v for v in self.weights}

    def _matched(self) -> Iterator[tuple[Any, keras.Variable]]:
        by_key = {k: v for k, v in self.variables_by_key().items() if not is_lora_key(k)}  # adapter: not spec
        spec = self.spec
        want = {KERAS_LAYOUT.key(p) for p in spec}
        if set(by_key) != want:
            raise RuntimeError(
                f"{type(self).__name__}: variables differ from the spec; extra {sorted(set(by_key) - want)}, "
                f"missing {sorted(want - set(by_key))}"
            )
        for p in spec:
            yield p, by_key[KERAS_LAYOUT.key(p)]

    def init_weights(self, seed: int | None = None, names: set[str] | None = None) -> None:
        """(Re)initialise every variable (or those of the params ``names``) from its spec ``Init`` rule."""
        rng = np.random.default_rng(seed)
        std = float(self.config.initializer_range)
        for p, var in self._matched():
            if names is not None and p.name not in names:
                continue
            shape = KERAS_LAYOUT.shape(p)
            if p.init is Init.NORMAL:
                value = rng.normal(0.0, std, size=p.shape).astype(np.float32)
                if p.padding_idx is not None:
                    value[p.padding_idx] = 0.0
                value = KERAS_LAYOUT.to_stored(p, value)
            else:
                value = np.full(shape, p.fill_value, np.float32)
            var.assign(value)

    def _submodule(self, path: str) -> Any:
        """The layer at a canonical (PyTorch) module path: the layer attributes mirror its names."""
        obj: Any = self
        for part in path.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj

    def get_input_embeddings(self) -> keras.layers.Layer:
        """The word-embedding layer (``keras.layers.Embedding``), as the PyTorch models' method."""
        for p in self.spec:
            if p.kind is Kind.EMBEDDING and p.axes[0] == "vocab":
                return self._submodule(p.module)
        raise AttributeError(f"{type(self).__name__} has no vocabulary embedding")

    def get_output_embeddings(self) -> keras.layers.Layer | None:
        """The projection onto the vocabulary (an LM head's decoder or tied output), or None."""
        spec = self.spec
        for alias in spec.ties:
            return self._submodule(alias.rpartition(".")[0])
        for p in spec:
            if p.kind is not Kind.EMBEDDING and p.axes and p.axes[0] == "vocab" and len(p.shape) == 2:
                return self._submodule(p.module)
        return None

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None
    ) -> keras.Variable:
        """Give the vocabulary ``new_num_tokens`` rows (the same rule in every backend).

        Old rows are kept, new ones drawn by the spec's init rule; an untied output projection and
        LM biases are resized too (a tied head reads the embedding, so it follows);
        ``config.vocab_size`` is updated.

        Args:
            new_num_tokens: the new vocabulary size (None: keep it, only pad).
            pad_to_multiple_of: round the size up to a multiple of this.

        Returns:
            keras.Variable: the new word-embedding matrix (V', E).
        """
        spec = self.spec
        variables = {p.name: var for p, var in self._matched()}
        n = self.config.vocab_size if new_num_tokens is None else new_num_tokens

        def old(name: str) -> np.ndarray:
            return KERAS_LAYOUT.from_stored(spec[name], np.asarray(variables[name].numpy(), np.float32))

        new_config, new_spec, arrays = resized_vocab(self.config, self.family, self.head, n, old, pad_to_multiple_of)
        for name, arr in arrays.items():
            var = variables[name]
            value = KERAS_LAYOUT.to_stored(new_spec[name], arr).astype(numpy_dtype(var.dtype))
            # A Keras variable's shape is fixed: give it a new backing tf.Variable (same name, dtype,
            # trainability), so every layer and optimizer slot keyed by the variable keeps working.
            # No public API: assign() requires the old shape, and a new keras.Variable would be unknown to them.
            var._shape = tuple(value.shape)
            var._initialize(value)
        size = new_config.vocab_size
        self.config.vocab_size = size
        for layer in sublayers(self):  # size attributes read at build time
            if isinstance(layer, keras.layers.Embedding) and any(var is layer.embeddings for var in variables.values()):
                layer.input_dim = size
            elif hasattr(layer, "vocab_size"):
                layer.vocab_size = size
        self.__dict__.pop("_nz_generate_fns", None)  # traced decoding loops captured the old variables
        return next(variables[p.name] for p in new_spec if p.kind is Kind.EMBEDDING and p.axes[0] == "vocab")

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: PretrainedConfig | None = None,
        strict: bool = False,
        output_loading_info: bool = False,
        gradient_checkpointing: bool = False,
        dtype: Any = None,
        ignore_mismatched_sizes: bool = False,
        **overrides: Any,
    ):
        """Build the model from ``path`` (``config.json`` + any supported weight file).

        Args:
            path: a directory written by transformers (PyTorch) or by any nezha_zoo backend.
            config: use this config instead of ``path/config.json``.
            strict: raise on missing or unexpected tensors (shape mismatches raise unless
                ``ignore_mismatched_sizes``).
            output_loading_info: also return ``{"missing_keys", "unexpected_keys", "mismatched_keys"}``.
            dtype: weights and compute dtype, None/``"float32"``, ``"bfloat16"`` or ``"float16"`` (or a ``tf.DType``);
                a checkpoint of either dtype loads into either.
            ignore_mismatched_sizes: initialise afresh (by the spec) every weight whose checkpoint
                shape differs, logging each with both shapes, instead of raising (a new head).
            **overrides: config fields to change (e.g. ``num_labels=3``); anything else raises
                ``TypeError`` (see :data:`nezha_zoo.pretrained.LOADER_HINTS`).

        Variables are created in ``dtype`` and filled piece by piece straight from the file (sliced
        assignments), without the spec's random init and without a second copy of any weight.
        """
        cfg = resolve_config(cls.family, path, config, f"{cls.__name__}.from_pretrained", **overrides)
        model = cls(cfg, gradient_checkpointing=gradient_checkpointing, dtype=dtype, _skip_init=True)
        variables = {p.name: var for p, var in model._matched()}

        # Under a tf.distribute strategy the variables are mirrored (one copy per replica) and have
        # no single handle to write through: stage each tensor and assign it whole, once.
        staged: dict[str, np.ndarray] = {}
        sliced: set[str] = set()
        mirrored = tf.distribute.has_strategy()

        def write(name: str, index: tuple[slice, ...], piece: np.ndarray) -> None:
            var = variables[name]
            if all(sl == slice(None) for sl in index):
                var.assign(piece)
                return
            if mirrored:
                if name not in staged:
                    staged[name] = np.empty(tuple(var.shape), piece.dtype)
                staged[name][index] = piece
                return
            # In place, straight through the handle: slicing the variable first would read it, and a
            # read value shares its buffer, making the update copy the whole variable each time.
            shape = var.shape
            begin = [sl.start or 0 for sl in index]
            end = [shape[i] if sl.stop is None else sl.stop for i, sl in enumerate(index)]
            tf.raw_ops.ResourceStridedSliceAssign(
                ref=var.value.handle, begin=begin, end=end, strides=[1] * len(index), value=piece
            )
            sliced.add(name)

        def done(name: str) -> None:
            if name in staged:
                variables[name].assign(staged.pop(name))
            if name in sliced:
                # A sliced write puts the variable in TF's copy-on-read mode for good: every later
                # read would copy the whole tensor (an embedding table per forward pass, ~70 ms for
                # Electra's).  Nothing else holds its buffer now, so reads can share it again.
                tf.raw_ops.DisableCopyOnRead(resource=variables[name].value.handle)

        plan = load_weights(
            path,
            model.spec,
            cls.family,
            KERAS_LAYOUT,
            None,
            type(model).__name__,
            strict=strict,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            write=write,
            dtype_of=lambda name: numpy_dtype(variables[name].dtype),
            done=done,
        )
        if plan.fresh_keys:
            model.init_weights(model._init_seed, names=set(plan.fresh_keys))
        if output_loading_info:
            return model, plan.info()
        return model

    def canonical_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every param as ``(canonical name, canonical numpy array)`` in the variables' dtype, one at a time."""
        for p, var in self._matched():
            yield p.name, KERAS_LAYOUT.from_stored(p, np.asarray(var.numpy()))

    def save_pretrained(
        self, directory: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> list[str]:
        """Write ``config.json`` + ``model.safetensors`` in transformers' PyTorch names and layout."""
        return save_weights(directory, self.config, self.spec, self.family, self.canonical_weights(), max_shard_size)

    # -- serving export (nezha_zoo/tf/export.py) ---------------------------------------------------

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' ``export``; a SavedModel without ``input_signature`` serves the model's default
        signature: integer ``input_ids``/``attention_mask`` (``token_type_ids`` where used), every
        axis dynamic (see :func:`nezha_zoo.spec.serving.serving_signature`)."""
        if format == "tf_saved_model" and input_signature is None and not kwargs:
            from nezha_zoo.tf.export import export_saved_model

            return export_saved_model(self, filepath, verbose=verbose)
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    @functools.cached_property
    def _default_save_signature(self):
        """``tf.saved_model.save``'s ``serving_default``: the same integer-id signature as ``export``.

        TF looks for a ``tf.function`` attribute of this name on the saved object (Keras 3 defines a
        plain method there, so a Keras model saved that way has no signature at all); cached so every
        look-up during one save sees the same function.
        """
        from nezha_zoo.tf.export import serving_function

        return serving_function(self)

    # -- Keras training integration ----------------------------------------------------------------

    def _merge_labels(self, data: Any) -> tuple[Any, Any]:
        """``(x_with_labels, sample_weight)`` from a batch: labels inside x, or given as y."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            return x, sample_weight
        if not isinstance(x, dict):
            x = {"input_ids": x}
        x = dict(x)
        if isinstance(y, dict):
            x.update(y)
        elif isinstance(y, (list, tuple)):
            x.update(zip(self.label_names, y))
        else:
            x[self.label_names[0]] = y
        return x, sample_weight

    def make_train_function(self, force: bool = False) -> Callable:
        """Keras' train function, with the optimizer's state created first, eagerly.

        Without a distribution strategy Keras 3 creates the optimizer's variables inside the first
        trace of its train step; a ``tf.function`` that creates variables is traced a second time
        on its next call and keeps both graphs, which costs resident memory in every later step
        (``docs/benchmarks/train.md``, session 11).  Built here, the step traces once.  Every model
        variable exists from construction (:meth:`_finish_init`; LoRA adds its own eagerly), so the
        trainable variables are the ones Keras would build the optimizer with.
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built and self.built:
            with self.distribute_strategy.scope():  # where Keras' own symbolic build creates them
                optimizer.build(self.trainable_variables)
        return super().make_train_function(force)

    def train_step(self, data):
        if self._compile_loss is not None:  # a Keras loss was compiled in: the standard (x, y) path
            return super().train_step(data)
        x, sample_weight = self._merge_labels(data)
        return super().train_step((x, None, sample_weight))

    def test_step(self, data):
        if self._compile_loss is not None:
            return super().test_step(data)
        x, sample_weight = self._merge_labels(data)
        return super().test_step((x, None, sample_weight))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Compiled metrics see the labels and the head's first non-loss output (e.g. ``logits``)."""
        if y is None and isinstance(x, dict) and len(self.label_names) == 1:
            y = x.get(self.label_names[0])
        if isinstance(y_pred, dict):
            y_pred = next((v for k, v in y_pred.items() if k != "loss"), None)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The model's internal loss (labels in the inputs); a compiled Keras loss if one was given."""
        if self._compile_loss is not None and y is not None:
            pred = next(v for k, v in y_pred.items() if k != "loss") if isinstance(y_pred, dict) else y_pred
            return super().compute_loss(x, y, pred, sample_weight, training)
        if not isinstance(y_pred, dict) or "loss" not in y_pred:
            raise ValueError(
                f"{type(self).__name__}: no loss to train on; put the labels ({', '.join(self.label_names)}) "
                "in the input dict or pass them as y"
            )
        loss = tf.reduce_mean(y_pred["loss"])
        # Under tf.distribute each replica's gradient is summed across replicas: scale the replica's
        # loss by 1/replicas, as Keras does for its own compiled losses (the loss metric unscales).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            loss = loss / tf.cast(replicas, loss.dtype)
        for extra in self.losses:  # add_loss / regulariser terms, as Keras' own compute_loss adds them
            loss = loss + self._aggregate_additional_loss(extra)
        return loss


_PER_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and (not name[i - 1].isupper() or (i + 1 < len(name) and name[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)
