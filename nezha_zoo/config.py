"""Framework-neutral configuration classes.

Every family config is a :class:`PretrainedConfig` subclass that declares its fields once, in the
order of transformers' constructor signature, with their defaults and validators.  ``config.json``
files are read and written in transformers' format: a file written by transformers loads here, a
file written here loads in transformers, and keys this project does not know are kept and written
back unchanged.

Only the standard library is imported here.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from nezha_zoo.io.atomic import atomic_write_text

__all__ = [
    "CONFIG_NAME",
    "Field",
    "PretrainedConfig",
    "ACTIVATIONS",
    "classifier_dropout_rate",
]

CONFIG_NAME = "config.json"

#: Activation names every backend implements (transformers' ACT2FN spelling).
ACTIVATIONS = ("gelu", "relu", "silu", "swish", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "tanh", "sigmoid")

#: Version of transformers whose config format and numerics this project follows.
TRANSFORMERS_VERSION = "4.57.6"

Validator = Callable[[Any], "str | None"]


# --- validators: each returns an error message, or None when the value is fine -------------------


def positive_int(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        return f"must be a positive integer, got {v!r}"
    return None


def non_negative_int(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return f"must be a non-negative integer, got {v!r}"
    return None


def optional_int(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        return f"must be an integer or None, got {v!r}"
    return None


def probability(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        return f"must be a probability in [0, 1], got {v!r}"
    return None


def optional_probability(v: Any) -> str | None:
    return None if v is None else probability(v)


def positive_float(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return f"must be a positive number, got {v!r}"
    return None


def optional_positive_float(v: Any) -> str | None:
    return None if v is None else positive_float(v)


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be a bool, got {v!r}"


def one_of(*choices: Any) -> Validator:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {list(choices)}, got {v!r}"

    return check


def activation(v: Any) -> str | None:
    return None if v in ACTIVATIONS else f"must be one of {list(ACTIVATIONS)}, got {v!r}"


def anything(v: Any) -> str | None:
    return None


def string(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, got {v!r}"


# --- cross-field checks shared by the families: each raises ValueError naming the field -----------


def check_divisible(config: PretrainedConfig, field: str, by: str) -> None:
    """Raise ``ValueError`` unless ``config.<field>`` is a multiple of ``config.<by>``.

    Args:
        config (PretrainedConfig): the config to check.
        field (str): the dividend field, e.g. ``"hidden_size"``.
        by (str): the divisor field, e.g. ``"num_attention_heads"``.
    """
    value, divisor = getattr(config, field), getattr(config, by)
    if value % divisor:
        raise ValueError(f"{type(config).__name__}.{field} ({value}) must be divisible by {by} ({divisor})")


def check_index(config: PretrainedConfig, field: str, size_field: str, required: bool = False) -> None:
    """Raise ``ValueError`` unless ``config.<field>`` indexes a table of ``config.<size_field>`` rows.

    Args:
        config (PretrainedConfig): the config to check.
        field (str): the index field, e.g. ``"pad_token_id"``.
        size_field (str): the field holding the table size, e.g. ``"vocab_size"``.
        required (bool): whether ``None`` is refused too.
    """
    value, size = getattr(config, field), getattr(config, size_field)
    if value is None:
        if required:
            raise ValueError(f"{type(config).__name__}.{field} must be set (an integer in [0, {size_field}))")
        return
    if not 0 <= value < size:
        raise ValueError(f"{type(config).__name__}.{field} ({value}) must lie in [0, {size_field}={size})")


@dataclass(frozen=True)
class Field:
    """One documented configuration field: its name, default and validator."""

    name: str
    default: Any
    check: Validator = anything
    doc: str = ""


#: Fields transformers' ``PretrainedConfig`` gives every family and that change behaviour here.
COMMON_FIELDS: tuple[Field, ...] = (
    Field("is_decoder", False, boolean, "Use the model as a decoder (causal self-attention)."),
    Field("add_cross_attention", False, boolean, "Add cross-attention layers (needs is_decoder)."),
    Field("tie_word_embeddings", True, boolean, "Tie the output projection to the input embedding."),
    Field(
        "problem_type",
        None,
        one_of(None, "regression", "single_label_classification", "multi_label_classification"),
        "Sequence-classification loss; inferred from num_labels and the label dtype when None.",
    ),
    Field("output_attentions", False, boolean, "Return attention probabilities by default."),
    Field("output_hidden_states", False, boolean, "Return all hidden states by default."),
    Field("return_dict", True, boolean, "Return output objects (True) or tuples (False) by default."),
    Field("architectures", None, anything, "Class names this checkpoint was saved from."),
    Field("pad_token_id", None, optional_int, "Padding token id (families that document it declare their own)."),
    Field("bos_token_id", None, optional_int, "Beginning-of-sequence token id."),
    Field("eos_token_id", None, optional_int, "End-of-sequence token id."),
)


class PretrainedConfig:
    """Base class of every family config.

    Subclasses set ``model_type`` and ``fields`` (their documented arguments, in signature order).
    Construction accepts those fields positionally or by keyword, plus the common fields, plus
    ``num_labels``/``id2label``/``label2id``; any other keyword is kept verbatim in ``extra`` and
    written back by :meth:`to_dict`.  Every value is validated; a bad one raises ``ValueError``
    naming the field.
    """

    model_type: ClassVar[str] = ""
    fields: ClassVar[tuple[Field, ...]] = ()
    #: transformers-style aliases, e.g. MPT's ``hidden_size -> d_model``.
    attribute_map: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = [f.name for f in cls.fields]
        if len(set(names)) != len(names):
            raise TypeError(f"{cls.__name__}.fields declares a name twice: {names}")
        if "__init__" in cls.__dict__:
            return  # a hand-written constructor documents itself
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [
            inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default) for f in cls.fields
        ]
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        parent_init = cls.__init__

        # Each class gets its own constructor object so that its signature (shown by help() and
        # inspect.signature) lists its own fields; setting it on the shared base __init__ would
        # make every family show the signature of the last one defined.
        def __init__(self: PretrainedConfig, *args: Any, **kw: Any) -> None:
            parent_init(self, *args, **kw)

        __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        __init__.__doc__ = cls.__doc__
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        cls.__init__ = __init__  # type: ignore[method-assign]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self.fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self.fields)} positional arguments")
        values: dict[str, Any] = {}
        for f, v in zip(self.fields, args):
            values[f.name] = v
        for alias, target in self.attribute_map.items():
            if alias in kwargs:
                if target in kwargs:
                    raise ValueError(f"{alias!r} and {target!r} name the same field; give only one")
                kwargs[target] = kwargs.pop(alias)
        for f in self.fields:
            if f.name in kwargs:
                if f.name in values:
                    raise TypeError(f"{type(self).__name__} got multiple values for {f.name!r}")
                values[f.name] = kwargs.pop(f.name)
        for f in self.fields:
            setattr(self, f.name, copy.deepcopy(values.get(f.name, f.default)))
        for f in self._common_fields():
            setattr(self, f.name, copy.deepcopy(kwargs.pop(f.name, f.default)))
        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        if id2label is None:
            n = 2 if num_labels is None else num_labels
            err = positive_int(n)
            if err:
                raise ValueError(f"{type(self).__name__}.num_labels {err}")
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        else:
            try:
                id2label = {int(k): str(v) for k, v in dict(id2label).items()}
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"{type(self).__name__}.id2label must map integer ids to label names, got {id2label!r}"
                ) from e
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(
                    f"{type(self).__name__}.num_labels={num_labels} disagrees with id2label ({len(id2label)} labels)"
                )
        self.id2label = id2label
        try:
            self.label2id = (
                {str(k): int(v) for k, v in dict(label2id).items()} if label2id else {v: k for k, v in id2label.items()}
            )
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{type(self).__name__}.label2id must map label names to integer ids, got {label2id!r}"
            ) from e
        # transformers bookkeeping keys that carry no meaning here are preserved like any unknown key.
        # (A private copy: later edits of the caller's nested values do not leak into the config.)
        self.extra: dict[str, Any] = copy.deepcopy(kwargs)
        self.__post_init__()
        self.validate()

    # --- hooks for subclasses ---------------------------------------------------------------------

    def __post_init__(self) -> None:
        """Normalise nested values (e.g. MPT's ``attn_config``) before validation."""

    def check(self) -> None:
        """Cross-field checks of a family; raise ``ValueError`` naming the field."""

    @classmethod
    def _common_fields(cls) -> tuple[Field, ...]:
        """The common fields this family does not declare itself (its own declaration wins)."""
        own = {f.name for f in cls.fields}
        return tuple(f for f in COMMON_FIELDS if f.name not in own)

    # --- validation --------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first invalid one."""
        for f in (*self.fields, *self._common_fields()):
            err = f.check(getattr(self, f.name))
            if err:
                raise ValueError(f"{type(self).__name__}.{f.name} {err}")
        if self.add_cross_attention and not self.is_decoder:
            raise ValueError(f"{type(self).__name__}.add_cross_attention requires is_decoder=True")
        self.check()

    # --- attribute aliases -------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: resolve transformers-style aliases.
        # Unknown config.json keys read like attributes, as in transformers (e.g. Electra's optional
        # ``summary_first_dropout``).
        amap = type(self).attribute_map
        if name in amap:
            return getattr(self, amap[name])
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        name = type(self).attribute_map.get(name, name)
        object.__setattr__(self, name, value)

    # --- labels ------------------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        err = positive_int(n)
        if err:
            raise ValueError(f"{type(self).__name__}.num_labels {err}")
        if n != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def max_input_length(self) -> int | None:
        """Longest input (cached positions included) the model takes; None: any length.

        Default: ``max_position_embeddings`` (absolute positions ``0 .. L - 1``); families with other
        position schemes override it.  The input checks of every backend use it (SPEC.md §6).
        """
        return getattr(self, "max_position_embeddings", None)

    # --- (de)serialisation -------------------------------------------------------------------------

    def field_dict(self) -> dict[str, Any]:
        """The family's documented fields only, with their current values."""
        return {f.name: getattr(self, f.name) for f in self.fields}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in transformers' ``config.json`` layout (unknown keys included)."""
        out: dict[str, Any] = {}
        out.update(copy.deepcopy(self.extra))
        for f in self.fields:
            out[f.name] = _jsonable(getattr(self, f.name))
        for f in self._common_fields():
            out[f.name] = _jsonable(getattr(self, f.name))
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = dict(self.label2id)
        out["model_type"] = self.model_type
        out.setdefault("transformers_version", TRANSFORMERS_VERSION)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> PretrainedConfig:
        """Build from a ``config.json`` dict; ``overrides`` replace values from the file."""
        data = dict(data)
        mt = data.pop("model_type", None)
        if mt is not None and cls.model_type and mt != cls.model_type:
            raise ValueError(
                f"config is for model_type {mt!r}, not {cls.model_type!r} ({cls.__name__}); "
                f"load it with nezha_zoo.AutoConfig or the matching config class"
            )
        data.update(overrides)
        if "num_labels" in overrides and "id2label" not in overrides:
            data.pop("id2label", None)
            data.pop("label2id", None)
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically."""
        atomic_write_text(path, self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {'null' if data is None else type(data).__name__}")
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
        """Read ``config.json`` from a directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}")
        return cls.from_json_file(file, **overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, CONFIG_NAME))

    def copy(self, **changes: Any) -> PretrainedConfig:
        """A validated copy with some fields changed."""
        return type(self).from_dict(self.to_dict(), **changes)

    # --- dunder ------------------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.fields)
        return f"{type(self).__name__}({inner})"


def classifier_dropout_rate(config: Any) -> float:
    """The dropout rate before a classifier head (transformers' rule, one place for every backend).

    ``classifier_dropout`` when set, else ``hidden_dropout_prob``.  A config without
    ``hidden_dropout_prob`` (MPT) takes ``hidden_dropout`` when set (read from config.json's extra
    keys), else 0.1, as transformers' MPT heads do.

    Args:
        config (PretrainedConfig): the family's config.

    Returns:
        float: the dropout probability.
    """
    rate = getattr(config, "classifier_dropout", None)
    if rate is not None:
        return rate
    if hasattr(config, "hidden_dropout_prob"):
        return config.hidden_dropout_prob
    rate = getattr(config, "hidden_dropout", None)
    return 0.1 if rate is None else rate


def _jsonable(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return v.to_dict()
    return copy.deepcopy(v)
