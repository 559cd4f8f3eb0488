"""Checkpoint formats: detection, a canonical view of any source, and streaming writers.

Every format is a storage :class:`~nezha_zoo.spec.layouts.Layout` plus a file container:

=============  ===========================  ==========================================================
format         files                        layout / container
=============  ===========================  ==========================================================
safetensors    model.safetensors (+ shards)  ``pt`` (canonical); sharded above ``max_shard_size``
pytorch-bin    pytorch_model.bin (+ shards)  ``pt``; read only, tensors-only unpickler
hf-tf          tf_model.h5                   ``hf-tf``: transformers TF (tf-keras) variable names
hf-flax        flax_model.msgpack            ``hf-flax``: transformers Flax params tree
keras          model.weights.h5              ``keras``: Keras 3 ``save_weights`` of our TF models
flax           flax_variables.msgpack        ``flax``: our linen variables ``{"params": ..., "buffers": ...}``
=============  ===========================  ==========================================================

A source is read through a canonical view (:class:`TensorSource`): keys are transformers' PyTorch
names and arrays are in canonical layout, derived per tensor from the family's spec and the format's
layout, never typed per tensor.  Writers receive a ``fetch(param)`` callback and pull one tensor at a
time, in the order their container needs.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.io.dtype_names import safetensors_name
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.io.shards import PT_WEIGHTS_INDEX_NAME, PT_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from nezha_zoo.spec.layouts import LAYOUTS, Layout
from nezha_zoo.spec.param import ModelSpec, Param
from nezha_zoo.spec.registry import Family

__all__ = [
    "FORMATS",
    "READ_FORMATS",
    "WRITE_FORMATS",
    "Format",
    "TensorSource",
    "detect_format",
    "open_source",
    "weight_files",
    "write_format",
]

TF_WEIGHTS_NAME = "tf_model.h5"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"
KERAS_WEIGHTS_NAME = "model.weights.h5"
FLAX_VARIABLES_NAME = "flax_variables.msgpack"


@dataclass(frozen=True)
class Format:
    """A checkpoint format: its name, layout, the files that mark it, and whether it can be written."""

    name: str
    layout: str
    files: tuple[str, ...]
    writable: bool
    description: str


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("safetensors", "pt", (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME), True, "transformers PyTorch"),
        Format("pytorch-bin", "pt", (PT_WEIGHTS_INDEX_NAME, PT_WEIGHTS_NAME), False, "transformers pytorch_model.bin"),
        Format("hf-tf", "hf-tf", (TF_WEIGHTS_NAME,), True, "transformers TF tf_model.h5"),
        Format("hf-flax", "hf-flax", (FLAX_WEIGHTS_NAME,), True, "transformers Flax flax_model.msgpack"),
        Format("keras", "keras", (KERAS_WEIGHTS_NAME,), True, "nezha_zoo Keras 3 save_weights"),
        Format("flax", "flax", (FLAX_VARIABLES_NAME,), True, "nezha_zoo Flax variables msgpack"),
    )
}
READ_FORMATS = tuple(FORMATS)
WRITE_FORMATS = tuple(n for n, f in FORMATS.items() if f.writable)

#: Sharded files of other frameworks that we recognise but do not read.
_UNSUPPORTED = {
    "tf_model.h5.index.json": "sharded tf_model.h5",
    "flax_model.msgpack.index.json": "sharded flax_model.msgpack",
}


def weight_files(directory: str) -> list[str]:
    """The weight files of any known format in ``directory`` (for replacing an output with --force).

    Args:
        directory (str): a directory (absent is fine: no files).
    """
    if not os.path.isdir(directory):
        return []
    known = {n for f in FORMATS.values() for n in f.files}
    out = []
    for name in sorted(os.listdir(directory)):
        shard = name.startswith(("model-", "pytorch_model-")) and name.endswith((".safetensors", ".bin"))
        if name in known or shard:
            out.append(name)
    return out


def detect_format(path: str | os.PathLike) -> str:
    """The format of the checkpoint directory ``path``, from the files it holds.

    When several formats are present the first of ``FORMATS``' order wins (canonical safetensors first).

    Args:
        path (str | os.PathLike): checkpoint directory.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path!r}")
    present = set(os.listdir(path))
    for f in FORMATS.values():
        if present & set(f.files):
            return f.name
    for name, what in _UNSUPPORTED.items():
        if name in present:
            raise CheckpointError(f"{path}: {what} checkpoints are not supported; re-save it unsharded")
    raise FileNotFoundError(
        f"no weights in {path!r}: expected one of {[n for f in FORMATS.values() for n in f.files]}; "
        f"found {sorted(present)}"
    )


# --- reading -------------------------------------------------------------------------------------


class TensorSource(Protocol):
    """Canonical view of a checkpoint: transformers' PyTorch names, canonical shapes and layout."""

    format: str
    container: str
    path: str

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> str: ...
    def get(self, key: str) -> np.ndarray: ...
    def close(self) -> None: ...


