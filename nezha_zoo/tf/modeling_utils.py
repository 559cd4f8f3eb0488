"""Base class of every Keras 3 model of the zoo: checkpoints, input conventions, ``fit`` integration.

Checkpoint logic lives in :mod:`nezha_zoo.modeling`; this module only maps spec params to Keras
variables through ``LAYOUTS["keras"]`` (``variable.path`` minus the model's own first component).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import optree  # noqa: E402
import tensorflow as tf  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"nezha_zoo.tf needs Keras' TensorFlow backend, but KERAS_BACKEND is {keras.backend.backend()!r}; "
        "set KERAS_BACKEND=tensorflow before importing keras"
    )

from nezha_zoo.checkpoint import DEFAULT_MAX_SHARD_SIZE  # noqa: E402
from nezha_zoo.config import PretrainedConfig  # noqa: E402
from nezha_zoo.modeling import load_weights, resolve_config, save_weights  # noqa: E402
from nezha_zoo.outputs import OUTPUT_CLASSES, ModelOutput  # noqa: E402
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.spec.param import Init, ModelSpec  # noqa: E402
from nezha_zoo.spec.registry import Family  # noqa: E402

__all__ = ["TFPreTrainedModel", "unpack_inputs", "register_outputs", "variable_key", "KERAS_LAYOUT"]

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
        **kwargs: Any,
    ) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        super().__init__(name=name or _snake(type(self).__name__), **kwargs)
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self._init_seed = seed

    # -- construction ------------------------------------------------------------------------------

    def _dummy_inputs(self) -> dict[str, Any]:
        raise NotImplementedError

    def _finish_init(self) -> None:
        """Create every variable (one call on dummy inputs) and initialise them as the spec says."""
        self(**self._dummy_inputs(), training=False)
        with keras.name_scope(self.name):  # same variable paths as inside the model's own call
            self._build_unused()
        self.init_weights(self._init_seed)

    def _build_unused(self) -> None:
        """Build sub-layers the dummy call does not reach: the cross-attention of a decoder config in
        a head class that takes no encoder states (transformers still declares and loads those weights)."""
        if self.config.add_cross_attention and self.head not in self.cross_attention_heads:
            states = tf.zeros((1, 2, self.config.hidden_size))
            getattr(self, self.base_model_prefix)(input_ids=tf.constant([[2, 3]]), encoder_hidden_states=states)

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
        return self.family.model_spec(self.config, self.head)

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

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise every variable from its spec ``Init`` rule."""
        rng = np.random.default_rng(seed)
        std = float(self.config.initializer_range)
        for p, var in self._matched():
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
        **overrides: Any,
    ):
        """Build the model from ``path`` (``config.json`` + any supported weight file).

        Args:
            path: a directory written by transformers (PyTorch) or by any nezha_zoo backend.
            config: use this config instead of ``path/config.json``.
            strict: raise on missing or unexpected tensors (shape mismatches always raise).
            output_loading_info: also return ``{"missing_keys", "unexpected_keys", "mismatched_keys"}``.
            **overrides: config fields to change (e.g. ``num_labels=3``).
        """
        cfg = resolve_config(cls.family, path, config, **overrides)
        model = cls(cfg, gradient_checkpointing=gradient_checkpointing)
        variables = {p.name: var for p, var in model._matched()}

        def assign(name: str, stored: np.ndarray) -> None:
            variables[name].assign(stored)

        plan = load_weights(path, model.spec, cls.family, KERAS_LAYOUT, assign, type(model).__name__, strict=strict)
        if output_loading_info:
            return model, plan.info()
        return model

    def canonical_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every param as ``(canonical name, canonical numpy array)``."""
        for p, var in self._matched():
            yield p.name, KERAS_LAYOUT.from_stored(p, np.asarray(var.numpy()))

    def save_pretrained(
        self, directory: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> list[str]:
        """Write ``config.json`` + ``model.safetensors`` in transformers' PyTorch names and layout."""
        return save_weights(directory, self.config, self.spec, self.family, self.canonical_weights(), max_shard_size)

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
