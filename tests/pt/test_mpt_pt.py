"""PyTorch MPT (nezha_zoo.pt) against transformers 4.57.6 PyTorch and an independent numpy reference.

Both sides load one seeded canonical checkpoint (``random_weights`` from the spec, LayerNorm scales
perturbed so they matter, ``save_weights``), each with its own ``from_pretrained``; eval mode,
float32.  The MosaicML settings transformers ignores (``expansion_ratio``, ``no_bias``,
``alibi_bias_max``, ``clip_qkv``, ``qk_ln``, ``softmax_scale``, multi-query attention,
``logit_scale``) are checked against :func:`reference_forward`, a float64 numpy implementation of
llm-foundry's MPT written from its definition (causal ALiBi as ``-slope * (i - j)``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import nezha_zoo.pt as zoo
from nezha_zoo import MptConfig
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.pt.mpt import alibi_bias, alibi_slopes
from nezha_zoo.spec import get_family
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.param import Kind
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.pt, pytest.mark.hf]

HEADS = ("Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")

#: Tiny config.  initializer_range 0.2 so attention is far from uniform (the checkpoint is drawn with it).
TINY = dict(
    d_model=32,
    n_heads=4,
    n_layers=2,
    vocab_size=99,
    max_seq_len=16,
    pad_token_id=0,
    initializer_range=0.2,
    classifier_dropout=0.0,
)
B, L = 2, 7

HIDDEN_FIELDS = {"last_hidden_state", "hidden_states", "attentions", "past_key_values"}
MAX_DIFFS: dict[str, float] = {}
FAM = get_family("mpt")


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")
    yield
    if MAX_DIFFS:
        width = max(len(k) for k in MAX_DIFFS)
        lines = [f"  {k:<{width}}  {v:.3e}" for k, v in sorted(MAX_DIFFS.items())]
        print("\nmax-abs differences:\n" + "\n".join(lines))  # shown with pytest -s


def seeded_weights(config: MptConfig, head: str, seed: int) -> dict[str, np.ndarray]:
    """Canonical weights by the spec's rules, with norm scales and biases drawn too (so they count)."""
    spec = FAM.model_spec(config, head)
    weights = random_weights(spec, config, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    for p in spec:
        if p.kind is Kind.NORM_SCALE:
            weights[p.name] = (1.0 + 0.2 * rng.standard_normal(p.shape)).astype(np.float32)
        elif p.kind in (Kind.BIAS, Kind.NORM_BIAS):
            weights[p.name] = (0.2 * rng.standard_normal(p.shape)).astype(np.float32)
    return weights


def write_checkpoint(path: Path, config: MptConfig, head: str, weights: dict[str, np.ndarray]) -> Path:
    save_weights(str(path), config, FAM.model_spec(config, head), FAM, weights)
    return path


class Pairs:
    """(transformers model, our model, checkpoint dir) per (head, config overrides), built once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict = {}

    def get(self, head: str, **overrides):
        key = (head, json.dumps(overrides, sort_keys=True))  # overrides may hold a nested attn_config
        if key not in self.cache:
            config = MptConfig(**{**TINY, **overrides})
            path = self.root / f"{head}_{len(self.cache)}"
            write_checkpoint(path, config, head, seeded_weights(config, head, seed=len(self.cache)))
            hf = getattr(transformers, f"Mpt{head}").from_pretrained(path).eval()
            ours = getattr(zoo, f"Mpt{head}").from_pretrained(path, strict=True)
            self.cache[key] = (hf, ours, path)
        return self.cache[key]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("hf_mpt"))


def right_padded(seed: int = 0, batch: int = B, seq_len: int = L) -> dict[str, torch.Tensor]:
    x = tiny_inputs(batch=batch, seq_len=seq_len, vocab_size=TINY["vocab_size"], type_vocab_size=None, seed=seed)
    return {k: torch.from_numpy(v) for k, v in x.items()}


def left_padded(seed: int = 0) -> dict[str, torch.Tensor]:
    """Row 0 unpadded; row 1 with three padding tokens on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = TINY["pad_token_id"]
    return {"input_ids": ids, "attention_mask": mask}


def _leaves(x, prefix: str):
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def _legacy(cache):
    return cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache


def compare(hf_out, our_out, what: str, mask: torch.Tensor | None = None) -> float:
    """Same fields in the same order, every leaf within SPEC §5 (optionally only where ``mask``)."""
    ours_f, hf_f = list(our_out.keys()), list(hf_out.keys())
    assert ours_f == hf_f, f"{what}: fields {ours_f} vs {hf_f}"
    worst = 0.0
    for field in hf_f:
        tol = TOLERANCES["hidden"] if field in HIDDEN_FIELDS else TOLERANCES["logits"]
        a = list(_leaves(_legacy(hf_out[field]), field))
        b = list(_leaves(our_out[field], field))
        assert [n for n, _ in a] == [n for n, _ in b], f"{what}: structure of {field} differs"
        for (name, x), (_, y) in zip(a, b):
            m = None
            if mask is not None and field in ("last_hidden_state", "hidden_states", "logits"):
                m = mask.bool().numpy().reshape(mask.shape + (1,) * (x.dim() - 2))
            d = assert_close(y, x, tol, f"{what} {name}", mask=m)
            worst = max(worst, d)
            key = f"{what.split()[0]}.{field}"
            MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), d)
    return worst


