"""Keras 3 MPT vs transformers 4.57.6 PyTorch and an independent numpy MPT: numerics, MosaicML
fields, both caches (eager and XLA), losses, checkpoints, fit, errors."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
keras = pytest.importorskip("keras")

import nezha_zoo.tf as ztf  # noqa: E402
from benchmarks.precision import _hlo_dots  # noqa: E402
from nezha_zoo import MptConfig  # noqa: E402
from nezha_zoo.families.mpt import MPT, mpt_spec  # noqa: E402
from nezha_zoo.pretrained import random_weights, save_weights  # noqa: E402
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision  # noqa: E402
from nezha_zoo.tf.cache import KVCache  # noqa: E402
from nezha_zoo.tf.mpt import alibi_slopes  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.hf]

HEADS = ("Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
TINY = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=99, max_seq_len=24, pad_token_id=0)
HIDDEN, LOGITS = TOLERANCES["hidden"], TOLERANCES["logits"]
PAD = 0
MEASURED: dict[str, float] = {}  # worst differences seen, printed at the end with -s


@pytest.fixture(scope="module", autouse=True)
def _pin():
    pin_precision("tf")
    pin_precision("pt")
    yield
    if MEASURED:
        logging.getLogger("nezha_zoo.tests").info("max-abs: %s", MEASURED)
        print("\nmax-abs:", {k: f"{v:.1e}" for k, v in sorted(MEASURED.items())})


def _record(name: str, diff: float) -> None:
    MEASURED[name] = max(MEASURED.get(name, 0.0), diff)


def _config(**kw) -> MptConfig:
    attn = kw.pop("attn_config", {})
    return MptConfig(**{**TINY, **kw}, attn_config=attn)


def _weights(cfg: MptConfig, head: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded canonical weights, every tensor moved off its structured init (LN 1, biases 0)."""
    w = random_weights(mpt_spec(cfg, head), cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    return {k: (v + rng.normal(0.0, 0.1, size=v.shape)).astype(np.float32) for k, v in w.items()}


def _save(path, cfg: MptConfig, head: str, weights: dict[str, np.ndarray]):
    save_weights(path, cfg, mpt_spec(cfg, head), MPT, weights)
    return path


def _pt(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


def _ids(seed: int = 0, batch: int = 2, seq_len: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 99, size=(batch, seq_len)).astype(np.int64)


def _padded(seed: int = 0):
    """Row 0 right-padded (2 pads), row 1 left-padded (3 pads); pads hold PAD."""
    ids = _ids(seed)
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    mask[1, :3] = 0
    return np.where(mask == 1, ids, PAD), mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per head: a checkpoint written from seeded weights, transformers' model and ours loaded from it."""
    root = tmp_path_factory.mktemp("mpt")
    cfg = _config()
    out = {}
    for i, head in enumerate(HEADS):
        path = _save(root / head, cfg, head, _weights(cfg, head, seed=i))
        pt = getattr(transformers, f"Mpt{head}").from_pretrained(path).eval()
        out[head] = (path, pt, getattr(ztf, f"TFMpt{head}").from_pretrained(path))
    return out


def _compare(head: str, mine, ref, what: str, mask=None) -> None:
    ref_keys = [k for k in ref.keys() if ref[k] is not None]
    assert list(mine.keys()) == ref_keys, (list(mine.keys()), ref_keys)
    for key in ref_keys:
        a, b = mine[key], ref[key]
        if key == "past_key_values":
            b = b.to_legacy_cache()
            assert len(a) == len(b)
            for x, y in zip(a, b):
                for s, t in zip(x, y):
                    _record(f"{head}.{key}", assert_close(s, t, HIDDEN, f"{head}.{key} ({what})"))
        elif isinstance(b, tuple):
            assert len(a) == len(b)
            for i, (x, y) in enumerate(zip(a, b)):
                _record(f"{head}.{key}", assert_close(x, y, HIDDEN, f"{head}.{key}[{i}] ({what})"))
        else:
            tol = HIDDEN if key == "last_hidden_state" else LOGITS
            _record(f"{head}.{key}", assert_close(a, b, tol, f"{head}.{key} ({what})"))


# --- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"no_bias": False, "expansion_ratio": 2},
        {"attn_config": {"attn_type": "multiquery_attention", "qk_ln": True}},
        {"tie_word_embeddings": False},
    ],
)
@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec(head, kw):
    model = getattr(ztf, f"TFMpt{head}")(_config(**kw), seed=0)
    by_key = model.variables_by_key()
    assert set(by_key) == {LAYOUTS["keras"].key(p) for p in model.spec}
    for p in model.spec:  # stored shapes follow the layout (dense kernels transposed)
        assert tuple(by_key[LAYOUTS["keras"].key(p)].shape) == LAYOUTS["keras"].shape(p)
    assert len(model.trainable_weights) == len(model.spec)


