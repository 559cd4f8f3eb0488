"""Flax dtypes (float32 / bfloat16) and low-memory from_pretrained (issue #5)."""

from __future__ import annotations

import os
import re

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import nezha_zoo.flax as nzf
import nezha_zoo.flax.modeling_utils as flax_utils
from benchmarks.precision import _hlo_dots
from nezha_zoo import ElectraConfig, MPNetConfig, NezhaConfig
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.testing import (
    TOLERANCES,
    assert_close,
    assert_save_pretrained_takes_the_lock,
    pin_precision,
    tiny_inputs,
)

pytestmark = [pytest.mark.flax]

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
    pin_precision("flax")


def _inputs(family: str) -> dict[str, np.ndarray]:
    arrays = tiny_inputs(batch=2, seq_len=7, vocab_size=TINY["vocab_size"], seed=1)
    if family == "MPNet":
        arrays.pop("token_type_ids")
        arrays["input_ids"] = np.where(arrays["attention_mask"] == 1, arrays["input_ids"], 1)  # MPNet pads with 1
    return arrays


def _leaves(params) -> list[jax.Array]:
    return jax.tree_util.tree_leaves(params)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_bf16_model_is_bf16_and_close_to_float32(family, tmp_path):
    ref = getattr(nzf, f"Flax{family}ForMaskedLM")(CONFIGS[family], seed=0)
    ref.save_pretrained(tmp_path)
    bf = getattr(nzf, f"Flax{family}ForMaskedLM").from_pretrained(tmp_path, dtype="bfloat16")
    assert bf.dtype == jnp.bfloat16 and {p.dtype for p in _leaves(bf.params)} == {jnp.dtype(jnp.bfloat16)}
    inp = _inputs(family)
    want = ref(**inp, output_hidden_states=True)
    got = bf(**inp, output_hidden_states=True)
    assert got.logits.dtype == jnp.bfloat16 and got.hidden_states[-1].dtype == jnp.bfloat16
    keep = inp["attention_mask"][..., None].astype(bool)
    last = np.asarray(got.hidden_states[-1], np.float32)
    assert_close(last, want.hidden_states[-1], TOLERANCES["bf16"], "last hidden", mask=keep)
    scale = float(np.abs(np.asarray(want.logits)).max())
    logits = np.asarray(got.logits, np.float32)
    assert_close(logits / scale, np.asarray(want.logits) / scale, TOLERANCES["bf16"], "logits / max|logits|", keep)


def test_constructor_dtype_stores_and_computes_bf16():
    cfg = CONFIGS["Electra"]
    bf = nzf.FlaxElectraForSequenceClassification(cfg, seed=0, dtype=jnp.bfloat16)
    ref = nzf.FlaxElectraForSequenceClassification(cfg, seed=0)
    assert {p.dtype for p in _leaves(bf.params)} == {jnp.dtype(jnp.bfloat16)}
    assert all(leaf.dtype == jnp.bfloat16 for leaf in _leaves(bf.params_shape_tree))
    # Same init as float32, rounded: the spec's values do not depend on the dtype.
    for a, b in zip(_leaves(bf.params), _leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
    inp = _inputs("Electra")
    got = bf(**inp, output_attentions=True)
    probs = np.asarray(got.attentions[0], np.float32)  # (B, heads, Lq, Lk)
    pad = inp["attention_mask"] == 0
    assert pad.any() and np.all(np.isfinite(probs))
    assert float(np.abs(np.transpose(probs, (0, 3, 1, 2))[pad]).max()) == 0.0  # masked keys: exactly 0
    want = ref(**inp, params=jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), bf.params))
    assert_close(np.asarray(got.logits, np.float32), want.logits, TOLERANCES["bf16"], "logits")
    # Under jit and grad too: gradients come back in the params' dtype.
    grads = jax.jit(jax.grad(lambda p: bf(**inp, params=p).logits.astype(jnp.float32).sum()))(bf.params)
    assert {g.dtype for g in _leaves(grads)} == {jnp.dtype(jnp.bfloat16)}


