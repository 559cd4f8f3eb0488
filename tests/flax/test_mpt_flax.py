"""Flax MPT against transformers 4.57.6 PyTorch and an independent numpy reference.

Weights come from the spec (``random_weights``, perturbed so LayerNorm scales and biases are not
trivial) and are written once with ``save_weights``; transformers and our Flax classes each load the
directory with their own ``from_pretrained``, so the checkpoint path is checked with the numerics.
The MosaicML settings transformers ignores are checked against a small numpy MPT written here.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict
from scipy.special import erf

import nezha_zoo.flax as nzf
from nezha_zoo import MptConfig
from nezha_zoo.config import classifier_dropout_rate
from nezha_zoo.families.mpt import MPT
from nezha_zoo.flax import losses as L
from nezha_zoo.flax.mpt import alibi_slopes
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.testing import TOLERANCES, assert_close, op_by_op, pin_precision
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.flax, pytest.mark.hf]

pin_precision("flax")
pin_precision("pt")

HEADS = ("Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
TINY = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=99, pad_token_id=0, num_labels=3)
FLAX_LAYOUT = LAYOUTS["flax"]
HID, LOG = TOLERANCES["hidden"], TOLERANCES["logits"]
MEASURED: dict[str, float] = {}  # max-abs differences, printed when the module finishes

# Right-padded (row 1) and a full row; pad id 0 only where the mask is 0.
IDS = np.array([[5, 17, 33, 8, 91, 2, 40], [11, 12, 63, 14, 0, 0, 0]])
MASK = (IDS != 0).astype(np.int64)
# The same two sequences left-padded to 7.
LEFT_IDS = np.array([[5, 17, 33, 8, 91, 2, 40], [0, 0, 0, 11, 12, 63, 14]])
LEFT_MASK = (LEFT_IDS != 0).astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def _print_measured(request):
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for k in sorted(MEASURED):
            print(f"  max|diff| {k}: {MEASURED[k]:.2e}")


def suffix(head: str) -> str:
    return "Model" if head == "Model" else head


def make_config(**overrides) -> MptConfig:
    attn = overrides.pop("attn_config", {})
    return MptConfig(**{**TINY, **overrides}, attn_config=attn)


def seeded_weights(cfg: MptConfig, head: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Spec-initialised canonical weights, with norm scales and biases moved off 1 and 0."""
    spec = MPT.model_spec(cfg, head)
    rng = np.random.default_rng(seed + 100)
    out = {}
    for name, w in random_weights(spec, cfg, seed).items():
        if name.endswith(".bias") or (".norm" in name or name.startswith("norm") or "_ln." in name):
            w = w + rng.normal(0, 0.1, w.shape).astype(np.float32)
        out[name] = w
    return out


def write_checkpoint(path, cfg: MptConfig, head: str, seed: int = 0) -> dict[str, np.ndarray]:
    weights = seeded_weights(cfg, head, seed)
    save_weights(path, cfg, MPT.model_spec(cfg, head), MPT, weights)
    return weights


def load_pair(path, head: str):
    pt = getattr(transformers, f"Mpt{suffix(head)}").from_pretrained(path).eval()
    return pt, getattr(nzf, f"FlaxMpt{suffix(head)}").from_pretrained(path)


def run_pt(model, **inputs):
    kw = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    with torch.no_grad():
        return model(**kw)


