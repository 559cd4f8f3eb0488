"""PyTorch Nezha (nezha_zoo.pt) against transformers 4.57.6 PyTorch, plus decoding, long inputs and API.

Each transformers model is built from a tiny config with a fixed seed, saved with its own
``save_pretrained``, and loaded by our class from that directory; both run in eval mode, float32.
``max_relative_position`` is 3, so sequences of 7 already clip relative distances.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers.models.deprecated.nezha import modeling_nezha as hf_nezha

import nezha_zoo.pt as zoo
from nezha_zoo import NezhaConfig
from nezha_zoo.families.nezha import relative_position_table
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.pt.layers import RelativeEmbedding
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.spec.positions import relative_position_index
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.pt, pytest.mark.hf]

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
    max_relative_position=3,
    type_vocab_size=2,
)
DECODER = dict(is_decoder=True, add_cross_attention=True)

#: Output fields compared at the hidden-state tolerance; everything else is logits/loss.
HIDDEN_FIELDS = {
    "last_hidden_state",
    "pooler_output",
    "hidden_states",
    "attentions",
    "cross_attentions",
    "past_key_values",
}

#: Worst difference seen per (head, field), printed at the end of the module (run with -s).
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")
    yield
    if MAX_DIFFS:
        width = max(len(k) for k in MAX_DIFFS)
        lines = [f"  {k:<{width}}  {v:.3e}" for k, v in sorted(MAX_DIFFS.items())]
        print("\nmax-abs differences vs transformers:\n" + "\n".join(lines))  # shown with pytest -s


def hf_call(model, *args, **kwargs):
    """Run a transformers model, swallowing the prints of its NezhaForMultipleChoice."""
    with contextlib.redirect_stdout(io.StringIO()):
        return model(*args, **kwargs)


class Pairs:
    """Builds (transformers model, our model, checkpoint dir) once per (head, config) for the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict = {}

    def get(self, head: str, **overrides):
        key = (head, tuple(sorted(overrides.items())))
        if key not in self.cache:
            kw = {**TINY, **overrides}
            torch.manual_seed(len(self.cache))
            hf = getattr(transformers, f"Nezha{head}")(transformers.NezhaConfig(**kw)).eval()
            path = self.root / f"{head}_{len(self.cache)}"
            hf.save_pretrained(path)
            ours = getattr(zoo, f"Nezha{head}").from_pretrained(path)
            self.cache[key] = (hf, ours, path)
        return self.cache[key]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("hf_nezha"))


def _t(arrays: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def inputs_for(head: str, seed: int = 0, seq_len: int = 7) -> dict:
    """Right-padded ids, attention mask and token types ((B, C, L) for multiple choice)."""
    choices = 3 if head == "ForMultipleChoice" else None
    return _t(tiny_inputs(batch=2, seq_len=seq_len, vocab_size=TINY["vocab_size"], seed=seed, num_choices=choices))


def _leaves(x, prefix: str):
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(hf_out, our_out, what: str, skip: tuple[str, ...] = ()) -> float:
    """Every field of transformers' output equals ours (same fields, same structure, SPEC §5 tolerances)."""
    ours_f = [k for k in our_out.keys() if k not in skip]
    hf_f = [k for k in hf_out.keys() if k not in skip]
    assert ours_f == hf_f, f"{what}: fields {ours_f} vs {hf_f}"
    worst = 0.0
    for field in hf_f:
        tol = TOLERANCES["hidden"] if field in HIDDEN_FIELDS else TOLERANCES["logits"]
        a, b = list(_leaves(hf_out[field], field)), list(_leaves(our_out[field], field))
        assert [n for n, _ in a] == [n for n, _ in b], f"{what}: structure of {field} differs"
        for (name, x), (_, y) in zip(a, b, strict=True):
            d = assert_close(y, x, tol, f"{what} {name}")
            worst = max(worst, d)
            key = f"{what.split()[0]}.{field}"
            MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), d)
    return worst


# --- the functional relative position encoding ---------------------------------------------------


