"""Flax MPNet against transformers 4.57.6 PyTorch: outputs, losses, positions, checkpoints, embeddings, training.

Every comparison loads our Flax model from a directory written by transformers' PyTorch
``save_pretrained``, so it checks the checkpoint path and the numerics at once.  MPNet's padding id
is 1 (hard-coded in transformers' embeddings), so padded positions hold id 1 here.
"""

from __future__ import annotations

import inspect
import logging
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

import nezha_zoo.flax as nzf
from nezha_zoo import MPNetConfig
from nezha_zoo.families.mpnet import relative_position_bucket
from nezha_zoo.flax import losses as L
from nezha_zoo.flax.layers import padding_aware_position_ids
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.testing import TOLERANCES, assert_close, op_by_op, pin_precision
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.flax, pytest.mark.hf]

pin_precision("flax")
pin_precision("pt")

HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    relative_attention_num_buckets=32,
    num_labels=3,
)
PAD = 1
FLAX_LAYOUT = LAYOUTS["flax"]
HID, LOG = TOLERANCES["hidden"], TOLERANCES["logits"]
MEASURED: dict[str, float] = {}  # max-abs differences, printed when the module finishes


@pytest.fixture(scope="module", autouse=True)
def _print_measured(request):
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for k in sorted(MEASURED):
            print(f"  max|diff| {k}: {MEASURED[k]:.2e}")


def _suffix(head: str) -> str:
    return "Model" if head == "Model" else head


def pt_class(head: str):
    return getattr(transformers, f"MPNet{_suffix(head)}")


def flax_class(head: str):
    return getattr(nzf, f"FlaxMPNet{_suffix(head)}")


def make_pt(head: str, tmp_path_factory, seed: int = 0, **overrides):
    """A seeded transformers PyTorch model saved with its own save_pretrained; returns (model, dir)."""
    torch.manual_seed(seed)
    if head == "ForQuestionAnswering":
        overrides.setdefault("num_labels", 2)  # start/end
    model = pt_class(head)(transformers.MPNetConfig(**{**TINY, **overrides})).eval()
    path = tmp_path_factory.mktemp(f"pt_{head}")
    model.save_pretrained(path)
    return model, str(path)


def padded_inputs(head: str, side: str = "right", seed: int = 0, batch: int = 2, seq_len: int = 7) -> dict:
    """Random ids (2..98) with padding (id 1, mask 0) on ``side``; every row keeps >= 2 tokens, one row is full."""
    rng = np.random.default_rng(seed)
    lead = (batch, 3) if head == "ForMultipleChoice" else (batch,)
    ids = rng.integers(2, TINY["vocab_size"], size=(*lead, seq_len), dtype=np.int64)
    mask = np.ones_like(ids)
    flat_ids, flat_mask = ids.reshape(-1, seq_len), mask.reshape(-1, seq_len)
    for r in range(1, flat_ids.shape[0]):  # row 0 unpadded
        keep = int(rng.integers(2, seq_len))
        cut = slice(keep, None) if side == "right" else slice(None, seq_len - keep)
        flat_mask[r, cut] = 0
        flat_ids[r, cut] = PAD
    return {"input_ids": ids, "attention_mask": mask}


def run_pt(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.array(v)) for k, v in inputs.items()}, **kwargs)


def compare(flax_out, pt_out, what: str) -> None:
    """Every field of our output equals transformers' (same field set, except PT-only loss)."""
    pt_fields = {k for k, v in pt_out.items() if v is not None and k != "loss"}
    ours = set(flax_out.keys())
    assert ours == pt_fields, f"{what}: fields {sorted(ours)} vs transformers {sorted(pt_fields)}"
    for key in ours:
        mine, theirs = flax_out[key], pt_out[key]
        if isinstance(mine, tuple):
            assert len(mine) == len(theirs), f"{what}.{key}: {len(mine)} vs {len(theirs)} entries"
            for i, (a, b) in enumerate(zip(mine, theirs)):
                d = assert_close(a, b, HID, f"{what}.{key}[{i}]")
                MEASURED[f"{what}.{key}"] = max(MEASURED.get(f"{what}.{key}", 0.0), d)
        else:
            tol = HID if key in ("last_hidden_state", "pooler_output") else LOG
            MEASURED[f"{what}.{key}"] = assert_close(mine, theirs, tol, f"{what}.{key}")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """head -> (transformers PT model, its checkpoint dir, our Flax model loaded from that dir)."""
    out = {}
    for head in HEADS:
        pt, path = make_pt(head, tmp_path_factory)
        out[head] = (pt, path, flax_class(head).from_pretrained(path, strict=True))
    return out


