"""Train a tiny Electra sequence classifier with a jitted optax (AdamW) step and dropout.

Task (synthetic, seeded): label a sequence 1 when token 7 occurs in it, else 0.  The model is the
plain linen module of ``FlaxElectraForSequenceClassification``; the loss is
``nezha_zoo.flax.losses.sequence_classification_loss``.  Runs in well under a minute on a CPU::

    python examples/flax_train_electra.py --steps 60
"""

from __future__ import annotations

import argparse
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nezha_zoo import ElectraConfig
from nezha_zoo.flax import FlaxElectraForSequenceClassification
from nezha_zoo.flax.losses import sequence_classification_loss

logger = logging.getLogger("flax_train_electra")

VOCAB, SEQ_LEN, MARKER = 32, 12, 7


def make_batch(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    """Random ids without the marker; half the rows get it at a random position (label 1)."""
    ids = rng.integers(8, VOCAB, size=(batch, SEQ_LEN))
    labels = rng.integers(0, 2, size=(batch,))
    where = rng.integers(1, SEQ_LEN, size=(batch,))
    ids[labels == 1, where[labels == 1]] = MARKER
    return {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32)}


def toy_config(dropout: float = 0.1) -> ElectraConfig:
    """The tiny Electra classifier of the toy task."""
    return ElectraConfig(
        vocab_size=VOCAB,
        embedding_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def main(steps: int = 60, batch: int = 32, seed: int = 0, learning_rate: float = 3e-3) -> list[float]:
    """Train for ``steps`` steps; return the loss of every step."""
    config = toy_config()
    model = FlaxElectraForSequenceClassification(config, seed=seed)
    module, params = model.module, model.params
    tx = optax.adamw(learning_rate, weight_decay=0.01)
    opt_state = tx.init(params)

    def loss_fn(p, batch, dropout_rng):
        out = module.apply(
            {"params": p},
            batch["input_ids"],
            deterministic=False,
            rngs={"dropout": dropout_rng},
        )
        return sequence_classification_loss(out.logits, batch["labels"], config.num_labels)

    @jax.jit
    def train_step(p, opt_state, batch, rng):
        rng, dropout_rng = jax.random.split(rng)
        loss, grads = jax.value_and_grad(loss_fn)(p, batch, dropout_rng)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, rng

    data_rng = np.random.default_rng(seed)
    # An "rbg" key: dropout masks from it compile several times faster on CPU than threefry's.
    rng = jax.random.key(seed, impl="rbg")
    history: list[float] = []
    for step in range(steps):
        b = {k: jnp.asarray(v) for k, v in make_batch(data_rng, batch).items()}
        params, opt_state, loss, rng = train_step(params, opt_state, b, rng)
        history.append(float(loss))
        if step % 10 == 0:
            logger.info("step %d loss %.4f", step, history[-1])
    return history


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    losses = main(steps=args.steps)
    logger.info("first loss %.4f, last loss %.4f", losses[0], losses[-1])
