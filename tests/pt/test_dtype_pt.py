"""PyTorch dtypes (float32 / bfloat16) and low-memory from_pretrained (issue #5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import nezha_zoo.pt as zoo
from nezha_zoo import ElectraConfig, MPNetConfig, NezhaConfig
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.pt.modeling_utils import PreTrainedModel
from nezha_zoo.testing import (
    TOLERANCES,
    assert_close,
    assert_save_pretrained_takes_the_lock,
    pin_precision,
    tiny_inputs,
)

pytestmark = [pytest.mark.pt]

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
CONFIGS = {
    "Electra": ElectraConfig(**TINY, embedding_size=24),
    "Nezha": NezhaConfig(**TINY, max_relative_position=8),
    "MPNet": MPNetConfig(**TINY),
}


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")


def _inputs(family: str) -> dict[str, torch.Tensor]:
    arrays = tiny_inputs(batch=2, seq_len=7, vocab_size=TINY["vocab_size"], seed=1)
    if family == "MPNet":
        arrays.pop("token_type_ids")
        arrays["input_ids"] = np.where(arrays["attention_mask"] == 1, arrays["input_ids"], 1)  # MPNet pads with 1
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_bf16_model_is_bf16_and_close_to_float32(family, tmp_path):
    torch.manual_seed(0)
    ref = getattr(zoo, f"{family}ForMaskedLM")(CONFIGS[family]).eval()
    ref.save_pretrained(tmp_path)
    bf = getattr(zoo, f"{family}ForMaskedLM").from_pretrained(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    inp = _inputs(family)
    with torch.no_grad():
        want = ref(**inp, output_hidden_states=True)
        got = bf(**inp, output_hidden_states=True)
    assert got.logits.dtype == torch.bfloat16 and got.hidden_states[-1].dtype == torch.bfloat16
    keep = inp["attention_mask"].numpy()[..., None].astype(bool)
    assert_close(got.hidden_states[-1].float(), want.hidden_states[-1], TOLERANCES["bf16"], "last hidden", mask=keep)
    scale = float(want.logits.abs().max())
    assert_close(got.logits.float() / scale, want.logits / scale, TOLERANCES["bf16"], "logits / max|logits|", keep)


def test_constructed_model_moved_to_bf16_runs_in_bf16():
    torch.manual_seed(0)
    ref = zoo.ElectraForSequenceClassification(CONFIGS["Electra"]).eval()
    bf = zoo.ElectraForSequenceClassification(CONFIGS["Electra"]).eval()
    bf.load_state_dict(ref.state_dict())
    bf = bf.to(torch.bfloat16)
    inp = _inputs("Electra")
    with torch.no_grad():
        want = ref(**inp, output_attentions=True)
        got = bf(**inp, output_attentions=True)
    assert got.logits.dtype == torch.bfloat16 and got.attentions[0].dtype == torch.bfloat16
    # Masked keys get exactly zero probability: the additive mask is bfloat16's own minimum, not an
    # overflowing float32 constant.
    pad = inp["attention_mask"] == 0
    assert pad.any() and float(got.attentions[0].float().permute(0, 3, 1, 2)[pad].abs().max()) == 0.0
    assert_close(got.logits.float(), want.logits, TOLERANCES["bf16"], "logits")


def test_bf16_save_is_bf16_and_loads_exactly(tmp_path):
    torch.manual_seed(0)
    bf = zoo.ElectraForPreTraining(CONFIGS["Electra"]).to(torch.bfloat16)
    bf.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded
    with open_checkpoint(tmp_path) as reader:
        assert reader.format == "safetensors-sharded"
        assert {reader.dtype(k) for k in reader.keys()} == {"BF16"}  # not upcast
    again = zoo.ElectraForPreTraining.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    as_f32 = zoo.ElectraForPreTraining.from_pretrained(tmp_path)
    for name, t in bf.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
        assert as_f32.state_dict()[name].dtype == torch.float32
        assert torch.equal(as_f32.state_dict()[name], t.float()), name  # bf16 -> f32 is exact


def test_save_pretrained_fails_at_once_while_another_writer_holds_the_destination(tmp_path):
    assert_save_pretrained_takes_the_lock(zoo.ElectraForPreTraining(CONFIGS["Electra"]), tmp_path)


def test_transformers_loads_our_bf16_checkpoint(tmp_path):
    torch.manual_seed(0)
    ours = zoo.ElectraForMaskedLM(CONFIGS["Electra"]).to(torch.bfloat16).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.ElectraForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    hf_state = hf.state_dict()
    for name, t in ours.state_dict().items():
        assert hf_state[name].dtype == torch.bfloat16 and torch.equal(hf_state[name], t), name
    inp = _inputs("Electra")
    with torch.no_grad():
        assert_close(ours(**inp).logits.float(), hf(**inp).logits.float(), TOLERANCES["bf16"], "ours vs hf, bf16")


def test_tied_weights_stay_tied_after_low_memory_load(tmp_path):
    zoo.ElectraForMaskedLM(CONFIGS["Electra"]).save_pretrained(tmp_path)
    for dtype in (None, torch.bfloat16):
        m = zoo.ElectraForMaskedLM.from_pretrained(tmp_path, dtype=dtype)
        assert m.generator_lm_head.weight is m.electra.embeddings.word_embeddings.weight
        assert not any(t.is_meta for t in m.state_dict().values())


def test_from_pretrained_never_random_inits(tmp_path, monkeypatch):
    torch.manual_seed(0)
    zoo.ElectraForMaskedLM(CONFIGS["Electra"]).save_pretrained(tmp_path / "full")
    zoo.ElectraModel(CONFIGS["Electra"]).save_pretrained(tmp_path / "base")
    calls: list = []
    real_init, real_normal = PreTrainedModel.init_weights, torch.Tensor.normal_

    def recording(self, names=None):
        calls.append(None if names is None else set(names))
        return real_init(self, names)

    def no_normal(self, *args, **kwargs):
        # torch's own module constructors still "initialise" on the meta device, which computes and
        # allocates nothing; a real tensor here would be random init that loading then overwrites.
        if not self.is_meta:
            raise AssertionError(f"random init of a real {tuple(self.shape)} tensor during from_pretrained")
        return self

    monkeypatch.setattr(PreTrainedModel, "init_weights", recording)
    monkeypatch.setattr(torch.Tensor, "normal_", no_normal)
    zoo.ElectraForMaskedLM.from_pretrained(tmp_path / "full", dtype="bfloat16")
    assert calls == []  # nothing initialised, nothing overwritten
    monkeypatch.setattr(torch.Tensor, "normal_", real_normal)  # missing weights do get their spec init
    model, info = zoo.ElectraForMaskedLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert calls == [set(info["missing_keys"])] and info["missing_keys"]  # only the head's own weights


def test_bad_dtype_raises_clearly(tmp_path):
    zoo.ElectraModel(CONFIGS["Electra"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype='float64' is not supported"):
        zoo.ElectraModel.from_pretrained(tmp_path, dtype="float64")  # float16 is supported (issue #20)
    with pytest.raises(ValueError, match="torch_dtype=torch.float64 is not supported"):
        zoo.ElectraModel.from_pretrained(tmp_path, torch_dtype=torch.float64)
    with pytest.raises(ValueError, match="disagree"):
        zoo.ElectraModel.from_pretrained(tmp_path, dtype="float32", torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype must be None, a string or a dtype object"):
        zoo.ElectraModel.from_pretrained(tmp_path, dtype=16)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_large_weights_load_exactly_and_stay_tied(tmp_path, dtype):
    # A word table of >= HUGE_PAGE_BYTES takes the huge-page allocation of _on_huge_pages (float32 and bfloat16).
    from nezha_zoo.pt.modeling_utils import HUGE_PAGE_BYTES

    config = ElectraConfig(**{**TINY, "vocab_size": 8400}, embedding_size=256)
    torch.manual_seed(0)
    saved = zoo.ElectraForMaskedLM(config).to(dtype or torch.float32)
    saved.save_pretrained(tmp_path)
    m = zoo.ElectraForMaskedLM.from_pretrained(tmp_path, dtype=dtype)
    word = m.electra.embeddings.word_embeddings.weight
    assert word.numel() * word.element_size() >= HUGE_PAGE_BYTES
    assert word.dtype == (dtype or torch.float32) and word.is_contiguous() and isinstance(word, torch.nn.Parameter)
    assert m.generator_lm_head.weight is word  # the tie survives the allocation
    for name, t in saved.state_dict().items():
        assert torch.equal(m.state_dict()[name], t), name
    inputs = _inputs("Electra")
    with torch.no_grad():
        torch.testing.assert_close(m(**inputs).logits, saved.eval()(**inputs).logits, rtol=0, atol=0)
    m.train()
    m(**inputs, labels=inputs["input_ids"]).loss.backward()  # trainable as any parameter
    assert word.grad is not None and word.grad.shape == word.shape


def _all_scores_negative(model: torch.nn.Module, value: float = 8.0) -> None:
    """Zero the query/key kernels and set their biases to ``+-value``: every attention score is the same
    large negative number (``-value**2 * head_dim / sqrt(head_dim)``, about -181 here)."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            attn = layer.attention.self
            attn.query.weight.zero_()
            attn.key.weight.zero_()
            attn.query.bias.fill_(value)
            attn.key.bias.fill_(-value)


