"""The last layer computes only the positions a sequence-level head reads (issue #23, ``nezha_zoo.spec.pooling``).

Every sequence-classification head passes ``positions_to_keep`` to its base model, whose last layer then
runs its queries, residuals, LayerNorms and feed-forward block at the pooled row only.  Checked here, per
family: the pruned head equals the full computation of the same model (``output_hidden_states=True``
turns pruning off) in logits, loss and gradients, in eval and in training mode with dropout (same seed,
same masks); it equals transformers' head in training mode (dropout masks included, padded rows, token
types); the last layer really sees R rows; bad ``positions_to_keep`` is an ``InputError``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
import transformers

import nezha_zoo.pt as zoo
import nezha_zoo.pt.nezha as pt_nezha
from nezha_zoo.spec.pooling import FIRST, LAST_NON_PAD
from nezha_zoo.spec.registry import get_family
from nezha_zoo.testing import TINY_BERT, TOLERANCES, assert_close, pin_precision, tiny_inputs
from nezha_zoo.validation import InputError

pytestmark = [pytest.mark.pt, pytest.mark.hf]

_BERT = dict(TINY_BERT, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)
#: family -> (class prefix, base attribute, config fields, padding id, token types, the last layer's FFN input dense)
FAMILIES = {
    "electra": ("Electra", "electra", dict(_BERT, embedding_size=24, max_position_embeddings=64), 0, True,
                "encoder.layer.1.intermediate.dense"),
    "nezha": ("Nezha", "nezha", dict(_BERT, max_position_embeddings=16, max_relative_position=3), 0, True,
              "encoder.layer.1.intermediate.dense"),
    "mpnet": ("MPNet", "mpnet", dict(_BERT, max_position_embeddings=40), 1, False,
              "encoder.layer.1.intermediate.dense"),
    "xlm_roberta_xl": ("XLMRobertaXL", "roberta", dict(_BERT, max_position_embeddings=40, type_vocab_size=2), 1, True,
                       "encoder.layer.1.intermediate.dense"),
    "mpt": ("Mpt", "transformer", dict(d_model=32, n_heads=4, n_layers=2, vocab_size=99, max_seq_len=16,
                                       pad_token_id=0, attn_config=dict(attn_pdrop=0.2)), 0, False,
            "blocks.1.ffn.up_proj"),
}  # fmt: skip
HEAD = "ForSequenceClassification"
B, L = 3, 7


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")


class Pairs:
    """(transformers model, our model) per family, built once for the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict = {}

    def get(self, family: str):
        if family not in self.cache:
            prefix, _, fields, *_ = FAMILIES[family]
            torch.manual_seed(len(self.cache))
            config = getattr(transformers, f"{prefix}Config")(**fields, num_labels=3)
            config._attn_implementation = "eager"  # nn.Dropout on the probabilities, as our attention draws
            hf = getattr(transformers, f"{prefix}{HEAD}")(config).eval()
            path = self.root / family
            hf.save_pretrained(path)
            self.cache[family] = (hf, getattr(zoo, f"{prefix}{HEAD}").from_pretrained(path).eval())
        return self.cache[family]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("pooled_positions"))


