"""Flax XLM-RoBERTa-XL vs transformers 4.57.6 PyTorch: params, numerics, cache, checkpoints, training, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

import nezha_zoo.flax as nzf  # noqa: E402
from nezha_zoo import XLMRobertaXLConfig  # noqa: E402
from nezha_zoo.flax import losses as L  # noqa: E402
from nezha_zoo.flax.layers import BertLayer  # noqa: E402
from nezha_zoo.flax.xlm_roberta_xl import token_classification_loss  # noqa: E402
from nezha_zoo.pretrained import random_weights, save_weights  # noqa: E402
from nezha_zoo.spec import get_family  # noqa: E402
from nezha_zoo.spec.blocks import XLM_ROBERTA_XL_NAMES  # noqa: E402
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.flax, pytest.mark.hf]

FAMILY = get_family("xlm_roberta_xl")
HEADS = FAMILY.heads
PAD = 1
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,  # two rows so token types matter (the real models have one)
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
DECODER = dict(is_decoder=True, add_cross_attention=True)
LONGEST = TINY["max_position_embeddings"] - PAD - 1
HIDDEN_FIELDS = {"last_hidden_state", "hidden_states", "attentions", "cross_attentions", "pooler_output"}


@pytest.fixture(scope="module", autouse=True)
def _pin():
    pin_precision("flax")
    pin_precision("pt")


def _checkpoint(root, head: str, seed: int, **overrides):
    config = XLMRobertaXLConfig(**{**TINY, **overrides})
    spec = FAMILY.model_spec(config, head)
    path = root / f"{head}_{seed}"
    save_weights(path, config, spec, FAMILY, random_weights(spec, config, seed=seed))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Per head: (checkpoint dir, transformers PyTorch model, our Flax wrapper) on one seeded checkpoint."""
    root = tmp_path_factory.mktemp("xlm_roberta_xl_flax")
    out = {}
    for i, head in enumerate(HEADS):
        path = _checkpoint(root, head, i)
        hf = getattr(transformers, f"XLMRobertaXL{head}").from_pretrained(path, attn_implementation="eager").eval()
        out[head] = (path, hf, getattr(nzf, f"FlaxXLMRobertaXL{head}").from_pretrained(path))
    return out


def _inputs(head: str, seed: int = 0) -> dict:
    choices = 3 if head == "ForMultipleChoice" else None
    return tiny_inputs(batch=2, seq_len=7, vocab_size=99, pad=PAD, seed=seed, num_choices=choices)


def _hf(model, inputs: dict, **kw):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kw)


def _compare(hf_out, fx_out, what: str) -> None:
    hf_keys = [k for k in hf_out.keys() if k not in ("loss", "past_key_values")]
    assert [k for k in fx_out.keys() if k != "past_key_values"] == hf_keys, f"{what}: {list(fx_out)} vs {hf_keys}"
    for k in hf_keys:
        tol = TOLERANCES["hidden"] if k in HIDDEN_FIELDS else TOLERANCES["logits"]
        ref, got = hf_out[k], fx_out[k]
        if isinstance(ref, tuple):
            assert len(ref) == len(got), f"{what}.{k}"
            for i, (a, b) in enumerate(zip(ref, got)):
                assert_close(b, a, tol, f"{what}.{k}[{i}]")
        else:
            assert_close(got, ref, tol, f"{what}.{k}")


@pytest.mark.parametrize("head", HEADS)
def test_params_tree_equals_spec(head, pairs):
    fx = pairs[head][2]
    assert {"/".join(k) for k in flatten_dict(fx.params)} == {LAYOUTS["flax"].key(p) for p in fx.spec}
    has_pooler = any("pooler" in k for k in flatten_dict(fx.params))
    assert has_pooler == (head in ("Model", "ForMultipleChoice"))


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers(head, pairs):
    _, hf, fx = pairs[head]
    x = _inputs(head, seed=1)
    _compare(
        _hf(hf, x, output_hidden_states=True, output_attentions=True),
        fx(**x, output_hidden_states=True, output_attentions=True),
        f"{head} padded",
    )
    _compare(_hf(hf, {"input_ids": x["input_ids"]}), fx(x["input_ids"]), f"{head} ids-only")


