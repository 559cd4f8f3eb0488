"""Flax I-BERT quant mode in integer dtypes (issue #23): the Flax twin of ``tests/pt/test_ibert_int_dtypes_pt.py``.

Inside the model the quantized tensors travel as their integers (int8/int16/int32/int64,
:func:`nezha_zoo.flax.quant.integer_of`) and the kernels compute on them in integer dtypes; a kernel
given the dequantized float ``x`` instead (its public form, the path of every earlier release)
recovers the integers in float64 and follows the float64 rules.  The adversarial inputs below sit on
the rounding boundaries of each rule (requantization ties, the GELU clamp, negative values under
``floor`` as right shifts, LayerNorm mean ties, the softmax exponent boundaries ``k * x0``, masks); the
integer path must give the float64 path's integers bit for bit, PyTorch's, and transformers'
``quant_modules`` evaluated exactly, op by op and under ``jax.jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.ibert import quant_modules as hf_quant

from nezha_zoo import IBertConfig
from nezha_zoo.flax import FlaxIBertModel
from nezha_zoo.flax import quant as fq
from nezha_zoo.flax.ibert import _int_bmm
from nezha_zoo.pt import quant as pq
from nezha_zoo.testing import IBERT_SMOKE as SMOKE
from nezha_zoo.testing import ibert_layer_norm_rows, op_by_op, pin_precision

pytestmark = [pytest.mark.flax, pytest.mark.pt, pytest.mark.hf]

pin_precision("flax")
pin_precision("pt")

#: (batch, length) of every model-level test: op by op, each primitive compiles once per shape, so
#: the tests share those compiles
BATCH = (2, 12)


def _both_ways(fn):
    """``fn()`` op by op and under ``jax.jit``, inside the 64-bit scope, as numpy trees (must agree)."""
    with fq.x64_scope():
        eager = jax.tree_util.tree_map(np.asarray, fn())
        jitted = jax.tree_util.tree_map(np.asarray, jax.jit(fn)())
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return eager


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def test_requantization_ties_and_wide_inputs():
    # ratio 2**-3 exactly: every odd multiple of 4 is a tie of round-half-even; wide |q| up to 2**31
    q = torch.cat([torch.arange(-64, 65, dtype=torch.int32), torch.tensor([2**31 - 1, -(2**31) + 1, 2**22 + 3])])
    q = q.reshape(1, -1).expand(3, -1).contiguous()
    for s_in, s_out in ((torch.tensor([2.0**-3]), torch.tensor([1.0])), (torch.tensor([3e-5]), torch.tensor([0.011]))):
        for bits in (8, 16, 22):
            want = _np(pq.fixed_point_requantize(q.double(), s_in, bits, s_out))
            got = _both_ways(lambda: fq.requantize_int(jnp.asarray(_np(q)), _np(s_in), bits, _np(s_out)))  # noqa: B023
            assert got.dtype == {8: np.int8, 16: np.int16, 22: np.int32}[bits]
            assert np.array_equal(got.astype(np.float64), want)
    ident = torch.randint(-(2**21), 2**21, q.shape, dtype=torch.int32)
    s_in, s_id, s_out = torch.tensor([2e-5]), torch.tensor([7e-6]), torch.tensor([4e-3])
    want = _np(pq.fixed_point_requantize(q.double(), s_in, 8, s_out, ident.double(), s_id))
    got = _both_ways(lambda: fq.requantize_int(_np(q), _np(s_in), 8, _np(s_out), _np(ident), _np(s_id)))
    assert got.dtype == np.int8 and np.array_equal(got.astype(np.float64), want)


@pytest.mark.parametrize(("s_val", "wide"), [(3e-4, False), (2.0**-9, False), (0.05, False), (3e-4, True)])
def test_int_gelu_boundaries(s_val, wide):
    s = torch.full((24,), s_val) * torch.linspace(0.5, 2.0, 24)  # per channel, as after a QuantLinear
    b_int = torch.floor(-1.769 / (s / 1.4142)).to(torch.int64)  # the polynomial's clamp, per channel
    rows = [b_int, b_int + 1, b_int - 1, -b_int, -b_int + 1, -b_int - 1, torch.zeros_like(b_int)]
    rows += [torch.full_like(b_int, v) for v in (1, -1, 2**20, -(2**20), 2**24, -(2**24))]
    if wide:  # q * (y + one) passes 2**53: the kernel takes the float64 rule (lax.cond), which rounds
        rows += [torch.full_like(b_int, v) for v in (2**45 + 1, -(2**45) - 3)]
    q = torch.stack(rows)  # (13 or 15, 24)
    gelu = fq.IntGELU(quant_mode=True)
    q_out, s_out = _both_ways(lambda: gelu(jnp.asarray(_np(q)), _np(s)))  # int64 in, int64 out
    y_f64, s_f64 = _both_ways(lambda: gelu(_np(q.double() * s.double()), _np(s)))  # the float64 rule
    assert q_out.dtype == np.int64 and np.array_equal(s_out, s_f64)
    assert np.array_equal(q_out * s_out.astype(np.float64), y_f64)
    with torch.no_grad():
        y_pt, _ = pq.IntGELU(quant_mode=True)(q.double() * s.double(), s)
        y_hf, _ = hf_quant.IntGELU(quant_mode=True)(q.double() * s.double(), s)
    assert np.array_equal(y_f64, _np(y_pt))
    assert np.array_equal(y_f64, _np(y_hf))
    # a caller's bound on max|q| (QuantLinear's with_bound) instead of the pass over q: the tight one
    # keeps the int64 branch (unless q * (y + one) passes 2**53), one past every limit takes the float64
    # rule; the same integers either way
    taken = []
    choose = fq._exact_or_rule

    def record(exact, *branches):
        if not isinstance(exact, jax.core.Tracer):
            taken.append(bool(exact))
        return choose(exact, *branches)

    fq._exact_or_rule = record
    try:
        for bound in (float(np.abs(_np(q)).max()), 2.0**62):
            q_b, s_b = _both_ways(lambda: gelu(jnp.asarray(_np(q)), _np(s), q_bound=np.float64(bound)))  # noqa: B023
            assert q_b.dtype == np.int64 and np.array_equal(q_b, q_out) and np.array_equal(s_b, s_out)
    finally:
        fq._exact_or_rule = choose
    assert taken == [not wide, False]


def test_quant_linear_bound():
    # extreme integers: activations -128 / 127, weights -127 / 126 (per-channel scale 1/127), 32-bit biases
    K, N = 40, 6
    kernel = np.where(np.arange(N) % 2 == 0, -1.0, 1.0).astype(np.float32) * np.ones((K, 1), np.float32)
    bias = np.array([3e3, -3e3, 0.0, 5.0, -5.0, 2.5], np.float32)
    x = np.full((3, K), -128, np.int8)
    x[1] = 127
    x[2, ::2] = 127
    s_in = np.array([0.01], np.float32)
    lin = fq.QuantLinear(K, N, quant_mode=True)
    variables = {
        "params": {"kernel": kernel, "bias": bias},
        "buffers": {
            "weight_integer": np.zeros((N, K), np.float32),
            **dict.fromkeys(("fc_scaling_factor", "bias_integer"), np.zeros(N, np.float32)),
        },
    }
    acc, s_out, bound = _both_ways(lambda: lin.apply(variables, jnp.asarray(x), s_in, with_bound=True))
    with fq.x64_scope():
        w_int = np.asarray(fq.quantize_kernel(kernel)["kernel_int8"]).astype(np.int64)
        b_int = np.asarray(fq.symmetric_quantize(bias, 32, s_out)).astype(np.int64)
    assert set(np.unique(w_int)) == {-127, 126}
    want = x.astype(np.int64) @ w_int + b_int
    assert acc.dtype == np.int64 and np.array_equal(acc, want)
    assert bound == K * 2**14 + np.abs(b_int).max() >= np.abs(want).max()
    acc2, s2 = _both_ways(lambda: lin.apply(variables, jnp.asarray(x), s_in))  # without: the pair
    assert np.array_equal(acc2, acc) and np.array_equal(s2, s_out)


@pytest.mark.parametrize("d", [64, 1024, 1025])
def test_attention_scores_are_exact(d):
    # the extreme sums: d * 2**14 (all -128 * -128) and, past 2**24 at d = 1025 (the int8 product
    # there: float32 would round 2**24 + 1), an odd one
    rng = np.random.default_rng(d)
    a = rng.integers(-128, 128, (1, 2, 3, d)).astype(np.int8)
    b = rng.integers(-128, 128, (1, 2, 4, d)).astype(np.int8)
    a[0, 0, :2], b[0, 0, :2] = -128, -128
    a[0, 0, 1, -1], b[0, 0, 1, -1] = 1, 1
    a[0, 1, 0], b[0, 1, 0] = 127, -128
    want = np.einsum("bhqd,bhkd->bhqk", a.astype(np.int64), b.astype(np.int64))
    got = _both_ways(lambda: _int_bmm(jnp.asarray(a), jnp.asarray(b)))
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert want[0, 0, 0, 0] == d * 2**14 and want[0, 0, 1, 1] == (d - 1) * 2**14 + 1
    assert want[0, 1, 0, 0] == -d * 127 * 128


@pytest.mark.parametrize("shift", [0, 3])
def test_int_layer_norm_boundaries(shift):
    torch.manual_seed(shift)
    n = 24
    pn = pq.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    with torch.no_grad():
        pn.weight.normal_(1.0, 0.2)
        pn.bias.normal_(0.0, 0.3)
        pn.shift.fill_(shift)
    pn.eval()
    hn = hf_quant.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    hn.load_state_dict(pn.state_dict())
    hn.eval()
    s = torch.tensor([3e-6])
    q = torch.from_numpy(ibert_layer_norm_rows(n, 7, seed=shift))  # (1, 7, n): the rule's edges
    ln = fq.IntLayerNorm(n, 1e-5, quant_mode=True)
    variables = {
        "params": {"scale": _np(pn.weight), "bias": _np(pn.bias)},
        "buffers": {"shift": np.full((1,), shift, np.float32)},
    }
    q_out, s_out = _both_ways(lambda: ln.apply(variables, jnp.asarray(_np(q)), _np(s)))
    y_f64, s_f64 = _both_ways(lambda: ln.apply(variables, _np(q.double() * s.double()), _np(s)))
    assert q_out.dtype == np.int64 and np.array_equal(s_out, s_f64)
    assert np.array_equal(q_out * s_out.astype(np.float64), y_f64)
    with torch.no_grad():
        y_pt, _ = pn(q.double() * s.double(), s)
        y_hf, _ = hn(q.double() * s.double(), s)
    assert np.array_equal(y_f64, _np(y_pt)) and np.array_equal(y_f64, _np(y_hf))
    # bias integers past 2**53 - 2**33: the float64 rule (lax.cond), whose sum rounds
    wide = {**variables, "params": {**variables["params"], "bias": _np(pn.bias) + np.float32(1e8)}}
    q_wide, s_wide = _both_ways(lambda: ln.apply(wide, jnp.asarray(_np(q)), _np(s)))
    y_wide, _ = _both_ways(lambda: ln.apply(wide, _np(q.double() * s.double()), _np(s)))
    assert np.array_equal(q_wide * s_wide.astype(np.float64), y_wide)


def test_int_softmax_boundaries_and_masks():
    s = torch.tensor([2.0**-7])  # x0 = floor(-0.6931 / s) = -89: scores at multiples of x0 are exponent boundaries
    x0, L = -89, 64
    base = torch.arange(0, -L, -1, dtype=torch.int64) * 7
    rows = [base, torch.arange(L) * x0, torch.arange(L) * x0 + 1, torch.arange(L) * x0 - 1, base * 0]
    rows.append(torch.full((L,), 30 * x0).index_fill_(0, torch.tensor([0]), 0))  # at the exponent clamp
    q = torch.stack(rows)[None].expand(2, -1, -1).contiguous()  # (2, 6, L)
    hf = hf_quant.IntSoftmax(8, quant_mode=True)
    hf.train()
    with torch.no_grad():
        hf(q.double() * s.double(), s)
    hf.eval()
    ps = pq.IntSoftmax(8, quant_mode=True)
    ps.load_state_dict(hf.state_dict())
    ps.eval()
    mask = torch.zeros(2, 1, L)
    mask[1, :, L // 2 :] = torch.finfo(torch.float32).min
    sm = fq.IntSoftmax(8, quant_mode=True)
    buffers = {"buffers": {"act": {k: _np(v) for k, v in hf.act.state_dict().items()}}}

    def ours(scores, m=None):
        return _both_ways(lambda: sm.apply(buffers, scores, _np(s), True, m, method=fq.IntSoftmax.forward_int))[0]

    x = q.double() + mask.double() / s.double()
    p_int = ours(jnp.asarray(_np(q).astype(np.int32)), _np(mask))
    p_f64 = ours(_np(x))  # the float64 rule on the masked scores
    with torch.no_grad():
        p_pt, _ = ps.forward_int(x, s)
        e, s_e = hf.int_exp(x - x.max(dim=-1, keepdim=True).values, s)
        e16, s16 = hf.act(e, s_e)
        e16 = torch.round(e16.double() / s16.double())
        p_hf = torch.floor(e16 * torch.floor(2**32 / e16.sum(dim=-1, keepdim=True)) / 2**24)
    assert np.array_equal(p_int, p_f64) and np.array_equal(p_int, _np(p_pt)) and np.array_equal(p_int, _np(p_hf))
    assert p_int[1, :, L // 2 :].max() == 0
    # no visible key in a row, or a mask that is neither 0 nor very negative: the float64 rule (lax.cond)
    for m in (mask.clone().index_fill_(0, torch.tensor([1]), torch.finfo(torch.float32).min), mask * 1e-35):
        want = ours(_np(q.double() + m.double() / s.double()))
        assert np.array_equal(ours(jnp.asarray(_np(q).astype(np.int32)), _np(m)), want, equal_nan=True)


def _f64_eqns(jaxpr, min_size: int, out: list) -> None:
    """(primitive, shape) of equations with a float64 output of ``min_size``+ elements; of a
    ``cond``, only the branch taken when the kernel's exactness test holds (the last one)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            _f64_eqns(eqn.params["branches"][-1].jaxpr, min_size, out)
            continue
        subs = [
            getattr(sub, "jaxpr", None)
            for p in eqn.params.values()
            for sub in (p if isinstance(p, (tuple, list)) else (p,))
        ]
        subs = [getattr(inner, "jaxpr", inner) for inner in subs if inner is not None]
        if subs:  # a call (jit, custom_jvp...): its equations, not its outputs
            for inner in subs:
                _f64_eqns(inner, min_size, out)
            continue
        for v in eqn.outvars:
            aval = v.aval
            if getattr(aval, "dtype", None) == jnp.float64 and np.prod(aval.shape, dtype=int) >= min_size:
                out.append((eqn.primitive.name, tuple(aval.shape)))


