"""TensorFlow generation and the fixed-size KVCache of the shared BERT decoder layers.

KVCache decoding equals a full pass (eager, and one step under XLA); ``generate`` (one
``tf.function`` over the fixed cache) equals transformers' ``generate`` on the same weights, with
and without XLA: greedy and beam search (early_stopping True/False/"never", length_penalty,
num_return_sequences, eos lists), the logits processors (repetition penalty, n-gram ban, bad words,
min_new_tokens), max_length, return_dict_in_generate with scores/logits/sequences_scores/
beam_indices; left padding, the sampling warpers, seeds, the streamer, bad arguments.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.generation.logits_process import (  # noqa: E402
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nezha_zoo import ElectraConfig  # noqa: E402
from nezha_zoo.families.mpt import MptConfig  # noqa: E402
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig  # noqa: E402
from nezha_zoo.generation import GenerationConfig, prompt_position_ids  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, random_checkpoints  # noqa: E402
from nezha_zoo.tf.cache import KVCache  # noqa: E402
from nezha_zoo.tf.electra import TFElectraForCausalLM  # noqa: E402
from nezha_zoo.tf.generation import (  # noqa: E402
    apply_processors,
    apply_repetition_penalty,
    ban_bad_words,
    ban_repeated_ngrams,
    greedy_choice,
    process_logits,
    suppress_eos,
    top_k_filter,
    top_p_filter,
)
from nezha_zoo.tf.mpt import TFMptForCausalLM  # noqa: E402
from nezha_zoo.tf.xlm_roberta_xl import TFXLMRobertaXLForCausalLM  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.hf]

# initializer_range 0.3 and these weight seeds give top-2 logit margins > 1e-2 at every greedy step
# of the prompts below (asserted in the PyTorch and cross-backend tests on the same weights).
CASES = {
    "electra": (
        lambda: ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                              is_decoder=True, initializer_range=0.3),
        1, TFElectraForCausalLM, "ElectraForCausalLM",
    ),
    "xlm_roberta_xl": (
        lambda: XLMRobertaXLConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, is_decoder=True,
                                   initializer_range=0.3),
        1, TFXLMRobertaXLForCausalLM, "XLMRobertaXLForCausalLM",
    ),
    "mpt": (
        lambda: MptConfig(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, initializer_range=0.3),
        2, TFMptForCausalLM, "MptForCausalLM",
    ),
}  # fmt: skip
NEW = 8


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("tf")


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


def _prompt(cfg):
    """Three rows of 6 tokens, rows 1 and 2 left-padded by 2 and 3, pads holding pad_token_id."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (3, 6))
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return np.where(mask == 1, ids, cfg.pad_token_id or 0), mask


# --- the fixed-size cache of the shared BERT decoder layers ----------------------------------------


@pytest.mark.parametrize("key", ["electra", "xlm_roberta_xl"])
def test_kv_cache_decoding_equals_full_pass(key, models):
    model = models(key)
    ids, mask = _prompt(model.config)
    positions = prompt_position_ids(mask, model.generation_position_rule, model.config)
    full = model(ids, attention_mask=mask, position_ids=positions).logits.numpy()
    slots = 9  # more slots than tokens: the empty ones must stay invisible
    cache = model.init_cache(3, slots)
    assert len(cache) == model.config.num_hidden_layers and isinstance(cache[0], KVCache)
    wide = np.zeros((3, slots), np.int64)
    wide[:, :4] = mask[:, :4]
    out = model(ids[:, :4], attention_mask=wide, position_ids=positions[:, :4], past_key_values=cache, use_cache=True)
    pieces, cache = [out.logits.numpy()], out.past_key_values
    for t in range(4, 6):  # then one token at a time
        wide[:, t] = 1
        out = model(
            ids[:, t : t + 1],
            attention_mask=wide,
            position_ids=positions[:, t : t + 1],
            past_key_values=cache,
            use_cache=True,
        )
        pieces.append(out.logits.numpy())
        cache = out.past_key_values
    assert isinstance(cache[0], KVCache) and int(cache[0].index) == 6
    real = np.broadcast_to(mask[:, :, None] == 1, full.shape)  # pads' own outputs are not compared
    assert_close(np.concatenate(pieces, axis=1), full, TOLERANCES["logits"], f"{key} KVCache vs full", mask=real)