@pytest.mark.parametrize("need_weights", [True, False])
def test_float16_fully_masked_row_is_finite_and_matches_float32(need_weights, tmp_path):
    # float16's min + a score below -16 rounds to -inf; a row whose keys are all masked then became NaN on the
    # unfused path (transformers' eager attention too).  The sum now saturates at finfo.min: the row is uniform,
    # as in float32, and the rows transformers computes finitely are unchanged.
    torch.manual_seed(0)
    ref = zoo.ElectraModel(CONFIGS["Electra"]).eval()
    _all_scores_negative(ref)
    ref.save_pretrained(tmp_path)
    half = zoo.ElectraModel.from_pretrained(tmp_path).to(torch.float16).eval()
    hf = transformers.ElectraModel.from_pretrained(tmp_path, attn_implementation="eager").to(torch.float16).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])  # the second row sees no key at all
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        got = half(ids, attention_mask=mask, output_attentions=need_weights).last_hidden_state
        theirs = hf(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    assert_close(got.float(), want, TOLERANCES["bf16"], "float16 against float32 hidden states")
    finite = torch.isfinite(theirs).all(dim=-1)  # (B, L): rows transformers computes without overflow
    assert bool(finite[0].all())
    assert_close(got[finite].float(), theirs[finite].float(), TOLERANCES["bf16"], "against transformers (finite rows)")


def test_float16_left_padded_decoder_keeps_nan_out_of_real_tokens(tmp_path):
    # A causal decoder with left padding: the first (padding) query sees only masked keys.  In float16 its row
    # overflowed to NaN and, one layer later, reached every real token through probability 0 x value NaN
    # (transformers' eager attention does the same).  With the saturating sum every token is finite and, as in
    # float32, the real tokens are what they are without the padding.
    torch.manual_seed(0)
    ref = zoo.ElectraModel(ElectraConfig(**TINY, embedding_size=24, is_decoder=True)).eval()
    _all_scores_negative(ref)
    ref.save_pretrained(tmp_path)
    half = zoo.ElectraModel.from_pretrained(tmp_path).to(torch.float16).eval()
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1]])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        got = half(ids, attention_mask=mask, output_attentions=True).last_hidden_state
    assert bool(torch.isfinite(got).all())
    assert_close(got.float(), want, TOLERANCES["bf16"], "float16 against float32 hidden states")
