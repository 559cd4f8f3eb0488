"""LoRA for the Flax models: an adapter-only parameter tree, applied to the frozen params at call time.

``model.lora_params`` mirrors the params tree down to each targeted ``nn.Dense``, which holds
``{"lora_A": {"kernel": (in, r)}, "lora_B": {"kernel": (r, out)}}`` (A^T and B^T: Flax kernels are
(in, out)).  A call without ``params=`` adds ``scaling * A_kernel @ B_kernel`` to each targeted kernel
before running the module; a call with ``params=`` uses them as given, so a training step passes
``model.apply_lora(model.params, lora)`` and differentiates ``lora`` alone.  Training recipe::

    lora = model.lora_params
    opt_state = tx.init(lora)                      # optimizer state: the adapter alone

    def loss_fn(lora):
        # the base params are closed over: not differentiated, not in the optimizer state
        out = model(input_ids, params=model.apply_lora(model.params, lora))
        return loss(out)

    grads = jax.grad(loss_fn)(lora)
    updates, opt_state = tx.update(grads, opt_state, lora)
    model.lora_params = lora = optax.apply_updates(lora, updates)

LoRA is a kernel delta here, so ``lora_dropout`` is recorded in the saved config but not applied.
Targets, file format and checks are :mod:`nezha_zoo.adapters`'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from nezha_zoo.adapters import LoraConfig, LoraMethods, LoraTarget
from nezha_zoo.spec.layouts import LAYOUTS

__all__ = ["LoraMixin"]

_FLAX = LAYOUTS["flax"]


class LoraMixin(LoraMethods):
    """LoRA methods of the Flax base class (enable, merge, unmerge, save, load, the adapter tree)."""

    _lora_targets: tuple[LoraTarget, ...] = ()
    _lora_params: dict | None = None
    _lora_merged: bool = False
    lora_seed: int = 0  # PRNG seed of a fresh adapter's A

    def _attach_lora(
        self,
        config: LoraConfig,
        targets: list[LoraTarget],
        weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
    ) -> None:
        if weights is None:  # fresh: A kaiming_uniform(a=sqrt(5)) as torch / PEFT, B zero
            rng = np.random.default_rng(self.lora_seed)
            weights = {}
            for t in targets:
                bound = 1.0 / np.sqrt(t.in_features)
                a = rng.uniform(-bound, bound, size=(config.r, t.in_features)).astype(np.float32)
                weights[t.module] = (a, np.zeros((t.out_features, config.r), np.float32))
        flat = {}
        for t in targets:
            a, b = weights[t.module]
            path = _FLAX.path(t.param)[:-1]
            flat[(*path, "lora_A", "kernel")] = jnp.asarray(a.T)
            flat[(*path, "lora_B", "kernel")] = jnp.asarray(b.T)
        self._lora_targets = tuple(targets)
        self._lora_params = unflatten_dict(flat)
        self._lora_merged = False
        self.lora_config = config

    @property
    def lora_params(self) -> dict:
        """The adapter tree (what to differentiate and give the optimizer)."""
        self._require_lora()
        return self._lora_params

    @lora_params.setter
    def lora_params(self, tree: Mapping) -> None:
        self._require_lora()
        want = jax.tree_util.tree_map(np.shape, self._lora_params)
        got = jax.tree_util.tree_map(np.shape, dict(tree))
        if want != got:
            raise ValueError(f"lora_params tree differs from the adapter's: want {want}, got {got}")
        self._lora_params = dict(tree)

    def apply_lora(self, params: Mapping, lora_params: Mapping | None = None, sign: float = 1.0) -> Any:
        """``params`` with ``sign * scaling * A_kernel @ B_kernel`` added to each targeted kernel.

        Returns ``params`` unchanged without an adapter, or when it is merged and ``lora_params`` is None.
        Differentiable in ``lora_params`` (jit/grad friendly).
        """
        if self.lora_config is None:
            if lora_params is not None:
                raise ValueError(f"{type(self).__name__} has no LoRA adapter; lora_params= must be None")
            return params
        if lora_params is None:
            if self._lora_merged:
                return params
            lora_params = self._lora_params
        scaling = self.lora_config.scaling
        flat = flatten_dict(dict(params))
        lora = flatten_dict(dict(lora_params))
        for t in self._lora_targets:
            path = _FLAX.path(t.param)
            module = path[:-1]
            kernel = flat[path]
            delta = lora[(*module, "lora_A", "kernel")] @ lora[(*module, "lora_B", "kernel")]
            flat[path] = (kernel + sign * scaling * delta).astype(kernel.dtype)
        return unflatten_dict(flat)

    def merge_lora(self) -> None:
        """Add ``scaling * B @ A`` into ``self.params``; calls without ``lora_params`` then skip the adapter."""
        self._require_lora()
        if not self._lora_merged:
            self.params = self.apply_lora(self.params)
            self._lora_merged = True

    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora` (subtract the same product)."""
        self._require_lora()
        if self._lora_merged:
            self.params = self.apply_lora(self.params, self._lora_params, sign=-1.0)
            self._lora_merged = False

    def trainable_parameter_count(self) -> int:
        """Number of parameters trained with an adapter (the adapter tree), else every param."""
        tree = self._lora_params if self.lora_config is not None else self.params
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))

    def lora_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module path -> (A (r, in), B (out, r)) as float32 numpy arrays."""
        self._require_lora()
        lora = flatten_dict(self._lora_params)
        out = {}
        for t in self._lora_targets:
            module = _FLAX.path(t.param)[:-1]
            out[t.module] = tuple(
                np.asarray(lora[(*module, which, "kernel")], np.float32).T for which in ("lora_A", "lora_B")
            )
        return out
