"""Match a checkpoint's tensors to a model spec: total, loud, backend-independent.

:func:`plan_load` decides, for every declared parameter, which checkpoint tensor fills it, handling
the base-model prefix in both directions (a base checkpoint into a head class, a head checkpoint into
a base class) as transformers does.  Every checkpoint tensor is accounted for exactly once: loaded,
a tied alias, a legacy key, or reported as unexpected.  A shape mismatch raises, naming the tensor and
both shapes; with ``ignore_mismatched_sizes`` the param is instead left to be freshly initialised and
reported (transformers' way of putting a new head on a pretrained body).  Backends then read each
planned tensor, convert it with their layout and assign it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from nezha_zoo.io.dtype_names import from_safetensors_name
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.reader import CheckpointReader
from nezha_zoo.io.safetensors_file import drop_cached_pages, read_exactly
from nezha_zoo.spec.layouts import Layout
from nezha_zoo.spec.param import Kind, ModelSpec

__all__ = ["LoadPlan", "plan_load", "read_planned", "stream_planned", "CHUNK_BYTES"]

logger = logging.getLogger("nezha_zoo")


@dataclass
class LoadPlan:
    """Outcome of matching a checkpoint to a spec.

    Attributes:
        sources: param name -> checkpoint key that fills it.
        missing_keys: declared params the checkpoint lacks (left at their initial values).
        unexpected_keys: checkpoint keys the model has no use for.
        ignored_keys: tied aliases and legacy buffers, consumed silently.
        mismatched_keys: ``(checkpoint key, checkpoint shape, model shape)`` of tensors skipped for
            their shape (only with ``ignore_mismatched_sizes``); their params are in :attr:`fresh_keys`.
    """

    sources: dict[str, str] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    mismatched_params: list[str] = field(default_factory=list)

    @property
    def fresh_keys(self) -> list[str]:
        """Params the backend must initialise by the spec: missing ones and size-mismatched ones."""
        return [*self.missing_keys, *(n for n in self.mismatched_params if n not in self.missing_keys)]

    def info(self) -> dict[str, list]:
        return {
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "mismatched_keys": list(self.mismatched_keys),
        }

    def report(self, model_name: str, strict: bool = False) -> None:
        """Log missing, unexpected and size-mismatched keys by name; with ``strict``, raise on the first two."""
        if self.mismatched_keys:
            logger.warning(
                "%s: %d weight(s) have a different shape in the checkpoint and are newly initialised: %s",
                model_name,
                len(self.mismatched_keys),
                ", ".join(f"{k} (checkpoint {c}, model {m})" for k, c, m in self.mismatched_keys),
            )
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
    spec: ModelSpec,
    keys: Iterable[str],
    shape_of: Callable[[str], tuple[int, ...]],
    prefix: str,
    ignore_mismatched_sizes: bool = False,
) -> LoadPlan:
    """Plan loading checkpoint ``keys`` into ``spec``.

    Args:
        spec: the model's declaration.
        keys: every tensor name in the checkpoint.
        shape_of: canonical shape of a checkpoint tensor.
        prefix: the family's base-model prefix (``"electra"``).
        ignore_mismatched_sizes: skip (and record in ``mismatched_keys``) a tensor whose shape differs
            from the model's, instead of raising; its param is then initialised fresh.
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
            if ignore_mismatched_sizes:
                plan.mismatched_keys.append((k, got, p.shape))
                plan.mismatched_params.append(p.name)
                used.add(k)
                continue
            raise CheckpointError(
                f"tensor {k!r}: the checkpoint has shape {got}, the model ({spec.family} {spec.head}) needs "
                f"{p.shape}; the checkpoint was made for a different config (pass ignore_mismatched_sizes=True "
                "to initialise such tensors afresh, e.g. a classifier for another num_labels)"
            )
        plan.sources[p.name] = k
        used.add(k)
    for alias, target in spec.ties.items():
        k = to_ckpt(alias)
        if k in key_set:
            want = spec[target].shape
            if tuple(shape_of(k)) != want:
                if ignore_mismatched_sizes:
                    plan.mismatched_keys.append((k, tuple(shape_of(k)), want))
                    used.add(k)
                    continue
                raise CheckpointError(
                    f"tied tensor {k!r}: the checkpoint has shape {tuple(shape_of(k))}, the model needs {want} "
                    "(pass ignore_mismatched_sizes=True to initialise it afresh)"
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
        _check_float(p, key, arr.dtype)
        arr = arr.astype(dtype, copy=False)
        yield name, layout.to_stored(p, arr)


#: Bytes read per piece when streaming a tensor into its destination (bounds the transient memory).
CHUNK_BYTES = 64 * 2**20


def _source_dtype(st_dtype: str, key: str) -> np.dtype:
    dtype = from_safetensors_name(st_dtype)
    if dtype is None:
        raise CheckpointError(f"tensor {key!r} has dtype {st_dtype}, which cannot be loaded")
    return dtype


def stream_planned(
    reader: CheckpointReader,
    spec: ModelSpec,
    plan: LoadPlan,
    layout: Layout,
    dtype_of: Callable[[str], np.dtype],
    write: Callable[[str, tuple[slice, ...], np.ndarray], None],
    done: Callable[[str], None] | None = None,
    chunk_bytes: int | None = None,
) -> None:
    """Fill every planned param piece by piece: no tensor is ever held whole outside its destination.

    For each param, canonical rows (slices of axis 0) are read straight from the checkpoint file in
    pieces of about ``chunk_bytes``, converted to ``dtype_of(name)``, permuted to ``layout`` and
    handed to ``write(name, index, piece)``, where ``index`` selects the piece's place in the stored
    array (``stored[index] = piece``).  ``done(name)`` is called once a param is complete.  Tensors of
    an unpickled ``.bin`` checkpoint are already in memory and arrive as one piece.

    Args:
        reader: the open checkpoint.
        spec: the model's declaration.
        plan: from :func:`plan_load` (shapes already checked).
        layout: the backend's storage layout.
        dtype_of: param name -> numpy dtype of its destination (float32 or bfloat16).
        write: ``(param name, index tuple into the stored array, stored-layout piece)``.
        done: called with the param name after its last piece.
        chunk_bytes: target size of one piece (default :data:`CHUNK_BYTES`).
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    for name, key in plan.sources.items():
        p = spec[name]
        target = np.dtype(dtype_of(name))
        perm = layout.perm.get(p.kind)
        if perm is None or len(perm) != len(p.shape):
            perm = tuple(range(len(p.shape)))
        row_axis = perm.index(0) if p.shape else None  # where canonical axis 0 lands in the stored array
        loc = reader.location(key)
        if loc is None:
            arr = np.asarray(reader.get(key))
            _check_float(p, key, arr.dtype)
            write(name, (slice(None),) * len(p.shape), np.transpose(arr.astype(target, copy=False), perm))
        else:
            path, offset, st_dtype, shape = loc
            src = _source_dtype(st_dtype, key)
            _check_float(p, key, src)
            rows = shape[0] if shape else 1
            row_elems = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
            step = max(1, chunk_bytes // max(1, row_elems * src.itemsize))
            with open(path, "rb", buffering=0) as fh:
                for start in range(0, rows, step):
                    stop = min(rows, start + step)
                    piece = np.empty(((stop - start) * row_elems,), src)
                    fh.seek(offset + start * row_elems * src.itemsize)
                    read_exactly(fh, piece.view(np.uint8), path, key)
                    piece = piece.reshape((stop - start, *shape[1:]) if shape else ())
                    index: list[slice] = [slice(None)] * len(shape)
                    if row_axis is not None:
                        index[row_axis] = slice(start, stop)
                    write(name, tuple(index), np.transpose(piece.astype(target, copy=False), perm))
                    del piece
            drop_cached_pages(path, offset, rows * row_elems * src.itemsize)
        if done is not None:
            done(name)


def _check_float(p, key: str, dtype: np.dtype) -> None:
    if p.kind is not Kind.BUFFER and dtype.kind != "f" and dtype.name != "bfloat16":
        raise CheckpointError(f"tensor {key!r} has dtype {dtype}, expected floating point")
