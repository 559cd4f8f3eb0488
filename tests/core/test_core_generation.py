"""GenerationConfig validation, model-config defaults, prompt checks and position rules (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from nezha_zoo import ElectraConfig
from nezha_zoo.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    DecodingLengths,
    GenerationConfig,
    as_streamer,
    check_logits_to_keep,
    check_prompt,
    decoding_lengths,
    effective_bad_words,
    keep_last_positions,
    max_generation_length,
    prepare_generation,
    prompt_position_ids,
    resolve_generation_config,
)
from nezha_zoo.validation import InputError


def test_defaults_follow_transformers():
    gc = GenerationConfig()
    assert (gc.do_sample, gc.temperature, gc.top_k, gc.top_p, gc.seed) == (False, 1.0, 0, 1.0, None)
    assert (gc.num_beams, gc.length_penalty, gc.early_stopping, gc.num_return_sequences) == (1, 1.0, False, 1)
    assert (gc.repetition_penalty, gc.no_repeat_ngram_size, gc.bad_words_ids) == (1.0, 0, None)
    assert (gc.return_dict_in_generate, gc.output_scores, gc.output_logits) == (False, False, False)
    assert gc.eos_ids == () and gc.pad_token_id is None and not gc.is_beam_search
    assert decoding_lengths(gc, 5, None) == DecodingLengths(0, DEFAULT_MAX_NEW_TOKENS)


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
        ("max_length", 0, ValueError),
        ("min_new_tokens", -1, ValueError),
        ("min_length", 1.5, TypeError),
        ("num_beams", 0, ValueError),
        ("num_beams", 2.0, TypeError),
        ("length_penalty", float("inf"), ValueError),
        ("early_stopping", "sometimes", ValueError),
        ("num_return_sequences", 0, ValueError),
        ("num_return_sequences", 2, ValueError),  # greedy returns one sequence per row
        ("repetition_penalty", 0.0, ValueError),
        ("no_repeat_ngram_size", -1, ValueError),
        ("bad_words_ids", [5], TypeError),
        ("bad_words_ids", [[]], TypeError),
        ("bad_words_ids", [[1, -2]], ValueError),
        ("output_scores", "yes", TypeError),
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
    with pytest.raises(TypeError, match="'max_lenght' \\(did you mean 'max_length'"):
        resolve_generation_config(cfg, None, max_lenght=3)
    with pytest.raises(TypeError, match="'beams'"):
        resolve_generation_config(cfg, None, beams=3)
    with pytest.raises(TypeError, match="generation_config"):
        resolve_generation_config(cfg, {"max_new_tokens": 3})


def test_prompt_checks():
    ids = np.array([[0, 5, 6], [4, 5, 6]])
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    got_ids, got_mask = check_prompt(ids, mask, vocab_size=10)
    assert got_ids.dtype == np.int32 and got_mask.tolist() == mask.tolist()
    with pytest.raises(ValueError, match="left-padded"):
        check_prompt(ids, np.array([[1, 1, 0], [1, 1, 1]]), 10)
    with pytest.raises(ValueError, match="left-padded"):
        check_prompt(ids, np.array([[0, 0, 0], [1, 1, 1]]), 10)  # a row with no token
    with pytest.raises(ValueError, match="only 0 and 1"):
        check_prompt(ids, mask * 2, 10)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        check_prompt(ids, mask[:, 1:], 10)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 6\)"):
        check_prompt(ids, mask, 6)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        check_prompt(ids[0], None, 10)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        check_prompt(np.zeros((2, 0), np.int64), None, 10)  # an empty prompt
    with pytest.raises(TypeError, match="integer"):
        check_prompt(ids.astype(np.float32), None, 10)


def test_lengths_resolve_against_the_prompt():
    assert decoding_lengths(GenerationConfig(max_length=10), 4, None) == DecodingLengths(0, 6)
    assert decoding_lengths(GenerationConfig(max_length=10, max_new_tokens=6), 4, 12) == DecodingLengths(0, 6)
    assert decoding_lengths(GenerationConfig(max_new_tokens=5, min_length=6), 4, None) == DecodingLengths(2, 5)
    assert decoding_lengths(GenerationConfig(max_new_tokens=5, min_length=2), 4, None) == DecodingLengths(0, 5)
    assert decoding_lengths(GenerationConfig(max_new_tokens=5, min_new_tokens=5), 4, None) == DecodingLengths(5, 5)
    with pytest.raises(ValueError, match="max_length=4 leaves no room"):
        decoding_lengths(GenerationConfig(max_length=4), 4, None)
    with pytest.raises(ValueError, match="conflicting lengths: max_new_tokens=3"):
        decoding_lengths(GenerationConfig(max_length=10, max_new_tokens=3), 4, None)
    with pytest.raises(ValueError, match="conflicting lengths: min_new_tokens=1"):
        decoding_lengths(GenerationConfig(min_length=10, min_new_tokens=1), 4, None)
    with pytest.raises(ValueError, match="at least 8 new tokens"):
        decoding_lengths(GenerationConfig(max_new_tokens=3, min_length=12), 4, None)
    with pytest.raises(ValueError, match="min_new_tokens \\(4\\) exceeds max_new_tokens \\(3\\)"):
        GenerationConfig(max_new_tokens=3, min_new_tokens=4)
    with pytest.raises(ValueError, match="leaves no room in the model's context of 4"):
        decoding_lengths(GenerationConfig(max_new_tokens=1), 5, 4)
    with pytest.raises(ValueError, match="exceeds the model's maximum sequence length 8"):
        decoding_lengths(GenerationConfig(max_new_tokens=5), 4, 8)


def test_beam_settings():
    gc = GenerationConfig(num_beams=4, num_return_sequences=4, early_stopping="never", length_penalty=-0.5)
    assert gc.is_beam_search and gc.early_stopping == "never" and gc.length_penalty == -0.5
    with pytest.raises(ValueError, match="num_return_sequences \\(5\\) must be <= num_beams \\(4\\)"):
        GenerationConfig(num_beams=4, num_return_sequences=5)
    with pytest.raises(ValueError, match="beam sampling"):
        GenerationConfig(num_beams=2, do_sample=True)
    assert GenerationConfig(do_sample=True, num_return_sequences=3).num_return_sequences == 3
    assert GenerationConfig(bad_words_ids=[[3], (4, 5)]).bad_words_ids == ((3,), (4, 5))
    # as transformers, a one-token bad word that is an eos is not banned (ending stays possible)
    gc = GenerationConfig(bad_words_ids=[[3], [4], (4, 5)], eos_token_id=[4, 9])
    assert effective_bad_words(gc) == ((3,), (4, 5)) and effective_bad_words(GenerationConfig()) == ()


def test_prepare_generation_checks_everything_before_any_work():
    cfg = ElectraConfig(vocab_size=10, max_position_embeddings=8, pad_token_id=0, eos_token_id=None)
    gc, ids, mask = prepare_generation(cfg, "cumsum", None, [[1, 2, 3]], None, max_length=6, min_length=5)
    assert (gc.max_new_tokens, gc.min_new_tokens, gc.max_length, gc.min_length) == (3, 2, None, None)
    assert ids.shape == (1, 3) and mask.tolist() == [[1, 1, 1]]
    with pytest.raises(ValueError, match="eos_token_id holds 12, outside the vocabulary"):
        prepare_generation(cfg, "cumsum", None, [[1]], None, eos_token_id=[3, 12])
    with pytest.raises(ValueError, match="bad_words_ids holds 10"):
        prepare_generation(cfg, "cumsum", None, [[1]], None, bad_words_ids=[[1, 10]])
    with pytest.raises(ValueError, match="leaves no room in the model's context of 8"):
        prepare_generation(cfg, "cumsum", None, [[1] * 9], None)


def test_streamer_protocol():
    seen = []
    streamer = as_streamer(seen.append)
    streamer.put(np.array([1, 2]))
    streamer.end()
    assert [v.tolist() for v in seen] == [[1, 2]]

    class Own:
        def put(self, value):
            pass

        def end(self):
            pass

    own = Own()
    assert as_streamer(own) is own and as_streamer(None) is None
    with pytest.raises(TypeError, match="streamer must have put"):
        as_streamer(42)


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


def test_effective_bad_words_drops_eos_only_entries():
    """As transformers' NoBadWordsLogitsProcessor: a one-token bad word that is an eos id is not banned."""
    gc = GenerationConfig(eos_token_id=[5, 9], bad_words_ids=[[9], [4], [9, 4], [5, 5]])
    assert effective_bad_words(gc) == ((4,), (9, 4), (5, 5))
    assert effective_bad_words(GenerationConfig(bad_words_ids=[[9]])) == ((9,),)