def test_kv_cache_step_under_xla_equals_eager(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    positions = prompt_position_ids(mask, "cumsum", model.config)
    wide = np.zeros((3, 8), np.int64)
    wide[:, :5] = mask[:, :5]
    prefix = model(
        ids[:, :5],
        attention_mask=wide,
        position_ids=positions[:, :5],
        past_key_values=model.init_cache(3, 8),
        use_cache=True,
    )
    wide[:, 5] = 1
    step_in = (tf.constant(ids[:, 5:6]), tf.constant(wide), tf.constant(positions[:, 5:6]))

    def step(i, m, p, c):
        out = model(i, attention_mask=m, position_ids=p, past_key_values=c, use_cache=True)
        return out.logits, out.past_key_values

    eager_logits, eager_cache = step(*step_in, prefix.past_key_values)
    xla_logits, xla_cache = tf.function(step, jit_compile=True)(*step_in, prefix.past_key_values)
    assert_close(xla_logits, eager_logits, TOLERANCES["logits"], "XLA step vs eager")
    assert_close(xla_cache[1].key, eager_cache[1].key, TOLERANCES["hidden"], "XLA cache vs eager")
    assert int(xla_cache[0].index) == 6


def test_kv_cache_bad_input(models):
    model = models("electra")
    cache = model.init_cache(2, 6)
    with pytest.raises(InputError, match=r"\(batch, 6\)"):
        model(
            tf.constant([[5, 6, 7], [5, 6, 7]]), attention_mask=tf.ones((2, 3)), past_key_values=cache, use_cache=True
        )
    with pytest.raises(InputError, match="do not fit"):
        model(tf.ones((2, 7), tf.int32), attention_mask=tf.ones((2, 6)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_length 65 exceeds"):
        model.init_cache(1, 65)
    with pytest.raises(ValueError, match="batch_size"):
        model.init_cache(0, 4)


# --- generate -------------------------------------------------------------------------------------


def _transformers_greedy(key, path, ids, mask):
    hf = getattr(transformers, CASES[key][3]).from_pretrained(path).eval()
    out = hf.generate(
        torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        do_sample=False,
        max_new_tokens=NEW,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out.numpy()


@pytest.mark.parametrize("key", list(CASES))
def test_greedy_matches_transformers(key, checkpoint, models):
    model = models(key)
    ids, mask = _prompt(model.config)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    assert got.shape == (3, 6 + NEW)
    assert got.numpy().tolist() == _transformers_greedy(key, checkpoint(key), ids, mask).tolist()


def test_greedy_under_xla_equals_graph_mode(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    graph = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)
    xla = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, jit_compile=True)
    assert xla.numpy().tolist() == graph.numpy().tolist()


@pytest.mark.parametrize("key", ["electra", "mpt"])
def test_left_padded_rows_generate_what_unpadded_prompts_do(key, models):
    model = models(key)
    ids, mask = _prompt(model.config)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None).numpy()
    for row in range(3):
        alone = model.generate(ids[row : row + 1, mask[row] == 1], max_new_tokens=NEW, eos_token_id=None).numpy()
        assert batch[row, 6:].tolist() == alone[0, -NEW:].tolist(), f"row {row}"


def test_eos_finishes_rows_pads_them_and_stops(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None).numpy()
    eos = int(free[0, 7])  # row 0's second new token
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=97).numpy()
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
    assert short.shape == (3, 7) and short.numpy()[:, 6].tolist() == firsts


def test_max_new_tokens_and_prompt_kept(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    out = model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=3))
    assert out.shape == (3, 9) and out.dtype == tf.int32
    assert out.numpy()[:, :6].tolist() == ids.tolist()


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
        got = process_logits(tf.constant(raw), gc).numpy()
        assert (np.isinf(got) == np.isinf(want)).all()
        kept = ~np.isinf(want)
        np.testing.assert_allclose(got[kept], want[kept], rtol=0, atol=1e-6)


