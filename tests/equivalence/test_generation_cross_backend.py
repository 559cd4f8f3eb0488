"""Greedy and beam-search continuations are identical in PyTorch, TensorFlow (graph and XLA), Flax and
transformers, for every causal-LM class of the zoo, on a left-padded batch: plain greedy decoding,
greedy with the logits processors and eos lists, and beam search with ``num_return_sequences`` and
each ``early_stopping`` mode, their ``return_dict_in_generate`` scores, logits, sequence scores and
beam indices included.

Tiny random models can have near-tied logits, where float noise could legitimately flip an argmax;
the weights below were chosen so that the top-2 logit margin at every generated position is above
``MIN_MARGIN`` (100x the logits tolerance), and the test asserts that margin, so identity is a real
requirement rather than luck.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
jax = pytest.importorskip("jax")
transformers = pytest.importorskip("transformers")

from nezha_zoo import ElectraConfig  # noqa: E402
from nezha_zoo.families.mpt import MptConfig  # noqa: E402
from nezha_zoo.families.xlm_roberta_xl import XLMRobertaXLConfig  # noqa: E402
from nezha_zoo.flax.electra import FlaxElectraForCausalLM  # noqa: E402
from nezha_zoo.flax.mpt import FlaxMptForCausalLM  # noqa: E402
from nezha_zoo.flax.xlm_roberta_xl import FlaxXLMRobertaXLForCausalLM  # noqa: E402
from nezha_zoo.generation import prompt_position_ids  # noqa: E402
from nezha_zoo.pt.electra import ElectraForCausalLM  # noqa: E402
from nezha_zoo.pt.mpt import MptForCausalLM  # noqa: E402
from nezha_zoo.pt.xlm_roberta_xl import XLMRobertaXLForCausalLM  # noqa: E402
from nezha_zoo.testing import TOLERANCES, pin_precision, random_checkpoints  # noqa: E402
from nezha_zoo.tf.electra import TFElectraForCausalLM  # noqa: E402
from nezha_zoo.tf.mpt import TFMptForCausalLM  # noqa: E402
from nezha_zoo.tf.xlm_roberta_xl import TFXLMRobertaXLForCausalLM  # noqa: E402

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax, pytest.mark.hf]

#: family -> (config, weight seed, PyTorch class, TF class, Flax class, transformers class name)
CASES = {
    "electra": (
        lambda: ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                              is_decoder=True, initializer_range=0.3),
        1, ElectraForCausalLM, TFElectraForCausalLM, FlaxElectraForCausalLM, "ElectraForCausalLM",
    ),
    "xlm_roberta_xl": (
        lambda: XLMRobertaXLConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, is_decoder=True,
                                   initializer_range=0.3),
        1, XLMRobertaXLForCausalLM, TFXLMRobertaXLForCausalLM, FlaxXLMRobertaXLForCausalLM,
        "XLMRobertaXLForCausalLM",
    ),
    "mpt": (
        lambda: MptConfig(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, initializer_range=0.3),
        2, MptForCausalLM, TFMptForCausalLM, FlaxMptForCausalLM, "MptForCausalLM",
    ),
}  # fmt: skip
NEW = 8
MIN_MARGIN = 100 * TOLERANCES["logits"]


@pytest.fixture(scope="module", autouse=True)
def _precision():
    for framework in ("pt", "tf", "flax"):
        pin_precision(framework)


def _prompt(cfg):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (3, 6))
    mask = np.ones((3, 6), np.int64)
    mask[1, :2] = 0
    mask[2, :3] = 0
    return np.where(mask == 1, ids, cfg.pad_token_id or 0), mask


def _top2_margin(model, tokens, mask, prompt_len):
    """Smallest top-1 minus top-2 logit of the PyTorch model over every generated position."""
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> checkpoint directory (built on first use)."""
    return random_checkpoints(tmp_path_factory.mktemp, "ForCausalLM", lambda key: (CASES[key][0](), CASES[key][1]))