@pytest.mark.parametrize("K,depth", [(3, 8), (0, 8), (64, 12)])
def test_relative_encoding_equals_transformers_buffer(K, depth):
    length = 20
    ref = hf_nezha.NezhaRelativePositionsEncoding(length, depth, max_relative_position=K).positions_encoding
    table = relative_position_table(K, depth, xp=torch)
    assert table.shape == (2 * K + 1, depth)
    for lq in (1, 7, 20):
        index = relative_position_index(torch.arange(lq), torch.arange(lq), K, torch.clamp)
        assert int(index.min()) >= 0 and int(index.max()) <= 2 * K
        assert torch.equal(RelativeEmbedding(table, index).dense(), ref[:lq, :lq])
    # decoding: queries at past_len + i see keys 0 .. past_len + Lq - 1
    idx = relative_position_index(torch.arange(9, 12), torch.arange(12), K, torch.clamp)
    assert torch.equal(table[idx], ref[9:12, :12])
    # independent formula: interleaved sin/cos columns over the shifted index p = 0 .. 2K
    pos = np.arange(2 * K + 1, dtype=np.float64)[:, None]
    w = np.exp(np.arange(0, depth, 2) * (-np.log(10000.0) / depth))[None, :]
    expected = np.zeros((2 * K + 1, depth))
    expected[:, 0::2], expected[:, 1::2] = np.sin(pos * w), np.cos(pos * w)
    assert_close(table, expected, 2e-5 if K > 8 else 1e-6, "sinusoid table")


def test_relative_embedding_terms_equal_dense_tables():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(7, 8, generator=g)
    index = relative_position_index(torch.arange(4, 9), torch.arange(9), 3, torch.clamp)
    rel = RelativeEmbedding(table, index)
    dense = rel.dense()  # (5, 9, 8)
    q = torch.randn(2, 4, 5, 8, generator=g)
    probs = torch.softmax(torch.randn(2, 4, 5, 9, generator=g), -1)
    assert_close(rel.key_scores(q), torch.einsum("bhqd,qkd->bhqk", q, dense), 1e-6, "key scores")
    assert_close(rel.value_context(probs), torch.einsum("bhqk,qkd->bhqd", probs, dense), 1e-6, "value context")


def test_long_inputs_use_the_lookup_and_short_ones_the_dense_tensor(monkeypatch):
    # Above DENSE_RELATIVE_ELEMENTS the layers get the (2K + 1, d) table and an (L, L) index, never an
    # (L, L, d) tensor; below it the dense tensor, built once.  Both give the same outputs.
    import nezha_zoo.pt.nezha as pt_nezha

    model = zoo.NezhaModel(NezhaConfig(**TINY)).eval()
    seen = []
    core = model.encoder.layer[1].attention.self
    core.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["relative_key"]), with_kwargs=True)
    ids = torch.randint(2, 99, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_out = model(ids).last_hidden_state
        monkeypatch.setattr(pt_nezha, "DENSE_RELATIVE_ELEMENTS", 40 * 40 * 8 - 1)
        lookup_out = model(ids).last_hidden_state
    assert isinstance(seen[0], torch.Tensor) and seen[0].shape == (40, 40, 8)
    assert isinstance(seen[1], RelativeEmbedding)
    assert seen[1].table.shape == (7, 8) and seen[1].index.shape == (40, 40)
    assert_close(lookup_out, dense_out, 1e-6, "lookup vs dense relative terms")


# --- outputs equal transformers ------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head)
    with torch.no_grad():
        # padded attention mask + token types, every optional output on
        full = dict(inp, output_hidden_states=True, output_attentions=True)
        compare(hf_call(hf, **full), ours(**full), f"{head} padded")
        # optional inputs left out: defaults (mask ones, types zeros) must agree
        compare(hf_call(hf, input_ids=inp["input_ids"]), ours(input_ids=inp["input_ids"]), f"{head} ids-only")
        # return_dict=False gives the same tuple
        t_hf = hf_call(hf, **full, return_dict=False)
        t_ours = ours(**full, return_dict=False)
        assert isinstance(t_ours, tuple) and len(t_ours) == len(t_hf)
        for x, y in zip(_leaves(t_hf, "t"), _leaves(t_ours, "t"), strict=True):
            assert_close(y[1], x[1], TOLERANCES["logits"], f"{head} tuple {x[0]}")
        out = ours(**inp)
    only = {
        "Model": ["last_hidden_state", "pooler_output"],
        "ForPreTraining": ["prediction_logits", "seq_relationship_logits"],
        "ForQuestionAnswering": ["start_logits", "end_logits"],
    }
    assert list(out.keys()) == only.get(head, ["logits"])
    assert out[0] is out.to_tuple()[0]


@pytest.mark.parametrize("head", ["Model", "ForMultipleChoice"])
def test_inputs_embeds_match(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head, seed=7)
    ids = inp.pop("input_ids")
    embeds = ours.get_input_embeddings()(ids)  # (..., L, hidden_size)
    with torch.no_grad():
        b = ours(inputs_embeds=embeds, **inp)
        compare(hf_call(hf, inputs_embeds=embeds, **inp), b, f"{head}[inputs_embeds]")
        compare(ours(input_ids=ids, **inp), b, f"{head}[ids-vs-embeds]")


def test_head_mask_and_relu(pairs):
    hf, ours, _ = pairs.get("Model")
    inp = inputs_for("Model", seed=6)
    with torch.no_grad():
        for hm in (torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]]), torch.tensor([1.0, 1.0, 0.0, 1.0])):
            compare(
                hf(**inp, head_mask=hm, output_attentions=True),
                ours(**inp, head_mask=hm, output_attentions=True),
                "Model[head_mask]",
            )
        hf2, ours2, _ = pairs.get("ForMaskedLM", hidden_act="relu", max_relative_position=1)
        compare(hf2(**inp), ours2(**inp), "ForMaskedLM[relu,K=1]")


