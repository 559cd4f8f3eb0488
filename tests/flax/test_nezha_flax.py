"""Flax Nezha against transformers 4.57.6 PyTorch: outputs, losses, relative positions, decoding, checkpoints.

Every comparison loads our Flax model from a directory written by transformers' PyTorch
``save_pretrained``, so it checks the checkpoint path and the numerics at once.  The tiny config has
``max_relative_position=3`` so that distance clipping is exercised by 7-token inputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from transformers.models.deprecated.nezha import modeling_nezha as hf_nezha

import nezha_zoo.flax as nzf
from nezha_zoo import NezhaConfig
from nezha_zoo.families.nezha import relative_position_table
from nezha_zoo.flax import losses as L
from nezha_zoo.flax.nezha import relative_position_encoding
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.testing import TOLERANCES, assert_close, op_by_op, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.flax, pytest.mark.hf]

pin_precision("flax")
pin_precision("pt")

HEADS = (
    "Model",
    "ForPreTraining",
    "ForMaskedLM",
    "ForNextSentencePrediction",
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
    max_position_embeddings=16,
    max_relative_position=3,  # < sequence lengths used below: distances are clipped
    type_vocab_size=2,
    num_labels=3,
)
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


def pt_class(head: str):
    return getattr(transformers, f"Nezha{'Model' if head == 'Model' else head}")


def flax_class(head: str):
    return getattr(nzf, f"FlaxNezha{'Model' if head == 'Model' else head}")


def make_pt(head: str, tmp_path_factory, seed: int = 0, **overrides):
    """A seeded transformers PyTorch model saved with its own save_pretrained; returns (model, dir)."""
    torch.manual_seed(seed)
    if head == "ForQuestionAnswering":
        overrides.setdefault("num_labels", 2)  # start/end
    cfg = transformers.NezhaConfig(**{**TINY, **overrides})
    model = pt_class(head)(cfg).eval()
    path = tmp_path_factory.mktemp(f"pt_{head}")
    model.save_pretrained(path)
    return model, str(path)


def inputs_for(head: str, seed: int = 0, batch: int = 2, seq_len: int = 7):
    num_choices = 3 if head == "ForMultipleChoice" else None
    return tiny_inputs(batch=batch, seq_len=seq_len, vocab_size=TINY["vocab_size"], seed=seed, num_choices=num_choices)


def run_pt(model, inputs, **kwargs):
    # transformers' NezhaForMultipleChoice prints shapes from forward: keep the test output clean.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        return model(**{k: torch.as_tensor(v) for k, v in inputs.items()}, **kwargs)


def compare(flax_out, pt_out, what: str, tol_hidden: float = HID, tol_logits: float = LOG) -> None:
    """Every field of our output equals transformers' (same field set, except PT-only loss/past)."""
    pt_fields = {k for k, v in pt_out.items() if v is not None and k not in ("loss", "past_key_values")}
    ours = {k for k in flax_out.keys() if k != "past_key_values"}
    assert ours == pt_fields, f"{what}: fields {sorted(ours)} vs transformers {sorted(pt_fields)}"
    for key in ours:
        mine, theirs = flax_out[key], pt_out[key]
        if isinstance(mine, tuple):
            assert len(mine) == len(theirs), f"{what}.{key}: {len(mine)} vs {len(theirs)} entries"
            for i, (a, b) in enumerate(zip(mine, theirs)):
                d = assert_close(a, b, tol_hidden, f"{what}.{key}[{i}]")
                MEASURED[f"{what}.{key}"] = max(MEASURED.get(f"{what}.{key}", 0.0), d)
        else:
            tol = tol_hidden if key == "last_hidden_state" else tol_logits
            MEASURED[f"{what}.{key}"] = assert_close(mine, theirs, tol, f"{what}.{key}")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """head -> (transformers PT model, its checkpoint dir, our Flax model loaded from that dir)."""
    out = {}
    for head in HEADS:
        pt, path = make_pt(head, tmp_path_factory)
        out[head] = (pt, path, flax_class(head).from_pretrained(path))
    return out


