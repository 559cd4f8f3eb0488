"""The family registry: ``model_type`` -> config class, heads and parameter spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.spec.param import ModelSpec

__all__ = ["Family", "register_family", "get_family", "families", "family_of_config"]


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
    """

    key: str
    model_type: str
    class_prefix: str
    config_class: type[PretrainedConfig]
    base_prefix: str
    heads: tuple[str, ...]
    spec: Callable[[PretrainedConfig, str], ModelSpec] | None = None
    tokenizer_class: str | None = None

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