def test_left_padding_inputs_embeds_and_jit(pairs):
    _, hf, fx = pairs["Model"]
    ids = np.array([[PAD, PAD, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != PAD).astype(np.int64)
    ref = _hf(hf, {"input_ids": ids, "attention_mask": mask})
    _compare(ref, fx(ids, mask), "left padding")
    jitted = jax.jit(lambda p, i, m: fx(i, m, params=p))(fx.params, jnp.asarray(ids), jnp.asarray(mask))
    _compare(ref, jitted, "left padding under jit")
    emb = hf.embeddings.word_embeddings(torch.from_numpy(ids)).detach().numpy()
    _compare(_hf(hf, {"inputs_embeds": emb, "attention_mask": mask}), fx(None, mask, inputs_embeds=emb), "embeds")


def test_losses_match_transformers(pairs):
    r = np.random.default_rng(4)
    for head, labels, loss_fn in (
        ("ForMaskedLM", {"labels": r.integers(0, 99, (2, 7))}, lambda o, y, x: L.masked_lm_loss(o.logits, y["labels"])),
        ("ForCausalLM", {"labels": r.integers(0, 99, (2, 7))}, lambda o, y, x: L.causal_lm_loss(o.logits, y["labels"])),
        (
            "ForSequenceClassification",
            {"labels": r.integers(0, 2, (2,))},
            lambda o, y, x: L.sequence_classification_loss(o.logits, y["labels"], 2),
        ),
        (
            "ForMultipleChoice",
            {"labels": r.integers(0, 3, (2,))},
            lambda o, y, x: L.multiple_choice_loss(o.logits, y["labels"]),
        ),
        (  # labels on padded positions too: the family's loss drops them by the attention mask
            "ForTokenClassification",
            {"labels": r.integers(0, 2, (2, 7))},
            lambda o, y, x: token_classification_loss(o.logits, y["labels"], x["attention_mask"]),
        ),
        (
            "ForQuestionAnswering",
            {"start_positions": np.array([1, 30]), "end_positions": np.array([5, 3])},
            lambda o, y, x: L.question_answering_loss(
                o.start_logits, o.end_logits, y["start_positions"], y["end_positions"]
            ),
        ),
    ):
        _, hf, fx = pairs[head]
        x = _inputs(head, seed=2)
        assert_close(loss_fn(fx(**x), labels, x), _hf(hf, {**x, **labels}).loss, TOLERANCES["loss"], f"{head} loss")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = _checkpoint(tmp_path_factory.mktemp("xl_flax_dec"), "ForCausalLM", 21, **DECODER)
    hf = transformers.XLMRobertaXLForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return hf, nzf.FlaxXLMRobertaXLForCausalLM.from_pretrained(path)


def _decoder_inputs():
    r = np.random.default_rng(12)
    ids = r.integers(2, 99, (2, 7))
    enc = r.standard_normal((2, 5, TINY["hidden_size"])).astype(np.float32)
    enc_mask = np.array([[1] * 5, [1] * 3 + [0] * 2])
    types = np.array([[0] * 3 + [1] * 4] * 2)
    return ids, enc, enc_mask, types


def test_decoder_with_cross_attention_matches_transformers(decoder):
    hf, fx = decoder
    ids, enc, enc_mask, types = _decoder_inputs()
    mask = np.array([[1] * 7, [1] * 5 + [0] * 2])
    kw = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    ref = _hf(hf, dict(input_ids=ids, attention_mask=mask, token_type_ids=types, **kw), output_attentions=True)
    _compare(ref, fx(ids, mask, types, **kw, output_attentions=True), "decoder")


def test_cached_decoding_equals_full_eager_and_jit(decoder):
    hf, fx = decoder
    ids, enc, enc_mask, types = _decoder_inputs()
    B, T = ids.shape
    mask = np.ones((B, T), np.int64)
    full = _hf(
        hf, dict(input_ids=ids, token_type_ids=types, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    )

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
        for lo, hi in [(0, 3)] + [(t, t + 1) for t in range(3, T)]:  # positions continue after the cache
            out = fn(fx.params, cache, ids[:, lo:hi], types[:, lo:hi])
            cache = out.past_key_values
            pieces.append(out.logits)
        assert_close(jnp.concatenate(pieces, axis=1), full.logits, TOLERANCES["logits"], f"cached ({label})")


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForMultipleChoice"])
def test_save_pretrained_loads_in_transformers(head, pairs, tmp_path):
    _, _, fx = pairs[head]
    fx.save_pretrained(tmp_path)
    back = getattr(transformers, f"XLMRobertaXL{head}").from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = _inputs(head, seed=5)
    _compare(_hf(back, x), fx(**x), f"{head} round trip")


def test_base_and_head_prefix_loading(pairs):
    base_path, _, base = pairs["Model"]
    head_path, _, _ = pairs["ForSequenceClassification"]
    model, info = nzf.FlaxXLMRobertaXLForSequenceClassification.from_pretrained(base_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {
        f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")
    }
    ln = model.params["roberta"]["encoder"]["LayerNorm"]["scale"]
    assert_close(ln, base.params["encoder"]["LayerNorm"]["scale"], 0.0, "base->head")
    model, info = nzf.FlaxXLMRobertaXLModel.from_pretrained(head_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert len(info["unexpected_keys"]) == 4


def test_jitted_optax_training_step_lowers_the_loss(pairs):
    _, _, fx = pairs["ForMaskedLM"]
    x = _inputs("ForMaskedLM", seed=6)
    labels = np.where(x["attention_mask"] == 1, x["input_ids"], -100)
    tx = optax.adam(1e-2)

    @jax.jit
    def train_step(params, opt_state, rng):
        def loss_fn(p):
            out = fx.module.apply(
                {"params": p},
                x["input_ids"],
                x["attention_mask"],
                x["token_type_ids"],
                deterministic=False,
                rngs={"dropout": rng},
            )
            return L.masked_lm_loss(out.logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    params, opt_state = fx.params, tx.init(fx.params)
    history = []
    for i in range(4):
        params, opt_state, loss, grads = train_step(params, opt_state, jax.random.PRNGKey(i))
        history.append(float(loss))
    assert history[-1] < history[0], history
    # no gradient reaches the padding row of the position table (torch's padding_idx)
    assert float(jnp.abs(grads["roberta"]["embeddings"]["position_embeddings"]["embedding"][PAD]).max()) == 0.0


def test_gradient_checkpointing_gives_equal_gradients(pairs):
    path, _, _ = pairs["ForTokenClassification"]
    plain = nzf.FlaxXLMRobertaXLForTokenClassification.from_pretrained(path)
    remat = nzf.FlaxXLMRobertaXLForTokenClassification.from_pretrained(path, gradient_checkpointing=True)
    x = _inputs("ForTokenClassification", seed=7)
    labels = np.where(x["attention_mask"] == 1, x["input_ids"] % 2, -100)

    def grads(model):
        def f(p):
            out = model.module.apply({"params": p}, x["input_ids"], x["attention_mask"], x["token_type_ids"])
            return L.token_classification_loss(out.logits, labels)

        return flatten_dict(jax.grad(f)(plain.params))

    g1, g2 = grads(plain), grads(remat)
    assert set(g1) == set(g2)
    for k, a in g1.items():
        assert_close(g2[k], a, 1e-6, f"grad {'/'.join(k)}")


def test_bad_inputs_raise_input_error(pairs):
    _, hf, fx = pairs["Model"]
    ids = np.random.default_rng(1).integers(2, 99, (1, LONGEST))
    _compare(_hf(hf, {"input_ids": ids}), fx(ids), "longest input")
    with pytest.raises(InputError, match="max_position_embeddings"):
        fx(np.concatenate([ids, ids[:, :1]], axis=1))
    with pytest.raises(InputError, match="max_position_embeddings"):
        fx(None, inputs_embeds=np.zeros((1, LONGEST + 1, TINY["hidden_size"]), np.float32))
    with pytest.raises(InputError, match="attention_mask"):
        fx(ids, np.ones((1, LONGEST - 1)))
    with pytest.raises(InputError, match="vocabulary"):
        fx(np.array([[5, 99]]))
    with pytest.raises(InputError, match="token types"):
        fx(np.array([[5, 6]]), token_type_ids=np.array([[0, 2]]))
    with pytest.raises(InputError, match="rank 3"):
        pairs["ForMultipleChoice"][2](ids)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        pairs["ForSequenceClassification"][2](ids, encoder_hidden_states=np.zeros((1, 3, 32), np.float32))


def test_layer_drops_nothing_on_the_feed_forward_output():
    """XLM-R-XL's layer has no dropout on its feed-forward output (``XLM_ROBERTA_XL_NAMES.output_dropout``).

    transformers' ``XLMRobertaXLOutput`` is ``dense`` + residual.  With ``hidden_dropout_prob`` 0.9, no
    attention-probability dropout and the attention's output projection zeroed, the attention block adds
    exactly 0 (dropped or not) to its input, so only a feed-forward output dropout could make a training
    call (``deterministic=False``) differ from an inference call; with ``output_dropout=True`` (the
    control) it does.
    """
    config = XLMRobertaXLConfig(**{**TINY, "hidden_dropout_prob": 0.9})
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, TINY["hidden_size"]))

    def training_and_inference(names):
        layer = BertLayer(config, names=names)
        params = flatten_dict(layer.init(jax.random.PRNGKey(1), x)["params"])
        projection = ("attention", "output", "dense")
        assert {k[-1] for k in params if k[:3] == projection} == {"kernel", "bias"}
        params = {k: jnp.zeros_like(v) if k[:3] == projection else v for k, v in params.items()}
        variables = {"params": unflatten_dict(params)}
        train = layer.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})[0]
        return train, layer.apply(variables, x, deterministic=True)[0]

    train, infer = training_and_inference(XLM_ROBERTA_XL_NAMES)
    assert_close(train, infer, TOLERANCES["hidden"], "training vs inference call (no feed-forward dropout)")
    train, infer = training_and_inference(dataclasses.replace(XLM_ROBERTA_XL_NAMES, output_dropout=True))
    # The control: that dropout changes the output by more than half the feed-forward's whole contribution.
    contribution = float(jnp.abs(infer - x).max())
    assert float(jnp.abs(train - infer).max()) > 0.5 * contribution > 0
