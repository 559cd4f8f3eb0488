"""Match a checkpoint's tensors to a model spec: total, loud, backend-independent.

:func:`plan_load` decides, for every declared parameter, which checkpoint tensor fills it, handling
the base-model prefix in both directions (a base checkpoint into a head class, a head checkpoint into
a base class) as transformers does.  Every checkpoint tensor is accounted for exactly once: loaded,
a tied alias, a legacy key, or reported as unexpected.  A shape mismatch raises, naming the tensor and
both shapes.  Backends then read each planned tensor, convert it with their layout and assign it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from nezha_zoo.checkpoint import CheckpointError, CheckpointReader
from nezha_zoo.spec.layouts import Layout
from nezha_zoo.spec.param import Kind, ModelSpec

__all__ = ["LoadPlan", "plan_load", "read_planned", "CheckpointError"]

logger = logging.getLogger("nezha_zoo")


@dataclass
class LoadPlan:
    """Outcome of matching a checkpoint to a spec.

    Attributes:
        sources: param name -> checkpoint key that fills it.
        missing_keys: declared params the checkpoint lacks (left at their initial values).
        unexpected_keys: checkpoint keys the model has no use for.
        ignored_keys: tied aliases and legacy buffers, consumed silently.
    """

    sources: dict[str, str] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)

    def info(self) -> dict[str, list[str]]:
        return {
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "mismatched_keys": [],
        }

    def report(self, model_name: str, strict: bool = False) -> None:
        """Log missing and unexpected keys by name; with ``strict``, raise instead."""
        if strict and (self.missing_keys or self.unexpected_keys):
            raise CheckpointError(
                f"{model_name}: checkpoint does not match the model; missing {self.missing_keys}, "
                f"unexpected {self.unexpected_keys}"
            )
        if self.missing_keys:
            logger.warning(
                "%s: %d weight(s) not in the checkpoint, left at their initial values: %s",
                model_name,
                len(self.missing_keys),
                ", ".join(self.missing_keys),
            )
        if self.unexpected_keys:
            logger.warning(
                "%s: %d checkpoint tensor(s) unused by this model: %s",
                model_name,
                len(self.unexpected_keys),
                ", ".join(self.unexpected_keys),
            )


def plan_load(
    spec: ModelSpec, keys: Iterable[str], shape_of: Callable[[str], tuple[int, ...]], prefix: str
) -> LoadPlan:
    """Plan loading checkpoint ``keys`` into ``spec``.

    Args:
        spec: the model's declaration.
        keys: every tensor name in the checkpoint.
        shape_of: canonical shape of a checkpoint tensor.
        prefix: the family's base-model prefix (``"electra"``).
    """
    keys = list(keys)
    key_set = set(keys)
    pre = prefix + "."
    ckpt_has_prefix = any(k.startswith(pre) for k in keys)

    def to_ckpt(name: str) -> str:
        """The checkpoint key that would hold canonical ``name``."""
        if spec.is_base:
            return pre + name if ckpt_has_prefix else name
        if name.startswith(pre) and not ckpt_has_prefix:
            return name[len(pre) :]  # a base checkpoint loaded into a head class
        return name

    plan = LoadPlan()
    used: set[str] = set()
    for p in spec.params:
        k = to_ckpt(p.name)
        if k not in key_set:
            plan.missing_keys.append(p.name)
            continue
        got = tuple(shape_of(k))
        if got != p.shape:
            raise CheckpointError(
                f"tensor {k!r}: the checkpoint has shape {got}, the model ({spec.family} {spec.head}) needs "
                f"{p.shape}; the checkpoint was made for a different config"
            )
        plan.sources[p.name] = k
        used.add(k)
    for alias, target in spec.ties.items():
        k = to_ckpt(alias)
        if k in key_set:
            want = spec[target].shape
            if tuple(shape_of(k)) != want:
                raise CheckpointError(
                    f"tied tensor {k!r}: the checkpoint has shape {tuple(shape_of(k))}, the model needs {want}"
                )
            if target in plan.missing_keys:
                # Only the alias was saved: it holds the shared tensor (as transformers' tying does).
                plan.missing_keys.remove(target)
                plan.sources[target] = k
            else:
                plan.ignored_keys.append(k)
            used.add(k)
    for k in keys:
        if k in used:
            continue
        canon = k if not (spec.is_base and ckpt_has_prefix) else k.removeprefix(pre)
        if spec.is_ignored(k) or spec.is_ignored(canon) or spec.is_ignored(pre + k):
            plan.ignored_keys.append(k)
        else:
            plan.unexpected_keys.append(k)
    return plan


def read_planned(
    reader: CheckpointReader, spec: ModelSpec, plan: LoadPlan, layout: Layout, dtype: np.dtype | str = np.float32
) -> Iterable[tuple[str, np.ndarray]]:
    """Yield ``(param name, array in layout order)`` for every planned tensor, one at a time."""
    for name, key in plan.sources.items():
        p = spec[name]
        arr = np.asarray(reader.get(key))
        if p.kind is not Kind.BUFFER and arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
            raise CheckpointError(f"tensor {key!r} has dtype {arr.dtype}, expected floating point")
        arr = arr.astype(dtype, copy=False)
        yield name, layout.to_stored(p, arr)
