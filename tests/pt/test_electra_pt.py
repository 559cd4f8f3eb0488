"""PyTorch Electra (nezha_zoo.pt) against transformers 4.57.6 PyTorch, plus checkpoint and API tests.

Each transformers model is built from a tiny config with a fixed seed, saved with its own
``save_pretrained``, and loaded by our class from that directory; both run in eval mode, float32.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import nezha_zoo.pt as zoo
from nezha_zoo import ElectraConfig
from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.pt.layers import PackedLinear, _packing_available
from nezha_zoo.spec.layouts import LAYOUTS
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.pt, pytest.mark.hf]

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

#: Tiny config; embedding_size != hidden_size so ``embeddings_project`` is covered.
TINY = dict(
    vocab_size=99,
    embedding_size=24,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
)
DECODER = dict(TINY, is_decoder=True, add_cross_attention=True)

#: Output fields compared at the hidden-state tolerance; everything else is logits/loss.
HIDDEN_FIELDS = {"last_hidden_state", "hidden_states", "attentions", "cross_attentions", "past_key_values"}

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
            hf = getattr(transformers, f"Electra{head}")(transformers.ElectraConfig(**kw)).eval()
            path = self.root / f"{head}_{len(self.cache)}"
            hf.save_pretrained(path)
            ours = getattr(zoo, f"Electra{head}").from_pretrained(path)
            self.cache[key] = (hf, ours, path)
        return self.cache[key]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("hf_electra"))


def _t(arrays: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def inputs_for(head: str, seed: int = 0) -> dict:
    """Right-padded ids, attention mask and token types ((B, C, L) for multiple choice)."""
    choices = 3 if head == "ForMultipleChoice" else None
    return _t(tiny_inputs(batch=2, seq_len=7, vocab_size=TINY["vocab_size"], seed=seed, num_choices=choices))


def _leaves(x, prefix: str):
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(hf_out, our_out, what: str) -> float:
    """Every field of transformers' output equals ours (same fields, same structure, SPEC §5 tolerances)."""
    ours_f, hf_f = list(our_out.keys()), list(hf_out.keys())
    assert ours_f == hf_f, f"{what}: fields {ours_f} vs {hf_f}"
    worst = 0.0
    for field in hf_out.keys():
        ref = hf_out[field]
        if field == "past_key_values" and hasattr(ref, "to_legacy_cache"):
            # transformers' legacy form pads self-attention-only layers with (None, None) cross
            # entries; DESIGN.md §4 says (k, v) per layer then.
            ref = tuple(tuple(t for t in layer if t is not None) for layer in ref.to_legacy_cache())
        tol = TOLERANCES["hidden"] if field in HIDDEN_FIELDS else TOLERANCES["logits"]
        a, b = list(_leaves(ref, field)), list(_leaves(our_out[field], field))
        assert [n for n, _ in a] == [n for n, _ in b], f"{what}: structure of {field} differs"
        for (name, x), (_, y) in zip(a, b):
            d = assert_close(y, x, tol, f"{what} {name}")
            worst = max(worst, d)
            key = f"{what.split()[0]}.{field}"
            MAX_DIFFS[key] = max(MAX_DIFFS.get(key, 0.0), d)
    return worst


# --- outputs equal transformers ------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head)
    with torch.no_grad():
        # padded attention mask + token types, every optional output on
        full = dict(inp, output_hidden_states=True, output_attentions=True)
        compare(hf(**full), ours(**full), f"{head} padded")
        # optional inputs left out: defaults (mask ones, types zeros, positions arange) must agree
        compare(hf(input_ids=inp["input_ids"]), ours(input_ids=inp["input_ids"]), f"{head} ids-only")
        # return_dict=False gives the same tuple
        t_hf = hf(**full, return_dict=False)
        t_ours = ours(**full, return_dict=False)
        assert isinstance(t_ours, tuple) and len(t_ours) == len(t_hf)
        for x, y in zip(_leaves(t_hf, "t"), _leaves(t_ours, "t")):
            assert_close(y[1], x[1], TOLERANCES["logits"], f"{head} tuple {x[0]}")
    with torch.no_grad():
        out = ours(**inp)
    # without labels or optional outputs only the head's logits are returned
    only = {"Model": ["last_hidden_state"], "ForQuestionAnswering": ["start_logits", "end_logits"]}
    assert list(out.keys()) == only.get(head, ["logits"])
    assert out[0] is out.to_tuple()[0] and out[0] is out[list(out.keys())[0]]
    leaves, spec = torch.utils._pytree.tree_flatten(out)  # outputs are torch pytrees
    assert type(torch.utils._pytree.tree_unflatten(leaves, spec)) is type(out) and len(leaves) == len(out)