# --- numerics against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers_with_right_and_left_padding(pairs, head):
    pt, _, fx = pairs[head]
    kw = dict(output_hidden_states=True, output_attentions=True)
    for side in ("right", "left"):
        inputs = padded_inputs(head, side)
        assert (inputs["attention_mask"] == 0).any()
        compare(fx(**inputs, **kw), run_pt(pt, inputs, **kw), f"{head}[{side}]")


@pytest.mark.parametrize("head", HEADS)
def test_defaulted_inputs_match_transformers(pairs, head):
    pt, _, fx = pairs[head]
    ids = {"input_ids": padded_inputs(head, seed=1)["input_ids"]}  # pads (id 1) present, no mask given
    compare(fx(**ids), run_pt(pt, ids), f"{head}[ids only]")


def test_position_ids_and_inputs_embeds_paths_match_transformers(pairs):
    pt, _, fx = pairs["ForTokenClassification"]
    inputs = padded_inputs("ForTokenClassification", "left", seed=2)
    # explicit position_ids (any in-range values) are used as given
    pos = np.random.default_rng(2).integers(0, TINY["max_position_embeddings"], size=inputs["input_ids"].shape)
    theirs = run_pt(pt, inputs, position_ids=torch.as_tensor(pos))
    compare(fx(**inputs, position_ids=pos), theirs, "TokCls[position_ids]")
    # inputs_embeds: positions arange(2, L + 2), whatever the padding
    table = fx.params["mpnet"]["embeddings"]["word_embeddings"]["embedding"]
    embeds = np.asarray(jnp.take(table, inputs["input_ids"], axis=0))
    mask = inputs["attention_mask"]
    mine = fx(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    theirs = run_pt(pt, {"inputs_embeds": embeds, "attention_mask": mask}, output_hidden_states=True)
    compare(mine, theirs, "TokCls[inputs_embeds]")
    # and the defaulted positions are RoBERTa-style: pads 1, tokens from 2 (left padding included)
    want = np.where(inputs["input_ids"] == PAD, PAD, np.cumsum(inputs["input_ids"] != PAD, axis=1) + PAD)
    np.testing.assert_array_equal(np.asarray(padding_aware_position_ids(jnp.asarray(inputs["input_ids"]), 1)), want)
    # multiple choice flattens position_ids and inputs_embeds as well
    pt, _, fx = pairs["ForMultipleChoice"]
    mc = padded_inputs("ForMultipleChoice", seed=3)
    mc_pos = np.broadcast_to(np.arange(3, 10), mc["input_ids"].shape).copy()
    compare(fx(**mc, position_ids=mc_pos), run_pt(pt, mc, position_ids=torch.as_tensor(mc_pos)), "MC[position_ids]")
    mc_embeds = np.asarray(
        jnp.take(fx.params["mpnet"]["embeddings"]["word_embeddings"]["embedding"], mc["input_ids"], axis=0)
    )
    compare(
        fx(inputs_embeds=mc_embeds, attention_mask=mc["attention_mask"]),
        run_pt(pt, {"inputs_embeds": mc_embeds, "attention_mask": mc["attention_mask"]}),
        "MC[inputs_embeds]",
    )


def test_head_mask_and_return_tuple(pairs):
    pt, _, fx = pairs["Model"]
    inputs = padded_inputs("Model", seed=4)
    head_mask = np.ones((TINY["num_hidden_layers"], TINY["num_attention_heads"]), np.float32)
    head_mask[0, 1] = head_mask[1, 3] = 0.0
    kw = dict(output_attentions=True)
    mine = fx(**inputs, head_mask=head_mask, **kw)
    compare(mine, run_pt(pt, inputs, head_mask=torch.as_tensor(head_mask), **kw), "Model[head_mask]")
    with op_by_op(fx):  # the op-by-op twin of ``mine`` (a compiled call may round differently)
        mine = fx(**inputs, head_mask=head_mask, **kw)
        as_tuple = fx(**inputs, head_mask=head_mask, return_dict=False, **kw)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3  # last_hidden_state, pooler_output, attentions
    assert_close(as_tuple[0], mine.last_hidden_state, 0.0, "tuple output")


def test_untied_lm_head_matches_transformers(tmp_path_factory):
    pt, path = make_pt("ForMaskedLM", tmp_path_factory, seed=5, tie_word_embeddings=False)
    fx = nzf.FlaxMPNetForMaskedLM.from_pretrained(path, strict=True)
    assert "decoder" in fx.params["lm_head"]
    inputs = padded_inputs("ForMaskedLM", seed=5)
    compare(fx(**inputs), run_pt(pt, inputs), "MaskedLM[untied]")


# --- relative attention buckets -----------------------------------------------------------------------


def _bucket_reference(rel: int, num_buckets: int, max_distance: int = 128) -> int:
    """The T5 bidirectional bucket of one distance, in plain Python (float64)."""
    half = num_buckets // 2
    ret = half if -rel < 0 else 0
    n = abs(rel)
    exact = half // 2
    if n < exact:
        return ret + n
    return ret + min(exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact)), half - 1)