def _inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Padded rows (MPT: one left-padded, one right-padded row), token types where the family has them."""
    _, _, fields, pad, types, _ = FAMILIES[family]
    raw = tiny_inputs(batch=B, seq_len=L, vocab_size=99, type_vocab_size=2 if types else None, seed=seed, pad=pad)
    inp = {k: torch.from_numpy(v) for k, v in raw.items()}
    if family == "mpt":  # the head reads each row's last non-pad token: left padding moves it
        ids = torch.randint(2, 99, (B, L), generator=torch.Generator().manual_seed(seed))
        ids[1, :3] = pad
        ids[2, 5:] = pad
        inp = {"input_ids": ids, "attention_mask": (ids != pad).long()}
    inp["labels"] = torch.tensor([0, 2, 1])
    return inp


def _run(model, inputs: dict, seed: int, **flags):
    """Logits, loss and every parameter's gradient of one step under ``torch.manual_seed(seed)``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs, **flags)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _same_step(got, want, what: str) -> None:
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, want
    assert_close(logits, ref_logits, TOLERANCES["logits"], f"{what} logits")
    assert_close(loss, ref_loss, TOLERANCES["loss"], f"{what} loss")
    assert set(grads) == set(ref_grads), f"{what}: gradients of {set(grads) ^ set(ref_grads)}"
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    for n, g in ref_grads.items():
        assert_close(grads[n] / scale, g / scale, TOLERANCES["grad_rel"], f"{what} grad {n}")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_head_equals_the_full_computation(pairs, family, training):
    _, ours = pairs.get(family)
    inputs = _inputs(family, seed=1)
    ours.train(training)
    try:
        pruned = _run(ours, inputs, seed=7)
        full = _run(ours, inputs, seed=7, output_hidden_states=True)  # hidden states turn pruning off
        if training:  # dropout was on: another seed draws other masks, so the same masks were drawn above
            other = _run(ours, inputs, seed=8)
            assert (other[0] - pruned[0]).abs().max() > 1e-3
    finally:
        ours.eval()
    _same_step(pruned, full, f"{family} {'train' if training else 'eval'} pruned vs full")
    # Defaulted inputs (no mask, no token types): the pruned head still equals the full one.
    ids = {"input_ids": inputs["input_ids"], "labels": inputs["labels"]}
    _same_step(_run(ours, ids, seed=0), _run(ours, ids, seed=0, output_attentions=True), f"{family} defaulted")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_training_step_matches_transformers(pairs, family):
    """Training mode, dropout on, one seed: the pruned head draws transformers' dropout masks."""
    hf, ours = pairs.get(family)
    inputs = _inputs(family, seed=2)
    steps = []
    for model, seed in ((hf, 11), (ours, 11), (hf, 12)):
        model.train()
        try:
            steps.append(_run(model, inputs, seed=seed))
        finally:
            model.eval()
    ref, got, other = steps
    assert (ref[0] - other[0]).abs().max() > 1e-3  # dropout really was on
    _same_step(got, ref, f"{family} pruned vs transformers, training")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_layer_runs_on_the_kept_rows_only(pairs, family):
    _, ours = pairs.get(family)
    prefix, base, *_, ffn_in = FAMILIES[family]
    assert get_family(family).pooling == (LAST_NON_PAD if family == "mpt" else FIRST)
    body = getattr(ours, base)
    seen: list[tuple[int, ...]] = []
    hook = body.get_submodule(ffn_in).register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    first = body.get_submodule(ffn_in.replace(".1.", ".0."))
    hook_first = first.register_forward_hook(lambda m, args, out: seen.append(("first", *args[0].shape)))
    inputs = _inputs(family)
    try:
        with torch.no_grad():
            ours(**inputs)
            assert seen == [("first", B, L, first.in_features), (B, 1, first.in_features)], seen
            for flag in ("output_hidden_states", "output_attentions"):
                seen.clear()
                ours(**inputs, **{flag: True})
                assert seen[-1] == (B, L, first.in_features), (flag, seen)
    finally:
        hook.remove()
        hook_first.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_model_returns_the_kept_rows(pairs, family):
    """``positions_to_keep`` on the base model: ``last_hidden_state`` (B, R, H) equals those rows of the full one."""
    _, ours = pairs.get(family)
    body = getattr(ours, FAMILIES[family][1])
    inputs = {k: v for k, v in _inputs(family).items() if k != "labels"}
    keep = torch.tensor([[0, 4], [6, 2], [3, 3]])
    with torch.no_grad():
        full = body(**inputs).last_hidden_state
        kept = body(**inputs, positions_to_keep=keep).last_hidden_state
    assert kept.shape == (B, 2, full.shape[-1])
    want = full.gather(1, keep[:, :, None].expand(-1, -1, full.shape[-1]))
    assert_close(kept, want, TOLERANCES["hidden"], f"{family} kept rows")


def test_nezha_relative_lookup_keeps_rows(pairs, monkeypatch):
    """Nezha's relative terms as a bucket lookup (long sequences), not the dense tensor: same pruned head."""
    _, ours = pairs.get("nezha")
    inputs = _inputs("nezha", seed=3)
    dense = _run(ours, inputs, seed=0, output_hidden_states=True)
    monkeypatch.setattr(pt_nezha, "DENSE_RELATIVE_ELEMENTS", 0)
    _same_step(_run(ours, inputs, seed=0), dense, "nezha lookup pruned vs dense full")