def test_generate_outputs_crops_the_loop_buffers():
    """The shared output assembly: fixed buffers cropped to the steps run / the longest hypothesis."""
    from nezha_zoo.generation import GenerationConfig, generate_outputs
    from nezha_zoo.outputs import GenerateBeamDecoderOnlyOutput

    seqs, buf = np.arange(4 * 8).reshape(4, 8), np.ones((5, 4, 3), np.float32)
    plain = GenerationConfig(max_new_tokens=5)
    assert generate_outputs(plain, 3, seqs, 2, buf, buf).tolist() == seqs[:, :5].tolist()
    out = generate_outputs(GenerationConfig(return_dict_in_generate=True, output_logits=True), 3, seqs, 2, buf, buf)
    assert out.scores is None and len(out.logits) == 2 and out.logits[0].shape == (4, 3)
    beams = np.array([[0, 1, -1, -1, -1], [2, 3, 3, -1, -1], [0, -1, -1, -1, -1], [1, 1, -1, -1, -1]])
    gc = GenerationConfig(num_beams=2, return_dict_in_generate=True, output_scores=True)
    out = generate_outputs(gc, 3, seqs, 4, buf, None, np.zeros(4), beams)
    assert isinstance(out, GenerateBeamDecoderOnlyOutput) and out.sequences.shape == (4, 6)
    assert out.beam_indices.tolist() == beams[:, :3].tolist() and len(out.scores) == 4 and out.logits is None
    assert GenerationConfig(num_beams=3, num_return_sequences=2).rows_per_prompt == 3
    assert GenerationConfig(num_return_sequences=2, do_sample=True).rows_per_prompt == 2


def test_logits_to_keep_is_a_non_negative_int_and_not_with_labels():
    assert check_logits_to_keep(0, True) == 0
    got = check_logits_to_keep(np.int64(3), False)
    assert got == 3 and type(got) is int  # a static value: a plain int keys compiled calls
    for bad in (-1, 1.5, True, None, "2", np.float32(1)):
        with pytest.raises(InputError, match="logits_to_keep must be an int >= 0"):
            check_logits_to_keep(bad, False)
    with pytest.raises(InputError, match="the loss needs every position"):
        check_logits_to_keep(1, True)
    hidden = np.arange(2 * 5 * 3).reshape(2, 5, 3)  # (B, L, H): plain basic slicing, numpy too
    assert keep_last_positions(hidden, 0) is hidden
    assert keep_last_positions(hidden, 2).tolist() == hidden[:, 3:].tolist()
    assert keep_last_positions(hidden, 7).tolist() == hidden.tolist()
    with pytest.raises(InputError):
        keep_last_positions(hidden, 1, labels=hidden[..., 0])
