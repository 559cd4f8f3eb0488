"""Greedy continuations are identical in PyTorch, TensorFlow (graph and XLA), Flax and transformers,
for every causal-LM class of the zoo, on a left-padded batch.

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
from nezha_zoo.pretrained import random_weights, save_weights  # noqa: E402
from nezha_zoo.pt.electra import ElectraForCausalLM  # noqa: E402
from nezha_zoo.pt.mpt import MptForCausalLM  # noqa: E402
from nezha_zoo.pt.xlm_roberta_xl import XLMRobertaXLForCausalLM  # noqa: E402
from nezha_zoo.spec.registry import get_family  # noqa: E402
from nezha_zoo.testing import TOLERANCES, pin_precision  # noqa: E402
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


@pytest.mark.parametrize("key", list(CASES))
def test_greedy_tokens_identical_across_backends(key, tmp_path):
    make_config, seed, pt_cls, tf_cls, flax_cls, hf_name = CASES[key]
    cfg, family = make_config(), get_family(key)
    spec = family.model_spec(cfg, "ForCausalLM")
    save_weights(tmp_path, cfg, spec, family, random_weights(spec, cfg, seed))
    ids, mask = _prompt(cfg)
    settings = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)

    pt_model = pt_cls.from_pretrained(tmp_path).eval()
    hf = getattr(transformers, hf_name).from_pretrained(tmp_path).eval()
    tf_model = tf_cls.from_pretrained(tmp_path)
    flax_model = flax_cls.from_pretrained(tmp_path)
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