@pytest.fixture(scope="module")
def models(saved):
    """(family, "pt" / "tf" / "flax" / "hf") -> that model of the family's checkpoint, loaded once for the
    file (the TF model serves graph mode and XLA: ``jit_compile`` is a ``generate`` argument)."""
    cache = {}

    def get(key, framework):
        if (key, framework) not in cache:
            if framework == "hf":
                cls = getattr(transformers, CASES[key][5])
            else:
                cls = CASES[key][{"pt": 2, "tf": 3, "flax": 4}[framework]]
            model = cls.from_pretrained(saved(key))
            cache[key, framework] = model.eval() if framework in ("pt", "hf") else model
        return cache[key, framework]

    return get


@pytest.mark.parametrize("key", list(CASES))
def test_greedy_tokens_identical_across_backends(key, models):
    cfg = CASES[key][0]()
    ids, mask = _prompt(cfg)
    settings = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)

    pt_model, hf, tf_model, flax_model = (models(key, f) for f in ("pt", "hf", "tf", "flax"))
    tokens = {
        "hf": hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False, **settings),
        "pt": pt_model.generate(ids, attention_mask=mask, **settings),
        "tf": tf_model.generate(ids, attention_mask=mask, **settings),
        "tf-xla": tf_model.generate(ids, attention_mask=mask, jit_compile=True, **settings),
        "flax": flax_model.generate(ids, attention_mask=mask, **settings),
    }
    tokens = {b: np.asarray(t).tolist() for b, t in tokens.items()}
    assert len(tokens["pt"][0]) == 6 + NEW
    for backend, got in tokens.items():
        assert got == tokens["hf"], f"{key}: {backend} greedy tokens differ from transformers"
    margin = _top2_margin(pt_model, np.asarray(tokens["pt"]), mask, 6)
    assert margin > MIN_MARGIN, f"{key}: top-2 margin {margin:.2e} too small for a meaningful identity check"


BACKENDS = ("pt", "tf", "tf-xla", "flax")

#: decoding modes (eos ids: two that transformers' own run of the mode emits early, so rows finish)
MODES = {
    "greedy_processors": dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[5], [7, 8]],
                              min_new_tokens=2),
    "beam_early_true": dict(num_beams=4, num_return_sequences=2, early_stopping=True, length_penalty=0.7),
    "beam_never": dict(num_beams=3, num_return_sequences=2, early_stopping="never", length_penalty=-0.5,
                       repetition_penalty=1.2, no_repeat_ngram_size=3, bad_words_ids=[[9], [11, 12]]),
}  # fmt: skip
RETURN = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


@pytest.fixture(scope="module")
def oracle(models):
    """(family, mode) -> (settings, transformers' return_dict output as numpy), computed once."""
    cache = {}

    def get(key, mode):
        if (key, mode) not in cache:
            hf = models(key, "hf")
            ids, mask = _prompt(hf.config)
            settings = dict(max_new_tokens=NEW, pad_token_id=97, eos_token_id=None, **MODES[mode])
            inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False)
            probe = hf.generate(**inputs, **settings)[:, 6:].tolist()
            settings["eos_token_id"] = [probe[0][2], probe[-1][1]]
            out = hf.generate(**inputs, **settings, **RETURN)
            cache[(key, mode)] = settings, {k: _as_numpy(v) for k, v in out.items() if k != "past_key_values"}
        return cache[(key, mode)]

    return get


