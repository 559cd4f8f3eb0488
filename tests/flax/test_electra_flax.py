"""Flax Electra against transformers 4.57.6 PyTorch: outputs, losses, decoding, checkpoints, training.

Every comparison loads our Flax model from a directory written by transformers' PyTorch
``save_pretrained``, so it checks the checkpoint path and the numerics at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

import nezha_zoo.flax as nzf
from nezha_zoo import ElectraConfig
from nezha_zoo.flax import losses as L
from nezha_zoo.flax.layers import BertLayer, BertSelfAttention
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.spec.blocks import MPNET_NAMES, XLM_ROBERTA_XL_NAMES, BertLayerNames, bert_layer
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
    "ForCausalLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
TINY = dict(
    vocab_size=99,
    embedding_size=16,  # != hidden_size: covers embeddings_project
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
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
    return getattr(transformers, f"Electra{'Model' if head == 'Model' else head}")


def flax_class(head: str):
    return getattr(nzf, f"FlaxElectra{'Model' if head == 'Model' else head}")


def make_pt(head: str, tmp_path_factory, seed: int = 0, **overrides):
    """A seeded transformers PyTorch model saved with its own save_pretrained; returns (model, dir)."""
    torch.manual_seed(seed)
    if head == "ForQuestionAnswering":
        overrides.setdefault("num_labels", 2)  # start/end
    cfg = transformers.ElectraConfig(**{**TINY, **overrides})
    model = pt_class(head)(cfg).eval()
    path = tmp_path_factory.mktemp(f"pt_{head}")
    model.save_pretrained(path)
    return model, str(path)


def inputs_for(head: str, seed: int = 0, batch: int = 2, seq_len: int = 7):
    num_choices = 3 if head == "ForMultipleChoice" else None
    return tiny_inputs(batch=batch, seq_len=seq_len, vocab_size=TINY["vocab_size"], seed=seed, num_choices=num_choices)


def run_pt(model, inputs, **kwargs):
    with torch.no_grad():
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
    # token_type_ids omitted means zeros (PyTorch), not transformers Flax's ones.
    zeros = {**ids, "token_type_ids": np.zeros_like(ids["input_ids"])}
    with op_by_op(fx):  # two signatures: compare them on one path (compiled may round differently)
        assert_close(fx(**ids)[0], fx(**zeros)[0], 0.0, f"{head}: omitted token types are zeros")


def test_head_mask_and_return_tuple(pairs):
    pt, _, fx = pairs["Model"]
    inputs = inputs_for("Model", seed=2)
    head_mask = np.ones((TINY["num_hidden_layers"], TINY["num_attention_heads"]), np.float32)
    head_mask[0, 1] = head_mask[1, 3] = 0.0
    kw = dict(output_attentions=True)
    mine = fx(**inputs, head_mask=head_mask, **kw)
    compare(mine, run_pt(pt, inputs, head_mask=torch.as_tensor(head_mask), **kw), "Model[head_mask]")
    as_tuple = fx(**inputs, head_mask=head_mask, return_dict=False, **kw)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert_close(as_tuple[0], mine.last_hidden_state, 0.0, "tuple output")


def test_generator_head_is_gelu_whatever_hidden_act(tmp_path_factory):
    # transformers' Flax port uses hidden_act in the generator head (0.14 off with relu): not copied.
    for head in ("ForMaskedLM", "ForPreTraining"):
        pt, path = make_pt(head, tmp_path_factory, seed=3, hidden_act="relu")
        inputs = inputs_for(head, seed=3)
        compare(flax_class(head).from_pretrained(path)(**inputs), run_pt(pt, inputs), f"{head}[relu]")


@pytest.mark.parametrize("summary_type", ["mean", "last"])
def test_multiple_choice_summary_types(tmp_path_factory, summary_type):
    pt, path = make_pt("ForMultipleChoice", tmp_path_factory, seed=4, summary_type=summary_type)
    inputs = inputs_for("ForMultipleChoice", seed=4)
    compare(nzf.FlaxElectraForMultipleChoice.from_pretrained(path)(**inputs), run_pt(pt, inputs), f"MC[{summary_type}]")


def test_inputs_embeds_equals_ids(pairs):
    _, _, fx = pairs["ForSequenceClassification"]
    inputs = inputs_for("ForSequenceClassification", seed=5)
    table = fx.params["electra"]["embeddings"]["word_embeddings"]["embedding"]
    embeds = jnp.take(table, inputs["input_ids"], axis=0)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    assert_close(fx(inputs_embeds=embeds, **rest).logits, fx(**inputs).logits, 1e-6, "inputs_embeds")


# --- losses ----------------------------------------------------------------------------------------


def _pt_loss(pt, inputs, **labels):
    pt.config.problem_type = None  # transformers caches the inferred problem type on the config
    return run_pt(pt, inputs, **{k: torch.as_tensor(v) for k, v in labels.items()}).loss


def test_losses_match_transformers(pairs, tmp_path_factory):
    rng = np.random.default_rng(0)
    B, T = 2, 7
    checks = {}

    pt, _, fx = pairs["ForMaskedLM"]
    x = inputs_for("ForMaskedLM")
    labels = np.where(rng.random((B, T)) < 0.5, rng.integers(0, 99, (B, T)), -100)
    labels[0, 0] = 5
    checks["masked_lm"] = (L.masked_lm_loss(fx(**x).logits, labels), _pt_loss(pt, x, labels=labels))

    pt, _, fx = pairs["ForCausalLM"]
    labels = np.where(x["attention_mask"] == 1, x["input_ids"], -100)
    checks["causal_lm"] = (L.causal_lm_loss(fx(**x).logits, labels), _pt_loss(pt, x, labels=labels))

    pt, _, fx = pairs["ForPreTraining"]
    labels = rng.integers(0, 2, (B, T))
    checks["pretraining"] = (
        L.electra_pretraining_loss(fx(**x).logits, labels, x["attention_mask"]),
        _pt_loss(pt, x, labels=labels),
    )
    ids = {"input_ids": x["input_ids"]}
    checks["pretraining_nomask"] = (
        L.electra_pretraining_loss(fx(**ids).logits, labels),
        _pt_loss(pt, ids, labels=labels),
    )

    pt, _, fx = pairs["ForSequenceClassification"]
    logits = fx(**x).logits
    single = rng.integers(0, 3, (B,))
    checks["seqcls_single"] = (L.sequence_classification_loss(logits, single), _pt_loss(pt, x, labels=single))
    multi = rng.integers(0, 2, (B, 3)).astype(np.float32)
    checks["seqcls_multi"] = (L.sequence_classification_loss(logits, multi), _pt_loss(pt, x, labels=multi))

    pt1, path1 = make_pt("ForSequenceClassification", tmp_path_factory, seed=6, num_labels=1)
    fx1 = nzf.FlaxElectraForSequenceClassification.from_pretrained(path1)
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
    pt, path = make_pt("ForCausalLM", tmp_path_factory, seed=7, is_decoder=True, add_cross_attention=True)
    fx = nzf.FlaxElectraForCausalLM.from_pretrained(path)
    rng = np.random.default_rng(7)
    x = inputs_for("ForCausalLM", seed=7, seq_len=6)
    enc = rng.normal(size=(2, 5, TINY["hidden_size"])).astype(np.float32)
    enc_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return pt, fx, x, enc, enc_mask


def test_decoder_with_cross_attention_matches_transformers(decoder):
    pt, fx, x, enc, enc_mask = decoder
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
    assert mine.cross_attentions is not None
    compare(mine, theirs, "CausalLM[decoder+cross]")
    # Causality: the first tokens' logits do not depend on later tokens.
    changed = {**x, "input_ids": x["input_ids"].copy()}
    changed["input_ids"][:, -1] = 3
    other = fx(**changed, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    assert_close(other.logits[:, :-1], mine.logits[:, :-1], 1e-6, "causal")


def test_cached_decoding_equals_full_forward_eager_and_jit(decoder):
    pt, fx, x, enc, enc_mask = decoder
    ids, mask = x["input_ids"], x["attention_mask"]
    types = x["token_type_ids"]
    B, T = ids.shape
    full = fx(ids, mask, types, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).logits

    def step(params, cache, chunk, chunk_types):
        return fx(
            chunk,
            mask,
            chunk_types,
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            params=params,
            past_key_values=cache,
        )

    for label, fn in (("eager", step), ("jit", jax.jit(step))):
        cache = fx.init_cache(B, T)
        pieces = []
        # a 3-token prompt, then one token at a time
        for lo, hi in [(0, 3)] + [(t, t + 1) for t in range(3, T)]:
            out = fn(fx.params, cache, ids[:, lo:hi], types[:, lo:hi])
            cache = out.past_key_values
            pieces.append(out.logits)
        cached = jnp.concatenate(pieces, axis=1)
        MEASURED[f"decoder.cached_vs_full[{label}]"] = assert_close(cached, full, LOG, f"cached ({label})")
    # and against transformers' own full forward
    theirs = run_pt(
        pt,
        x,
        encoder_hidden_states=torch.as_tensor(enc),
        encoder_attention_mask=torch.as_tensor(enc_mask),
        use_cache=False,
    )
    MEASURED["decoder.cached_vs_pt"] = assert_close(cached, theirs.logits, LOG, "cached vs transformers")


def test_cache_validation(decoder):
    _, fx, x, enc, _ = decoder
    cache = fx.init_cache(2, 4)
    with pytest.raises(InputError, match="overflow the cache"):
        fx(x["input_ids"][:, :5], np.ones((2, 4)), past_key_values=cache, encoder_hidden_states=enc)
    with pytest.raises(InputError, match="cover the cache"):
        fx(x["input_ids"][:, :2], np.ones((2, 2)), past_key_values=cache, encoder_hidden_states=enc)
    with pytest.raises(ValueError, match="decoder"):
        nzf.FlaxElectraForMaskedLM(ElectraConfig(**TINY)).init_cache(1, 4)


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForMultipleChoice"])
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
    cfg = ElectraConfig(**TINY, is_decoder=True, add_cross_attention=True)
    fx = nzf.FlaxElectraForCausalLM(cfg, seed=1)
    emb = fx.params["electra"]["embeddings"]["word_embeddings"]["embedding"]
    assert float(jnp.abs(emb[cfg.pad_token_id]).max()) == 0.0  # padding row zeroed, as transformers
    assert abs(float(jnp.std(emb)) - cfg.initializer_range) < 0.005
    fx.save_pretrained(tmp_path)
    _, info = transformers.ElectraForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_base_and_head_prefix_loading(pairs, caplog):
    pt_base, base_dir, _ = pairs["Model"]
    pt_seq, seq_dir, _ = pairs["ForSequenceClassification"]
    inputs = inputs_for("Model", seed=9)
    # base checkpoint -> head class: encoder loaded, classifier reported missing and initialised
    with caplog.at_level(logging.WARNING, logger="nezha_zoo"):
        head, info = nzf.FlaxElectraForSequenceClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(p.name for p in head.spec if p.name.startswith("classifier."))
    assert "classifier.dense.weight" in caplog.text
    hidden = head(**inputs, output_hidden_states=True).hidden_states[-1]
    assert_close(hidden, run_pt(pt_base, inputs).last_hidden_state, HID, "base->head")
    # head checkpoint -> base class: classifier reported unexpected
    base, info = nzf.FlaxElectraModel.from_pretrained(seq_dir, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == sorted(
        ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"]
    )
    assert_close(base(**inputs).last_hidden_state, run_pt(pt_seq.electra, inputs).last_hidden_state, HID, "head->base")
    with pytest.raises(CheckpointError, match="classifier"):
        nzf.FlaxElectraModel.from_pretrained(seq_dir, strict=True)


def test_do_init_false_returns_params_without_random_init(pairs):
    _, path, fx = pairs["ForTokenClassification"]
    model, params = nzf.FlaxElectraForTokenClassification.from_pretrained(path, _do_init=False)
    with pytest.raises(ValueError, match="_do_init=False"):
        model.params  # noqa: B018
    inputs = inputs_for("ForTokenClassification", seed=10)
    with op_by_op(fx):  # fx ran these inputs before: compiled by now, and the new model's call is op by op
        assert_close(model(**inputs, params=params).logits, fx(**inputs).logits, 0.0, "_do_init=False")
    # a base checkpoint: the head's params are missing until init_weights fills them
    _, base_dir, _ = pairs["Model"]
    model, partial = nzf.FlaxElectraForTokenClassification.from_pretrained(base_dir, _do_init=False)
    assert model._missing_keys == {("classifier", "kernel"), ("classifier", "bias")}
    full = model.init_weights(jax.random.PRNGKey(0), (1, 1), partial)
    assert set(flatten_dict(full)) == model.required_params
    assert_close(
        full["electra"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
        partial["electra"]["encoder"]["layer"]["1"]["output"]["dense"]["kernel"],
        0.0,
        "kept",
    )


def test_pytorch_model_bin_checkpoint_loads(pairs, tmp_path):
    pt, _, _ = pairs["ForPreTraining"]
    pt.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.exists(tmp_path / "pytorch_model.bin")
    fx = nzf.FlaxElectraForPreTraining.from_pretrained(tmp_path, strict=True)
    inputs = inputs_for("ForPreTraining", seed=14)
    compare(fx(**inputs), run_pt(pt, inputs), "ForPreTraining[pytorch_model.bin]")


def test_shape_mismatch_raises_naming_the_tensor(pairs):
    _, path, _ = pairs["ForMaskedLM"]
    with pytest.raises(CheckpointError, match=r"electra\.embeddings\.word_embeddings\.weight.*\(99, 16\).*\(98, 16\)"):
        nzf.FlaxElectraForMaskedLM.from_pretrained(path, vocab_size=98)


def test_signatures_follow_transformers_flax():
    import inspect

    from transformers.models.electra import modeling_flax_electra as hf

    ours = list(inspect.signature(nzf.FlaxElectraPreTrainedModel.__call__).parameters)
    theirs = list(inspect.signature(hf.FlaxElectraPreTrainedModel.__call__).parameters)
    # transformers' arguments in its order, then ours: inputs_embeds, the quantization-state
    # collection of families that have one (I-BERT; the wrapper is shared), the causal LMs' logits_to_keep
    assert ours[: len(theirs)] == theirs and ours[len(theirs) :] == ["inputs_embeds", "buffers", "logits_to_keep"]
    init = list(inspect.signature(nzf.FlaxElectraPreTrainedModel.__init__).parameters)
    assert init[:7] == list(inspect.signature(hf.FlaxElectraPreTrainedModel.__init__).parameters)[:7]
    for head in HEADS:
        name = f"FlaxElectra{'' if head == 'Model' else head}Module"
        mine = list(inspect.signature(getattr(nzf, name).__call__).parameters)
        ref = list(inspect.signature(getattr(hf, name).__call__).parameters)
        extra = {"ForCausalLM": ["logits_to_keep"], "Model": ["positions_to_keep"]}.get(head, [])
        assert mine[: len(ref)] == ref and mine[len(ref) :] == ["inputs_embeds", *extra], name


def test_params_tree_equals_spec_exactly():
    for cfg in (ElectraConfig(**TINY), ElectraConfig(**TINY, is_decoder=True, add_cross_attention=True)):
        for head in HEADS:
            fx = flax_class(head)(cfg.copy(num_labels=2) if head == "ForQuestionAnswering" else cfg)
            want = {FLAX_LAYOUT.key(p): FLAX_LAYOUT.shape(p) for p in fx.spec}
            shape = (1, 2, 3) if head == "ForMultipleChoice" else (1, 3)
            ids = jnp.ones(shape, jnp.int32)
            kw = {}
            if cfg.add_cross_attention and head in ("Model", "ForCausalLM"):
                kw = dict(encoder_hidden_states=jnp.zeros((1, 2, cfg.hidden_size)))
            tree = jax.eval_shape(lambda i, fx=fx, kw=kw: fx.module.init(jax.random.PRNGKey(0), i, **kw), ids)
            got = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(tree["params"]).items()}
            assert got == want, f"{head}: {set(got) ^ set(want)}"
            held = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(fx.params).items()}
            assert held == want
            assert set(tree) == {"params"}


# --- shared blocks: the extension points later families use -----------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        BertLayerNames(),
        MPNET_NAMES,  # attention.attn.{q,k,v,o} and attention.LayerNorm
        XLM_ROBERTA_XL_NAMES,  # pre-LN attention and feed-forward, final norms elsewhere
    ],
    ids=["bert", "mpnet", "xlmr_xl"],
)
def test_shared_layer_names_follow_the_spec(names):
    cfg = ElectraConfig(**{**TINY, "embedding_size": 32}, is_decoder=True, add_cross_attention=True)
    h = jnp.zeros((1, 3, cfg.hidden_size))
    layer = BertLayer(cfg, names=names)
    tree = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), h, None, None, h))
    got = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(tree["params"]).items()}
    spec = bert_layer("", cfg.hidden_size, cfg.intermediate_size, names, cross_attention=True)
    assert got == {FLAX_LAYOUT.key(p): FLAX_LAYOUT.shape(p) for p in spec}


def test_attention_position_bias_and_relative_hooks():
    cfg = ElectraConfig(**{**TINY, "embedding_size": 32})
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 5, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    x = jnp.asarray(rng.normal(size=(B, T, cfg.hidden_size)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, H, T, T)), jnp.float32)
    rel_k, rel_v = (jnp.asarray(rng.normal(size=(T, T, D)), jnp.float32) for _ in range(2))
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    attn = BertSelfAttention(cfg)
    params = attn.init(jax.random.PRNGKey(0), x)["params"]
    ctx, probs = attn.apply({"params": params}, x, mask, None, None, bias, (rel_k, rel_v))

    def proj(name):  # (B, T, H, D)
        return np.asarray(x @ params[name]["kernel"] + params[name]["bias"]).reshape(B, T, H, D)

    q, k, v = proj("query"), proj("key"), proj("value")
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) + np.einsum("bqhd,qkd->bhqk", q, rel_k)  # Nezha: before scaling
    scores = scores / np.sqrt(D) + np.asarray(bias)  # MPNet: after scaling
    scores = scores + (1 - np.asarray(mask))[:, None, None, :] * np.finfo(np.float32).min
    want_p = np.exp(scores - scores.max(-1, keepdims=True))
    want_p /= want_p.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", want_p, v) + np.einsum("bhqk,qkd->bqhd", want_p, rel_v)
    assert_close(probs, want_p, 1e-6, "probs with hooks")
    assert_close(ctx, want.reshape(B, T, H * D), 1e-5, "context with hooks")


def test_computation_dtype():
    fx = nzf.FlaxElectraModel(ElectraConfig(**TINY), dtype=jnp.bfloat16)
    out = fx(np.array([[5, 6, 7]]))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    # dtype sets weights and compute alike (issue #5): the params are stored in bfloat16 too.
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree_util.tree_leaves(fx.params))
    ref = nzf.FlaxElectraModel(ElectraConfig(**TINY))(np.array([[5, 6, 7]]))
    assert_close(out.last_hidden_state.astype(jnp.float32), ref.last_hidden_state, 0.1, "bf16 vs fp32")


# --- jit, training, gradient checkpointing ----------------------------------------------------------


def test_outputs_are_pytrees_through_jit(pairs):
    _, _, fx = pairs["ForQuestionAnswering"]
    inputs = inputs_for("ForQuestionAnswering", seed=11)
    out = jax.jit(lambda p, i, m: fx(i, m, params=p, output_hidden_states=True))(
        fx.params, inputs["input_ids"], inputs["attention_mask"]
    )
    assert type(out).__name__ == "QuestionAnsweringModelOutput" and len(out.hidden_states) == 3
    eager = fx(inputs["input_ids"], inputs["attention_mask"])
    assert_close(out.start_logits, eager.start_logits, 1e-5, "jit")


def test_gradient_checkpointing_methods_switch_the_module():
    # the names every backend shares, plus transformers-Flax's enable_gradient_checkpointing alias
    model = nzf.FlaxElectraForTokenClassification(ElectraConfig(**TINY), seed=3)
    params = model.params
    assert not model.is_gradient_checkpointing and not model.module.gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing and model.module.gradient_checkpointing
    assert model.params is params and model.module.config is model.config
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and not model.module.gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing


def test_gradient_checkpointing_gives_equal_gradients():
    cfg = ElectraConfig(**TINY)
    plain = nzf.FlaxElectraForTokenClassification(cfg, seed=3)
    remat = nzf.FlaxElectraForTokenClassification(cfg, seed=3, gradient_checkpointing=True)
    x = inputs_for("ForTokenClassification", seed=13)
    labels = np.where(x["attention_mask"] == 1, x["input_ids"] % 3, -100)

    def grad_fn(model):
        def f(p, rng):  # train mode: dropout masks must be identical under remat too
            out = model.module.apply(
                {"params": p},
                x["input_ids"],
                x["attention_mask"],
                x["token_type_ids"],
                deterministic=False,
                rngs={"dropout": rng},
            )
            return L.token_classification_loss(out.logits, labels)

        return jax.jit(jax.value_and_grad(f))

    plain_fn, remat_fn = grad_fn(plain), grad_fn(remat)
    # rbg keys: their dropout masks compile several times faster on CPU than threefry's
    key5 = jax.random.key(5, impl="rbg")
    (l1, g1), (l2, g2) = plain_fn(plain.params, key5), remat_fn(plain.params, key5)
    assert_close(l1, l2, TOLERANCES["loss"], "loss under remat")
    scale = max(float(jnp.abs(v).max()) for v in jax.tree_util.tree_leaves(g1))
    f1, f2 = flatten_dict(g1), flatten_dict(g2)
    assert set(f1) == set(f2)
    for k, a in f1.items():
        assert_close(a, f2[k], TOLERANCES["grad_rel"] * scale, f"grad {'/'.join(k)}")
    # dropout is live: another rng gives another loss
    assert float(plain_fn(plain.params, jax.random.key(6, impl="rbg"))[0]) != float(l1)


def test_training_example_loss_falls():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "flax_train_electra.py")
    spec = importlib.util.spec_from_file_location("flax_train_electra", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(steps=60)
    assert len(history) == 60
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5]), history


# --- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(pairs):
    _, _, fx = pairs["ForSequenceClassification"]
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    cases = {
        "outside the vocabulary": dict(input_ids=np.array([[5, 99, 7]])),
        "outside the vocabulary ": dict(input_ids=np.array([[5, -1, 7]])),
        "exceeds the model's max_position_embeddings": dict(input_ids=np.ones((1, 65), np.int64)),
        "attention_mask has shape": dict(input_ids=ids, attention_mask=np.ones((2, 4))),
        "token_type_ids has shape": dict(input_ids=ids, token_type_ids=np.zeros((1, 3))),
        "outside the token types": dict(input_ids=ids, token_type_ids=np.full((2, 3), 2)),
        "not both": dict(input_ids=ids, inputs_embeds=np.zeros((2, 3, 16), np.float32)),
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


def test_import_nezha_zoo_flax_pulls_no_other_framework():
    import subprocess
    import sys

    code = "import sys, nezha_zoo.flax; print([m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