def test_top_k_filter_under_xla_is_exact_and_sorts_nothing():
    # XLA lowers a top-k whose values are only sliced to a full sort of the row (40x slower at B=8,
    # V=30522 on CPU); the filter must stay a partial top-k and keep the k-th value's ties.
    raw = np.random.default_rng(5).standard_normal((3, 997)).astype(np.float32)
    raw[0, :20] = 4.0  # ties at the k-th value: all kept
    raw[1, 3:] = -np.inf  # fewer finite values than k
    want = TopKLogitsWarper(7)(None, torch.from_numpy(raw.copy())).numpy()
    compiled = tf.function(lambda x: top_k_filter(x, 7), jit_compile=True)
    np.testing.assert_array_equal(compiled(tf.constant(raw)).numpy(), want)
    np.testing.assert_array_equal(top_k_filter(tf.constant(raw), 7).numpy(), want)
    hlo = compiled.experimental_get_compiler_ir(tf.constant(raw))(stage="optimized_hlo")
    assert " sort(" not in hlo


def test_tied_vocab_logits_of_one_row_copy_no_table_under_xla():
    # A batch-1 decoding step: `row @ table^T + bias` made XLA copy the transposed (V, E) table on
    # every call (3x the step at XLM-R-XL's 32000 x 512); the one-row product keeps the table as it is.
    from nezha_zoo.tf.heads import tied_vocab_logits

    rng = np.random.default_rng(6)
    table = tf.constant(rng.standard_normal((997, 24)).astype(np.float32))
    bias = tf.constant(rng.standard_normal(997).astype(np.float32))
    for shape in ((1, 1, 24), (3, 2, 24)):  # one row (the matrix-vector form), several rows
        hidden = tf.constant(rng.standard_normal(shape).astype(np.float32))
        want = np.einsum("ble,ve->blv", hidden.numpy().astype(np.float64), table.numpy()) + bias.numpy()
        compiled = tf.function(lambda h: tied_vocab_logits(h, table) + bias, jit_compile=True)
        for got in (compiled(hidden), tied_vocab_logits(hidden, table) + bias):
            assert got.shape == shape[:-1] + (997,)
            assert_close(got.numpy(), want, TOLERANCES["logits"], f"tied logits {shape}")
    one = tf.constant(rng.standard_normal((1, 1, 24)).astype(np.float32))
    hlo = compiled.experimental_get_compiler_ir(one)(stage="optimized_hlo")
    assert "transpose(" not in hlo


def test_top_p_filter_under_xla_matches_transformers():
    raw = np.random.default_rng(6).standard_normal((3, 997)).astype(np.float32) * 3
    raw[0, :30] = 2.5  # ties
    raw[1, 4:] = -np.inf
    for top_p in (0.05, 0.5, 0.9):
        want = TopPLogitsWarper(top_p)(None, torch.from_numpy(raw.copy())).numpy()
        compiled = tf.function(lambda x, p=top_p: top_p_filter(x, p), jit_compile=True)
        np.testing.assert_array_equal(compiled(tf.constant(raw)).numpy(), want)
        np.testing.assert_array_equal(top_p_filter(tf.constant(raw), top_p).numpy(), want)