def test_relative_buckets_equal_transformers_at_32_and_a_formula_otherwise():
    rel = np.arange(300)[None, :] - np.arange(300)[:, None]
    theirs = MPNetEncoder.relative_position_bucket(torch.as_tensor(rel), num_buckets=32).numpy()
    np.testing.assert_array_equal(relative_position_bucket(rel, 32), theirs)
    for nb in (16, 64):
        distances = np.arange(-300, 301)
        want = np.array([_bucket_reference(int(d), nb) for d in distances])
        got = relative_position_bucket(distances, nb)
        np.testing.assert_array_equal(got, want)
        assert got.min() == 0 and got.max() == nb - 1


def test_bias_is_shared_and_uses_the_configured_bucket_count(tmp_path_factory):
    """16 buckets: transformers PyTorch (hard-coded 32) indexes past its 16-row table; we use 16.

    The reference is transformers with ``compute_position_bias(num_buckets=16)``, i.e. its own code
    with the bucket count taken from the config (what its TF port does).
    """
    pt, path = make_pt("Model", tmp_path_factory, seed=6, relative_attention_num_buckets=16)
    inputs = padded_inputs("Model", seed=6)
    with pytest.raises(IndexError):
        run_pt(pt, inputs)
    enc = pt.encoder
    enc.compute_position_bias = partial(type(enc).compute_position_bias, enc, num_buckets=16)
    fx = nzf.FlaxMPNetModel.from_pretrained(path, strict=True)
    assert fx.params["encoder"]["relative_attention_bias"]["embedding"].shape == (16, TINY["num_attention_heads"])
    kw = dict(output_hidden_states=True, output_attentions=True)
    compare(fx(**inputs, **kw), run_pt(pt, inputs, **kw), "Model[16 buckets]")
    # one table for all layers: no per-layer bias params
    bias_keys = [k for k in flatten_dict(fx.params) if "relative_attention_bias" in k]
    assert bias_keys == [("encoder", "relative_attention_bias", "embedding")]


# --- losses ----------------------------------------------------------------------------------------


def _pt_loss(pt, inputs, **labels):
    pt.config.problem_type = None  # transformers caches the inferred problem type on the config
    return run_pt(pt, inputs, **{k: torch.as_tensor(v) for k, v in labels.items()}).loss