#: float64 ops a quant forward still runs on activation-sized arrays: the requantization's dyadic
#: product (convert, multiply, round, clamp, add the residual's), and the softmax exponentials, which
#: ``act`` divides by their scale (its definition; the divisor is materialised, see ``exact_div``).
FLOAT64_OPS = {"convert_element_type", "mul", "round", "max", "min", "clamp", "add", "div", "optimization_barrier"}
FLOAT64_OPS |= {"broadcast_in_dim"}


def test_quant_forward_computes_in_integer_dtypes(monkeypatch):
    # one layer holds every integer kernel; each more only adds x64 op-by-op and compile time
    config = IBertConfig(**{**SMOKE, "num_hidden_layers": 1}, initializer_range=0.2, quant_mode=True)
    model = FlaxIBertModel(config, seed=0)
    ids = np.random.default_rng(0).integers(3, 99, BATCH)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    _, state = model(ids, mask, train=True)  # calibrate
    buffers = state["buffers"]

    def forward(p, b, i, m):
        return model(i, m, params=p, buffers=b).last_hidden_state

    # every exactness test holds here, so the integer branches run (op by op: concrete predicates)
    taken = []
    choose = fq._exact_or_rule
    monkeypatch.setattr(fq, "_exact_or_rule", lambda exact, *a: taken.append(bool(exact)) or choose(exact, *a))
    eager = np.asarray(forward(model.params, buffers, ids, mask))
    monkeypatch.undo()
    assert taken and all(taken), taken
    jitted = np.asarray(jax.jit(forward)(model.params, buffers, ids, mask))
    assert np.array_equal(eager, jitted)
    with fq.x64_scope():
        closed = jax.make_jaxpr(lambda p, b: model.module.apply({"params": p, "buffers": b}, ids, mask))(
            model.params, buffers
        )
    found: list = []
    _f64_eqns(closed.jaxpr, ids.size * SMOKE["hidden_size"], found)
    names = {name for name, _ in found}
    # no float64 polynomial, floor, sign, subtraction, shift or sum: those run in integers now
    assert names <= FLOAT64_OPS, sorted(names - FLOAT64_OPS)
    text = str(closed)
    assert "int64" in text and "preferred_element_type=int32" in text


