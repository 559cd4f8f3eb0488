"""PyTorch generation: greedy, beam search and the logits processors equal transformers' generate on
the same weights (tokens, scores, logits, beam indices), left padding, eos, lengths, the sampling
warpers against transformers', seeded sampling, the streamer and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from nezha_zoo import ElectraConfig
from nezha_zoo.families.mpt import MptConfig
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig
from nezha_zoo.generation import GenerationConfig, effective_bad_words, prompt_position_ids
from nezha_zoo.pt.electra import ElectraForCausalLM
from nezha_zoo.pt.generation import (
    apply_processors,
    apply_repetition_penalty,
    ban_bad_words,
    ban_repeated_ngrams,
    process_logits,
    suppress_eos,
)
from nezha_zoo.pt.mpt import MptForCausalLM
from nezha_zoo.pt.xlm_roberta_xl import XLMRobertaXLForCausalLM
from nezha_zoo.testing import pin_precision, random_checkpoints

pytestmark = pytest.mark.pt

# initializer_range 0.3 and these weight seeds give top-2 logit margins > 1e-2 at every greedy step
# of the prompts below (asserted in test_greedy_matches_transformers), far above float noise.
CASES = {
    "electra": (
        lambda: ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                              is_decoder=True, initializer_range=0.3),
        1, ElectraForCausalLM, "ElectraForCausalLM",
    ),
    "xlm_roberta_xl": (
        lambda: XLMRobertaXLConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, is_decoder=True,
                                   initializer_range=0.3),
        1, XLMRobertaXLForCausalLM, "XLMRobertaXLForCausalLM",
    ),
    "mpt": (
        lambda: MptConfig(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, initializer_range=0.3),
        2, MptForCausalLM, "MptForCausalLM",
    ),
}  # fmt: skip
MIN_MARGIN = 1e-3
NEW = 8


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> checkpoint directory (built on first use)."""
    return random_checkpoints(tmp_path_factory.mktemp, "ForCausalLM", lambda key: (CASES[key][0](), CASES[key][1]))


@pytest.fixture(scope="module")
def electra(checkpoint):
    return ElectraForCausalLM.from_pretrained(checkpoint("electra")).eval()