class _SafetensorsSource:
    """safetensors / pytorch_model.bin: already canonical."""

    def __init__(self, path: str, fmt: str):
        self.path, self.format = path, fmt
        self._r = open_checkpoint(path)
        self.container = self._r.format  # "safetensors-sharded" etc.
        # read(): plain file reads, so the source's pages are not kept resident through a memory map
        self.keys, self.shape, self.dtype, self.get = self._r.keys, self._r.shape, self._r.dtype, self._r.read

    def close(self) -> None:
        self._r.close()


class _RawFile(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> Any: ...
    def get(self, key: str) -> np.ndarray: ...
    def close(self) -> None: ...


def _st_dtype(dtype: Any) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return safetensors_name(name) or name.upper()


def stored_key(fmt: str, p: Param, scope: str = "") -> str:
    """The key of ``p`` inside a file of format ``fmt`` (native Flax files nest by collection).

    Args:
        fmt (str): format name.
        p (Param): the parameter.
        scope (str): the base prefix for a base class in a ``base_scoped`` layout, else "".
    """
    layout = LAYOUTS[FORMATS[fmt].layout]
    key = layout.key(p, scope)
    if fmt == "flax":
        return f"{layout.collection_of(p)}{layout.sep}{key}"
    return key


def spec_index(fmt: str, family: Family, config: PretrainedConfig) -> dict[str, tuple[str, Param]]:
    """stored key -> (canonical name, param) over every head of the family this config allows.

    Args:
        fmt (str): format name.
        family (Family): the checkpoint's family.
        config (PretrainedConfig): its config (sizes and the heads it can build).

    A base class's params under a scope (``base_scoped`` layouts) get the head classes' prefixed
    names, so one stored key has one canonical name.
    """
    layout = LAYOUTS[FORMATS[fmt].layout]
    index: dict[str, tuple[str, Param]] = {}
    for head in family.heads:
        try:
            spec = family.model_spec(config, head)
        except (ValueError, NotImplementedError):
            continue  # a head this config cannot build (e.g. QA with num_labels != 2)
        scope = layout.scope_for(spec.is_base, family.base_prefix)
        for p in spec:
            canonical = f"{scope}.{p.name}" if scope else p.name
            index[stored_key(fmt, p, scope)] = (canonical, p)
    return index


class _LayoutSource:
    """A file in a framework's layout, seen through the spec as canonical names and arrays."""

    def __init__(self, raw: _RawFile, fmt: str, path: str, family: Family, config: PretrainedConfig):
        self.format, self.container, self.path, self._raw = fmt, fmt, path, raw
        self._layout: Layout = LAYOUTS[FORMATS[fmt].layout]
        index = spec_index(fmt, family, config)
        self._by_name: dict[str, tuple[str, Param | None]] = {}
        for k in raw.keys():
            name, p = index.get(k, (k, None))  # unknown keys keep their stored name (reported as unexpected)
            if name in self._by_name:
                raise CheckpointError(f"{path}: {k!r} and {self._by_name[name][0]!r} both hold {name!r}")
            self._by_name[name] = (k, p)

    def keys(self) -> list[str]:
        return list(self._by_name)

    def stored_name(self, key: str) -> str:
        return self._by_name[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        k, p = self._by_name[key]
        got = tuple(self._raw.shape(k))
        # Sizes are checked against the class's spec by plan_load (the same stored key can be a
        # different size in another head, e.g. ``classifier``); here only the axis order changes.
        return got if p is None else self._layout.canonical_shape(p, got)

    def dtype(self, key: str) -> str:
        return _st_dtype(self._raw.dtype(self._by_name[key][0]))

    def get(self, key: str) -> np.ndarray:
        k, p = self._by_name[key]
        arr = self._raw.get(k)
        if p is None:
            return arr
        return np.ascontiguousarray(self._layout.unpermute(p, arr)) if arr.ndim else arr

    def close(self) -> None:
        self._raw.close()


class _MsgpackRaw:
    def __init__(self, path: str):
        from nezha_zoo.conversion.msgpack_io import scan_msgpack

        self.path = path
        self._leaves = {"/".join(k): v for k, v in scan_msgpack(path).items()}

    def keys(self) -> list[str]:
        return list(self._leaves)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._leaves[key].shape

    def dtype(self, key: str) -> str:
        return self._leaves[key].dtype

    def get(self, key: str) -> np.ndarray:
        from nezha_zoo.conversion.msgpack_io import read_leaf

        return read_leaf(self.path, self._leaves[key])

    def close(self) -> None:
        self._leaves = {}


def _weights_file(directory: str, fmt: str) -> str:
    return os.path.join(directory, FORMATS[fmt].files[0])


def open_source(path: str | os.PathLike, fmt: str, family: Family, config: PretrainedConfig) -> TensorSource:
    """Open the checkpoint directory ``path`` of format ``fmt`` as a canonical :class:`TensorSource`.

    Args:
        path (str | os.PathLike): checkpoint directory.
        fmt (str): its format (see :func:`detect_format`).
        family (Family): the family named by its ``config.json``.
        config (PretrainedConfig): that config.
    """
    path = os.fspath(path)
    if fmt in ("safetensors", "pytorch-bin"):
        return _SafetensorsSource(path, fmt)
    file = _weights_file(path, fmt)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {os.path.basename(file)} for format {fmt!r}")
    if fmt == "hf-tf":
        from nezha_zoo.conversion.hdf5_io import HfTfH5Reader

        raw: _RawFile = HfTfH5Reader(file)
    elif fmt in ("hf-flax", "flax"):
        raw = _MsgpackRaw(file)
    elif fmt == "keras":
        from nezha_zoo.conversion.keras_io import KerasWeightsReader

        raw = KerasWeightsReader(file, family, config)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {list(FORMATS)}")
    return _LayoutSource(raw, fmt, file, family, config)


def droppable(fmt: str, family: Family, key: str) -> bool:
    """Whether ``key`` is a tensor the format's framework holds and transformers PyTorch does not.

    Args:
        fmt (str): format name.
        family (Family): the checkpoint's family.
        key (str): canonical tensor name.
    """
    pats = LAYOUTS[FORMATS[fmt].layout].droppable.get(family.key, ())
    return any(fnmatch.fnmatchcase(key, pat) for pat in pats)


# --- writing -------------------------------------------------------------------------------------


def write_format(
    fmt: str,
    directory: str,
    family: Family,
    spec: ModelSpec,
    fetch: Callable[[Param], np.ndarray],
    max_shard_size: int | str,
    metadata: dict[str, str],
    config: PretrainedConfig,
) -> list[str]:
    """Write the weights of ``spec`` in format ``fmt`` into ``directory``; returns the file names.

    Args:
        fmt (str): one of ``WRITE_FORMATS``.
        directory (str): an existing (staging) directory.
        family (Family): the family.
        spec (ModelSpec): the class's spec (names, order, kinds).
        fetch (Callable[[Param], np.ndarray]): canonical array of one param.
        max_shard_size (int | str): shard limit of safetensors output.
        metadata (dict[str, str]): safetensors header metadata.
        config (PretrainedConfig): the checkpoint's config.

    ``fetch(param)`` returns the canonical array of one param (already cast); it is called once per
    param, one at a time, in the order the container is written.  ``metadata`` goes into safetensors
    headers; ``config`` is the checkpoint's config (the keras writer loads a model from it).
    """
    if fmt == "safetensors":
        from nezha_zoo.io.writer import save_state_dict

        return save_state_dict(
            directory,
            ((p.name, fetch(p)) for p in spec),
            metadata=metadata,
            max_shard_size=max_shard_size,
            staged=False,  # ``directory`` is the caller's staging directory already
        )
    if fmt not in WRITE_FORMATS:
        raise ValueError(f"cannot write {fmt!r}; writable formats: {list(WRITE_FORMATS)}")
    layout = LAYOUTS[FORMATS[fmt].layout]
    scope = layout.scope_for(spec.is_base, family.base_prefix)
    by_key = {stored_key(fmt, p, scope): p for p in spec}
    if len(by_key) != len(spec):
        raise ValueError(f"{family.key} {spec.head}: two params share a key in the {fmt} layout")

    def stored(key: str) -> np.ndarray:
        p = by_key[key]
        return np.ascontiguousarray(layout.to_stored(p, fetch(p)))

    name = FORMATS[fmt].files[0]
    file = os.path.join(directory, name)
    if fmt == "hf-tf":
        from nezha_zoo.conversion.hdf5_io import tf_model_name, write_hf_tf_h5

        model_name = tf_model_name(family.class_name(spec.head, "tf"))
        write_hf_tf_h5(file, model_name, list(by_key), stored, _relisted(layout, spec, scope, by_key))
    elif fmt in ("hf-flax", "flax"):
        from nezha_zoo.conversion.msgpack_io import write_msgpack_tree

        write_msgpack_tree(file, [tuple(k.split(layout.sep)) for k in by_key], lambda path: stored("/".join(path)))
    elif fmt == "keras":
        from nezha_zoo.conversion.keras_io import write_keras_weights

        write_keras_weights(file, family, spec, by_key, stored, config)
    return [name]


def _relisted(layout: Layout, spec: ModelSpec, scope: str, by_key: dict[str, Param]) -> dict[str, list[str]]:
    """Top-level layer -> stored keys it lists again because it ties another layer's embedding table."""
    if not layout.ties_relist:
        return {}
    out: dict[str, list[str]] = {}
    layers = {k.split(layout.sep)[0] for k in by_key}
    for alias, target in spec.ties.items():
        alias_layer = (f"{scope}.{alias}" if scope else alias).split(".")[0]
        parent = target.rsplit(".", 2)[0]  # "electra.embeddings.word_embeddings.weight" -> "electra.embeddings"
        keys = [k for k, p in by_key.items() if p.name.startswith(parent + ".")]
        # only a layer with variables of its own has a group to list them in (MPT's lm_head has none)
        if keys and alias_layer in layers and keys[0].split(layout.sep)[0] != alias_layer:
            out.setdefault(alias_layer, []).extend(k for k in keys if k not in out.get(alias_layer, []))
    return out