@pytest.mark.skipif(not _packing_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("head", ["Model", "ForMaskedLM"])
def test_outputs_match_transformers_with_packed_linear(pairs, head):
    # issue #23: the opt-in packed inference path (zoo.set_packed_linear) gives transformers' outputs too
    hf, ours, _ = pairs.get(head)
    full = dict(inputs_for(head), output_hidden_states=True, output_attentions=True)
    try:
        with torch.no_grad(), zoo.packed_linear():
            compare(hf(**full), ours(**full), f"{head} packed")
        assert all(m._packed is not None for m in ours.modules() if isinstance(m, PackedLinear))
    finally:
        for m in ours.modules():
            if isinstance(m, PackedLinear):
                m.drop_packed_weight()


@pytest.mark.parametrize("summary_type", ["first", "last", "mean", "cls_index"])
def test_multiple_choice_summary_types(pairs, summary_type):
    hf, ours, _ = pairs.get("ForMultipleChoice", summary_type=summary_type, summary_activation="tanh")
    inp = inputs_for("ForMultipleChoice", seed=3)
    with torch.no_grad():
        compare(hf(**inp), ours(**inp), f"ForMultipleChoice[{summary_type}]")


def test_embedding_size_equal_hidden_size(pairs):
    hf, ours, _ = pairs.get("ForMaskedLM", embedding_size=TINY["hidden_size"])
    assert not hasattr(ours.electra, "embeddings_project")
    assert not any("embeddings_project" in k for k in ours.state_dict())
    inp = inputs_for("ForMaskedLM", seed=4)
    with torch.no_grad():
        compare(hf(**inp, output_hidden_states=True), ours(**inp, output_hidden_states=True), "ForMaskedLM[E=H]")
    hf2, ours2, _ = pairs.get("ForMaskedLM")
    assert "electra.embeddings_project.weight" in dict(ours2.named_parameters())


def test_non_default_activation(pairs):
    # hidden_act relu changes the encoder and the discriminator head, not the generator's GELU.
    for head in ("ForPreTraining", "ForMaskedLM"):
        hf, ours, _ = pairs.get(head, hidden_act="relu")
        inp = inputs_for(head, seed=5)
        with torch.no_grad():
            compare(hf(**inp), ours(**inp), f"{head}[relu]")


def test_head_mask_matches(pairs):
    hf, ours, _ = pairs.get("Model")
    inp = inputs_for("Model", seed=6)
    masks = [
        torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]]),  # (layers, heads)
        torch.tensor([1.0, 1.0, 0.0, 1.0]),  # (heads,)
    ]
    with torch.no_grad():
        for hm in masks:
            a = hf(**inp, head_mask=hm, output_attentions=True)
            b = ours(**inp, head_mask=hm, output_attentions=True)
            compare(a, b, "Model[head_mask]")
        # a masked head's probabilities are exactly zero
        b = ours(**inp, head_mask=masks[0], output_attentions=True)
        assert torch.count_nonzero(b.attentions[0][:, 1]) == 0