# --- outputs equal transformers ------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers(pairs, head):
    hf, ours, _ = pairs.get(head)
    cache = {} if head == "ForQuestionAnswering" else {"use_cache": True}
    with torch.no_grad():
        for kind, inp in (("right-padded", right_padded(1)), ("left-padded", left_padded(2))):
            full = dict(inp, output_hidden_states=True, output_attentions=True, **cache)
            compare(hf(**full), ours(**full), f"{head} {kind}")
        inp = right_padded(3)
        # optional inputs left out: mask ones, no cache
        compare(hf(input_ids=inp["input_ids"]), ours(input_ids=inp["input_ids"]), f"{head} ids-only")
        full = dict(inp, output_hidden_states=True, output_attentions=True)
        t_ours = ours(**full, return_dict=False)
        assert isinstance(t_ours, tuple)
        # transformers' token-classification and QA tuples drop hidden_states (they slice the base
        # tuple from index 2 whether or not it holds a cache); ours is the output's to_tuple().
        t_hf = hf(**full).to_tuple() if head in ("ForTokenClassification", "ForQuestionAnswering") else hf(**full)[:]
        assert len(t_ours) == len(t_hf)
        for x, y in zip(_leaves(t_hf, "t"), _leaves(t_ours, "t")):
            assert_close(y[1], x[1], TOLERANCES["logits"], f"{head} tuple {x[0]}")
        out = ours(**inp)
    only = {"Model": ["last_hidden_state"], "ForQuestionAnswering": ["start_logits", "end_logits"]}
    assert list(out.keys()) == only.get(head, ["logits"])  # use_cache defaults to config.use_cache=False
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert type(torch.utils._pytree.tree_unflatten(leaves, spec)) is type(out)


def test_left_padded_row_equals_unpadded_row(pairs):
    """ALiBi depends on the key index, softmax removes the per-row offset: padding on the left is invisible."""
    _, ours, _ = pairs.get("ForCausalLM")
    _, cls, _ = pairs.get("ForSequenceClassification")
    inp = left_padded(4)
    real = inp["input_ids"][1:, 3:]
    with torch.no_grad():
        padded = ours(**inp, output_hidden_states=True)
        alone = ours(real, output_hidden_states=True)
        assert_close(padded.logits[1:, 3:], alone.logits, TOLERANCES["logits"], "left-padded logits")
        for i, (a, b) in enumerate(zip(padded.hidden_states, alone.hidden_states)):
            assert_close(a[1:, 3:], b, TOLERANCES["hidden"], f"left-padded hidden_states[{i}]")
        # sequence classification pools the last real token: the same logits padded or not
        assert_close(cls(**inp).logits[1:], cls(real).logits, TOLERANCES["logits"], "left-padded pooled")
        # right padding too: the real prefix is unaffected by what follows (causal)
        rp = right_padded(5)
        keep = int(rp["attention_mask"][1].sum())
        assert keep < L
        assert_close(
            ours(**rp).logits[1:, :keep], ours(rp["input_ids"][1:, :keep]).logits, TOLERANCES["logits"], "right-padded"
        )


def test_inputs_embeds_match(pairs):
    hf, ours, _ = pairs.get("ForCausalLM")
    inp = right_padded(6)
    embeds = ours.get_input_embeddings()(inp["input_ids"]).detach()
    with torch.no_grad():
        b = ours(inputs_embeds=embeds, attention_mask=inp["attention_mask"])
        compare(hf(inputs_embeds=embeds, attention_mask=inp["attention_mask"]), b, "ForCausalLM inputs_embeds")
        compare(ours(**inp), b, "ForCausalLM ids-vs-embeds")
    # sequence classification with embeddings pools the last position, as transformers
    hf_c, ours_c, _ = pairs.get("ForSequenceClassification")
    embeds = ours_c.get_input_embeddings()(inp["input_ids"]).detach()
    with torch.no_grad():
        compare(hf_c(inputs_embeds=embeds), ours_c(inputs_embeds=embeds), "ForSequenceClassification inputs_embeds")


def test_alibi_slopes_and_bias():
    # measured in transformers 4.57.6 (hf_implementation_notes §1.6)
    assert alibi_slopes(4).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256]
    assert alibi_slopes(6).tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for heads in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16):
        ref = build_mpt_alibi_tensor(heads, 11)  # (H, 1, 11), transformers' default max 8
        assert torch.equal(alibi_bias(alibi_slopes(heads), 11)[0], ref), heads
        for bias_max in (4, 16):  # transformers never passes another maximum, but its builder takes one
            ref = build_mpt_alibi_tensor(heads, 11, alibi_bias_max=bias_max)
            assert torch.equal(alibi_bias(alibi_slopes(heads, bias_max), 11)[0], ref), (heads, bias_max)
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


def test_six_heads_match_transformers(pairs):
    """A head count that is not a power of two: the interleaved slopes."""
    for head in ("Model", "ForCausalLM"):
        hf, ours, _ = pairs.get(head, d_model=36, n_heads=6)
        inp = right_padded(7)
        with torch.no_grad():
            full = dict(inp, output_hidden_states=True, output_attentions=True, use_cache=True)
            compare(hf(**full), ours(**full), f"{head}[6-heads]")


