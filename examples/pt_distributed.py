"""Train with PyTorch's own engines: DDP, or FSDP2 sharded per encoder layer, on any number of processes.

Launch with torchrun (one process per GPU, or CPU processes with the gloo backend)::

    torchrun --standalone --nproc-per-node 2 examples/pt_distributed.py --engine fsdp   # this machine, CPU
    torchrun --standalone --nproc-per-node 8 examples/pt_distributed.py --engine fsdp   # 8 GPUs (nccl)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/pt_distributed.py --engine fsdp     # 2 hosts x 8 GPUs

With FSDP2 the model is built on the meta device and each rank reads only its shard of every tensor
from the checkpoint (``nezha_zoo.pt.distributed.load_fsdp``).  Each rank trains on its own slice of
every batch; gradients are averaged across ranks.  ``--standalone`` lets torchrun pick a free port,
so that several runs on one machine never share a rendezvous.  The run ends with
``nezha_zoo.pt.distributed.destroy_process_group``, which joins the communication threads before
the interpreter exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist

import nezha_zoo.pt as nzp
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.pt.distributed import destroy_process_group, load_fsdp, wrap_ddp
from nezha_zoo.spec import get_family

logger = logging.getLogger("pt_distributed")

FAMILIES = {  # family -> (class, tiny config)
    "electra": ("ElectraForMaskedLM", dict(embedding_size=64, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)),
}  # fmt: skip


def main(engine: str = "fsdp", family: str = "electra", steps: int = 20, per_rank_batch: int = 4) -> list[float]:
    """Train ``steps`` steps on a copy task in the initialised process group; return rank 0's losses."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else None
    cls_name, fields = FAMILIES[family]
    fam, cls = get_family(family), getattr(nzp, cls_name)
    config = fam.config_class(vocab_size=64, **fields)
    # one seeded checkpoint, written once by rank 0, read by every rank; named after this run's
    # rendezvous (id and port), so that concurrent runs on one host never share it
    run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}_{os.environ.get('MASTER_PORT', '0')}"
    path = os.path.join(tempfile.gettempdir(), f"nezha_zoo_pt_distributed_{run}")
    if rank == 0:
        spec = fam.model_spec(config, cls.head)
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=0))
    dist.barrier()
    if engine == "fsdp":
        model = load_fsdp(cls, path)
    else:
        model = cls.from_pretrained(path)
        model = wrap_ddp(model.to(device) if device else model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)  # the same stream on every rank: each takes its own rows
    history = []
    for i in range(steps):
        ids = torch.from_numpy(rng.integers(3, 16, size=(world * per_rank_batch, 16)))
        mine = ids[rank * per_rank_batch : (rank + 1) * per_rank_batch]
        loss = model(input_ids=mine, attention_mask=torch.ones_like(mine), labels=mine).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the global batch's loss, for logging
        history.append(float(mean) / world)
        if rank == 0:
            logger.info("step %d loss %.4f", i, history[-1])
    dist.barrier()  # every rank has read the checkpoint
    if rank == 0:
        shutil.rmtree(path)
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="fsdp", choices=("ddp", "fsdp"))
    parser.add_argument("--family", default="electra", choices=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    history = main(args.engine, args.family, args.steps)
    if dist.get_rank() == 0:
        print(f"{args.engine}: first loss {history[0]:.4f}, last loss {history[-1]:.4f}")
    destroy_process_group()  # not torch's alone: see its docstring (threads alive at exit abort)