def test_3d_mask_and_config_defaults(pairs):
    hf, ours, _ = pairs.get("ForTokenClassification")
    inp = inputs_for("ForTokenClassification", seed=35)
    m = inp["attention_mask"]
    mask3 = (m[:, :, None] * m[:, None, :]).tril() + torch.eye(7, dtype=m.dtype)[None] * (1 - m[:, :, None])
    with torch.no_grad():
        compare(hf(inp["input_ids"], attention_mask=mask3), ours(inp["input_ids"], attention_mask=mask3), "3d-mask")
    ours.config.output_hidden_states = True
    try:
        with torch.no_grad():
            out = ours(**inp)
        assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    finally:
        ours.config.output_hidden_states = False


@pytest.mark.parametrize("head", ["Model", "ForMaskedLM", "ForMultipleChoice"])
def test_inputs_embeds_match(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head, seed=7)
    ids = inp.pop("input_ids")
    embeds = ours.get_input_embeddings()(ids)  # (..., L, embedding_size)
    with torch.no_grad():
        a = hf(inputs_embeds=embeds, **inp)
        b = ours(inputs_embeds=embeds, **inp)
        compare(a, b, f"{head}[inputs_embeds]")
        compare(ours(input_ids=ids, **inp), b, f"{head}[ids-vs-embeds]")


# --- losses --------------------------------------------------------------------------------------


def _labels(head: str, gen: torch.Generator, num_labels: int = 2, kind: str = "single") -> dict:
    B, L, C = 2, 7, 3
    if head == "ForPreTraining":
        return {"labels": torch.randint(0, 2, (B, L), generator=gen)}
    if head in ("ForMaskedLM", "ForCausalLM"):
        labels = torch.randint(0, TINY["vocab_size"], (B, L), generator=gen)
        labels[0, :2] = -100
        return {"labels": labels}
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
    ("ForCausalLM", {}, "single"),
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
        a, b = hf(**inp, **labels), ours(**inp, **labels)
        assert b.loss is not None and b.loss.dim() == 0
        compare(a, b, f"{head} loss[{kind}]")
        if head == "ForPreTraining":  # without a mask every position counts
            compare(hf(input_ids=inp["input_ids"], **labels), ours(input_ids=inp["input_ids"], **labels), head)
        t = ours(**inp, **labels, return_dict=False)
        assert_close(t[0], a.loss, TOLERANCES["loss"], f"{head} tuple loss")
    if head in ("ForMaskedLM", "ForTokenClassification"):
        # every label ignored -> the ignored positions contribute nothing
        masked = {k: torch.full_like(v, -100) for k, v in labels.items()}
        first = {k: v.clone() for k, v in labels.items()}
        for k in first:
            first[k][:, 1:] = -100
            masked[k][:, 0] = first[k][:, 0]
        with torch.no_grad():
            assert_close(ours(**inp, **masked).loss, ours(**inp, **first).loss, 0.0, "ignore_index")


def test_problem_type_is_inferred_per_call(pairs):
    _, ours, _ = pairs.get("ForSequenceClassification", num_labels=3)
    inp = inputs_for("ForSequenceClassification", seed=9)
    with torch.no_grad():
        ce = ours(**inp, labels=torch.tensor([0, 2])).loss
        bce = ours(**inp, labels=torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])).loss
        logits = ours(**inp).logits
    assert_close(ce, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])), 1e-6, "ce")
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([[0.0, 1, 1], [1, 0, 0]]))
    assert_close(bce, ref, 1e-6, "bce")
    assert ours.config.problem_type is None


# --- decoder: cross-attention and the key/value cache ---------------------------------------------


