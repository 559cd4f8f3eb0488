"""HDF5 weight files read and written with h5py alone (no TensorFlow): transformers' ``tf_model.h5``.

``tf_model.h5`` is tf-keras's ``save_weights`` format: the root attribute ``layer_names`` lists the
model's top-level layers; each has a group of that name whose attribute ``weight_names`` lists its
variables' full names (``tf_electra_for_masked_lm/electra/.../kernel:0``), each stored as a dataset
at ``<layer>/<full name>``.  A layer that reaches another's variables (a tied LM head) lists them
again, so names repeat across groups.  Attributes above HDF5's 64 KB header limit are split into
``weight_names0``, ``weight_names1``... as tf-keras does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from nezha_zoo.io.errors import CheckpointError

__all__ = ["HfTfH5Reader", "write_hf_tf_h5", "tf_model_name", "HDF5_OBJECT_HEADER_LIMIT"]

#: tf-keras's limit on one attribute's size before it splits it.
HDF5_OBJECT_HEADER_LIMIT = 64512
#: Version recorded in files we write: the tf-keras save format they follow.
_KERAS2_FORMAT_VERSION = "2.21.0"


def tf_model_name(class_name: str) -> str:
    """Keras-2's default layer name of a class (``TFMPNetForMaskedLM`` -> ``tfmp_net_for_masked_lm``).

    Args:
        class_name (str): the TF class name.
    """
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()


def _h5py():
    import h5py

    return h5py


def _load_attr(group: Any, name: str) -> list[str]:
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, i = [], 0
        while f"{name}{i}" in group.attrs:
            values += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _save_attr(group: Any, name: str, values: list[str]) -> None:
    data = np.asarray([v.encode("utf-8") for v in values]) if values else np.asarray([], dtype=np.float64)
    chunks = 1
    parts = [data]
    while any(p.nbytes > HDF5_OBJECT_HEADER_LIMIT for p in parts):
        chunks += 1
        parts = np.array_split(data, chunks)
    if chunks == 1:
        group.attrs[name] = data
    else:
        for i, part in enumerate(parts):
            group.attrs[f"{name}{i}"] = part


class HfTfH5Reader:
    """The variables of a ``tf_model.h5`` by name minus the model's scope (``electra/.../kernel:0``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        h5py = _h5py()
        try:
            self._f = h5py.File(self.path, "r")
            layers = _load_attr(self._f, "layer_names")
        except OSError as e:
            raise CheckpointError(f"{self.path}: unreadable HDF5 file ({e})") from e
        if "layer_names" not in self._f.attrs and "layer_names0" not in self._f.attrs:
            raise CheckpointError(f"{self.path}: not a Keras-2 weights file (no 'layer_names' attribute)")
        self._where: dict[str, tuple[str, str]] = {}  # key -> (layer group, full name)
        for layer in layers:
            if layer not in self._f:
                raise CheckpointError(f"{self.path}: layer {layer!r} is listed but has no group")
            group = self._f[layer]
            for full in _load_attr(group, "weight_names"):
                if full not in group:
                    raise CheckpointError(f"{self.path}: weight {full!r} of layer {layer!r} is listed but absent")
                key = full.split("/", 1)[1] if "/" in full else full
                if key in self._where:
                    if group[full].shape != self._dataset(key).shape:
                        raise CheckpointError(f"{self.path}: {key!r} is stored twice with different shapes")
                    continue  # a tied layer's second listing of the same variable
                self._where[key] = (layer, full)

    def _dataset(self, key: str):
        layer, full = self._where[key]
        return self._f[layer][full]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._dataset(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return self._dataset(key).dtype

    def get(self, key: str) -> np.ndarray:
        try:
            return np.asarray(self._dataset(key)[()])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read {key!r} ({e})") from e

    def close(self) -> None:
        self._f.close()


def write_hf_tf_h5(
    path: str | os.PathLike,
    model_name: str,
    keys: Iterable[str],
    fetch: Callable[[str], np.ndarray],
    relist: Mapping[str, list[str]] | None = None,
) -> None:
    """Write a ``tf_model.h5`` holding ``keys`` (names minus the model scope), one dataset at a time.

    The first component of each key is its top-level layer; ``fetch(key)`` gives the array.
    ``relist`` (layer -> keys of other layers) lists shared variables in a second layer's group too,
    as hard links to the one dataset (transformers' loader reads every group it lists).

    Args:
        path (str | os.PathLike): output file.
        model_name (str): the model's Keras name (first component of every weight name).
        keys (Iterable[str]): variable names minus the model scope, in order.
        fetch (Callable[[str], np.ndarray]): the array of a key.
        relist (Mapping[str, list[str]] | None): extra listings, see above.
    """
    h5py = _h5py()
    keys = list(keys)
    layers: dict[str, list[str]] = {}
    for k in keys:
        layers.setdefault(k.split("/", 1)[0], []).append(k)
    relist = dict(relist or {})
    unknown = set(relist) - set(layers)
    if unknown:
        raise ValueError(f"relisting variables in unknown layers {sorted(unknown)}")
    with h5py.File(os.fspath(path), "w") as f:
        _save_attr(f, "layer_names", list(layers))
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = _KERAS2_FORMAT_VERSION.encode()
        for layer in sorted(layers):  # tf-keras creates the groups in name order
            g = f.create_group(layer)
            for k in layers[layer]:
                arr = np.asarray(fetch(k))
                if arr.dtype.name not in ("float32", "float16", "float64") and arr.dtype.kind != "i":
                    raise CheckpointError(f"{k}: HDF5 cannot hold {arr.dtype} tensors; convert with --dtype float32")
                g.create_dataset(f"{model_name}/{k}", data=arr)
        for layer in layers:
            g = f[layer]
            for k in relist.get(layer, []):
                full = f"{model_name}/{k}"
                g[full] = f[k.split("/", 1)[0]][full]  # a hard link: no second copy of the data
            _save_attr(g, "weight_names", [f"{model_name}/{k}" for k in layers[layer] + relist.get(layer, [])])
        _save_attr(f.create_group("top_level_model_weights"), "weight_names", [])
