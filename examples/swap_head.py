"""Put a new classifier head on a saved checkpoint and fine-tune it, in PyTorch, TensorFlow or Flax.

A tiny Electra "pretrained" for a 2-label task is saved (framework-free, from the spec's init); it is
then loaded for a 3-label task with ``num_labels=3, ignore_mismatched_sizes=True``: the body keeps its
weights, the classifier is initialised afresh (and reported by name with both shapes), a few steps
train it, and the fine-tuned model is saved and loaded back.  The task (synthetic, seeded): the label
is the first token's residue modulo 3.  Seconds on a CPU::

    python examples/swap_head.py --framework pt   # or tf, flax
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np

from nezha_zoo import ElectraConfig
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family

logger = logging.getLogger("swap_head")

VOCAB, SEQ_LEN, BATCH, LABELS = 30, 8, 16, 3


def save_pretrained_checkpoint(directory: str) -> None:
    """A 2-label ElectraForSequenceClassification checkpoint, as if downloaded."""
    config = ElectraConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    family = get_family("electra")
    spec = family.model_spec(config, "ForSequenceClassification")
    save_weights(directory, config, spec, family, random_weights(spec, config, seed=0))


def make_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(3, VOCAB, size=(BATCH, SEQ_LEN)).astype(np.int32)
    return {"input_ids": ids, "labels": (ids[:, 0] % LABELS).astype(np.int32)}


def finetune_pt(ckpt: str, out: str, steps: int) -> list[float]:
    import torch

    from nezha_zoo.pt import ElectraForSequenceClassification

    torch.manual_seed(0)
    model = ElectraForSequenceClassification.from_pretrained(ckpt, num_labels=LABELS, ignore_mismatched_sizes=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, history = np.random.default_rng(0), []
    for _ in range(steps):
        batch = {k: torch.from_numpy(v).long() for k, v in make_batch(rng).items()}
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    model.eval().save_pretrained(out)
    ids = torch.from_numpy(make_batch(rng)["input_ids"]).long()
    again = ElectraForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-6)
    return history


def finetune_tf(ckpt: str, out: str, steps: int) -> list[float]:
    import keras

    from nezha_zoo.tf import TFElectraForSequenceClassification

    keras.utils.set_random_seed(0)
    model = TFElectraForSequenceClassification.from_pretrained(ckpt, num_labels=LABELS, ignore_mismatched_sizes=True)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=3e-3))  # the model's own loss
    rng = np.random.default_rng(0)
    batches = [make_batch(rng) for _ in range(steps)]
    data = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    fitted = model.fit(data, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model.save_pretrained(out)
    ids = make_batch(rng)["input_ids"]
    again = TFElectraForSequenceClassification.from_pretrained(out)
    np.testing.assert_allclose(again(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-6)
    # fit reports the epoch's running mean; evaluate the first and the trained model per batch instead
    first = float(fitted.history["loss"][0])
    return [first, float(model.evaluate(data, batch_size=BATCH, verbose=0))]


def finetune_flax(ckpt: str, out: str, steps: int) -> list[float]:
    import jax
    import optax

    from nezha_zoo.flax import FlaxElectraForSequenceClassification
    from nezha_zoo.flax.losses import sequence_classification_loss

    model = FlaxElectraForSequenceClassification.from_pretrained(ckpt, num_labels=LABELS, ignore_mismatched_sizes=True)
    tx = optax.adamw(3e-3)
    params, opt_state = model.params, tx.init(model.params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = model.module.apply({"params": p}, batch["input_ids"], deterministic=True).logits
            return sequence_classification_loss(logits, batch["labels"], LABELS)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng, history = np.random.default_rng(0), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, make_batch(rng))
        history.append(float(loss))
    model.params = params
    model.save_pretrained(out)
    ids = make_batch(rng)["input_ids"]
    again = FlaxElectraForSequenceClassification.from_pretrained(out)
    np.testing.assert_allclose(np.asarray(again(ids).logits), np.asarray(model(ids).logits), atol=1e-6)
    return history


FINETUNE = {"pt": finetune_pt, "tf": finetune_tf, "flax": finetune_flax}


def main(framework: str = "pt", steps: int = 30) -> list[float]:
    """Swap the head and fine-tune in ``framework``; returns the loss history (first ... last)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = os.path.join(tmp, "pretrained"), os.path.join(tmp, "finetuned")
        save_pretrained_checkpoint(ckpt)
        history = FINETUNE[framework](ckpt, out, steps)
    logger.info("%s: loss %.4f -> %.4f", framework, history[0], history[-1])
    return history


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=sorted(FINETUNE), default="pt")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    main(args.framework, args.steps)