def test_greedy_ties_go_to_the_lowest_id():
    logits = tf.constant([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    assert greedy_choice(logits).numpy().tolist() == [1, 0]


def test_seeded_sampling_is_reproducible(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=2.0, eos_token_id=None)
    a = model.generate(ids, seed=11, **kw).numpy()
    assert a.tolist() == model.generate(ids, seed=11, **kw).numpy().tolist()
    assert a.tolist() != model.generate(ids, seed=12, **kw).numpy().tolist()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None).numpy()
    assert model.generate(ids, seed=5, top_k=1, **kw).numpy().tolist() == greedy.tolist()


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
    with pytest.raises(TypeError, match="jit_compile"):
        model.generate(ids, jit_compile="yes")
    with pytest.raises(TypeError, match="num_beam"):
        model.generate(ids, num_beam=2)  # a typo: unknown settings are refused


# --- logits processors against transformers' (eager, no model) ------------------------------------


def _processor_case():
    """Scores (4, 30) and a (4, 12) buffer whose first 9 columns are filled (-1 after), with repeats."""
    rng = np.random.default_rng(7)
    scores = (rng.standard_normal((4, 30)) * 3).astype(np.float32)
    filled = rng.integers(0, 6, (4, 9))  # few distinct ids: n-grams repeat
    filled[2, -3:] = [4, 1, 2]  # row 2 ends with a bad word's prefix
    return scores, np.concatenate([filled, -np.ones((4, 3), np.int64)], axis=1), filled


def _assert_same_scores(got, want, what):
    got, want = np.asarray(got), want.numpy()
    assert (np.isinf(got) == np.isinf(want)).all(), what
    kept = ~np.isinf(want)
    np.testing.assert_allclose(got[kept], want[kept], rtol=0, atol=1e-6, err_msg=what)


def test_processors_match_transformers():
    scores, buffer, filled = _processor_case()
    oracle_ids, tf_scores = torch.from_numpy(filled), tf.constant(scores)

    def oracle(processor):
        return processor(oracle_ids, torch.from_numpy(scores.copy()))

    for penalty in (1.7, 0.6):
        got = apply_repetition_penalty(tf_scores, tf.constant(buffer, tf.int32), penalty)
        _assert_same_scores(got, oracle(RepetitionPenaltyLogitsProcessor(penalty)), f"repetition {penalty}")
    for n in (1, 2, 3, 9, 10):
        got = ban_repeated_ngrams(tf_scores, tf.constant(buffer, tf.int32), 9, n)
        _assert_same_scores(got, oracle(NoRepeatNGramLogitsProcessor(n)), f"ngram {n}")
    bad = [[3], [1, 2, 7], [2, 11], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 9]]  # the last is longer than the rows
    got = ban_bad_words(tf_scores, tf.constant(buffer, tf.int32), 9, bad)
    _assert_same_scores(got, oracle(NoBadWordsLogitsProcessor(bad)), "bad words")
    assert np.isinf(got.numpy()[2, 7]) and np.isinf(got.numpy()[:, 3]).all()
    _assert_same_scores(
        suppress_eos(tf_scores, (4, 17)), oracle(MinNewTokensLengthLogitsProcessor(5, 5, [4, 17])), "min new"
    )
    # apply_processors: the same in order; eos suppression only before min_new_tokens; an eos that is
    # also a one-token bad word stays allowed (transformers drops it from the ban list)
    gc = GenerationConfig(
        repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[3], [17]], eos_token_id=17, min_new_tokens=2
    )
    for step in (1, 2):
        want = torch.from_numpy(scores.copy())
        processors = [
            RepetitionPenaltyLogitsProcessor(1.3),
            NoRepeatNGramLogitsProcessor(2),
            NoBadWordsLogitsProcessor([[3], [17]], eos_token_id=17),
            MinNewTokensLengthLogitsProcessor(9 - step, 2, 17),
        ]
        for processor in processors:
            want = processor(oracle_ids, want)
        got = apply_processors(tf_scores, tf.constant(buffer, tf.int32), 9, step, gc)
        _assert_same_scores(got, want, f"apply_processors step {step}")
        assert np.isinf(got.numpy()[:, 17]).all() == (step < 2)


# --- generate against transformers ----------------------------------------------------------------


def _hf(key, path):
    return getattr(transformers, CASES[key][3]).from_pretrained(path).eval()


