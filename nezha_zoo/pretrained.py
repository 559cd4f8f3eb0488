"""Backend-independent halves of ``from_pretrained`` and ``save_pretrained``.

Each backend supplies two small callbacks (assign one param from a layout-ordered numpy array;
export every param as a canonical numpy array); everything else -- config resolution, the family
check, prefix handling, shape checks, missing/unexpected reports, sharded atomic writes -- lives here
once.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from nezha_zoo.auto import AutoConfig
from nezha_zoo.config import CONFIG_NAME, PretrainedConfig
from nezha_zoo.io.plan import LoadPlan, plan_load, read_planned, stream_planned
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.io.shards import DEFAULT_MAX_SHARD_SIZE
from nezha_zoo.io.writer import save_state_dict
from nezha_zoo.spec.layouts import Layout
from nezha_zoo.spec.param import Init, ModelSpec
from nezha_zoo.spec.registry import Family

__all__ = [
    "LOADER_HINTS",
    "resolve_config",
    "load_weights",
    "save_weights",
    "random_weights",
    "iter_random_weights",
    "FORMAT_METADATA",
]

#: String metadata written into every safetensors file (beside transformers' ``format: pt``).
FORMAT_METADATA = {"format": "pt", "producer": "nezha_zoo"}


#: transformers ``from_pretrained`` options this project does not take, with what to do instead.
#: Every backend's ``from_pretrained`` accepts only its documented arguments (``config``, ``strict``,
#: ``output_loading_info``, ``ignore_mismatched_sizes``, ``dtype``; PyTorch also ``torch_dtype``)
#: plus config fields; anything else -- these included -- raises ``TypeError``, never a silent no-op.
LOADER_HINTS = {
    "device_map": "place the model yourself (.to(device)), or use accelerate's load_checkpoint_and_dispatch",
    "max_memory": "use accelerate's load_checkpoint_and_dispatch",
    "low_cpu_mem_usage": "loading is always low-memory (meta-device build, streamed reads); drop it",
    "cache_dir": "only local directories are loaded; there is no download cache",
    "revision": "only local directories are loaded",
    "force_download": "only local directories are loaded",
    "local_files_only": "only local directories are loaded (always true); drop it",
    "token": "only local directories are loaded",
    "trust_remote_code": "no remote code is ever run; drop it",
    "use_safetensors": "safetensors is preferred whenever present; drop it",
    "quantization_config": "use the backend's quant module (e.g. nezha_zoo.pt.quant)",
    "attn_implementation": "each backend has one attention implementation",
}


def check_loader_kwargs(family: Family, overrides: Mapping[str, Any], what: str) -> None:
    """Raise ``TypeError`` for a ``from_pretrained`` keyword that is neither an option nor a config field.

    Args:
        family: the model's family (its config class lists the fields).
        overrides: the keywords left after the backend took its own options.
        what: the call, for the message (``"ElectraModel.from_pretrained"``).
    """
    for name in overrides:
        if name in LOADER_HINTS:
            raise TypeError(f"{what} does not take {name!r}: {LOADER_HINTS[name]}")
    family.config_class.check_override_names(overrides, what)


def resolve_config(
    family: Family,
    path: str | os.PathLike,
    config: PretrainedConfig | None = None,
    what: str = "from_pretrained",
    **overrides: Any,
) -> PretrainedConfig:
    """The config to build a model from ``path`` with: given, or read from ``path/config.json``.

    ``overrides`` must be config fields (``num_labels=3``); a typo or an unsupported loader option
    raises ``TypeError`` naming it (see :func:`check_loader_kwargs`).  A ``config.json`` of another
    family raises ``ValueError`` naming both.
    """
    check_loader_kwargs(family, overrides, what)
    if config is not None:
        if not isinstance(config, family.config_class):
            raise TypeError(f"config must be a {family.config_class.__name__}, got {type(config).__name__}")
        return config.copy(**overrides) if overrides else config
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}; pass config= to load bare weights")
    cfg = AutoConfig.from_pretrained(path, **overrides)
    if not isinstance(cfg, family.config_class):
        raise ValueError(
            f"{path!r} holds a {cfg.model_type!r} checkpoint; it cannot be loaded into a "
            f"{family.class_prefix} ({family.model_type!r}) model"
        )
    return cfg


def load_weights(
    path: str | os.PathLike,
    spec: ModelSpec,
    family: Family,
    layout: Layout,
    assign: Callable[[str, np.ndarray], None] | None,
    model_name: str,
    strict: bool = False,
    dtype: Any = np.float32,
    *,
    ignore_mismatched_sizes: bool = False,
    write: Callable[[str, tuple[slice, ...], np.ndarray], None] | None = None,
    dtype_of: Callable[[str], np.dtype] | None = None,
    done: Callable[[str], None] | None = None,
) -> LoadPlan:
    """Read the checkpoint at ``path`` into a model, one tensor (or one piece of it) at a time.

    Two ways to receive the tensors:

    * ``assign(param_name, stored_array)``: each whole tensor in ``layout`` order, cast to ``dtype``;
    * ``write(param_name, index, piece)`` (low-memory): pieces of about
      :data:`~nezha_zoo.io.plan.CHUNK_BYTES` read straight from the file, cast to
      ``dtype_of(param_name)`` (default ``dtype``), to be stored as ``stored[index] = piece``; then
      ``done(param_name)``.  No tensor is held whole outside the model (see
      :func:`~nezha_zoo.io.plan.stream_planned`).

    Missing and unexpected keys are logged by name (raised with ``strict``); shape mismatches raise
    before any tensor is read, unless ``ignore_mismatched_sizes``: then they are skipped and logged
    with both shapes, and the backend initialises ``plan.fresh_keys`` (missing + mismatched) by the spec.
    """
    if (assign is None) == (write is None):
        raise TypeError("load_weights needs exactly one of assign= and write=")
    with open_checkpoint(path) as reader:
        plan = plan_load(spec, reader.keys(), reader.shape, family.base_prefix, ignore_mismatched_sizes)
        plan.report(model_name, strict=strict)
        if write is not None:
            fixed = np.dtype(dtype)
            stream_planned(reader, spec, plan, layout, dtype_of or (lambda _: fixed), write, done)
        else:
            for name, arr in read_planned(reader, spec, plan, layout, dtype=dtype):
                assign(name, arr)
    return plan


def save_weights(
    directory: str | os.PathLike,
    config: PretrainedConfig,
    spec: ModelSpec,
    family: Family,
    arrays: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Write ``config.json`` + safetensors (canonical names and layout) for ``spec``.

    ``arrays`` yields canonical ``(name, array)`` pairs (float32 or bfloat16); every declared param
    must appear exactly once.  A generator is consumed shard by shard, so a backend that yields one
    tensor at a time never holds a second full copy of its weights; a bad export raises before
    anything in ``directory`` changes.
    """
    items = arrays.items() if isinstance(arrays, Mapping) else arrays

    def checked() -> Iterator[tuple[str, np.ndarray]]:
        seen: set[str] = set()
        for name, arr in items:
            if name not in spec:
                raise ValueError(f"{name!r} is not a parameter of {family.class_name(spec.head)}")
            if name in seen:
                raise ValueError(f"{name!r} exported twice")
            p = spec[name]
            if tuple(arr.shape) != p.shape:
                raise ValueError(f"{name}: exporting shape {tuple(arr.shape)}, the spec needs {p.shape}")
            seen.add(name)
            yield name, arr
        absent = [p.name for p in spec if p.name not in seen]
        if absent:
            raise ValueError(f"export is missing {absent}")

    cfg = config.copy()
    cfg.architectures = [family.class_name(spec.head, "pt")]
    meta = {**FORMAT_METADATA, "family": family.key, "head": spec.head}
    return save_state_dict(
        directory,
        checked(),
        metadata=meta,
        max_shard_size=max_shard_size,
        extra_files={CONFIG_NAME: cfg.to_json_string()},
    )