def _prompt(cfg):
    """Three rows of 6 tokens, rows 1 and 2 left-padded by 2 and 3, pads holding pad_token_id."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (3, 6))
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return np.where(mask == 1, ids, cfg.pad_token_id or 0), mask


def top2_margin(model, tokens: np.ndarray, mask: np.ndarray, prompt_len: int) -> float:
    """Smallest top-1 minus top-2 logit over every generated position of ``tokens``."""
    full = np.concatenate([mask, np.ones((mask.shape[0], tokens.shape[1] - prompt_len), mask.dtype)], axis=1)
    extra = {}
    positions = prompt_position_ids(full, model.generation_position_rule, model.config)
    if positions is not None:
        extra["position_ids"] = torch.from_numpy(positions.astype(np.int64))
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(full), **extra
        ).logits.numpy()
    top = np.sort(logits[:, prompt_len - 1 : -1], axis=-1)
    return float((top[..., -1] - top[..., -2]).min())


@pytest.mark.parametrize("key", list(CASES))
def test_greedy_matches_transformers(key, checkpoint):
    path = checkpoint(key)
    _, _, cls, hf_name = CASES[key]
    ours = cls.from_pretrained(path).eval()
    hf = getattr(transformers, hf_name).from_pretrained(path).eval()
    ids, mask = _prompt(ours.config)
    settings = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, **settings)
    want = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **settings)
    assert got.shape == (3, 6 + NEW)
    assert got.tolist() == want.tolist()
    assert top2_margin(ours, got.numpy(), mask, 6) > MIN_MARGIN


@pytest.mark.parametrize("key", list(CASES))
def test_left_padded_rows_generate_what_unpadded_prompts_do(key, checkpoint):
    model = CASES[key][2].from_pretrained(checkpoint(key)).eval()
    ids, mask = _prompt(model.config)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)
    for row in range(3):
        alone = model.generate(ids[row : row + 1, mask[row] == 1], max_new_tokens=NEW, eos_token_id=None)
        assert batch[row, 6:].tolist() == alone[0, -NEW:].tolist(), f"row {row}"


def test_eos_finishes_rows_pads_them_and_stops(electra):
    model = electra
    ids, mask = _prompt(model.config)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)
    eos = int(free[0, 6 + 1])  # row 0's second new token
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=97)
    for row in range(3):
        new = free[row, 6:].tolist()
        if eos in new:
            stop = new.index(eos)
            want = new[: stop + 1] + [97] * (out.shape[1] - 6 - stop - 1)
        else:
            want = new[: out.shape[1] - 6]
        assert out[row, 6:].tolist() == want, f"row {row}"
    # every row finishing early ends the loop early: eos = each row's first new token
    firsts = [int(t) for t in free[:, 6]]
    short = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=firsts, pad_token_id=97)
    assert short.shape == (3, 7) and short[:, 6].tolist() == firsts


def test_max_new_tokens_and_prompt_kept(electra):
    model = electra
    ids, mask = _prompt(model.config)
    for n in (1, 3):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=None)
        assert out.shape == (3, 6 + n) and out.dtype == torch.int64
        assert out[:, :6].tolist() == ids.tolist()
    gc = GenerationConfig(max_new_tokens=2)
    assert model.generate(ids, attention_mask=mask, generation_config=gc).shape == (3, 8)


def test_warpers_match_transformers():
    logits = torch.from_numpy(np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32) * 3)
    for temperature, top_k, top_p in ((1.0, 5, 1.0), (1.0, 0, 0.8), (0.7, 10, 0.9), (1.3, 1, 0.5), (1.0, 0, 0.05)):
        gc = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        want = logits.clone()
        if temperature != 1.0:
            want = TemperatureLogitsWarper(temperature)(None, want)
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(None, want)
        got = process_logits(logits, gc)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        kept = ~torch.isinf(want)
        assert torch.allclose(got[kept], want[kept], rtol=0, atol=1e-6)


def test_seeded_sampling_is_reproducible(electra):
    model = electra
    ids, mask = _prompt(model.config)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=2.0, eos_token_id=None)
    a = model.generate(ids, seed=11, **kw)
    assert a.tolist() == model.generate(ids, seed=11, **kw).tolist()
    assert a.tolist() != model.generate(ids, seed=12, **kw).tolist()
    # top_k=1 leaves only the argmax: sampling must then be greedy decoding
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert model.generate(ids, seed=5, top_k=1, **kw).tolist() == greedy.tolist()


def test_bad_arguments_raise(electra):
    model = electra
    ids, mask = _prompt(model.config)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids, top_k=-2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, attention_mask=mask[:, ::-1].copy())
    with pytest.raises(ValueError, match="input_ids must lie"):
        model.generate(ids + 200)
    with pytest.raises(ValueError, match="maximum sequence length 64"):
        model.generate(ids, max_new_tokens=60)


def test_processors_match_transformers():
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    rng = np.random.default_rng(4)
    scores = torch.from_numpy(rng.standard_normal((5, 20)).astype(np.float32))
    # short alphabet so that n-grams and bad-word prefixes recur
    seqs = torch.from_numpy(rng.integers(0, 6, (5, 9)))
    for length in (1, 2, 5, 9):
        seq = seqs[:, :length]
        for penalty in (1.4, 0.6):
            want = RepetitionPenaltyLogitsProcessor(penalty)(seq, scores.clone())
            assert torch.equal(apply_repetition_penalty(scores, seq, penalty), want)
        for n in (1, 2, 3):
            want = NoRepeatNGramLogitsProcessor(n)(seq, scores.clone())
            assert torch.equal(ban_repeated_ngrams(scores, seqs, length, n), want), (length, n)
        bad = [[3], [2, 4], [1, 1, 5], [0, 2, 3, 4, 5, 1, 2, 3, 4, 5]]
        gc = GenerationConfig(bad_words_ids=bad, eos_token_id=3)
        want = NoBadWordsLogitsProcessor(bad, eos_token_id=3)(seq, scores.clone())
        assert torch.equal(ban_bad_words(scores, seqs, length, effective_bad_words(gc)), want), length
    want = MinNewTokensLengthLogitsProcessor(4, 2, [7, 9])(seqs[:, :5], scores.clone())
    assert torch.equal(suppress_eos(scores, (7, 9)), want)
    gc = GenerationConfig(min_new_tokens=2, eos_token_id=[7, 9], repetition_penalty=1.2, no_repeat_ngram_size=2)
    assert torch.isinf(apply_processors(scores, seqs, 9, 1, gc)[:, [7, 9]]).all()
    assert not torch.isinf(apply_processors(scores, seqs, 9, 2, gc)[:, [7, 9]]).all()


def _assert_same_output(got, want, key, mode):
    """Our return_dict output equals transformers' (tokens and beam indices exactly; scores, logits and
    sequence scores to 1e-5, absolute or relative: float32 kernels differ by a few ulps, ~1e-6 at
    the magnitude ~10 of penalised log-probabilities)."""
    assert got.sequences.tolist() == want.sequences.tolist(), f"{key} {mode}: tokens differ"
    for field in ("scores", "logits"):
        assert len(got[field]) == len(want[field]), f"{key} {mode}: {field}"
        for step, (a, b) in enumerate(zip(got[field], want[field])):
            np.testing.assert_allclose(
                a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{key} {mode} {field} {step}"
            )
    if "beam_indices" in want:
        assert got.beam_indices.tolist() == want.beam_indices.tolist(), f"{key} {mode}: beam_indices"
        np.testing.assert_allclose(got.sequences_scores.numpy(), want.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
    else:
        assert "beam_indices" not in got and "sequences_scores" not in got


#: decoding modes checked against transformers for every family (eos ids are picked per model from a
#: free run so that they really occur; see test_decoding_matches_transformers)
MODES = {
    "greedy_processors": dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids="auto"),
    "greedy_min_new_tokens": dict(min_new_tokens=5, eos_token_id="late"),
    "greedy_max_length": dict(max_length=12, max_new_tokens=None, eos_token_id="auto", repetition_penalty=0.8),
    "beam_early_true": dict(num_beams=4, num_return_sequences=2, early_stopping=True, length_penalty=0.7,
                            eos_token_id="auto"),
    "beam_early_false": dict(num_beams=3, num_return_sequences=2, early_stopping=False, length_penalty=1.5,
                             eos_token_id="auto", no_repeat_ngram_size=2),
    "beam_never": dict(num_beams=4, num_return_sequences=2, early_stopping="never", length_penalty=-0.5,
                       eos_token_id="auto", repetition_penalty=1.2, bad_words_ids="auto", min_new_tokens=2),
}  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("key", list(CASES))
def test_decoding_matches_transformers(key, mode, checkpoint):
    path = checkpoint(key)
    _, _, cls, hf_name = CASES[key]
    ours = cls.from_pretrained(path).eval()
    hf = getattr(transformers, hf_name).from_pretrained(path).eval()
    ids, mask = _prompt(ours.config)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)[:, 6:].tolist()
    settings = dict(max_new_tokens=NEW, pad_token_id=97)
    settings.update(MODES[mode])
    if settings["max_new_tokens"] is None:  # max_length alone
        del settings["max_new_tokens"]
    if settings.get("bad_words_ids") == "auto":  # a token and a pair the free greedy run emits
        settings["bad_words_ids"] = [[free[1][0]], [free[0][3], free[0][4]]]
    eos = settings.pop("eos_token_id", None)
    settings["eos_token_id"] = None
    # eos ids that the same decoding emits, so that rows (hypotheses) really finish
    probe = ours.generate(ids, attention_mask=mask, **settings)
    probe, unstopped = probe[:, 6:].tolist(), probe.tolist()
    if eos == "auto":
        settings["eos_token_id"] = [probe[0][2], probe[-1][1]]
    elif eos == "late":  # one suppressed by min_new_tokens, one emitted after it
        least = settings["min_new_tokens"]
        held = ours.generate(ids, attention_mask=mask, **{**settings, "eos_token_id": probe[0][2]})[:, 6:].tolist()
        early = {t for row in held for t in row[:least]}  # a second eos never seen there changes nothing before
        settings["eos_token_id"] = [probe[0][2], next(t for row in held for t in row[least:] if t not in early)]
    out = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
    got = ours.generate(ids, attention_mask=mask, **settings, **out)
    want = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **settings, **out)
    _assert_same_output(got, want, key, mode)
    rows = 3 * settings.get("num_return_sequences", 1)
    assert got.sequences.shape[0] == rows and got.sequences[:, :6].tolist() == np.repeat(ids, rows // 3, 0).tolist()
    assert ours.generate(ids, attention_mask=mask, **settings).tolist() == got.sequences.tolist()  # ids alone
    if isinstance(settings["eos_token_id"], list):
        new = got.sequences[:, 6:]
        emitted = torch.isin(new, torch.tensor(settings["eos_token_id"])).any()
        # greedy: a row ended; beams: ended hypotheses changed the search (they may lose to longer ones)
        assert emitted or got.sequences.tolist() != unstopped, f"{key} {mode}: the eos ids changed nothing"
        if "min_new_tokens" in settings:
            assert not torch.isin(new[:, : settings["min_new_tokens"]], torch.tensor(settings["eos_token_id"])).any()


def test_greedy_scores_without_processors_are_the_logits(electra):
    ids, mask = _prompt(electra.config)
    out = electra.generate(
        ids, attention_mask=mask, max_new_tokens=3, eos_token_id=None, return_dict_in_generate=True, output_scores=True
    )
    assert set(out) == {"sequences", "scores"} and len(out.scores) == 3 and out.scores[0].shape == (3, 99)
    assert out.sequences[:, 6].tolist() == out.scores[0].argmax(-1).tolist()
    assert electra.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True).scores is None


def test_streamer_gets_prompt_then_each_column(electra):
    ids, mask = _prompt(electra.config)
    columns = []
    out = electra.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, streamer=columns.append)
    assert columns[0].shape == (3, 6) and columns[0].dtype == np.int32 and columns[0].tolist() == ids.tolist()
    assert len(columns) == 5 and all(c.shape == (3,) for c in columns[1:])
    assert np.stack(columns[1:], axis=1).tolist() == out[:, 6:].tolist()

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(("put", value.tolist()))

        def end(self):
            self.calls.append(("end", None))

    rec = Recorder()
    electra.generate(ids[:1], max_new_tokens=2, eos_token_id=None, streamer=rec)
    assert [c[0] for c in rec.calls] == ["put", "put", "put", "end"]

    # several sequences per prompt: the prompt is put as given (B, P), the columns cover every row
    columns.clear()
    kw = dict(max_new_tokens=2, eos_token_id=None, do_sample=True, seed=0, num_return_sequences=2)
    out = electra.generate(ids, attention_mask=mask, streamer=columns.append, **kw)
    assert columns[0].tolist() == ids.tolist() and [c.shape for c in columns[1:]] == [(6,), (6,)]
    assert np.stack(columns[1:], axis=1).tolist() == out[:, 6:].tolist()


def test_sampling_returns_several_sequences_per_row(electra):
    ids, mask = _prompt(electra.config)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=2.0, eos_token_id=None)
    out = electra.generate(ids, num_return_sequences=3, seed=3, **kw)
    assert out.shape == (9, 12) and out[:, :6].tolist() == np.repeat(ids, 3, 0).tolist()
    assert out.tolist() == electra.generate(ids, num_return_sequences=3, seed=3, **kw).tolist()
    assert len({tuple(r) for r in out[:3, 6:].tolist()}) > 1  # independent samples of row 0


def test_bad_input_fails_before_any_work(electra):
    model = electra
    ids, mask = _prompt(model.config)

    def no_forward(*_):
        raise AssertionError("the model ran before the input was refused")

    hook = model.register_forward_pre_hook(no_forward)
    try:
        with pytest.raises(ValueError, match="num_beams must be >= 1"):
            model.generate(ids, num_beams=0)
        with pytest.raises(ValueError, match="max_length=5 leaves no room"):
            model.generate(ids, max_length=5)
        with pytest.raises(ValueError, match="conflicting lengths"):
            model.generate(ids, max_length=10, max_new_tokens=2)
        with pytest.raises(ValueError, match="input_ids must have shape"):
            model.generate(np.zeros((2, 0), np.int64))
        with pytest.raises(ValueError, match="leaves no room in the model's context of 64"):
            model.generate(np.ones((1, 64), np.int64))
        with pytest.raises(ValueError, match="streamer cannot be used with beam search"):
            model.generate(ids, num_beams=2, streamer=lambda column: None)
        with pytest.raises(ValueError, match="num_return_sequences \\(3\\) must be <= num_beams \\(2\\)"):
            model.generate(ids, num_beams=2, num_return_sequences=3)
        with pytest.raises(TypeError, match="did you mean 'num_beams'"):
            model.generate(ids, num_beam=2)
        with pytest.raises(TypeError, match="streamer must have put"):
            model.generate(ids, streamer=42)
    finally:
        hook.remove()


def test_beam_search_with_a_large_vocabulary_matches_transformers(tmp_path):
    """4 beams over 3 left-padded rows of an XLM-R-XL-like model with a large vocabulary (the prompt
    runs once per row and the cache rows are copied per beam, then reordered through pooled buffers):
    tokens, beam indices and scores equal transformers'."""
    from nezha_zoo.pretrained import random_weights, save_weights
    from nezha_zoo.spec.registry import get_family

    cfg = XLMRobertaXLConfig(vocab_size=5000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37, max_position_embeddings=64, is_decoder=True,
                             initializer_range=0.3)  # fmt: skip
    family = get_family("xlm_roberta_xl")
    spec = family.model_spec(cfg, "ForCausalLM")
    save_weights(tmp_path, cfg, spec, family, random_weights(spec, cfg, 3))
    ours = XLMRobertaXLForCausalLM.from_pretrained(tmp_path).eval()
    hf = transformers.XLMRobertaXLForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = _prompt(cfg)
    settings = dict(num_beams=4, num_return_sequences=2, max_new_tokens=NEW, eos_token_id=None, pad_token_id=1)
    out = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)
    got = ours.generate(ids, attention_mask=mask, **settings, **out)
    want = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **settings, **out)
    _assert_same_output(got, want, "xlm_roberta_xl vocab 5000", "beam4")
    assert got.sequences.shape == (6, 6 + NEW)


