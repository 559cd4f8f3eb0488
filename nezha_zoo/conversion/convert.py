"""Convert a checkpoint directory between formats, streaming one tensor at a time.

The source is read through its canonical view (:mod:`nezha_zoo.conversion.formats`), matched to the
family's spec for the head it was saved from (every tensor accounted for, shapes checked), and each
param is read, cast and handed to the target's writer only when the writer asks for it.  Peak
memory is about one tensor (one shard for safetensors output), not the model.  The output is staged
beside ``dst`` and moved into place only when every file is complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nezha_zoo.auto import AutoConfig
from nezha_zoo.config import CONFIG_NAME
from nezha_zoo.conversion.formats import (
    FORMATS,
    WRITE_FORMATS,
    detect_format,
    droppable,
    open_source,
    weight_files,
    write_format,
)
from nezha_zoo.io.atomic import staged_directory
from nezha_zoo.io.dtype_names import numpy_dtype_named
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.head_resolution import resolve_head, validity_errors
from nezha_zoo.io.lock import destination_lock
from nezha_zoo.io.shards import DEFAULT_MAX_SHARD_SIZE
from nezha_zoo.pretrained import FORMAT_METADATA
from nezha_zoo.spec.param import Kind, ModelSpec, Param
from nezha_zoo.spec.registry import family_of_config
from nezha_zoo.tokenization import copy_tokenizer_files

__all__ = ["convert", "DTYPES", "ConversionError"]


class ConversionError(CheckpointError):
    """A conversion was refused or its input does not match the spec; nothing was written."""


#: Names accepted by ``dtype=`` / ``--dtype``.
DTYPES = ("float32", "bfloat16", "float16")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    source_format: str | None = None,
    head: str | None = None,
    progress: Callable[[str, int], None] | None = None,
    adapter: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Convert the checkpoint directory ``src`` into format ``to`` at ``dst``.

    The tokenizer files of ``src`` (``TOKENIZER_FILES``, and a sentence-transformers directory's
    pooling files) are copied unchanged.

    Args:
        src (str | os.PathLike): checkpoint directory with ``config.json`` and weights of any
            readable format (detected from its files unless ``source_format`` is given).
        dst (str | os.PathLike): output directory; must not exist or be empty unless ``force``.
        to (str): one of ``WRITE_FORMATS``.
        dtype (str | None): cast floating params (not buffers) to ``float32``/``bfloat16``/``float16``;
            None keeps each tensor's dtype.
        max_shard_size (int | str): shard limit of safetensors output.
        force (bool): replace the weights already in ``dst``.
        source_format (str | None): read ``src`` as this format instead of detecting it.
        head (str | None): the head (or class name) to convert as (default: the head the tensors are
            exactly, ``config.json``'s ``architectures`` when they fit it; see
            :func:`~nezha_zoo.io.head_resolution.resolve_head`).  A base saved without its pooler is
            written without it.
        progress (Callable[[str, int], None] | None): called with (param name, bytes) after each tensor.
        adapter (str | os.PathLike | None): a LoRA adapter directory (PEFT format) merged into the
            weights as they stream (``nezha-zoo merge``); checked against the spec before writing.

    Returns:
        A summary dict (formats, family, head, tensors, parameters, bytes, files, dropped keys, seconds;
        ``head_note``: one line when the tensors overrule ``config.json``'s ``architectures``, else None).

    The whole run holds ``dst``'s :func:`~nezha_zoo.io.lock.destination_lock`, taken before any work:
    a second conversion (or ``save_pretrained``) into ``dst`` fails at once, an unwritable ``dst``
    fails before anything is read, and staging directories of killed runs are removed.

    Raises:
        DestinationLockedError: another process is writing ``dst``.
        DestinationError: ``dst`` or its parent is not writable.
        ConversionError: refused (existing output, same directory, unwritable format, dtype the target
            cannot hold) or the input does not match the spec (missing/unexpected/mis-shaped tensors).
        CheckpointError: a corrupt or truncated input file (named).
    """
    start = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if to not in WRITE_FORMATS:
        raise ConversionError(f"cannot write format {to!r}; choose one of {list(WRITE_FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if os.path.exists(dst) and os.path.realpath(dst) == os.path.realpath(src):
        raise ConversionError(f"source and destination are the same directory ({src!r})")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ConversionError(f"{dst!r} exists and is not a directory")
    with destination_lock(dst):
        return _convert_locked(
            src, dst, to, dtype, max_shard_size, force, source_format, head, progress, start, adapter
        )


def _convert_locked(
    src: str,
    dst: str,
    to: str,
    dtype: str | None,
    max_shard_size: int | str,
    force: bool,
    source_format: str | None,
    head: str | None,
    progress: Callable[[str, int], None] | None,
    start: float,
    adapter: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`convert` once ``dst`` is locked (the emptiness check included, so no writer races it)."""
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise ConversionError(f"{dst!r} exists and is not empty; pass --force (force=True) to replace its weights")
    fmt = source_format or detect_format(src)
    if fmt not in FORMATS:
        raise ConversionError(f"unknown source format {fmt!r}; known: {list(FORMATS)}")
    config = AutoConfig.from_pretrained(src)
    family = family_of_config(config)
    source = open_source(src, fmt, family, config)
    try:
        keys = source.keys()
        try:
            found = resolve_head(family, config, keys, source.shape, head, lambda k: droppable(fmt, family, k))
        except CheckpointError as e:  # name the file: the message names only the tensor
            raise ConversionError(f"{source.path} ({fmt}): {e}") from e
        errors = validity_errors(found, source.dtype)
        if errors:
            raise ConversionError(f"{src}: the {fmt} checkpoint: {'; '.join(errors)}")
        head, spec, plan, dropped = found.head, found.spec, found.plan, list(found.dropped)
        if to == "keras" and found.pooler is False:
            raise ConversionError(
                f"{src}: the keras writer loads {family.class_name(head, 'tf')} with its pooler, which these "
                f"tensors lack; write safetensors, hf-tf, hf-flax or flax instead"
            )
        cast = numpy_dtype_named(dtype) if dtype else None
        totals = {"tensors": 0, "bytes": 0}
        deltas = _lora_deltas(adapter, spec, family.base_prefix) if adapter is not None else {}

        def fetch(p: Param) -> np.ndarray:
            key = plan.sources[p.name]
            arr = np.asarray(source.get(key))
            if tuple(arr.shape) != p.shape:
                raise ConversionError(f"{src}: tensor {key!r} has shape {arr.shape}, the spec needs {p.shape}")
            if p.name in deltas:  # W + scaling * B @ A, computed in float32, stored in W's dtype
                arr = (arr.astype(np.float32) + deltas.pop(p.name)).astype(arr.dtype)
            if cast is not None and p.kind is not Kind.BUFFER and arr.dtype != cast:
                arr = arr.astype(cast)
            totals["tensors"] += 1
            totals["bytes"] += arr.nbytes
            if progress is not None:
                progress(p.name, arr.nbytes)
            return arr

        cfg = config.copy()
        cfg.architectures = [family.class_name(head, "pt")]
        meta = {**FORMAT_METADATA, "family": family.key, "head": head}
        stale = weight_files(dst)
        with staged_directory(dst) as stage:
            files = write_format(to, stage, family, spec, fetch, max_shard_size, meta, cfg)
            with open(os.path.join(stage, CONFIG_NAME), "w", encoding="utf-8") as fh:
                fh.write(cfg.to_json_string())
            files.append(CONFIG_NAME)
            files += copy_tokenizer_files(src, stage)
            if totals["tensors"] != len(spec):
                raise ConversionError(f"internal: wrote {totals['tensors']} of {len(spec)} tensors")
    finally:
        source.close()
    for name in stale:  # weights of another format left from before (only reachable with force)
        if name not in files:
            os.remove(os.path.join(dst, name))
    return {
        "source": src,
        "destination": dst,
        "from": fmt,
        "to": to,
        "family": family.key,
        "head": head,
        "class": family.class_name(head),
        "head_note": found.note,
        "tensors": totals["tensors"],
        "parameters": spec.num_parameters(),
        "bytes": totals["bytes"],
        "dtype": dtype,
        "files": sorted(files),
        "dropped_keys": dropped,
        "adapter": None if adapter is None else os.fspath(adapter),
        "ignored_keys": plan.ignored_keys,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _lora_deltas(adapter: str | os.PathLike, spec: ModelSpec, base_prefix: str) -> dict[str, np.ndarray]:
    """Canonical param name -> ``scaling * B @ A`` of each layer the LoRA adapter adapts."""
    from nezha_zoo.adapters import read_adapter

    config, weights = read_adapter(adapter, spec, base_prefix)
    return {f"{module}.weight": config.scaling * (b @ a) for module, (a, b) in weights.items()}