def test_alibi_slopes_as_transformers():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    np.testing.assert_array_equal(alibi_slopes(4), [1 / 4, 1 / 16, 1 / 64, 1 / 256])
    np.testing.assert_array_equal(alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    for heads, bias_max in ((4, 8), (6, 8), (5, 3), (16, 8)):
        ref = build_mpt_alibi_tensor(heads, 3, bias_max)[:, 0, 0].numpy() / -2.0  # column 0: offset -2
        np.testing.assert_allclose(alibi_slopes(heads, bias_max), ref, rtol=1e-7)
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


# --- numerics vs transformers PyTorch ---------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_matches_transformers(head, checkpoints):
    _, pt, model = checkpoints[head]
    ids, mask = _padded()
    cache = {} if head == "ForQuestionAnswering" else {"use_cache": head == "ForCausalLM"}
    with torch.no_grad():
        ref = pt(
            input_ids=_pt(ids), attention_mask=_pt(mask), output_hidden_states=True, output_attentions=True, **cache
        )
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, **cache)
    _compare(head, out, ref, "right + left padding")
    # Optional inputs left out: mask of ones, use_cache from the config (False).
    ids = _ids(1)
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids))
    _compare(head, model(ids), ref, "defaults")


def test_left_padding_equals_unpadded(checkpoints):
    _, _, model = checkpoints["ForCausalLM"]
    ids = _ids(2, batch=1, seq_len=5)
    plain = model(ids).logits.numpy()
    padded_ids = np.concatenate([np.full((1, 3), PAD), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones((1, 5), np.int64)], axis=1)
    padded = model(padded_ids, attention_mask=mask).logits.numpy()
    _record("left_padding", assert_close(padded[:, 3:], plain, LOGITS, "left-padded vs unpadded"))


def test_six_heads_alibi_matches_transformers(tmp_path):
    cfg = _config(d_model=24, n_heads=6)
    path = _save(tmp_path, cfg, "ForCausalLM", _weights(cfg, "ForCausalLM", seed=7))
    pt = transformers.MptForCausalLM.from_pretrained(path).eval()
    model = ztf.TFMptForCausalLM.from_pretrained(path)
    ids, mask = _padded(3)
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids), attention_mask=_pt(mask), output_attentions=True)
    _compare("ForCausalLM[6 heads]", model(ids, attention_mask=mask, output_attentions=True), ref, "6 heads")


def test_inputs_embeds_match_transformers(checkpoints):
    _, pt, model = checkpoints["Model"]
    ids, mask = _padded(4)
    embeds = np.random.default_rng(0).normal(size=(2, 7, 32)).astype(np.float32)
    with torch.no_grad():
        ref = pt(inputs_embeds=_pt(embeds), attention_mask=_pt(mask))
    _compare("Model[embeds]", model(inputs_embeds=embeds, attention_mask=mask), ref, "inputs_embeds")


def test_sequence_classification_pooling(checkpoints, tmp_path):
    path, pt, model = checkpoints["ForSequenceClassification"]
    # A pad id inside a row: transformers pools the rightmost non-pad token, so do we.
    ids = _ids(5)
    ids[0, 6] = PAD
    ids[1, 2] = PAD
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids))
    _compare("ForSequenceClassification[pad inside]", model(ids), ref, "pooling")
    # No pad_token_id: one row is fine (last position), more is refused as transformers does.
    pt_nopad = transformers.MptForSequenceClassification.from_pretrained(path, pad_token_id=None).eval()
    nopad = ztf.TFMptForSequenceClassification.from_pretrained(path, pad_token_id=None)
    with torch.no_grad():
        ref = pt_nopad(input_ids=_pt(ids[:1]))
    _compare("ForSequenceClassification[no pad]", nopad(ids[:1]), ref, "no pad id")
    with pytest.raises(ValueError, match="padding token"):
        nopad(ids)


def test_untied_lm_head_matches_transformers(tmp_path):
    cfg = _config(tie_word_embeddings=False)
    path = _save(tmp_path, cfg, "ForCausalLM", _weights(cfg, "ForCausalLM", seed=8))
    assert "lm_head.weight" in {p.name for p in mpt_spec(cfg, "ForCausalLM")}
    pt = transformers.MptForCausalLM.from_pretrained(path).eval()
    model = ztf.TFMptForCausalLM.from_pretrained(path)
    ids, mask = _padded(6)
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids), attention_mask=_pt(mask))
    _compare("ForCausalLM[untied]", model(ids, attention_mask=mask), ref, "untied lm_head")