def _emitted_dots(stablehlo: str) -> dict[str, int]:
    """Count the dots of a lowered (not yet optimised) program by ``"lhs x rhs -> out"`` element types."""
    counts: dict[str, int] = {}
    for m in re.finditer(
        r"dot_general.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>", stablehlo
    ):
        key = f"{m.group(1)} x {m.group(2)} -> {m.group(3)}"
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("family", ["Electra", "Nezha"])
def test_bf16_products_compile_as_bf16_operands_with_f32_result(family):
    # XLA's CPU compiler widens a bf16 x bf16 -> bf16 dot whole to float32, but runs bf16 x bf16 -> f32
    # natively: every product of a bf16 model (dense, attention, Nezha's relative terms, tied decoder)
    # must reach XLA in that form, with no convert of its operands to f32, and run; float32 models unchanged.
    cls = getattr(nzf, f"Flax{family}ForMaskedLM")
    bf = cls(CONFIGS[family], seed=0, dtype=jnp.bfloat16)
    ref = cls(CONFIGS[family], seed=0)
    inp = _inputs(family)

    def lowered(model):
        return jax.jit(lambda p: model(**inp, params=p).logits).lower(model.params)

    bf_low, ref_low = lowered(bf), lowered(ref)
    bf_dots, ref_dots = _emitted_dots(bf_low.as_text()), _emitted_dots(ref_low.as_text())
    assert set(ref_dots) == {"f32 x f32 -> f32"}
    # Nezha's relative-value product stays widened: XLA cannot run its bf16 x bf16 -> f32 form.
    widened = CONFIGS[family].num_hidden_layers if family == "Nezha" else 0  # one per layer
    total = ref_dots["f32 x f32 -> f32"]
    assert bf_dots == {
        k: n for k, n in {"bf16 x bf16 -> f32": total - widened, "bf16 x bf16 -> bf16": widened}.items() if n
    }
    bf_fwd, ref_fwd = bf_low.compile(), ref_low.compile()
    if "xla_cpu_multi_thread_eigen=false" not in os.environ.get("XLA_FLAGS", ""):
        # XLA's default CPU runtime keeps them native (its single-threaded one, as in the suite's
        # xdist workers, widens every bf16 dot again: a property of XLA, not of the model code).
        compiled = _hlo_dots(bf_fwd.as_text())
        assert compiled == {
            k: n for k, n in {"bf16 x bf16 -> f32": total - widened, "f32 x f32 -> f32": widened}.items() if n
        }
    got = bf_fwd(bf.params)
    assert got.dtype == jnp.bfloat16
    want = ref_fwd(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), bf.params))
    scale = float(np.abs(np.asarray(want)).max())
    keep = inp["attention_mask"][..., None].astype(bool)
    assert_close(np.asarray(got, np.float32) / scale, np.asarray(want) / scale, TOLERANCES["bf16"], "logits", keep)
    # Training compiles and runs (the backward products stay in JAX's transpose form).
    grads = jax.jit(jax.grad(lambda p: bf(**inp, params=p).logits.astype(jnp.float32).sum()))(bf.params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in _leaves(grads))


def test_bf16_save_is_bf16_and_loads_exactly(tmp_path):
    bf = nzf.FlaxElectraForPreTraining(CONFIGS["Electra"], seed=1, dtype="bf16")
    bf.save_pretrained(tmp_path, max_shard_size="20KB")
    with open_checkpoint(tmp_path) as reader:
        assert reader.format == "safetensors-sharded"
        assert {reader.dtype(k) for k in reader.keys()} == {"BF16"}
    again = nzf.FlaxElectraForPreTraining.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    as_f32 = nzf.FlaxElectraForPreTraining.from_pretrained(tmp_path)
    for a, b, c in zip(_leaves(bf.params), _leaves(again.params), _leaves(as_f32.params)):
        assert b.dtype == jnp.bfloat16 and c.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(b).view(np.uint16), np.asarray(a).view(np.uint16))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(a).astype(np.float32))


def test_save_pretrained_fails_at_once_while_another_writer_holds_the_destination(tmp_path):
    assert_save_pretrained_takes_the_lock(nzf.FlaxElectraForPreTraining(CONFIGS["Electra"], seed=1), tmp_path)


def test_transformers_loads_our_bf16_checkpoint(tmp_path):
    ours = nzf.FlaxElectraForMaskedLM(CONFIGS["Electra"], seed=2, dtype=jnp.bfloat16)
    ours.save_pretrained(tmp_path)
    hf = transformers.ElectraForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    inp = _inputs("Electra")
    with torch.no_grad():
        want = hf(**{k: torch.from_numpy(v) for k, v in inp.items()}).logits.float().numpy()
    keep = inp["attention_mask"][..., None].astype(bool)
    got = np.asarray(ours(**inp).logits, np.float32)
    assert_close(got, want, TOLERANCES["bf16"], "ours (Flax) vs transformers, both bf16", mask=keep)


