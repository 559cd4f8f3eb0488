"""Which head a checkpoint is: the tensors decide, not ``config.json``'s ``architectures``.

Published checkpoints are often re-saved by other libraries: ``architectures`` names
``MPNetForMaskedLM`` while the file holds the bare encoder with a pooler, or names the base class
while the file holds a head.  :func:`resolve_head` matches the tensor names and shapes against the
spec of every head of the family (with :func:`~nezha_zoo.io.plan.plan_load`, so the base-model prefix
is handled in both directions and legacy buffers are ignored exactly as loading does) and picks the
head they fit exactly, the one ``config.json`` names when it fits.  The tools (``inspect``,
``verify``, ``convert``) all decide through it; none imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from nezha_zoo.config import PretrainedConfig
from nezha_zoo.io.dtype_names import SAFETENSORS_DTYPES
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.plan import LoadPlan, plan_load
from nezha_zoo.spec.param import Kind, ModelSpec
from nezha_zoo.spec.registry import Family

__all__ = [
    "HeadResolution",
    "resolve_head",
    "claimed_head",
    "head_of_name",
    "describe",
    "without_pooler",
    "validity_errors",
]

_POOLER = "pooler."


def without_pooler(spec: ModelSpec) -> ModelSpec:
    """The base spec without its pooler: transformers' ``XModel(add_pooling_layer=False)``."""
    return replace(spec, params=tuple(p for p in spec if not p.name.startswith(_POOLER)))


def head_of_name(family: Family, name: str) -> str | None:
    """The head a class name (``MPNetForMaskedLM``, ``TFMPNetModel``...) or head name denotes, or None."""
    if name in family.heads:
        return name
    for head in family.heads:
        if any(family.class_name(head, backend) == name for backend in ("pt", "tf", "flax")):
            return head
    return None


def claimed_head(family: Family, config: PretrainedConfig) -> str | None:
    """The head ``config.json``'s ``architectures`` names (its first name of this family), or None."""
    for arch in config.architectures or []:
        head = head_of_name(family, arch)
        if head is not None:
            return head
    return None


@dataclass(frozen=True)
class HeadResolution:
    """The outcome of :func:`resolve_head`.

    Attributes:
        head (str): the head to use (the exact match, the forced head, or the closest one).
        spec (ModelSpec): its spec; a base without pooler when the tensors hold none.
        plan (LoadPlan): the tensors matched to ``spec``.
        exact (bool): the tensors are exactly this head (nothing missing, nothing unexpected).
        claimed (str | None): the head ``config.json``'s ``architectures`` names.
        note (str | None): one line for the user when the tensors overrule ``config.json``.
        family (Family): the checkpoint's family.
        pooler (bool | None): for a base whose spec declares a pooler, whether the tensors hold it;
            None for heads and for families whose base has none.
        dropped (tuple[str, ...]): unexpected keys only the source's framework holds (droppable).
        forced (bool): the head was forced (``--head``), not decided by the tensors.
    """

    head: str
    spec: ModelSpec
    plan: LoadPlan
    exact: bool
    claimed: str | None
    note: str | None
    family: Family
    pooler: bool | None = None
    dropped: tuple[str, ...] = ()
    forced: bool = False

    @property
    def unexpected_keys(self) -> list[str]:
        """The plan's unexpected keys less the droppable ones."""
        return [k for k in self.plan.unexpected_keys if k not in self.dropped]

    @property
    def claimed_class(self) -> str | None:
        """The class ``config.json`` names (``MPNetForMaskedLM``), or None."""
        return None if self.claimed is None else self.family.class_name(self.claimed)

    @property
    def tensors_class(self) -> str | None:
        """What the tensors are (``MPNetModel (with pooler)``), or None when no head fits exactly."""
        return describe(self.family, self.head, self.pooler) if self.exact else None

    def mismatch_message(self) -> str:
        """The error for an inexact match: what is missing and unexpected, and the ``--head`` to pass."""
        name = self.family.class_name(self.head)
        diff = f"missing {self.plan.missing_keys or 'none'}; unexpected {self.unexpected_keys or 'none'}"
        if self.forced:
            return f"the tensors do not match {name} (--head {self.head}): {diff}"
        said = _said(self.family, self.claimed)
        return (
            f"{said}; the tensors match no {self.family.class_prefix} head exactly; the closest is {name} "
            f"(--head {self.head}): {diff}"
        )


def validity_errors(found: HeadResolution, dtype_of: Callable[[str], str]) -> list[str]:
    """Why a checkpoint is not a valid ``found.head``: an empty list when it is.

    The one rule ``inspect``, ``verify`` and ``convert`` share: the tensors fit the head exactly
    (:meth:`HeadResolution.mismatch_message` otherwise), and every parameter (buffers aside: they
    may be integer) is stored as floating point, so int64 weights are refused, not cast.

    Args:
        found (HeadResolution): the outcome of :func:`resolve_head` for the checkpoint.
        dtype_of (Callable[[str], str]): the safetensors dtype name (``F32``, ``I64``...) of a stored key.
    """
    errors = [] if found.exact else [found.mismatch_message()]
    for p in found.spec:
        key = found.plan.sources.get(p.name)
        if key is None or p.kind is Kind.BUFFER:
            continue
        st = dtype_of(key)
        if not _is_float_name(SAFETENSORS_DTYPES.get(st, st.lower())):
            errors.append(f"tensor {key!r} has dtype {st}, expected floating point")
    return errors