# --- MosaicML fields: an independent numpy MPT ------------------------------------------------------

_erf = np.vectorize(math.erf)


def numpy_mpt_logits(cfg: MptConfig, w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """llm-foundry's MPT causal LM in float64 numpy, written from its definition: pre-LN blocks,
    fused Wqkv (clip, q/k LayerNorm, multi-query), ALiBi as ``-slope * (i - j)``, exact GELU."""
    ac = cfg.attn_config
    w = {k: v.astype(np.float64) for k, v in w.items()}
    d, heads = cfg.d_model, cfg.n_heads
    hd = d // heads
    kv_heads = 1 if ac.attn_type == "multiquery_attention" else heads

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * w[f"{name}.weight"] + w.get(f"{name}.bias", 0.0)

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)

    p2 = 2 ** math.ceil(math.log2(heads))
    slopes = [2.0 ** (-(k + 1) * ac.alibi_bias_max / p2) for k in range(p2)]
    if p2 != heads:
        slopes = (slopes[1::2] + slopes[::2])[:heads]
    slopes = np.array(slopes)[:, None, None]  # (H, 1, 1)
    b, n = ids.shape
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    alibi = -slopes * (i - j)  # (H, L, L): distance-based, equal under softmax to transformers' form
    visible = (j <= i)[None, None] & (mask[:, None, None, :] == 1)  # (B, 1, L, L)
    scale = ac.softmax_scale if ac.softmax_scale is not None else 1.0 / math.sqrt(hd)
    x = w["transformer.wte.weight"][ids]
    for layer in range(cfg.n_layers):
        p = f"transformer.blocks.{layer}"
        qkv = linear(ln(x, f"{p}.norm_1"), f"{p}.attn.Wqkv")
        if ac.clip_qkv:
            qkv = np.clip(qkv, -ac.clip_qkv, ac.clip_qkv)
        q, k, v = qkv[..., :d], qkv[..., d : d + kv_heads * hd], qkv[..., d + kv_heads * hd :]
        if ac.qk_ln:
            q, k = ln(q, f"{p}.attn.q_ln"), ln(k, f"{p}.attn.k_ln")
        q = q.reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
        k = k.reshape(b, n, kv_heads, hd).transpose(0, 2, 1, 3)
        v = v.reshape(b, n, kv_heads, hd).transpose(0, 2, 1, 3)
        s = q @ k.transpose(0, 1, 3, 2) * scale + alibi
        s = np.where(visible, s, -1e30)
        probs = np.exp(s - s.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + linear(ctx, f"{p}.attn.out_proj")
        up = linear(ln(x, f"{p}.norm_2"), f"{p}.ffn.up_proj")
        x = x + linear(0.5 * up * (1.0 + _erf(up / math.sqrt(2.0))), f"{p}.ffn.down_proj")
    logits = ln(x, "transformer.norm_f") @ w["transformer.wte.weight"].T
    if cfg.logit_scale is not None:
        logits = logits * (1.0 / math.sqrt(d) if cfg.logit_scale == "inv_sqrt_d_model" else cfg.logit_scale)
    return logits


VARIANTS = {
    "expansion_ratio": {"expansion_ratio": 2},
    "no_bias": {"no_bias": False},
    "alibi_bias_max": {"attn_config": {"alibi_bias_max": 4}},
    "clip_qkv": {"attn_config": {"clip_qkv": 0.3}},
    "qk_ln": {"attn_config": {"qk_ln": True}},
    "softmax_scale": {"attn_config": {"softmax_scale": 0.9}},
    "multiquery": {"attn_config": {"attn_type": "multiquery_attention"}},
    "logit_scale": {"logit_scale": 2.5},
    "logit_scale_inv_sqrt": {"logit_scale": "inv_sqrt_d_model"},
}


def _default_equivalent(name: str, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights of a default-config MPT that computes what the variant computes (multi-query: the one
    key/value head tiled to every head; expansion_ratio 2: zero-padded to transformers' 4x MLP)."""
    out = dict(w)
    d, hd, heads = TINY["d_model"], TINY["d_model"] // TINY["n_heads"], TINY["n_heads"]
    for layer in range(TINY["n_layers"]):
        p = f"transformer.blocks.{layer}"
        if name == "multiquery":
            wqkv = w[f"{p}.attn.Wqkv.weight"]  # (d + 2 * hd, d)
            q, k, v = wqkv[:d], wqkv[d : d + hd], wqkv[d + hd :]
            out[f"{p}.attn.Wqkv.weight"] = np.concatenate([q, np.tile(k, (heads, 1)), np.tile(v, (heads, 1))])
        elif name == "expansion_ratio":
            up, down = w[f"{p}.ffn.up_proj.weight"], w[f"{p}.ffn.down_proj.weight"]  # (2d, d), (d, 2d)
            out[f"{p}.ffn.up_proj.weight"] = np.concatenate([up, np.zeros_like(up)])
            out[f"{p}.ffn.down_proj.weight"] = np.concatenate([down, np.zeros_like(down)], axis=1)
    return out


@pytest.fixture(scope="module")
def default_lm(tmp_path_factory):
    cfg = _config()
    w = _weights(cfg, "ForCausalLM", seed=20)
    path = _save(tmp_path_factory.mktemp("mpt_default"), cfg, "ForCausalLM", w)
    return cfg, w, ztf.TFMptForCausalLM.from_pretrained(path), path


def test_numpy_reference_equals_transformers_at_defaults(default_lm):
    cfg, w, model, path = default_lm
    ids, mask = _padded(9)
    pt = transformers.MptForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids), attention_mask=_pt(mask)).logits.numpy()
    real = mask[:, :, None] == 1
    mine = numpy_mpt_logits(cfg, w, ids, mask)
    _record("numpy_ref_vs_transformers", assert_close(mine, ref, LOGITS, "numpy reference", mask=real))
    assert_close(model(ids, attention_mask=mask).logits, ref, LOGITS, "tf at defaults")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mosaicml_field_matches_numpy_reference(name, default_lm, tmp_path):
    base_cfg = default_lm[0]
    cfg = _config(**VARIANTS[name])
    w = _weights(cfg, "ForCausalLM", seed=30)
    model = ztf.TFMptForCausalLM.from_pretrained(_save(tmp_path / "v", cfg, "ForCausalLM", w))
    ids, mask = _padded(10)
    real = mask[:, :, None] == 1
    out = model(ids, attention_mask=mask).logits.numpy()
    ref = numpy_mpt_logits(cfg, w, ids, mask)
    _record(f"mosaicml.{name}", assert_close(out, ref, LOGITS, f"{name} vs numpy", mask=real))
    same_shapes = {p.name: p.shape for p in mpt_spec(cfg, "ForCausalLM")} == {
        p.name: p.shape for p in mpt_spec(base_cfg, "ForCausalLM")
    }
    if same_shapes:  # value-only fields: the default config on the same weights gives other numbers
        default = ztf.TFMptForCausalLM.from_pretrained(tmp_path / "v", config=base_cfg)
        moved = float(
            np.abs(default(ids, attention_mask=mask).logits.numpy() - out)[np.broadcast_to(real, out.shape)].max()
        )
        assert moved > 1e-3, (name, moved)
    elif name in ("no_bias", "qk_ln"):  # the extra tensors matter: dropping them changes the output
        dropped = {k: v for k, v in w.items() if not (k.endswith(".bias") or ".q_ln." in k or ".k_ln." in k)}
        plain = numpy_mpt_logits(base_cfg, dropped, ids, mask)
        assert float(np.abs(plain - out)[np.broadcast_to(real, out.shape)].max()) > 1e-3
    else:  # multi-query / narrower MLP == transformers on the equivalent default-config weights
        equiv = _default_equivalent(name, w)
        path = _save(tmp_path / "equiv", base_cfg, "ForCausalLM", equiv)
        pt = transformers.MptForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            theirs = pt(input_ids=_pt(ids), attention_mask=_pt(mask)).logits.numpy()
        _record(f"mosaicml.{name}_vs_transformers", assert_close(out, theirs, LOGITS, f"{name} vs transformers"))
    if name in ("clip_qkv", "softmax_scale"):  # transformers reads these two itself
        pt = transformers.MptForCausalLM.from_pretrained(tmp_path / "v").eval()
        with torch.no_grad():
            theirs = pt(input_ids=_pt(ids), attention_mask=_pt(mask)).logits.numpy()
        _record(f"mosaicml.{name}_vs_transformers", assert_close(out, theirs, LOGITS, f"{name} vs transformers"))


# --- caches ----------------------------------------------------------------------------------------


def _growing_decode(model, ids, mask, prefix: int):
    first = model(ids[:, :prefix], attention_mask=mask[:, :prefix], use_cache=True)
    logits, past = [first.logits], first.past_key_values
    for t in range(prefix, ids.shape[1]):
        step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=past, use_cache=True)
        logits.append(step.logits)
        past = step.past_key_values
    return np.concatenate([x.numpy() for x in logits], axis=1), first.past_key_values, past