# --- rows where the float64 rule gives NaN: int64 cannot hold it, the model poisons them ---------


def test_layer_norm_zero_variance_rows_are_bad():
    n = 24
    rng = np.random.default_rng(0)
    q = rng.integers(-(2**21), 2**21, (1, 5, n))
    q[0, 1] = 7  # zero variance: the rule's std is 0, its factor inf, its output 0 * inf = NaN
    q[0, 3] = -(2**20)
    s = np.array([3e-6], np.float32)
    ln = fq.IntLayerNorm(n, 1e-5, quant_mode=True)
    variables = {
        "params": {"scale": rng.normal(1.0, 0.2, n).astype(np.float32), "bias": np.zeros(n, np.float32)},
        "buffers": {"shift": np.zeros((1,), np.float32)},
    }
    q_out, s_out, bad = _both_ways(lambda: ln.apply(variables, jnp.asarray(q), s, with_bad_rows=True))
    y_f64, _ = _both_ways(lambda: ln.apply(variables, q.astype(np.float64) * s.astype(np.float64), s))
    nan_rows = np.isnan(y_f64).any(axis=-1, keepdims=True)
    assert nan_rows[0, :, 0].tolist() == [False, True, False, True, False]
    assert bad.dtype == np.bool_ and np.array_equal(bad, nan_rows)
    ok = ~nan_rows[..., 0]
    assert np.array_equal((q_out * s_out.astype(np.float64))[ok], y_f64[ok])  # the other rows: unchanged
    pn = pq.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    with torch.no_grad():
        pn.weight.copy_(torch.from_numpy(variables["params"]["scale"]))
        pn.bias.zero_()
        y_pt, _ = pn.eval()(torch.from_numpy(q).double() * float(s[0]), torch.from_numpy(s))
    assert np.array_equal(np.isnan(_np(y_pt)).any(axis=-1, keepdims=True), nan_rows)


