"""Checkpoint file names and sharding: transformers' names, shard sizes, the shard index.

A checkpoint is one weights file or shards ``model-0000i-of-0000n.safetensors`` listed by an index
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {key: shard}}``);
``pytorch_model.bin`` checkpoints shard the same way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from nezha_zoo.io.errors import CheckpointError

__all__ = [
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "PT_WEIGHTS_NAME",
    "PT_WEIGHTS_INDEX_NAME",
    "DEFAULT_MAX_SHARD_SIZE",
    "parse_size",
    "shard_name",
    "read_index",
    "index_json",
    "remove_stale_weights",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

#: Default shard limit of ``save_pretrained`` (transformers uses 5GB too).
DEFAULT_MAX_SHARD_SIZE = "5GB"


def parse_size(size: int | str) -> int:
    """``"5GB"``/``"500MB"``/``"2GiB"``/int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '500MB' or a byte count")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(num * scale[unit])


def shard_name(i: int, n: int) -> str:
    """File name of safetensors shard ``i`` (1-based) of ``n``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def read_index(directory: str, index: str) -> dict[str, str]:
    """Tensor name -> full path of its shard, from the index file ``index`` in ``directory``.

    Raises:
        CheckpointError: the index is not valid JSON of the expected shape, names a shard outside
            ``directory``, or a shard it names is missing.
    """
    try:
        with open(index, encoding="utf-8") as fh:
            data = json.load(fh)
        weight_map = data["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
    out: dict[str, str] = {}
    for key, shard in weight_map.items():
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{index}: shard {shard!r} of {key!r} is not a plain file name")
        full = os.path.join(directory, shard)
        if not os.path.isfile(full):
            raise CheckpointError(f"{index}: shard {shard!r} (holding {key!r}) is missing")
        out[key] = full
    return out


def index_json(weight_map: Mapping[str, str], total_size: int) -> str:
    """The text of a shard index: tensor name -> shard file name, and the total data bytes."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(weight_map)}, indent=2) + "\n"


_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)$")


def remove_stale_weights(directory: str, keep: set[str]) -> None:
    """Remove safetensors weight files and indexes in ``directory`` that a new save did not write."""
    for name in os.listdir(directory):
        if _WEIGHT_FILE.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))
