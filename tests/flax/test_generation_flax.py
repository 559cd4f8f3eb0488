"""Flax generation: the whole decoding loop under one ``jax.jit`` over the fixed-size cache.

Greedy and beam search (tokens, ``sequences_scores``, ``beam_indices``, per-step scores and logits)
equal transformers' PyTorch ``generate`` on the same weights, with the logits processors
(repetition penalty, n-gram ban, bad words, min new tokens), eos lists, ``max_length`` and
left-padded batches; the processors one by one against transformers' classes; the sampling
warpers; seeded sampling with several sequences per prompt; the streamer; bad arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nezha_zoo import ElectraConfig
from nezha_zoo.families.mpt import MptConfig
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig
from nezha_zoo.flax.electra import FlaxElectraForCausalLM
from nezha_zoo.flax.generation import (
    apply_processors,
    apply_repetition_penalty,
    ban_bad_words,
    ban_repeated_ngrams,
    greedy_choice,
    process_logits,
    top_k_filter,
    top_p_filter,
)
from nezha_zoo.flax.mpt import FlaxMptForCausalLM
from nezha_zoo.flax.xlm_roberta_xl import FlaxXLMRobertaXLForCausalLM
from nezha_zoo.generation import GenerationConfig
from nezha_zoo.testing import pin_precision, random_checkpoints

pytestmark = [pytest.mark.flax, pytest.mark.hf]

# initializer_range 0.3 and these weight seeds give top-2 logit margins > 1e-2 at every greedy step
# of the prompts below (asserted in the PyTorch and cross-backend tests on the same weights).
CASES = {
    "electra": (
        lambda: ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                              is_decoder=True, initializer_range=0.3),
        1, FlaxElectraForCausalLM, "ElectraForCausalLM",
    ),
    "xlm_roberta_xl": (
        lambda: XLMRobertaXLConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, is_decoder=True,
                                   initializer_range=0.3),
        1, FlaxXLMRobertaXLForCausalLM, "XLMRobertaXLForCausalLM",
    ),
    "mpt": (
        lambda: MptConfig(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, initializer_range=0.3),
        2, FlaxMptForCausalLM, "MptForCausalLM",
    ),
}  # fmt: skip
NEW = 8


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("flax")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> checkpoint directory (built on first use)."""
    return random_checkpoints(tmp_path_factory.mktemp, "ForCausalLM", lambda key: (CASES[key][0](), CASES[key][1]))


@pytest.fixture(scope="module")
def models(checkpoint):
    built = {}

    def get(key):
        if key not in built:
            built[key] = CASES[key][2].from_pretrained(checkpoint(key))
        return built[key]

    return get


@pytest.fixture(scope="module")
def hf_models(checkpoint):
    """family -> transformers' PyTorch model on the same weights (loaded once; generate leaves it unchanged)."""
    return functools.cache(lambda key: getattr(transformers, CASES[key][3]).from_pretrained(checkpoint(key)).eval())


