"""JAX on 8 host devices: every rule set gives the single-device numbers, forward and one training step.

JAX fixes its device count at import, so the sharded runs happen in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; it reports max-abs differences as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from nezha_zoo.testing import TOLERANCES

pytestmark = pytest.mark.flax

# One layer: the rule sets shard by logical axis (nezha_zoo.spec.partitioning), so layer 0 holds every
# kind of parameter a deeper model has, and each extra layer only adds compile time (the fixture is
# compile-bound: a training step per family and rule set, on 8 devices).
XL_TINY = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
MPT_TINY = dict(vocab_size=96, d_model=32, n_heads=4, n_layers=1, max_seq_len=64)

#: family -> (Flax class, loss over (output, batch), tiny config).
FAMILIES = {
    "electra": (
        "FlaxElectraForMaskedLM",
        "losses.masked_lm_loss(out.logits, b['labels'])",
        dict(vocab_size=96, embedding_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0),
    ),
    "xlm_roberta_xl": (
        "FlaxXLMRobertaXLForMaskedLM",
        "losses.masked_lm_loss(out.logits, b['labels'])",
        XL_TINY,
    ),
    "mpt": ("FlaxMptForCausalLM", "losses.causal_lm_loss(out.logits, b['labels'])", MPT_TINY),
}  # fmt: skip

MESHES = [("dp", 8, 1), ("fsdp", 8, 1), ("tp", 1, 8), ("fsdp+tp", 2, 4)]

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_default_matmul_precision", "float32")
    import nezha_zoo.flax as nzf
    from nezha_zoo.flax import losses
    from nezha_zoo.flax.sharding import load_sharded, make_mesh, make_train_step
    from nezha_zoo.pretrained import random_weights, save_weights
    from nezha_zoo.spec import get_family

    families, meshes = json.loads(sys.argv[1])
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)


    def run(cls, path, batch, loss_fn, opt, mesh, rules):
        model = load_sharded(cls, path, mesh, rules)
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        step = make_train_step(model, opt, loss_fn, mesh, rules)
        params, _, loss = step(model.params, opt.init(model.params), batch)
        leaves = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        split = sum(any(a is not None for a in v.sharding.spec) for v in leaves.values())
        return np.asarray(out.logits), float(loss), leaves, split


    def check(family, cls_name, loss_src, cfg):
        fam = get_family(family)
        config = fam.config_class(**cfg)
        cls = getattr(nzf, cls_name)
        spec = fam.model_spec(config, cls.head)
        path = tempfile.mkdtemp()
        save_weights(path, config, spec, fam, random_weights(spec, config, seed=1))
        ids = rng.integers(2, cfg["vocab_size"], (8, 12))
        mask = np.ones((8, 12), np.int64)
        mask[1, 9:] = 0
        batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(ids)}
        args = (cls, path, batch, eval("lambda out, b: " + loss_src), optax.sgd(0.5))
        ref_out, ref_loss, ref_params, _ = run(*args, make_mesh(1, 1, jax.devices()[:1]), "dp")
        plain = cls.from_pretrained(path)(batch["input_ids"], attention_mask=batch["attention_mask"])
        report = {"single_vs_from_pretrained": float(np.abs(ref_out - np.asarray(plain.logits)).max())}
        for rules, data, width in meshes:
            out, loss, params, split = run(*args, make_mesh(data, width), rules)
            report[rules] = {
                "logits": float(np.abs(out - ref_out).max()),
                "loss": abs(loss - ref_loss),
                "params": max(float(np.abs(np.asarray(params[k]) - v).max()) for k, v in ref_params.items()),
                "split_params": split,
            }
        return report


    print(json.dumps({f: check(f, *v) for f, v in families.items()}))
    """
)


@pytest.fixture(scope="module")
def reports():
    """One 8-device interpreter runs every family and mesh (JAX start-up is the expensive part)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    arg = json.dumps([FAMILIES, MESHES])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, arg], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_rule_set_matches_one_device(family, reports):
    report = reports[family]
    assert report["single_vs_from_pretrained"] <= TOLERANCES["logits"]
    for rules, *_ in MESHES:
        r = report[rules]
        assert r["logits"] <= TOLERANCES["logits"], (rules, r)
        assert r["loss"] <= TOLERANCES["loss"], (rules, r)
        assert r["params"] <= TOLERANCES["hidden"], (rules, r)  # weights after one SGD step
        # dp replicates everything; the other rule sets really split parameters
        assert (r["split_params"] == 0) == (rules == "dp"), (rules, r)


def test_sharded_training_example_loss_falls():
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "jax_sharded_train.py")
    cmd = [sys.executable, example, "--fake-devices", "8", "--rules", "fsdp+tp", "--data", "2", "--model", "4"]
    proc = subprocess.run([*cmd, "--steps", "12"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = (float(w) for w in proc.stdout.replace(",", "").split() if w[0].isdigit())
    assert last < 0.5 * first, proc.stdout