def _assert_head_prunes_to_the_first_position(family: str, head: str, choices: int | None) -> None:
    """``head`` of ``family`` runs its last layer at one row per sequence and equals the full computation."""
    prefix, base, fields, pad, types, ffn_in = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(zoo, f"{prefix}{head}")(get_family(family).config_class(**fields)).eval()
    types = 2 if types else None
    raw = tiny_inputs(batch=2, seq_len=L, vocab_size=99, type_vocab_size=types, pad=pad, num_choices=choices)
    inputs = {k: torch.from_numpy(v) for k, v in raw.items()}
    inputs["labels"] = torch.tensor([0, 1])
    rows: list[int] = []
    hook = getattr(model, base).get_submodule(ffn_in).register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
    try:
        pruned = _run(model, inputs, seed=0)
        full = _run(model, inputs, seed=0, output_hidden_states=True)
    finally:
        hook.remove()
    assert rows == [1, L]
    _same_step(pruned, full, f"{family} {head}")


@pytest.mark.parametrize("family", ["electra", "nezha", "mpnet", "xlm_roberta_xl"])
def test_multiple_choice_prunes_to_the_first_position(family):
    _assert_head_prunes_to_the_first_position(family, "ForMultipleChoice", choices=3)


def test_next_sentence_prediction_prunes_to_the_first_position():
    """Nezha's next-sentence head reads the pooler only, i.e. position 0 of the last layer."""
    _assert_head_prunes_to_the_first_position("nezha", "ForNextSentencePrediction", choices=None)


def test_electra_multiple_choice_with_another_summary_keeps_every_position():
    _, _, fields, *_, ffn_in = FAMILIES["electra"]
    model = zoo.ElectraForMultipleChoice(get_family("electra").config_class(**fields, summary_type="mean")).eval()
    rows: list[int] = []
    hook = model.electra.get_submodule(ffn_in).register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(2, 99, (2, 3, L)))
    finally:
        hook.remove()
    assert rows == [L]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bad_positions_to_keep_raise_input_error(pairs, family):
    _, ours = pairs.get(family)
    body = getattr(ours, FAMILIES[family][1])
    ids = _inputs(family)["input_ids"]
    cases = [
        (dict(positions_to_keep=torch.zeros(B, dtype=torch.long)), "shape"),
        (dict(positions_to_keep=torch.zeros(B + 1, 1, dtype=torch.long)), "shape"),
        (dict(positions_to_keep=torch.zeros(B, 1)), "integers"),
        (dict(positions_to_keep=torch.full((B, 1), L)), r"\[0, 7\)"),
        (dict(positions_to_keep=torch.full((B, 1), -1)), r"\[0, 7\)"),
        (dict(positions_to_keep=torch.zeros(B, 1, dtype=torch.long), output_hidden_states=True), "off"),
        (dict(positions_to_keep=torch.zeros(B, 1, dtype=torch.long), output_attentions=True), "off"),
    ]
    for kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            body(ids, **kw)


@pytest.mark.parametrize("family", ["electra", "mpt"])
def test_pruned_head_with_gradient_checkpointing(pairs, family):
    """The checkpointed last layer recomputes the pruned rows with the same dropout masks."""
    _, ours = pairs.get(family)
    inputs = _inputs(family, seed=4)
    ours.train()
    try:
        full = _run(ours, inputs, seed=3, output_hidden_states=True)
        ours.gradient_checkpointing_enable()
        pruned = _run(ours, inputs, seed=3)
    finally:
        ours.gradient_checkpointing_disable()
        ours.eval()
    _same_step(pruned, full, f"{family} checkpointed pruned vs full")


def test_pruned_mpt_training_step_compiles_to_one_graph(pairs):
    """MPT's pruned block (split Wqkv, gathered ALiBi mask, full-shape dropout draws) has no graph break.

    (The BERT-style layers' pruned path is ``tests/pt/test_compile_pt.py``'s Electra step.)
    """
    _, ours = pairs.get("mpt")
    torch._dynamo.reset()
    ours.train()
    try:
        explained = torch._dynamo.explain(ours)(**_inputs("mpt"))
    finally:
        ours.eval()
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1