def iter_random_weights(
    spec: ModelSpec, config: PretrainedConfig, seed: int = 0, names: Collection[str] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Fresh canonical float32 weights for ``spec`` by its init rules, one ``(name, array)`` at a time.

    Each param draws from its own stream, seeded by ``seed`` and its name, so its values do not
    depend on which other params are drawn (``names``: only these) and nothing is held beyond the
    tensor being yielded (large checkpoints can be generated and saved in little memory).
    """
    std = np.float32(getattr(config, "initializer_range", 0.02))
    for p in spec:
        if names is not None and p.name not in names:
            continue
        if p.init is Init.NORMAL:
            rng = np.random.default_rng([seed, zlib.crc32(p.name.encode("utf-8"))])
            arr = rng.standard_normal(p.shape, dtype=np.float32)
            arr *= std
            if p.padding_idx is not None:
                arr[p.padding_idx] = 0.0
        else:
            arr = np.full(p.shape, p.fill_value, np.float32)
        yield p.name, arr


def random_weights(
    spec: ModelSpec, config: PretrainedConfig, seed: int = 0, names: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """Fresh canonical weights for ``spec`` (or only ``names``) by its init rules, from a numpy seed.

    The same seed gives the same weights whatever backend later loads them, which is how
    ``make demo`` builds one model for three frameworks.  See :func:`iter_random_weights`.
    """
    return dict(iter_random_weights(spec, config, seed, names))


def resized_vocab(
    config: PretrainedConfig,
    family: Family,
    head: str,
    new_num_tokens: int,
    old: Callable[[str], np.ndarray],
    pad_to_multiple_of: int | None = None,
    seed: int = 0,
) -> tuple[PretrainedConfig, ModelSpec, dict[str, np.ndarray]]:
    """The framework-free half of ``resize_token_embeddings``: new config, new spec, new vocab tensors.

    Every param with a ``"vocab"`` axis (word embeddings, an untied output projection, an LM bias)
    gets ``vocab_size`` rows (rounded up to ``pad_to_multiple_of``): the first ``min(old, new)`` rows
    are the old ones (``old(name)``, canonical layout), new rows are drawn by the spec's init rule
    (padding row zero).  Tied aliases are not params: the backend re-ties them to the new embedding.

    Args:
        config: the model's current config (not modified).
        family: the model's family.
        head: the model's head (``"ForMaskedLM"``...).
        new_num_tokens: the wanted vocabulary size.
        old: canonical name -> the param's current canonical numpy array.
        pad_to_multiple_of: round the size up to a multiple of this (tensor-core friendly sizes).
        seed: seed of the new rows.

    Returns:
        ``(new config, new spec, {name: canonical float32 array})`` for the vocab params only.

    Raises:
        ValueError: a size that is not a positive integer, or a ``pad_token_id`` outside the new vocabulary.
    """
    if isinstance(new_num_tokens, bool) or not isinstance(new_num_tokens, int) or new_num_tokens <= 0:
        raise ValueError(f"new_num_tokens must be a positive integer, got {new_num_tokens!r}")
    if pad_to_multiple_of is not None:
        if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
        new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
    new_config = config.copy(vocab_size=new_num_tokens)  # validates pad/bos/eos ids against the new size
    new_spec = family.model_spec(new_config, head)
    names = [p.name for p in new_spec if "vocab" in p.axes]
    fresh = random_weights(new_spec, new_config, seed, names)
    for name in names:
        axis = new_spec[name].axes.index("vocab")
        before = np.asarray(old(name), np.float32)
        keep = min(before.shape[axis], new_num_tokens)
        index = (slice(None),) * axis + (slice(0, keep),)
        fresh[name][index] = before[index]
    return new_config, new_spec, fresh
