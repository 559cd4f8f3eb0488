"""``torch.compile`` of a training step (issue #23): one graph, and the numbers of the eager step.

A graph break splits a compiled step into pieces run between Python (and, for the backward pass, into
pieces stitched by autograd): the step loses the fusions across the break and pays the guards and
the switches. Checks on tensor values stay eager-only (``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from nezha_zoo.spec.registry import get_family, model_class
from nezha_zoo.testing import IBERT_SMOKE, TOLERANCES, assert_close, pin_precision

pytestmark = pytest.mark.pt

HEAD = "ForSequenceClassification"
#: Tiny configs, dropout as the config sets it by default (0.1) unless a test turns it off.
FIELDS = {
    "electra": dict(
        vocab_size=40, embedding_size=8, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16,
    ),
    # I-BERT in float mode still calibrates its activation ranges in training mode (buffers updated in place)
    "ibert": dict(IBERT_SMOKE, num_hidden_layers=1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
}  # fmt: skip


def _model(family: str, dropout: bool) -> torch.nn.Module:
    fields = dict(FIELDS[family], num_labels=2)
    if not dropout:
        fields.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return model_class(family, HEAD, "pt")(get_family(family).config_class(**fields)).train()


def _inputs(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("family", sorted(FIELDS))
def test_training_step_compiles_to_one_graph(family):
    model = _model(family, dropout=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**_inputs(model.config.vocab_size))
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("family", sorted(FIELDS))
def test_compiled_training_step_matches_eager(family):
    pin_precision("pt")
    eager = _model(family, dropout=False)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, dynamic=False)
    for step in range(2):  # I-BERT: the first step adds the batch range, the second one is the running average
        inputs = _inputs(eager.config.vocab_size, seed=step)
        for m in (eager, compiled_model):
            m.zero_grad(set_to_none=True)
        want = eager(**inputs).loss
        want.backward()
        got = compiled(**inputs).loss
        got.backward()
        assert_close(got.detach(), want.detach(), TOLERANCES["loss"], f"step {step} loss")
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            scale = max(float(p.grad.abs().max()), 1e-6)
            assert_close(q.grad / scale, p.grad / scale, TOLERANCES["grad_rel"], f"step {step} grad {name}")
        for (name, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
            assert_close(c, b, TOLERANCES["hidden"], f"step {step} buffer {name}")


def test_calibration_nan_is_an_eager_error():
    model = model_class("ibert", "Model", "pt")(get_family("ibert").config_class(**FIELDS["ibert"])).train()
    embeds = torch.zeros(1, 4, model.config.hidden_size)
    embeds[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN in the activation"):
        model(inputs_embeds=embeds)
