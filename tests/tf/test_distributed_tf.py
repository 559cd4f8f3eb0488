"""tf.distribute.MirroredStrategy over 2 logical CPU devices: predict and fit give the one-device numbers.

TensorFlow fixes its logical devices at start-up, so the run happens in a fresh interpreter, which
reports max-abs differences as JSON.  The models are built, compiled and trained in the strategy's
scope exactly as a user would (``model.fit`` on a ``tf.data`` dataset, loss from the labels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tensorflow")

from nezha_zoo.testing import TOLERANCES

pytestmark = pytest.mark.tf

XL_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
MPT_TINY = dict(vocab_size=96, d_model=32, n_heads=4, n_layers=2, max_seq_len=64)

FAMILIES = {
    "electra": (
        "TFElectraForMaskedLM",
        dict(vocab_size=96, embedding_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0),
    ),
    "xlm_roberta_xl": ("TFXLMRobertaXLForMaskedLM", XL_TINY),
    "mpt": ("TFMptForCausalLM", MPT_TINY),
}  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import nezha_zoo.tf as nzt
    from nezha_zoo.pretrained import random_weights, save_weights
    from nezha_zoo.spec import get_family


    def train(cls, path, data, strategy):
        with strategy.scope():
            model = cls.from_pretrained(path)
            model.compile(optimizer=keras.optimizers.SGD(0.5))
        ds = tf.data.Dataset.from_tensor_slices(data).batch(8)
        logits = model.predict(ds, verbose=0)["logits"]
        loss = model.fit(ds, epochs=1, verbose=0).history["loss"][0]
        return logits, loss, {v.path: v.numpy() for v in model.trainable_variables}


    report = {}
    # One strategy for every family: models trained one after another under successive
    # MirroredStrategy instances in one process collide (mismatched collective shapes).
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for family, (cls_name, cfg) in json.loads(sys.argv[1]).items():
        fam, cls = get_family(family), getattr(nzt, cls_name)
        config = fam.config_class(**cfg)
        spec = fam.model_spec(config, cls.head)
        path = tempfile.mkdtemp()
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=1))
        ids = np.random.default_rng(0).integers(2, cfg["vocab_size"], (8, 12))
        data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
        one = train(cls, path, data, tf.distribute.OneDeviceStrategy("/cpu:0"))
        two = train(cls, path, data, mirrored)
        report[family] = {
            "replicas": mirrored.num_replicas_in_sync,
            "logits": float(np.abs(one[0] - two[0]).max()),
            "loss": abs(one[1] - two[1]),
            "weights": max(float(np.abs(one[2][k] - two[2][k]).max()) for k in one[2]),
            "moved": max(float(np.abs(one[2][k] - v.numpy()).max())
                         for k, v in {w.path: w for w in cls.from_pretrained(path).trainable_variables}.items()),
        }
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def reports():
    """One 2-CPU interpreter runs every family (TensorFlow's start-up is the expensive part)."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    arg = json.dumps(FAMILIES)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, arg], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mirrored_strategy_matches_one_device(family, reports):
    r = reports[family]
    assert r["replicas"] == 2
    assert r["logits"] <= TOLERANCES["logits"], r
    # the per-replica losses are scaled by 1/replicas: the reported loss is the batch mean, not a sum
    assert r["loss"] <= TOLERANCES["loss"], r
    assert r["weights"] <= TOLERANCES["hidden"], r
    assert r["moved"] > 1e-3, r  # the step really changed the weights


def test_mirrored_fit_example_trains():
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tf_mirrored_fit.py")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, example, "--logical-cpus", "2", "--steps", "12"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MirroredStrategy with 2 replicas" in proc.stderr
    losses = [float(w) for w in proc.stdout.split("epoch losses:")[1].replace(",", "").split()]
    assert losses[-1] < 0.6 * losses[0], losses