# --- the relative position encoding -----------------------------------------------------------------


def test_relative_table_matches_transformers_buffer_and_formula():
    K, depth, length = 3, 8, 9
    table = relative_position_table(K, depth)
    assert table.shape == (2 * K + 1, depth)
    p = np.arange(2 * K + 1)[:, None].astype(np.float64)
    div = np.exp(np.arange(0, depth, 2) * (-np.log(10000.0) / depth))
    want = np.zeros((2 * K + 1, depth))
    want[:, 0::2], want[:, 1::2] = np.sin(p * div), np.cos(p * div)  # interleaved, shifted index 0..2K
    assert_close(table, want, 1e-6, "table vs formula")
    theirs = hf_nezha.NezhaRelativePositionsEncoding(length, depth, K).positions_encoding.numpy()
    grid = relative_position_encoding(table, length, length)  # (L, L, depth)
    # float32 sin/exp of numpy and torch may differ in the last bit (6e-8); the gather itself is exact
    MEASURED["relative grid vs transformers"] = assert_close(grid, theirs, 1e-7, "grid vs transformers' buffer")
    assert_close(
        grid, np.asarray(table)[np.clip(np.arange(length)[None] - np.arange(length)[:, None], -K, K) + K], 0.0, "gather"
    )
    assert not np.allclose(theirs[0, 1], theirs[0, 2])  # near distances differ ...
    assert_close(theirs[0, 5], theirs[0, 8], 0.0, "clipped")  # ... and far ones are clipped to K
    # a query offset (cache fill) shifts the rows; keys keep their absolute positions
    shifted = relative_position_encoding(table, 2, length, query_offset=4)
    assert_close(shifted, grid[4:6], 0.0, "offset rows")


# --- numerics against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers_with_padding_and_token_types(pairs, head):
    pt, _, fx = pairs[head]
    inputs = inputs_for(head)
    assert (inputs["attention_mask"] == 0).any() and (inputs["token_type_ids"] == 1).any()
    kw = dict(output_hidden_states=True, output_attentions=True)
    compare(fx(**inputs, **kw), run_pt(pt, inputs, **kw), head)


@pytest.mark.parametrize("head", HEADS)
def test_optional_inputs_left_out_match_transformers(pairs, head):
    pt, _, fx = pairs[head]
    ids = {"input_ids": inputs_for(head, seed=1)["input_ids"]}
    compare(fx(**ids), run_pt(pt, ids), f"{head}[ids only]")
    full = {**ids, "token_type_ids": np.zeros_like(ids["input_ids"]), "attention_mask": np.ones_like(ids["input_ids"])}
    with op_by_op(fx):  # two signatures: compare them on one path (compiled may round differently)
        assert_close(fx(**ids)[0], fx(**full)[0], 0.0, f"{head}: omitted inputs are zeros / ones")


def test_head_mask_and_return_tuple(pairs):
    pt, _, fx = pairs["Model"]
    inputs = inputs_for("Model", seed=2)
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


def test_inputs_embeds_equals_ids(pairs):
    pt, _, fx = pairs["ForSequenceClassification"]
    inputs = inputs_for("ForSequenceClassification", seed=5)
    table = fx.params["nezha"]["embeddings"]["word_embeddings"]["embedding"]
    embeds = np.array(jnp.take(table, inputs["input_ids"], axis=0))  # a writable copy for torch
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    assert_close(fx(inputs_embeds=embeds, **rest).logits, fx(**inputs).logits, 1e-6, "inputs_embeds")
    compare(fx(inputs_embeds=embeds, **rest), run_pt(pt, {"inputs_embeds": embeds, **rest}), "SeqCls[embeds]")


