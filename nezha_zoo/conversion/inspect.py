"""What a checkpoint directory holds, judged against the spec."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from nezha_zoo.auto import AutoConfig
from nezha_zoo.checkpoint import CheckpointError
from nezha_zoo.config import PretrainedConfig
from nezha_zoo.loading import plan_load
from nezha_zoo.spec.registry import Family, family_of_config
from nezha_zoo.tokenization import tokenizer_files

__all__ = ["detect_head", "inspect_checkpoint"]


def detect_head(family: Family, config: PretrainedConfig, keys: list[str], shape_of) -> str:
    """The head a checkpoint was saved from: ``architectures`` in its config, else the best key match."""
    for arch in config.architectures or []:
        for backend in ("pt", "tf", "flax"):
            for head in family.heads:
                if family.class_name(head, backend) == arch:
                    return head
    best: tuple[int, str] | None = None
    for head in family.heads:
        try:
            plan = plan_load(family.model_spec(config, head), keys, shape_of, family.base_prefix)
        except CheckpointError:
            continue
        score = len(plan.missing_keys) + len(plan.unexpected_keys)
        if best is None or score < best[0]:
            best = (score, head)
    if best is None:
        raise CheckpointError("no head of this family matches the checkpoint's tensor shapes")
    return best[1]


def inspect_checkpoint(path: str | os.PathLike, head: str | None = None) -> dict[str, Any]:
    """Family, head, parameter count, dtypes, missing/unexpected tensors and tokenizer files of a checkpoint dir.

    Args:
        path (str | os.PathLike): a checkpoint directory in any format ``nezha-zoo convert`` reads.
        head (str | None): judge against this head instead of the detected one.
    """
    from nezha_zoo.conversion.formats import detect_format, droppable, open_source

    config = AutoConfig.from_pretrained(path)
    family = family_of_config(config)
    fmt = detect_format(path)
    reader = open_source(path, fmt, family, config)
    try:
        keys = reader.keys()
        head = head or detect_head(family, config, keys, reader.shape)
        spec = family.model_spec(config, head)
        plan = plan_load(spec, keys, reader.shape, family.base_prefix)
        dtypes = Counter(reader.dtype(k) for k in keys)
        stored = sum(_numel(reader.shape(k)) for k in plan.sources.values())
        dropped = [k for k in plan.unexpected_keys if droppable(reader.format, family, k)]
        fmt = reader.container
    finally:
        reader.close()
    return {
        "path": os.fspath(path),
        "format": fmt,
        "family": family.key,
        "model_type": family.model_type,
        "head": head,
        "class": family.class_name(head),
        "parameters": spec.num_parameters(),
        "parameters_in_checkpoint": stored,
        "tensors": len(keys),
        "dtypes": dict(sorted(dtypes.items())),
        "missing_keys": plan.missing_keys,
        "unexpected_keys": [k for k in plan.unexpected_keys if k not in dropped],
        "framework_only_keys": dropped,
        "ignored_keys": plan.ignored_keys,
        "tokenizer_files": tokenizer_files(path),
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