@pytest.mark.parametrize("variant", ["default", "multiquery"])
def test_growing_cache_equals_full_and_transformers(variant, checkpoints, tmp_path):
    if variant == "default":
        _, pt, model = checkpoints["ForCausalLM"]
    else:
        cfg = _config(attn_config={"attn_type": "multiquery_attention", "qk_ln": True})
        model = ztf.TFMptForCausalLM.from_pretrained(_save(tmp_path, cfg, "ForCausalLM", _weights(cfg, "ForCausalLM")))
        pt = None
    ids, mask = _padded(11)
    full = model(ids, attention_mask=mask).logits.numpy()
    cached, prefix_past, past = _growing_decode(model, ids, mask, prefix=4)
    real = mask[:, :, None] == 1  # a fully masked (pad) query row is uniform over different key sets
    _record(f"growing_cache[{variant}]", assert_close(cached, full, LOGITS, "cached vs full", mask=real))
    kv_heads = 1 if variant == "multiquery" else 4
    assert len(past) == 2 and all(len(layer) == 2 for layer in past)
    assert tuple(past[0][0].shape) == (2, kv_heads, 7, 8)
    if pt is not None:  # transformers continues from our cache
        from transformers.cache_utils import DynamicCache

        legacy = tuple(tuple(torch.from_numpy(t.numpy()) for t in layer) for layer in prefix_past)
        with torch.no_grad():
            ref = pt(
                input_ids=_pt(ids[:, 4:5]),
                attention_mask=_pt(mask[:, :5]),
                past_key_values=DynamicCache.from_legacy_cache(legacy),
                use_cache=True,
            )
        assert_close(cached[:, 4:5], ref.logits, LOGITS, "cached step vs transformers", mask=real[:, 4:5])
    with pytest.raises(InputError, match="attention_mask"):
        model(ids[:, 4:5], attention_mask=mask[:, :4], past_key_values=prefix_past)