def _is_float_name(numpy_name: str) -> bool:
    return numpy_name.startswith(("float", "bfloat"))


def describe(family: Family, head: str, pooler: bool | None = None) -> str:
    """``MPNetModel (with pooler)`` / ``MPNetModel (without pooler)`` / ``MPNetForMaskedLM``.

    Args:
        family (Family): the family.
        head (str): the head.
        pooler (bool | None): for a base whose spec has a pooler, whether the tensors hold it.
    """
    name = family.class_name(head)
    return name if pooler is None else f"{name} ({'with' if pooler else 'without'} pooler)"


def _variants(family: Family, config: PretrainedConfig, head: str) -> list[tuple[ModelSpec, bool | None]]:
    """The specs a checkpoint of ``head`` can have, with their pooler state (see ``HeadResolution``)."""
    spec = family.model_spec(config, head)
    if spec.is_base and any(p.name.startswith(_POOLER) for p in spec):
        return [(spec, True), (without_pooler(spec), False)]
    return [(spec, None)]


def resolve_head(
    family: Family,
    config: PretrainedConfig,
    keys: Iterable[str],
    shape_of: Callable[[str], tuple[int, ...]],
    head: str | None = None,
    droppable: Callable[[str], bool] | None = None,
) -> HeadResolution:
    """Decide which head of ``family`` a checkpoint's tensors are.

    Every head's spec (and the base without its pooler, where the base has one) is matched against
    the tensor names and shapes.  The head ``config.json``'s ``architectures`` names is used when the
    tensors fit it exactly; otherwise the first head they fit exactly (in the family's order), with a
    one-line ``note`` (naming the other heads with the very same tensors, e.g. a causal and a masked
    LM head); otherwise the closest head (fewest missing + unexpected), with ``exact=False``.

    Args:
        family (Family): the checkpoint's family.
        config (PretrainedConfig): its config (sizes; ``architectures`` is the claim).
        keys (Iterable[str]): every tensor name in the checkpoint (canonical PyTorch names).
        shape_of (Callable[[str], tuple[int, ...]]): canonical shape of a tensor.
        head (str | None): a head (``"Model"``) or class name the user forced (``--head``); only
            its variants are considered and no note is made.
        droppable (Callable[[str], bool] | None): keys the source's framework holds that transformers
            PyTorch does not (not counted as unexpected).

    Returns:
        HeadResolution: the head, its spec and load plan, whether it fits exactly, and the note.

    Raises:
        ValueError: ``head`` is not a head of the family.
        CheckpointError: a tensor's shape fits no head (the claimed or forced head's error).
    """
    keys = list(keys)
    claimed = claimed_head(family, config)
    forced = None
    if head is not None:
        forced = head_of_name(family, head)
        if forced is None:
            raise ValueError(
                f"{family.class_prefix} has no head {head!r}; heads: {list(family.heads)} "
                f"(or their class names, e.g. {family.class_name(family.heads[-1])})"
            )
    first = forced or claimed
    order = [first] if first else []
    order += [h for h in family.heads if h != first and forced is None]
    matches: list[tuple[int, ModelSpec, LoadPlan, bool | None, tuple[str, ...]]] = []
    shape_error: CheckpointError | None = None
    for h in order:
        try:
            variants = _variants(family, config, h)
        except ValueError:
            if h == forced:
                raise
            continue  # a head this config cannot build (e.g. QA with num_labels != 2)
        for spec, pooler in variants:
            try:
                plan = plan_load(spec, keys, shape_of, family.base_prefix)
            except CheckpointError as e:
                if h == first and shape_error is None:
                    shape_error = e
                continue
            dropped = tuple(k for k in plan.unexpected_keys if droppable is not None and droppable(k))
            score = len(plan.missing_keys) + len(plan.unexpected_keys) - len(dropped)
            matches.append((score, spec, plan, pooler, dropped))
    if not matches:
        if shape_error is not None:
            raise shape_error
        raise CheckpointError(f"no {family.class_prefix} head matches the checkpoint's tensor shapes")
    score, spec, plan, pooler, dropped = min(matches, key=lambda m: m[0])  # first of the best: claimed, then in order
    exact = score == 0
    note = None
    if exact and forced is None and (spec.head != claimed or pooler is False):
        said = _said(family, claimed)
        using = family.class_name(spec.head) + (" without pooler" if pooler is False else "")
        same = [family.class_name(m[1].head) for m in matches if m[0] == 0 and m[1].head != spec.head]
        also = f" (as are {', '.join(same)}'s: --head chooses)" if same else ""
        note = f"{said}; the tensors are {describe(family, spec.head, pooler)}{also}: using {using}"
    return HeadResolution(spec.head, spec, plan, exact, claimed, note, family, pooler, dropped, forced is not None)


def _said(family: Family, claimed: str | None) -> str:
    if claimed is None:
        return f"config.json names no {family.class_prefix} class"
    return f"config.json names {family.class_name(claimed)}"