def test_untied_decoder_matches_transformers(tmp_path_factory):
    pt, path = make_pt("ForMaskedLM", tmp_path_factory, seed=3, tie_word_embeddings=False)
    fx = nzf.FlaxNezhaForMaskedLM.from_pretrained(path, strict=True)
    assert "decoder" in fx.params["cls"]["predictions"]
    inputs = inputs_for("ForMaskedLM", seed=3)
    compare(fx(**inputs), run_pt(pt, inputs), "MaskedLM[untied]")


# --- sequences longer than max_position_embeddings ---------------------------------------------------


def test_longer_than_max_position_embeddings(pairs):
    """transformers' table stops at max_position_embeddings (16); ours is computed for any length."""
    _, path, fx = pairs["ForTokenClassification"]
    T = 40
    inputs = inputs_for("ForTokenClassification", seed=12, seq_len=T)
    kw = dict(output_hidden_states=True, output_attentions=True)
    mine = fx(**inputs, **kw)
    # the same checkpoint in transformers with its table sized to cover the input
    wide = transformers.NezhaForTokenClassification.from_pretrained(path, max_position_embeddings=T).eval()
    compare(mine, run_pt(wide, inputs, **kw), "TokCls[L=40]")
    # jit gives the same numbers (lengths are static, distances computed per call)
    jitted = jax.jit(lambda p, i, m, t: fx(i, m, t, params=p).logits)(
        fx.params, inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    )
    assert_close(jitted, mine.logits, 1e-5, "jit L=40")
    # the plain module accepts long inputs too
    out = fx.module.apply({"params": fx.params}, inputs["input_ids"])
    assert out.logits.shape == (2, T, TINY["num_labels"])


# --- losses ----------------------------------------------------------------------------------------


def _pt_loss(pt, inputs, **labels):
    pt.config.problem_type = None  # transformers caches the inferred problem type on the config
    return run_pt(pt, inputs, **{k: torch.as_tensor(v) for k, v in labels.items()}).loss


def test_losses_match_transformers(pairs, tmp_path_factory):
    rng = np.random.default_rng(0)
    B, T = 2, 7
    checks = {}
    x = inputs_for("ForMaskedLM")
    mlm_labels = np.where(rng.random((B, T)) < 0.5, rng.integers(0, 99, (B, T)), -100)
    mlm_labels[0, 0] = 5
    nsp_labels = np.array([0, 1])

    pt, _, fx = pairs["ForMaskedLM"]
    checks["masked_lm"] = (L.masked_lm_loss(fx(**x).logits, mlm_labels), _pt_loss(pt, x, labels=mlm_labels))

    pt, _, fx = pairs["ForNextSentencePrediction"]
    checks["next_sentence"] = (
        L.next_sentence_prediction_loss(fx(**x).logits, nsp_labels),
        _pt_loss(pt, x, labels=nsp_labels),
    )

    pt, _, fx = pairs["ForPreTraining"]
    out = fx(**x)
    checks["pretraining"] = (
        L.nezha_pretraining_loss(out.prediction_logits, out.seq_relationship_logits, mlm_labels, nsp_labels),
        _pt_loss(pt, x, labels=mlm_labels, next_sentence_label=nsp_labels),
    )
    # the sum of its parts
    parts = L.masked_lm_loss(out.prediction_logits, mlm_labels) + L.next_sentence_prediction_loss(
        out.seq_relationship_logits, nsp_labels
    )
    assert_close(checks["pretraining"][0], parts, 1e-6, "pretraining = mlm + nsp")

    pt, _, fx = pairs["ForSequenceClassification"]
    logits = fx(**x).logits
    single = rng.integers(0, 3, (B,))
    checks["seqcls_single"] = (L.sequence_classification_loss(logits, single), _pt_loss(pt, x, labels=single))
    multi = rng.integers(0, 2, (B, 3)).astype(np.float32)
    checks["seqcls_multi"] = (L.sequence_classification_loss(logits, multi), _pt_loss(pt, x, labels=multi))

    pt1, path1 = make_pt("ForSequenceClassification", tmp_path_factory, seed=6, num_labels=1)
    fx1 = nzf.FlaxNezhaForSequenceClassification.from_pretrained(path1)
    reg = rng.normal(size=(B,)).astype(np.float32)
    checks["seqcls_regression"] = (L.sequence_classification_loss(fx1(**x).logits, reg), _pt_loss(pt1, x, labels=reg))

    pt, _, fx = pairs["ForTokenClassification"]
    labels = np.where(x["attention_mask"] == 1, rng.integers(0, 3, (B, T)), -100)
    checks["token_cls"] = (L.token_classification_loss(fx(**x).logits, labels), _pt_loss(pt, x, labels=labels))

    pt, _, fx = pairs["ForMultipleChoice"]
    xm = inputs_for("ForMultipleChoice")
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