def test_growing_cache_under_tf_function_with_unknown_shapes(checkpoints):
    """One trace serves every step: cached length, batch and mask width unknown at trace time."""
    _, _, model = checkpoints["ForCausalLM"]
    ids = _ids(22)
    full = model(ids).logits.numpy()
    kv = tf.TensorSpec((None, 4, None, 8), tf.float32)
    signature = [tf.TensorSpec((None, None), tf.int64), tf.TensorSpec((None, None), tf.int64), ((kv, kv),) * 2]

    @tf.function(input_signature=signature)
    def step(token, mask, past):
        out = model(token, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.logits, out.past_key_values

    first = model(ids[:, :3], use_cache=True)
    logits, past = [first.logits.numpy()], first.past_key_values
    for t in range(3, 7):
        out, past = step(tf.constant(ids[:, t : t + 1]), tf.ones((2, t + 1), tf.int64), past)
        logits.append(out.numpy())
    assert_close(np.concatenate(logits, axis=1), full, LOGITS, "traced growing cache vs full")
    assert step.experimental_get_tracing_count() == 1


def _fixed_decode(model, ids, mask, prefix: int, max_length: int, step_fn=None):
    """Prompt then one token per step into a fixed cache; the mask covers all max_length slots."""
    batch, n = ids.shape
    slots = np.zeros((batch, max_length), np.int64)
    cache = model.init_cache(batch, max_length)
    call = step_fn or (lambda i, m, c: model(i, attention_mask=m, past_key_values=c, use_cache=True))
    logits = []
    for start, stop in [(0, prefix)] + [(t, t + 1) for t in range(prefix, n)]:
        slots[:, start:stop] = mask[:, start:stop]
        out = call(tf.constant(ids[:, start:stop]), tf.constant(slots), cache)
        logits.append(out["logits"].numpy())
        cache = out["past_key_values"]
    return np.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("variant", ["default", "multiquery"])
def test_fixed_cache_equals_full_and_compiles(variant, checkpoints, tmp_path):
    if variant == "default":
        _, _, model = checkpoints["ForCausalLM"]
    else:
        cfg = _config(attn_config={"attn_type": "multiquery_attention"}, no_bias=False)
        model = ztf.TFMptForCausalLM.from_pretrained(_save(tmp_path, cfg, "ForCausalLM", _weights(cfg, "ForCausalLM")))
    ids, mask = _padded(12)
    real = mask[:, :, None] == 1
    full = model(ids, attention_mask=mask).logits.numpy()
    eager, cache = _fixed_decode(model, ids, mask, prefix=4, max_length=10)
    _record(f"fixed_cache[{variant}]", assert_close(eager, full, LOGITS, "fixed cache vs full", mask=real))
    kv_heads = 1 if variant == "multiquery" else 4
    assert all(isinstance(c, KVCache) for c in cache) and len(cache) == 2
    assert tuple(cache[0].key.shape) == (2, kv_heads, 10, 8) and int(cache[0].index) == 7
    np.testing.assert_array_equal(cache[0].key.numpy()[:, :, 7:], 0.0)  # slots not yet written
    # One decode step under XLA equals eager; shapes are static so every step reuses one trace.
    step = tf.function(lambda i, m, c: model(i, attention_mask=m, past_key_values=c, use_cache=True), jit_compile=True)
    compiled, jit_cache = _fixed_decode(model, ids, mask, prefix=4, max_length=10, step_fn=step)
    _record(f"fixed_cache_xla[{variant}]", assert_close(compiled, eager, HIDDEN, "xla vs eager", mask=real))
    for a, b in zip(jit_cache, cache):
        assert_close(a.key, b.key, HIDDEN, "xla cache keys")
        assert int(a.index) == int(b.index)
    assert step.experimental_get_tracing_count() == 2  # the prompt shape and the one-token shape


def test_fixed_cache_errors(checkpoints):
    _, _, model = checkpoints["ForCausalLM"]
    ids = _ids(13, seq_len=3)
    cache = model.init_cache(2, 6)
    with pytest.raises(InputError, match="max_length"):
        model(ids, attention_mask=np.ones((2, 3)), past_key_values=cache, use_cache=True)
    with pytest.raises(InputError, match="max_length"):
        model(_ids(13, seq_len=7), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.init_cache(2, 25)
    with pytest.raises(ValueError, match="batch_size"):
        model.init_cache(0, 6)
    with pytest.raises(ValueError, match="max_length"):
        model.init_cache(2, 2.5)
    with pytest.raises(InputError, match="past_key_values"):
        model(ids, past_key_values=cache[:1], use_cache=True)
    almost_full = tuple(c._replace(index=tf.constant(4)) for c in cache)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_length"):  # writing past the last slot
        model(_ids(13, seq_len=4), past_key_values=almost_full, use_cache=True)


def test_base_model_caches(checkpoints):
    _, pt, model = checkpoints["Model"]
    ids = _ids(14)
    out = model(ids, use_cache=True)
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids), use_cache=True)
    _compare("Model[cache]", out, ref, "use_cache")
    cache = model.init_cache(2, 7)
    fixed = model(ids, past_key_values=cache, use_cache=True)
    assert_close(fixed.last_hidden_state, out.last_hidden_state, HIDDEN, "fixed cache, full prompt")
    assert_close(fixed.past_key_values[1].value, out.past_key_values[1][1], HIDDEN, "cache values")
    # Without a mask, empty slots stay hidden by causality (they lie after every query).
    roomy = model(ids, past_key_values=model.init_cache(2, 12), use_cache=True)
    assert_close(roomy.last_hidden_state, out.last_hidden_state, HIDDEN, "fixed cache with empty slots")