def test_losses_match_transformers(pairs, tmp_path_factory):
    rng = np.random.default_rng(0)
    x = padded_inputs("Model", seed=7)
    B, T = x["input_ids"].shape
    checks = {}

    pt, _, fx = pairs["ForMaskedLM"]
    labels = np.where(rng.random((B, T)) < 0.5, rng.integers(0, 99, (B, T)), -100)
    labels[0, 0] = 5
    checks["masked_lm"] = (L.masked_lm_loss(fx(**x).logits, labels), _pt_loss(pt, x, labels=labels))

    pt, _, fx = pairs["ForSequenceClassification"]
    logits = fx(**x).logits
    single = rng.integers(0, 3, (B,))
    checks["seqcls_single"] = (L.sequence_classification_loss(logits, single), _pt_loss(pt, x, labels=single))
    multi = rng.integers(0, 2, (B, 3)).astype(np.float32)
    checks["seqcls_multi"] = (L.sequence_classification_loss(logits, multi), _pt_loss(pt, x, labels=multi))
    pt1, path1 = make_pt("ForSequenceClassification", tmp_path_factory, seed=8, num_labels=1)
    fx1 = nzf.FlaxMPNetForSequenceClassification.from_pretrained(path1)
    reg = rng.normal(size=(B,)).astype(np.float32)
    checks["seqcls_regression"] = (L.sequence_classification_loss(fx1(**x).logits, reg), _pt_loss(pt1, x, labels=reg))

    pt, _, fx = pairs["ForTokenClassification"]
    labels = np.where(x["attention_mask"] == 1, rng.integers(0, 3, (B, T)), -100)
    checks["token_cls"] = (L.token_classification_loss(fx(**x).logits, labels), _pt_loss(pt, x, labels=labels))

    pt, _, fx = pairs["ForMultipleChoice"]
    xm = padded_inputs("ForMultipleChoice", seed=7)
    labels = rng.integers(0, 3, (B,))
    checks["multiple_choice"] = (L.multiple_choice_loss(fx(**xm).logits, labels), _pt_loss(pt, xm, labels=labels))

    pt, _, fx = pairs["ForQuestionAnswering"]
    out = fx(**x)
    start, end = np.array([1, 100]), np.array([3, -4])  # 100 and -4 clamp to the ignored index / 0
    checks["qa"] = (
        L.question_answering_loss(out.start_logits, out.end_logits, start, end),
        _pt_loss(pt, x, start_positions=start, end_positions=end),
    )
    for name, (mine, theirs) in checks.items():
        MEASURED[f"loss.{name}"] = assert_close(mine, theirs, TOLERANCES["loss"], f"loss {name}")


# --- sentence embeddings -------------------------------------------------------------------------------