def compare(flax_out, pt_out, what: str, mask: np.ndarray | None = None) -> None:
    """Every field of our output equals transformers' (same field set except loss/past_key_values).

    ``mask`` (B, L) restricts per-token comparisons to real tokens (query rows for attentions).
    """
    pt_fields = {k for k, v in pt_out.items() if v is not None and k not in ("loss", "past_key_values")}
    ours = {k for k in flax_out.keys() if k != "past_key_values"}
    assert ours == pt_fields, f"{what}: fields {sorted(ours)} vs transformers {sorted(pt_fields)}"

    def row_mask(x):
        if mask is None or np.ndim(x) < 2:
            return None
        if np.ndim(x) == 4:  # (B, heads, Lq, Lk): real query rows
            return mask.astype(bool)[:, None, :, None]
        return mask.astype(bool).reshape(mask.shape + (1,) * (np.ndim(x) - 2))

    for key in ours:
        mine, theirs = flax_out[key], pt_out[key]
        if isinstance(mine, tuple):
            assert len(mine) == len(theirs), f"{what}.{key}: {len(mine)} vs {len(theirs)} entries"
            for i, (a, b) in enumerate(zip(mine, theirs)):
                d = assert_close(a, b, HID, f"{what}.{key}[{i}]", mask=row_mask(a))
                MEASURED[f"{what}.{key}"] = max(MEASURED.get(f"{what}.{key}", 0.0), d)
        else:
            tol = HID if key == "last_hidden_state" else LOG
            m = row_mask(mine) if np.ndim(mine) == 3 or key.endswith("_logits") else None
            MEASURED[f"{what}.{key}"] = assert_close(mine, theirs, tol, f"{what}.{key}", mask=m)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """head -> (transformers PT model, checkpoint dir, our Flax model), all from one seeded checkpoint."""
    cfg = make_config()
    out = {}
    for head in HEADS:
        path = tmp_path_factory.mktemp(f"mpt_{head}")
        write_checkpoint(path, cfg, head)
        pt, fx = load_pair(path, head)
        out[head] = (pt, str(path), fx)
    return out


# --- numerics against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers_right_padding(pairs, head):
    pt, _, fx = pairs[head]
    kw = dict(output_hidden_states=True, output_attentions=True)
    mine = fx(IDS, MASK, **kw)
    # Every position, padded ones included: masked rows follow transformers' masked_fill exactly.
    compare(mine, run_pt(pt, input_ids=IDS, attention_mask=MASK, **kw), head)
    assert len(mine.hidden_states) == TINY["n_layers"] + 1 and len(mine.attentions) == TINY["n_layers"]


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers_left_padding(pairs, head):
    pt, _, fx = pairs[head]
    kw = dict(output_hidden_states=True, output_attentions=True)
    mine = fx(LEFT_IDS, LEFT_MASK, **kw)
    compare(mine, run_pt(pt, input_ids=LEFT_IDS, attention_mask=LEFT_MASK, **kw), f"{head}[left]")


def test_left_padded_row_equals_unpadded_row(pairs):
    _, _, fx = pairs["ForCausalLM"]
    alone = fx(LEFT_IDS[1:, 3:]).logits[0]  # (4, V) the sequence without padding
    padded = fx(LEFT_IDS, LEFT_MASK).logits[1, 3:]
    MEASURED["left_pad_vs_unpadded"] = assert_close(padded, alone, LOG, "left-padded row")
    # and right-padded: real positions unaffected by the pads after them
    right = fx(IDS, MASK).logits[1, :4]
    assert_close(right, alone, LOG, "right-padded row")


@pytest.mark.parametrize("head", HEADS)
def test_optional_inputs_left_out_match_transformers(pairs, head):
    pt, _, fx = pairs[head]
    ids = IDS[:, :5] + 1  # no padding id: every position real
    compare(fx(ids), run_pt(pt, input_ids=ids), f"{head}[ids only]")
    with op_by_op(fx):  # two signatures: compare them on one path (compiled may round differently)
        assert_close(fx(ids)[0], fx(ids, np.ones_like(ids))[0], 0.0, "omitted mask is ones")


