"""LoRA for the Keras 3 models: Keras' own ``Dense.enable_lora`` on the targeted layers, the rest frozen.

A targeted ``keras.layers.Dense`` gets ``lora_kernel_a`` (in, r) = A^T and ``lora_kernel_b`` (r, out) =
B^T; its kernel reads as ``kernel + scaling * a @ b``.  Every other variable is made non-trainable,
so ``model.trainable_weights`` (what ``fit`` and optimizers use) holds the adapter alone.  Keras
applies LoRA as a kernel delta, so ``lora_dropout`` is recorded but not applied while training.
Targets, file format and checks are :mod:`nezha_zoo.adapters`'.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from nezha_zoo.adapters import LoraConfig, LoraMethods, LoraTarget
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.tf.layers import sublayers

__all__ = ["LoraMixin", "is_lora_key"]

_KERAS = LAYOUTS["keras"]


def is_lora_key(key: str) -> bool:
    """Whether a variable key (``.../query/lora_kernel_a``) is an adapter variable, not a spec param."""
    return key.rpartition("/")[2].startswith("lora_kernel_")


class LoraMixin(LoraMethods):
    """LoRA methods of the Keras base class (enable, merge, unmerge, save, load)."""

    def _dense_layers(self, targets: list[LoraTarget]) -> dict[str, keras.layers.Dense]:
        # ``_kernel``: the variable itself; the public ``kernel`` is the merged product once Keras's LoRA is on.
        by_kernel = {
            id(layer._kernel): layer for layer in sublayers(self, True) if isinstance(layer, keras.layers.Dense)
        }
        by_key = {k: v for k, v in self.variables_by_key().items() if not is_lora_key(k)}
        out = {}
        for t in targets:
            layer = by_kernel.get(id(by_key[_KERAS.key(t.param)]))
            if layer is None:
                raise ValueError(f"{t.module} is not a keras.layers.Dense; LoRA adapts Dense layers only")
            out[t.module] = layer
        return out

    def _attach_lora(
        self,
        config: LoraConfig,
        targets: list[LoraTarget],
        weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
    ) -> None:
        layers = self._dense_layers(targets)
        for v in self.weights:
            v.trainable = False
        for module, layer in layers.items():
            layer.enable_lora(config.r)
            layer.lora_alpha = config.scaling * config.r  # Keras scales by lora_alpha / lora_rank
            layer.nz_lora_merged = False
            if weights is not None:
                a, b = weights[module]
                layer.lora_kernel_a.assign(a.T)
                layer.lora_kernel_b.assign(b.T)
        # Plain attributes: Keras must not track the layers twice (nor lock a built model against it).
        object.__setattr__(self, "_lora_layer_map", layers)
        object.__setattr__(self, "lora_config", config)

    def _adapted(self) -> dict[str, keras.layers.Dense]:
        self._require_lora()
        return self._lora_layer_map

    @staticmethod
    def _delta(layer: keras.layers.Dense) -> np.ndarray:
        a, b = np.asarray(layer.lora_kernel_a.numpy()), np.asarray(layer.lora_kernel_b.numpy())
        return (a @ b) * (layer.lora_alpha / layer.lora_rank)

    def merge_lora(self) -> None:
        """Add ``scaling * B @ A`` into each adapted kernel; the forward pass then skips the adapter."""
        for layer in self._adapted().values():
            if not layer.nz_lora_merged:
                kernel = layer._kernel
                kernel.assign((np.asarray(kernel.numpy(), np.float32) + self._delta(layer)).astype(kernel.dtype))
                layer.lora_enabled = False  # Dense.kernel stops adding a @ b
                layer.nz_lora_merged = True
        self.drop_packed_weights()

    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora` (subtract the same product)."""
        for layer in self._adapted().values():
            if layer.nz_lora_merged:
                kernel = layer._kernel
                kernel.assign((np.asarray(kernel.numpy(), np.float32) - self._delta(layer)).astype(kernel.dtype))
                layer.lora_enabled = True
                layer.nz_lora_merged = False
        self.drop_packed_weights()

    def trainable_parameter_count(self) -> int:
        """Number of parameters in ``trainable_weights`` (what ``fit`` updates)."""
        return int(sum(np.prod(v.shape) for v in self.trainable_weights))

    def lora_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module path -> (A (r, in), B (out, r)) as float32 numpy arrays."""
        return {
            module: (
                np.asarray(layer.lora_kernel_a.numpy(), np.float32).T,
                np.asarray(layer.lora_kernel_b.numpy(), np.float32).T,
            )
            for module, layer in self._adapted().items()
        }
