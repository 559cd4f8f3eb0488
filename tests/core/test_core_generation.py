"""GenerationConfig validation, model-config defaults, prompt checks and position rules (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from nezha_zoo import ElectraConfig
from nezha_zoo.generation import (
    GenerationConfig,
    check_prompt,
    max_generation_length,
    prompt_position_ids,
    resolve_generation_config,
)


def test_defaults_follow_transformers():
    gc = GenerationConfig()
    assert (gc.max_new_tokens, gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.seed) == (
        20,
        False,
        1.0,
        0,
        1.0,
        None,
    )
    assert gc.eos_ids == () and gc.pad_token_id is None


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("max_new_tokens", 0, ValueError),
        ("max_new_tokens", 2.0, TypeError),
        ("do_sample", 1, TypeError),
        ("temperature", 0.0, ValueError),
        ("temperature", float("nan"), ValueError),
        ("temperature", "hot", TypeError),
        ("top_k", -1, ValueError),
        ("top_k", 2.5, TypeError),
        ("top_p", 0.0, ValueError),
        ("top_p", 1.5, ValueError),
        ("seed", -3, ValueError),
        ("seed", 2**31, ValueError),
        ("seed", "0", TypeError),
        ("eos_token_id", [], TypeError),
        ("eos_token_id", -1, ValueError),
        ("eos_token_id", [1, "2"], TypeError),
        ("pad_token_id", -2, ValueError),
    ],
)
def test_bad_values_name_the_field(field, value, error):
    with pytest.raises(error, match=field):
        GenerationConfig(**{field: value})


def test_eos_list_and_pad_default_from_model_config():
    cfg = ElectraConfig(vocab_size=50, pad_token_id=3, eos_token_id=7)
    gc = resolve_generation_config(cfg, None)
    assert gc.eos_ids == (7,) and gc.pad_token_id == 3
    gc = resolve_generation_config(cfg, None, eos_token_id=[4, 5], pad_token_id=None)
    assert gc.eos_ids == (4, 5) and gc.pad_token_id == 3  # None keeps the default
    no_pad = ElectraConfig(vocab_size=50, pad_token_id=None, eos_token_id=9)
    assert resolve_generation_config(no_pad, None).pad_token_id == 9  # as transformers: pad <- eos
    base = GenerationConfig(max_new_tokens=4, top_k=3)
    assert resolve_generation_config(cfg, base, top_p=0.5) == GenerationConfig(max_new_tokens=4, top_k=3, top_p=0.5)
    with pytest.raises(TypeError, match="max_length"):
        resolve_generation_config(cfg, None, max_length=3)
    with pytest.raises(TypeError, match="generation_config"):
        resolve_generation_config(cfg, {"max_new_tokens": 3})


def test_prompt_checks():
    ids = np.array([[0, 5, 6], [4, 5, 6]])
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    got_ids, got_mask = check_prompt(ids, mask, vocab_size=10, max_new_tokens=2, max_length=5)
    assert got_ids.dtype == np.int32 and got_mask.tolist() == mask.tolist()
    with pytest.raises(ValueError, match="left-padded"):
        check_prompt(ids, np.array([[1, 1, 0], [1, 1, 1]]), 10, 2, None)
    with pytest.raises(ValueError, match="left-padded"):
        check_prompt(ids, np.array([[0, 0, 0], [1, 1, 1]]), 10, 2, None)  # a row with no token
    with pytest.raises(ValueError, match="only 0 and 1"):
        check_prompt(ids, mask * 2, 10, 2, None)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        check_prompt(ids, mask[:, 1:], 10, 2, None)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 6\)"):
        check_prompt(ids, mask, 6, 2, None)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        check_prompt(ids[0], None, 10, 2, None)
    with pytest.raises(TypeError, match="integer"):
        check_prompt(ids.astype(np.float32), None, 10, 2, None)
    with pytest.raises(ValueError, match="exceeds the model's maximum sequence length 4"):
        check_prompt(ids, mask, 10, 2, 4)


def test_position_rules_number_real_tokens_like_an_unpadded_row():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    electra = ElectraConfig(vocab_size=10)
    assert prompt_position_ids(mask, "cumsum", electra).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]

    class Roberta:
        pad_token_id = 1
        max_position_embeddings = 20

    assert prompt_position_ids(mask, "padding_aware", Roberta).tolist() == [[1, 1, 2, 3, 4], [2, 3, 4, 5, 6]]
    assert prompt_position_ids(mask, None, electra) is None
    with pytest.raises(ValueError, match="unknown position rule"):
        prompt_position_ids(mask, "alibi", electra)
    assert max_generation_length(Roberta, "padding_aware") == 18  # positions 2 .. 19
    assert max_generation_length(electra, "cumsum") == electra.max_position_embeddings
