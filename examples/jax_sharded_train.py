"""Train a model sharded over a JAX device mesh: data parallel, FSDP or tensor parallel by rule set.

The partition of every parameter comes from the logical axes its family's spec declares
(``nezha_zoo.spec.partitioning``); the checkpoint is read straight into the sharded arrays
(``nezha_zoo.flax.sharding.load_sharded``) and one jitted step trains on a batch split over ``data``.

On a CPU-only machine, fake 8 devices (must happen before JAX starts, hence the flag)::

    python examples/jax_sharded_train.py --fake-devices 8 --rules fsdp+tp --data 2 --model 4

On a TPU VM or a multi-GPU host, drop ``--fake-devices``.  On several hosts, run the same command on
every host with ``--multi-host`` (it calls ``jax.distributed.initialize()``, which reads the
coordinator address, process count and id from the cluster environment or ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); the mesh then spans every host's devices.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

logger = logging.getLogger("jax_sharded_train")

FAMILIES = {  # family -> (Flax class, tiny config): a masked LM and a causal LM
    "electra": ("FlaxElectraForMaskedLM", dict(embedding_size=64, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)),
}  # fmt: skip


def main(
    family: str = "electra", rules: str = "fsdp", data: int | None = None, model: int = 1, steps: int = 20
) -> list[float]:
    """Save a seeded checkpoint, load it sharded, train ``steps`` steps on a copy task; return the losses."""
    import jax
    import numpy as np
    import optax

    import nezha_zoo.flax as nzf
    from nezha_zoo.flax import losses
    from nezha_zoo.flax.sharding import batch_sharding, load_sharded, make_mesh, make_train_step
    from nezha_zoo.pretrained import random_weights, save_weights
    from nezha_zoo.spec import get_family

    cls_name, fields = FAMILIES[family]
    fam, cls = get_family(family), getattr(nzf, cls_name)
    config = fam.config_class(vocab_size=64, **fields)
    mesh = make_mesh(data, model)
    logger.info("mesh %s over %d devices, rules %s", dict(mesh.shape), mesh.size, rules)
    with tempfile.TemporaryDirectory() as path:
        spec = fam.model_spec(config, cls.head)
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=0))
        sharded = load_sharded(cls, path, mesh, rules)
    optimizer = optax.adamw(3e-3)
    step = make_train_step(
        sharded, optimizer, lambda out, b: losses.masked_lm_loss(out.logits, b["labels"]), mesh, rules
    )
    params, opt_state = sharded.params, optimizer.init(sharded.params)
    rng = np.random.default_rng(0)
    history = []
    for i in range(steps):
        ids = rng.integers(3, 16, size=(mesh.shape["data"] * 4, 16))  # a small alphabet: learnable quickly
        batch = jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids},
                               batch_sharding(mesh, rules))  # fmt: skip
        params, opt_state, loss = step(params, opt_state, batch)
        history.append(float(loss))
        logger.info("step %d loss %.4f", i, history[-1])
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="electra", choices=sorted(FAMILIES))
    parser.add_argument("--rules", default="fsdp", help="dp, fsdp, tp or fsdp+tp")
    parser.add_argument("--data", type=int, default=None, help="data-axis size (default: devices / model)")
    parser.add_argument("--model", type=int, default=1, help="model-axis size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fake-devices", type=int, help="split the CPU into this many JAX devices")
    parser.add_argument("--multi-host", action="store_true", help="call jax.distributed.initialize() first")
    args = parser.parse_args()
    if args.fake_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fake_devices}"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.multi_host:
        import jax

        jax.distributed.initialize()
    losses_ = main(args.family, args.rules, args.data, args.model, args.steps)
    print(f"first loss {losses_[0]:.4f}, last loss {losses_[-1]:.4f}")
    sys.exit(0 if losses_[-1] < losses_[0] else 1)