def _prompt(cfg):
    """Three rows of 6 tokens, rows 1 and 2 left-padded by 2 and 3, pads holding pad_token_id."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (3, 6))
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return np.where(mask == 1, ids, cfg.pad_token_id or 0), mask


# --- generate -------------------------------------------------------------------------------------


# Plain greedy decoding against transformers, every family (the same weights, prompt and settings as
# here, and the top-2 logit margin asserted): test_generation_cross_backend.py's
# test_greedy_tokens_identical_across_backends, which runs Flax beside PyTorch and TensorFlow.


def test_generate_is_one_compiled_loop(models):
    """The loop is traced once per (shape, settings): a second prompt of the same shape reuses it."""
    model = models("electra")
    ids, mask = _prompt(model.config)
    model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)
    fns = [f for f in model.__dict__["_generate_fns"].values()]
    assert len(fns) >= 1
    before = fns[-1]._cache_size()
    model.generate(ids[::-1].copy(), attention_mask=mask[::-1].copy(), max_new_tokens=NEW, eos_token_id=None)
    assert fns[-1]._cache_size() == before


@pytest.mark.parametrize("key", ["electra"])  # MPT: in test_generation_cross_backend.py
def test_left_padded_rows_generate_what_unpadded_prompts_do(key, models):
    model = models(key)
    ids, mask = _prompt(model.config)
    batch = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None))
    for row in range(3):
        alone = model.generate(ids[row : row + 1, mask[row] == 1], max_new_tokens=NEW, eos_token_id=None)
        assert batch[row, 6:].tolist() == alone[0, -NEW:].tolist(), f"row {row}"


def test_eos_finishes_rows_pads_them_and_stops(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    free = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None))
    eos = int(free[0, 7])  # row 0's second new token
    out = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=97))
    for row in range(3):
        new = free[row, 6:].tolist()
        if eos in new:
            stop = new.index(eos)
            want = new[: stop + 1] + [97] * (out.shape[1] - 6 - stop - 1)
        else:
            want = new[: out.shape[1] - 6]
        assert out[row, 6:].tolist() == want, f"row {row}"
    firsts = [int(t) for t in free[:, 6]]  # every row finishes at its first token: the loop stops
    short = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=firsts, pad_token_id=97)
    assert short.shape == (3, 7) and np.asarray(short)[:, 6].tolist() == firsts


def test_max_new_tokens_and_prompt_kept(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    # the greedy settings of the tests above (left padding, eos), so that their compiled loop serves
    out = model.generate(
        ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=NEW, pad_token_id=0)
    )
    assert out.shape == (3, 6 + NEW) and out.dtype == jnp.int32
    assert out[:, :6].tolist() == ids.tolist()


def test_warpers_match_transformers():
    raw = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in ((1.0, 5, 1.0), (1.0, 0, 0.8), (0.7, 10, 0.9), (1.3, 1, 0.5), (1.0, 0, 0.05)):
        gc = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        want = torch.from_numpy(raw.copy())
        if temperature != 1.0:
            want = TemperatureLogitsWarper(temperature)(None, want)
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(None, want)
        want = want.numpy()
        got = np.asarray(process_logits(jnp.asarray(raw), gc))
        assert (np.isinf(got) == np.isinf(want)).all()
        kept = ~np.isinf(want)
        np.testing.assert_allclose(got[kept], want[kept], rtol=0, atol=1e-6)


def test_top_k_filter_under_jit_is_exact_and_sorts_nothing():
    # XLA lowers a top-k whose values are only sliced to a full sort of the row (40x slower at B=8,
    # V=30522 on CPU); the filter must stay a partial top-k and keep the k-th value's ties.
    raw = np.random.default_rng(5).standard_normal((3, 997)).astype(np.float32)
    raw[0, :20] = 4.0  # ties at the k-th value: all kept
    raw[1, 3:] = -np.inf  # fewer finite values than k
    want = TopKLogitsWarper(7)(None, torch.from_numpy(raw.copy())).numpy()
    compiled = jax.jit(lambda x: top_k_filter(x, 7))
    np.testing.assert_array_equal(np.asarray(compiled(jnp.asarray(raw))), want)
    hlo = compiled.lower(jnp.asarray(raw)).compile().as_text()
    assert " sort(" not in hlo


def test_top_p_filter_under_jit_matches_transformers():
    raw = np.random.default_rng(6).standard_normal((3, 997)).astype(np.float32) * 3
    raw[0, :30] = 2.5  # ties
    raw[1, 4:] = -np.inf
    for top_p in (0.05, 0.5, 0.9):
        want = TopPLogitsWarper(top_p)(None, torch.from_numpy(raw.copy())).numpy()
        got = np.asarray(jax.jit(lambda x, p=top_p: top_p_filter(x, p))(jnp.asarray(raw)))
        np.testing.assert_array_equal(got, want)


def test_greedy_ties_go_to_the_lowest_id():
    logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    assert greedy_choice(logits).tolist() == [1, 0]


def test_seeded_sampling_is_reproducible(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=2.0, eos_token_id=None)
    a = np.asarray(model.generate(ids, seed=11, **kw))
    assert a.tolist() == model.generate(ids, seed=11, **kw).tolist()
    assert a.tolist() != model.generate(ids, seed=12, **kw).tolist()
    greedy = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None))
    assert model.generate(ids, seed=5, top_k=1, **kw).tolist() == greedy.tolist()


def test_bad_arguments_raise(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, top_p=0.0)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, attention_mask=mask[:, ::-1].copy())
    with pytest.raises(ValueError, match="maximum sequence length 64"):
        model.generate(ids, max_new_tokens=60)
    with pytest.raises(TypeError, match="num_beam"):
        model.generate(ids, num_beam=2)  # a misspelt setting


# --- beam search and processors against transformers ----------------------------------------------

SCORE_ATOL = 1e-5


def _hf_generate(hf, ids, mask, **settings):
    with torch.no_grad():
        return hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **settings)


def _assert_steps_close(got, want, what):
    """Per-step (rows, V) arrays equal within SCORE_ATOL, -inf where transformers has -inf."""
    assert len(got) == len(want), f"{what}: {len(got)} steps, transformers {len(want)}"
    for step, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), b.numpy()
        assert a.shape == b.shape, f"{what} step {step}: shape {a.shape} vs {b.shape}"
        assert (np.isneginf(a) == np.isneginf(b)).all(), f"{what} step {step}: -inf entries differ"
        finite = ~np.isneginf(b)
        np.testing.assert_allclose(a[finite], b[finite], rtol=0, atol=SCORE_ATOL, err_msg=f"{what} step {step}")


def _eos_seen_in_beams(hf, ids, mask, **settings):
    """Two token ids transformers' beams emit early (so that hypotheses finish before the limit)."""
    free = _hf_generate(hf, ids, mask, eos_token_id=None, **settings).numpy()
    return sorted({int(free[0, ids.shape[1] + 1]), int(free[-1, ids.shape[1] + 3])})