# --- losses --------------------------------------------------------------------------------------


def _labels(head: str, gen: torch.Generator, num_labels: int = 2, kind: str = "single") -> dict:
    B, L, C = 2, 7, 3
    if head in ("ForPreTraining", "ForMaskedLM"):
        labels = torch.randint(0, TINY["vocab_size"], (B, L), generator=gen)
        labels[0, :2] = -100
        out = {"labels": labels}
        if head == "ForPreTraining":
            out["next_sentence_label"] = torch.tensor([0, 1])
        return out
    if head == "ForNextSentencePrediction":
        return {"labels": torch.tensor([1, 0])}
    if head == "ForTokenClassification":
        labels = torch.randint(0, num_labels, (B, L), generator=gen)
        labels[1, 4:] = -100
        return {"labels": labels}
    if head == "ForQuestionAnswering":
        # one position beyond the sequence: clamped to L and ignored, as transformers does
        return {"start_positions": torch.tensor([1, 30]), "end_positions": torch.tensor([5, 3])}
    if head == "ForMultipleChoice":
        return {"labels": torch.randint(0, C, (B,), generator=gen)}
    if kind == "regression":
        return {"labels": torch.randn(B, generator=gen)}
    if kind == "multi":
        return {"labels": torch.randint(0, 2, (B, num_labels), generator=gen).float()}
    return {"labels": torch.randint(0, num_labels, (B,), generator=gen)}


LOSS_CASES = [
    ("ForPreTraining", {}, "single"),
    ("ForMaskedLM", {}, "single"),
    ("ForNextSentencePrediction", {}, "single"),
    ("ForTokenClassification", {}, "single"),
    ("ForQuestionAnswering", {}, "single"),
    ("ForMultipleChoice", {}, "single"),
    ("ForSequenceClassification", {}, "single"),
    ("ForSequenceClassification", {"num_labels": 3}, "multi"),
    ("ForSequenceClassification", {"num_labels": 1}, "regression"),
]