# --- decoder: cross-attention and cached decoding ---------------------------------------------------


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    pt, path = make_pt("Model", tmp_path_factory, seed=7, is_decoder=True, add_cross_attention=True)
    fx = nzf.FlaxNezhaModel.from_pretrained(path)
    rng = np.random.default_rng(7)
    x = inputs_for("Model", seed=7, seq_len=6)
    # transformers' relative terms in cross-attention only run when encoder and decoder lengths agree
    enc = rng.normal(size=(2, 6, TINY["hidden_size"])).astype(np.float32)
    enc_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return pt, path, fx, x, enc, enc_mask


def test_decoder_with_cross_attention_matches_transformers(decoder):
    pt, _, fx, x, enc, enc_mask = decoder
    kw = dict(output_hidden_states=True, output_attentions=True)
    mine = fx(**x, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, **kw)
    theirs = run_pt(
        pt,
        x,
        encoder_hidden_states=torch.as_tensor(enc),
        encoder_attention_mask=torch.as_tensor(enc_mask),
        use_cache=False,
        **kw,
    )
    assert mine.cross_attentions is not None and len(mine.cross_attentions) == TINY["num_hidden_layers"]
    compare(mine, theirs, "Model[decoder+cross]")
    # Causality: the first tokens' states do not depend on later tokens.
    changed = {**x, "input_ids": x["input_ids"].copy()}
    changed["input_ids"][:, -1] = 3
    other = fx(**changed, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    assert_close(other.last_hidden_state[:, :-1], mine.last_hidden_state[:, :-1], 1e-6, "causal")
    # The relative terms reach the cross-attention: without them, reversing the encoder states (and
    # their mask) would not change the output, as attention alone is order-blind over its keys.
    flipped = fx(**x, encoder_hidden_states=enc[:, ::-1].copy(), encoder_attention_mask=enc_mask[:, ::-1].copy())
    assert float(jnp.abs(flipped.last_hidden_state - mine.last_hidden_state).max()) > 1e-3


def _decode(fx, step, cache, ids, types, chunks):
    pieces = []
    for lo, hi in chunks:
        out = step(fx.params, cache, ids[:, lo:hi], types[:, lo:hi])
        cache = out.past_key_values
        pieces.append(out.last_hidden_state)
    return jnp.concatenate(pieces, axis=1), cache


def test_cached_decoding_equals_full_forward_eager_and_jit(decoder):
    pt, _, fx, x, enc, enc_mask = decoder
    ids, mask, types = x["input_ids"], x["attention_mask"], x["token_type_ids"]
    B, T = ids.shape
    full = fx(ids, mask, types, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).last_hidden_state
    extra = 3  # a cache longer than the sequence: keys beyond the fill are masked, distances still right
    cache_mask = np.concatenate([mask, np.zeros((B, extra), mask.dtype)], axis=1)

    def step(params, cache, chunk, chunk_types):
        return fx(
            chunk,
            cache_mask,
            chunk_types,
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            params=params,
            past_key_values=cache,
        )

    # eager: one token at a time (one chunk shape, so eager ops compile once); jit: a 3-token prompt first
    singles = [(t, t + 1) for t in range(T)]
    for label, fn, chunks in (("eager", step, singles), ("jit", jax.jit(step), [(0, 3)] + singles[3:])):
        cached, _ = _decode(fx, fn, fx.init_cache(B, T + extra), ids, types, chunks)
        MEASURED[f"decoder.cached_vs_full[{label}]"] = assert_close(cached, full, HID, f"cached ({label})")
    # and against transformers' own full forward
    theirs = run_pt(
        pt,
        x,
        encoder_hidden_states=torch.as_tensor(enc),
        encoder_attention_mask=torch.as_tensor(enc_mask),
        use_cache=False,
    )
    MEASURED["decoder.cached_vs_pt"] = assert_close(cached, theirs.last_hidden_state, HID, "cached vs transformers")


def test_decoder_any_encoder_length_and_cache_beyond_max_positions(tmp_path_factory):
    """Encoder length != decoder length (transformers cannot) and decoding past max_position_embeddings."""
    _, path = make_pt("Model", tmp_path_factory, seed=8, is_decoder=True, add_cross_attention=True)
    fx = nzf.FlaxNezhaModel.from_pretrained(path)
    rng = np.random.default_rng(8)
    T = 18  # > max_position_embeddings = 16
    ids = rng.integers(2, 99, (1, T))
    types = np.zeros_like(ids)
    enc = rng.normal(size=(1, 5, TINY["hidden_size"])).astype(np.float32)
    full = fx(ids, encoder_hidden_states=enc).last_hidden_state

    def step(params, cache, chunk, chunk_types):
        return fx(chunk, None, chunk_types, encoder_hidden_states=enc, params=params, past_key_values=cache)

    chunks = [(0, 9), (9, T)]  # equal chunks: one compilation
    cached, _ = _decode(fx, jax.jit(step), fx.init_cache(1, T), ids, types, chunks)
    MEASURED["decoder.cached_vs_full[L=18, Le=5]"] = assert_close(cached, full, HID, "cached, long, Le != L")


def test_cache_validation(decoder):
    _, _, fx, x, enc, _ = decoder
    cache = fx.init_cache(2, 4)
    with pytest.raises(InputError, match="overflow the cache"):
        fx(x["input_ids"][:, :5], np.ones((2, 4)), past_key_values=cache, encoder_hidden_states=enc)
    with pytest.raises(InputError, match="cover the cache"):
        fx(x["input_ids"][:, :2], np.ones((2, 2)), past_key_values=cache, encoder_hidden_states=enc)
    with pytest.raises(ValueError, match="decoder"):
        nzf.FlaxNezhaForMaskedLM(NezhaConfig(**TINY)).init_cache(1, 4)


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForPreTraining", "ForMultipleChoice"])
def test_save_pretrained_loads_in_transformers(pairs, head, tmp_path):
    pt, _, fx = pairs[head]
    # perturb the params so the round trip cannot pass by re-reading the original file
    params = jax.tree_util.tree_map(lambda a: a + 0.01, fx.params)
    fx.save_pretrained(tmp_path, params=params)
    back, info = pt_class(head).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = inputs_for(head, seed=8)
    compare(fx(**inputs, params=params), run_pt(back.eval(), inputs), f"{head}[saved->transformers]")


def test_random_init_saves_and_transformers_loads_everything(tmp_path):
    cfg = NezhaConfig(**TINY, is_decoder=True, add_cross_attention=True)
    fx = nzf.FlaxNezhaModel(cfg, seed=1)
    emb = fx.params["embeddings"]["word_embeddings"]["embedding"]
    assert float(jnp.abs(emb[cfg.pad_token_id]).max()) == 0.0  # padding row zeroed, as transformers
    assert abs(float(jnp.std(emb)) - cfg.initializer_range) < 0.005
    fx.save_pretrained(tmp_path)
    back, info = transformers.NezhaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = inputs_for("Model", seed=15, seq_len=6)  # the decoder tests' shapes: eager ops are compiled already
    enc = np.random.default_rng(15).normal(size=(2, 6, TINY["hidden_size"])).astype(np.float32)
    compare(
        fx(**x, encoder_hidden_states=enc),
        run_pt(back.eval(), x, encoder_hidden_states=torch.as_tensor(enc), use_cache=False),
        "Model[random init->transformers]",
    )


def test_base_and_head_prefix_loading(pairs, caplog):
    pt_base, base_dir, _ = pairs["Model"]
    pt_seq, seq_dir, _ = pairs["ForSequenceClassification"]
    inputs = inputs_for("Model", seed=9)
    # base checkpoint -> head class: encoder loaded, classifier reported missing and initialised
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        head, info = nzf.FlaxNezhaForSequenceClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert "classifier.weight" in caplog.text
    hidden = head(**inputs, output_hidden_states=True).hidden_states[-1]
    assert_close(hidden, run_pt(pt_base, inputs).last_hidden_state, HID, "base->head")
    # head checkpoint -> base class: classifier reported unexpected
    base, info = nzf.FlaxNezhaModel.from_pretrained(seq_dir, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == ["classifier.bias", "classifier.weight"]
    compare(base(**inputs), run_pt(pt_seq.nezha, inputs), "head->base")
    with pytest.raises(CheckpointError, match="classifier"):
        nzf.FlaxNezhaModel.from_pretrained(seq_dir, strict=True)
    # a checkpoint without a pooler (MaskedLM) into a class with one: the pooler is reported missing
    _, mlm_dir, _ = pairs["ForMaskedLM"]
    _, info = nzf.FlaxNezhaForNextSentencePrediction.from_pretrained(mlm_dir, output_loading_info=True)
    assert {"nezha.pooler.dense.weight", "cls.seq_relationship.weight"} <= set(info["missing_keys"])


def test_shape_mismatch_raises_naming_the_tensor(pairs):
    _, path, _ = pairs["ForMaskedLM"]
    with pytest.raises(CheckpointError, match=r"nezha\.embeddings\.word_embeddings\.weight.*\(99, 32\).*\(98, 32\)"):
        nzf.FlaxNezhaForMaskedLM.from_pretrained(path, vocab_size=98)


def test_signatures_follow_transformers_flax_without_position_ids():
    from transformers.models.bert import modeling_flax_bert as hf_bert

    ours = list(inspect.signature(nzf.FlaxNezhaPreTrainedModel.__call__).parameters)
    theirs = [p for p in inspect.signature(hf_bert.FlaxBertPreTrainedModel.__call__).parameters if p != "position_ids"]
    assert ours == theirs + ["inputs_embeds"]
    init = list(inspect.signature(nzf.FlaxNezhaPreTrainedModel.__init__).parameters)
    assert init[:7] == list(inspect.signature(hf_bert.FlaxBertPreTrainedModel.__init__).parameters)[:7]
    base = [p for p in inspect.signature(hf_bert.FlaxBertModule.__call__).parameters if p != "position_ids"]
    module_args = base + ["inputs_embeds", "positions_to_keep"]
    assert list(inspect.signature(nzf.FlaxNezhaModule.__call__).parameters) == module_args
    for head in HEADS[1:]:
        params = list(inspect.signature(getattr(nzf, f"FlaxNezha{head}Module").__call__).parameters)
        assert "position_ids" not in params and params[:5] == [
            "self",
            "input_ids",
            "attention_mask",
            "token_type_ids",
            "head_mask",
        ], head
    with pytest.raises(TypeError):
        nzf.FlaxNezhaModel(NezhaConfig(**TINY))(np.ones((1, 3), np.int32), position_ids=np.zeros((1, 3)))


def test_params_tree_equals_spec_exactly():
    configs = (
        NezhaConfig(**TINY),
        NezhaConfig(**TINY, is_decoder=True, add_cross_attention=True),
        NezhaConfig(**TINY, tie_word_embeddings=False),
    )
    for n, cfg in enumerate(configs):
        for head in HEADS:
            if n == 2 and head not in ("ForPreTraining", "ForMaskedLM"):
                continue  # tie_word_embeddings only changes the LM heads
            # params held by the wrapper: checked for the first config (random init costs time)
            fx = flax_class(head)(cfg.copy(num_labels=2) if head == "ForQuestionAnswering" else cfg, _do_init=n == 0)
            want = {FLAX_LAYOUT.key(p): FLAX_LAYOUT.shape(p) for p in fx.spec}
            shape = (1, 2, 3) if head == "ForMultipleChoice" else (1, 3)
            ids = jnp.ones(shape, jnp.int32)
            kw = {}
            if cfg.add_cross_attention and head == "Model":
                kw = dict(encoder_hidden_states=jnp.zeros((1, 2, cfg.hidden_size)))
            tree = jax.eval_shape(lambda i, fx=fx, kw=kw: fx.module.init(jax.random.PRNGKey(0), i, **kw), ids)
            got = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(tree["params"]).items()}
            assert got == want, f"{head}: {set(got) ^ set(want)}"
            if n == 0:
                held = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(fx.params).items()}
                assert held == want
            shapes = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(fx.params_shape_tree).items()}
            assert shapes == want
            assert set(tree) == {"params"}  # nothing stored for the relative positions


