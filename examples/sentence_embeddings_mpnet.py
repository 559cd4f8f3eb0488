"""Sentence embeddings with MPNet in PyTorch, TensorFlow and Flax from one checkpoint.

Saves a tiny seeded MPNet checkpoint (``nezha_zoo.pretrained.random_weights`` + ``save_weights``, the
same directory layout transformers writes), loads it in each backend, embeds a few sentences given as
token ids with ``encode`` (mean pooling over unmasked tokens, then L2 normalisation, as
sentence-transformers' MPNet models), prints the cosine-similarity matrix and the max-abs difference
of every backend's embeddings from PyTorch's.

Run with ``python examples/sentence_embeddings_mpnet.py``.  A backend whose framework or MPNet classes
cannot be imported is reported and skipped; ``main()`` returns the embeddings of the backends that ran.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from nezha_zoo import MPNetConfig
from nezha_zoo.families.mpnet import MPNET, mpnet_spec
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec import model_class

#: Token ids of four "sentences": <s>=0 ... </s>=2, right-padded with 1 (MPNet's padding id).
#: The first two share most tokens, so they should be the most similar pair.
SENTENCES = [
    [0, 11, 23, 35, 47, 59, 2],
    [0, 11, 23, 35, 47, 60, 2],
    [0, 71, 5, 88, 2],
    [0, 42, 2],
]
PAD = 1

#: the backends tried.  Each one's MPNet base class (looked up with ``nezha_zoo.spec.model_class``) has
#: ``from_pretrained(dir)`` and ``encode(input_ids, attention_mask=None, normalize=True)`` returning
#: ``SentenceEmbeddingOutput``.
BACKENDS = ("pt", "tf", "flax")


def tiny_config() -> MPNetConfig:
    return MPNetConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        relative_attention_num_buckets=32,
    )


def make_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write a seeded tiny ``MPNetModel`` checkpoint (config.json + model.safetensors) to ``directory``."""
    config = tiny_config()
    spec = mpnet_spec(config, "Model")
    weights = random_weights(spec, config, seed=seed)
    save_weights(directory, config, spec, MPNET, weights.items())
    return Path(directory)


def batch() -> tuple[np.ndarray, np.ndarray]:
    """The sentences as right-padded ``input_ids`` and ``attention_mask``, both (B, L) int64."""
    length = max(len(s) for s in SENTENCES)
    ids = np.full((len(SENTENCES), length), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(SENTENCES):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def load_class(backend: str):
    """The backend's MPNet base class, or None (with the reason printed) when it cannot be imported."""
    try:
        return model_class(MPNET, "Model", backend)
    except (ImportError, ValueError) as err:
        print(f"[{backend}] skipped: {MPNET.class_name('Model', backend)} not available ({err})")
        return None


def embed(backend: str, cls, directory: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Load ``directory`` with ``cls`` and return the normalised sentence embeddings (B, H) as numpy."""
    model = cls.from_pretrained(directory)
    if backend == "pt":
        import torch

        with torch.no_grad():
            out = model.encode(torch.from_numpy(ids), torch.from_numpy(mask))
        return out.embeddings.numpy()
    if backend == "tf":
        import tensorflow as tf

        out = model.encode(tf.constant(ids), tf.constant(mask))
        return np.asarray(out.embeddings)
    import jax.numpy as jnp

    out = model.encode(jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(out.embeddings)


def main(backends: tuple[str, ...] = ("pt", "tf", "flax"), seed: int = 0) -> dict[str, np.ndarray]:
    """Embed :data:`SENTENCES` in every available backend; returns backend -> embeddings (B, H)."""
    ids, mask = batch()
    results: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_checkpoint(Path(tmp) / "mpnet_tiny", seed=seed)
        for backend in backends:
            cls = load_class(backend)
            if cls is not None:
                results[backend] = embed(backend, cls, directory, ids, mask)
    np.set_printoptions(precision=4, suppress=True)
    for backend, emb in results.items():
        print(f"[{backend}] cosine similarity ({emb.shape[0]} sentences, dim {emb.shape[1]}):")
        print(emb @ emb.T)  # rows are unit vectors
    if "pt" in results:
        for backend, emb in results.items():
            if backend != "pt":
                print(f"max |{backend} - pt| = {float(np.max(np.abs(emb - results['pt']))):.3e}")
    return results


if __name__ == "__main__":
    main()
