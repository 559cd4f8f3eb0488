"""Partition rules from the spec's logical axes: how every parameter is split over a device mesh.

No parameter is named here.  A rule set maps logical axes (``vocab``, ``hidden``, ``kv``, ``mlp``...,
see :data:`nezha_zoo.spec.param.AXES`) to mesh axes (``"data"``, ``"model"``); a parameter's
partition is read off its declared axes, in the storage order of a layout.  Three rule sets cover the
usual choices:

* ``"dp"``: data parallel.  Every parameter replicated; the batch is split over ``data``.
* ``"fsdp"``: fully sharded data parallel (ZeRO-3 style).  Each parameter split over ``data`` along
  its model-width axis (``hidden``/``embed``), gathered for use by the compiler; the batch is split
  over ``data`` too.
* ``"tp"``: tensor parallel (Megatron style).  Attention heads (``kv``, ``qkv``), the feed-forward
  inner width (``mlp``) and the vocabulary split over ``model``; width-only tensors replicated.  With
  a 2-D mesh the batch is still split over ``data``.
* ``"fsdp+tp"``: both, on a 2-D ``(data, model)`` mesh.

A mesh axis is used at most once per parameter (the first matching tensor axis wins), and a tensor
axis whose size the mesh axis does not divide is left whole, so every rule set applies to every
family and config.  This module is framework-neutral: it yields partition specs as tuples; the
backends turn them into ``jax.sharding.PartitionSpec`` or decide FSDP wrapping from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from nezha_zoo.spec.layouts import Layout
from nezha_zoo.spec.param import AXES, ModelSpec, Param

__all__ = [
    "RULE_SETS",
    "DATA",
    "MODEL",
    "Rules",
    "get_rules",
    "partition",
    "partitions",
    "per_device_bytes",
    "memory_table",
]

DATA, MODEL = "data", "model"

#: Logical axis -> mesh axis, per rule set.  Axes absent from a rule set are replicated.
RULE_SETS: dict[str, dict[str, str]] = {
    "dp": {},
    "fsdp": {"hidden": DATA, "embed": DATA},
    "tp": {"kv": MODEL, "qkv": MODEL, "mlp": MODEL, "vocab": MODEL},
    "fsdp+tp": {"kv": MODEL, "qkv": MODEL, "mlp": MODEL, "vocab": MODEL, "hidden": DATA, "embed": DATA},
}


@dataclass(frozen=True)
class Rules:
    """A named rule set: ``axis_rules`` maps logical axes to mesh axes; the batch goes over ``data``."""

    name: str
    axis_rules: Mapping[str, str]
    batch_axis: str = DATA

    def __post_init__(self) -> None:
        unknown = set(self.axis_rules) - AXES
        if unknown:
            raise ValueError(f"rules {self.name!r}: unknown logical axes {sorted(unknown)}; known: {sorted(AXES)}")


def get_rules(rules: str | Rules | Mapping[str, str]) -> Rules:
    """A :class:`Rules` from a rule-set name (``"dp"``, ``"fsdp"``, ``"tp"``, ``"fsdp+tp"``) or a mapping."""
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ValueError(f"unknown rule set {rules!r}; choose one of {sorted(RULE_SETS)}")
        return Rules(rules, RULE_SETS[rules])
    return Rules("custom", dict(rules))


def partition(
    p: Param, layout: Layout, rules: str | Rules | Mapping[str, str], mesh_shape: Mapping[str, int]
) -> tuple[str | None, ...]:
    """The mesh axis of each stored axis of ``p`` (None = not split), in ``layout``'s storage order.

    ``mesh_shape`` maps mesh axis names to sizes (``{"data": 4, "model": 2}``).  A mesh axis absent
    from the mesh, already used by an earlier axis of ``p``, or not dividing the axis size leaves
    that axis whole.
    """
    r = get_rules(rules)
    used: set[str] = set()
    out: list[str | None] = []
    for size, axis in zip(layout.shape(p), layout.axes(p)):
        mesh_axis = r.axis_rules.get(axis)
        n = mesh_shape.get(mesh_axis, 1) if mesh_axis else 1
        if mesh_axis is None or mesh_axis in used or n <= 1 or size % n:
            out.append(None)
            continue
        used.add(mesh_axis)
        out.append(mesh_axis)
    return tuple(out)


def partitions(
    spec: ModelSpec, layout: Layout, rules: str | Rules | Mapping[str, str], mesh_shape: Mapping[str, int]
) -> dict[str, tuple[str | None, ...]]:
    """:func:`partition` of every parameter of ``spec``, by canonical name."""
    return {p.name: partition(p, layout, rules, mesh_shape) for p in spec}


def per_device_bytes(
    spec: ModelSpec,
    layout: Layout,
    rules: str | Rules | Mapping[str, str],
    mesh_shape: Mapping[str, int],
    bytes_per_element: int = 4,
) -> int:
    """Parameter bytes each device holds under ``rules`` (shapes only; nothing is allocated)."""
    total = 0
    for p in spec:
        elements = int(np.prod(layout.shape(p), dtype=np.int64))
        split = 1
        for mesh_axis in partition(p, layout, rules, mesh_shape):
            if mesh_axis is not None:
                split *= mesh_shape[mesh_axis]
        total += elements // split
    return total * bytes_per_element


def memory_table(
    spec: ModelSpec,
    layout: Layout,
    meshes: Mapping[str, Mapping[str, int]],
    bytes_per_element: int = 4,
) -> list[dict[str, object]]:
    """Per-device parameter memory for each ``rule set -> mesh shape`` of ``meshes``, as table rows."""
    whole = per_device_bytes(spec, layout, "dp", {}, bytes_per_element)
    rows = []
    for name, mesh_shape in meshes.items():
        b = per_device_bytes(spec, layout, name, mesh_shape, bytes_per_element)
        devices = int(np.prod(list(mesh_shape.values()), dtype=np.int64))
        rows.append(
            {
                "rules": name,
                "mesh": dict(mesh_shape),
                "devices": devices,
                "bytes_per_device": b,
                "fraction_of_model": b / whole,
            }
        )
    return rows