def _as_numpy(value):
    if isinstance(value, (tuple, list)):
        return [_as_numpy(v) for v in value]
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _generate(backend, model, ids, mask, settings):
    """Our ``generate`` of ``backend`` (``model`` its framework's) with ``settings`` and every output, as numpy."""
    if backend in ("tf", "tf-xla"):
        out = model.generate(ids, attention_mask=mask, jit_compile=backend == "tf-xla", **settings, **RETURN)
    else:
        out = model.generate(ids, attention_mask=mask, **settings, **RETURN)
    return {k: _as_numpy(v) for k, v in out.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("key", list(CASES))
def test_decoding_with_processors_and_beams_identical_across_backends(key, mode, backend, models, oracle):
    settings, want = oracle(key, mode)
    ids, mask = _prompt(CASES[key][0]())
    got = _generate(backend, models(key, backend.removesuffix("-xla")), ids, mask, settings)
    where = f"{key} {mode} {backend}"
    assert sorted(got) == sorted(want), f"{where}: output fields {sorted(got)} != transformers' {sorted(want)}"
    assert got["sequences"].tolist() == want["sequences"].tolist(), f"{where}: tokens differ from transformers"
    if "beam_indices" in want:
        assert got["beam_indices"].tolist() == want["beam_indices"].tolist(), f"{where}: beam_indices"
        np.testing.assert_allclose(got["sequences_scores"], want["sequences_scores"], rtol=1e-5, atol=1e-5)
    for field in ("scores", "logits"):  # per step (rows, V); -inf where a processor banned a token
        assert len(got[field]) == len(want[field]), f"{where}: {field} has {len(got[field])} steps"
        for step, (a, b) in enumerate(zip(got[field], want[field])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{where}: {field} step {step}")


def _forward_logits(framework, model, ids, mask, **kwargs):
    """(B, L', V) numpy logits of one forward call of ``model`` (a ``framework`` causal LM)."""
    if framework == "pt":
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs)
        return out.logits.numpy()
    return np.asarray(model(ids, attention_mask=mask, **kwargs).logits)


@pytest.mark.parametrize("key", list(CASES))
def test_logits_to_keep_is_the_last_positions_in_every_backend(key, models):
    """``logits_to_keep`` (``generate``'s prompt pass takes 1): the LM head on the last positions only,
    the same slice of the full logits in PyTorch, TF and Flax; bad values raise ``InputError`` everywhere."""
    from nezha_zoo.spec.registry import model_class
    from nezha_zoo.validation import InputError

    ids, mask = _prompt(CASES[key][0]())  # (3, 6), left-padded
    backends = {f: models(key, f) for f in ("pt", "tf", "flax")}
    full = {f: _forward_logits(f, m, ids, mask) for f, m in backends.items()}  # (3, 6, V) each
    for framework, model in backends.items():
        np.testing.assert_allclose(full[framework], full["pt"], rtol=0, atol=TOLERANCES["logits"], err_msg=framework)
        # the Flax wrapper compiles a signature at its second call: run each twice (eager, then jitted)
        for keep in (0, 1, 3, 1, 3, 9):
            want, want_pt = (
                (full[framework][:, -keep:], full["pt"][:, -keep:]) if keep else (full[framework], full["pt"])
            )
            got = _forward_logits(framework, model, ids, mask, logits_to_keep=keep)
            where = f"{key} {framework} logits_to_keep={keep}"
            assert got.shape == want.shape, f"{where}: {got.shape}"
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=where)
            np.testing.assert_allclose(got, want_pt, rtol=0, atol=TOLERANCES["logits"], err_msg=f"{where} vs pt")
        for bad in (-1, 1.5, True, "1"):
            with pytest.raises(InputError, match="logits_to_keep must be an int >= 0"):
                _forward_logits(framework, model, ids, mask, logits_to_keep=bad)
    for framework in ("pt", "tf"):  # Flax computes the loss outside the model
        labels = torch.from_numpy(ids) if framework == "pt" else ids
        with pytest.raises(InputError, match="the loss needs every position"):
            _forward_logits(framework, backends[framework], ids, mask, labels=labels, logits_to_keep=1)
    # the Flax call signature is shared by every head: the others refuse a nonzero value
    base = model_class(key, "Model", "flax")(backends["flax"].config)
    with pytest.raises(InputError, match="takes no logits_to_keep"):
        base(ids, attention_mask=mask, logits_to_keep=1)