def test_gelu_nan_rows_are_bad():
    # one channel's scale so small that the rule's constant floor(1 / (a * s_e**2)) is -inf and its
    # output scale 0: the rule gives NaN (0 * inf) or -inf in that channel, of every row
    s = np.array([3e-4, 2e-3, 1e-20, 5e-4], np.float32)
    q = np.array([[3, -5, 7, 1], [0, 4, 0, 4], [-2, -2, -2, -2]], np.int64)
    gelu = fq.IntGELU(quant_mode=True)
    _, _, bad = _both_ways(lambda: gelu(jnp.asarray(q), s, with_bad_rows=True))
    y_f64, _ = _both_ways(lambda: gelu(q.astype(np.float64) * s.astype(np.float64), s))
    with torch.no_grad():
        y_pt, _ = pq.IntGELU(quant_mode=True)(
            torch.from_numpy(q).double() * torch.from_numpy(s).double(), torch.from_numpy(s)
        )
    nan_rows = np.isnan(y_f64).any(axis=-1, keepdims=True)
    assert nan_rows.all() and np.array_equal(np.isnan(_np(y_pt)).any(axis=-1, keepdims=True), nan_rows)
    assert bad.dtype == np.bool_ and np.array_equal(bad, nan_rows)
    # none where the rule is finite: past 2**53 (the float64 branch runs), and past int64 (an
    # uncalibrated model's GELU), which saturates: the next requantization clamps it alike
    wide = np.array([[2**45 + 1, -(2**45) - 3], [2**52, 3]], np.int64)
    q_out, _, bad = _both_ways(lambda: gelu(jnp.asarray(wide), s[:2], with_bad_rows=True))
    y_f64, s_out = _both_ways(lambda: gelu(wide.astype(np.float64) * s[:2].astype(np.float64), s[:2]))
    rule = y_f64 / s_out.astype(np.float64)  # the rule's integers
    assert not bad.any() and np.isfinite(rule).all() and abs(rule[1, 0]) >= 2.0**63
    assert abs(int(q_out[1, 0])) >= 2**63 - 1024 and np.sign(q_out[1, 0]) == np.sign(rule[1, 0])


