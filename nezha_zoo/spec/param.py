"""The parameter spec: every tensor of a model declared once.

A :class:`Param` carries the canonical name (transformers' PyTorch state-dict key, base-model prefix
included), the shape computed from the config, one logical axis name per dimension and a
:class:`Kind`.  Backends and converters derive their storage names and layouts from the kind (see
:mod:`nezha_zoo.spec.layouts`); nothing downstream types a weight name or a transpose again.

A :class:`ModelSpec` is the full declaration for one class (family + head + config): its params, the
tied aliases that are stored once, and the legacy keys a checkpoint may carry that mean nothing.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = ["Kind", "Init", "Param", "ModelSpec", "AXES"]

#: Logical axis vocabulary.  Sharding rules (and anything else that reasons about axes) key off these.
AXES = frozenset(
    {
        "vocab",  # token vocabulary
        "position",  # absolute position table rows
        "token_type",  # token-type table rows
        "embed",  # embedding width (Electra's embedding_size; equals hidden elsewhere)
        "hidden",  # model width
        "kv",  # attention heads x head_dim, joined
        "qkv",  # fused query/key/value projection output (3 x heads x head_dim)
        "mlp",  # feed-forward inner width
        "classes",  # classifier outputs (num_labels, 1 or 2)
        "buckets",  # relative-attention buckets
        "heads",  # attention heads (unjoined)
        "scalar",  # singleton axes of quantization state
    }
)


class Kind(str, enum.Enum):
    """What a tensor is; layouts key off this, never off ndim or names."""

    DENSE = "dense"  # a linear layer's weight; canonical (out, in)
    BIAS = "bias"  # a linear layer's bias
    EMBEDDING = "embedding"  # a lookup table (rows, width)
    NORM_SCALE = "norm_scale"  # LayerNorm weight
    NORM_BIAS = "norm_bias"  # LayerNorm bias
    BUFFER = "buffer"  # persistent non-trainable state (e.g. I-BERT quantization state)


class Init(str, enum.Enum):
    """How a fresh parameter is initialised (transformers' ``_init_weights`` rules)."""

    NORMAL = "normal"  # N(0, initializer_range)
    ZEROS = "zeros"
    ONES = "ones"
    CONSTANT = "constant"  # every element Param.init_value (e.g. I-BERT's x_min = -1e-5)


_DEFAULT_INIT = {
    Kind.DENSE: Init.NORMAL,
    Kind.EMBEDDING: Init.NORMAL,
    Kind.BIAS: Init.ZEROS,
    Kind.NORM_SCALE: Init.ONES,
    Kind.NORM_BIAS: Init.ZEROS,
    Kind.BUFFER: Init.ZEROS,
}


@dataclass(frozen=True)
class Param:
    """One tensor of a model, declared once.

    Args:
        name: canonical name, transformers' PyTorch state-dict key (``electra.encoder.layer.0...``).
        shape: canonical (PyTorch) shape, computed from the config.
        axes: one logical axis name per dimension, in canonical order.
        kind: what the tensor is; drives layouts.
        init: initialisation rule; defaults from the kind.
        dtype: storage dtype name.
        padding_idx: for embeddings, a row initialised to zero (transformers' ``padding_idx``).
        init_value: the fill value of an ``Init.CONSTANT`` param (giving it alone implies
            ``Init.CONSTANT``); None for every other rule.
    """

    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    kind: Kind
    init: Init | None = None
    dtype: str = "float32"
    padding_idx: int | None = None
    init_value: float | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"{self.name}: shape {self.shape} and axes {self.axes} differ in rank")
        unknown = set(self.axes) - AXES
        if unknown:
            raise ValueError(f"{self.name}: unknown logical axes {sorted(unknown)}")
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: non-positive dimension in {self.shape}")
        if self.init is None:
            default = Init.CONSTANT if self.init_value is not None else _DEFAULT_INIT[self.kind]
            object.__setattr__(self, "init", default)
        if (self.init is Init.CONSTANT) != (self.init_value is not None):
            raise ValueError(f"{self.name}: init_value is given exactly when init is Init.CONSTANT")

    @property
    def fill_value(self) -> float | None:
        """The constant a fresh tensor is filled with (None for ``Init.NORMAL``)."""
        return {Init.NORMAL: None, Init.ZEROS: 0.0, Init.ONES: 1.0}.get(self.init, self.init_value)

    @property
    def module(self) -> str:
        """Dotted path of the owning module (the name without its leaf)."""
        return self.name.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def trainable(self) -> bool:
        return self.kind is not Kind.BUFFER

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelSpec:
    """The declaration of one model class: family, head and the params for one config.

    Args:
        family: family key (``"electra"``).
        head: head name (``"Model"``, ``"ForMaskedLM"``...).
        base_prefix: the prefix under which head classes hold the base model (``"electra"``); empty
            in the spec of the base class itself, whose names carry no prefix.
        params: every stored tensor, in a stable order.
        ties: alias name -> canonical target, for weights stored once (not in ``params``).
        ignored: glob patterns of legacy checkpoint keys that carry nothing (consumed silently).
    """

    family: str
    head: str
    base_prefix: str
    params: tuple[Param, ...]
    ties: Mapping[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        by_name: dict[str, Param] = {}
        for p in self.params:
            if p.name in by_name:
                raise ValueError(f"{self.family}/{self.head}: parameter {p.name!r} declared twice")
            by_name[p.name] = p
        object.__setattr__(self, "_by_name", by_name)
        seen = by_name.keys()
        for alias, target in self.ties.items():
            if alias in seen:
                raise ValueError(f"tied alias {alias!r} is also declared as a parameter")
            if target not in seen:
                raise ValueError(f"tied alias {alias!r} points at undeclared {target!r}")

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]  # type: ignore[attr-defined]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def is_base(self) -> bool:
        return self.head == "Model"

    def is_ignored(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pat) for pat in self.ignored)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.size for p in self.params if p.trainable or not trainable_only)


def prefixed(prefix: str, params: Iterable[Param]) -> list[Param]:
    """The same params under ``prefix.`` (no-op for an empty prefix)."""
    if not prefix:
        return list(params)
    from dataclasses import replace

    return [replace(p, name=f"{prefix}.{p.name}") for p in params]