PROCESSORS = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[7], [11, 12]])


@pytest.mark.parametrize(
    "key, early_stopping, length_penalty, processors",
    [
        ("electra", True, 1.5, False),
        ("electra", False, 1.5, True),
        ("electra", "never", 1.5, False),
        ("xlm_roberta_xl", True, 1.5, False),
        ("xlm_roberta_xl", False, 0.7, False),
        ("xlm_roberta_xl", "never", 1.5, True),
        ("mpt", True, 1.5, True),
        ("mpt", False, 0.7, False),
        ("mpt", "never", -0.5, False),
    ],
)
def test_beam_search_matches_transformers(key, early_stopping, length_penalty, processors, hf_models, models):
    model, hf = models(key), hf_models(key)
    ids, mask = _prompt(model.config)
    settings = dict(
        max_new_tokens=7,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    if processors:
        settings.update(PROCESSORS)
    settings["eos_token_id"] = _eos_seen_in_beams(hf, ids, mask, **settings)
    settings.update(pad_token_id=4, return_dict_in_generate=True, output_scores=True, output_logits=True)
    want = _hf_generate(hf, ids, mask, **settings)
    got = model.generate(ids, attention_mask=mask, **settings)
    assert type(got).__name__ == "GenerateBeamDecoderOnlyOutput"
    assert np.asarray(got.sequences).tolist() == want.sequences.tolist()
    assert np.asarray(got.beam_indices).tolist() == want.beam_indices.tolist()
    np.testing.assert_allclose(np.asarray(got.sequences_scores), want.sequences_scores.numpy(), atol=SCORE_ATOL)
    _assert_steps_close(got.scores, want.scores, "scores")
    _assert_steps_close(got.logits, want.logits, "logits")
    # Some returned hypothesis ended with an eos, so the finished-hypothesis bookkeeping was exercised.
    assert np.isin(np.asarray(got.sequences)[:, 6:], settings["eos_token_id"]).any()
    # The same call returning ids only.
    plain = {
        k: v for k, v in settings.items() if k not in ("return_dict_in_generate", "output_scores", "output_logits")
    }
    assert np.asarray(model.generate(ids, attention_mask=mask, **plain)).tolist() == want.sequences.tolist()


@pytest.mark.parametrize("key", list(CASES))
def test_greedy_processors_and_scores_match_transformers(key, hf_models, models):
    """Repetition penalty, n-gram ban, bad words (one and two tokens), min_new_tokens with an eos list."""
    model, hf = models(key), hf_models(key)
    ids, mask = _prompt(model.config)
    free = _hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0).numpy()
    # Ban row 0's first new token outright and, after row 1's first new token, its second one.
    bad = [[int(free[0, 6])], [int(free[1, 6]), int(free[1, 7])]]
    eos = [int(free[2, 6]), int(free[0, 8])]  # would end row 2 at once: min_new_tokens holds it off
    settings = dict(
        max_new_tokens=NEW,
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        bad_words_ids=bad,
        min_new_tokens=3,
        eos_token_id=eos,
        pad_token_id=3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    want = _hf_generate(hf, ids, mask, **settings)
    got = model.generate(ids, attention_mask=mask, **settings)
    assert type(got).__name__ == "GenerateDecoderOnlyOutput"
    assert np.asarray(got.sequences).tolist() == want.sequences.tolist()
    _assert_steps_close(got.scores, want.scores, "scores")
    _assert_steps_close(got.logits, want.logits, "logits")
    new = np.asarray(got.sequences)[:, 6:]
    assert not np.isin(new[:, :3], eos).any()  # no eos before min_new_tokens
    assert int(free[0, 6]) not in new.tolist()[0]


def test_max_length_matches_transformers(hf_models, models):
    model, hf = models("electra"), hf_models("electra")
    ids, mask = _prompt(model.config)
    # max_length = 6 + NEW: the loop the greedy tests compiled serves (lengths are resolved before the key)
    want = _hf_generate(hf, ids, mask, max_length=6 + NEW, eos_token_id=None, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_length=6 + NEW, eos_token_id=None, pad_token_id=0)
    assert got.shape == (3, 6 + NEW) and np.asarray(got).tolist() == want.tolist()
    again = model.generate(ids, attention_mask=mask, max_length=6 + NEW, max_new_tokens=NEW, eos_token_id=None)
    assert np.asarray(again).tolist() == want.tolist()  # agreeing lengths are fine


def _random_ids(rng, rows, width, vocab):
    return rng.integers(0, vocab, (rows, width)).astype(np.int32)


def test_processors_match_transformers_one_by_one():
    """Each processor against transformers' own class on random scores, over a fixed buffer whose
    unfilled columns (-1) must count for nothing."""
    rng = np.random.default_rng(7)
    vocab, rows, width = 12, 5, 9
    scores = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    buffer = _random_ids(rng, rows, width, 4)  # a small alphabet: many repeats
    for length in (1, 2, 4, 7):
        seq = np.where(np.arange(width) < length, buffer, -1).astype(np.int32)
        ids = torch.from_numpy(buffer[:, :length].astype(np.int64))
        want = RepetitionPenaltyLogitsProcessor(1.7)(ids, torch.from_numpy(scores)).numpy()
        np.testing.assert_allclose(np.asarray(apply_repetition_penalty(jnp.asarray(scores), seq, 1.7)), want)
        for n in (1, 2, 3):
            want = NoRepeatNGramLogitsProcessor(n)(ids, torch.from_numpy(scores)).numpy()
            got = np.asarray(ban_repeated_ngrams(jnp.asarray(scores), jnp.asarray(seq), jnp.int32(length), n))
            np.testing.assert_array_equal(got, want, err_msg=f"n={n} length={length}")
        words = ((3,), (1, 2), (0, 0, 1), (2, 3, 0, 1, 2))
        want = NoBadWordsLogitsProcessor([list(w) for w in words])(ids, torch.from_numpy(scores)).numpy()
        got = np.asarray(ban_bad_words(jnp.asarray(scores), jnp.asarray(seq), jnp.int32(length), words))
        np.testing.assert_array_equal(got, want, err_msg=f"length={length}")
        # apply_processors: min_new_tokens with an eos list, and an eos-only bad word that transformers drops.
        gc = GenerationConfig(min_new_tokens=3, eos_token_id=[5, 9], bad_words_ids=[[9], [4]])
        for step in [s for s in (0, 2, 3) if s < length]:  # the prompt has >= 1 token
            expected = torch.from_numpy(scores)
            expected = NoBadWordsLogitsProcessor([[9], [4]], eos_token_id=[5, 9])(ids, expected)
            expected = MinNewTokensLengthLogitsProcessor(length - step, 3, [5, 9])(ids, expected).numpy()
            got = apply_processors(jnp.asarray(scores), jnp.asarray(seq), jnp.int32(length), jnp.int32(step), gc)
            np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"step={step}")


