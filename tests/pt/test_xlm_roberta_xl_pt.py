"""PyTorch XLM-RoBERTa-XL (nezha_zoo.pt) against transformers 4.57.6 PyTorch, plus checkpoint and API tests.

Each checkpoint is drawn from the family spec (``random_weights``, so LayerNorms and biases are not
at their structured init), written once with ``save_weights`` and loaded by both transformers and
our class; both run in eval mode, float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import nezha_zoo.pt as zoo
from nezha_zoo import XLMRobertaXLConfig
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec import get_family
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.pt, pytest.mark.hf]

FAMILY = get_family("xlm_roberta_xl")
HEADS = FAMILY.heads
PAD = 1
#: Tiny config; two token-type rows so token_type_ids change the numbers (the real models have one).
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
DECODER = dict(is_decoder=True, add_cross_attention=True)
LONGEST = TINY["max_position_embeddings"] - PAD - 1  # positions PAD + 1 .. max_position_embeddings - 1
HIDDEN_FIELDS = {"last_hidden_state", "hidden_states", "attentions", "cross_attentions", "pooler_output"}


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")


class Pairs:
    """(transformers model, our model, checkpoint dir) per (head, config overrides), built once."""

    def __init__(self, root) -> None:
        self.root = root
        self.cache: dict = {}

    def get(self, head: str, **overrides):
        key = (head, tuple(sorted(overrides.items())))
        if key not in self.cache:
            config = XLMRobertaXLConfig(**{**TINY, **overrides})
            spec = FAMILY.model_spec(config, head)
            path = self.root / f"{head}_{len(self.cache)}"
            save_weights(path, config, spec, FAMILY, random_weights(spec, config, seed=len(self.cache)))
            hf = getattr(transformers, f"XLMRobertaXL{head}").from_pretrained(path, attn_implementation="eager")
            ours = getattr(zoo, f"XLMRobertaXL{head}").from_pretrained(path)
            self.cache[key] = (hf.eval(), ours.eval(), path)
        return self.cache[key]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("xlm_roberta_xl_pt"))


def inputs_for(head: str, seed: int = 0, seq_len: int = 7) -> dict:
    """Right-padded ids (pads hold PAD), attention mask, token types ((B, C, L) for multiple choice)."""
    choices = 3 if head == "ForMultipleChoice" else None
    x = tiny_inputs(batch=2, seq_len=seq_len, vocab_size=99, pad=PAD, seed=seed, num_choices=choices)
    return {k: torch.from_numpy(v) for k, v in x.items()}


def _legacy(x):
    return x.to_legacy_cache() if hasattr(x, "to_legacy_cache") else x


def _leaves(x, prefix: str):
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(hf_out, our_out, what: str) -> None:
    """Same fields in the same order, every tensor within SPEC §5 (past_key_values as legacy tuples)."""
    assert list(our_out.keys()) == list(hf_out.keys()), f"{what}: fields {list(our_out.keys())} vs {list(hf_out)}"
    for field in hf_out.keys():
        tol = TOLERANCES["hidden"] if field in HIDDEN_FIELDS | {"past_key_values"} else TOLERANCES["logits"]
        a, b = list(_leaves(_legacy(hf_out[field]), field)), list(_leaves(our_out[field], field))
        assert [n for n, _ in a] == [n for n, _ in b], f"{what}: structure of {field} differs"
        for (name, x), (_, y) in zip(a, b):
            assert_close(y, x, tol, f"{what} {name}")


# --- outputs equal transformers ------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_outputs_match_transformers(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head)
    with torch.no_grad():
        full = dict(inp, output_hidden_states=True, output_attentions=True)
        compare(hf(**full), ours(**full), f"{head} padded")
        compare(hf(input_ids=inp["input_ids"]), ours(input_ids=inp["input_ids"]), f"{head} ids-only")
        t_hf, t_ours = hf(**full, return_dict=False), ours(**full, return_dict=False)
        assert isinstance(t_ours, tuple) and len(t_ours) == len(t_hf)
        for (name, x), (_, y) in zip(_leaves(t_hf, "t"), _leaves(t_ours, "t")):
            if x is None:  # XLMRobertaXLModel without a pooler keeps the slot
                assert y is None, f"{head} tuple {name}"
            else:
                assert_close(y, x, TOLERANCES["logits"], f"{head} tuple {name}")
    # the state dict is the spec: pooler only where transformers builds it, lm_head tied
    keys = set(ours.state_dict())
    assert any(k.endswith("pooler.dense.weight") for k in keys) == (head in ("Model", "ForMultipleChoice"))
    if head in ("ForMaskedLM", "ForCausalLM"):
        assert ours.lm_head.decoder.weight is ours.roberta.embeddings.word_embeddings.weight
        assert ours.lm_head.decoder.bias is ours.lm_head.bias


def test_pre_layer_norm_structure(pairs):
    _, ours, _ = pairs.get("Model")
    keys = set(ours.state_dict())
    assert "encoder.layer.0.attention.self_attn_layer_norm.weight" in keys
    assert "encoder.layer.0.LayerNorm.weight" in keys and "encoder.LayerNorm.bias" in keys
    assert not any("embeddings.LayerNorm" in k or "output.LayerNorm" in k for k in keys)
    assert ours.embeddings.position_embeddings.padding_idx == PAD


def test_model_without_pooler(pairs):
    _, _, path = pairs.get("Model")
    hf = transformers.XLMRobertaXLModel.from_pretrained(path, add_pooling_layer=False).eval()
    ours = zoo.XLMRobertaXLModel(XLMRobertaXLConfig(**TINY), add_pooling_layer=False)
    ours.load_state_dict(hf.state_dict())
    inp = inputs_for("Model", seed=2)
    with torch.no_grad():
        a, b = hf(**inp, return_dict=False), ours.eval()(**inp, return_dict=False)
    assert b[1] is None and a[1] is None and len(a) == len(b)
    assert_close(b[0], a[0], TOLERANCES["hidden"], "no-pooler last_hidden_state")


def test_left_padding_and_one_row_token_types(pairs):
    # RoBERTa positions restart after left padding; a one-row token-type table is the real default.
    hf, ours, _ = pairs.get("ForMaskedLM", type_vocab_size=1)
    ids = torch.tensor([[PAD, PAD, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        compare(hf(ids, attention_mask=mask), ours(ids, attention_mask=mask), "left padding")
        compare(hf(ids, token_type_ids=torch.zeros_like(ids)), ours(ids, token_type_ids=torch.zeros_like(ids)), "tt=0")
    with pytest.raises(InputError, match="token_type_ids"):
        ours(ids, token_type_ids=torch.ones_like(ids))


@pytest.mark.parametrize("head", ["Model", "ForMultipleChoice"])
def test_inputs_embeds_match(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head, seed=7)
    ids = inp.pop("input_ids")
    embeds = ours.get_input_embeddings()(ids)  # (..., L, hidden_size)
    with torch.no_grad():
        compare(hf(inputs_embeds=embeds, **inp), ours(inputs_embeds=embeds, **inp), f"{head}[inputs_embeds]")


def test_head_mask_matches(pairs):
    hf, ours, _ = pairs.get("Model")
    inp = inputs_for("Model", seed=6)
    hm = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        compare(
            hf(**inp, head_mask=hm, output_attentions=True), ours(**inp, head_mask=hm, output_attentions=True), "hm"
        )


# --- losses --------------------------------------------------------------------------------------


def _labels(head: str, g: torch.Generator, num_labels: int = 2, kind: str = "single") -> dict:
    B, L, C = 2, 7, 3
    if head in ("ForMaskedLM", "ForCausalLM"):
        labels = torch.randint(0, TINY["vocab_size"], (B, L), generator=g)
        labels[0, :2] = -100
        return {"labels": labels}
    if head == "ForTokenClassification":  # labels also on padded positions: the attention mask drops them
        return {"labels": torch.randint(0, num_labels, (B, L), generator=g)}
    if head == "ForQuestionAnswering":
        return {"start_positions": torch.tensor([1, 30]), "end_positions": torch.tensor([5, 3])}
    if head == "ForMultipleChoice":
        return {"labels": torch.randint(0, C, (B,), generator=g)}
    if kind == "regression":
        return {"labels": torch.randn(B, generator=g)}
    if kind == "multi":
        return {"labels": torch.randint(0, 2, (B, num_labels), generator=g).float()}
    return {"labels": torch.randint(0, num_labels, (B,), generator=g)}


LOSS_CASES = [(h, {}, "single") for h in HEADS if h != "Model"] + [
    ("ForSequenceClassification", {"num_labels": 3}, "multi"),
    ("ForSequenceClassification", {"num_labels": 1}, "regression"),
]


@pytest.mark.parametrize("head,overrides,kind", LOSS_CASES, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_losses_match_transformers(pairs, head, overrides, kind):
    hf, ours, _ = pairs.get(head, **overrides)
    inp = inputs_for(head, seed=8)
    labels = _labels(head, torch.Generator().manual_seed(11), overrides.get("num_labels", 2), kind)
    hf.config.problem_type = None  # transformers caches the inferred problem type in its config
    with torch.no_grad():
        a, b = hf(**inp, **labels), ours(**inp, **labels)
        assert b.loss is not None and b.loss.dim() == 0
        compare(a, b, f"{head} loss[{kind}]")
        assert_close(ours(**inp, **labels, return_dict=False)[0], a.loss, TOLERANCES["loss"], f"{head} tuple loss")


def test_token_classification_ignores_masked_positions(pairs):
    _, ours, _ = pairs.get("ForTokenClassification")
    inp = inputs_for("ForTokenClassification", seed=9)
    labels = torch.randint(0, 2, (2, 7), generator=torch.Generator().manual_seed(3))
    explicit = labels.masked_fill(inp["attention_mask"] == 0, -100)
    with torch.no_grad():
        assert_close(ours(**inp, labels=labels).loss, ours(**inp, labels=explicit).loss, 0.0, "mask rule")
        with pytest.raises(InputError, match="attention_mask"):
            ours(inp["input_ids"], attention_mask=inp["attention_mask"][:, :5], labels=labels)


# --- decoder: cross-attention and the key/value cache ---------------------------------------------


def _decoder_inputs(seed: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TINY["vocab_size"], (2, 7), generator=g)
    enc = torch.randn(2, 5, TINY["hidden_size"], generator=g)
    enc_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    types = torch.tensor([[0] * 3 + [1] * 4] * 2)
    return ids, enc, enc_mask, types


@pytest.mark.parametrize("head", ["Model", "ForCausalLM"])
def test_decoder_matches_transformers(pairs, head):
    hf, ours, _ = pairs.get(head, **DECODER)
    ids, enc, enc_mask, types = _decoder_inputs()
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    kw = dict(
        attention_mask=mask,
        token_type_ids=types,
        encoder_hidden_states=enc,
        encoder_attention_mask=enc_mask,
        head_mask=torch.tensor([[1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 1.0]]),
        output_attentions=True,
        output_hidden_states=True,
    )
    with torch.no_grad():
        a, b = hf(ids, **kw), ours(ids, **kw)  # a decoder caches by default (config.use_cache)
        compare(a, b, f"{head} decoder")
        assert len(b.past_key_values[0]) == 4 and len(b.cross_attentions) == TINY["num_hidden_layers"]
        assert ours(ids, **kw, use_cache=False).past_key_values is None


def test_cached_decoding_equals_full(pairs):
    hf, ours, _ = pairs.get("ForCausalLM", **DECODER)
    ids, enc, enc_mask, types = _decoder_inputs(13)
    kw = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    with torch.no_grad():
        full = hf(ids, token_type_ids=types, **kw)
        step = ours(ids[:, :4], token_type_ids=types[:, :4], **kw)
        logits, past = [step.logits], step.past_key_values
        for t in range(4, 7):  # positions continue after the cached length
            o = ours(ids[:, t : t + 1], token_type_ids=types[:, t : t + 1], past_key_values=past, **kw)
            logits.append(o.logits)
            past = o.past_key_values
        assert_close(torch.cat(logits, dim=1), full.logits, TOLERANCES["logits"], "cached vs full")
        # two new tokens at once after the prefix
        o = ours(ids[:, 4:], token_type_ids=types[:, 4:], past_key_values=step.past_key_values, **kw)
        assert_close(o.logits, full.logits[:, 4:], TOLERANCES["logits"], "cached chunk vs full")


def test_causal_lm_loss_and_warning(pairs, caplog):
    hf, ours, _ = pairs.get("ForCausalLM", is_decoder=True)
    ids, _, _, _ = _decoder_inputs(14)
    labels = ids.clone()
    labels[1, 5:] = -100
    with torch.no_grad():
        compare(hf(ids, labels=labels), ours(ids, labels=labels), "CLM loss")
        assert ours(ids, labels=labels).past_key_values is None  # no cache with labels
    with caplog.at_level("WARNING", logger="nezha_zoo"):
        zoo.XLMRobertaXLForCausalLM(XLMRobertaXLConfig(**TINY))
    assert "is_decoder" in caplog.text


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["ForMaskedLM", "ForMultipleChoice", "ForCausalLM"])
def test_save_pretrained_loads_in_transformers(pairs, head, tmp_path):
    hf, ours, _ = pairs.get(head)
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, f"XLMRobertaXL{head}").from_pretrained(tmp_path, attn_implementation="eager").eval()
    inp = inputs_for(head, seed=15)
    with torch.no_grad():
        compare(back(**inp), ours(**inp), f"{head} round trip")
        compare(hf(**inp), back(**inp), f"{head} transformers reload")


def test_base_and_head_prefix_loading(pairs):
    _, base, base_path = pairs.get("Model")
    _, head, head_path = pairs.get("ForTokenClassification")
    # base checkpoint -> head class: the encoder is loaded, the classifier reported missing
    model, info = zoo.XLMRobertaXLForTokenClassification.from_pretrained(base_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert_close(model.roberta.encoder.LayerNorm.weight, base.encoder.LayerNorm.weight, 0.0, "base->head")
    # head checkpoint -> base class: the head's tensors are unexpected, nothing is missing but the pooler
    model, info = zoo.XLMRobertaXLModel.from_pretrained(head_path, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {"classifier.weight", "classifier.bias"}
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    w = head.roberta.embeddings.word_embeddings.weight
    assert_close(model.embeddings.word_embeddings.weight, w, 0.0, "head->base")


def test_shape_mismatch_names_the_tensor(pairs):
    _, _, path = pairs.get("Model")
    with pytest.raises(Exception, match="intermediate.dense.weight"):
        zoo.XLMRobertaXLModel.from_pretrained(path, intermediate_size=41)


# --- bad inputs and training ---------------------------------------------------------------------


def test_longest_input_and_bad_inputs(pairs):
    hf, ours, _ = pairs.get("Model")
    ids = torch.randint(2, 99, (1, LONGEST), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compare(hf(ids), ours(ids), "longest input")
        with pytest.raises(InputError, match="max_position_embeddings"):
            ours(torch.cat([ids, ids[:, :1]], dim=1))
        with pytest.raises(InputError, match="max_position_embeddings"):
            ours(inputs_embeds=torch.zeros(1, LONGEST + 1, TINY["hidden_size"]))
        with pytest.raises(InputError, match="attention_mask"):
            ours(ids, attention_mask=torch.ones(1, LONGEST - 1))
        with pytest.raises(InputError, match="input_ids"):
            ours(torch.tensor([[5, 99]]))
        with pytest.raises(InputError, match="past_key_values"):
            ours(ids[:, :2], past_key_values=((torch.zeros(1, 4, 1, 8),) * 2,) * 2)
        with pytest.raises(InputError):
            ours(input_ids=ids, inputs_embeds=torch.zeros(1, LONGEST, TINY["hidden_size"]))
    with pytest.raises(TypeError, match="XLMRobertaXLConfig"):
        zoo.XLMRobertaXLModel(transformers.XLMRobertaXLConfig(**TINY))


def test_gradient_checkpointing_gives_equal_gradients(pairs):
    _, _, path = pairs.get("ForSequenceClassification")
    inp = inputs_for("ForSequenceClassification", seed=16)
    labels = torch.tensor([0, 1])
    grads = []
    for checkpointing in (False, True):
        model = zoo.XLMRobertaXLForSequenceClassification.from_pretrained(path)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        model.train()
        model(**inp, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 10
    for n, g in grads[0].items():
        assert_close(grads[1][n], g, 1e-6, f"checkpointed grad {n}")


def test_training_dropout_draws_the_masks_transformers_draws(pairs):
    """Dropout on (training), one seed: ours equals transformers' eager model, outputs and gradients.

    transformers' XLM-R-XL has no dropout on the feed-forward output (``XLMRobertaXLOutput`` is ``dense`` +
    residual) but keeps it on the embeddings, the attention probabilities and the attention output; a dropout
    more or less draws other masks from the same seed.
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
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        model.eval()
    (ref, ref_grads), (got, grads) = outs
    assert (ref - plain).abs().max() > 0.1  # dropout really was on
    assert_close(got, ref, TOLERANCES["hidden"], "training-mode output with dropout")
    assert grads.keys() == ref_grads.keys() and ref_grads
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for n, g in ref_grads.items():
        assert_close(grads[n] / scale, g / scale, TOLERANCES["grad_rel"], f"training-mode grad {n}")


def test_training_step_lowers_the_loss(pairs):
    _, _, path = pairs.get("ForMaskedLM")
    model = zoo.XLMRobertaXLForMaskedLM.from_pretrained(path).train()
    inp = inputs_for("ForMaskedLM", seed=17)
    labels = inp["input_ids"].masked_fill(inp["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(**inp, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    # the padding rows of the tied word table and the position table got no gradient
    assert float(np.abs(model.roberta.embeddings.position_embeddings.weight.grad[PAD].numpy()).max()) == 0.0
