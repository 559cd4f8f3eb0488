"""Dispatch on ``config.json``'s ``model_type`` to the right family."""

from __future__ import annotations

import json
import os
from typing import Any

from nezha_zoo.config import CONFIG_NAME, PretrainedConfig
from nezha_zoo.spec.registry import get_family

__all__ = ["AutoConfig"]


class AutoConfig:
    """Build the config class named by a ``config.json``'s ``model_type``."""

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        return get_family(model_type).config_class(**kwargs)

    @staticmethod
    def from_dict(data: dict[str, Any], **overrides: Any) -> PretrainedConfig:
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
        if overrides and isinstance(data, dict) and data.get("model_type"):
            get_family(data["model_type"]).config_class.check_override_names(overrides, "AutoConfig.from_pretrained")
        return AutoConfig.from_dict(data, **overrides)