def test_model_poisons_the_rows_the_float64_rule_makes_nan(tmp_path):
    """A word whose embedding row is constant (zero token-type and position tables): the embedding
    LayerNorm's variance is 0, NaN in the float64 rule (and in PyTorch); the NaN reaches every row of
    its sequence through the next attention.  Flax (op by op and jitted) gives NaN in the same rows of
    every output as the float64 rule; the other sequence is what it is without it, bit for bit."""
    import transformers

    from nezha_zoo.pt import IBertModel

    model = FlaxIBertModel(IBertConfig(**SMOKE, initializer_range=0.2, quant_mode=True), seed=0)
    emb = model.params["embeddings"]
    for table in ("token_type_embeddings", "position_embeddings"):
        emb[table]["embedding"] = jnp.zeros_like(emb[table]["embedding"])
    emb["word_embeddings"]["embedding"] = emb["word_embeddings"]["embedding"].at[5].set(0.3)
    ids = np.random.default_rng(0).integers(6, 99, BATCH)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    _, state = model(ids, mask, train=True)  # calibrate without the constant word
    model.buffers = state["buffers"]
    ids[0, 4] = 5
    kw = dict(output_hidden_states=True, output_attentions=True)
    eager = model(ids, mask, **kw)
    jitted = jax.jit(lambda i, m: model(i, m, **kw))(ids, mask)
    # the other sequence without the poisoned one: twice, at the shape of the eager call, op by op as it
    # (its primitives compiled already; a repeated signature would compile the whole model)
    with op_by_op(model):
        alone = model(ids[[1, 1]], mask[[1, 1]], **kw)
    model.save_pretrained(str(tmp_path))
    # the float64 rule end to end: our PyTorch with autograd on (its float path) and without (its
    # integer path, which hands such a tensor to the float path) and transformers (float32 emulation)
    refs = [m.from_pretrained(str(tmp_path)).eval() for m in (IBertModel, IBertModel, transformers.IBertModel)]
    with torch.no_grad():
        no_grad = refs[1](torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw)
    refs = [m(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw) for m in refs[::2]] + [no_grad]
    for field in ("last_hidden_state", "hidden_states", "attentions"):
        # batch axis first: (B, ...) of the stacked layer tuples
        mine, theirs, one = (
            np.asarray(o[field]) if field == "last_hidden_state" else np.moveaxis(np.stack(o[field]), 1, 0)
            for o in (eager, jitted, alone)
        )
        for ref in refs:
            out = ref[field] if field == "last_hidden_state" else torch.stack(ref[field]).transpose(0, 1)
            ref_nan = np.isnan(_np(out)).any(axis=-1)
            assert ref_nan[0].any() and not ref_nan[1].any(), field  # the first sequence only
            assert np.array_equal(np.isnan(mine).any(axis=-1), ref_nan), field
        assert np.array_equal(mine, theirs, equal_nan=True), field
        assert np.array_equal(mine[[1, 1]], one), field
    hidden = np.asarray(eager.hidden_states[0])
    assert np.isnan(hidden[0, 4]).all() and not np.isnan(np.delete(hidden, 4, axis=1)).any()  # before attention


