"""Keras ``fit`` from raw strings: a ``tf.data.Dataset`` of ``(text, label)`` pairs, tokenized in the input pipeline.

The framework-free :class:`nezha_zoo.AutoTokenizer` runs inside ``dataset.map`` through
``tf.py_function``: each batch of strings is tokenized and padded to its own longest text, and the
dicts ``{"input_ids", "attention_mask", "labels"}`` go to ``model.fit`` (labels inside: ``compile``
needs only an optimizer).  Afterwards the model and tokenizer are saved side by side and answer
through ``nezha_zoo.pipeline("text-classification", framework="tf")``.

The tiny model, its vocabulary and the sentiment-like data are made here, so this runs offline in a
few seconds on CPU::

    python examples/tf_fit_from_text.py
    python examples/tf_fit_from_text.py --model ./my-electra    # a directory with weights + tokenizer files
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from nezha_zoo import AutoTokenizer, ElectraConfig, pipeline  # noqa: E402
from nezha_zoo.tf import TFElectraForSequenceClassification  # noqa: E402

logger = logging.getLogger("nezha_zoo.examples")

POSITIVE = ["good", "great", "lovely", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "poor"]
FILLER = ["the", "movie", "was", "really", "plot", "actors", "and", "music", "quite", "very", "a", "story"]


def make_texts(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` short sentences; label 1 when the sentiment word is positive."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 9))))
        label = int(rng.random() < 0.5)
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE)))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, np.array(labels, dtype=np.int32)


def write_tokenizer(directory: str) -> None:
    """A WordPiece ``vocab.txt`` over the example's words (a real checkpoint ships its own files)."""
    os.makedirs(directory, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab) + "\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"tokenizer_class": "ElectraTokenizer", "do_lower_case": True, "model_max_length": 32}, fh)


def text_dataset(tokenizer, texts, labels, batch_size: int = 16, max_length: int = 32) -> tf.data.Dataset:
    """``(text, label)`` pairs -> batches of model inputs, tokenized by ``tokenizer`` inside ``map``.

    ``tf.py_function`` runs the (Python) tokenizer on each batch of strings; the batch is padded to
    its longest text, so shapes are ``(batch, None)``.
    """
    names = [n for n in tokenizer.model_input_names if n in ("input_ids", "attention_mask", "token_type_ids")]

    def encode(batch: tf.Tensor) -> list[np.ndarray]:
        strings = [t.decode("utf-8") for t in batch.numpy()]
        enc = tokenizer(strings, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        return [enc[n].astype(np.int32) for n in names]

    def to_inputs(text: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        arrays = tf.py_function(encode, [text], [tf.int32] * len(names))
        inputs = {}
        for name, array in zip(names, arrays):
            array.set_shape([None, None])
            inputs[name] = array
        return {**inputs, "labels": label}

    pairs = tf.data.Dataset.from_tensor_slices((texts, labels))
    return pairs.batch(batch_size).map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def main(model_dir: str | None = None, epochs: int = 4, seed: int = 0, out_dir: str | None = None) -> dict:
    """Fit on raw strings; returns ``{"loss": per-epoch history, "answers": pipeline answers, "dir": saved}``."""
    keras.utils.set_random_seed(seed)
    work = out_dir or tempfile.mkdtemp(prefix="tf_fit_from_text_")
    if model_dir is None:  # a fresh tiny model over the example's vocabulary
        model_dir = os.path.join(work, "start")
        write_tokenizer(model_dir)
        config = ElectraConfig(
            vocab_size=5 + len(POSITIVE) + len(NEGATIVE) + len(FILLER),
            embedding_size=32,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            id2label={0: "negative", 1: "positive"},
        )
        model = TFElectraForSequenceClassification(config, seed=seed)
    else:
        model = TFElectraForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    texts, labels = make_texts(256, seed)
    train = text_dataset(tokenizer, texts, labels).shuffle(16, seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=2e-3))  # no loss: the model's own
    history = [float(x) for x in model.fit(train, epochs=epochs, shuffle=False, verbose=0).history["loss"]]

    saved = os.path.join(work, "trained")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    classify = pipeline("text-classification", model=saved, framework="tf")
    answers = classify(["the movie was great", "a very awful story"])
    logger.info("loss %s; answers %s; saved in %s", ", ".join(f"{h:.3f}" for h in history), answers, saved)
    return {"loss": history, "answers": answers, "dir": saved}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory with tokenizer files (default: a fresh tiny model)")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    main(args.model, epochs=args.epochs)