def test_beam_search_is_one_compiled_loop(models):
    """Beams too run under one jax.jit, traced once per (shape, settings)."""
    model = models("electra")
    ids, mask = _prompt(model.config)
    kw = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, eos_token_id=None)
    before = set(model.__dict__.get("_generate_fns", {}))
    model.generate(ids, **kw)
    added = [f for k, f in model.__dict__["_generate_fns"].items() if k not in before]
    assert len(added) == 1
    size = added[0]._cache_size()
    model.generate(ids[::-1].copy(), attention_mask=mask[::-1].copy(), max_new_tokens=4, num_beams=2, eos_token_id=None)
    assert added[0]._cache_size() == size and len(model.__dict__["_generate_fns"]) == len(before) + 1


def test_sampling_several_sequences_per_prompt(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=2.0, num_return_sequences=2)
    a = np.asarray(model.generate(ids, seed=3, eos_token_id=None, **kw))
    assert a.shape == (6, 12)
    assert a[:, :6].tolist() == np.repeat(ids, 2, axis=0).tolist()  # each prompt's samples adjacent
    assert a[0, 6:].tolist() != a[1, 6:].tolist()
    assert a.tolist() == np.asarray(model.generate(ids, seed=3, eos_token_id=None, **kw)).tolist()


class _Recorder:
    def __init__(self):
        self.values, self.ended = [], 0

    def put(self, value):
        assert self.ended == 0
        self.values.append(np.array(value))

    def end(self):
        self.ended += 1