def _numpy_mean_pool(hidden: np.ndarray, mask: np.ndarray, normalize: bool) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize(), in numpy float64."""
    m = mask[..., None].astype(np.float64)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


def test_mean_pool_and_encode_equal_a_numpy_reference(pairs):
    pt, _, fx = pairs["Model"]
    for side in ("right", "left"):
        x = padded_inputs("Model", side, seed=9, batch=3)
        hidden = run_pt(pt, x).last_hidden_state.numpy().astype(np.float64)
        for normalize in (True, False):
            want = _numpy_mean_pool(hidden, x["attention_mask"], normalize)
            got = fx.encode(x["input_ids"], x["attention_mask"], normalize=normalize)
            assert type(got).__name__ == "SentenceEmbeddingOutput" and got.embeddings.shape == (3, TINY["hidden_size"])
            MEASURED[f"encode[{side},{normalize}]"] = assert_close(got.embeddings, want, HID, f"encode {side}")
            assert_close(got.last_hidden_state, hidden, HID, "encode last_hidden_state")
            pooled = nzf.mean_pool(jnp.asarray(hidden, jnp.float32), x["attention_mask"], normalize=normalize)
            assert_close(pooled, want, 1e-6, "mean_pool")
    unit = fx.encode(x["input_ids"]).embeddings  # default: mask of ones, normalised
    assert_close(np.linalg.norm(np.asarray(unit), axis=-1), np.ones(3), 1e-5, "unit norm")
    hidden = run_pt(pt, {"input_ids": x["input_ids"]}).last_hidden_state.numpy()
    assert_close(unit, _numpy_mean_pool(hidden, np.ones_like(x["input_ids"]), True), HID, "encode default mask")
    # any MPNet class encodes with its base model (here a head checkpoint without pooler)
    pt_seq, _, fx_seq = pairs["ForSequenceClassification"]
    x = padded_inputs("Model", "left", seed=9)
    hidden = run_pt(pt_seq.mpnet, x).last_hidden_state.numpy()
    got = fx_seq.encode(x["input_ids"], x["attention_mask"])
    MEASURED["encode[ForSequenceClassification]"] = assert_close(
        got.embeddings, _numpy_mean_pool(hidden, x["attention_mask"], True), HID, "encode from a head class"
    )
    assert_close(
        nzf.mean_pool(jnp.asarray(hidden)),
        _numpy_mean_pool(hidden, np.ones(x["input_ids"].shape), True),
        1e-6,
        "mean_pool default mask",
    )
    with pytest.raises(InputError, match="outside the vocabulary"):
        fx.encode(np.array([[5, 99]]))
    # a fully masked row pools to zeros (count clamped), not NaN
    zeros = nzf.mean_pool(jnp.ones((1, 3, 4)), jnp.zeros((1, 3)))
    assert_close(zeros, np.zeros((1, 4)), 0.0, "all masked")


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["Model", "ForMaskedLM", "ForMultipleChoice"])
def test_save_pretrained_loads_in_transformers(pairs, head, tmp_path):
    pt, _, fx = pairs[head]
    # perturb the params so the round trip cannot pass by re-reading the original file (random noise: a
    # constant shift would make the padding rows' sum a constant vector, which LayerNorm cannot normalise stably)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda a: a + 0.01 * rng.standard_normal(a.shape).astype(np.float32), fx.params)
    fx.save_pretrained(tmp_path, params=params)
    back, info = pt_class(head).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = padded_inputs(head, seed=10)
    compare(fx(**inputs, params=params), run_pt(back.eval(), inputs), f"{head}[saved->transformers]")


def test_base_and_head_prefix_loading(pairs, caplog):
    pt_base, base_dir, _ = pairs["Model"]
    pt_seq, seq_dir, _ = pairs["ForSequenceClassification"]
    inputs = padded_inputs("Model", seed=11)
    # base checkpoint -> head class: encoder loaded, classifier reported missing; the pooler unexpected
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        head, info = nzf.FlaxMPNetForSequenceClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(p.name for p in head.spec if p.name.startswith("classifier."))
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "classifier.dense.weight" in caplog.text
    hidden = head(**inputs, output_hidden_states=True).hidden_states[-1]
    assert_close(hidden, run_pt(pt_base, inputs).last_hidden_state, HID, "base->head")
    # head checkpoint -> base class: classifier unexpected, pooler missing (and initialised)
    base, info = nzf.FlaxMPNetModel.from_pretrained(seq_dir, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == sorted(
        ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"]
    )
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert_close(base(**inputs).last_hidden_state, run_pt(pt_seq.mpnet, inputs).last_hidden_state, HID, "head->base")
    with pytest.raises(CheckpointError, match="classifier"):
        nzf.FlaxMPNetModel.from_pretrained(seq_dir, strict=True)


def test_params_tree_equals_spec_exactly():
    for cfg in (
        MPNetConfig(**TINY),
        MPNetConfig(**{**TINY, "relative_attention_num_buckets": 16}, tie_word_embeddings=False),
    ):
        for head in HEADS:
            fx = flax_class(head)(cfg.copy(num_labels=2) if head == "ForQuestionAnswering" else cfg)
            want = {FLAX_LAYOUT.key(p): FLAX_LAYOUT.shape(p) for p in fx.spec}
            assert any(k.endswith("encoder/relative_attention_bias/embedding") for k in want)
            has_pooler = any(k.startswith(("pooler/", "mpnet/pooler/")) for k in want)
            assert has_pooler == (head in ("Model", "ForMultipleChoice"))
            ids = jnp.ones((1, 2, 3) if head == "ForMultipleChoice" else (1, 3), jnp.int32)
            tree = jax.eval_shape(lambda i, m=fx.module: m.init(jax.random.PRNGKey(0), i), ids)
            got = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(tree["params"]).items()}
            assert got == want, f"{head}: {set(got) ^ set(want)}"
            held = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(fx.params).items()}
            assert held == want
            assert set(tree) == {"params"}


def test_signatures():
    ours = list(inspect.signature(nzf.FlaxMPNetPreTrainedModel.__call__).parameters)
    assert ours == [
        "self",
        "input_ids",
        "attention_mask",
        "position_ids",
        "head_mask",
        "params",
        "dropout_rng",
        "train",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "inputs_embeds",
    ]
    for head in HEADS:
        module = getattr(nzf, f"FlaxMPNet{'' if head == 'Model' else head}Module")
        assert list(inspect.signature(module.__call__).parameters) == [
            "self",
            "input_ids",
            "attention_mask",
            "position_ids",
            "head_mask",
            "deterministic",
            "output_attentions",
            "output_hidden_states",
            "return_dict",
            "inputs_embeds",
        ] + (["positions_to_keep"] if head == "Model" else []), head


# --- training --------------------------------------------------------------------------------------


def test_padding_rows_get_no_gradient():
    """Rows 1 of the word and position tables get no gradient through lookups (torch's padding_idx)."""
    x = padded_inputs("ForMaskedLM", seed=12)
    assert (x["input_ids"] == PAD).any()
    labels = np.where(x["attention_mask"] == 1, x["input_ids"], -100)
    # untied: the word table is reached only through lookups (tied, row 1 would get the decoder's gradient)
    model = nzf.FlaxMPNetForMaskedLM(MPNetConfig(**TINY, tie_word_embeddings=False), seed=1)

    def loss(p):
        return L.masked_lm_loss(model.module.apply({"params": p}, x["input_ids"], x["attention_mask"]).logits, labels)

    emb = jax.jit(jax.grad(loss))(model.params)["mpnet"]["embeddings"]
    word, pos = emb["word_embeddings"]["embedding"], emb["position_embeddings"]["embedding"]
    assert float(jnp.abs(word[PAD]).max()) == 0.0 and float(jnp.abs(pos[PAD]).max()) == 0.0
    real = int(x["input_ids"][0, 0])
    assert float(jnp.abs(word[real]).max()) > 0.0 and float(jnp.abs(pos[2]).max()) > 0.0


def test_jitted_optax_train_step_lowers_the_loss():
    cfg = MPNetConfig(**TINY)
    model = nzf.FlaxMPNetForSequenceClassification(cfg, seed=0)
    x = padded_inputs("ForSequenceClassification", seed=13, batch=4)
    labels = np.array([0, 1, 2, 1])
    tx = optax.adam(2e-2)

    @jax.jit
    def step(params, opt_state, rng):
        def loss_fn(p):
            out = model.module.apply(
                {"params": p}, x["input_ids"], x["attention_mask"], deterministic=False, rngs={"dropout": rng}
            )  # dropout on: the step trains as users would
            return L.sequence_classification_loss(out.logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = model.params, tx.init(model.params)
    history = []
    for i in range(12):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i, impl="rbg"))
        history.append(float(loss))
    assert np.mean(history[-3:]) < 0.5 * history[0], history
    # the wrapper (eval mode) agrees that the trained params fit the labels better
    before = L.sequence_classification_loss(model(x["input_ids"], x["attention_mask"]).logits, labels)
    after = L.sequence_classification_loss(model(x["input_ids"], x["attention_mask"], params=params).logits, labels)
    assert float(after) < float(before)