# --- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(pairs):
    _, _, fx = pairs["ForSequenceClassification"]
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    cases = {
        "outside the vocabulary": dict(input_ids=np.array([[5, 99, 7]])),
        "outside the vocabulary ": dict(input_ids=np.array([[5, -1, 7]])),
        "attention_mask has shape": dict(input_ids=ids, attention_mask=np.ones((2, 4))),
        "token_type_ids has shape": dict(input_ids=ids, token_type_ids=np.zeros((1, 3))),
        "outside the token types": dict(input_ids=ids, token_type_ids=np.full((2, 3), 2)),
        "not both": dict(input_ids=ids, inputs_embeds=np.zeros((2, 3, 32), np.float32)),
        "last dimension must be 32": dict(inputs_embeds=np.zeros((2, 3, 16), np.float32)),
        "give input_ids or inputs_embeds": dict(),
    }
    for msg, kwargs in cases.items():
        with pytest.raises(InputError, match=msg.strip()):
            fx(**kwargs)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        fx(ids, encoder_hidden_states=np.zeros((2, 3, 32), np.float32))
    with pytest.raises(InputError, match="head_mask"):
        fx(ids, head_mask=np.ones((3, 4)))
    mc = pairs["ForMultipleChoice"][2]
    with pytest.raises(InputError, match="rank 3"):
        mc(ids)
    # the plain module checks too (eager apply)
    with pytest.raises(InputError, match="outside the vocabulary"):
        fx.module.apply({"params": fx.params}, np.array([[5, 99, 7]]))
    # no length limit: longer than max_position_embeddings is fine
    assert fx(np.ones((1, TINY["max_position_embeddings"] + 9), np.int32)).logits.shape == (1, 3)


# --- jit, training ---------------------------------------------------------------------------------


def test_dropout_rng_and_train_mode(pairs):
    _, _, fx = pairs["ForPreTraining"]
    x = inputs_for("ForPreTraining", seed=16)
    # rbg keys: their dropout masks compile several times faster on CPU than threefry's
    with op_by_op(fx):  # one path for all three calls: the wrapper compiles a signature at its second call
        a, b = (fx(**x, train=True, dropout_rng=jax.random.key(s, impl="rbg")).prediction_logits for s in (1, 2))
        again = fx(**x, train=True, dropout_rng=jax.random.key(1, impl="rbg")).prediction_logits
    assert float(jnp.abs(a - b).max()) > 1e-3  # dropout is live and follows the rng
    assert_close(again, a, 0.0, "same rng, same dropout")


def test_training_example_loss_falls():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "flax_train_nezha.py")
    spec = importlib.util.spec_from_file_location("flax_train_nezha", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(steps=80)
    assert len(history) == 80
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5]), history
