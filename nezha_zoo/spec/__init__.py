"""The framework-neutral parameter spec: params, layouts, partition rules and the family registry."""

from nezha_zoo.spec.layouts import LAYOUTS, Layout, get_layout
from nezha_zoo.spec.param import AXES, Init, Kind, ModelSpec, Param
from nezha_zoo.spec.registry import (
    Family,
    families,
    family_of_config,
    get_family,
    model_class,
    model_classes,
    register_family,
)

__all__ = [
    "AXES",
    "Family",
    "Init",
    "Kind",
    "LAYOUTS",
    "Layout",
    "ModelSpec",
    "Param",
    "families",
    "family_of_config",
    "get_family",
    "get_layout",
    "model_class",
    "model_classes",
    "register_family",
]
