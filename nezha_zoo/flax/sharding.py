"""Flax models on a device mesh: shardings from the spec's named axes, sharded loading, a sharded train step.

Which rule set (``"dp"``, ``"fsdp"``, ``"tp"``, ``"fsdp+tp"``; see :mod:`nezha_zoo.spec.partitioning`) decides
how each parameter is split; nothing here names a parameter.  Typical use on 8 devices::

    mesh = make_mesh(data=2, model=4)
    model = load_sharded(FlaxXLMRobertaXLForMaskedLM, "ckpt_dir", mesh, "fsdp+tp")
    step = make_train_step(model, optax.adamw(1e-4), loss_fn, mesh, "fsdp+tp")
    params, opt_state, loss = step(model.params, opt_state, batch)

:func:`load_sharded` never builds the whole model on one host: each parameter is created with
``jax.make_array_from_callback``, and each device's block is read from the checkpoint as a slice
(safetensors reads only those bytes), so a process reads just the blocks its devices hold.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nezha_zoo.io.plan import plan_load
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.pretrained import resolve_config
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.partitioning import DATA, MODEL, Rules, get_rules, partition

__all__ = ["make_mesh", "param_shardings", "batch_sharding", "shard_params", "load_sharded", "make_train_step"]

LAYOUT = LAYOUTS["flax"]


def make_mesh(data: int | None = None, model: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all); ``data`` defaults to what ``model`` leaves."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} must be >= 1 and divide the {len(devices)} devices")
    data = len(devices) // model if data is None else data
    if data < 1 or data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; {len(devices)} available")
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def _params_of(model: Any):
    return [p for p in model.spec if p.trainable and LAYOUT.collection_of(p) == "params"]


def param_shardings(model: Any, mesh: Mesh, rules: str | Rules | Mapping[str, str]) -> dict:
    """A ``NamedSharding`` per parameter of ``model``, nested like ``model.params``."""
    shape = dict(mesh.shape)
    flat = {
        LAYOUT.path(p): NamedSharding(mesh, PartitionSpec(*partition(p, LAYOUT, rules, shape)))
        for p in _params_of(model)
    }
    return unflatten_dict(flat)


def batch_sharding(mesh: Mesh, rules: str | Rules | Mapping[str, str] = "dp") -> NamedSharding:
    """Inputs and labels split along their leading (batch) axis over the rule set's batch axis."""
    return NamedSharding(mesh, PartitionSpec(get_rules(rules).batch_axis))


def shard_params(model: Any, mesh: Mesh, rules: str | Rules | Mapping[str, str]) -> Any:
    """Move ``model.params`` onto ``mesh`` under ``rules`` (in place); returns the model."""
    model.params = jax.device_put(model.params, param_shardings(model, mesh, rules))
    return model


def load_sharded(
    cls: type,
    pretrained_model_name_or_path: str | os.PathLike,
    mesh: Mesh,
    rules: str | Rules | Mapping[str, str],
    dtype: Any = jnp.float32,
    **config_overrides: Any,
) -> Any:
    """Build ``cls`` from a checkpoint with every parameter placed straight onto ``mesh``.

    Each device's block of each tensor is read as a slice of the checkpoint (in canonical order, then
    laid out for Flax), so neither the whole model nor a whole tensor is assembled on one host when
    the mesh splits it.  The checkpoint must hold every parameter of ``cls`` (base-model prefixes are
    handled as in ``from_pretrained``); a missing or unexpected tensor raises, naming it.

    Args:
        cls: a Flax model class of the zoo (``FlaxElectraForMaskedLM``...).
        pretrained_model_name_or_path: a checkpoint directory (safetensors, sharded or not).
        mesh: the device mesh (:func:`make_mesh`).
        rules: a rule-set name or a logical-axis -> mesh-axis mapping.
        dtype: parameter dtype.
        **config_overrides: config fields to change.
    """
    config = resolve_config(cls.family, pretrained_model_name_or_path, **config_overrides)
    model = cls(config, _do_init=False)
    spec, shape = model.spec, dict(mesh.shape)
    flat: dict[tuple[str, ...], jax.Array] = {}
    with open_checkpoint(pretrained_model_name_or_path) as reader:
        plan = plan_load(spec, reader.keys(), reader.shape, cls.family.base_prefix)
        plan.report(cls.__name__, strict=True)
        for p in _params_of(model):
            key = plan.sources[p.name]
            sharding = NamedSharding(mesh, PartitionSpec(*partition(p, LAYOUT, rules, shape)))

            def block(index: tuple, p=p, key=key) -> np.ndarray:
                canonical = reader.get_slice(key, LAYOUT.canonical_index(p, index))
                return np.ascontiguousarray(LAYOUT.to_stored_block(p, canonical)).astype(dtype)

            flat[LAYOUT.path(p)] = jax.make_array_from_callback(LAYOUT.shape(p), sharding, block)
    model._is_initialized = True
    model.params = unflatten_dict(flat)
    return model


def make_train_step(
    model: Any,
    optimizer: Any,
    loss_fn: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
    mesh: Mesh,
    rules: str | Rules | Mapping[str, str],
) -> Callable:
    """A jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)`` sharded by ``rules``.

    ``loss_fn(output, batch)`` turns the model's output on ``batch`` (a dict of (B, ...) arrays whose
    model inputs are the keys the model's ``__call__`` accepts) into a scalar.  Parameters keep their
    shardings across steps; the batch is split over the batch axis; XLA inserts the collectives.
    Dropout is off (deterministic steps, comparable across meshes).
    """
    p_shard = param_shardings(model, mesh, rules)
    b_shard = batch_sharding(mesh, rules)
    accepted = set(inspect.signature(type(model).__call__).parameters)

    def step(params, opt_state, batch):
        batch = jax.lax.with_sharding_constraint(batch, jax.tree_util.tree_map(lambda _: b_shard, batch))

        def objective(p):
            inputs = {k: v for k, v in batch.items() if k in accepted}
            return loss_fn(model(**inputs, params=p), batch)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree_util.tree_map(lambda a, u: a + u, params, updates)
        return jax.lax.with_sharding_constraint(params, p_shard), opt_state, loss

    return jax.jit(step)