@pytest.mark.parametrize("head,overrides,kind", LOSS_CASES, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_losses_match_transformers(pairs, head, overrides, kind):
    hf, ours, _ = pairs.get(head, **overrides)
    gen = torch.Generator().manual_seed(11)
    inp = inputs_for(head, seed=8)
    labels = _labels(head, gen, num_labels=overrides.get("num_labels", 2), kind=kind)
    hf.config.problem_type = None  # transformers caches the inferred problem type in its config
    with torch.no_grad():
        a, b = hf_call(hf, **inp, **labels), ours(**inp, **labels)
        assert b.loss is not None and b.loss.dim() == 0
        compare(a, b, f"{head} loss[{kind}]")
        t = ours(**inp, **labels, return_dict=False)
        assert_close(t[0], a.loss, TOLERANCES["loss"], f"{head} tuple loss")
        if head == "ForPreTraining":
            # loss = MLM cross-entropy + NSP cross-entropy; only with both label sets (as transformers)
            ce = torch.nn.functional.cross_entropy
            mlm = ce(b.prediction_logits.reshape(-1, TINY["vocab_size"]), labels["labels"].reshape(-1))
            nsp = ce(b.seq_relationship_logits, labels["next_sentence_label"])
            assert_close(b.loss, mlm + nsp, 1e-6, "MLM + NSP")
            assert ours(**inp, labels=labels["labels"]).loss is None
            assert hf(**inp, labels=labels["labels"]).loss is None


def test_next_sentence_label_alias(pairs):
    hf, ours, _ = pairs.get("ForNextSentencePrediction")
    inp = inputs_for("ForNextSentencePrediction", seed=9)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        with pytest.warns(FutureWarning, match="next_sentence_label"):
            b = ours(**inp, next_sentence_label=y)
        assert_close(b.loss, ours(**inp, labels=y).loss, 0.0, "alias")
        with pytest.raises(TypeError, match="bogus"):
            ours(**inp, bogus=1)


# --- decoder: cross-attention, the cache ----------------------------------------------------------


def _decoder_inputs(seed: int = 12, enc_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (2, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    enc = torch.randn(2, enc_len, TINY["hidden_size"], generator=g)
    enc_mask = torch.ones(2, enc_len, dtype=torch.long)
    enc_mask[1, enc_len - 2 :] = 0
    types = torch.tensor([[0] * 3 + [1] * 4] * 2)
    return ids, mask, enc, enc_mask, types


def test_decoder_matches_transformers(pairs):
    # transformers' cross-attention applies the relative terms too and runs only for Lenc == L.
    hf, ours, _ = pairs.get("Model", **DECODER)
    ids, mask, enc, enc_mask, types = _decoder_inputs(enc_len=7)
    kw = dict(
        attention_mask=mask,
        token_type_ids=types,
        encoder_hidden_states=enc,
        encoder_attention_mask=enc_mask,
        head_mask=torch.tensor([[1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 1.0]]),  # also scales cross-attention
        use_cache=True,
        output_attentions=True,
        output_hidden_states=True,
    )
    with torch.no_grad():
        a, b = hf(ids, **kw), ours(ids, **kw)
        compare(a, b, "Model decoder")
        assert len(b.past_key_values[0]) == 4 and len(b.cross_attentions) == TINY["num_hidden_layers"]
        # transformers' tuple order: cache before hidden states
        ta, tb = hf(ids, **kw, return_dict=False), ours(ids, **kw, return_dict=False)
        for x, y in zip(_leaves(ta, "t"), _leaves(tb, "t"), strict=True):
            assert_close(y[1], x[1], TOLERANCES["hidden"], f"decoder tuple {x[0]}")
        # causal: changing a later token leaves earlier positions untouched
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % TINY["vocab_size"]
        assert_close(ours(ids2, **kw)[0][:, :-1], b[0][:, :-1], 0.0, "causality")
        # defaults (masks ones, types zeros)
        compare(
            hf(ids, encoder_hidden_states=enc, use_cache=True),
            ours(ids, encoder_hidden_states=enc, use_cache=True),
            "Model decoder-defaults",
        )
        # a cache only with use_cache=True (transformers defaults to config.use_cache)
        assert ours(ids, encoder_hidden_states=enc).past_key_values is None
    # the decoder-only MLM class (cross-attention through its encoder_hidden_states argument)
    hf_m, ours_m, _ = pairs.get("ForMaskedLM", **DECODER)
    with torch.no_grad():
        compare(
            hf_m(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask),
            ours_m(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask),
            "ForMaskedLM decoder",
        )


@pytest.mark.parametrize("enc_len", [7, 5])
def test_cached_decoding_equals_full(pairs, enc_len):
    hf, ours, _ = pairs.get("Model", **DECODER)
    ids, _, enc, enc_mask, types = _decoder_inputs(13, enc_len=enc_len)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 2] = 0  # a hole (no query row is fully masked, so every position is comparable)
    with torch.no_grad():
        full = ours(
            ids,
            attention_mask=mask,
            token_type_ids=types,
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            use_cache=True,
        )
        if enc_len == 7:  # transformers' full pass runs only with Lenc == L
            ref = hf(
                ids,
                attention_mask=mask,
                token_type_ids=types,
                encoder_hidden_states=enc,
                encoder_attention_mask=enc_mask,
                use_cache=True,
            )
            compare(ref, full, "Model full-decoder")
        # prefix of 3, one chunk of 2, then single steps
        step = ours(
            ids[:, :3],
            attention_mask=mask[:, :3],
            token_type_ids=types[:, :3],
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            use_cache=True,
        )
        hidden, past = [step.last_hidden_state], step.past_key_values
        assert past[0][0].shape == (2, TINY["num_attention_heads"], 3, TINY["hidden_size"] // 4)
        for a, z in ((3, 5), (5, 6), (6, 7)):
            o = ours(
                ids[:, a:z],
                attention_mask=mask[:, :z],
                token_type_ids=types[:, a:z],
                encoder_hidden_states=enc,
                encoder_attention_mask=enc_mask,
                past_key_values=past,
                use_cache=True,
            )
            hidden.append(o.last_hidden_state)
            past = o.past_key_values
        got = torch.cat(hidden, dim=1)
        assert_close(got, full.last_hidden_state, TOLERANCES["hidden"], f"cached vs full (Lenc={enc_len})")
        if enc_len == 7:
            assert_close(got, ref.last_hidden_state, TOLERANCES["hidden"], "cached vs transformers full")
        for layer_full, layer_step in zip(full.past_key_values, past, strict=True):
            for x, y in zip(layer_full, layer_step, strict=True):
                assert_close(y, x, TOLERANCES["hidden"], "cache contents")


def test_decoder_without_cross_attention_caches(pairs):
    hf, ours, _ = pairs.get("Model", is_decoder=True)
    ids, mask, _, _, types = _decoder_inputs(14)
    with torch.no_grad():
        full = ours(ids, token_type_ids=types, use_cache=True)
        compare(hf(ids, token_type_ids=types, use_cache=True), full, "Model causal")
        step = ours(ids[:, :4], token_type_ids=types[:, :4], use_cache=True)
        assert len(step.past_key_values[0]) == 2
        rest = ours(ids[:, 4:], token_type_ids=types[:, 4:], past_key_values=step.past_key_values, use_cache=True)
        got = torch.cat([step.last_hidden_state, rest.last_hidden_state], 1)
        assert_close(got, full.last_hidden_state, TOLERANCES["hidden"], "causal cached vs full")
        # an encoder never returns a cache
        _, enc_model, _ = pairs.get("Model")
        assert enc_model(ids, use_cache=True).past_key_values is None


# --- sequences longer than max_position_embeddings -----------------------------------------------


@pytest.mark.parametrize("head", ["Model", "ForPreTraining", "ForQuestionAnswering"])
def test_longer_than_max_position_embeddings(pairs, head):
    """Ours (max_position_embeddings 16) on 40 tokens equals transformers built with 40 positions."""
    hf, ours, _ = pairs.get(head)
    long_len = 40
    inp = inputs_for(head, seed=15, seq_len=long_len)
    with pytest.raises(RuntimeError):  # transformers sizes its table (and type buffer) by the config
        with torch.no_grad():
            hf(**inp)
    big = transformers.NezhaConfig(**{**TINY, "max_position_embeddings": long_len})
    hf_big = getattr(transformers, f"Nezha{head}")(big).eval()
    hf_big.load_state_dict(hf.state_dict())
    assert ours.config.max_position_embeddings == 16
    with torch.no_grad():
        kw = dict(inp, output_hidden_states=True, output_attentions=True)
        compare(hf_big(**kw), ours(**kw), f"{head} long")
        compare(hf_big(input_ids=inp["input_ids"]), ours(input_ids=inp["input_ids"]), f"{head} long-defaults")


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_saved_checkpoint_loads_in_transformers(tmp_path, head):
    torch.manual_seed(20)
    model = getattr(zoo, f"Nezha{head}")(NezhaConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    hf = getattr(transformers, f"Nezha{head}").from_pretrained(tmp_path).eval()
    inp = inputs_for(head, seed=21)
    with torch.no_grad():
        compare(hf_call(hf, **inp), model(**inp), f"{head}[saved]")
    back = getattr(zoo, f"Nezha{head}").from_pretrained(tmp_path, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    if head in ("ForPreTraining", "ForMaskedLM"):
        pred = back.cls.predictions
        assert pred.decoder.weight is back.nezha.embeddings.word_embeddings.weight
        assert pred.decoder.bias is pred.bias
        assert back.get_output_embeddings() is pred.decoder


def test_base_into_head_and_head_into_base(pairs):
    hf_base, _, base_dir = pairs.get("Model")
    head, info = zoo.NezhaForSequenceClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert info["unexpected_keys"] == []
    for k, v in hf_base.state_dict().items():
        assert torch.equal(head.nezha.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="classifier"):
        zoo.NezhaForSequenceClassification.from_pretrained(base_dir, strict=True)
    # a base without pooler (token classification) loads the base checkpoint, pooler unexpected
    _, info = zoo.NezhaForTokenClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]

    hf_pt, _, pt_dir = pairs.get("ForPreTraining")
    base, info = zoo.NezhaModel.from_pretrained(pt_dir, output_loading_info=True)
    assert info["missing_keys"] == []
    assert sorted(info["unexpected_keys"]) == [
        "cls.predictions.bias",
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.weight",
        "cls.seq_relationship.bias",
        "cls.seq_relationship.weight",
    ]
    inp = inputs_for("Model", seed=25)
    with torch.no_grad():
        compare(hf_pt.nezha(**inp), base(**inp), "head->base")


def test_shape_mismatch_names_the_tensor(pairs):
    _, _, path = pairs.get("ForTokenClassification")
    with pytest.raises(CheckpointError, match=r"nezha\.embeddings\.word_embeddings\.weight.*\(99, 32\).*\(100, 32\)"):
        zoo.NezhaForTokenClassification.from_pretrained(path, vocab_size=100)


# --- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head,overrides", [(h, {}) for h in HEADS] + [("Model", DECODER)])
def test_variables_equal_spec(pairs, head, overrides):
    hf, ours, _ = pairs.get(head, **overrides)
    spec = ours.spec
    layout = LAYOUTS["pt"]
    declared = {layout.key(p) for p in spec}
    assert set(dict(ours.named_parameters()).keys()) == declared
    assert set(ours.state_dict().keys()) == declared | set(spec.ties)
    assert set(ours.state_dict().keys()) == set(hf.state_dict().keys())
    assert not any("relative" in k for k in ours.state_dict())  # computed, never stored
    for p in spec:
        assert tuple(ours.get_parameter(layout.key(p)).shape) == layout.shape(p)
    for alias, target in spec.ties.items():
        assert ours.get_parameter(alias) is ours.get_parameter(target)
    assert ours.num_parameters() == spec.num_parameters() == hf.num_parameters()
    no_pool = zoo.NezhaModel(NezhaConfig(**TINY), add_pooling_layer=False)
    assert not any(k.startswith("pooler") for k in no_pool.state_dict())


def test_training_step_gradients_match_transformers(tmp_path):
    kw = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(31)
    hf = transformers.NezhaForPreTraining(transformers.NezhaConfig(**kw))
    hf.save_pretrained(tmp_path)
    ours = zoo.NezhaForPreTraining.from_pretrained(tmp_path)
    hf.train()
    ours.train()
    inp = inputs_for("ForPreTraining", seed=32)
    labels = _labels("ForPreTraining", torch.Generator().manual_seed(33))
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


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(27)
    model = zoo.NezhaForSequenceClassification(NezhaConfig(**TINY))
    model.train()
    inp = inputs_for("ForSequenceClassification", seed=28)
    labels = torch.tensor([0, 1])

    def grads():
        model.zero_grad()
        torch.manual_seed(29)  # same dropout masks in both runs
        model(**inp, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.nezha.encoder.layer[0].register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads()
    model.gradient_checkpointing_enable()
    ckpt = grads()
    model.gradient_checkpointing_disable()
    assert len(calls) == 3  # the layer ran again in the backward pass: it really was checkpointed
    scale = max(float(g.abs().max()) for g in plain.values())
    for n in plain:
        assert_close(ckpt[n] / scale, plain[n] / scale, 1e-6, f"grad {n}")


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(pairs):
    _, ours, _ = pairs.get("ForSequenceClassification")
    _, mc, _ = pairs.get("ForMultipleChoice")
    ids = torch.randint(2, 99, (2, 7))
    cases = [
        (ours, dict(input_ids=torch.full((2, 7), 99)), "outside the vocabulary"),
        (ours, dict(input_ids=torch.full((2, 7), -1)), "outside the vocabulary"),
        (ours, dict(input_ids=ids, attention_mask=torch.ones(2, 6)), "attention_mask"),
        (ours, dict(input_ids=ids, token_type_ids=torch.zeros(3, 7, dtype=torch.long)), "token_type_ids"),
        (ours, dict(input_ids=ids, token_type_ids=torch.full((2, 7), 2)), "token types"),
        (ours, dict(input_ids=ids, inputs_embeds=torch.zeros(2, 7, 32)), "not both"),
        (ours, dict(), "input_ids or inputs_embeds"),
        (ours, dict(inputs_embeds=torch.zeros(2, 7, 24)), "last dimension"),
        (ours, dict(input_ids=ids[0]), "rank"),
        (ours, dict(input_ids=ids, head_mask=torch.ones(3)), "head_mask"),
        (mc, dict(input_ids=ids), "rank 3"),
        (mc, dict(input_ids=ids[:, None].expand(2, 3, 7), attention_mask=torch.ones(2, 3, 5)), "attention_mask"),
        (mc, dict(input_ids=torch.full((2, 3, 7), 100)), "outside the vocabulary"),
    ]
    for model, kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            model(**kw)
    with pytest.raises(TypeError):
        ours(ids, position_ids=torch.arange(7)[None])  # Nezha has no position_ids
    # no length limit: 3 x max_position_embeddings runs
    with torch.no_grad():
        assert ours(torch.randint(2, 99, (1, 48))).logits.shape == (1, 2)
    _, dec, _ = pairs.get("Model", **DECODER)
    past = dec(ids, use_cache=True).past_key_values
    with pytest.raises(InputError, match="cached"):
        dec(ids[:, :1], attention_mask=torch.ones(2, 1), past_key_values=past, use_cache=True)
    with pytest.raises(InputError, match="layers"):
        dec(ids[:, :1], past_key_values=past[:1], use_cache=True)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        dec(ids, encoder_hidden_states=torch.zeros(3, 4, 32))
    with pytest.raises(InputError, match="decoder"):
        ours.nezha(ids, past_key_values=past)
    with pytest.raises(TypeError):
        zoo.NezhaModel(transformers.NezhaConfig(**TINY))


# --- example -------------------------------------------------------------------------------------


def test_pretrain_example_loss_falls():
    path = Path(__file__).resolve().parents[2] / "examples" / "pt_pretrain_nezha.py"
    spec = importlib.util.spec_from_file_location("pt_pretrain_nezha_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(steps=60)
    assert len(history) == 60 and all(np.isfinite(history))
    assert np.mean(history[-5:]) < 0.5 * history[0], history
