"""Dispatch on ``config.json``'s ``model_type`` to the right family: :class:`AutoConfig`, and
:class:`BaseAutoModel`, the framework-free definition of every backend's Auto model classes."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, ClassVar

from nezha_zoo.config import CONFIG_NAME, PretrainedConfig
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.head_resolution import resolve_head
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.spec.registry import FRAMEWORKS, Family, get_family, model_class

__all__ = ["AutoConfig", "BaseAutoModel", "AUTO_MODEL_HEADS"]

logger = logging.getLogger(__name__)


class AutoConfig:
    """Build the config class named by a ``config.json``'s ``model_type``."""

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        return get_family(model_type).config_class(**kwargs)

    @staticmethod
    def from_dict(data: dict[str, Any], **overrides: Any) -> PretrainedConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object (a dict), got {type(data).__name__}")
        mt = data.get("model_type")
        if not mt:
            raise ValueError("config has no 'model_type'; cannot tell which family it belongs to")
        return get_family(mt).config_class.from_dict(data, **overrides)

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}")
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        if not isinstance(data, dict):  # a list or null parses, but is no config
            kind = "null" if data is None else type(data).__name__
            raise ValueError(f"{file}: expected a JSON object, got {kind}")
        return AutoConfig.from_dict(data, **overrides)


# --- model classes ---------------------------------------------------------------------------------

#: transformers' Auto class names (without the ``TF`` / ``Flax`` prefix) -> the head each builds.
AUTO_MODEL_HEADS: dict[str, str] = {
    "AutoModel": "Model",
    "AutoModelForPreTraining": "ForPreTraining",
    "AutoModelForMaskedLM": "ForMaskedLM",
    "AutoModelForCausalLM": "ForCausalLM",
    "AutoModelForNextSentencePrediction": "ForNextSentencePrediction",
    "AutoModelForSequenceClassification": "ForSequenceClassification",
    "AutoModelForMultipleChoice": "ForMultipleChoice",
    "AutoModelForTokenClassification": "ForTokenClassification",
    "AutoModelForQuestionAnswering": "ForQuestionAnswering",
}


class BaseAutoModel:
    """The one definition behind every backend's Auto classes (``AutoModel``, ``TFAutoModelForMaskedLM``...).

    A backend declares each Auto class in one line, naming its framework and head::

        class AutoModelForMaskedLM(BaseAutoModel, framework="pt", head="ForMaskedLM"): ...

    The family comes from the config's ``model_type``, the class from the head the Auto class stands
    for, looked up in the class registry (:func:`~nezha_zoo.spec.registry.model_class`).  As in
    transformers, the Auto class decides the class built, not ``architectures``: ``AutoModel`` on a
    head checkpoint builds the base model and loads the base tensors from it; a head class on a base
    checkpoint gets its head freshly initialised (both are logged by name).

    Attributes:
        framework (str): ``"pt"``, ``"tf"`` or ``"flax"``.
        head (str): the head built (``"Model"``, ``"ForMaskedLM"``...).
    """

    framework: ClassVar[str]
    head: ClassVar[str]

    def __init_subclass__(cls, *, framework: str, head: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {framework!r}; nezha_zoo has {sorted(FRAMEWORKS)}")
        if head not in AUTO_MODEL_HEADS.values():
            raise ValueError(f"unknown head {head!r}; Auto classes exist for {sorted(AUTO_MODEL_HEADS.values())}")
        cls.framework = framework
        cls.head = head

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"{type(self).__name__} is not instantiated: use {type(self).__name__}.from_pretrained(directory) "
            f"or {type(self).__name__}.from_config(config)"
        )

    @classmethod
    def model_class(cls, family: str | Family) -> type:
        """The class this Auto class builds for ``family`` (a ``model_type``, family key or :class:`Family`).

        Raises:
            ValueError: unknown family, or the family has no such head (the error names its heads).
        """
        fam = family if isinstance(family, Family) else get_family(family)
        if cls.head not in fam.heads:
            raise ValueError(
                f"{cls.__name__}: the {fam.class_prefix} family (model_type {fam.model_type!r}) has no "
                f"{cls.head} head; its heads are {list(fam.heads)}"
            )
        return model_class(fam, cls.head, cls.framework)

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any) -> Any:
        """A freshly initialised model of ``config``'s family (no weights are read).

        Args:
            config (PretrainedConfig): any family's config (``AutoConfig.from_pretrained(dir)``...).
            **kwargs: passed to the model class's constructor (``dtype=``, ``seed=`` in Flax...).
        """
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"{cls.__name__}.from_config needs a PretrainedConfig, got {type(config).__name__}")
        return cls.model_class(config.model_type)(config, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        config: PretrainedConfig | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load a checkpoint directory into the class of its family (``config.json``'s ``model_type``).

        Args:
            pretrained_model_name_or_path (str | os.PathLike): a directory with ``config.json`` and weights.
            config (PretrainedConfig | None): use this config (and its family) instead of ``config.json``.
            **kwargs: passed to the model class's ``from_pretrained`` (``dtype=``, ``strict=``,
                ``num_labels=3``...); its return value is returned (a model, or a tuple with
                ``output_loading_info``; Flax's ``(model, params)`` with ``_do_init=False``).

        Raises:
            ValueError: unknown or missing ``model_type``; the family has no such head.
            FileNotFoundError: no ``config.json`` (and no ``config``).
        """
        path = os.fspath(pretrained_model_name_or_path)
        cfg = config if config is not None else AutoConfig.from_pretrained(path)
        if not isinstance(cfg, PretrainedConfig):
            raise TypeError(f"config must be a PretrainedConfig, got {type(cfg).__name__}")
        target = cls.model_class(cfg.model_type)
        note = _head_note(path, target.family, cfg)
        if note is not None:
            logger.warning("%s: %s: %s builds %s", path, note, cls.__name__, target.__name__)
        return target.from_pretrained(path, config=config, **kwargs)


def _head_note(path: str, family: Family, config: PretrainedConfig) -> str | None:
    """What the tensors are when they are not what ``architectures`` says (``resolve_head``), else None.

    Advisory only: a checkpoint that cannot be read or matched is left to the model class's loader,
    which raises with the details.
    """
    try:
        with open_checkpoint(path) as reader:
            found = resolve_head(family, config, reader.keys(), reader.shape)
    except (CheckpointError, OSError, ValueError):
        return None
    if found.note is None:
        return None
    claimed = found.claimed_class or f"no {family.class_prefix} class"
    return f"config.json names {claimed}; the tensors are {found.tensors_class}"
