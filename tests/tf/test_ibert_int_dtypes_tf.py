"""TensorFlow I-BERT quant mode in integer dtypes (issue #23): the twin of
``tests/pt/test_ibert_int_dtypes_pt.py``.

In inference (``training=False``, no tape recording) each kernel of :mod:`nezha_zoo.tf.quant` hands on
the exact integers it made (:func:`quant.attach_integer`), and the next kernel computes on them in
int8/int32/int64; the same dequantized input without them (a copy) takes the float64 rule.  The
adversarial inputs sit on the rounding boundaries of each rule (ties of the round-half-even
requantization, the clamp of the GELU polynomial, odd products before ``floor(/ 2)``, negative values
under ``floor`` = arithmetic right shifts, mean ties in LayerNorm, the exponent boundaries ``k * x0``
of the softmax); the integer rule must give the float64 rule's integers, transformers'
``quant_modules`` evaluated exactly, and the PyTorch kernels' integers, in eager mode and under
``tf.function(jit_compile=True)``.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.ibert import quant_modules as hf_quant  # noqa: E402

import nezha_zoo.tf as ztf  # noqa: E402
import nezha_zoo.tf.ibert as tf_ibert  # noqa: E402
from nezha_zoo import IBertConfig  # noqa: E402
from nezha_zoo.pt import quant as pt_quant  # noqa: E402
from nezha_zoo.testing import IBERT_SMOKE as SMOKE  # noqa: E402
from nezha_zoo.testing import pin_precision  # noqa: E402
from nezha_zoo.tf import quant  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.pt, pytest.mark.hf]

MODES = ("eager", "xla")


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("tf")
    pin_precision("pt")


@pytest.fixture
def branches(monkeypatch):
    """The predicates :func:`quant.exact_or` saw in eager mode (True: the integer rule ran)."""
    seen: list[bool] = []
    original = quant.exact_or

    def spy(pred, int_fn, float_fn):
        if tf.executing_eagerly():
            seen.append(bool(pred))
        return original(pred, int_fn, float_fn)

    monkeypatch.setattr(quant, "exact_or", spy)
    monkeypatch.setattr(tf_ibert, "exact_or", spy)
    return seen


#: compiled XLA functions shared by the cases of a test (key -> ``tf.function``): the cases differ
#: only in the values of their tensor arguments, so one compile serves them all
_XLA: dict = {}


def _run(mode: str, fn, *args, key=None):
    """``fn(*args)`` eagerly or compiled by XLA (the compile kept under ``key`` when given); numpy results."""
    if mode == "xla":
        fn = _XLA[key] if key in _XLA else tf.function(fn, jit_compile=True)
        if key is not None:
            _XLA[key] = fn
    out = fn(*(tf.constant(a) for a in args))
    return tf.nest.map_structure(lambda t: t.numpy(), out)


def _pair(module, q: tf.Tensor, scale: tf.Tensor):
    """(integer rule, float64 rule) outputs of ``module`` on ``q * scale``, and the integer rule's integers.

    The integer rule: ``module._forward_int`` on the integers (what a call with ``q`` attached runs in
    eager and graph mode; XLA calls keep the float64 rule, which the module's call on a copy runs).
    The dequantized input is float64 for int64 ``q`` (as a QuantLinear output), float32 otherwise.
    """
    if q.dtype == tf.int64:
        x = quant._attach(tf.cast(q, tf.float64) * tf.cast(scale, tf.float64), q, scale)
    else:
        x = quant.attach_integer(q, scale)
    y_call, s_call = module(x, scale)
    carried, s_int = module._forward_int(q, scale)
    y_f64, s_f64 = module(tf.identity(x), scale)  # a copy carries nothing: the float64 rule
    y_int = carried * tf.cast(s_int, tf.float64)
    tf.debugging.assert_equal(y_call, y_int)
    tf.debugging.assert_equal(s_call, s_int)
    return y_int, y_f64, s_int, s_f64, carried


@pytest.mark.parametrize("mode", MODES)
def test_requantization_ties_and_wide_inputs(mode):
    # ratio 2**-3 exactly: every odd multiple of 4 is a tie of round-half-even; wide |q| up to 2**31
    # (the float64 product rounds there, by definition)
    q = np.concatenate([np.arange(-64, 65), [2**31 - 1, -(2**31) + 1, 2**22 + 3]]).astype(np.int32)
    q = np.tile(q, (3, 1))
    for s_in, s_out in ((2.0**-3, 1.0), (3e-5, 0.011)):
        s_in_t, s_out_t = np.array([s_in], np.float32), np.array([s_out], np.float32)
        for bits in (8, 16, 22):
            want = pt_quant.fixed_point_requantize(
                torch.from_numpy(q).double(), torch.from_numpy(s_in_t), bits, torch.from_numpy(s_out_t)
            ).numpy()
            got = _run(
                mode, lambda q, a, b, bits=bits: quant.requantize_int(q, a, bits, b), q, s_in_t, s_out_t, key=bits
            )
            assert got.dtype == (np.int8 if bits <= 8 else np.int32)
            np.testing.assert_array_equal(got.astype(np.float64), want)
            f64 = quant.fixed_point_requantize(tf.constant(q, tf.float64), s_in_t, bits, s_out_t).numpy()
            np.testing.assert_array_equal(f64, want)
    ident = np.random.default_rng(0).integers(-(2**21), 2**21, q.shape).astype(np.int32)
    s = [np.array([v], np.float32) for v in (2e-5, 7e-6, 4e-3)]
    want = pt_quant.fixed_point_requantize(
        torch.from_numpy(q).double(), torch.from_numpy(s[0]), 8, torch.from_numpy(s[2]),
        torch.from_numpy(ident).double(), torch.from_numpy(s[1]),
    ).numpy()  # fmt: skip
    got = _run(mode, lambda q, i, a, b, c: quant.requantize_int(q, a, 8, c, i, b), q, ident, *s)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got.astype(np.float64), want)


GELU = quant.IntGELU(quant_mode=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("s_val", [3e-4, 2.0**-9, 0.05])
def test_int_gelu_boundaries(mode, s_val, branches):
    s = (np.full((24,), s_val, np.float32) * np.linspace(0.5, 2.0, 24, dtype=np.float32)).astype(np.float32)
    b_int = np.floor(torch.floor(-1.769 / (torch.from_numpy(s) / 1.4142)).numpy()).astype(np.int64)
    rows = [b_int, b_int + 1, b_int - 1, -b_int, -b_int + 1, -b_int - 1, np.zeros_like(b_int)]
    rows += [np.full_like(b_int, v) for v in (1, -1, 2**20, -(2**20), 2**24, -(2**24), 2**31 + 5, -(2**32))]
    q = np.stack(rows)  # (15, 24) int64, as a QuantLinear accumulator
    zg = GELU  # no state: every case may share one XLA compile
    y_int, y_f64, s_int, s_f64, carried = _run(mode, lambda q, s: _pair(zg, q, s), q, s, key="gelu")
    np.testing.assert_array_equal(s_int, s_f64)
    np.testing.assert_array_equal(y_int, y_f64)
    np.testing.assert_array_equal(carried * s_int.astype(np.float64), y_int)
    if mode == "eager":
        assert branches == [True, True]  # the int64 rule ran (call, then _forward_int)
    # transformers' kernel on the exact integers in float64, and the PyTorch integer kernel
    st, qt = torch.from_numpy(s), torch.from_numpy(q)
    with torch.no_grad():
        want, _ = hf_quant.IntGELU(quant_mode=True)(qt.double() * st.double(), st)
        pt_q, _ = pt_quant.IntGELU(quant_mode=True)._forward_int(qt, st)
    np.testing.assert_array_equal(carried, pt_q.double().numpy())
    if mode == "eager":  # XLA may round the float32 scale arithmetic differently (not the integers)
        np.testing.assert_array_equal(y_f64, want.numpy())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shift", [0, 3])
def test_int_layer_norm_boundaries(mode, shift, branches):
    rng = np.random.default_rng(shift)
    n = 24
    zn = quant.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    zn.build()
    zn.gamma.assign(rng.normal(1.0, 0.2, n).astype(np.float32))
    zn.beta.assign(rng.normal(0.0, 0.3, n).astype(np.float32))
    zn.shift.assign([float(shift)])
    s = np.array([3e-6], np.float32)
    q = rng.integers(-(2**21), 2**21, (6, n)).astype(np.int32)
    q[0] = np.arange(n) - n // 2  # small row: sum / n = -0.5, a tie of the mean's round-half-even
    q[1] = [2**21 - 1] * (n // 2) + [-(2**21)] * (n // 2)  # extremes, mean tie again
    q[2] = -np.abs(q[2])  # all negative: floor on negatives (right shifts)
    q[3, :] = 5
    q[3, 0] = 6 + n  # one outlier: the smallest non-zero variance
    q[4] = (q[4] // 2) * 2 + 1  # odd values: odd y * factor before floor(/ 2)
    q = q[None]  # (1, 6, n): transformers' kernel wants (B, L, n)
    y_int, y_f64, s_int, s_f64, carried = _run(mode, lambda q, s: _pair(zn, q, s), q, s)
    np.testing.assert_array_equal(s_int, s_f64)
    np.testing.assert_array_equal(y_int, y_f64)
    if mode == "eager":
        assert branches == [True, True]
    hn = hf_quant.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    pn = pt_quant.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    for m in (hn, pn):
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(zn.gamma.numpy()))
            m.bias.copy_(torch.from_numpy(zn.beta.numpy()))
            m.shift.fill_(shift)
        m.eval()
    st, qt = torch.from_numpy(s), torch.from_numpy(q)
    with torch.no_grad():
        want, _ = hn(qt.double() * st.double(), st)
        pt_q, _ = pn._forward_int(qt, st)
    np.testing.assert_array_equal(carried, pt_q.double().numpy())
    if mode == "eager":  # XLA may round the float32 scale arithmetic differently (not the integers)
        np.testing.assert_array_equal(y_f64, want.numpy())


@pytest.mark.parametrize("mode", ("eager", "graph"))
@pytest.mark.parametrize("batch", [2, 8])  # exponentials computed directly (2), gathered from the table (8)
def test_int_softmax_boundaries_and_masks(mode, batch, branches):
    s = np.array([2.0**-7], np.float32)  # x0 = floor(-0.6931 / s) = -89: multiples of x0 are exponent boundaries
    x0, L = -89, 64
    base = np.arange(0, -L, -1) * 7
    rows = [base, np.arange(L) * x0, np.arange(L) * x0 + 1, np.arange(L) * x0 - 1, base * 0]
    clamp = np.full(L, 30 * x0)
    clamp[0] = 0  # at the exponent clamp
    rows.append(clamp)
    q = np.broadcast_to(np.stack(rows)[None], (batch, 6, L)).astype(np.int32)  # the table: 2671 entries
    mask = np.zeros((batch, 1, L), np.float32)
    mask[1, :, L // 2 :] = np.finfo(np.float32).min
    hf = hf_quant.IntSoftmax(8, quant_mode=True)
    hf.train()
    with torch.no_grad():
        hf(torch.from_numpy(q).double() * torch.from_numpy(s).double(), torch.from_numpy(s))
    hf.eval()
    zs = quant.IntSoftmax(8, quant_mode=True)
    zs.build()
    zs.act.x_min.assign(hf.act.x_min.numpy())
    zs.act.x_max.assign(hf.act.x_max.numpy())

    def both(q, mask, s):
        scores, ok = zs.mask_scores_int(q, mask, s)
        p_int, _ = zs.forward_int(scores, s)
        p_f64, _ = zs.forward_int(tf.cast(q, tf.float64) + tf.cast(mask, tf.float64) / tf.cast(s, tf.float64), s)
        return p_int, p_f64, ok

    fn = both if mode == "eager" else tf.function(both)
    p_int, p_f64, ok = (t.numpy() for t in fn(tf.constant(q), tf.constant(mask), tf.constant(s)))
    assert ok
    np.testing.assert_array_equal(p_int, p_f64)
    assert p_int[1, :, L // 2 :].max() == 0
    # transformers' int_exp and 16-bit act on the exact integers, its normalisation on the rounded
    # 16-bit integers (it leaves ``exp / s`` unrounded); and the PyTorch kernels
    x = torch.from_numpy(q).double() + torch.from_numpy(mask).double() / float(s[0])
    st = torch.from_numpy(s)
    with torch.no_grad():
        e, s_e = hf.int_exp(x - x.max(dim=-1, keepdim=True).values, st)
        e16, s16 = hf.act(e, s_e)
        e16 = torch.round(e16.double() / s16.double())
        p_hf = torch.floor(e16 * torch.floor(2**32 / e16.sum(dim=-1, keepdim=True)) / 2**24)
        ps = pt_quant.IntSoftmax(8, quant_mode=True)
        ps.load_state_dict(hf.state_dict())
        ps.eval()
        p_pt, _ = ps.forward_int(ps.mask_scores_int(torch.from_numpy(q.copy()), torch.from_numpy(mask), st), st)
    np.testing.assert_array_equal(p_int, p_hf.float().numpy())
    np.testing.assert_array_equal(p_int, p_pt.numpy())
    # a row with no visible key, or a mask that is neither 0 nor very negative: the float64 rule
    full = mask.copy()
    full[1] = np.finfo(np.float32).min
    assert not bool(zs.mask_scores_int(tf.constant(q), tf.constant(full), tf.constant(s))[1])
    assert not bool(zs.mask_scores_int(tf.constant(q), tf.constant(mask * 1e-35), tf.constant(s))[1])


#: float64 ops of an inference graph on activation-sized tensors: the dyadic rescaling of a
#: requantization (a cast into an IEEE float64 product, rounded and clamped: its definition), the
#: dequantized outputs of the linear, GELU and LayerNorm kernels (float64 values by their API; pruned
#: when nothing reads them), the float64-held integers the GELU and LayerNorm branches hand on, and
#: the aliases of those (``Identity`` on branch outputs, ``StopGradient``: no computation).
FLOAT64_OPS = {"Cast", "Mul", "Round", "AddV2", "Minimum", "Maximum", "ClipByValue", "If", "StatelessIf"}
FLOAT64_OPS |= {"Identity", "StopGradient"}


def test_quant_forward_computes_in_integer_dtypes(branches, monkeypatch):
    model = ztf.TFIBertModel(IBertConfig(**SMOKE, initializer_range=0.2, quant_mode=True), seed=0)
    rng = np.random.default_rng(0)
    ids = tf.constant(rng.integers(3, 99, (2, 16)), tf.int32)
    mask = np.ones((2, 16), np.int32)
    mask[1, 12:] = 0
    mask = tf.constant(mask)
    model(input_ids=ids, attention_mask=mask, training=True)  # calibrate
    branches.clear()  # building ran uncalibrated kernels, whose float64 rules the predicates chose
    with tf.GradientTape():  # a recording tape: the differentiable float64 rules
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert not branches
    got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    # every integer GELU, LayerNorm and softmax of the 2 layers (and the embeddings' LayerNorm) ran its integer rule
    assert branches == [True] * (1 + 4 * SMOKE["num_hidden_layers"])

    def fields(out):
        return [t.numpy() for t in (*out.hidden_states, *out.attentions)]

    def call(ids, mask):
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)

    monkeypatch.setenv(quant.XLA_IN_GRAPH_ENV, "0")  # read at trace time: the graph runs the kernels op by op
    graph = tf.function(call)
    graph_out = graph(ids, mask)
    monkeypatch.setenv(quant.XLA_IN_GRAPH_ENV, "1")  # the default: each encoder layer one XLA cluster
    layers_xla = tf.function(call)
    for out in (got, graph_out, layers_xla(ids, mask), tf.function(call, jit_compile=True)(ids, mask)):
        for x, y in zip(fields(want), fields(out)):
            np.testing.assert_array_equal(y, x)
    compiled = [
        op
        for op in layers_xla.get_concrete_function(ids, mask).graph.get_operations()
        if op.type in ("PartitionedCall", "StatefulPartitionedCall") and op.node_def.attr["_XlaMustCompile"].b
    ]
    assert len(compiled) == SMOKE["num_hidden_layers"] + 1  # each layer, and the embeddings after their gathers
    # the graph's float64 ops on activation-sized tensors are requantizations and dequantized outputs only
    min_numel = 2 * 16 * SMOKE["hidden_size"]
    ops = graph.get_concrete_function(ids, mask).graph.get_operations()
    wide = {
        op.type
        for op in ops
        for t in op.outputs
        if t.dtype == tf.float64 and t.shape.is_fully_defined() and t.shape.num_elements() >= min_numel
    }
    assert wide and wide <= FLOAT64_OPS, sorted(wide - FLOAT64_OPS)


@pytest.mark.parametrize("mode", ("eager", "graph", "xla"))
def test_computed_once_is_the_identity(mode):
    # every value a kernel constant can take (normal numbers, zeros of both signs, infinities, NaN),
    # bit for bit, as XLA's own kernel, a graph op and an eager op
    values = [0.0, -0.0, 1.0, -1.0, 0.5, -3.0, 2.0**-60, 1e-8 / 127, 3.4e38, -(2.0**31), np.inf, -np.inf, np.nan]
    for dtype in (np.float32, np.float64):
        x = np.array(values, dtype)
        fn = quant.computed_once if mode == "eager" else tf.function(quant.computed_once, jit_compile=mode == "xla")
        got = fn(tf.constant(x)).numpy()
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint8), x.view(np.uint8))


def test_per_channel_requantization_constants_are_computed_once_under_xla(monkeypatch):
    # per-channel scales: the dyadic multiplier (frexp's bit operations, the power of two) lies outside
    # the activation-sized fusion, and the integers are the PyTorch rule's (and those of the trace
    # without computed_once, the rule it replaces), ties and wide inputs included
    rng = np.random.default_rng(1)
    channels = 96
    q = np.concatenate(
        [np.tile(np.arange(-64, 64), (2, 1))[:, :channels], rng.integers(-(2**31) + 1, 2**31, (6, channels))]
    )
    q = q.astype(np.int32)
    s_in = np.concatenate([[2.0**-3] * 8, rng.uniform(1e-6, 1e-2, channels - 8)]).astype(np.float32)
    s_out = np.array([0.011], np.float32)

    def requantize(q, s_in, s_out):
        return quant.requantize_int(q, s_in, 8, s_out)

    want = pt_quant.fixed_point_requantize(
        torch.from_numpy(q).double(), torch.from_numpy(s_in), 8, torch.from_numpy(s_out)
    ).numpy()
    compiled = tf.function(requantize, jit_compile=True)
    args = [tf.constant(a) for a in (q, s_in, s_out)]
    np.testing.assert_array_equal(compiled(*args).numpy().astype(np.float64), want)
    monkeypatch.setattr(quant, "computed_once", lambda x: x)
    np.testing.assert_array_equal(tf.function(requantize, jit_compile=True)(*args).numpy().astype(np.float64), want)
    monkeypatch.undo()

    hlo = compiled.experimental_get_compiler_ir(*args)(stage="optimized_hlo")
    # the fused computations that write an activation-sized result hold no bit operation of frexp
    wide = f"[{q.shape[0]},{channels}]"
    bodies = {}
    for block in hlo.split("\n\n"):
        head = block.strip().split("\n", 1)[0]
        if head.startswith("%"):
            bodies[head.split()[0][1:]] = block
    fusions = [line for line in hlo.splitlines() if " fusion(" in line and "calls=%" in line]
    activation_sized = [line for line in fusions if line.split("=", 1)[1].strip().split("{")[0].endswith(wide)]
    assert activation_sized
    for line in activation_sized:
        body = bodies[line.split("calls=%", 1)[1].split(",")[0].split()[0]]
        assert "shift-right-arithmetic" not in body and "bitcast-convert" not in body, line