def _hf_generate(hf, ids, mask, **settings):
    with torch.no_grad():
        return hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **settings)


def _assert_same_output(got, want, what):
    """Our return_dict output against transformers': ids and beam indices exactly, sequence scores
    to 1e-5, per-step scores/logits (model logits across frameworks) to the SPEC's logits tolerance."""
    assert type(got).__name__ == type(want).__name__, what
    assert got.sequences.numpy().tolist() == want.sequences.numpy().tolist(), f"{what}: sequences"
    if "beam_indices" in want:
        assert got.beam_indices.numpy().tolist() == want.beam_indices.numpy().tolist(), f"{what}: beam_indices"
    for field in ("scores", "logits"):
        if want.get(field) is None:
            assert got.get(field) is None, f"{what}: {field}"
            continue
        assert len(got[field]) == len(want[field]), f"{what}: {field} steps"
        for step, (a, b) in enumerate(zip(got[field], want[field])):
            a, b = a.numpy(), b.numpy()
            assert (np.isinf(a) == np.isinf(b)).all(), f"{what}: {field} -inf at step {step}"
            banned = np.isinf(b)
            assert_close(np.where(banned, 0.0, a), np.where(banned, 0.0, b), TOLERANCES["logits"], f"{what}: {field}")
    if want.get("sequences_scores") is not None:
        assert_close(got.sequences_scores, want.sequences_scores, 1e-5, f"{what}: sequences_scores")
    else:
        assert got.get("sequences_scores") is None


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("key", list(CASES))
def test_beam_search_matches_transformers(key, early_stopping, checkpoint, models):
    model, hf = models(key), _hf(key, checkpoint(key))
    ids, mask = _prompt(model.config)
    free = _hf_generate(hf, ids, mask, max_new_tokens=NEW, num_beams=4, eos_token_id=None, pad_token_id=0).numpy()
    eos = sorted({int(free[0, 7]), int(free[1, 9])})  # hypotheses finish early, at different lengths
    settings = dict(
        max_new_tokens=NEW,
        num_beams=4,
        num_return_sequences=2,
        early_stopping=early_stopping,
        length_penalty={True: 0.6, False: 1.7, "never": 1.3}[early_stopping],
        eos_token_id=eos,
        pad_token_id=3,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    want = _hf_generate(hf, ids, mask, **settings)
    got = model.generate(ids, attention_mask=mask, **settings)
    assert got.sequences.shape[0] == 6 and got.sequences_scores.shape == (6,)
    _assert_same_output(got, want, f"{key} early_stopping={early_stopping}")
    ids_only = model.generate(ids, attention_mask=mask, **{**settings, "return_dict_in_generate": False})
    assert ids_only.numpy().tolist() == want.sequences.numpy().tolist()


@pytest.mark.parametrize("key", list(CASES))
def test_logits_processors_and_lengths_match_transformers(key, checkpoint, models):
    model, hf = models(key), _hf(key, checkpoint(key))
    ids, mask = _prompt(model.config)
    free = _hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0).numpy()
    # repetition penalty and the n-gram ban (scores compared step by step)
    settings = dict(
        max_new_tokens=NEW,
        repetition_penalty=1.8,
        no_repeat_ngram_size=2,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    _assert_same_output(
        model.generate(ids, attention_mask=mask, **settings), _hf_generate(hf, ids, mask, **settings), f"{key} rep"
    )
    # bad words (one token, and two tokens that greedy decoding emits), min_new_tokens over an eos
    # list that greedy decoding would emit early, and max_length instead of max_new_tokens
    banned = int(free[0, 6])
    eos = [int(t) for t in (free[2, 6], free[0, 9], free[2, 7], free[1, 6]) if t != banned][:2]  # eos is never banned
    settings = dict(
        max_length=6 + NEW,
        bad_words_ids=[[banned], [int(free[1, 7]), int(free[1, 8])]],
        min_new_tokens=3,
        eos_token_id=eos,
        pad_token_id=2,
    )
    want = _hf_generate(hf, ids, mask, **settings).numpy()
    got = model.generate(ids, attention_mask=mask, **settings).numpy()
    assert got.tolist() == want.tolist()
    assert banned not in got[:, 6:]


def test_beam_search_with_processors_under_xla(checkpoint, models):
    """One tf.function with XLA: beams, processors, eos list and scores as transformers'."""
    model, hf = models("electra"), _hf("electra", checkpoint("electra"))
    ids, mask = _prompt(model.config)
    free = _hf_generate(hf, ids, mask, max_new_tokens=NEW, num_beams=3, eos_token_id=None, pad_token_id=0).numpy()
    settings = dict(
        max_new_tokens=NEW,
        num_beams=3,
        num_return_sequences=2,
        length_penalty=1.5,
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        bad_words_ids=[[int(free[0, 6])], [int(free[1, 6]), int(free[1, 7])]],
        min_new_tokens=2,
        eos_token_id=[int(free[2, 8]), int(free[0, 8])],
        pad_token_id=4,
        return_dict_in_generate=True,
        output_scores=True,
    )
    want = _hf_generate(hf, ids, mask, **settings)
    _assert_same_output(model.generate(ids, attention_mask=mask, jit_compile=True, **settings), want, "xla beams")


def test_sampling_returns_independent_rows(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=2.0, eos_token_id=None, seed=3)
    out = model.generate(ids, num_return_sequences=2, return_dict_in_generate=True, output_scores=True, **kw)
    seqs = out.sequences.numpy()
    assert seqs.shape == (6, 12) and len(out.scores) == 6 and out.scores[0].shape == (6, 99)
    assert (seqs[:, :6] == np.repeat(ids, 2, axis=0)).all()
    assert seqs[0, 6:].tolist() != seqs[1, 6:].tolist()  # copies of a prompt draw their own tokens


class _Recorder:
    def __init__(self):
        self.values, self.ended = [], 0

    def put(self, value):
        assert not self.ended
        self.values.append(np.array(value))

    def end(self):
        self.ended += 1


def test_streamer_gets_prompt_then_each_column(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    recorder = _Recorder()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, streamer=recorder).numpy()
    assert recorder.ended == 1 and len(recorder.values) == 1 + NEW
    assert recorder.values[0].tolist() == ids.tolist() and recorder.values[0].dtype == np.int32
    assert np.stack(recorder.values[1:], axis=1).tolist() == out[:, 6:].tolist()
    columns = []  # a plain callable works too; a finished row streams pad after its eos
    short = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=int(out[0, 7]), streamer=columns.append
    )
    assert np.stack(columns[1:], axis=1).tolist() == short.numpy()[:, 6:].tolist()


def test_bad_generation_input_raises_before_any_work(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    traced = dict(model.__dict__.get("_nz_generate_fns", {}))
    cases = [
        (ValueError, "num_beams", dict(num_beams=0)),
        (ValueError, "max_length=5 leaves no room", dict(max_length=5)),
        (ValueError, "conflicting lengths", dict(max_length=12, max_new_tokens=3)),
        (ValueError, "num_return_sequences", dict(num_beams=2, num_return_sequences=3)),
        (ValueError, "streamer cannot be used with beam search", dict(num_beams=2, streamer=print)),
        (ValueError, "XLA", dict(streamer=print, jit_compile=True)),
        (TypeError, "streamer", dict(streamer=3)),
    ]
    for error, match, settings in cases:
        with pytest.raises(error, match=match):
            model.generate(ids, attention_mask=mask, **settings)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model.generate(np.zeros((2, 0), np.int32))
    with pytest.raises(ValueError, match="leaves no room in the model's context"):
        model.generate(np.ones((1, 64), np.int32), max_new_tokens=1)
    assert dict(model.__dict__.get("_nz_generate_fns", {})) == traced  # nothing was traced
