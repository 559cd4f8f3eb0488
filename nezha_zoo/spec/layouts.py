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
        module_leaf: ``(kind, module basename)`` -> leaf, for a framework that names one module's
            leaf differently from its kind's rule (transformers TF: ``word_embeddings/weight``).
        index_join: joins a numeric path component (a list index) to the one before it
            (transformers TF: ``layer_._0``); None keeps it a component of its own.
        suffix: appended to every key (TF variable names end in ``:0``).
        base_scoped: the base class keeps its params under the family's base prefix too (transformers
            TF's main layer ``electra/...`` in ``TFElectraModel``); see :meth:`scope_for`.
        droppable: family key -> glob patterns of canonical names that the framework's files hold but
            transformers' PyTorch class does not (TF MPNet builds a pooler in every head); read and
            dropped, never written.
        ties_relist: a top-level layer that ties another layer's embedding table also lists the
            variables of that table's parent module (tf-keras tracks the whole shared embeddings
            layer), as transformers TF's ``tf_model.h5`` does.
    """

    name: str
    sep: str = "."
    leaf: Mapping[Kind, str] = field(default_factory=dict)
    perm: Mapping[Kind, tuple[int, ...]] = field(default_factory=dict)
    collection: Mapping[Kind, str] = field(default_factory=dict)
    module_leaf: Mapping[tuple[Kind, str], str] = field(default_factory=dict)
    index_join: str | None = None
    suffix: str = ""
    base_scoped: bool = False
    droppable: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ties_relist: bool = False

    def key(self, p: Param, scope: str = "") -> str:
        """The stored key of ``p``: its module path joined by ``sep`` plus the layout's leaf.

        Args:
            p (Param): the parameter.
            scope (str): a dotted prefix put before the canonical name first (see :meth:`scope_for`).
        """
        return self.sep.join(self.path(p, scope)) + self.suffix

    def path(self, p: Param, scope: str = "") -> tuple[str, ...]:
        """The key as a tuple of components (the nesting of a Flax or Keras tree), without ``suffix``."""
        module = f"{scope}.{p.module}" if scope and p.module else (scope or p.module)
        parts: list[str] = []
        for part in module.split(".") if module else []:
            if self.index_join is not None and parts and part.isdigit():
                parts[-1] = f"{parts[-1]}{self.index_join}{part}"
            else:
                parts.append(part)
        module_name = module.rpartition(".")[2]
        leaf = self.module_leaf.get((p.kind, module_name), self.leaf.get(p.kind, p.leaf))
        return (*parts, leaf)

    def scope_for(self, is_base: bool, base_prefix: str) -> str:
        """The scope of a class's params: the family's base prefix for a base class when ``base_scoped``."""
        return base_prefix if (self.base_scoped and is_base) else ""

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

    def canonical_shape(self, p: Param, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The canonical shape of a stored tensor of ``p``'s kind and rank, whatever its sizes.

        A checkpoint reader maps a stored tensor back before it knows which class (and so which
        sizes) it will be checked against; the caller checks the result against the spec.
        """
        perm = self.perm.get(p.kind)
        if perm is None or len(perm) != len(stored_shape):
            return tuple(stored_shape)
        inverse = np.argsort(perm)
        return tuple(int(stored_shape[i]) for i in inverse)

    def unpermute(self, p: Param, stored: np.ndarray) -> np.ndarray:
        """``stored`` in canonical axis order by ``p``'s kind (no size check; see :meth:`canonical_shape`)."""
        perm = self.perm.get(p.kind)
        if perm is None or len(perm) != stored.ndim:
            return stored
        return np.transpose(stored, np.argsort(perm))

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
    # transformers TF (tf-keras) variable names, minus the model's own scope, as ``tf_model.h5`` holds
    # them: Keras-2 leaves, ``layer_._N`` lists, ``:0`` suffixes, the main layer scope even in the base
    # class, and word embeddings created as ``word_embeddings/weight`` (position and token-type
    # tables are ``.../embeddings``).  The same rules define the format for families transformers has
    # no TF class for.
    "hf-tf": Layout(
        "hf-tf",
        sep="/",
        leaf={
            Kind.DENSE: "kernel",
            Kind.EMBEDDING: "embeddings",
            Kind.NORM_SCALE: "gamma",
            Kind.NORM_BIAS: "beta",
        },
        perm={Kind.DENSE: _DENSE_T},
        module_leaf={(Kind.EMBEDDING, "word_embeddings"): "weight"},
        index_join="_._",
        suffix=":0",
        base_scoped=True,
        droppable={"mpnet": ("mpnet.pooler.dense.*",)},
        ties_relist=True,
    ),
    # transformers Flax ``flax_model.msgpack``: the params tree of our Flax layout, except that buffers
    # (I-BERT's quantization state; transformers has no Flax I-BERT) stay in the one tree beside the
    # params they belong to.  The base class has no base-prefix scope.
    "hf-flax": Layout(
        "hf-flax",
        sep="/",
        leaf={
            Kind.DENSE: "kernel",
            Kind.EMBEDDING: "embedding",
            Kind.NORM_SCALE: "scale",
            Kind.NORM_BIAS: "bias",
        },
        perm={Kind.DENSE: _DENSE_T},
    ),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; known: {sorted(LAYOUTS)}") from None
