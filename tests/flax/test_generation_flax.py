"""Flax generation: the whole decoding loop under one ``jax.jit`` over the fixed-size cache.

Greedy equals transformers' ``generate`` on the same weights; left padding, eos, max_new_tokens, the
sampling warpers against transformers', seeded sampling and bad arguments.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from nezha_zoo import ElectraConfig
from nezha_zoo.families.mpt import MptConfig
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig
from nezha_zoo.flax.electra import FlaxElectraForCausalLM
from nezha_zoo.flax.generation import greedy_choice, process_logits
from nezha_zoo.flax.mpt import FlaxMptForCausalLM
from nezha_zoo.flax.xlm_roberta_xl import FlaxXLMRobertaXLForCausalLM
from nezha_zoo.generation import GenerationConfig
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family
from nezha_zoo.testing import pin_precision

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
    paths = {}

    def get(key):
        if key not in paths:
            make_config, seed, _, _ = CASES[key]
            cfg, family = make_config(), get_family(key)
            spec = family.model_spec(cfg, "ForCausalLM")
            paths[key] = tmp_path_factory.mktemp(key)
            save_weights(paths[key], cfg, spec, family, random_weights(spec, cfg, seed))
        return paths[key]

    return get


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
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_greedy_matches_transformers(key, checkpoint, models):
    model = models(key)
    ids, mask = _prompt(model.config)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    assert got.shape == (3, 6 + NEW)
    assert np.asarray(got).tolist() == _transformers_greedy(key, checkpoint(key), ids, mask).tolist()


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
    out = model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=3))
    assert out.shape == (3, 9) and out.dtype == jnp.int32
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


def test_greedy_ties_go_to_the_lowest_id():
    logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    assert greedy_choice(logits).tolist() == [1, 0]


def test_seeded_sampling_is_reproducible(models):
    model = models("electra")
    ids, mask = _prompt(model.config)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=2.0, eos_token_id=None)
    a = np.asarray(model.generate(ids, seed=11, **kw))
    assert a.tolist() == model.generate(ids, seed=11, **kw).tolist()
    assert a.tolist() != model.generate(ids, seed=12, **kw).tolist()
    greedy = np.asarray(model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None))
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
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(ids, num_beams=2)
