"""Keras 3 ``model.weights.h5`` (``keras.Model.save_weights``) of nezha_zoo's TF models.

Keras 3 stores each layer's variables as datasets ``<object path>/vars/0``, ``/vars/1``... in the
order the layer created them; the group's attribute ``name`` is the layer's name.  The object path
follows Python attribute names (``self_attention``, ``layers/tf_bert_layer_1``...), which only the
TF backend's code knows, but the chain of ``name`` attributes above a variable is its Keras variable
path, i.e. ``LAYOUTS["keras"].key(param)`` without the leaf.  Reading therefore needs only h5py and
the spec: a layer's datasets are its params in spec order (kernel before bias, gamma before beta),
each shape-checked.

Writing needs the object paths, so it runs the TF backend in a subprocess
(``python -m nezha_zoo.conversion.keras_io --export``): the converted canonical weights are loaded
with ``strict=True`` and saved with ``save_weights``.  That direction holds the model in memory once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Mapping

import numpy as np

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.io.child import run_child
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import ModelSpec, Param
from nezha_zoo.spec.registry import Family

__all__ = ["KerasWeightsReader", "write_keras_weights"]

_LAYOUT = LAYOUTS["keras"]


class KerasWeightsReader:
    """The variables of a Keras 3 ``.weights.h5`` by their ``LAYOUTS["keras"]`` keys."""

    def __init__(self, path: str | os.PathLike, family: Family, config: PretrainedConfig):
        import h5py

        self.path = os.fspath(path)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise CheckpointError(f"{self.path}: unreadable HDF5 file ({e})") from e
        leaves: dict[str, list[str]] = {}  # module key -> leaf names in spec order
        for head in family.heads:
            try:
                spec = family.model_spec(config, head)
            except (ValueError, NotImplementedError):
                continue
            for p in spec:
                *module, leaf = _LAYOUT.path(p)
                names = leaves.setdefault("/".join(module), [])
                if leaf not in names:
                    names.append(leaf)
        self._where: dict[str, str] = {}  # key -> dataset path
        groups: list[tuple[str, str]] = []
        self._f.visititems(lambda name, obj: groups.append((name, obj)) if _is_vars(name, obj) else None)
        for group_path, group in groups:
            module = self._layer_path(group_path)
            names = leaves.get(module, [])
            for i in range(len(group)):
                if str(i) not in group:
                    raise CheckpointError(f"{self.path}: {group_path} lacks variable {i}")
                leaf = names[i] if i < len(names) else f"vars/{i}"
                key = f"{module}/{leaf}" if module else leaf
                if key in self._where:
                    raise CheckpointError(f"{self.path}: two layers are both named {module!r}")
                self._where[key] = f"{group_path}/{i}"
        if not self._where and "vars" not in self._f:
            raise CheckpointError(f"{self.path}: not a Keras 3 weights file (no 'vars' groups)")

    def _layer_path(self, vars_path: str) -> str:
        """The chain of layer names above ``<object path>/vars``, without the model's own name."""
        parts = vars_path.split("/")[:-1]
        names = []
        for i in range(1, len(parts) + 1):
            g = self._f["/".join(parts[:i])]
            if "vars" in g and "name" in g["vars"].attrs:
                names.append(_text(g["vars"].attrs["name"]))
        return "/".join(names)

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f[self._where[key]].shape)

    def dtype(self, key: str) -> np.dtype:
        return self._f[self._where[key]].dtype

    def get(self, key: str) -> np.ndarray:
        try:
            return np.asarray(self._f[self._where[key]][()])
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot read {key!r} ({e})") from e

    def close(self) -> None:
        self._f.close()


def _is_vars(name: str, obj) -> bool:
    return name.split("/")[-1] == "vars" and hasattr(obj, "keys") and len(obj) > 0


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def write_keras_weights(
    path: str,
    family: Family,
    spec: ModelSpec,
    by_key: Mapping[str, Param],
    stored: Callable[[str], np.ndarray],
    config: PretrainedConfig,
) -> None:
    """Write ``model.weights.h5`` through the TF backend in a subprocess (see the module docstring).

    Args:
        path (str): output file.
        family (Family): the family.
        spec (ModelSpec): the class's spec.
        by_key (Mapping[str, Param]): keras key -> param.
        stored (Callable[[str], np.ndarray]): the keras-layout array of a key.
        config (PretrainedConfig): the checkpoint's config.
    """
    from nezha_zoo.config import CONFIG_NAME
    from nezha_zoo.io.writer import save_state_dict

    cfg = config.copy()
    cfg.architectures = [family.class_name(spec.head, "pt")]
    with tempfile.TemporaryDirectory(prefix=".keras-export-", dir=os.path.dirname(os.path.abspath(path))) as tmp:
        canonical = ((p.name, _LAYOUT.from_stored(p, stored(k))) for k, p in by_key.items())
        # tmp is private to this run (inside the caller's staging directory): no lock, no staging
        save_state_dict(tmp, canonical, extra_files={CONFIG_NAME: cfg.to_json_string()}, staged=False)
        cmd = [sys.executable, "-m", "nezha_zoo.conversion.keras_io", "--export", tmp, spec.head, path]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        proc = run_child(cmd, env=env)  # dies with us: no orphan writing into a dead run's staging
        if proc.returncode != 0 or not os.path.isfile(path):
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise CheckpointError(f"writing {os.path.basename(path)} with the TF backend failed: {tail}")


def _export(directory: str, head: str, out: str) -> int:
    from nezha_zoo.auto import AutoConfig
    from nezha_zoo.spec.registry import family_of_config, model_class

    config = AutoConfig.from_pretrained(directory)
    family = family_of_config(config)
    try:
        cls = model_class(family, head, "tf")
    except ValueError as err:
        raise SystemExit(f"{err}; the keras format needs the family's TF classes") from None
    model = cls.from_pretrained(directory, strict=True)
    model.save_weights(out)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m nezha_zoo.conversion.keras_io")
    parser.add_argument("--export", nargs=3, metavar=("CANONICAL_DIR", "HEAD", "OUT"), required=True)
    sys.exit(_export(*parser.parse_args().export))