def test_streamer_gets_prompt_then_each_column(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    free = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None))
    eos = int(free[0, 8])
    streamer = _Recorder()
    out = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, streamer=streamer))
    assert streamer.ended == 1
    assert streamer.values[0].tolist() == ids.tolist() and streamer.values[0].dtype == np.int32
    columns = streamer.values[1:]
    assert len(columns) == out.shape[1] - 6
    assert np.stack(columns, axis=1).tolist() == out[:, 6:].tolist()
    seen = []  # a plain callable gets the same calls
    model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, streamer=seen.append)
    assert seen[0].tolist() == ids.tolist() and np.stack(seen[1:], axis=1).tolist() == out[:, 6:].tolist()
    assert model.__dict__["_generation_sink"] == [None]  # nothing left behind


def test_bad_input_raises_before_any_work(models, monkeypatch):
    model = models("electra")
    ids, mask = _prompt(model.config)

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(model, "init_cache", no_work)
    cases = [
        (ValueError, "num_beams", dict(num_beams=0)),
        (ValueError, "max_length=6 leaves no room", dict(max_length=6)),
        (ValueError, "conflicting lengths", dict(max_length=12, max_new_tokens=3)),
        (ValueError, "conflicting lengths", dict(min_length=9, min_new_tokens=1)),
        (ValueError, "num_return_sequences", dict(num_beams=2, num_return_sequences=3)),
        (ValueError, "streamer cannot be used with beam search", dict(num_beams=2, streamer=lambda col: None)),
        (TypeError, "streamer", dict(streamer=3)),
        (ValueError, "outside the vocabulary", dict(bad_words_ids=[[200]])),
    ]
    for error, match, kw in cases:
        with pytest.raises(error, match=match):
            model.generate(ids, attention_mask=mask, **kw)
    with pytest.raises(ValueError, match="both >= 1"):
        model.generate(np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match="leaves no room in the model's context"):
        model.generate(np.ones((1, 64), np.int32), max_new_tokens=1)
