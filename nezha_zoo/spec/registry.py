"""The family registry (``model_type`` -> config class, heads and parameter spec) and the model-class
registry ((family, head, framework) -> class), both framework-free.

Model classes register themselves where they are defined: each backend's base class calls
:func:`register_model_class` from ``__init_subclass__``.  :func:`model_class` imports the backend
package on demand, so callers never build class names or import backend modules themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.spec.param import ModelSpec
from nezha_zoo.spec.pooling import FIRST, POOLING_RULES

__all__ = [
    "Family",
    "register_family",
    "get_family",
    "families",
    "family_of_config",
    "FRAMEWORKS",
    "BASE_HEAD",
    "register_model_class",
    "model_class",
    "model_classes",
]


@dataclass(frozen=True)
class Family:
    """A registered family.

    Args:
        key: short family key, also the module basename in each backend (``"electra"``).
        model_type: transformers' ``model_type`` (``"electra"``, ``"xlm-roberta-xl"``...).
        class_prefix: class-name stem (``"Electra"`` -> ``ElectraForMaskedLM``).
        config_class: the config class.
        base_prefix: base-model attribute of head classes (``"electra"``).
        heads: head names in documentation order, ``"Model"`` first.
        spec: ``spec(config, head) -> ModelSpec``; ``None`` until the family's params are declared.
        tokenizer_class: transformers' tokenizer class of the family's checkpoints (``"ElectraTokenizer"``),
            used when a directory's ``tokenizer_config.json`` does not name one.
        pooling: the position of the last layer that the sequence-level heads (sequence classification,
            multiple choice) read, one of :data:`nezha_zoo.spec.pooling.POOLING_RULES`.
    """

    key: str
    model_type: str
    class_prefix: str
    config_class: type[PretrainedConfig]
    base_prefix: str
    heads: tuple[str, ...]
    spec: Callable[[PretrainedConfig, str], ModelSpec] | None = None
    tokenizer_class: str | None = None
    pooling: str = FIRST

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_RULES:
            raise ValueError(f"{self.key}: pooling {self.pooling!r} is not one of {POOLING_RULES}")

    def class_name(self, head: str, backend: str = "pt") -> str:
        stem = "Model" if head == "Model" else head
        name = f"{self.class_prefix}{stem}"
        return {"pt": name, "tf": f"TF{name}", "flax": f"Flax{name}"}[backend]

    def model_spec(self, config: PretrainedConfig, head: str = "Model") -> ModelSpec:
        if head not in self.heads:
            raise ValueError(f"{self.key} has no head {head!r}; heads: {list(self.heads)}")
        if self.spec is None:
            raise NotImplementedError(f"the parameter spec of {self.key} is not declared yet")
        return self.spec(config, head)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.model_type in _FAMILIES:
        raise ValueError(f"model_type {family.model_type!r} registered twice")
    _FAMILIES[family.model_type] = family
    return family


def families() -> dict[str, Family]:
    """All registered families, by ``model_type``."""
    import nezha_zoo.families  # noqa: F401  (registers every family)

    return dict(_FAMILIES)


def get_family(key: str) -> Family:
    """Look a family up by ``model_type`` or family key; unknown names raise ``ValueError``."""
    fams = families()
    if key in fams:
        return fams[key]
    for fam in fams.values():
        if fam.key == key:
            return fam
    known = sorted(f.model_type for f in fams.values())
    raise ValueError(f"unknown model family {key!r}; nezha_zoo knows {known}")


def family_of_config(config: PretrainedConfig) -> Family:
    return get_family(config.model_type)


# --- model classes ---------------------------------------------------------------------------------

#: framework key -> the backend package that defines (and registers) its classes.
FRAMEWORKS: dict[str, str] = {"pt": "nezha_zoo.pt", "tf": "nezha_zoo.tf", "flax": "nezha_zoo.flax"}
#: the pseudo-head under which a family's shared base class (``ElectraPreTrainedModel``) registers.
BASE_HEAD = "PreTrainedModel"

_CLASSES: dict[tuple[str, str, str], type] = {}


def _check_framework(framework: str) -> None:
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; nezha_zoo has {sorted(FRAMEWORKS)}")


def register_model_class(cls: type, framework: str) -> type:
    """Record ``cls`` under ``(cls.family.key, head, framework)`` if it is a public model class.

    Called by each backend base class's ``__init_subclass__``.  A class registers when its name is
    the family's name for a head (``Family.class_name(head, framework)``: ``TFElectraForMaskedLM``)
    or for the family base (``ElectraPreTrainedModel``, under :data:`BASE_HEAD`); private helpers
    and user subclasses under other names are left out.  Another class under a taken key raises.

    Args:
        cls (type): the class being defined; it has a ``family`` attribute (a :class:`Family`).
        framework (str): ``"pt"``, ``"tf"`` or ``"flax"``.

    Returns:
        type: ``cls`` (so this also works as a decorator).
    """
    _check_framework(framework)
    family = getattr(cls, "family", None)
    if not isinstance(family, Family):
        return cls
    for head in (BASE_HEAD, *family.heads):
        if cls.__name__ != family.class_name(head, framework):
            continue
        key = (family.key, head, framework)
        old = _CLASSES.get(key)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"{key} is registered twice: {old.__module__}.{old.__qualname__} and {cls.__module__}")
        if head != BASE_HEAD and getattr(cls, "head", head) != head:
            raise ValueError(f"{cls.__name__} declares head {cls.head!r}; its name says {head!r}")
        _CLASSES[key] = cls
    return cls


def model_class(family: str | Family, head: str, framework: str) -> type:
    """The model class of ``family`` with ``head`` in ``framework``, importing that backend when needed.

    Args:
        family (str | Family): family key or ``model_type`` (``"electra"``, ``"xlm-roberta-xl"``) or a
            :class:`Family`.
        head (str): ``"Model"``, ``"ForMaskedLM"``... (one of ``Family.heads``), or :data:`BASE_HEAD`.
        framework (str): ``"pt"``, ``"tf"`` or ``"flax"``.

    Returns:
        type: e.g. ``model_class("electra", "ForMaskedLM", "tf") is nezha_zoo.tf.TFElectraForMaskedLM``.

    Raises:
        ValueError: unknown family, head or framework.
    """
    _check_framework(framework)
    fam = family if isinstance(family, Family) else get_family(family)
    if head != BASE_HEAD and head not in fam.heads:
        raise ValueError(f"{fam.key} has no head {head!r}; heads: {list(fam.heads)}")
    key = (fam.key, head, framework)
    if key not in _CLASSES:
        importlib.import_module(FRAMEWORKS[framework])  # class statements register on import
    if key not in _CLASSES:
        raise ValueError(f"{FRAMEWORKS[framework]} defines no {fam.class_name(head, framework)}")
    return _CLASSES[key]


def model_classes(framework: str) -> dict[str, type]:
    """Every registered class of ``framework`` by class name, family by family (registration order),
    each family's base first and then its heads in ``Family.heads`` order.

    Does not import the backend: call it from the backend package (its export list) or after
    :func:`model_class`.
    """
    _check_framework(framework)
    out: dict[str, type] = {}
    for fam in families().values():
        for head in (BASE_HEAD, *fam.heads):
            cls = _CLASSES.get((fam.key, head, framework))
            if cls is not None:
                out[cls.__name__] = cls
    return out
