"""Storage layouts are data: one :class:`Layout` per backend or file format.

A layout says, per :class:`~nezha_zoo.spec.param.Kind`, what the tensor's leaf is called and how its
axes are permuted relative to the canonical (PyTorch) order.  Keys, shapes, logical axes and the
tensor transforms in both directions all follow from that, for every parameter of every family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from nezha_zoo.spec.param import Kind, Param

__all__ = ["Layout", "LAYOUTS", "get_layout"]

_DENSE_T = (1, 0)  # canonical (out, in) <-> (in, out)


@dataclass(frozen=True)
class Layout:
    """How one backend or file format stores a parameter.

    Args:
        name: layout key (``"pt"``, ``"flax"``, ``"keras"``).
        sep: separator between path components in keys.
        leaf: kind -> leaf name; kinds not listed keep the canonical leaf.
        perm: kind -> axis permutation from canonical to stored order; absent = identity.
        collection: kind -> variable collection (Flax keeps buffers out of ``"params"``).
    """

    name: str
    sep: str = "."
    leaf: Mapping[Kind, str] = field(default_factory=dict)
    perm: Mapping[Kind, tuple[int, ...]] = field(default_factory=dict)
    collection: Mapping[Kind, str] = field(default_factory=dict)

    def key(self, p: Param) -> str:
        """The stored key of ``p``: its module path joined by ``sep`` plus the layout's leaf."""
        path = p.module.split(".") if p.module else []
        return self.sep.join([*path, self.leaf.get(p.kind, p.leaf)])

    def path(self, p: Param) -> tuple[str, ...]:
        """The key as a tuple of components (the nesting of a Flax or Keras tree)."""
        return tuple(self.key(p).split(self.sep))

    def collection_of(self, p: Param) -> str:
        return self.collection.get(p.kind, "params")

    def _perm(self, p: Param) -> tuple[int, ...] | None:
        perm = self.perm.get(p.kind)
        if perm is None or len(perm) != len(p.shape):
            return None
        return perm

    def shape(self, p: Param) -> tuple[int, ...]:
        perm = self._perm(p)
        return p.shape if perm is None else tuple(p.shape[i] for i in perm)

    def axes(self, p: Param) -> tuple[str, ...]:
        perm = self._perm(p)
        return p.axes if perm is None else tuple(p.axes[i] for i in perm)

    def to_stored(self, p: Param, canonical: np.ndarray) -> np.ndarray:
        """Canonical array -> this layout's array (shape checked)."""
        _check_shape(p, canonical.shape, p.shape, "canonical")
        perm = self._perm(p)
        return canonical if perm is None else np.transpose(canonical, perm)

    def canonical_index(self, p: Param, stored_index: tuple) -> tuple:
        """The canonical-order index that selects what ``stored_index`` selects in this layout.

        ``stored_index`` holds one entry (a slice or an int) per stored axis; reading the canonical
        tensor at the result and applying :meth:`to_stored` gives the stored tensor at
        ``stored_index``.  Lets a sharded loader read only its block of a tensor from a checkpoint.
        """
        perm = self._perm(p)
        if perm is None:
            return tuple(stored_index)
        out: list = [slice(None)] * len(perm)
        for stored_axis, canonical_axis in enumerate(perm):
            out[canonical_axis] = stored_index[stored_axis]
        return tuple(out)

    def to_stored_block(self, p: Param, canonical_block: np.ndarray) -> np.ndarray:
        """A block of the canonical tensor (read at :meth:`canonical_index`) in this layout's order."""
        perm = self._perm(p)
        return canonical_block if perm is None else np.transpose(canonical_block, perm)

    def from_stored(self, p: Param, stored: np.ndarray) -> np.ndarray:
        """This layout's array -> canonical array (shape checked)."""
        _check_shape(p, stored.shape, self.shape(p), self.name)
        perm = self._perm(p)
        return stored if perm is None else np.transpose(stored, np.argsort(perm))


def _check_shape(p: Param, got: tuple[int, ...], want: tuple[int, ...], where: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{p.name}: {where} tensor has shape {tuple(got)}, the spec needs {tuple(want)}")


LAYOUTS: dict[str, Layout] = {
    # transformers PyTorch state dicts: the canonical layout itself.
    "pt": Layout("pt"),
    # Flax linen: nn.Dense kernels are (in, out); LayerNorm has scale/bias; nn.Embed has embedding.
    "flax": Layout(
        "flax",
        sep="/",
        leaf={
            Kind.DENSE: "kernel",
            Kind.EMBEDDING: "embedding",
            Kind.NORM_SCALE: "scale",
            Kind.NORM_BIAS: "bias",
        },
        perm={Kind.DENSE: _DENSE_T},
        collection={Kind.BUFFER: "buffers"},
    ),
    # Keras 3: Dense kernel (in, out), Embedding "embeddings", LayerNormalization gamma/beta.
    "keras": Layout(
        "keras",
        sep="/",
        leaf={
            Kind.DENSE: "kernel",
            Kind.EMBEDDING: "embeddings",
            Kind.NORM_SCALE: "gamma",
            Kind.NORM_BIAS: "beta",
        },
        perm={Kind.DENSE: _DENSE_T},
    ),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; known: {sorted(LAYOUTS)}") from None