# --- losses ---------------------------------------------------------------------------------------


def _loss_pair(pt, model, inputs, **labels):
    pt.config.problem_type = None  # transformers stores the inferred type on the config
    with torch.no_grad():
        ref = pt(**{k: _pt(v) for k, v in {**inputs, **labels}.items()})
    return model(**inputs, **labels), ref


@pytest.mark.parametrize(
    "head,kind",
    [
        ("ForCausalLM", "lm"),
        ("ForTokenClassification", "tok"),
        ("ForQuestionAnswering", "qa"),
        ("ForSequenceClassification", "single"),
        ("ForSequenceClassification", "multi"),
    ],
)
def test_losses_match_transformers(head, kind, checkpoints):
    _, pt, model = checkpoints[head]
    ids, mask = _padded(15)
    rng = np.random.default_rng(5)
    if kind == "lm":
        lab = np.where(mask == 1, ids, -100)
        kw = {"labels": lab}
    elif kind == "tok":
        lab = rng.integers(0, 2, size=(2, 7))
        lab[0, :2] = -100
        kw = {"labels": lab}
    elif kind == "qa":  # one position past the end: clamped to L and ignored
        kw = {"start_positions": np.array([3, 40]), "end_positions": np.array([5, 1])}
    elif kind == "single":
        kw = {"labels": np.array([1, 0])}
    else:
        kw = {"labels": rng.integers(0, 2, size=(2, 2)).astype(np.float32)}
    out, ref = _loss_pair(pt, model, {"input_ids": ids, "attention_mask": mask}, **kw)
    assert out.loss.shape == ()
    _record(f"{head}.loss[{kind}]", assert_close(out.loss, ref.loss, LOGITS, f"{head} loss"))


