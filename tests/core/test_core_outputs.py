"""Output classes (field names/order as transformers) and the shared input checks."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from nezha_zoo import outputs
from nezha_zoo.validation import InputError, check_id_range, check_input_shapes, check_length


def _transformers_output_class(name: str):
    import transformers.modeling_outputs as mo

    if hasattr(mo, name):
        return getattr(mo, name)
    if name.startswith("Generate"):
        import transformers.generation.utils as gen

        return getattr(gen, name, None)
    if name == "ElectraForPreTrainingOutput":
        from transformers.models.electra.modeling_electra import ElectraForPreTrainingOutput

        return ElectraForPreTrainingOutput
    if name == "NezhaForPreTrainingOutput":
        from transformers.models.deprecated.nezha.modeling_nezha import NezhaForPreTrainingOutput

        return NezhaForPreTrainingOutput
    return None


@pytest.mark.hf
@pytest.mark.parametrize("cls", outputs.OUTPUT_CLASSES, ids=lambda c: c.__name__)
def test_output_fields_match_transformers(cls):
    theirs = _transformers_output_class(cls.__name__)
    if cls.__name__ == "SentenceEmbeddingOutput":
        assert theirs is None and cls._fields == ("embeddings", "last_hidden_state")  # our own addition
        return
    assert theirs is not None, cls.__name__
    fields = tuple(f.name for f in dataclasses.fields(theirs))
    if cls.__name__.startswith("Generate"):
        # generate() returns the ids and scores, not each step's attentions, hidden states or cache:
        # the same leading fields in the same order, the optional tail left out.
        assert fields[: len(cls._fields)] == cls._fields, cls.__name__
        assert set(fields[len(cls._fields) :]) == {"attentions", "hidden_states", "past_key_values"}
        return
    assert cls._fields == fields


def test_output_classes_cover_every_transformers_return_type_of_the_six_families():
    names = {c.__name__ for c in outputs.OUTPUT_CLASSES}
    for needed in (
        "BaseModelOutput",
        "BaseModelOutputWithPooling",
        "BaseModelOutputWithPastAndCrossAttentions",
        "BaseModelOutputWithPoolingAndCrossAttentions",
        "CausalLMOutputWithCrossAttentions",
        "MaskedLMOutput",
        "MultipleChoiceModelOutput",
        "NextSentencePredictorOutput",
        "QuestionAnsweringModelOutput",
        "SequenceClassifierOutput",
        "SequenceClassifierOutputWithPast",
        "TokenClassifierOutput",
        "ElectraForPreTrainingOutput",
        "NezhaForPreTrainingOutput",
    ):
        assert needed in names and needed in outputs.__all__, needed


def test_output_access_and_tuple():
    logits, hidden = np.ones((2, 3)), (np.zeros(1), np.zeros(2))
    out = outputs.SequenceClassifierOutput(logits=logits, hidden_states=hidden)
    assert out.logits is logits and out["logits"] is logits and out[0] is logits
    assert out.loss is None and "loss" not in out and out[1] is hidden
    assert out.to_tuple() == (logits, hidden) and list(out.keys()) == ["logits", "hidden_states"]
    assert out[:1] == (logits,)
    out["loss"] = 0.5  # set later, still in declared order
    assert list(out.keys()) == ["loss", "logits", "hidden_states"] and out[0] == 0.5
    out.loss = None
    assert "loss" not in out
    with pytest.raises(TypeError, match="no field"):
        outputs.MaskedLMOutput(logits=1, start_logits=2)
    with pytest.raises(AttributeError, match="no field"):
        out.pooler_output = 1
    with pytest.raises(AttributeError):
        out.nonexistent  # noqa: B018
    with pytest.raises(KeyError):
        out["pooler_output"] = 1
    again = pickle.loads(pickle.dumps(out))
    assert type(again) is type(out) and list(again.keys()) == ["logits", "hidden_states"]
    assert "shape=(2, 3)" in repr(out)


# --- validation helpers ---------------------------------------------------------------------------


def test_check_input_shapes():
    assert check_input_shapes((2, 5), None, {"attention_mask": (2, 5), "token_type_ids": None}) == (2, 5)
    assert check_input_shapes(None, (2, 5, 8), {"attention_mask": (2, 5)}, hidden_size=8) == (2, 5)
    assert check_input_shapes((2, 3, 5), None, {}, rank=3) == (2, 3, 5)
    assert check_input_shapes((None, 5), None, {"attention_mask": (4, None)}) == (None, 5)
    with pytest.raises(InputError, match="not both"):
        check_input_shapes((2, 5), (2, 5, 8), {})
    with pytest.raises(InputError, match="give input_ids or inputs_embeds"):
        check_input_shapes(None, None, {})
    with pytest.raises(InputError, match="attention_mask has shape \\(2, 4\\)"):
        check_input_shapes((2, 5), None, {"attention_mask": (2, 4)})
    with pytest.raises(InputError, match="rank 2"):
        check_input_shapes((10,), None, {})
    with pytest.raises(InputError, match="last dimension must be 8"):
        check_input_shapes(None, (2, 5, 7), {}, hidden_size=8)
    assert issubclass(InputError, ValueError)


def test_check_id_range_and_length():
    check_id_range("input_ids", 0, 9, 10)
    with pytest.raises(InputError, match="input_ids contains id 10, outside the vocabulary \\[0, 10\\)"):
        check_id_range("input_ids", 0, 10, 10)
    with pytest.raises(InputError, match="id -1"):
        check_id_range("token_type_ids", -1, 0, 2, what="token types")
    check_length(8, 0, 8)
    check_length(None, 100, 8)
    with pytest.raises(InputError, match="length 9 exceeds the model's max_position_embeddings \\(8\\)"):
        check_length(9, 0, 8)
    with pytest.raises(InputError, match="after 3 cached positions"):
        check_length(6, 3, 8)
