"""XLA CPU options for float32 inference programs with many rows (issue #23).

``dense_compiler_options()`` (XLA's own dots instead of this jaxlib's default YNNPACK fusions) applies to
the wrapper's compiled float32 forward above ``PACKED_MAX_ROWS`` rows and to ``nezha_zoo.flax.inference_jit``;
training calls, bfloat16 models and packed calls keep their own options.  Results agree with the
op-by-op call to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nezha_zoo.flax as nzf
from nezha_zoo import ElectraConfig
from nezha_zoo.flax import modeling_utils
from nezha_zoo.flax.layers import DENSE_COMPILER_OPTIONS, dense_compiler_options, inference_jit
from nezha_zoo.hardware import CpuFeatures, cpu_features
from nezha_zoo.packing import PACKED_MAX_ROWS, packed_linear
from nezha_zoo.testing import TOLERANCES, assert_close, op_by_op, pin_precision

pytestmark = pytest.mark.flax

pin_precision("flax")

HID = TOLERANCES["hidden"]
ELECTRA = dict(
    vocab_size=99, embedding_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
)
ROWS = (3, 17)  # 51 rows > PACKED_MAX_ROWS
assert ROWS[0] * ROWS[1] > PACKED_MAX_ROWS


def _ids(shape=ROWS, seed=0):
    return np.random.default_rng(seed).integers(3, 99, size=shape)


@pytest.fixture
def model():
    return nzf.FlaxElectraModel(ElectraConfig(**ELECTRA), seed=1)


@pytest.fixture
def spy(monkeypatch):
    """Counts the wrapper's requests for the dense options (and returns the real ones)."""
    calls: list[int] = []

    def counted():
        calls.append(1)
        return dense_compiler_options()

    monkeypatch.setattr(modeling_utils, "dense_compiler_options", counted)
    return calls


def test_options_only_where_measured():
    avx512 = CpuFeatures(avx2=True, avx512f=True)
    # a renamed experimental option would silently drop the gain: fail here instead
    assert dense_compiler_options(avx512) == DENSE_COMPILER_OPTIONS
    assert dense_compiler_options(CpuFeatures(avx2=True)) == {}  # unmeasured CPUs keep XLA's defaults
    assert dense_compiler_options() == (DENSE_COMPILER_OPTIONS if cpu_features().avx512f else {})
    assert nzf.inference_jit is inference_jit and "inference_jit" in nzf.__all__


def test_float_inference_call_compiles_with_them_and_equals_eager(model, spy):
    ids = _ids()
    with op_by_op(model):
        want = model(ids).last_hidden_state
    for _ in range(3):
        got = model(ids).last_hidden_state
    assert len(model._jit_compiled) == 1 and len(spy) == 1
    assert_close(got, want, HID, "compiled (dense options) vs eager")


def test_training_bf16_and_packed_calls_do_not_ask_for_them(model, spy):
    rng = jax.random.PRNGKey(0)
    for _ in range(3):
        model(_ids(), train=True, dropout_rng=rng)
    with packed_linear():
        for _ in range(3):
            model(_ids((1, 5)))
    bf16 = nzf.FlaxElectraModel(ElectraConfig(**ELECTRA), seed=1, dtype=jnp.bfloat16)
    for _ in range(3):
        bf16(_ids())
    assert len(model._jit_compiled) == 2 and len(bf16._jit_compiled) == 1
    assert spy == []


def test_inference_jit_equals_jax_jit_and_takes_user_options(model, monkeypatch):
    ids = _ids()

    def forward(params, ids):
        return model(ids, params=params).last_hidden_state

    want = jax.jit(forward)(model.params, ids)
    assert_close(inference_jit(forward)(model.params, ids), want, HID, "inference_jit vs jax.jit")
    # the user's options are passed on (and win over ours): an unknown one is XLA's loud error
    with pytest.raises(Exception, match="no_such_option"):
        inference_jit(forward, compiler_options={"no_such_option": True})(model.params, ids)
    seen = {}

    def fake_jit(fun, **kwargs):
        seen.update(kwargs)
        return fun

    monkeypatch.setattr(jax, "jit", fake_jit)
    inference_jit(forward, static_argnums=(), compiler_options={"xla_cpu_experimental_ynn_fusion_type": "x"})
    monkeypatch.undo()
    assert seen["static_argnums"] == ()
    assert seen["compiler_options"] == {"xla_cpu_experimental_ynn_fusion_type": "x"}
