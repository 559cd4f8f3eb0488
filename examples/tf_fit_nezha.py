"""Train a tiny TFNezhaForSequenceClassification with Keras ``compile`` + ``fit`` (internal loss).

The synthetic task: does the unpadded part of the sequence contain token 7?  Inputs are padded
and carry two token types.  The labels travel inside the ``tf.data.Dataset`` dicts, so
``compile`` needs only an optimizer.  Runs in well under a minute on CPU::

    python examples/tf_fit_nezha.py
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nezha_zoo import NezhaConfig  # noqa: E402
from nezha_zoo.tf import TFNezhaForSequenceClassification  # noqa: E402

logger = logging.getLogger("nezha_zoo.examples")


def make_dataset(n: int = 256, seq_len: int = 12, batch: int = 32, seed: int = 0) -> tf.data.Dataset:
    """Dicts of ``input_ids``/``token_type_ids``/``attention_mask``/``labels``; label 1 iff token 7
    occurs among the unpadded tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, 64, size=(n, seq_len))
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=n)
    positive = rng.random(n) < 0.5
    where = rng.integers(1, lengths)  # inside the unpadded part
    rows = np.arange(n)
    ids[rows[positive], where[positive]] = 7
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)
    types = (np.arange(seq_len)[None, :] >= seq_len // 2).astype(np.int32) * mask
    data = {
        "input_ids": ids.astype(np.int32),
        "token_type_ids": np.broadcast_to(types, ids.shape).copy(),
        "attention_mask": mask,
        "labels": positive.astype(np.int32),
    }
    return tf.data.Dataset.from_tensor_slices(data).shuffle(n, seed=seed).batch(batch, drop_remainder=True)


def main(steps: int = 60, seed: int = 0) -> list[float]:
    """Fit for ``steps`` optimizer steps; returns the per-epoch training loss history."""
    keras.utils.set_random_seed(seed)
    config = NezhaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        max_relative_position=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    model = TFNezhaForSequenceClassification(config, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=3e-3))  # no loss: the model's own
    train = make_dataset(seed=seed)
    steps_per_epoch = 8
    epochs = max(1, steps // steps_per_epoch)
    fitted = model.fit(train.repeat(), epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False, verbose=0)
    history = [float(h) for h in fitted.history["loss"]]
    evaluation = model.evaluate(make_dataset(n=64, seed=seed + 1), verbose=0, return_dict=True)
    logger.info("loss %.4f -> %.4f; held-out %s", history[0], history[-1], evaluation)
    return history


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    hist = main()
    logger.info("loss history: %s", ", ".join(f"{h:.3f}" for h in hist))
