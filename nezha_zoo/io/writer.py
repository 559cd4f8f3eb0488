"""Write a state dict as transformers' ``model.safetensors`` (sharded above ``max_shard_size``).

Files carry metadata ``{"format": "pt"}`` so transformers reads them; they are staged and moved into
place only when all are complete (:func:`~nezha_zoo.io.atomic.staged_directory`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping

import numpy as np

from nezha_zoo.io.atomic import atomic_write_text, staged_directory
from nezha_zoo.io.lock import destination_lock
from nezha_zoo.io.safetensors_file import nbytes, write_safetensors
from nezha_zoo.io.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    index_json,
    parse_size,
    remove_stale_weights,
    shard_name,
)

__all__ = ["save_state_dict"]


def save_state_dict(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extra_files: Mapping[str, str] | None = None,
    *,
    staged: bool = True,
) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` (or shards + index) into ``directory``.

    ``tensors`` is a mapping or an iterable of ``(name, array)`` pairs (float32, bfloat16 via
    ``ml_dtypes``, or any dtype safetensors stores).  An iterable is consumed as it goes: each shard is
    written once it is full and its arrays are released, so a model can be saved without a second
    full copy of its weights in memory.  An exception raised by the iterable leaves ``directory`` as
    it was.  ``extra_files`` (name -> text, e.g. ``config.json``) are written in the same staged commit.
    Weight files from an earlier save that the new one does not use are removed afterwards.
    The whole save holds ``directory``'s :func:`~nezha_zoo.io.lock.destination_lock`: a second
    writer fails at once.  ``staged=False`` writes straight into ``directory``: for a caller that
    already stages (``nezha-zoo convert``), so no staging directory nests in another.
    Returns the file names written.
    """
    directory = os.fspath(directory)
    limit = parse_size(max_shard_size)
    meta = {"format": "pt", **dict(metadata or {})}
    pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
    written: list[str] = []
    with destination_lock(directory) if staged else contextlib.nullcontext():
        with staged_directory(directory) if staged else contextlib.nullcontext(directory) as stage:
            parts: list[tuple[str, list[str], int]] = []  # (staged file, its keys, its bytes)
            shard: list[tuple[str, np.ndarray]] = []
            size = 0

            def flush() -> None:
                part = os.path.join(stage, f".part-{len(parts):05d}")
                write_safetensors(part, shard, meta)
                parts.append((part, [k for k, _ in shard], size))

            seen: set[str] = set()
            for key, arr in pairs:
                if key in seen:
                    raise ValueError(f"tensor {key!r} given twice")
                seen.add(key)
                arr = np.asarray(arr)
                if not arr.flags.c_contiguous:
                    arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d tensor into shape (1,))
                if shard and size + nbytes(arr) > limit:
                    flush()
                    shard, size = [], 0
                shard.append((key, arr))
                size += nbytes(arr)
            if shard or not parts:
                flush()
            shard = []
            if len(parts) == 1:
                os.replace(parts[0][0], os.path.join(stage, SAFE_WEIGHTS_NAME))
                written.append(SAFE_WEIGHTS_NAME)
            else:
                weight_map: dict[str, str] = {}
                for i, (part, keys, _) in enumerate(parts, 1):
                    name = shard_name(i, len(parts))
                    os.replace(part, os.path.join(stage, name))
                    written.append(name)
                    weight_map.update(dict.fromkeys(keys, name))
                total = sum(n for _, _, n in parts)
                atomic_write_text(os.path.join(stage, SAFE_WEIGHTS_INDEX_NAME), index_json(weight_map, total))
                written.append(SAFE_WEIGHTS_INDEX_NAME)
            for name, text in (extra_files or {}).items():
                atomic_write_text(os.path.join(stage, name), text)
                written.append(name)
        if staged:
            remove_stale_weights(directory, keep=set(written))
    return written
