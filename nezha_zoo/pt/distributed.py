"""PyTorch's own distributed engines for the zoo's models: DDP, FSDP2 per encoder layer, sharded loading.

The models are plain ``nn.Module``s, so ``torch.distributed`` applies as it is; this module adds the
two things a user would otherwise write per family:

* :func:`wrap_fsdp` shards with FSDP2 (``fully_shard``) one repeated block at a time (every element
  of the model's ``nn.ModuleList``s: encoder layers, MPT blocks), then the root, so that each block's
  parameters are gathered only while it runs;
* :func:`load_fsdp` builds the model on the meta device, shards it, and fills each rank's local shard
  straight from the checkpoint -- each process reads only the rows it holds (a slice of each tensor),
  never the whole model;
* :func:`destroy_process_group` ends the run so that no communication thread outlives it.

Launch with ``torchrun --nproc-per-node N script.py`` (see ``examples/pt_distributed.py``); on CPU the
process group backend is ``gloo``, on GPUs ``nccl``.
"""

from __future__ import annotations

import gc
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from nezha_zoo.io.plan import plan_load
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.pretrained import resolve_config
from nezha_zoo.spec.layouts import LAYOUTS

__all__ = ["repeated_blocks", "wrap_ddp", "wrap_fsdp", "load_fsdp", "destroy_process_group"]

LAYOUT = LAYOUTS["pt"]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: every element of every ``nn.ModuleList`` (encoder layers, MPT blocks)."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel`` over the initialised process group (gradients all-reduced, averaged)."""
    _require_process_group()
    return DistributedDataParallel(model, **ddp_kwargs)


def wrap_fsdp(model: nn.Module, mesh: Any = None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2: each repeated block, then the root (embeddings, norms, heads).

    Args:
        model: a zoo model (or any module).
        mesh: a 1-D ``DeviceMesh`` (default: all ranks of the default process group).
        reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3);
            False keeps them until backward (ZeRO-2-like, more memory, less communication).

    Returns the same module, its parameters now ``DTensor`` shards along dim 0.
    """
    _require_process_group()
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _local_rows(dt: DTensor) -> tuple[slice, ...]:
    """The global index of ``dt``'s local shard (FSDP2 shards dim 0 in ``torch.chunk`` pieces)."""
    index = [slice(None)] * dt.dim()
    mesh = dt.device_mesh
    for mesh_dim, placement in enumerate(dt.placements):
        if isinstance(placement, Shard):
            size, parts = dt.shape[placement.dim], mesh.size(mesh_dim)
            rank = mesh.get_local_rank(mesh_dim)
            chunk = math.ceil(size / parts)
            start = min(rank * chunk, size)
            index[placement.dim] = slice(start, min(start + chunk, size))
    return tuple(index)


def load_fsdp(
    cls: type,
    pretrained_model_name_or_path: str | os.PathLike,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    device: str | torch.device | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Build ``cls`` sharded with FSDP2 and fill each rank's shard from the checkpoint.

    The model is created on the meta device (no weights allocated), sharded by :func:`wrap_fsdp`,
    allocated shard-sized, and each parameter's local rows are read as a slice of the checkpoint
    tensor.  The checkpoint must hold every parameter (base-model prefixes are handled as in
    ``from_pretrained``); a missing or unexpected tensor raises, naming it.

    Args:
        cls: a PyTorch model class of the zoo (``ElectraForMaskedLM``...).
        pretrained_model_name_or_path: a checkpoint directory (safetensors, sharded or not).
        mesh: a 1-D ``DeviceMesh`` (default: every rank).
        reshard_after_forward: see :func:`wrap_fsdp`.
        device: where the shards live (default: this rank's current CUDA device if there is one,
            else the CPU).
        **config_overrides: config fields to change.
    """
    config = resolve_config(cls.family, pretrained_model_name_or_path, **config_overrides)
    with torch.device("meta"):
        model = cls(config)
    wrap_fsdp(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    model.to_empty(device=device)
    spec = model.spec
    tensors = dict(model.state_dict(keep_vars=True))
    with open_checkpoint(pretrained_model_name_or_path) as reader, torch.no_grad():
        plan = plan_load(spec, reader.keys(), reader.shape, cls.family.base_prefix)
        plan.report(cls.__name__, strict=True)
        for name, key in plan.sources.items():
            t = tensors[LAYOUT.key(spec[name])]
            if isinstance(t, DTensor):
                local = t.to_local()
                if local.numel():
                    local.copy_(torch.from_numpy(reader.get_slice(key, _local_rows(t)).astype("float32")))
            else:  # buffers stay whole on every rank
                t.copy_(torch.from_numpy(np.asarray(reader.get(key))))
    model.eval()
    return model


def destroy_process_group() -> None:
    """End the distributed run: destroy every process group and join its communication threads.

    Call it on every rank once the last collective has returned and the models are no longer used
    (e.g. after ``main()`` returns), in place of ``torch.distributed.destroy_process_group()``.

    Why not torch's alone: after FSDP2, that leaves a Gloo group alive -- with its worker threads
    (``pt_gloo_runloop``) and transport thread (``gloo_tcp_loop``) -- because each ``DeviceMesh``
    keeps its groups (``_pg_registry``) and DTensor's global caches (sharding propagation,
    redistribute plans, mesh topology) keep the meshes until the interpreter exits; the sharded
    model's hooks form reference cycles that hold the groups too.  Those threads then run while
    the interpreter finalizes, and a C++ thread that touches Python then (to release a tensor it
    still held) aborts the process: ``terminate called without an active exception``, SIGABRT, on
    a run that had finished.  Here the cycles are collected and the meshes drop their groups
    first, so destroying the group frees it and its threads are joined now, while Python is alive.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # the FSDP2 modules of finished models (hook cycles) still reference the group
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh):
            getattr(obj, "_pg_registry", {}).clear()  # meshes outlive the run in DTensor's caches
    dist.destroy_process_group()


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "no torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPUs) first"
        )