# --- float32 scales below 2**-126: XLA's CPU flushes them to zero, torch keeps them ---------------


def test_uncalibrated_quant_model_is_finite_and_equals_pytorch(tmp_path):
    """A fresh quant-mode model, never calibrated (activation ranges +-1e-5): the softmax exponentials'
    scale ``0.358 * s**2 / 2**30`` is a float32 subnormal (~1e-39).  Flax (op by op and jitted) must
    give PyTorch's finite outputs bit for bit, not the NaN of a scale flushed to zero."""
    from nezha_zoo.pt import IBertModel

    model = FlaxIBertModel(IBertConfig(**SMOKE, quant_mode=True), seed=0)
    ids = np.random.default_rng(0).integers(3, 99, BATCH)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    kw = dict(output_hidden_states=True, output_attentions=True)
    eager = model(ids, mask, **kw)
    jitted = jax.jit(lambda i, m: model(i, m, **kw))(ids, mask)
    model.save_pretrained(str(tmp_path))
    ref = IBertModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw)
    for field in ("last_hidden_state", "hidden_states", "attentions"):
        theirs = [want[field]] if field == "last_hidden_state" else list(want[field])
        for out in (eager, jitted):
            mine = [out[field]] if field == "last_hidden_state" else list(out[field])
            assert len(mine) == len(theirs), field
            for a, b in zip(mine, theirs, strict=True):
                a, b = np.asarray(a), _np(b)
                assert np.isfinite(b).all() and np.isfinite(a).all(), field
                assert a.dtype == b.dtype and np.array_equal(a, b), field


