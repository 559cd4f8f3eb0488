"""LoRA adapters, described once from the spec for every backend, stored in PEFT's on-disk format.

A LoRA adapter adds ``scaling * B @ A`` to the weight ``W`` (canonical (out, in)) of chosen dense
layers: ``A`` is (r, in), ``B`` is (out, r), ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with rsLoRA).  Which layers are targets comes from the spec alone:

* by name, as PEFT's ``target_modules``: an entry matches a dense module whose canonical path equals
  it or ends with ``"." + entry`` (``"query"``, ``"attention.self.value"``, ``"Wqkv"``); a single
  string is a regular expression that must match the whole path (PEFT's rule too);
* by role, read from the weight's logical axes (:data:`ROLES`): ``"qkv"`` (the query/key/value
  projections, fused or not: output axis ``kv`` or ``qkv``), ``"attention_output"`` (input ``kv``),
  ``"ffn_in"`` (output ``mlp``), ``"ffn_out"`` (input ``mlp``), ``"ffn"`` (both).

On disk an adapter is PEFT's: ``adapter_config.json`` and ``adapter_model.safetensors`` holding
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r).  Module
paths are written as the model names them; on load, a path with or without the family's base prefix
is accepted (an adapter trained on ``ElectraModel`` loads into ``ElectraForMaskedLM`` and back).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nezha_zoo.io.atomic import atomic_write_text, staged_directory
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.reader import CheckpointReader
from nezha_zoo.io.safetensors_file import write_safetensors
from nezha_zoo.spec.param import Kind, ModelSpec, Param

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_TARGETS",
    "ROLES",
    "LoraConfig",
    "LoraMethods",
    "LoraTarget",
    "lora_targets",
    "peft_key",
    "read_adapter",
    "write_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Safetensors metadata key recording the family an adapter was made for (PEFT ignores it).
FAMILY_METADATA_KEY = "nezha_zoo.family"

#: role -> predicate on a dense weight's logical axes (canonical (out, in)).
ROLES = {
    "qkv": lambda axes: axes[0] in ("kv", "qkv") and axes[1] == "hidden",
    "attention_output": lambda axes: axes == ("hidden", "kv"),
    "ffn_in": lambda axes: axes == ("mlp", "hidden"),
    "ffn_out": lambda axes: axes == ("hidden", "mlp"),
    "ffn": lambda axes: "mlp" in axes,
}
#: Targets when none are given: every attention query/key/value projection (MPT: its fused ``Wqkv``).
DEFAULT_TARGETS = ("qkv",)


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (PEFT's ``LoraConfig`` fields that matter here).

    Args:
        r (int): rank, >= 1.
        lora_alpha (float): scale numerator; default ``r`` (scaling 1).
        lora_dropout (float): dropout on the adapter's input while training, in [0, 1).
        target_modules (tuple[str, ...] | str): names or roles (see the module docstring); a
            string is a regular expression over whole module paths.
        use_rslora (bool): scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.target_modules, str):
            targets = tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"target_modules must be non-empty names or roles, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", targets)

    @classmethod
    def create(
        cls,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
    ) -> LoraConfig:
        """The config of ``enable_lora(rank, alpha, dropout, target_modules)`` (alpha defaults to rank)."""
        return cls(
            r=rank,
            lora_alpha=rank if alpha is None else alpha,
            lora_dropout=dropout,
            target_modules=DEFAULT_TARGETS if target_modules is None else target_modules,
        )

    @property
    def scaling(self) -> float:
        """The factor of ``B @ A`` (PEFT's rule)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class LoraTarget:
    """One adapted dense layer.

    Args:
        param (Param): the layer's weight in the spec (canonical (out, in)).
        module (str): the layer's module path (canonical name without the leaf).
    """

    param: Param
    module: str

    @property
    def in_features(self) -> int:
        return self.param.shape[1]

    @property
    def out_features(self) -> int:
        return self.param.shape[0]

    def shapes(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Canonical shapes of A (r, in) and B (out, r)."""
        return (r, self.in_features), (self.out_features, r)


def _dense_weights(spec: ModelSpec) -> list[Param]:
    return [p for p in spec if p.kind is Kind.DENSE and p.leaf == "weight" and len(p.shape) == 2]


def lora_targets(spec: ModelSpec, target_modules: Sequence[str] | str) -> list[LoraTarget]:
    """The dense layers of ``spec`` that ``target_modules`` selects, in spec order.

    Raises:
        ValueError: an entry (or the regular expression) matches no dense layer; the message lists
            the dense module names and roles that exist.
    """
    dense = _dense_weights(spec)
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        chosen = [p for p in dense if pattern.fullmatch(p.module)]
        unmatched = [] if chosen else [target_modules]
    else:
        picked: set[str] = set()
        unmatched = []
        for entry in target_modules:
            if entry in ROLES:
                hits = [p for p in dense if ROLES[entry](p.axes)]
            else:
                hits = [p for p in dense if p.module == entry or p.module.endswith("." + entry)]
            if not hits:
                unmatched.append(entry)
            picked.update(p.name for p in hits)
        chosen = [p for p in dense if p.name in picked]
    if unmatched:
        names = sorted({p.module.rpartition(".")[2] for p in dense})
        roles = sorted(r for r, pred in ROLES.items() if any(pred(p.axes) for p in dense))
        raise ValueError(
            f"LoRA target_modules {unmatched} match no dense layer of {spec.family}/{spec.head}; "
            f"dense module names: {names}; roles: {roles}"
        )
    return [LoraTarget(p, p.module) for p in chosen]


def peft_key(module: str, which: str) -> str:
    """PEFT's state-dict key of ``lora_A`` / ``lora_B`` of ``module`` (adapter name dropped)."""
    return f"base_model.model.{module}.lora_{which}.weight"


def _relative(module: str, base_prefix: str) -> str:
    """``module`` without the base prefix (the path inside the base model)."""
    head = base_prefix + "."
    return module[len(head) :] if base_prefix and module.startswith(head) else module


def _saved_targets(spec: ModelSpec, targets: Sequence[LoraTarget], base_prefix: str) -> list[str]:
    """``target_modules`` for ``adapter_config.json`` that select exactly ``targets`` under PEFT's rule.

    The module basenames when they select the same set (``["query", "value"]``), else the paths
    inside the base model (which match the same layers of the base class and of every head class).
    """
    names = sorted({t.module.rpartition(".")[2] for t in targets})
    if {t.module for t in lora_targets(spec, names)} == {t.module for t in targets}:
        return names
    return sorted(_relative(t.module, base_prefix) for t in targets)


def write_adapter(
    directory: str | os.PathLike,
    config: LoraConfig,
    spec: ModelSpec,
    base_prefix: str,
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]],
    base_model_name_or_path: str | None = None,
) -> list[str]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format), atomically.

    Args:
        directory: destination (created; written under its destination lock, staged).
        config: the adapter's hyper-parameters.
        spec: the spec of the model the adapter belongs to.
        base_prefix: the family's base prefix (for the saved ``target_modules``).
        weights: module path -> (A (r, in), B (out, r)) canonical float arrays.
        base_model_name_or_path: recorded for PEFT (``None`` if unknown).
    Returns:
        The written file names.
    """
    targets = [t for t in _dense_weights(spec) if t.module in weights]
    target_objs = [LoraTarget(p, p.module) for p in targets]
    if len(targets) != len(weights):
        unknown = sorted(set(weights) - {t.module for t in target_objs})
        raise ValueError(f"adapter weights for modules {unknown} that are not dense layers of {spec.family}")
    items: list[tuple[str, np.ndarray]] = []
    for t in target_objs:
        a, b = (np.ascontiguousarray(np.asarray(x, dtype=np.float32)) for x in weights[t.module])
        want_a, want_b = t.shapes(config.r)
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(f"{t.module}: LoRA A {a.shape} / B {b.shape}, expected {want_a} / {want_b}")
        items += [(peft_key(t.module, "A"), a), (peft_key(t.module, "B"), b)]
    body = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _saved_targets(spec, target_objs, base_prefix),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    meta = {"format": "pt", FAMILY_METADATA_KEY: spec.family}
    with staged_directory(directory) as stage:
        write_safetensors(os.path.join(stage, ADAPTER_WEIGHTS_NAME), items, meta)
        atomic_write_text(os.path.join(stage, ADAPTER_CONFIG_NAME), json.dumps(body, indent=2, sort_keys=True) + "\n")
    return [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]


def _read_config(directory: str) -> LoraConfig:
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG_NAME} (not a PEFT adapter directory)")
    with open(path, encoding="utf-8") as fh:
        try:
            body = json.load(fh)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(body, dict) or body.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {body.get('peft_type')!r}, only 'LORA' is supported")
    unsupported = {
        "bias": ("none", None),
        "fan_in_fan_out": (False, None),
        "modules_to_save": (None, []),
        "use_dora": (False, None),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "layers_to_transform": (None,),
    }
    for name, allowed in unsupported.items():
        if name in body and body[name] not in allowed:
            raise CheckpointError(f"{path}: {name}={body[name]!r} is not supported (supported: {allowed[0]!r})")
    try:
        return LoraConfig(
            r=body.get("r"),
            lora_alpha=body.get("lora_alpha", body.get("r")),
            lora_dropout=body.get("lora_dropout", 0.0) or 0.0,
            target_modules=body.get("target_modules") or DEFAULT_TARGETS,
            use_rslora=bool(body.get("use_rslora", False)),
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_adapter(
    directory: str | os.PathLike, spec: ModelSpec, base_prefix: str
) -> tuple[LoraConfig, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Read and check a PEFT LoRA adapter against ``spec``: everything is read before anything changes.

    Returns:
        The config and module path (as ``spec`` names it) -> (A (r, in), B (out, r)) float32 arrays.
    Raises:
        CheckpointError: not a LoRA adapter, an unsupported option, an adapter made for another family,
            keys for modules the model does not have or not dense, or tensors of the wrong shape.
    """
    directory = os.fspath(directory)
    config = _read_config(directory)
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS_NAME}")
    by_relative = {_relative(p.module, base_prefix): p for p in _dense_weights(spec)}
    reader = CheckpointReader(path)
    try:
        family = reader.metadata.get(FAMILY_METADATA_KEY)
        if family is not None and family != spec.family:
            raise CheckpointError(f"{directory}: adapter made for family {family!r}, this model is {spec.family!r}")
        pattern = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
        found: dict[str, dict[str, np.ndarray]] = {}
        for key in reader.keys():
            m = pattern.fullmatch(key)
            if m is None:
                raise CheckpointError(f"{path}: unexpected tensor {key!r} (only LoRA A/B weights are supported)")
            module = _relative(m.group(1), base_prefix)
            if module not in by_relative:
                raise CheckpointError(
                    f"{path}: {key!r} adapts {m.group(1)!r}, which is not a dense layer of "
                    f"{spec.family}/{spec.head} (dense layers: {sorted(by_relative)[:8]}...)"
                )
            found.setdefault(module, {})[m.group(2)] = reader.get(key)
        if not found:
            raise CheckpointError(f"{path}: no LoRA weights")
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for module, pair in sorted(found.items()):
            if set(pair) != {"A", "B"}:
                raise CheckpointError(f"{path}: {module} has lora_{set('AB') - set(pair)} missing")
            target = LoraTarget(by_relative[module], by_relative[module].module)
            want_a, want_b = target.shapes(config.r)
            a, b = pair["A"], pair["B"]
            if a.shape != want_a or b.shape != want_b:
                raise CheckpointError(
                    f"{path}: {module}: lora_A {a.shape} / lora_B {b.shape}, this model with r={config.r} "
                    f"needs {want_a} / {want_b} (an adapter for another model size?)"
                )
            out[target.module] = (np.asarray(a, np.float32), np.asarray(b, np.float32))
    finally:
        reader.close()
    return config, out


