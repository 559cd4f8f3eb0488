"""LoRA for the PyTorch models: adapter A/B on the targeted ``nn.Linear`` layers, everything else frozen.

Each targeted ``nn.Linear`` keeps its ``weight``/``bias`` (so checkpoints and the spec are unchanged)
and gains ``lora_A`` (``nn.Linear(in, r)``, weight (r, in)), ``lora_B`` (``nn.Linear(r, out)``,
weight (out, r)) and ``lora_dropout``; a forward hook adds ``scaling * B(A(dropout(x)))`` to its
output, as PEFT does.  Only the A/B weights require grad, so an optimizer built over
``[p for p in model.parameters() if p.requires_grad]`` holds state for the adapter alone.
Targets, file format and checks are :mod:`nezha_zoo.adapters`'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from nezha_zoo.adapters import LoraConfig, LoraMethods, LoraTarget
from nezha_zoo.pt.layers import PackedLinear

__all__ = ["LoraMixin"]


def _lora_hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> torch.Tensor:
    if module.lora_merged:
        return output
    delta = module.lora_B(module.lora_A(module.lora_dropout(args[0])))
    return output + delta * module.lora_scaling


class LoraMixin(LoraMethods):
    """LoRA methods of the PyTorch base class (enable, merge, unmerge, save, load)."""

    def _lora_layers(self) -> dict[str, nn.Linear]:
        return {name: m for name, m in self.named_modules() if hasattr(m, "lora_A")}

    def _attach_lora(
        self,
        config: LoraConfig,
        targets: list[LoraTarget],
        weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
    ) -> None:
        layers = {t.module: self.get_submodule(t.module) for t in targets}
        for name, layer in layers.items():
            if type(layer) not in (nn.Linear, PackedLinear):
                raise ValueError(f"{name} is a {type(layer).__name__}, LoRA adapts plain linear layers only")
        for p in self.parameters():
            p.requires_grad_(False)
        for t in targets:
            layer = layers[t.module]
            w = layer.weight
            layer.lora_A = nn.Linear(t.in_features, config.r, bias=False, device=w.device, dtype=w.dtype)
            layer.lora_B = nn.Linear(config.r, t.out_features, bias=False, device=w.device, dtype=w.dtype)
            layer.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
            with torch.no_grad():
                if weights is None:
                    nn.init.kaiming_uniform_(layer.lora_A.weight, a=math.sqrt(5))
                    nn.init.zeros_(layer.lora_B.weight)
                else:
                    a, b = weights[t.module]
                    layer.lora_A.weight.copy_(torch.from_numpy(a))
                    layer.lora_B.weight.copy_(torch.from_numpy(b))
            layer.lora_scaling = config.scaling
            layer.lora_merged = False
            layer.lora_hook = layer.register_forward_hook(_lora_hook)
        self.lora_config = config

    def _adapted(self) -> dict[str, nn.Linear]:
        self._require_lora()
        return self._lora_layers()

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Add ``scaling * B @ A`` into each adapted weight; the forward pass then skips the adapter."""
        for layer in self._adapted().values():
            if not layer.lora_merged:
                layer.weight += (layer.lora_B.weight @ layer.lora_A.weight) * layer.lora_scaling
                layer.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora` (subtract the same product)."""
        for layer in self._adapted().values():
            if layer.lora_merged:
                layer.weight -= (layer.lora_B.weight @ layer.lora_A.weight) * layer.lora_scaling
                layer.lora_merged = False

    def trainable_parameter_count(self) -> int:
        """Number of parameters that require grad (tied weights once)."""
        return self.num_parameters(only_trainable=True)

    def lora_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module path -> (A (r, in), B (out, r)) as float32 numpy arrays."""
        return {
            name: tuple(w.detach().cpu().float().numpy() for w in (layer.lora_A.weight, layer.lora_B.weight))
            for name, layer in self._adapted().items()
        }