def test_return_tuple_and_inputs_embeds(pairs):
    _, _, fx = pairs["ForCausalLM"]
    with op_by_op(fx):  # two signatures: compare them on one path (compiled may round differently)
        out = fx(IDS, MASK, output_attentions=True)
        as_tuple = fx(IDS, MASK, output_attentions=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert_close(as_tuple[0], out.logits, 0.0, "tuple output")
    embeds = jnp.take(fx.params["transformer"]["wte"]["embedding"], IDS, axis=0)
    assert_close(fx(inputs_embeds=embeds, attention_mask=MASK).logits, out.logits, 1e-6, "inputs_embeds")


def test_alibi_with_six_heads_matches_transformers(tmp_path):
    slopes = alibi_slopes(6)
    np.testing.assert_array_equal(slopes, np.array([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8], np.float32))
    cfg = make_config(d_model=48, n_heads=6)
    write_checkpoint(tmp_path, cfg, "ForCausalLM", seed=1)
    pt, fx = load_pair(tmp_path, "ForCausalLM")
    kw = dict(output_attentions=True, output_hidden_states=True)
    compare(fx(IDS, MASK, **kw), run_pt(pt, input_ids=IDS, attention_mask=MASK, **kw), "CausalLM[6 heads]")


# --- the MosaicML fields, against a numpy MPT ------------------------------------------------------


def np_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def np_mpt(cfg: MptConfig, w: dict, ids: np.ndarray, mask: np.ndarray, prefix: str = "transformer.", **off):
    """MPT in float64 numpy from canonical weights, written from llm-foundry's definitions.

    ``off`` switches a feature off in the reference (``bias=True`` drops biases, ``qk_ln=True`` skips
    the q/k norms) to show that the feature changes the numbers.
    Returns (hidden (B, L, d), logits (B, L, V) through the tied ``wte`` and ``logit_scale``).
    """
    ac = cfg.attn_config
    d, H = cfg.d_model, cfg.n_heads
    hd = d // H
    kv = 1 if ac.attn_type == "multiquery_attention" else H
    W = {k[len(prefix) :]: v.astype(np.float64) for k, v in w.items() if k.startswith(prefix)}

    def bias(name):
        return None if off.get("bias") else W.get(name)

    def linear(x, name):
        y = x @ W[f"{name}.weight"].T
        b = bias(f"{name}.bias")
        return y if b is None else y + b

    def norm(x, name):
        return np_layer_norm(x, W[f"{name}.weight"], bias(f"{name}.bias"), cfg.layer_norm_epsilon)

    B, T = ids.shape
    power = 2 ** int(np.ceil(np.log2(H)))
    slopes = 2.0 ** (-(np.arange(1, power + 1) * ac.alibi_bias_max / power))
    if power != H:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:H]
    alibi = slopes[:, None, None] * (np.arange(T) - (T - 1))[None, None, :]  # (H, 1, T)
    visible = np.tril(np.ones((T, T), bool))[None, None] & (mask[:, None, None, :] == 1)
    scale = ac.softmax_scale if ac.softmax_scale is not None else 1 / np.sqrt(hd)
    x = W["wte.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        qkv = linear(norm(x, f"{p}.norm_1"), f"{p}.attn.Wqkv")
        if ac.clip_qkv:
            qkv = np.clip(qkv, -ac.clip_qkv, ac.clip_qkv)
        q, k, v = qkv[..., :d], qkv[..., d : d + kv * hd], qkv[..., d + kv * hd :]
        if ac.qk_ln and not off.get("qk_ln"):
            q, k = norm(q, f"{p}.attn.q_ln"), norm(k, f"{p}.attn.k_ln")
        q = q.reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        k = np.repeat(k.reshape(B, T, kv, hd).transpose(0, 2, 1, 3), H // kv, axis=1)
        v = np.repeat(v.reshape(B, T, kv, hd).transpose(0, 2, 1, 3), H // kv, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) * scale + alibi[None]
        s = np.where(visible, s, -1e30)
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        ctx = (prob @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
        x = x + linear(ctx, f"{p}.attn.out_proj")
        h = linear(norm(x, f"{p}.norm_2"), f"{p}.ffn.up_proj")
        x = x + linear(0.5 * h * (1 + erf(h / np.sqrt(2))), f"{p}.ffn.down_proj")
    x = norm(x, "norm_f")
    logits = x @ W["wte.weight"].T
    if cfg.logit_scale is not None:
        logits = logits * (1 / np.sqrt(d) if cfg.logit_scale == "inv_sqrt_d_model" else cfg.logit_scale)
    return x, logits


# name -> (config overrides, does transformers honour it too?)
MOSAIC = {
    "expansion_ratio": (dict(expansion_ratio=2), False),
    "no_bias": (dict(no_bias=False), False),
    "alibi_bias_max": (dict(attn_config=dict(alibi_bias_max=3)), False),
    "clip_qkv": (dict(attn_config=dict(clip_qkv=0.05)), True),
    "qk_ln": (dict(attn_config=dict(qk_ln=True)), False),
    "softmax_scale": (dict(attn_config=dict(softmax_scale=0.9)), True),
    "multiquery": (dict(attn_config=dict(attn_type="multiquery_attention")), False),
    "multiquery_qk_ln_bias": (
        dict(no_bias=False, attn_config=dict(attn_type="multiquery_attention", qk_ln=True)),
        False,
    ),
    "logit_scale": (dict(logit_scale=2.5), False),
    "logit_scale_inv_sqrt": (dict(logit_scale="inv_sqrt_d_model"), False),
}


@pytest.fixture(scope="module")
def default_lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("mpt_default_lm")
    weights = write_checkpoint(path, make_config(), "ForCausalLM", seed=2)
    pt, fx = load_pair(path, "ForCausalLM")
    return weights, pt, fx


def test_numpy_reference_equals_transformers_at_defaults(default_lm):
    weights, pt, fx = default_lm
    hidden, logits = np_mpt(make_config(), weights, IDS, MASK)
    theirs = run_pt(pt, input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    real = MASK.astype(bool)[..., None]
    MEASURED["numpy_ref_vs_pt"] = assert_close(hidden, theirs.hidden_states[-1], HID, "reference", mask=real)
    assert_close(logits, theirs.logits, LOG, "reference logits", mask=real)
    assert_close(fx(IDS, MASK).logits, theirs.logits, LOG, "defaults vs transformers")


@pytest.mark.parametrize("field", sorted(MOSAIC))
def test_mosaicml_field_matches_numpy_reference(field, default_lm, tmp_path):
    overrides, transformers_honours = MOSAIC[field]
    cfg = make_config(**overrides)
    weights = write_checkpoint(tmp_path, cfg, "ForCausalLM", seed=2)
    fx = nzf.FlaxMptForCausalLM.from_pretrained(tmp_path)
    out = fx(IDS, MASK, output_hidden_states=True)
    hidden, logits = np_mpt(cfg, weights, IDS, MASK)
    real = MASK.astype(bool)[..., None]
    MEASURED[f"mosaic.{field}.hidden"] = assert_close(out.hidden_states[-1], hidden, HID, field, mask=real)
    MEASURED[f"mosaic.{field}.logits"] = assert_close(out.logits, logits, LOG, f"{field} logits", mask=real)

    # The field changes the numbers: against the default model on the same weights where the tensors are
    # the same, else against the reference with the feature switched off.
    default_weights, _, default_fx = default_lm
    if set(weights) == set(default_weights) and all(weights[k].shape == default_weights[k].shape for k in weights):
        other = default_fx(IDS, MASK, params=fx.params).logits
    elif "no_bias" in overrides:
        other = np_mpt(cfg, weights, IDS, MASK, bias=True)[1]
    elif cfg.attn_config.qk_ln:
        other = np_mpt(cfg, weights, IDS, MASK, qk_ln=True)[1]
    else:  # expansion_ratio / multi-query: the spec's tensor shapes are the change
        spec = MPT.model_spec(cfg, "ForCausalLM")
        changed = [p.name for p in spec if p.shape != MPT.model_spec(make_config(), "ForCausalLM")[p.name].shape]
        assert changed, field
        other = None
    if other is not None:
        assert float(np.abs(np.asarray(out.logits) - np.asarray(other)).max()) > 1e-3, f"{field} changes nothing"

    if transformers_honours:
        pt = transformers.MptForCausalLM.from_pretrained(tmp_path).eval()
        theirs = run_pt(pt, input_ids=IDS, attention_mask=MASK, output_hidden_states=True, output_attentions=True)
        compare(fx(IDS, MASK, output_hidden_states=True, output_attentions=True), theirs, f"{field}[transformers]")


def test_logit_scale_is_a_factor(default_lm, tmp_path):
    weights, _, fx = default_lm
    save_weights(tmp_path, make_config(logit_scale=2.5), MPT.model_spec(make_config(), "ForCausalLM"), MPT, weights)
    scaled = nzf.FlaxMptForCausalLM.from_pretrained(tmp_path)
    assert_close(scaled(IDS, MASK).logits, 2.5 * np.asarray(fx(IDS, MASK).logits), 1e-5, "logit_scale")


# --- cached decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "multiquery"])
def test_cached_decoding_equals_full_forward_eager_and_jit(variant, default_lm, tmp_path):
    if variant == "default":
        _, pt, fx = default_lm
    else:
        write_checkpoint(tmp_path, make_config(attn_config=dict(attn_type="multiquery_attention")), "ForCausalLM", 3)
        pt, fx = None, nzf.FlaxMptForCausalLM.from_pretrained(tmp_path)
    ids, mask = LEFT_IDS, LEFT_MASK  # left padding, as batched generation uses
    B, T = ids.shape
    max_length = T + 2  # empty slots at the end stay masked (mask 0)
    full = fx(ids, mask).logits
    slot_mask = np.concatenate([mask, np.zeros((B, max_length - T), mask.dtype)], axis=1)

    def step(params, cache, chunk, cache_mask):
        out = fx(chunk, cache_mask, past_key_values=cache, params=params)
        return out.logits, out.past_key_values

    jitted = jax.jit(step)
    cache = fx.init_cache(B, max_length)
    keys = flatten_dict(cache)
    kv_heads = 1 if variant == "multiquery" else TINY["n_heads"]
    assert keys[("transformer", "blocks", "0", "attn", "cached_key")].shape == (B, max_length, kv_heads, 8)
    assert int(keys[("transformer", "blocks", "0", "attn", "cache_index")]) == 0
    pieces = []
    # a 4-token prompt, then one token at a time; the mask marks slots written so far or now
    for lo, hi in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
        now = slot_mask * (np.arange(max_length) < hi)
        eager_logits, eager_cache = step(fx.params, cache, ids[:, lo:hi], now)
        jit_logits, jit_cache = jitted(fx.params, cache, ids[:, lo:hi], now)
        MEASURED[f"decode[{variant}].jit_vs_eager"] = max(
            MEASURED.get(f"decode[{variant}].jit_vs_eager", 0.0),
            assert_close(jit_logits, eager_logits, 1e-5, f"jit step {lo}"),
        )
        for a, b in zip(jax.tree_util.tree_leaves(jit_cache), jax.tree_util.tree_leaves(eager_cache)):
            assert_close(a, b, 1e-5, "jit cache")
        cache = eager_cache
        pieces.append(eager_logits)
    cached = jnp.concatenate(pieces, axis=1)
    real = mask.astype(bool)[..., None]
    MEASURED[f"decode[{variant}].cached_vs_full"] = assert_close(cached, full, LOG, "cached", mask=real)
    if pt is not None:
        theirs = run_pt(pt, input_ids=ids, attention_mask=mask).logits
        MEASURED["decode.cached_vs_pt"] = assert_close(cached, theirs, LOG, "cached vs transformers", mask=real)
        # transformers' own cached decoding agrees too (its DynamicCache grows; ours is fixed)
        with torch.no_grad():
            first = pt(
                input_ids=torch.as_tensor(ids[:, :4]), attention_mask=torch.as_tensor(mask[:, :4]), use_cache=True
            )
            nxt = pt(
                input_ids=torch.as_tensor(ids[:, 4:5]),
                attention_mask=torch.as_tensor(mask[:, :5]),
                past_key_values=first.past_key_values,
            )
        assert_close(pieces[1], nxt.logits, LOG, "step vs transformers' cached step")


def test_model_and_seqcls_take_a_cache(pairs):
    for head in ("Model", "ForSequenceClassification"):
        _, _, fx = pairs[head]
        ids = IDS[:1, :5]
        full = fx(ids)
        cache = fx.init_cache(1, 8)
        first = fx(ids[:, :3], np.array([[1, 1, 1, 0, 0, 0, 0, 0]]), past_key_values=cache)
        second = fx(ids[:, 3:], np.array([[1, 1, 1, 1, 1, 0, 0, 0]]), past_key_values=first.past_key_values)
        if head == "Model":
            assert_close(second.last_hidden_state, full.last_hidden_state[:, 3:], HID, "Model cached")
        else:
            assert_close(second.logits, full.logits, LOG, "SeqCls cached: last token")
        as_tuple = fx(ids[:, :3], np.array([[1, 1, 1, 0, 0, 0, 0, 0]]), past_key_values=cache, return_dict=False)
        tree = as_tuple[1] if head == "Model" else as_tuple[1]["transformer"]
        assert int(tree["blocks"]["1"]["attn"]["cache_index"]) == 3  # (output, cache, ...)


def test_init_cache_traces_the_module_once_per_shape(monkeypatch):
    """generate calls init_cache every time: the template is traced once per (batch, length, dtype)."""
    fx = nzf.FlaxMptForCausalLM(MptConfig(**TINY), seed=0)
    first = fx.init_cache(2, 8)
    traced = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traced.append(1) or real(*a, **k))
    again = fx.init_cache(2, 8)
    assert traced == []
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(first)
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(again)):
        assert a.shape == b.shape and a.dtype == b.dtype and not np.any(np.asarray(b))
    other = fx.init_cache(1, 6)  # another shape traces again
    assert traced  # (flax calls eval_shape inside init too)
    assert flatten_dict(other)[("transformer", "blocks", "0", "attn", "cached_key")].shape[:2] == (1, 6)


# --- sequence classification pooling -----------------------------------------------------------------


def test_sequence_classification_pools_last_non_pad_token(pairs, tmp_path):
    pt, _, fx = pairs["ForSequenceClassification"]
    # left and right padding give the same pooled logits for the same sequence
    assert_close(fx(LEFT_IDS, LEFT_MASK).logits[1], fx(IDS, MASK).logits[1], LOG, "left vs right pooling")
    # no pad_token_id: a batch of one pools the last position; more raises, as transformers does
    weights = seeded_weights(make_config(), "ForSequenceClassification")
    cfg = make_config(pad_token_id=None)
    save_weights(tmp_path, cfg, MPT.model_spec(cfg, "ForSequenceClassification"), MPT, weights)
    pt_nopad, fx_nopad = load_pair(tmp_path, "ForSequenceClassification")
    compare(fx_nopad(IDS[:1]), run_pt(pt_nopad, input_ids=IDS[:1]), "SeqCls[no pad id, batch 1]")
    with pytest.raises(ValueError, match="pad_token_id"):
        fx_nopad(IDS)
    # inputs_embeds: no ids to find padding in -> the last position, as transformers
    embeds = np.array(jnp.take(fx.params["transformer"]["wte"]["embedding"], IDS, axis=0))  # writable copy
    compare(fx(inputs_embeds=embeds), run_pt(pt, inputs_embeds=embeds), "SeqCls[inputs_embeds]")


# --- losses ----------------------------------------------------------------------------------------


def test_losses_match_transformers(pairs, tmp_path):
    rng = np.random.default_rng(0)
    B, T = IDS.shape
    checks = {}

    def pt_loss(head, **labels):
        pt = pairs[head][0]
        pt.config.problem_type = None  # transformers caches the inferred problem type on the config
        return run_pt(pt, input_ids=IDS, attention_mask=MASK, **labels).loss

    fx = pairs["ForCausalLM"][2]
    labels = np.where(MASK == 1, IDS, -100)
    checks["causal_lm"] = (L.causal_lm_loss(fx(IDS, MASK).logits, labels), pt_loss("ForCausalLM", labels=labels))

    logits = pairs["ForSequenceClassification"][2](IDS, MASK).logits
    single = rng.integers(0, 3, (B,))
    checks["seqcls_single"] = (
        L.sequence_classification_loss(logits, single),
        pt_loss("ForSequenceClassification", labels=single),
    )
    multi = rng.integers(0, 2, (B, 3)).astype(np.float32)
    checks["seqcls_multi"] = (
        L.sequence_classification_loss(logits, multi),
        pt_loss("ForSequenceClassification", labels=multi),
    )
    cfg1 = make_config(num_labels=1)
    write_checkpoint(tmp_path, cfg1, "ForSequenceClassification", seed=4)
    pt1, fx1 = load_pair(tmp_path, "ForSequenceClassification")
    reg = rng.normal(size=(B,)).astype(np.float32)
    checks["seqcls_regression"] = (
        L.sequence_classification_loss(fx1(IDS, MASK).logits, reg),
        run_pt(pt1, input_ids=IDS, attention_mask=MASK, labels=reg).loss,
    )

    labels = np.where(MASK == 1, rng.integers(0, 3, (B, T)), -100)
    checks["token_cls"] = (
        L.token_classification_loss(pairs["ForTokenClassification"][2](IDS, MASK).logits, labels),
        pt_loss("ForTokenClassification", labels=labels),
    )

    out = pairs["ForQuestionAnswering"][2](IDS, MASK)
    start, end = np.array([1, 100]), np.array([3, -4])  # 100 and -4 clamp to the ignored index / 0
    checks["qa"] = (
        L.question_answering_loss(out.start_logits, out.end_logits, start, end),
        pt_loss("ForQuestionAnswering", start_positions=start, end_positions=end),
    )
    for name, (mine, theirs) in checks.items():
        MEASURED[f"loss.{name}"] = assert_close(mine, theirs, TOLERANCES["loss"], f"loss {name}")


# --- checkpoints and the params tree ------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForCausalLM", "ForQuestionAnswering"])
def test_save_pretrained_loads_in_transformers(pairs, head, tmp_path):
    _, _, fx = pairs[head]
    # perturb the params so the round trip cannot pass by re-reading the original file
    params = jax.tree_util.tree_map(lambda a: a + 0.01, fx.params)
    fx.save_pretrained(tmp_path, params=params)
    back, info = getattr(transformers, f"Mpt{head}").from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    kw = dict(output_hidden_states=True, output_attentions=True)
    compare(fx(IDS, MASK, params=params, **kw), run_pt(back.eval(), input_ids=IDS, attention_mask=MASK, **kw), head)


def test_untied_lm_head(tmp_path):
    cfg = make_config(tie_word_embeddings=False)
    write_checkpoint(tmp_path, cfg, "ForCausalLM", seed=5)
    pt, fx = load_pair(tmp_path, "ForCausalLM")
    assert "lm_head" in fx.params
    compare(fx(IDS, MASK), run_pt(pt, input_ids=IDS, attention_mask=MASK), "CausalLM[untied]")


def test_base_checkpoint_loads_into_head(pairs):
    pt_base, base_dir, _ = pairs["Model"]
    head, info = nzf.FlaxMptForCausalLM.from_pretrained(base_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # lm_head is tied to wte
    hidden = head(IDS, MASK, output_hidden_states=True).hidden_states[-1]
    theirs = run_pt(pt_base, input_ids=IDS, attention_mask=MASK).last_hidden_state
    assert_close(hidden, theirs, HID, "base->head", mask=MASK.astype(bool)[..., None])


@pytest.mark.parametrize("variant", ["default", "mosaic"])
def test_params_tree_equals_spec_exactly(variant):
    over = {} if variant == "default" else dict(no_bias=False, expansion_ratio=3, attn_config=dict(qk_ln=True))
    cfg = make_config(**over)
    for head in HEADS:
        fx = getattr(nzf, f"FlaxMpt{suffix(head)}")(cfg)
        want = {FLAX_LAYOUT.key(p): FLAX_LAYOUT.shape(p) for p in fx.spec}
        ids = jnp.ones((1, 3), jnp.int32)
        tree = jax.eval_shape(lambda i, fx=fx: fx.module.init(jax.random.PRNGKey(0), i), ids)
        got = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(tree["params"]).items()}
        assert got == want, f"{head}: {set(got) ^ set(want)}"
        held = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(fx.params).items()}
        assert held == want
        assert set(tree) == {"params"}


def test_signatures_follow_transformers_mpt():
    ours = list(inspect.signature(nzf.FlaxMptPreTrainedModel.__call__).parameters)
    assert ours == [
        "self",
        "input_ids",
        "attention_mask",
        "inputs_embeds",
        "past_key_values",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "params",
        "dropout_rng",
        "train",
        "logits_to_keep",
    ]
    # every argument of transformers' forward that has a meaning here (labels -> nezha_zoo.flax.losses)
    dropped = {"self", "labels", "start_positions", "end_positions", "use_cache", "cache_position", "kwargs"}
    dropped |= {"deprecated_arguments"}
    for head in HEADS:
        theirs = inspect.signature(getattr(transformers, f"Mpt{suffix(head)}").forward).parameters
        assert set(theirs) - dropped <= set(ours), head


# --- jit, training ----------------------------------------------------------------------------------


def test_jitted_optax_training_step_lowers_the_loss():
    cfg = make_config(attn_config=dict(attn_pdrop=0.1))
    fx = nzf.FlaxMptForCausalLM(cfg, seed=0)
    tx = optax.adam(3e-3)
    labels = np.where(MASK == 1, IDS, -100)

    @jax.jit
    def train_step(params, opt_state, rng):
        def loss_fn(p):
            logits = fx(IDS, MASK, params=p, dropout_rng=rng, train=True).logits
            return L.causal_lm_loss(logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = fx.params, tx.init(fx.params)
    history = []
    for i in range(25):
        params, opt_state, loss = train_step(params, opt_state, jax.random.key(i, impl="rbg"))
        history.append(float(loss))
    assert np.isfinite(history).all()
    assert np.mean(history[-3:]) < 0.5 * np.mean(history[:3]), history
    # dropout is live in train mode and off in eval mode
    a = fx(IDS, MASK, dropout_rng=jax.random.key(1, impl="rbg"), train=True).logits
    b = fx(IDS, MASK, dropout_rng=jax.random.key(2, impl="rbg"), train=True).logits
    assert float(jnp.abs(a - b).max()) > 0
    with op_by_op(fx):  # one path for both calls: the wrapper compiles a signature at its second call
        assert_close(fx(IDS, MASK).logits, fx(IDS, MASK).logits, 0.0, "eval is deterministic")


def test_token_classification_dropout_rate_follows_transformers():
    # classifier_dropout, else hidden_dropout, else 0.1 (MptForTokenClassification)
    assert classifier_dropout_rate(make_config()) == 0.1
    assert classifier_dropout_rate(make_config(hidden_dropout=0.2)) == 0.2
    assert classifier_dropout_rate(make_config(hidden_dropout=0.2, classifier_dropout=0.3)) == 0.3
    pt = transformers.MptForTokenClassification(transformers.MptConfig(**TINY, hidden_dropout=0.2))
    assert pt.dropout.p == 0.2


def test_gradient_checkpointing_gives_equal_gradients():
    cfg = make_config()
    plain = nzf.FlaxMptForTokenClassification(cfg, seed=3)
    remat = nzf.FlaxMptForTokenClassification(cfg, seed=3, gradient_checkpointing=True)
    labels = np.where(MASK == 1, IDS % 3, -100)

    def grad(model):
        def f(p):
            return L.token_classification_loss(model.module.apply({"params": p}, IDS, MASK).logits, labels)

        return jax.jit(jax.value_and_grad(f))(plain.params)

    (l1, g1), (l2, g2) = grad(plain), grad(remat)
    assert_close(l1, l2, TOLERANCES["loss"], "loss under remat")
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert_close(a, b, 1e-6, "grad under remat")


# --- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(pairs):
    _, _, fx = pairs["ForCausalLM"]
    ids = IDS[:, :3]
    cases = {
        "outside the vocabulary": dict(input_ids=np.array([[5, 99, 7]])),
        "outside the vocabulary ": dict(input_ids=np.array([[5, -1, 7]])),
        "exceeds the model's max_seq_len": dict(input_ids=np.ones((1, 17), np.int64)),
        "attention_mask has shape": dict(input_ids=ids, attention_mask=np.ones((2, 4))),
        "not both": dict(input_ids=ids, inputs_embeds=np.zeros((2, 3, 32), np.float32)),
        "give input_ids or inputs_embeds": dict(),
    }
    for msg, kwargs in cases.items():
        with pytest.raises(InputError, match=msg.strip()):
            fx(**kwargs)
    with pytest.raises(TypeError, match="token_type_ids"):
        fx(ids, token_type_ids=np.zeros_like(ids))
    cache = fx.init_cache(2, 4)
    with pytest.raises(InputError, match="overflow the cache"):
        fx(IDS[:, :5], np.ones((2, 4)), past_key_values=cache)
    with pytest.raises(InputError, match="cover the cache"):
        fx(ids, np.ones((2, 3)), past_key_values=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        fx.init_cache(1, 17)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        fx.init_cache(1, 0)
    with pytest.raises(InputError, match="takes no past_key_values"):
        pairs["ForTokenClassification"][2](ids, past_key_values=cache)
    with pytest.raises(ValueError, match="init_cache needs a decoder class"):
        pairs["ForQuestionAnswering"][2].init_cache(1, 4)
    # the plain module checks too (eager apply)
    with pytest.raises(InputError, match="outside the vocabulary"):
        fx.module.apply({"params": fx.params}, np.array([[5, 99, 7]]))
