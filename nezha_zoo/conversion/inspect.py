"""What a checkpoint directory holds, judged against the spec."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from nezha_zoo.auto import AutoConfig
from nezha_zoo.config import PretrainedConfig
from nezha_zoo.io.head_resolution import resolve_head, validity_errors
from nezha_zoo.spec.registry import Family, family_of_config
from nezha_zoo.tokenization import tokenizer_files

__all__ = ["detect_head", "inspect_checkpoint"]


def detect_head(family: Family, config: PretrainedConfig, keys: list[str], shape_of) -> str:
    """The head a checkpoint's tensors are (see :func:`~nezha_zoo.io.head_resolution.resolve_head`)."""
    return resolve_head(family, config, keys, shape_of).head


def inspect_checkpoint(path: str | os.PathLike, head: str | None = None) -> dict[str, Any]:
    """Family, head, parameter count, dtypes, missing/unexpected tensors and tokenizer files of a checkpoint dir.

    Args:
        path (str | os.PathLike): a checkpoint directory in any format ``nezha-zoo convert`` reads.
        head (str | None): judge against this head instead of the one the tensors are.

    Returns:
        A dict; ``claimed_class`` is what ``config.json`` names, ``tensors_class`` what the tensors
        are (None when no head fits them exactly), ``head``/``class`` the head judged against (the
        tensors', the forced one, or the closest), ``head_note`` one line when the tensors overrule
        the config, ``head_error`` the mismatch (with the ``--head`` to pass) when nothing fits,
        ``errors`` why ``convert`` and ``verify`` would refuse it (empty for a valid checkpoint; see
        :func:`~nezha_zoo.io.head_resolution.validity_errors`).
    """
    from nezha_zoo.conversion.formats import detect_format, droppable, open_source

    config = AutoConfig.from_pretrained(path)
    family = family_of_config(config)
    fmt = detect_format(path)
    reader = open_source(path, fmt, family, config)
    try:
        keys = reader.keys()
        found = resolve_head(family, config, keys, reader.shape, head, lambda k: droppable(reader.format, family, k))
        spec, plan = found.spec, found.plan
        errors = validity_errors(found, reader.dtype)
        dtypes = Counter(reader.dtype(k) for k in keys)
        stored = sum(_numel(reader.shape(k)) for k in plan.sources.values())
        fmt = reader.container
    finally:
        reader.close()
    return {
        "path": os.fspath(path),
        "format": fmt,
        "family": family.key,
        "model_type": family.model_type,
        "head": found.head,
        "class": family.class_name(found.head),
        "claimed_class": found.claimed_class,
        "tensors_class": found.tensors_class,
        "head_note": found.note,
        "head_error": None if found.exact else found.mismatch_message(),
        "parameters": spec.num_parameters(),
        "parameters_in_checkpoint": stored,
        "tensors": len(keys),
        "dtypes": dict(sorted(dtypes.items())),
        "missing_keys": plan.missing_keys,
        "unexpected_keys": found.unexpected_keys,
        "framework_only_keys": list(found.dropped),
        "ignored_keys": plan.ignored_keys,
        "tokenizer_files": tokenizer_files(path),
        "errors": errors,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