def _decoder_inputs(seed: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (2, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    enc = torch.randn(2, 5, TINY["hidden_size"], generator=g)
    enc_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    types = torch.tensor([[0] * 3 + [1] * 4] * 2)
    return ids, mask, enc, enc_mask, types


@pytest.mark.parametrize("head", ["Model", "ForCausalLM"])
def test_decoder_matches_transformers(pairs, head):
    hf, ours, _ = pairs.get(head, **{k: v for k, v in DECODER.items() if k not in TINY})
    ids, mask, enc, enc_mask, types = _decoder_inputs()
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
        compare(a, b, f"{head} decoder")
        assert len(b.past_key_values[0]) == 4 and len(b.cross_attentions) == TINY["num_hidden_layers"]
        # causal: changing a later token leaves earlier positions untouched
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % TINY["vocab_size"]
        c = ours(ids2, **kw)
        first = c[0][:, :-1]
        assert_close(first, b[0][:, :-1], 0.0, "causality")
        # encoder mask defaults to ones
        compare(hf(ids, encoder_hidden_states=enc), ours(ids, encoder_hidden_states=enc), f"{head} decoder-defaults")


def test_cached_decoding_equals_full(pairs):
    hf, ours, _ = pairs.get("ForCausalLM", **{k: v for k, v in DECODER.items() if k not in TINY})
    ids, mask, enc, enc_mask, types = _decoder_inputs(13)
    mask = torch.ones_like(mask)
    with torch.no_grad():
        full = ours(
            ids, attention_mask=mask, token_type_ids=types, encoder_hidden_states=enc, encoder_attention_mask=enc_mask
        )
        step = ours(
            ids[:, :4],
            attention_mask=mask[:, :4],
            token_type_ids=types[:, :4],
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            use_cache=True,
        )
        logits, past = [step.logits], step.past_key_values
        assert past[0][0].shape == (2, TINY["num_attention_heads"], 4, TINY["hidden_size"] // 4)
        for t in range(4, 7):
            o = ours(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                token_type_ids=types[:, t : t + 1],
                encoder_hidden_states=enc,
                encoder_attention_mask=enc_mask,
                past_key_values=past,
                use_cache=True,
            )
            logits.append(o.logits)
            past = o.past_key_values
        assert_close(torch.cat(logits, dim=1), full.logits, TOLERANCES["logits"], "cached vs full")
        # our cache fed to transformers continues identically (legacy tuple format)
        from transformers.cache_utils import EncoderDecoderCache

        step = ours(ids[:, :5], encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=True)
        hf_cache = EncoderDecoderCache.from_legacy_cache(step.past_key_values)
        # (transformers needs the mask over cached + new positions when feeding more than one token)
        a = hf(
            ids[:, 5:],
            attention_mask=mask,
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            past_key_values=hf_cache,
            use_cache=True,
        )
        b = ours(
            ids[:, 5:],
            encoder_hidden_states=enc,
            encoder_attention_mask=enc_mask,
            past_key_values=step.past_key_values,
            use_cache=True,
        )
        compare(a, b, "ForCausalLM cached")


def test_causal_lm_without_cross_attention(pairs):
    hf, ours, _ = pairs.get("ForCausalLM", is_decoder=True)
    ids, mask, _, _, types = _decoder_inputs(14)
    labels = ids.clone()
    labels[1, 5:] = -100
    with torch.no_grad():
        compare(hf(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels), "CLM")
        a = hf(ids, attention_mask=mask, use_cache=True)
        b = ours(ids, attention_mask=mask, use_cache=True)
        compare(a, b, "ForCausalLM self-only")
        assert len(b.past_key_values[0]) == 2


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_saved_checkpoint_loads_in_transformers(tmp_path, head):
    torch.manual_seed(21)
    kw = dict(TINY, num_labels=2)
    ours = getattr(zoo, f"Electra{head}")(ElectraConfig(**kw)).eval()
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [f"Electra{head}"]
    hf, info = getattr(transformers, f"Electra{head}").from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inp = inputs_for(head, seed=22)
    with torch.no_grad():
        compare(hf.eval()(**inp, output_hidden_states=True), ours(**inp, output_hidden_states=True), f"{head} ours->hf")
    if head in ("ForMaskedLM", "ForCausalLM"):
        from safetensors import safe_open

        with safe_open(tmp_path / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            assert f.metadata()["format"] == "pt"
        assert "generator_lm_head.weight" not in keys  # tied weights stored once


def test_round_trip_and_sharding(tmp_path):
    torch.manual_seed(23)
    model = zoo.ElectraForMaskedLM(ElectraConfig(**TINY)).eval()
    model.save_pretrained(tmp_path / "one")
    files = model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for sub in ("one", "sharded"):
        back = zoo.ElectraForMaskedLM.from_pretrained(tmp_path / sub, strict=True)
        sd, sd2 = model.state_dict(), back.state_dict()
        assert sd.keys() == sd2.keys()
        for k in sd:
            assert torch.equal(sd[k], sd2[k]), k
        assert back.generator_lm_head.weight is back.electra.embeddings.word_embeddings.weight
        assert not back.training


def test_pytorch_model_bin_loads(tmp_path, pairs):
    hf, ours, _ = pairs.get("ForTokenClassification")
    hf.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").exists()
    back = zoo.ElectraForTokenClassification.from_pretrained(tmp_path, strict=True)
    inp = inputs_for("ForTokenClassification", seed=24)
    with torch.no_grad():
        compare(hf(**inp), back(**inp), "ForTokenClassification[bin]")


def test_base_into_head_and_head_into_base(pairs):
    _, _, base_dir = pairs.get("Model")
    hf_base = pairs.get("Model")[0]
    head, info = zoo.ElectraForSequenceClassification.from_pretrained(base_dir, output_loading_info=True)
    assert sorted(info["missing_keys"]) == [
        "classifier.dense.bias",
        "classifier.dense.weight",
        "classifier.out_proj.bias",
        "classifier.out_proj.weight",
    ]
    assert info["unexpected_keys"] == []
    for k, v in hf_base.state_dict().items():
        assert torch.equal(head.electra.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="classifier"):
        zoo.ElectraForSequenceClassification.from_pretrained(base_dir, strict=True)

    hf_mlm, _, mlm_dir = pairs.get("ForMaskedLM")
    base, info = zoo.ElectraModel.from_pretrained(mlm_dir, output_loading_info=True)
    assert info["missing_keys"] == []
    assert sorted(info["unexpected_keys"]) == [
        "generator_lm_head.bias",
        "generator_predictions.LayerNorm.bias",
        "generator_predictions.LayerNorm.weight",
        "generator_predictions.dense.bias",
        "generator_predictions.dense.weight",
    ]
    inp = inputs_for("Model", seed=25)
    with torch.no_grad():
        compare(hf_mlm.electra(**inp), base(**inp), "head->base")


def test_shape_mismatch_names_the_tensor(pairs):
    _, _, path = pairs.get("ForTokenClassification")
    with pytest.raises(CheckpointError, match=r"electra\.embeddings\.word_embeddings\.weight.*\(99, 24\).*\(100, 24\)"):
        zoo.ElectraForTokenClassification.from_pretrained(path, vocab_size=100)
    with pytest.raises(CheckpointError, match=r"classifier\.weight"):
        zoo.ElectraForTokenClassification.from_pretrained(path, num_labels=5)


def test_legacy_position_ids_and_explicit_config(tmp_path, pairs):
    from safetensors.numpy import load_file, save_file

    hf, _, path = pairs.get("ForQuestionAnswering")
    tensors = load_file(path / "model.safetensors")
    tensors["electra.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]  # old transformers
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = ElectraConfig.from_pretrained(path)
    model, info = zoo.ElectraForQuestionAnswering.from_pretrained(tmp_path, config=cfg, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    inp = inputs_for("ForQuestionAnswering", seed=30)
    with torch.no_grad():
        compare(hf(**inp), model(**inp), "ForQuestionAnswering[legacy-key]")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        zoo.ElectraForMaskedLM(ElectraConfig(**TINY, tie_word_embeddings=False))


def test_wrong_family_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        zoo.ElectraModel.from_pretrained(tmp_path)


# --- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec(pairs, head):
    overrides = {k: v for k, v in DECODER.items() if k not in TINY} if head == "ForCausalLM" else {}
    hf, ours, _ = pairs.get(head, **overrides)
    spec = ours.spec
    layout = LAYOUTS["pt"]
    declared = {layout.key(p) for p in spec}
    assert set(dict(ours.named_parameters()).keys()) == declared
    assert set(ours.state_dict().keys()) == declared | set(spec.ties)
    assert set(ours.state_dict().keys()) == set(hf.state_dict().keys())
    for p in spec:
        assert tuple(ours.get_parameter(layout.key(p)).shape) == layout.shape(p)
    for alias, target in spec.ties.items():
        assert ours.get_parameter(alias) is ours.get_parameter(target)
    assert ours.num_parameters() == spec.num_parameters() == hf.num_parameters()


def test_spec_driven_init():
    torch.manual_seed(26)
    cfg = ElectraConfig(**dict(TINY, initializer_range=0.05, vocab_size=400))
    model = zoo.ElectraForMaskedLM(cfg)
    emb = model.electra.embeddings.word_embeddings.weight
    assert torch.count_nonzero(emb[cfg.pad_token_id]) == 0
    assert abs(float(emb[1:].detach().std()) - 0.05) < 0.005
    assert torch.all(model.electra.embeddings.LayerNorm.weight == 1)
    assert torch.all(model.electra.encoder.layer[0].attention.output.dense.bias == 0)
    assert torch.all(model.generator_lm_head.bias == 0)
    assert model.get_output_embeddings() is model.generator_lm_head
    assert model.get_input_embeddings() is model.electra.embeddings.word_embeddings


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(27)
    model = zoo.ElectraForSequenceClassification(ElectraConfig(**TINY))
    model.train()
    inp = inputs_for("ForSequenceClassification", seed=28)
    labels = torch.tensor([0, 1])

    def grads():
        model.zero_grad()
        torch.manual_seed(29)  # same dropout masks in both runs
        model(**inp, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.electra.encoder.layer[0].register_forward_pre_hook(lambda *_: calls.append(1))
    plain = grads()
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    ckpt = grads()
    assert len(calls) == 3  # the layer ran again in the backward pass: it really was checkpointed
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert plain.keys() == ckpt.keys()
    scale = max(float(g.abs().max()) for g in plain.values())
    for n in plain:
        assert_close(ckpt[n] / scale, plain[n] / scale, 1e-6, f"grad {n}")


def test_training_dropout_draws_the_masks_transformers_draws(pairs):
    """Dropout on (training), one seed: ours equals transformers' eager attention, outputs and gradients.

    The attention then runs without its probabilities (``fused_attention``'s dropout path on CPU); its
    dropout must draw what ``nn.Dropout`` on transformers' probabilities draws, in the same order.
    """
    hf, ours, _ = pairs.get("Model", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3)
    inp = inputs_for("Model", seed=40)
    with torch.no_grad():
        plain = hf(**inp).last_hidden_state
    outs = []
    for model in (hf, ours):
        model.train()
        model.zero_grad()
        torch.manual_seed(41)
        out = model(**inp).last_hidden_state
        out.pow(2).sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
        model.eval()
    (ref, ref_grads), (got, grads) = outs
    assert (ref - plain).abs().max() > 0.1  # dropout really was on
    assert_close(got, ref, TOLERANCES["hidden"], "training-mode output with dropout")
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for n, g in ref_grads.items():
        assert_close(grads[n] / scale, g / scale, TOLERANCES["grad_rel"], f"training-mode grad {n}")


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_input_error(pairs):
    _, ours, _ = pairs.get("ForSequenceClassification")
    _, mc, _ = pairs.get("ForMultipleChoice")
    ids = torch.randint(2, 99, (2, 7))
    cases = [
        (ours, dict(input_ids=torch.full((2, 7), 99)), "outside the vocabulary"),
        (ours, dict(input_ids=torch.full((2, 7), -1)), "outside the vocabulary"),
        (ours, dict(input_ids=torch.randint(2, 99, (2, 65))), "max_position_embeddings"),
        (ours, dict(input_ids=ids, attention_mask=torch.ones(2, 6)), "attention_mask"),
        (ours, dict(input_ids=ids, token_type_ids=torch.zeros(3, 7, dtype=torch.long)), "token_type_ids"),
        (ours, dict(input_ids=ids, token_type_ids=torch.full((2, 7), 2)), "token types"),
        (ours, dict(input_ids=ids, position_ids=torch.full((2, 7), 64)), "position"),
        (ours, dict(input_ids=ids, inputs_embeds=torch.zeros(2, 7, 24)), "not both"),
        (ours, dict(), "input_ids or inputs_embeds"),
        (ours, dict(inputs_embeds=torch.zeros(2, 7, 32)), "last dimension"),
        (ours, dict(input_ids=ids[0]), "rank"),
        (mc, dict(input_ids=ids), "rank 3"),
        (mc, dict(input_ids=ids[:, None].expand(2, 3, 7), attention_mask=torch.ones(2, 7)), "rank 3"),
        (ours, dict(input_ids=ids, head_mask=torch.ones(3)), "head_mask"),
        (ours, dict(input_ids=ids, head_mask=torch.ones(3, 4)), "head_mask"),
        (mc, dict(input_ids=ids[:, None].expand(2, 3, 7), attention_mask=torch.ones(2, 3, 5)), "attention_mask"),
    ]
    for model, kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            model(**kw)
    _, dec, _ = pairs.get("Model", **{k: v for k, v in DECODER.items() if k not in TINY})
    past = dec(ids, use_cache=True).past_key_values
    with pytest.raises(InputError, match="cached"):
        dec(ids[:, :1], attention_mask=torch.ones(2, 1), past_key_values=past, use_cache=True)
    with pytest.raises(InputError, match="layers"):
        dec(ids[:, :1], past_key_values=past[:1], use_cache=True)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        dec(ids, encoder_hidden_states=torch.zeros(3, 4, 32))
    with pytest.raises(InputError, match="decoder"):
        ours.electra(ids, past_key_values=past)
    with pytest.raises(TypeError):
        zoo.ElectraModel(transformers.ElectraConfig(**TINY))


# --- example -------------------------------------------------------------------------------------


def test_finetune_example_loss_falls():
    path = Path(__file__).resolve().parents[2] / "examples" / "pt_finetune_electra.py"
    spec = importlib.util.spec_from_file_location("pt_finetune_electra_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    history = module.main(steps=40)
    assert len(history) == 40 and all(np.isfinite(history))
    assert np.mean(history[-5:]) < 0.5 * history[0], history


# --- training and the shared blocks' extension points ---------------------------------------------


def test_training_step_gradients_match_transformers(tmp_path):
    kw = dict(TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(31)
    hf = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**kw))
    hf.save_pretrained(tmp_path)
    ours = zoo.ElectraForMaskedLM.from_pretrained(tmp_path)
    hf.train()
    ours.train()
    inp = inputs_for("ForMaskedLM", seed=32)
    labels = _labels("ForMaskedLM", torch.Generator().manual_seed(33))
    a, b = hf(**inp, **labels), ours(**inp, **labels)
    a.loss.backward()
    b.loss.backward()
    assert_close(b.loss, a.loss, TOLERANCES["loss"], "train loss")
    ref = {n: p.grad for n, p in hf.named_parameters()}
    got = {n: p.grad for n, p in ours.named_parameters()}
    assert ref.keys() == got.keys()
    scale = max(float(g.abs().max()) for g in ref.values())
    for n in ref:  # the tied embedding gathers gradient from both uses
        assert_close(got[n] / scale, ref[n] / scale, TOLERANCES["grad_rel"], f"grad {n}")


def _names(kind: str):
    from nezha_zoo.spec.blocks import BertLayerNames

    return {
        "bert": BertLayerNames(),
        # XLM-R-XL: pre-LN attention and FFN, no post-norms
        "pre_ln": BertLayerNames(
            pre_attn_norm="attention.self_attn_layer_norm", attn_norm=None, pre_ffn_norm="LayerNorm", out_norm=None
        ),
        # MPNet: attention.attn.{q,k,v,o} and attention.LayerNorm
        "mpnet": BertLayerNames(
            self_attn="attention.attn",
            query="q",
            key="k",
            value="v",
            attn_out="attention.attn.o",
            attn_norm="attention.LayerNorm",
        ),
    }[kind]


@pytest.mark.parametrize("kind", ["bert", "pre_ln", "mpnet"])
@pytest.mark.parametrize("cross", [False, True])
def test_shared_layer_names_follow_spec_blocks(kind, cross):
    from nezha_zoo.pt.layers import BertLayer
    from nezha_zoo.spec.blocks import bert_layer

    cfg = ElectraConfig(**TINY)
    names = _names(kind)
    layer = BertLayer(cfg, names, cross_attention=cross)
    declared = {p.name for p in bert_layer("", cfg.hidden_size, cfg.intermediate_size, names, cross_attention=cross)}
    assert set(layer.state_dict().keys()) == declared
    x = torch.randn(2, 5, cfg.hidden_size)
    enc = torch.randn(2, 3, cfg.hidden_size) if cross else None
    out, probs, cross_probs, present = layer(x, encoder_hidden_states=enc)
    assert out.shape == x.shape and probs.shape == (2, 4, 5, 5) and len(present) == (4 if cross else 2)
    assert (cross_probs is not None) == cross
    if kind == "pre_ln":  # pre-LN: x + attn(LN(x)) then + ffn(LN(.)), no final normalisation
        layer.eval()
        ln1, ln2 = layer.attention.self_attn_layer_norm, layer.LayerNorm
        core = layer.attention.self
        with torch.no_grad():
            h = x + layer.attention.output.dense(core(ln1(x))[0])
            if cross:
                h = h + layer.crossattention.output.dense(
                    layer.crossattention.self(layer.crossattention.self_attn_layer_norm(h), key_value_states=enc)[0]
                )
            ref = h + layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(ln2(h))))
        assert_close(layer(x, encoder_hidden_states=enc)[0], ref, 1e-5, "pre-LN layer")


def test_attention_hooks():
    """position_bias after scaling (MPNet); relative key/value tables (Nezha)."""
    from nezha_zoo.pt.layers import BertSelfAttention

    cfg = ElectraConfig(**dict(TINY, attention_probs_dropout_prob=0.0))
    att = BertSelfAttention(cfg).eval()
    g = torch.Generator().manual_seed(34)
    B, L, nh, d = 2, 5, 4, 8
    x = torch.randn(B, L, 32, generator=g)
    bias = torch.randn(1, nh, L, L, generator=g)
    rk, rv = torch.randn(L, L, d, generator=g), torch.randn(L, L, d, generator=g)
    with torch.no_grad():
        q = att.query(x).view(B, L, nh, d).transpose(1, 2)
        k = att.key(x).view(B, L, nh, d).transpose(1, 2)
        v = att.value(x).view(B, L, nh, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2)
        rel = torch.stack([torch.stack([q[:, :, i] @ rk[i, j] for j in range(L)], -1) for i in range(L)], -2)
        p_bias = torch.softmax(scores / d**0.5 + bias, -1)
        p_rel = torch.softmax((scores + rel) / d**0.5, -1)
        ctx_bias = (p_bias @ v).transpose(1, 2).reshape(B, L, 32)
        rel_v = [sum(p_rel[:, :, i, j, None] * rv[i, j] for j in range(L)) for i in range(L)]  # each (B, nh, d)
        ctx_rel = p_rel @ v + torch.stack(rel_v, 2)
        ctx_rel = ctx_rel.transpose(1, 2).reshape(B, L, 32)
        got_bias = att(x, position_bias=bias)
        got_rel = att(x, relative_key=rk, relative_value=rv)
    assert_close(got_bias[1], p_bias, 1e-6, "position_bias probs")
    assert_close(got_bias[0], ctx_bias, 1e-5, "position_bias context")
    assert_close(got_rel[1], p_rel, 1e-6, "relative probs")
    assert_close(got_rel[0], ctx_rel, 1e-5, "relative context")