def test_from_pretrained_never_random_inits(tmp_path, monkeypatch):
    nzf.FlaxElectraForMaskedLM(CONFIGS["Electra"], seed=0).save_pretrained(tmp_path / "full")
    nzf.FlaxElectraModel(CONFIGS["Electra"], seed=0).save_pretrained(tmp_path / "base")
    drawn: list = []
    real = flax_utils.random_weights

    def recording(spec, config, seed=0, names=None):
        drawn.append(None if names is None else set(names))
        return real(spec, config, seed, names)

    def no_init(self, *args, **kwargs):
        raise AssertionError("module.init (a concrete full init) during from_pretrained")

    monkeypatch.setattr(flax_utils, "random_weights", recording)
    monkeypatch.setattr(flax.linen.Module, "init", no_init)
    model = nzf.FlaxElectraForMaskedLM.from_pretrained(tmp_path / "full", dtype="bfloat16")
    assert drawn == [] and model.params  # every param from the file, none drawn first
    model, info = nzf.FlaxElectraForMaskedLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] and drawn == [set(info["missing_keys"])]  # only the head's own params


def test_large_tensors_are_filled_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(flax_utils, "CHUNK_BYTES", 1024)  # every tensor above 1 KB takes the in-place path
    monkeypatch.setattr("nezha_zoo.io.plan.CHUNK_BYTES", 512)
    ref = nzf.FlaxElectraForMaskedLM(CONFIGS["Electra"], seed=3)
    ref.save_pretrained(tmp_path)
    updates: list = []
    real = flax_utils._update_in_place

    def counting(buf, piece, start, axis):
        updates.append((axis, start))
        return real(buf, piece, start, axis)

    monkeypatch.setattr(flax_utils, "_update_in_place", counting)
    for dtype in ("float32", "bfloat16"):
        got = nzf.FlaxElectraForMaskedLM.from_pretrained(tmp_path, dtype=dtype)
        for a, b in zip(_leaves(got.params), _leaves(ref.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(a.dtype))
    # Row pieces (embeddings) and column pieces (transposed kernels), each tensor in several pieces.
    assert {axis for axis, _ in updates} == {0, 1} and any(start > 0 for _, start in updates)


def test_bad_dtype_raises_clearly(tmp_path):
    with pytest.raises(ValueError, match="dtype=<class 'jax.numpy.float64'> is not supported"):
        nzf.FlaxElectraModel(CONFIGS["Electra"], dtype=jnp.float64)  # float16 is supported (issue #20)
    nzf.FlaxElectraModel(CONFIGS["Electra"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype='int8' is not supported"):
        nzf.FlaxElectraModel.from_pretrained(tmp_path, dtype="int8")
    with pytest.raises(TypeError, match="dtype must be None, a string or a dtype object"):
        nzf.FlaxElectraModel.from_pretrained(tmp_path, dtype=2.0)


def test_float16_fully_masked_row_is_finite_and_matches_float32(tmp_path):
    # float16's min + a score below -16 rounds to -inf: a row whose keys are all masked became NaN.  The sum now
    # saturates at finfo.min (one rule in every backend, nezha_zoo.dtypes.SATURATING_MASK_DTYPES): the row is
    # uniform, as in float32.  Zero query/key kernels and biases +-8 make every score about -181.
    ref = nzf.FlaxElectraModel(CONFIGS["Electra"], seed=0)
    params = jax.tree_util.tree_map(lambda x: x, ref.params)  # a copy to edit
    for layer in params["encoder"]["layer"].values():
        attn = layer["attention"]["self"]
        attn["query"] = {
            "kernel": jnp.zeros_like(attn["query"]["kernel"]),
            "bias": jnp.full_like(attn["query"]["bias"], 8.0),
        }
        attn["key"] = {
            "kernel": jnp.zeros_like(attn["key"]["kernel"]),
            "bias": jnp.full_like(attn["key"]["bias"], -8.0),
        }
    ref.params = params
    ref.save_pretrained(tmp_path)
    half = nzf.FlaxElectraModel.from_pretrained(tmp_path, dtype="float16")
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], np.int32)  # the second row sees no key at all
    want = ref(ids, attention_mask=mask).last_hidden_state
    got = half(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == jnp.float16 and bool(jnp.isfinite(got).all())
    assert_close(np.asarray(got, np.float32), np.asarray(want), TOLERANCES["bf16"], "float16 against float32")