def test_subnormal_scales_are_torchs():
    """The kernels' float32 scales that can fall below 2**-126 are torch's (gradual underflow), not 0."""
    # the softmax exponentials' scale of uncalibrated scores (s_q = s_k = 1e-5 / 127, head size 8)
    s = (torch.tensor([1e-5]) / 127) ** 2 / 8**0.5
    a = pq.IntSoftmax(8).coef[0]
    want = a * s**2 / 2**30
    assert 0 < float(want) < 2.0**-126  # a subnormal
    got = _both_ways(lambda: fq._fl32_exact(fq._fl32_exact(jnp.float32(a) * fq._fl32_exact(_np(s**2))) / 2.0**30))
    assert got.dtype == np.float64 and np.array_equal(got, _np(want).astype(np.float64))
    # the integer GELU's output scale for input scales ~1e-14 (a weight row of ~1e-4, uncalibrated input)
    s = torch.tensor([1e-14, 5e-15, 2e-14, 3e-4])
    q = np.array([[3, -5, 7, 1], [0, 4, -9, 4]], np.int64)
    with torch.no_grad():
        y_pt, s_pt = pq.IntGELU(quant_mode=True)(torch.from_numpy(q).double() * s.double(), s)
    assert (np.abs(_np(s_pt[:3])) > 0).all() and (np.abs(_np(s_pt[:3])) < 2.0**-126).all()
    gelu = fq.IntGELU(quant_mode=True)
    _, s_int = _both_ways(lambda: gelu(jnp.asarray(q), _np(s)))  # integers beyond int64 here: saturated
    y, s_out = _both_ways(lambda: gelu(q.astype(np.float64) * _np(s.double()), _np(s)))  # the float64 rule
    for got in (s_int, s_out):
        assert np.array_equal(got, _np(s_pt).astype(np.float64))
    assert np.isfinite(_np(y_pt)).all() and np.array_equal(y, _np(y_pt))