class LoraMethods:
    """The LoRA methods every backend's base class shares; a backend supplies the tensor work.

    A backend implements ``_attach_lora(config, targets, weights)`` (``weights`` None: a fresh
    adapter, B zero), ``lora_weights()``, ``merge_lora()``, ``unmerge_lora()`` and
    ``trainable_parameter_count()``; the model provides ``spec`` and ``family``.
    """

    lora_config: LoraConfig | None = None

    def enable_lora(
        self,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
    ) -> int:
        """Add a fresh LoRA adapter (A random as PEFT's kaiming init, B zero) and freeze the base weights.

        Args:
            rank (int): r >= 1.
            alpha (float | None): scale numerator (default ``rank``): scaling ``alpha / rank``.
            dropout (float): dropout on the adapter input while training (PyTorch; TF and Flax apply
                LoRA as a kernel delta and only record it).
            target_modules (list[str] | str | None): module names (PEFT's suffix rule) or roles
                (``"qkv"``, ``"attention_output"``, ``"ffn_in"``, ``"ffn_out"``, ``"ffn"``); a string
                is a regular expression over module paths; default the query/key/value projections.
        Returns:
            int: the number of trainable parameters (the adapter's).
        Raises:
            ValueError: a bad rank, alpha or dropout, targets that match nothing, or an adapter already
                attached; the model is unchanged.
        """
        config = LoraConfig.create(rank, alpha, dropout, target_modules)
        self._check_no_lora()
        self._attach_lora(config, lora_targets(self.spec, config.target_modules), None)
        return self.trainable_parameter_count()

    def load_adapter(self, adapter_directory: str | os.PathLike) -> int:
        """Attach a PEFT-format LoRA adapter (ours or PEFT's) and freeze the base weights.

        Everything is read and checked first: an error leaves the model unchanged.
        Returns:
            int: the number of trainable parameters (the adapter's).
        """
        self._check_no_lora()
        config, weights = read_adapter(adapter_directory, self.spec, self.family.base_prefix)
        targets = [t for t in lora_targets(self.spec, sorted(weights)) if t.module in weights]
        self._attach_lora(config, targets, weights)
        return self.trainable_parameter_count()

    def save_adapter(self, save_directory: str | os.PathLike) -> list[str]:
        """Write the adapter in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``).

        Returns the written file names.
        """
        weights = self.lora_weights()
        return write_adapter(save_directory, self.lora_config, self.spec, self.family.base_prefix, weights)

    def _check_no_lora(self) -> None:
        if self.lora_config is not None:
            raise ValueError(
                f"{type(self).__name__} already has a LoRA adapter (r={self.lora_config.r}); "
                "save or merge it and start from a model without one to add another"
            )

    def _require_lora(self) -> LoraConfig:
        if self.lora_config is None:
            raise ValueError(f"{type(self).__name__} has no LoRA adapter; call enable_lora or load_adapter first")
        return self.lora_config