# --- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(pairs):
    _, _, fx = pairs["ForSequenceClassification"]
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    limit = TINY["max_position_embeddings"] - 2
    cases = {
        "outside the vocabulary": dict(input_ids=np.array([[5, 99, 7]])),
        "outside the vocabulary ": dict(input_ids=np.array([[5, -1, 7]])),
        r"exceeds the model's max_position_embeddings - 2 \(38\)": dict(input_ids=np.full((1, limit + 1), 5)),
        r"exceeds the model's max_position_embeddings - 2 \(38\) ": dict(
            inputs_embeds=np.zeros((1, limit + 1, 32), np.float32)
        ),
        "attention_mask has shape": dict(input_ids=ids, attention_mask=np.ones((2, 4))),
        "position_ids has shape": dict(input_ids=ids, position_ids=np.zeros((2, 4), np.int64)),
        "outside the positions": dict(input_ids=ids, position_ids=np.full((2, 3), 40)),
        "not both": dict(input_ids=ids, inputs_embeds=np.zeros((2, 3, 32), np.float32)),
        "give input_ids or inputs_embeds": dict(),
        "inputs_embeds last dimension": dict(inputs_embeds=np.zeros((2, 3, 16), np.float32)),
    }
    for msg, kwargs in cases.items():
        with pytest.raises(InputError, match=msg.strip()):
            fx(**kwargs)
    fx(input_ids=np.full((1, limit), 5))  # the longest allowed
    with pytest.raises(InputError, match="head_mask"):
        fx(ids, head_mask=np.ones((3, 4)))
    with pytest.raises(TypeError):
        fx(ids, token_type_ids=np.zeros_like(ids))  # MPNet has no token types
    mc = pairs["ForMultipleChoice"][2]
    with pytest.raises(InputError, match="rank 3"):
        mc(ids)
    # the plain module checks too (eager apply)
    with pytest.raises(InputError, match="outside the vocabulary"):
        fx.module.apply({"params": fx.params}, np.array([[5, 99, 7]]))
    with pytest.raises(InputError, match="max_position_embeddings - 2"):
        fx.module.apply({"params": fx.params}, np.full((1, limit + 1), 5))
