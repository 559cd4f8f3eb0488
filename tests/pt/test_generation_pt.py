"""PyTorch generation: greedy equals transformers' generate on the same weights, left padding, eos,
max_new_tokens, the sampling warpers against transformers', seeded sampling and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from nezha_zoo import ElectraConfig
from nezha_zoo.families.mpt import MptConfig
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig
from nezha_zoo.generation import GenerationConfig, prompt_position_ids
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.pt.electra import ElectraForCausalLM
from nezha_zoo.pt.generation import process_logits
from nezha_zoo.pt.mpt import MptForCausalLM
from nezha_zoo.pt.xlm_roberta_xl import XLMRobertaXLForCausalLM
from nezha_zoo.spec.registry import get_family
from nezha_zoo.testing import pin_precision

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
    with pytest.raises(TypeError, match="max_length"):
        model.generate(ids, max_length=10)
