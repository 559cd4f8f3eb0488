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
from collections.abc import Callable, Iterator
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
from nezha_zoo.io.shards import DEFAULT_MAX_SHARD_SIZE
from nezha_zoo.outputs import OUTPUT_CLASSES, ModelOutput
from nezha_zoo.pretrained import load_weights, resolve_config, save_weights
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import Init, ModelSpec
from nezha_zoo.spec.registry import Family, register_model_class

__all__ = [
    "TFPreTrainedModel",
    "unpack_inputs",
    "register_outputs",
    "variable_key",
    "KERAS_LAYOUT",
    "dtype_policy_scope",
]

logger = logging.getLogger("nezha_zoo")

KERAS_LAYOUT = LAYOUTS["keras"]


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
    argument order, or a dict keyed by argument name (what ``model.fit`` passes).  Keyword arguments
    work as usual.  Numpy arrays become tensors.  Unknown dict keys are logged and ignored.
    """
    sig = inspect.signature(call)
    names = [n for n in sig.parameters if n != "self"]
    main = names[0]

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind_partial(self, *args, **kwargs).arguments
        bound.pop("self")
        first = bound.get(main)
        if isinstance(first, ModelOutput) or not isinstance(first, (dict, list, tuple)):
            packed = None
        else:
            packed = first
        if packed is not None:
            bound.pop(main)
            if isinstance(packed, dict):
                unknown = [k for k in packed if k not in names]
                if unknown:
                    logger.warning("%s ignores unknown inputs %s", type(self).__name__, unknown)
                items = {k: v for k, v in packed.items() if k in names}
            else:
                if len(packed) > len(names):
                    raise TypeError(f"{type(self).__name__} takes at most {len(names)} inputs, got {len(packed)}")
                items = dict(zip(names, packed))
            for k, v in items.items():
                if k in bound and bound[k] is not None and k != "training":
                    raise TypeError(f"{k!r} given both in the packed inputs and as an argument")
                bound[k] = v
        bound = {k: _to_tensor(v) for k, v in bound.items()}
        return call(self, **bound)

    return wrapper


def variable_key(variable: keras.Variable) -> str:
    """A Keras variable's key in ``LAYOUTS["keras"]``: its path minus the model's own name."""
    return variable.path.split("/", 1)[1]


# --- dtype ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def dtype_policy_scope(dtype: Any) -> Iterator[str]:
    """Make ``dtype`` (None/"float32" or "bfloat16", any spelling) Keras' default dtype policy inside.

    Every layer created in the scope takes it (variables and compute in that dtype) unless it is given
    a dtype of its own; Keras keeps the default per thread.  Yields the canonical dtype name.
    """
    canon = canonical_dtype(dtype)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(canon)
    try:
        yield canon
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
    for layer in model._flatten_layers(include_self=False):
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
    """Run a model class's ``__init__`` under the dtype policy of its ``dtype=`` argument."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        with dtype_policy_scope(kwargs.get("dtype")):
            init(self, *args, **kwargs)

    wrapper._dtype_scoped = True  # type: ignore[attr-defined]
    return wrapper


# --- base model ----------------------------------------------------------------------------------


class TFPreTrainedModel(keras.Model):
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
        dtype (str | tf.DType | None): weights and compute dtype: None/``"float32"`` or
            ``"bfloat16"``.  Every layer built by the model's constructor (a family's own layers
            included) gets it through Keras' dtype policy; see :func:`dtype_policy_scope`.
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
        canon = canonical_dtype(dtype)
        super().__init__(name=name or _snake(type(self).__name__), dtype=canon, **kwargs)
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

    def _base_call(self, call_args: dict[str, Any], flatten: Callable[[Any], Any] | None = None):
        """Run the base layer on a head's own ``call`` arguments (pass ``locals()``).

        Only the names the base layer's ``call`` takes are forwarded (labels, ``return_dict`` and other
        locals are dropped), so each head keeps its explicit transformers signature without writing
        the dozen keyword arguments out.  ``flatten`` (multiple choice: ``flatten_choices``) maps the
        per-token inputs (B, C, L[, E]) -> (B*C, L[, E]); ``head_mask`` and the flags pass unchanged.
        """
        base = getattr(self, self.base_model_prefix)
        accepted = inspect.signature(type(base).call).parameters
        inputs = {k: v for k, v in call_args.items() if k in accepted and k not in ("self", "gradient_checkpointing")}
        if flatten is not None:
            inputs.update({k: flatten(inputs[k]) for k in _PER_TOKEN_INPUTS if k in inputs})
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

    def variables_by_key(self) -> dict[str, keras.Variable]:
        """Every weight, keyed by its ``LAYOUTS["keras"]`` key."""
        return {variable_key(v): v for v in self.weights}

    def _matched(self) -> Iterator[tuple[Any, keras.Variable]]:
        by_key = self.variables_by_key()
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
        **overrides: Any,
    ):
        """Build the model from ``path`` (``config.json`` + any supported weight file).

        Args:
            path: a directory written by transformers (PyTorch) or by any nezha_zoo backend.
            config: use this config instead of ``path/config.json``.
            strict: raise on missing or unexpected tensors (shape mismatches always raise).
            output_loading_info: also return ``{"missing_keys", "unexpected_keys", "mismatched_keys"}``.
            dtype: weights and compute dtype, None/``"float32"`` or ``"bfloat16"`` (or ``tf.bfloat16``);
                a checkpoint of either dtype loads into either.
            **overrides: config fields to change (e.g. ``num_labels=3``).

        Variables are created in ``dtype`` and filled piece by piece straight from the file (sliced
        assignments), without the spec's random init and without a second copy of any weight.
        """
        cfg = resolve_config(cls.family, path, config, **overrides)
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
            write=write,
            dtype_of=lambda name: numpy_dtype(variables[name].dtype),
            done=done,
        )
        if plan.missing_keys:
            model.init_weights(model._init_seed, names=set(plan.missing_keys))
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
