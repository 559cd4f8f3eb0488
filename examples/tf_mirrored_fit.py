"""Train with TensorFlow's own distribution: ``model.fit`` under a ``tf.distribute`` strategy.

The zoo's Keras models are built, compiled and fitted inside the strategy's scope like any Keras
model; their internal loss is scaled per replica as Keras scales its own losses.

On this CPU-only machine, split the CPU into 2 logical devices (MirroredStrategy over them)::

    python examples/tf_mirrored_fit.py --logical-cpus 2

On a multi-GPU host, drop ``--logical-cpus``: MirroredStrategy takes every visible GPU.  On several
hosts, set ``TF_CONFIG`` on each (``{"cluster": {"worker": ["host1:12345", "host2:12345"]},
"task": {"type": "worker", "index": 0}}``, index 1 on the second host) and pass ``--multi-worker``:
MultiWorkerMirroredStrategy reads the cluster through ``TFConfigClusterResolver``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

logger = logging.getLogger("tf_mirrored_fit")

FAMILIES = {  # family -> (class, tiny config)
    "electra": ("TFElectraForMaskedLM", dict(embedding_size=64, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)),
}  # fmt: skip


def main(family: str = "electra", steps: int = 20, multi_worker: bool = False) -> list[float]:
    """Fit ``steps`` batches of a copy task under the strategy; return the per-epoch losses."""
    import keras
    import numpy as np
    import tensorflow as tf

    import nezha_zoo.tf as nzt
    from nezha_zoo.pretrained import random_weights, save_weights
    from nezha_zoo.spec import get_family

    if multi_worker:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver()
        )
    else:  # every GPU; without GPUs, every logical CPU device
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in gpus or tf.config.list_logical_devices("CPU")])
    logger.info("%s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    cls_name, fields = FAMILIES[family]
    fam, cls = get_family(family), getattr(nzt, cls_name)
    config = fam.config_class(vocab_size=64, **fields)
    with tempfile.TemporaryDirectory() as path:
        spec = fam.model_spec(config, cls.head)
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=0))
        with strategy.scope():
            model = cls.from_pretrained(path)
            model.compile(optimizer=keras.optimizers.AdamW(3e-3))
    ids = np.random.default_rng(0).integers(3, 16, size=(steps * 8, 16))
    data = tf.data.Dataset.from_tensor_slices({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids})
    history = model.fit(data.batch(8).repeat(4), epochs=4, steps_per_epoch=steps // 4 or 1, verbose=0)
    return [float(x) for x in history.history["loss"]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="electra", choices=sorted(FAMILIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--logical-cpus", type=int, help="split the CPU into this many logical devices")
    parser.add_argument("--multi-worker", action="store_true", help="MultiWorkerMirroredStrategy from TF_CONFIG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.logical_cpus:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)
    losses = main(args.family, args.steps, args.multi_worker)
    print(f"epoch losses: {', '.join(f'{x:.4f}' for x in losses)}")