@pytest.mark.parametrize("key", list(CASES))
def test_logits_to_keep_is_the_last_positions_of_the_full_logits(key, checkpoint):
    """``generate``'s prompt pass runs the LM head on the last position only (``logits_to_keep=1``)."""
    model = CASES[key][2].from_pretrained(checkpoint(key)).eval()
    ids = torch.from_numpy(_prompt(model.config)[0].astype(np.int64))  # (3, 6)
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (3, 6, V)
        for keep, want in ((0, full), (1, full[:, -1:]), (4, full[:, -4:]), (9, full)):
            got = model(input_ids=ids, logits_to_keep=keep).logits
            assert got.shape == want.shape, keep
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
                model(input_ids=ids, logits_to_keep=bad)
        with pytest.raises(ValueError, match="the loss needs every position"):
            model(input_ids=ids, labels=ids, logits_to_keep=1)


@pytest.mark.parametrize("bias", [True, False])
def test_vocab_projection_is_linear(bias):
    """The LM heads' ``VocabProjection`` equals ``F.linear`` at every row count: without autograd its product is
    ``linear``'s (``W x^T`` for 2-4 rows, oneDNN for others) to float32 rounding, ``F.linear`` itself (bit for
    bit) where ``linear_route`` says so and with autograd on and the switch off (the default training product:
    oneDNN where faster, to float32 rounding)."""
    from nezha_zoo.pt.heads import VocabProjection
    from nezha_zoo.pt.layers import linear, linear_route, packed_linear

    torch.manual_seed(0)
    proj = VocabProjection(48, 301, bias=bias)
    for shape in [(1, 48), (2, 48), (3, 1, 48), (8, 1, 48), (2, 8, 48), (17, 48), (4, 6, 48)]:
        x = torch.randn(shape)
        want = torch.nn.functional.linear(x, proj.weight, proj.bias)
        with torch.no_grad():
            got = proj(x)
            assert torch.equal(got, linear(x, proj.weight, proj.bias)), shape  # the one shared product
        assert got.shape == want.shape and got.is_contiguous(), shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        rows = x.numel() // 48
        if linear_route(rows, 48, 301) == "linear":
            assert torch.equal(got, want), shape
        with torch.enable_grad(), packed_linear(False):
            assert torch.equal(proj(x), want), shape  # training, switch off: F.linear
        with torch.enable_grad():  # training by default: F.linear or oneDNN's (layers.onednn_training)
            torch.testing.assert_close(proj(x), want, rtol=1e-5, atol=1e-5)