def test_config_fields_transformers_reads(pairs):
    """softmax_scale and clip_qkv are read by transformers too: equal at non-default values."""
    for overrides in (
        {"attn_config": {"softmax_scale": 0.7}},
        {"attn_config": {"clip_qkv": 0.3}},
        {"layer_norm_epsilon": 1e-2},
    ):
        hf, ours, _ = pairs.get("ForCausalLM", **overrides)
        inp = right_padded(8)
        with torch.no_grad():
            compare(
                hf(**inp, output_attentions=True),
                ours(**inp, output_attentions=True),
                f"ForCausalLM{json.dumps(overrides, separators=(',', ':'))}",
            )


# --- the MosaicML settings transformers ignores, against a numpy reference -----------------------


def _np_layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * w
    return y if b is None else y + b


_erf = np.vectorize(math.erf)


def reference_forward(w: dict[str, np.ndarray], cfg: MptConfig, ids: np.ndarray, mask: np.ndarray, prefix: str = ""):
    """llm-foundry's MPT forward in float64 numpy: (hidden_states list, lm logits or None).

    Written from the definition, not from our code: ALiBi in its causal form ``-slope_h * (i - j)``
    (slopes by MosaicML's ``gen_slopes``), masked positions excluded from the softmax, multi-query
    attention by sharing one key/value head, ``q_ln`` / ``k_ln`` over the whole projections.
    Rows must keep at least one visible key (no fully padded prefix).
    """
    ac = cfg.attn_config
    w = {k: v.astype(np.float64) for k, v in w.items()}
    d, H = cfg.d_model, cfg.n_heads
    hd = d // H
    kv_heads = 1 if ac.attn_type == "multiquery_attention" else H
    eps = cfg.layer_norm_epsilon

    def lin(x, name):
        y = x @ w[f"{prefix}{name}.weight"].T
        return y + w[f"{prefix}{name}.bias"] if f"{prefix}{name}.bias" in w else y

    def norm(x, name):
        return _np_layer_norm(x, w[f"{prefix}{name}.weight"], w.get(f"{prefix}{name}.bias"), eps)

    p2 = 2 ** math.ceil(math.log2(H))
    m = np.arange(1, p2 + 1) * (ac.alibi_bias_max / p2)
    slopes = 1.0 / 2.0**m
    if p2 != H:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:H]
    Bn, Ln = ids.shape
    i, j = np.arange(Ln)[:, None], np.arange(Ln)[None, :]
    alibi = -slopes[:, None, None] * (i - j)[None]  # (H, L, L)
    visible = (j <= i)[None, None] & (mask[:, None, None, :] == 1)  # (B, 1, L, L)
    scale = ac.softmax_scale if ac.softmax_scale is not None else 1.0 / math.sqrt(hd)

    x = w[f"{prefix}wte.weight"][ids]
    hidden = []
    for layer in range(cfg.n_layers):
        hidden.append(x)
        blk = f"blocks.{layer}"
        qkv = lin(norm(x, f"{blk}.norm_1"), f"{blk}.attn.Wqkv")
        if ac.clip_qkv:
            qkv = np.clip(qkv, -ac.clip_qkv, ac.clip_qkv)
        q, k, v = qkv[..., :d], qkv[..., d : d + kv_heads * hd], qkv[..., d + kv_heads * hd :]
        if ac.qk_ln:
            q, k = norm(q, f"{blk}.attn.q_ln"), norm(k, f"{blk}.attn.k_ln")
        q = q.reshape(Bn, Ln, H, hd).transpose(0, 2, 1, 3)
        k = np.repeat(k.reshape(Bn, Ln, kv_heads, hd).transpose(0, 2, 1, 3), H // kv_heads, axis=1)
        v = np.repeat(v.reshape(Bn, Ln, kv_heads, hd).transpose(0, 2, 1, 3), H // kv_heads, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) * scale + alibi[None]
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        ctx = (p @ v).transpose(0, 2, 1, 3).reshape(Bn, Ln, d)
        x = x + lin(ctx, f"{blk}.attn.out_proj")
        h = lin(norm(x, f"{blk}.norm_2"), f"{blk}.ffn.up_proj")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = x + lin(h, f"{blk}.ffn.down_proj")
    x = norm(x, "norm_f")
    hidden.append(x)
    logits = None
    if prefix:
        table = w.get("lm_head.weight", w[f"{prefix}wte.weight"])
        logits = x @ table.T
        if cfg.logit_scale is not None:
            logits = logits * (1.0 / math.sqrt(d) if cfg.logit_scale == "inv_sqrt_d_model" else cfg.logit_scale)
    return hidden, logits


MOSAIC = {
    "expansion_ratio": dict(expansion_ratio=2),
    "no_bias": dict(no_bias=False),
    "alibi_bias_max": dict(attn_config={"alibi_bias_max": 4}),
    "clip_qkv": dict(attn_config={"clip_qkv": 0.25}),
    "qk_ln": dict(attn_config={"qk_ln": True}),
    "qk_ln+no_bias": dict(no_bias=False, attn_config={"qk_ln": True}),
    "softmax_scale": dict(attn_config={"softmax_scale": 0.9}),
    "multiquery": dict(attn_config={"attn_type": "multiquery_attention"}),
    "multiquery+qk_ln": dict(attn_config={"attn_type": "multiquery_attention", "qk_ln": True}),
    "logit_scale": dict(logit_scale=0.37),
    "logit_scale=inv_sqrt_d_model": dict(logit_scale="inv_sqrt_d_model"),
    "defaults": dict(),
}


def _run(model, inp):
    with torch.no_grad():
        return model(**inp, output_hidden_states=True)


@pytest.mark.parametrize("name", list(MOSAIC))
def test_mosaicml_settings_match_reference(tmp_path, name):
    config = MptConfig(**{**TINY, **MOSAIC[name]})
    weights = seeded_weights(config, "ForCausalLM", seed=40)
    model = zoo.MptForCausalLM.from_pretrained(write_checkpoint(tmp_path / "x", config, "ForCausalLM", weights))
    inp = right_padded(41)
    out = _run(model, inp)
    hidden, logits = reference_forward(
        weights, config, inp["input_ids"].numpy(), inp["attention_mask"].numpy(), "transformer."
    )
    m = inp["attention_mask"].bool().numpy()[..., None]
    for i, (a, b) in enumerate(zip(out.hidden_states, hidden)):
        MAX_DIFFS[f"reference[{name}].hidden"] = max(
            MAX_DIFFS.get(f"reference[{name}].hidden", 0.0),
            assert_close(a, b, TOLERANCES["hidden"], f"{name} hidden_states[{i}]", mask=m),
        )
    MAX_DIFFS[f"reference[{name}].logits"] = assert_close(
        out.logits, logits, TOLERANCES["logits"], f"{name} logits", mask=m
    )

    default = MptConfig(**TINY)
    if name == "defaults":  # the reference itself agrees with transformers
        hf = transformers.MptForCausalLM.from_pretrained(tmp_path / "x").eval()
        with torch.no_grad():
            compare(hf(**inp, output_hidden_states=True), out, "reference-defaults vs transformers")
        return
    # The setting changes the numbers: the default config on the weights they share (settings that
    # reshape tensors, multi-query attention and expansion_ratio, have their own tests below).
    dspec = FAM.model_spec(default, "ForCausalLM")
    if all(weights[p.name].shape == p.shape for p in dspec if p.name in weights) and all(
        p.name in weights for p in dspec
    ):
        shared = {p.name: weights[p.name] for p in dspec}  # no_bias / qk_ln: without the extra tensors
        base = zoo.MptForCausalLM.from_pretrained(write_checkpoint(tmp_path / "d", default, "ForCausalLM", shared))
        diff = float((_run(base, inp).logits - out.logits).abs().max())
        assert diff > 1e-3, f"{name} did not change the logits ({diff:.2e})"
    else:
        assert name in ("expansion_ratio", "multiquery", "multiquery+qk_ln"), name


def test_multiquery_equals_multihead_with_shared_kv(tmp_path):
    """One key/value head == transformers' multi-head attention whose heads all hold that projection."""
    mq = MptConfig(**TINY, attn_config={"attn_type": "multiquery_attention"})
    mh = MptConfig(**TINY)
    w = seeded_weights(mq, "ForCausalLM", seed=42)
    d, hd, H = TINY["d_model"], TINY["d_model"] // TINY["n_heads"], TINY["n_heads"]
    wh = dict(w)
    for layer in range(TINY["n_layers"]):
        name = f"transformer.blocks.{layer}.attn.Wqkv.weight"
        q, k, v = w[name][:d], w[name][d : d + hd], w[name][d + hd :]
        wh[name] = np.concatenate([q, np.tile(k, (H, 1)), np.tile(v, (H, 1))])  # (d + 2hd, d) -> (3d, d)
    a = zoo.MptForCausalLM.from_pretrained(write_checkpoint(tmp_path / "mq", mq, "ForCausalLM", w))
    hf = transformers.MptForCausalLM.from_pretrained(write_checkpoint(tmp_path / "mh", mh, "ForCausalLM", wh)).eval()
    assert a.transformer.blocks[0].attn.Wqkv.weight.shape == (d + 2 * hd, d)
    inp = right_padded(43)
    with torch.no_grad():
        oa = a(**inp, use_cache=True, output_attentions=True)
        ob = hf(**inp, use_cache=True, output_attentions=True)
    assert_close(oa.logits, ob.logits, TOLERANCES["logits"], "multiquery vs transformers' shared multi-head")
    for x, y in zip(oa.attentions, ob.attentions):
        assert_close(x, y, TOLERANCES["hidden"], "multiquery attentions")
    assert oa.past_key_values[0][0].shape == (B, 1, L, hd)
    hf_past = ob.past_key_values.to_legacy_cache()
    assert_close(oa.past_key_values[1][1].expand(-1, H, -1, -1), hf_past[1][1], 1e-5, "shared values")


def test_expansion_ratio_equals_zero_padded_mlp(tmp_path):
    """expansion_ratio=2 == transformers' 4x MLP whose extra units are zero (GELU(0) = 0)."""
    small = MptConfig(**TINY, expansion_ratio=2)
    w = seeded_weights(small, "ForCausalLM", seed=65)
    d = TINY["d_model"]
    padded = dict(w)
    for layer in range(TINY["n_layers"]):
        up, down = f"transformer.blocks.{layer}.ffn.up_proj.weight", f"transformer.blocks.{layer}.ffn.down_proj.weight"
        padded[up] = np.concatenate([w[up], np.zeros((2 * d, d), np.float32)])  # (2d, d) -> (4d, d)
        padded[down] = np.concatenate([w[down], np.zeros((d, 2 * d), np.float32)], axis=1)  # (d, 2d) -> (d, 4d)
    ours = zoo.MptForCausalLM.from_pretrained(write_checkpoint(tmp_path / "x2", small, "ForCausalLM", w))
    hf = transformers.MptForCausalLM.from_pretrained(
        write_checkpoint(tmp_path / "x4", MptConfig(**TINY), "ForCausalLM", padded)
    ).eval()
    assert ours.transformer.blocks[0].ffn.up_proj.weight.shape == (2 * d, d)
    inp = right_padded(66)
    with torch.no_grad():
        compare(hf(**inp, output_hidden_states=True), ours(**inp, output_hidden_states=True), "expansion_ratio=2")


# --- key/value cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("attn_type", ["multihead_attention", "multiquery_attention"])
def test_cached_decoding_equals_full(tmp_path, attn_type):
    config = MptConfig(**TINY, attn_config={"attn_type": attn_type, "qk_ln": attn_type == "multiquery_attention"})
    weights = seeded_weights(config, "ForCausalLM", seed=44)
    model = zoo.MptForCausalLM.from_pretrained(write_checkpoint(tmp_path, config, "ForCausalLM", weights))
    inp = left_padded(45)  # padding inside the cached prefix
    ids, mask = inp["input_ids"], inp["attention_mask"]
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        step = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        logits, past = [step.logits], step.past_key_values
        kv = 1 if attn_type == "multiquery_attention" else TINY["n_heads"]
        assert len(past) == TINY["n_layers"] and past[0][0].shape == (B, kv, 4, TINY["d_model"] // TINY["n_heads"])
        for t in range(4, L):  # one token at a time
            o = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=past, use_cache=True)
            logits.append(o.logits)
            past = o.past_key_values
        assert past[0][0].shape[2] == L
        # Real positions only: a padded position sees no key, and (as in transformers) its row is then
        # uniform over every key present, which differs between a prefix and the full pass.
        real = mask.bool().numpy()[..., None]
        got = torch.cat(logits, 1)
        assert_close(got, full.logits, TOLERANCES["logits"], f"{attn_type} step-by-step vs full", mask=real)
        # a prefix then a multi-token chunk; the mask defaults to ones over cached + new positions
        first = model(ids[:1, :3], use_cache=True)
        rest = model(ids[:1, 3:], past_key_values=first.past_key_values, use_cache=True)
        assert_close(rest.logits, model(ids[:1]).logits[:, 3:], TOLERANCES["logits"], f"{attn_type} chunk vs full")


def test_append_to_cache_writes_in_place_and_keeps_every_returned_tensor():
    from nezha_zoo.pt.layers import append_to_cache

    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(2, 3, n, 4, generator=gen) for n in (5, 1, 1, 2, 1)]
    with torch.no_grad():
        past, ref, outs = steps[0], steps[0], []
        for new in steps[1:]:
            past, ref = append_to_cache(past, new), torch.cat([ref, new], dim=2)
            assert torch.equal(past, ref)
            outs.append((past, ref.clone()))
        # after the first append the steps write into one buffer: no copy of the cache per step
        assert outs[1][0].data_ptr() == outs[2][0].data_ptr() == outs[0][0].data_ptr()
        # continuing an older view (a branch) copies: every tensor handed out keeps its values
        branch = append_to_cache(outs[0][0], torch.ones(2, 3, 1, 4))
        again = append_to_cache(outs[0][0], torch.zeros(2, 3, 1, 4))
        assert torch.equal(branch[:, :, -1], torch.ones(2, 3, 4)) and torch.equal(again[:, :, -1], torch.zeros(2, 3, 4))
        for got, want in outs:
            assert torch.equal(got, want)
        # the latest view continues in place past its capacity (the buffer regrows), still equal to cat
        long = outs[-1][0]
        for _ in range(20):
            new = torch.randn(2, 3, 1, 4, generator=gen)
            ref, long = torch.cat([long, new], dim=2), append_to_cache(long, new)
            assert torch.equal(long, ref)
        with pytest.raises(RuntimeError):  # a shape torch.cat rejects is rejected, not broadcast
            append_to_cache(long, torch.zeros(1, 3, 1, 4))
    # with gradients on it is torch.cat (autograd's saved views must not change version)
    grad = torch.randn(2, 3, 1, 4, requires_grad=True)
    out = append_to_cache(outs[-1][0], grad)
    assert out._base is None and out.requires_grad


def test_select_cache_rows_gathers_into_a_buffer_the_next_append_fills_in_place():
    from nezha_zoo.pt.layers import append_to_cache, select_cache_rows

    gen = torch.Generator().manual_seed(11)
    rows = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        first = torch.randn(3, 2, 5, 4, generator=gen)
        grown = append_to_cache(first, torch.randn(3, 2, 1, 4, generator=gen))  # a view of a larger buffer
        for past in (first, grown):  # a plain tensor (after the prompt) and a cache buffer's view
            before = past.clone()
            picked = select_cache_rows(past, rows)
            assert torch.equal(picked, past.index_select(0, rows)) and torch.equal(past, before)
            new = torch.randn(4, 2, 1, 4, generator=gen)
            longer = append_to_cache(picked, new)
            assert torch.equal(longer, torch.cat([past.index_select(0, rows), new], dim=2))
            assert longer.data_ptr() == picked.data_ptr()  # appended in place: no second copy of the cache
            assert torch.equal(picked, past.index_select(0, rows))  # the gathered view kept its values
    # with gradients on it is index_select
    grad = torch.randn(3, 2, 5, 4, requires_grad=True)
    out = select_cache_rows(grad, rows)
    assert out._base is None and out.requires_grad


def test_select_cache_rows_into_a_given_buffer_and_the_beam_pool_alternates_two():
    from nezha_zoo.pt.generation import _CachePool
    from nezha_zoo.pt.layers import append_to_cache, select_cache_rows

    gen = torch.Generator().manual_seed(12)
    rows = torch.tensor([1, 1, 0])
    with torch.no_grad():
        past = torch.randn(3, 2, 5, 4, generator=gen)
        into = torch.full((3, 2, 7, 4), 7.0)
        picked = select_cache_rows(past, rows, into=into)
        assert torch.equal(picked, past.index_select(0, rows)) and picked.data_ptr() == into.data_ptr()
        longer = append_to_cache(picked, torch.randn(3, 2, 1, 4, generator=gen))
        assert longer.data_ptr() == into.data_ptr()  # the next append writes into the given buffer
        for bad in (torch.zeros(3, 2, 4, 4), torch.zeros(2, 2, 7, 4), torch.zeros(3, 2, 7, 4, dtype=torch.float64),
                    torch.zeros(3, 2, 4, 7).transpose(2, 3)):  # fmt: skip
            with pytest.raises(ValueError, match="into must be"):
                select_cache_rows(past, rows, into=bad)

        # beam search's pool: a step gathers into a free buffer and frees the one the cache lived in
        pool, ref, cache, buffers = _CachePool(capacity=10), past, past, []
        for _ in range(5):
            order = torch.randint(0, 3, (3,), generator=gen)
            cache, ref = pool.select(cache, order), ref.index_select(0, order)
            assert torch.equal(cache, ref) and cache._base.shape == (3, 2, 10, 4)
            buffers.append(cache.data_ptr())
            new = torch.randn(3, 2, 1, 4, generator=gen)
            cache, ref = append_to_cache(cache, new), torch.cat([ref, new], dim=2)
            assert torch.equal(cache, ref) and cache.data_ptr() == buffers[-1]  # appended in place
        assert len(set(buffers)) == 2 and buffers[0] == buffers[2] == buffers[4]  # two buffers, alternating


def test_cache_interoperates_with_transformers(pairs):
    from transformers.cache_utils import DynamicCache

    hf, ours, _ = pairs.get("ForCausalLM")
    inp = left_padded(46)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        # our cache -> transformers
        first = ours(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        a = hf(ids[:, 5:], attention_mask=mask, past_key_values=DynamicCache.from_legacy_cache(first.past_key_values))
        assert_close(a.logits, ref[:, 5:], TOLERANCES["logits"], "ours -> transformers cache")
        # transformers' cache (a DynamicCache) -> ours
        hf_first = hf(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        b = ours(ids[:, 5:], attention_mask=mask, past_key_values=hf_first.past_key_values, use_cache=True)
        assert_close(b.logits, ref[:, 5:], TOLERANCES["logits"], "transformers -> ours cache")
        assert isinstance(b.past_key_values, tuple) and b.past_key_values[0][0].shape[2] == L
        # the sequence-classification head returns its cache too (SequenceClassifierOutputWithPast)
        hf_c, ours_c, _ = pairs.get("ForSequenceClassification")
        compare(hf_c(**inp, use_cache=True), ours_c(**inp, use_cache=True), "ForSequenceClassification cache")


# --- losses --------------------------------------------------------------------------------------


def _labels(head: str, gen: torch.Generator, num_labels: int = 2, kind: str = "single") -> dict:
    if head == "ForCausalLM":
        labels = torch.randint(0, TINY["vocab_size"], (B, L), generator=gen)
        labels[0, :2] = -100
        return {"labels": labels}
    if head == "ForTokenClassification":
        labels = torch.randint(0, num_labels, (B, L), generator=gen)
        labels[1, 4:] = -100
        return {"labels": labels}
    if head == "ForQuestionAnswering":
        return {"start_positions": torch.tensor([1, 30]), "end_positions": torch.tensor([5, 3])}
    if kind == "regression":
        return {"labels": torch.randn(B, generator=gen)}
    if kind == "multi":
        return {"labels": torch.randint(0, 2, (B, num_labels), generator=gen).float()}
    return {"labels": torch.randint(0, num_labels, (B,), generator=gen)}


LOSS_CASES = [
    ("ForCausalLM", {}, "single"),
    ("ForTokenClassification", {}, "single"),
    ("ForQuestionAnswering", {}, "single"),
    ("ForSequenceClassification", {}, "single"),
    ("ForSequenceClassification", {"num_labels": 3}, "multi"),
    ("ForSequenceClassification", {"num_labels": 1}, "regression"),
]


@pytest.mark.parametrize("head,overrides,kind", LOSS_CASES, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_losses_match_transformers(pairs, head, overrides, kind):
    hf, ours, _ = pairs.get(head, **overrides)
    gen = torch.Generator().manual_seed(47)
    inp = right_padded(48)
    labels = _labels(head, gen, num_labels=overrides.get("num_labels", 2), kind=kind)
    hf.config.problem_type = None  # transformers caches the inferred problem type in its config
    with torch.no_grad():
        a, b = hf(**inp, **labels), ours(**inp, **labels)
        assert b.loss is not None and b.loss.dim() == 0
        assert_close(b.loss, a.loss, TOLERANCES["loss"], f"{head} loss[{kind}]")
        compare(a, b, f"{head} loss[{kind}]")
        assert_close(ours(**inp, **labels, return_dict=False)[0], a.loss, TOLERANCES["loss"], f"{head} tuple loss")
    assert ours.config.problem_type is None


def test_causal_lm_loss_is_shifted_and_takes_num_items(pairs):
    _, ours, _ = pairs.get("ForCausalLM")
    inp = right_padded(49)
    labels = _labels("ForCausalLM", torch.Generator().manual_seed(50))["labels"]
    with torch.no_grad():
        out = ours(**inp, labels=labels)
        ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 99), labels[:, 1:].reshape(-1))
        assert_close(out.loss, ref, 1e-6, "shifted CE")
        n = int((labels[:, 1:] != -100).sum())
        summed = ours(**inp, labels=labels, num_items_in_batch=2 * n).loss
        assert_close(summed, ref / 2, 1e-6, "num_items_in_batch")
    with pytest.raises(TypeError, match="unexpected"):
        ours(**inp, labels=labels, position_ids=torch.zeros(B, L, dtype=torch.long))


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_saved_checkpoint_loads_in_transformers(tmp_path, head):
    torch.manual_seed(51)
    ours = getattr(zoo, f"Mpt{head}")(MptConfig(**TINY)).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [f"Mpt{head}"]
    hf, info = getattr(transformers, f"Mpt{head}").from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inp = right_padded(52)
    with torch.no_grad():
        compare(hf.eval()(**inp, output_hidden_states=True), ours(**inp, output_hidden_states=True), f"{head} ours->hf")
    if head == "ForCausalLM":
        from safetensors import safe_open

        with safe_open(tmp_path / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in set(f.keys())  # tied: stored once
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_untied_lm_head_and_round_trip(tmp_path):
    torch.manual_seed(53)
    model = zoo.MptForCausalLM(MptConfig(**TINY, tie_word_embeddings=False)).eval()
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.get_output_embeddings() is model.lm_head
    model.save_pretrained(tmp_path)
    back = zoo.MptForCausalLM.from_pretrained(tmp_path, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    hf = transformers.MptForCausalLM.from_pretrained(tmp_path).eval()
    inp = right_padded(54)
    with torch.no_grad():
        compare(hf(**inp), model(**inp), "ForCausalLM untied")


def test_base_into_head_and_head_into_base(pairs):
    hf_clm, _, clm_dir = pairs.get("ForCausalLM")
    base, info = zoo.MptModel.from_pretrained(clm_dir, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    inp = right_padded(55)
    with torch.no_grad():
        compare(hf_clm.transformer(**inp), base(**inp), "head->base")
    _, _, base_dir = pairs.get("Model")
    head, info = zoo.MptForTokenClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    with pytest.raises(CheckpointError, match="classifier"):
        zoo.MptForTokenClassification.from_pretrained(base_dir, strict=True)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.up_proj\.weight"):
        zoo.MptModel.from_pretrained(base_dir, expansion_ratio=2)
    with pytest.raises(CheckpointError, match=r"Wqkv"):
        zoo.MptModel.from_pretrained(base_dir, attn_config={"attn_type": "multiquery_attention"})


# --- structure -----------------------------------------------------------------------------------


VARIANTS = [{}, {"no_bias": False, "expansion_ratio": 3, "attn_config": {"qk_ln": True}}, MOSAIC["multiquery+qk_ln"]]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_variables_equal_spec(head, variant):
    config = MptConfig(**{**TINY, **VARIANTS[variant]})
    ours = getattr(zoo, f"Mpt{head}")(config)
    spec = ours.spec
    layout = LAYOUTS["pt"]
    declared = {layout.key(p) for p in spec}
    assert set(dict(ours.named_parameters()).keys()) == declared
    assert set(ours.state_dict().keys()) == declared | set(spec.ties)
    for p in spec:
        assert tuple(ours.get_parameter(layout.key(p)).shape) == layout.shape(p)
    assert ours.num_parameters() == spec.num_parameters()
    if variant == 0:
        hf = getattr(transformers, f"Mpt{head}")(transformers.MptConfig(**TINY))
        assert set(ours.state_dict().keys()) == set(hf.state_dict().keys())
        assert ours.num_parameters() == hf.num_parameters()


def test_spec_driven_init():
    torch.manual_seed(56)
    model = zoo.MptForCausalLM(MptConfig(**{**TINY, "initializer_range": 0.05, "vocab_size": 400}))
    assert abs(float(model.transformer.wte.weight.detach().std()) - 0.05) < 0.005
    assert torch.all(model.transformer.norm_f.weight == 1)
    assert model.transformer.norm_f.bias is None  # weight-only LayerNorm at no_bias=True
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.get_input_embeddings() is model.transformer.wte


def test_alibi_off_is_ignored_like_transformers(pairs, caplog):
    """transformers always uses ALiBi; so do we, with a warning (learned positions are not implemented)."""
    hf, _, path = pairs.get("ForCausalLM")
    cfg = MptConfig.from_pretrained(path)
    cfg.attn_config.alibi = False
    with caplog.at_level("WARNING", logger="nezha_zoo"):
        ours = zoo.MptForCausalLM.from_pretrained(path, config=cfg)
    assert "alibi=False" in caplog.text
    inp = right_padded(67)
    with torch.no_grad():
        compare(hf(**inp), ours(**inp), "ForCausalLM[alibi=False]")


# --- training ------------------------------------------------------------------------------------


def test_training_step_gradients_match_transformers(pairs):
    hf, _, path = pairs.get("ForCausalLM")
    hf = transformers.MptForCausalLM.from_pretrained(path)
    ours = zoo.MptForCausalLM.from_pretrained(path)
    hf.train()
    ours.train()
    inp = right_padded(57)
    labels = _labels("ForCausalLM", torch.Generator().manual_seed(58))
    a, b = hf(**inp, **labels), ours(**inp, **labels)
    a.loss.backward()
    b.loss.backward()
    assert_close(b.loss, a.loss, TOLERANCES["loss"], "train loss")
    ref = {n: p.grad for n, p in hf.named_parameters()}
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert ref.keys() == got.keys()
    scale = max(float(g.abs().max()) for g in ref.values())
    for n in ref:
        assert_close(got[n] / scale, ref[n] / scale, TOLERANCES["grad_rel"], f"grad {n}")


def test_optimizer_steps_lower_the_loss():
    torch.manual_seed(59)
    model = zoo.MptForCausalLM(MptConfig(**TINY, attn_config={"attn_pdrop": 0.1})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inp = right_padded(60)
    labels = inp["input_ids"].masked_fill(inp["attention_mask"] == 0, -100)
    history = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(**inp, labels=labels).loss
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(np.isfinite(history)) and history[-1] < 0.7 * history[0], history


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(61)
    model = zoo.MptForSequenceClassification(MptConfig(**TINY, attn_config={"attn_pdrop": 0.1})).train()
    inp = right_padded(62)
    labels = torch.tensor([0, 1])

    def grads(**kw):
        model.zero_grad()
        torch.manual_seed(63)  # same dropout masks in both runs
        out = model(**inp, labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.transformer.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    _, plain = grads()
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    out, ckpt = grads(use_cache=True)
    assert len(calls) == 3  # ran again in the backward pass: really checkpointed
    assert out.past_key_values is None  # no cache while checkpointing
    model.gradient_checkpointing_disable()
    scale = max(float(g.abs().max()) for g in plain.values())
    for n in plain:
        assert_close(ckpt[n] / scale, plain[n] / scale, 1e-6, f"grad {n}")


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(pairs):
    _, clm, _ = pairs.get("ForCausalLM")
    ids = torch.randint(2, 99, (B, L))
    cases = [
        (dict(input_ids=torch.full((B, L), 99)), "outside the vocabulary"),
        (dict(input_ids=torch.full((B, L), -1)), "outside the vocabulary"),
        (dict(input_ids=torch.randint(2, 99, (B, 17))), "max_seq_len"),
        (dict(input_ids=ids, attention_mask=torch.ones(B, L - 1)), "attention_mask"),
        (dict(input_ids=ids, attention_mask=torch.ones(B, L, L)), "attention_mask"),
        (dict(input_ids=ids, inputs_embeds=torch.zeros(B, L, 32)), "not both"),
        (dict(), "input_ids or inputs_embeds"),
        (dict(inputs_embeds=torch.zeros(B, L, 24)), "last dimension"),
        (dict(input_ids=ids[0]), "rank"),
        (dict(input_ids=ids.float()), "integers"),
    ]
    for kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            clm(**kw)
    past = clm(ids, use_cache=True).past_key_values
    with pytest.raises(InputError, match="cached"):  # the mask must cover cached + new positions
        clm(ids[:, :1], attention_mask=torch.ones(B, 1), past_key_values=past)
    with pytest.raises(InputError, match="layers"):
        clm(ids[:, :1], past_key_values=past[:1])
    with pytest.raises(InputError, match="max_seq_len"):
        clm(torch.randint(2, 99, (B, 10)), past_key_values=past)
    with pytest.raises(InputError, match="rows"):
        clm(ids[:1, :1], past_key_values=past)
    with pytest.raises(InputError, match="kv_heads"):
        clm(ids[:, :1], past_key_values=tuple((k[:, :1], v[:, :1]) for k, v in past))
    with pytest.raises(InputError, match="pair"):
        clm(ids[:, :1], past_key_values=tuple((k,) for k, _ in past))
    with pytest.raises(InputError, match="tuple per layer"):
        clm(ids[:, :1], past_key_values=past[0][0])
    # sequence classification needs a pad id to pool a batch of more than one row
    no_pad = zoo.MptForSequenceClassification(MptConfig(**{**TINY, "pad_token_id": None})).eval()
    with pytest.raises(InputError, match="pad_token_id"):
        no_pad(ids)
    with pytest.raises(InputError, match="pad_token_id"):
        no_pad(inputs_embeds=torch.zeros(B, L, 32))
    with torch.no_grad():  # one row is fine: the last position, as transformers
        out = no_pad(ids[:1], output_hidden_states=True)
        assert_close(out.logits, no_pad.score(out.hidden_states[-1][:, -1]), 1e-6, "batch-1 pooling")
    with pytest.raises(TypeError):
        zoo.MptModel(transformers.MptConfig(**TINY))
    with pytest.raises(ValueError, match="attn_type"):
        MptConfig(**TINY, attn_config={"attn_type": "grouped_query_attention"})


def test_sequence_classification_pooling_batch_one_matches_transformers(tmp_path):
    config = MptConfig(**{**TINY, "pad_token_id": None})
    path = write_checkpoint(
        tmp_path, config, "ForSequenceClassification", seeded_weights(config, "ForSequenceClassification", 64)
    )
    hf = transformers.MptForSequenceClassification.from_pretrained(path).eval()
    ours = zoo.MptForSequenceClassification.from_pretrained(path)
    ids = torch.randint(2, 99, (1, L))
    with torch.no_grad():
        compare(
            hf(ids, labels=torch.tensor([1])), ours(ids, labels=torch.tensor([1])), "ForSequenceClassification no-pad"
        )