def test_regression_loss(tmp_path):
    cfg = _config(num_labels=1)
    path = _save(tmp_path, cfg, "ForSequenceClassification", _weights(cfg, "ForSequenceClassification", seed=4))
    pt = transformers.MptForSequenceClassification.from_pretrained(path).eval()
    model = ztf.TFMptForSequenceClassification.from_pretrained(path)
    ids, mask = _padded(16)
    out, ref = _loss_pair(
        pt, model, {"input_ids": ids, "attention_mask": mask}, labels=np.array([0.5, -1.25], np.float32)
    )
    _record("ForSequenceClassification.loss[regression]", assert_close(out.loss, ref.loss, LOGITS, "mse"))


# --- conventions, checkpoints, training, errors ------------------------------------------------------


def test_four_input_conventions_agree(checkpoints):
    _, _, model = checkpoints["ForSequenceClassification"]
    ids, mask = _padded(17)
    kw = model(input_ids=ids, attention_mask=mask).logits
    for other in (
        model([ids, None, mask]).logits,
        model({"input_ids": ids, "attention_mask": mask}).logits,
        model(tf.constant(ids), attention_mask=mask).logits,
    ):
        assert_close(other, kw, 0.0, "convention")
    tup = model(ids, attention_mask=mask, labels=np.array([1, 0]), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2
    assert_close(tup[1], kw, 0.0, "tuple logits")


@pytest.mark.parametrize("head", ["ForCausalLM", "Model"])
def test_save_pretrained_loads_in_transformers(head, checkpoints, tmp_path):
    _, _, model = checkpoints[head]
    model.save_pretrained(tmp_path)
    pt = getattr(transformers, f"Mpt{head}").from_pretrained(tmp_path).eval()
    ids, mask = _padded(18)
    with torch.no_grad():
        ref = pt(input_ids=_pt(ids), attention_mask=_pt(mask))
    _compare(head, model(ids, attention_mask=mask), ref, "round trip")
    again = type(model).from_pretrained(tmp_path, strict=True)
    for k, v in model.variables_by_key().items():
        np.testing.assert_array_equal(again.variables_by_key()[k].numpy(), v.numpy())


def test_base_checkpoint_loads_into_head(checkpoints):
    path, _, base = checkpoints["Model"]
    head, info = ztf.TFMptForTokenClassification.from_pretrained(path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert info["unexpected_keys"] == []
    base_vars = base.variables_by_key()
    for k, v in head.variables_by_key().items():
        if k.startswith("transformer/"):
            np.testing.assert_array_equal(v.numpy(), base_vars[k[len("transformer/") :]].numpy())


def test_compile_fit_lowers_loss():
    keras.utils.set_random_seed(0)
    model = ztf.TFMptForCausalLM(_config(), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    ids = np.tile(np.arange(2, 10)[None, :], (16, 1)) + np.random.default_rng(0).integers(0, 3, size=(16, 1))
    ds = tf.data.Dataset.from_tensor_slices({"input_ids": ids, "labels": ids}).batch(8)
    hist = model.fit(ds, epochs=6, shuffle=False, verbose=0).history["loss"]
    assert hist[-1] < 0.5 * hist[0], hist


def test_training_flag_controls_dropout():
    model = ztf.TFMptForTokenClassification(_config(attn_config={"attn_pdrop": 0.3}), seed=0)
    ids = _ids(19)
    a, b = model(ids).logits, model(ids, training=False).logits
    assert_close(a, b, 0.0, "eval is deterministic")
    assert float(tf.reduce_max(tf.abs(model(ids, training=True).logits - a))) > 1e-3


def test_gradient_checkpointing_gives_equal_gradients(checkpoints, monkeypatch):
    import nezha_zoo.tf.mpt as tf_mpt

    calls = []
    original = tf_mpt._checkpointed
    monkeypatch.setattr(tf_mpt, "_checkpointed", lambda *a: calls.append(1) or original(*a))
    path, _, _ = checkpoints["ForCausalLM"]
    ids, mask = _padded(20)
    labels = np.where(mask == 1, ids, -100)
    results = []
    for flag in (False, True):
        model = ztf.TFMptForCausalLM.from_pretrained(path, gradient_checkpointing=flag)
        with tf.GradientTape() as tape:
            loss = model(ids, attention_mask=mask, labels=labels, use_cache=False, training=True).loss
        results.append((loss, tape.gradient(loss, model.trainable_weights)))
    (l1, g1), (l2, g2) = results
    assert len(calls) == 2  # one recomputed block per layer, only in the checkpointed model
    assert_close(l1, l2, 1e-6, "loss")
    top = max(float(tf.reduce_max(tf.abs(g))) for g in g1)
    for a, b in zip(g1, g2):
        assert_close(a, b, TOLERANCES["grad_rel"] * top, "grad")


def test_bad_inputs_raise(checkpoints):
    _, _, model = checkpoints["ForCausalLM"]
    ids = _ids(21)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model(np.full((2, 7), 99))
    with pytest.raises(InputError, match="max_seq_len"):
        model(np.ones((1, 25), np.int64))
    with pytest.raises(InputError, match="attention_mask"):
        model(ids, attention_mask=np.ones((2, 6), np.int64))
    with pytest.raises(InputError, match="attention_mask"):
        model(ids, attention_mask=np.ones((3, 7), np.int64))
    with pytest.raises(InputError, match="not both"):
        model(input_ids=ids, inputs_embeds=np.zeros((2, 7, 32), np.float32))
    with pytest.raises(InputError, match="give input_ids or inputs_embeds"):
        model(attention_mask=np.ones((2, 7)))
    with pytest.raises(InputError, match="last dimension"):
        model(inputs_embeds=np.zeros((2, 7, 8), np.float32))
    with pytest.raises(InputError, match="past_key_values"):
        model(ids[:, :1], past_key_values=((np.zeros((2, 4, 3, 5), np.float32),) * 2,) * 2)
    with pytest.raises(TypeError, match="MptConfig"):
        ztf.TFMptModel(transformers.MptConfig())


def test_bf16_multiquery_products_under_xla_are_native_and_their_gradients_reduce_the_shared_head():
    # One key/value head broadcasts over the query heads in bf16_matmul's native form: the backward
    # products must sum the broadcast batch dims back to the key/value shape (B, 1, L, hd).
    cfg = _config(attn_config={"attn_type": "multiquery_attention"})
    bf = ztf.TFMptForCausalLM(cfg, dtype="bfloat16", seed=0)
    ref = ztf.TFMptForCausalLM(cfg, seed=0)
    for v, w in zip(bf.weights, ref.weights):
        w.assign(tf.cast(v, tf.float32))  # the same (bf16-representable) weights in float32
    ids = tf.constant(np.random.default_rng(0).integers(1, TINY["vocab_size"], (2, 7)), tf.int32)
    forward = tf.function(lambda: bf(input_ids=ids).logits, jit_compile=True)

    def loss():
        return tf.reduce_sum(tf.cast(bf(input_ids=ids, training=True).logits, tf.float32))

    def step():
        with tf.GradientTape() as tape:
            value = loss()
        return tape.gradient(value, bf.trainable_variables)

    xla_step = tf.function(step, jit_compile=True)
    dots = _hlo_dots(forward.experimental_get_compiler_ir()(stage="hlo"))
    assert set(dots) == {"bf16 x bf16 -> f32"}  # every product: q/k/v/out, FFN, attention, tied decoder
    assert _hlo_dots(xla_step.experimental_get_compiler_ir()(stage="hlo")) == {
        "bf16 x bf16 -> f32": 3 * sum(dots.values())
    }
    want = ref(input_ids=ids).logits.numpy()
    scale = float(np.abs(want).max())
    got = tf.cast(forward(), tf.float32).numpy()
    assert_close(got / scale, want / scale, TOLERANCES["bf16"], "XLA bf16 logits / max|logits|")
    grads = xla_step()
    with tf.GradientTape() as tape:  # eager: tf.matmul and TensorFlow's own gradients
        value = loss()
    eager = tape.gradient(value, bf.trainable_variables)
    for g, e, v in zip(grads, eager, bf.trainable_variables):
        assert g.shape == v.shape and g.dtype == tf.bfloat16, v.path
        g, e = tf.cast(g, tf.float32).numpy(), tf.cast(e, tf.float32).numpy()
        scale = float(np.abs(e).max()) or 1.0
        assert_close(g / scale, e / scale, TOLERANCES["bf16"], f"XLA vs eager bf16 gradient of {v.path} / max|grad|")
