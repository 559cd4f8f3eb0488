"""Keras 3 I-BERT vs transformers 4.57.6 PyTorch, in float and integer-only modes.

Float mode: transformers' model is saved with its own ``save_pretrained`` and loaded by our class.

Quant mode: transformers' model is calibrated (training-mode forwards, dropout off), saved, and loaded
by ours, so both hold the same quantization state.  As in ``tests/pt/test_ibert_pt.py`` (whose
reasoning this file follows): transformers' encoder hands the *embedding* scale to every layer, so the
oracle is transformers with each layer fed the previous layer's output scale
(:func:`fix_scale_propagation`); the query/key ranges are widened to ``127 * 2**k``
(:func:`snap_attention_scales`) so transformers' float32 attention scores are exact integers too; and
``initializer_range=0.2`` keeps the scales realistic (transformers' float32 softmax overflows below).
Then every requantized integer tensor agrees bit for bit: the encoder outputs and attentions are
compared with tolerance 0, the float heads on top with the float tolerances.

One more transformers artefact remains possible at any size: its ``IntLayerNorm`` forms ``y * factor``
(~2**35) in float32, and a rounded product can land one 8-bit step away after requantization (seen:
1 of 1344 embedding outputs for one random multiple-choice model, ids-only input).  Ours is the exact
integer result, equal bit for bit to nezha_zoo's PyTorch backend
(:func:`test_quant_mode_matches_our_pytorch_backend_exactly`); the models here are seeded per model.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

tf = pytest.importorskip("tensorflow")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
keras = pytest.importorskip("keras")

from transformers.models.ibert import quant_modules as hf_quant  # noqa: E402

import nezha_zoo.tf as ztf  # noqa: E402
from nezha_zoo import IBertConfig  # noqa: E402
from nezha_zoo.spec.layouts import LAYOUTS  # noqa: E402
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision, tiny_inputs  # noqa: E402
from nezha_zoo.tf import quant  # noqa: E402
from nezha_zoo.validation import InputError  # noqa: E402

pytestmark = [pytest.mark.tf, pytest.mark.hf]

HEADS = (
    "Model",
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForMultipleChoice",
    "ForTokenClassification",
    "ForQuestionAnswering",
)
TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    layer_norm_eps=1e-5,
)
#: Quant mode: dropout off (deterministic calibration), realistic weight scales, head_dim 16.
QUANT = dict(
    TINY,
    num_attention_heads=2,
    quant_mode=True,
    initializer_range=0.2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
HIDDEN, LOGITS = TOLERANCES["hidden"], TOLERANCES["logits"]
#: Outputs that are (dequantized) integers in quant mode: compared exactly.
INTEGER_FIELDS = {"last_hidden_state", "hidden_states", "attentions"}
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _pin():
    pin_precision("tf")
    pin_precision("pt")
    transformers.logging.set_verbosity_error()
    yield
    if MEASURED:
        print("\nmax-abs vs transformers:", {k: f"{v:.1e}" for k, v in sorted(MEASURED.items())})


def _record(name: str, diff: float) -> None:
    MEASURED[name] = max(MEASURED.get(name, 0.0), diff)


def inputs_for(head: str, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Right-padded ids (pad id 1), attention mask, token types ((B, C, L) for multiple choice)."""
    choices = 3 if head == "ForMultipleChoice" else None
    return tiny_inputs(batch=batch, seq_len=7, vocab_size=99, seed=seed, pad=1, num_choices=choices)


def _pt(arrays: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


@torch.no_grad()
def calibrate_hf(model, head: str, steps: int = 3) -> None:
    model.train()
    for s in range(steps):
        model(**_pt(inputs_for(head, seed=100 + s)))
    model.eval()


def calibrate_tf(model, head: str, steps: int = 3) -> None:
    for s in range(steps):
        model(**inputs_for(head, seed=100 + s), training=True)


@torch.no_grad()
def snap_attention_scales(model) -> None:
    """Widen every query/key activation range to ``127 * 2**k``: power-of-two scales."""
    for m in model.modules():
        for name in ("query_activation", "key_activation"):
            act = getattr(m, name, None)
            if act is not None:
                r = torch.maximum(act.x_min.abs(), act.x_max.abs())
                p2 = 2.0 ** torch.ceil(torch.log2(r / 127))
                act.x_min.copy_(-127 * p2)
                act.x_max.copy_(127 * p2)


class _ScaleFix(torch.nn.Module):
    """Feeds a transformers ``IBertLayer`` the previous layer's output scale instead of the embeddings'."""

    def __init__(self, layer, prev) -> None:
        super().__init__()
        self.inner, self.prev = layer, prev

    def forward(self, hidden, scale, *args, **kwargs):
        if self.prev is not None and scale is not None:
            scale = self.prev.output.output_activation.act_scaling_factor
        return self.inner(hidden, scale, *args, **kwargs)


def fix_scale_propagation(hf_model):
    layers = hf_model.base_model.encoder.layer
    hf_model.base_model.encoder.layer = torch.nn.ModuleList(
        _ScaleFix(layer, layers[i - 1] if i else None) for i, layer in enumerate(layers)
    )
    return hf_model


class Pairs:
    """(transformers model, our TF model, checkpoint dir) per (head, settings), built once per module."""

    def __init__(self, root) -> None:
        self.root = root
        self.cache: dict = {}

    def get(self, head: str, quant_mode: bool = False, **overrides):
        key = (head, quant_mode, tuple(sorted(overrides.items())))
        if key not in self.cache:
            kw = {**(QUANT if quant_mode else TINY), **overrides}
            # a seed per model, not per creation order: every test sees the same weights whichever tests run
            torch.manual_seed(zlib.crc32(repr(key).encode()))
            hf = getattr(transformers, f"IBert{head}")(transformers.IBertConfig(**kw))
            if quant_mode:
                calibrate_hf(hf, head)
                snap_attention_scales(hf)
            else:
                with torch.no_grad():  # away from the structured init (LayerNorm 1/0, biases 0)
                    for p in hf.parameters():
                        p.add_(torch.randn_like(p) * 0.05)
            hf.eval()
            path = self.root / f"{head}_{len(self.cache)}"
            hf.save_pretrained(path)
            ours = getattr(ztf, f"TFIBert{head}").from_pretrained(path)
            if quant_mode:
                fix_scale_propagation(hf)
            self.cache[key] = (hf, ours, path)
        return self.cache[key]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Pairs:
    return Pairs(tmp_path_factory.mktemp("hf_ibert_tf"))


def _leaves(x, prefix: str):
    if isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(hf_out, tf_out, what: str, quant_mode: bool = False) -> None:
    """Same fields; integer outputs exactly equal in quant mode, the rest within SPEC §5 tolerances."""
    hf_keys = [k for k in hf_out.keys() if hf_out[k] is not None]
    assert list(tf_out.keys()) == hf_keys, f"{what}: fields {list(tf_out.keys())} vs {hf_keys}"
    for field in hf_keys:
        if quant_mode and field in INTEGER_FIELDS:
            tol = 0.0
        else:
            tol = HIDDEN if field in INTEGER_FIELDS else LOGITS
        a, b = list(_leaves(hf_out[field], field)), list(_leaves(tf_out[field], field))
        assert [n for n, _ in a] == [n for n, _ in b], f"{what}: structure of {field} differs"
        for (name, x), (_, y) in zip(a, b):
            d = assert_close(y, x.detach().numpy(), tol, f"{what} {name}")
            _record(f"{what.split()[0]}.{field}{'.q' if quant_mode else ''}", d)


# --- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_variables_equal_spec_and_buffers_are_not_trainable(head):
    model = getattr(ztf, f"TFIBert{head}")(IBertConfig(**TINY), seed=0)
    layout = LAYOUTS["keras"]
    by_key = model.variables_by_key()
    assert set(by_key) == {layout.key(p) for p in model.spec}
    for p in model.spec:
        var = by_key[layout.key(p)]
        assert tuple(var.shape) == layout.shape(p), p.name
        assert var.trainable == p.trainable, p.name
    assert len(model.trainable_weights) == sum(p.trainable for p in model.spec)
    assert any(k.endswith("softmax/act/x_min") for k in by_key)
    base = model if head == "Model" else model.ibert
    np.testing.assert_array_equal(base.embeddings.embeddings_act1.x_min.numpy(), np.float32([-1e-5]))  # spec init


# --- float mode: RoBERTa numbers -----------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_float_mode_matches_transformers(pairs, head):
    hf, ours, _ = pairs.get(head)
    inp = inputs_for(head)
    with torch.no_grad():
        ref = hf(**_pt(inp), output_hidden_states=True, output_attentions=True)
        ref_ids = hf(input_ids=torch.from_numpy(inp["input_ids"]))
    compare(ref, ours(**inp, output_hidden_states=True, output_attentions=True), f"{head} float-padded")
    compare(ref_ids, ours(input_ids=inp["input_ids"]), f"{head} float-ids-only")
    tup = ours(**inp, output_hidden_states=True, return_dict=False)
    with torch.no_grad():
        ref_tup = hf(**_pt(inp), output_hidden_states=True, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(ref_tup)
    for (name, x), (_, y) in zip(_leaves(ref_tup, "t"), _leaves(tup, "t")):
        assert_close(y, x.numpy(), LOGITS, f"{head} tuple {name}")


def test_float_mode_inputs_embeds_and_head_mask(pairs):
    hf, ours, _ = pairs.get("Model")
    inp = inputs_for("Model", seed=3)
    ids = inp.pop("input_ids")
    embeds = tf.gather(ours.embeddings.word_embeddings.embeddings, ids).numpy()
    hm = np.array([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0]], np.float32)
    with torch.no_grad():
        a = hf(inputs_embeds=torch.from_numpy(embeds), **_pt(inp))
        b = hf(input_ids=torch.from_numpy(ids), head_mask=torch.from_numpy(hm), output_attentions=True, **_pt(inp))
    compare(a, ours(inputs_embeds=embeds, **inp), "Model float-embeds")
    compare(b, ours(input_ids=ids, head_mask=hm, output_attentions=True, **inp), "Model float-head_mask")


# --- quant mode: the integer-only forward --------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_quant_mode_matches_transformers(pairs, head):
    hf, ours, _ = pairs.get(head, quant_mode=True)
    inp = inputs_for(head, seed=1)
    with torch.no_grad():
        ref = hf(**_pt(inp), output_hidden_states=True, output_attentions=True)
        ref_ids = hf(input_ids=torch.from_numpy(inp["input_ids"]))
    out = ours(**inp, output_hidden_states=True, output_attentions=True)
    compare(ref, out, f"{head} quant-padded", quant_mode=True)
    compare(ref_ids, ours(input_ids=inp["input_ids"]), f"{head} quant-ids-only", quant_mode=True)
    # the encoder output is 8-bit integers times the last layer's output scale
    base = ours if head == "Model" else ours.ibert
    s = base.encoder.layer[-1].ffn_output.output_activation.act_scaling_factor.numpy()
    q = out.hidden_states[-1].numpy().astype(np.float64) / s.astype(np.float64)
    assert np.abs(q - np.round(q)).max() < 1e-4 and np.abs(q).max() <= 128


@pytest.mark.parametrize("force_dequant", ["none", "gelu", "softmax", "layernorm", "nonlinear"])
def test_force_dequant_matches_transformers(pairs, force_dequant):
    hf, ours, _ = pairs.get("ForMaskedLM", quant_mode=True, force_dequant=force_dequant)
    layer = ours.ibert.encoder.layer[0]
    assert layer.intermediate.intermediate_act_fn.quant_mode == (force_dequant not in ("gelu", "nonlinear"))
    assert layer.attention.self_attention.softmax.quant_mode == (force_dequant not in ("softmax", "nonlinear"))
    assert layer.ffn_output.LayerNorm.quant_mode == (force_dequant not in ("layernorm", "nonlinear"))
    inp = inputs_for("ForMaskedLM", seed=4)
    with torch.no_grad():
        ref = hf(**_pt(inp), output_hidden_states=True, output_attentions=True)
    out = ours(**inp, output_hidden_states=True, output_attentions=True)
    # The float op feeds an 8-bit requantization: TF's and torch's float32 GELU / softmax / LayerNorm
    # could in principle put a value on the other side of a rounding boundary; at these sizes none does.
    for x, y in zip(ref.hidden_states, out.hidden_states):
        np.testing.assert_array_equal(y.numpy(), x.numpy(), err_msg=f"hidden_states[{force_dequant}]")
    float_softmax = force_dequant in ("softmax", "nonlinear")
    for x, y in zip(ref.attentions, out.attentions):
        assert_close(y, x.numpy(), HIDDEN if float_softmax else 0.0, f"attentions[{force_dequant}]")
    _record(f"MLM[{force_dequant}].logits.q", assert_close(out.logits, ref.logits.numpy(), LOGITS, "logits"))


def test_quant_mode_matches_our_pytorch_backend_exactly(pairs):
    import nezha_zoo.pt as zoo

    _, ours, path = pairs.get("ForSequenceClassification", quant_mode=True)
    pt = zoo.IBertForSequenceClassification.from_pretrained(path).eval()
    inp = inputs_for("ForSequenceClassification", seed=6)
    with torch.no_grad():
        ref = pt(**_pt(inp), output_hidden_states=True, output_attentions=True)
    out = ours(**inp, output_hidden_states=True, output_attentions=True)
    for field in ("hidden_states", "attentions"):
        for x, y in zip(ref[field], out[field]):
            np.testing.assert_array_equal(y.numpy(), x.numpy(), err_msg=field)
    assert_close(out.logits, ref.logits.numpy(), LOGITS, "logits")


def test_quant_forward_under_tf_function_equals_eager(pairs):
    _, ours, _ = pairs.get("ForTokenClassification", quant_mode=True)
    inp = {k: tf.constant(v) for k, v in inputs_for("ForTokenClassification", seed=2).items()}
    eager = ours(**inp).logits
    fn = tf.function(lambda x: ours(**x).logits)
    np.testing.assert_array_equal(fn(inp).numpy(), eager.numpy())


def test_in_xla_context():
    assert not quant.in_xla_context()
    assert not tf.function(lambda: tf.constant(quant.in_xla_context()))().numpy()
    assert tf.function(lambda: tf.constant(quant.in_xla_context()), jit_compile=True)().numpy()


@pytest.mark.parametrize("frozen", [False, True])
def test_int8_products_under_xla_equal_the_float_path(pairs, frozen, monkeypatch):
    # XLA in inference with int8 units: int8 x int8 -> int32 matmuls; elsewhere float32 chunks; same integers
    from nezha_zoo.families import ibert as family

    _, ours, _ = pairs.get("ForMaskedLM", quant_mode=True)
    inp = {k: tf.constant(v) for k, v in inputs_for("ForMaskedLM", seed=13).items()}
    # a loaded model's first call traces it once (graph-mode layers trace under XLA): only later calls count
    ours(**inp)
    calls = []
    int8_matmul = quant.int8_matmul
    monkeypatch.setattr(quant, "int8_matmul", lambda *a, **k: calls.append(1) or int8_matmul(*a, **k))
    want = ours(**inp, output_hidden_states=True)  # eager: the float path
    assert not calls
    ours.freeze_integer_weights(frozen)
    logits = []
    try:
        for enabled in (False, True):
            previous = family.set_int8_products(enabled)  # read at trace time
            try:
                n0 = len(calls)
                got = tf.function(lambda x: ours(**x, output_hidden_states=True), jit_compile=True)(inp)
                # 6 linear layers per encoder layer take the int8 path when it is on
                assert len(calls) - n0 == (6 * ours.config.num_hidden_layers if enabled else 0)
            finally:
                family.set_int8_products(previous)
            for x, y in zip(want.hidden_states, got.hidden_states):
                np.testing.assert_array_equal(y.numpy(), x.numpy())
            # the float head on top is compiled by XLA: close to eager, equal between the two XLA runs
            assert_close(got.logits, want.logits.numpy(), LOGITS, "XLA logits")
            logits.append(got.logits.numpy())
    finally:
        ours.freeze_integer_weights(False)
    np.testing.assert_array_equal(logits[1], logits[0])


def test_int8_matmul_is_exact_at_the_int8_extremes():
    a = np.full((2, 3, 4096), -128, np.int8)
    a[..., ::3] = 127
    b = np.full((4096, 5), -128, np.int8)
    b[::5] = 126
    exact = a.astype(np.int64) @ b.astype(np.int64)
    got = tf.function(lambda x, y: quant.int8_matmul(x, y), jit_compile=True)(tf.constant(a), tf.constant(b))
    assert got.dtype == tf.int32
    np.testing.assert_array_equal(got.numpy(), exact)
    np.testing.assert_array_equal(quant.int8_matmul(a, b.T, transpose_b=True).numpy(), exact)  # eager too
    with pytest.raises(ValueError, match="int32 accumulator"):
        quant.int8_matmul(
            np.zeros((1, quant.INT32_EXACT_TERMS + 1), np.int8), np.zeros((quant.INT32_EXACT_TERMS + 1, 1), np.int8)
        )


# --- kernels ------------------------------------------------------------------------------------


def test_kernel_helpers_match_python_and_transformers():
    ratios = np.array([1e-3, 0.37, 1.0, 3.5, 2.0**-20, 0.999999999, 12345.678], np.float64)
    for r in (ratios, -ratios):
        m, e = quant.frexp_multiplier(tf.constant(r))
        hm, he = hf_quant.batch_frexp(torch.from_numpy(r))
        np.testing.assert_array_equal(m.numpy(), hm.double().numpy())
        np.testing.assert_array_equal(e.numpy(), he.double().numpy())
    # Python floor division of float32 values (IntGELU's ``1.0 // s``), not floor(a / b)
    b = np.array([0.1, -0.1, 3e-3, -7.3e-5, 0.3, -2.5, 1.0, -1e-3], np.float32)
    got = quant.python_floordiv(1.0, tf.constant(b)).numpy()
    want = (1.0 // torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(got, want)
    assert got[0] == 9.0 and np.floor(np.float32(1.0) / b[0]) == 10.0
    # exact integer products where one float32 GEMM rounds (3072-term int8 rows)
    a = np.full((4, 3072), 127.0, np.float32)
    a[:, ::2] = 125.0
    w = np.random.default_rng(0).integers(100, 127, (3072, 8)).astype(np.float32)
    exact = a.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(quant.integer_matmul(tf.constant(a), tf.constant(w)).numpy(), exact)


def test_kernels_match_transformers_modules():
    torch.manual_seed(0)
    hl = hf_quant.QuantLinear(32, 37, per_channel=True, quant_mode=True)
    torch.nn.init.normal_(hl.weight, std=0.2)
    torch.nn.init.normal_(hl.bias, std=0.2)
    zl = quant.QuantLinear(32, 37, quant_mode=True, name="lin")
    zl.build()
    zl.kernel.assign(hl.weight.detach().numpy().T)
    zl.bias.assign(hl.bias.detach().numpy())
    s_in = torch.tensor([0.03])
    x = torch.randint(-128, 128, (2, 7, 32)).float() * s_in
    with torch.no_grad():
        ya, sa = hl(x, s_in)
    yb, sb = zl(tf.constant(x.numpy()), prev_act_scaling_factor=tf.constant(s_in.numpy()))
    np.testing.assert_array_equal(sb.numpy(), sa.numpy())
    np.testing.assert_array_equal(zl.weight_integer.numpy(), hl.weight_integer.numpy())
    np.testing.assert_array_equal(zl.bias_integer.numpy(), hl.bias_integer.numpy())
    np.testing.assert_array_equal(
        np.round(yb.numpy() / sb.numpy()), np.round(ya.double().numpy() / sa.double().numpy())
    )
    # IntGELU then an 8-bit QuantAct calibrated by transformers: identical 8-bit integers
    hg, zg = hf_quant.IntGELU(quant_mode=True), quant.IntGELU(quant_mode=True)
    with torch.no_grad():
        ga, gsa = hg(ya, sa)
    gb, gsb = zg(yb, scaling_factor=sb)
    np.testing.assert_array_equal(gsb.numpy(), gsa.numpy())
    ha = hf_quant.QuantAct(8, quant_mode=True)
    ha.train()
    with torch.no_grad():
        ha(ga, gsa)
    ha.eval()
    za = quant.QuantAct(8, quant_mode=True, name="act8")
    za.build()
    za.x_min.assign(ha.x_min.numpy())
    za.x_max.assign(ha.x_max.numpy())
    with torch.no_grad():
        oa, _ = ha(ga, gsa)
    ob, _ = za(gb, pre_act_scaling_factor=gsb)
    np.testing.assert_array_equal(ob.numpy(), oa.numpy())
    # IntSoftmax with a padding mask, its 16-bit range calibrated by transformers
    hs = hf_quant.IntSoftmax(8, quant_mode=True)
    s_sc = torch.tensor([2e-3])
    scores = torch.randint(-3000, 3000, (2, 4, 7, 7)).float() * s_sc
    scores[1, ..., 5:] += torch.finfo(torch.float32).min
    hs.train()
    with torch.no_grad():
        hs(scores, s_sc)
    hs.eval()
    zs = quant.IntSoftmax(8, quant_mode=True)
    zs.build()
    zs.act.x_min.assign(hs.act.x_min.numpy())
    zs.act.x_max.assign(hs.act.x_max.numpy())
    with torch.no_grad():
        pa, _ = hs(scores, s_sc)
    pb, _ = zs(tf.constant(scores.numpy()), scaling_factor=tf.constant(s_sc.numpy()))
    np.testing.assert_array_equal(pb.numpy(), pa.numpy())
    assert pb.numpy()[1, ..., 5:].max() == 0
    # IntLayerNorm in training mode (the dynamic shift), then transformers' 8-bit requantization
    hn = hf_quant.IntLayerNorm(32, 1e-5, output_bit=32, quant_mode=True)
    torch.nn.init.normal_(hn.weight, 1.0, 0.1)
    torch.nn.init.normal_(hn.bias, 0.0, 0.1)
    zn = quant.IntLayerNorm(32, 1e-5, output_bit=32, quant_mode=True)
    zn.build()
    zn.gamma.assign(hn.weight.detach().numpy())
    zn.beta.assign(hn.bias.detach().numpy())
    s22 = torch.tensor([3e-6])
    x22 = torch.randint(-(2**21), 2**21, (2, 7, 32)).float() * s22
    hn.train()
    with torch.no_grad():
        na, nsa = hn(x22, s22)
    nb, nsb = zn(tf.constant(x22.numpy()), scaling_factor=tf.constant(s22.numpy()), training=True)
    assert zn.shift.numpy()[0] == hn.shift.item() > 0
    np.testing.assert_array_equal(nsb.numpy(), nsa.detach().numpy())
    # transformers rounds y * factor (~2**35) in float32; ours is exact: relative 2**-24 apart
    assert_close(
        nb.numpy() / nsb.numpy() / 2**31, na.double().numpy() / nsa.double().detach().numpy() / 2**31, 2e-6, "ln"
    )
    # QuantEmbedding
    he = hf_quant.QuantEmbedding(99, 32, padding_idx=1, quant_mode=True)
    torch.nn.init.normal_(he.weight, std=0.2)
    ze = quant.QuantEmbedding(99, 32, padding_idx=1, quant_mode=True, name="emb")
    ze.build()
    ze.embeddings.assign(he.weight.detach().numpy())
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        ea, esa = he(ids)
    eb, esb = ze(tf.constant(ids.numpy()))
    np.testing.assert_array_equal(eb.numpy(), ea.numpy())
    np.testing.assert_array_equal(ze.weight_integer.numpy(), he.weight_integer.numpy())


# --- calibration and the quantization state ------------------------------------------------------


def test_calibration_updates_ranges_in_training_mode_only():
    torch.manual_seed(0)
    hf = transformers.IBertModel(transformers.IBertConfig(**QUANT))
    hf.eval()
    root = __import__("tempfile").mkdtemp()
    hf.save_pretrained(root)
    ours = ztf.TFIBertModel.from_pretrained(root)
    fix_scale_propagation(hf)
    act = ours.encoder.layer[0].pre_output_act
    assert act.x_min.numpy()[0] == np.float32(-1e-5) and act.x_max.numpy()[0] == np.float32(1e-5)
    ours(**inputs_for("Model"))  # inference: frozen
    assert act.x_max.numpy()[0] == np.float32(1e-5)
    for step in range(3):  # first batch: init + batch range; then EMA with momentum 0.95
        before = act.x_max.numpy().copy()
        inp = inputs_for("Model", seed=step)
        ours(**inp, training=True)
        hf.train()
        with torch.no_grad():
            hf(**_pt(inp))
        assert act.x_max.numpy()[0] != before[0]
    hf.eval()
    hf_state = {k.replace(".inner", ""): v for k, v in hf.state_dict().items()}
    for name, arr in ours.canonical_weights():
        if name.endswith(("x_min", "x_max")):
            # Ranges fed by a LayerNorm or GELU output see transformers' float32 rounding of those
            # wide integers (relative ~3e-5 at most); the embedding ranges are identical.
            rtol = 0.0 if "embeddings_act" in name else 1e-4
            np.testing.assert_allclose(arr, hf_state[name].numpy(), rtol=rtol, err_msg=name)
    assert ours.encoder.layer[0].attention.self_attention.softmax.act.x_max.numpy()[0] > 1e-5
    assert ours.embeddings.embeddings_act2.x_max.numpy()[0] == np.float32(1e-5)  # never applied
    # float mode calibrates too (transformers' QuantAct updates in training whatever the mode)
    fm = ztf.TFIBertModel(IBertConfig(**dict(QUANT, quant_mode=False)), seed=0)
    fm(**inputs_for("Model"), training=True)
    assert fm.encoder.layer[0].pre_output_act.x_max.numpy()[0] > 1e-3


def test_quant_state_round_trips_and_transformers_loads_it(tmp_path):
    ours = ztf.TFIBertForSequenceClassification(IBertConfig(**QUANT), seed=3)
    calibrate_tf(ours, "ForSequenceClassification")
    inp = inputs_for("ForSequenceClassification", seed=7)
    want = ours(**inp, output_hidden_states=True)
    ours.save_pretrained(tmp_path)
    again = ztf.TFIBertForSequenceClassification.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(ours.canonical_weights(), again.canonical_weights()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    got = again(**inp, output_hidden_states=True)
    for x, y in zip(want.hidden_states, got.hidden_states):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    np.testing.assert_array_equal(want.logits.numpy(), got.logits.numpy())
    hf, info = transformers.IBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sorted(hf.state_dict()) == sorted(name for name, _ in ours.canonical_weights())
    fix_scale_propagation(hf.eval())
    # our calibration left unsnapped q/k scales: transformers' float32 scores may flip a softmax step,
    # so the comparison here is the embeddings (exact) and the logits (close); bitwise in the tests above
    with torch.no_grad():
        ref = hf(**_pt(inp), output_hidden_states=True)
    np.testing.assert_array_equal(want.hidden_states[0].numpy(), ref.hidden_states[0].numpy())
    assert_close(want.logits, ref.logits.numpy(), 0.05, "ours -> transformers logits")
    q = again.ibert.encoder.layer[0].attention.self_attention.query.weight_integer.numpy()
    assert np.abs(q).max() >= 100 and np.array_equal(q, np.round(q))


# --- losses and training -------------------------------------------------------------------------


def _labels(head: str, rng: np.random.Generator, num_labels: int = 2, kind: str = "single") -> dict:
    B, L, C = 2, 7, 3
    if head == "ForMaskedLM":
        labels = rng.integers(0, 99, (B, L))
        labels[0, :2] = -100
        return {"labels": labels}
    if head == "ForTokenClassification":
        labels = rng.integers(0, num_labels, (B, L))
        labels[1, 4:] = -100
        return {"labels": labels}
    if head == "ForQuestionAnswering":
        return {"start_positions": np.array([1, 30]), "end_positions": np.array([5, 3])}
    if head == "ForMultipleChoice":
        return {"labels": rng.integers(0, C, (B,))}
    if kind == "regression":
        return {"labels": rng.standard_normal(B).astype(np.float32)}
    if kind == "multi":
        return {"labels": rng.integers(0, 2, (B, num_labels)).astype(np.float32)}
    return {"labels": rng.integers(0, num_labels, (B,))}


LOSS_CASES = [
    ("ForMaskedLM", {}, "single"),
    ("ForTokenClassification", {}, "single"),
    ("ForQuestionAnswering", {}, "single"),
    ("ForMultipleChoice", {}, "single"),
    ("ForSequenceClassification", {}, "single"),
    ("ForSequenceClassification", {"num_labels": 3}, "multi"),
    ("ForSequenceClassification", {"num_labels": 1}, "regression"),
]


@pytest.mark.parametrize("quant_mode", [False, True])
@pytest.mark.parametrize("head,overrides,kind", LOSS_CASES, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_losses_match_transformers(pairs, head, overrides, kind, quant_mode):
    hf, ours, _ = pairs.get(head, quant_mode=quant_mode, **overrides)
    labels = _labels(head, np.random.default_rng(11), overrides.get("num_labels", 2), kind)
    inp = inputs_for(head, seed=8)
    hf.config.problem_type = None  # transformers caches the inferred problem type
    with torch.no_grad():
        ref = hf(**_pt(inp), **_pt(labels))
    out = ours(**inp, **labels)
    assert out.loss is not None and out.loss.shape.rank == 0
    d = assert_close(out.loss, ref.loss.numpy(), TOLERANCES["loss"], f"{head} loss[{kind}]")
    _record(f"{head}.loss{'.q' if quant_mode else ''}", d)
    assert_close(ours(**inp, **labels, return_dict=False)[0], ref.loss.numpy(), TOLERANCES["loss"], "tuple loss")


def test_four_input_conventions_agree(pairs):
    _, model, _ = pairs.get("ForSequenceClassification", quant_mode=True)
    x = inputs_for("ForSequenceClassification", seed=7)
    ids, mask, types = x["input_ids"], x["attention_mask"], x["token_type_ids"]
    kw = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    for other in (
        model([ids, mask, types]).logits,
        model({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}).logits,
        model(tf.constant(ids), attention_mask=mask, token_type_ids=types).logits,
    ):
        assert_close(other, kw, 0.0, "convention")
    assert_close(model(tf.constant(ids)).logits, model(input_ids=ids).logits, 0.0, "single tensor")


def _dataset(n: int = 32) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 99, (n, 8)).astype(np.int32)
    labels = (ids[:, 1] % 2).astype(np.int32)  # learnable from the first real token
    return tf.data.Dataset.from_tensor_slices({"input_ids": ids, "labels": labels}).batch(8)


def test_compile_fit_lowers_the_loss_in_float_mode():
    keras.utils.set_random_seed(0)
    model = ztf.TFIBertForSequenceClassification(IBertConfig(**dict(TINY, hidden_dropout_prob=0.0)), seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    ds = _dataset()
    before = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    hist = model.fit(ds, epochs=6, shuffle=False, verbose=0).history["loss"]
    after = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    assert hist[-1] < hist[0] and after < before * 0.8, (before, hist, after)


def test_quant_mode_gradients_are_straight_through(pairs):
    _, ours, _ = pairs.get("ForTokenClassification", quant_mode=True)
    inp = inputs_for("ForTokenClassification", seed=10)
    labels = np.random.default_rng(1).integers(0, 2, (2, 7))
    with tf.GradientTape() as tape:
        loss = ours(**inp, labels=labels).loss
    q = ours.ibert.encoder.layer[0].attention.self_attention.query.kernel
    grad = tape.gradient(loss, q)
    assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0


def _one_step_gradients(ours, inp, labels) -> tuple[float, dict[str, np.ndarray]]:
    with tf.GradientTape() as tape:
        loss = ours(**inp, labels=labels).loss
    pairs = list(ours._matched())
    grads = tape.gradient(loss, [var for _, var in pairs])
    layout = LAYOUTS["keras"]
    out = {}
    for (p, _), g in zip(pairs, grads):
        if g is not None:
            out[p.name] = layout.from_stored(p, tf.convert_to_tensor(g).numpy())  # gathers give IndexedSlices
    return float(loss), out


def _compare_grads(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    top = max(float(np.abs(g).max()) for g in want.values())
    for n, g in want.items():
        _record(what, assert_close(got[n] / top, g / top, TOLERANCES["grad_rel"], f"{what} grad {n}"))


def test_one_step_gradients_match_transformers_in_float_mode(pairs):
    hf, ours, _ = pairs.get("ForTokenClassification")
    inp = inputs_for("ForTokenClassification", seed=10)
    labels = np.random.default_rng(1).integers(0, 2, (2, 7))
    hf.zero_grad()
    ref = hf(**_pt(inp), labels=torch.from_numpy(labels))
    ref.loss.backward()
    loss, got = _one_step_gradients(ours, inp, labels)
    assert_close(loss, ref.loss.detach().numpy(), TOLERANCES["loss"], "loss")
    _compare_grads(got, {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}, "grad.float")


def test_quant_mode_gradients_match_our_pytorch_backend(pairs):
    """Straight-through gradients of rounding, weight quantization and requantization (eval mode).

    The reference is nezha_zoo's PyTorch backend, not transformers: transformers' ``FixedPointMul``
    returns its residual gradient in the slot of ``identity_scaling_factor``, so the residual
    (``identity``) branch of every ``ln_input_act`` gets no gradient there (checked below); ours, like
    nezha_zoo.pt, passes ``grad / s_out`` to both branches.
    """
    import nezha_zoo.pt as zoo

    _, ours, path = pairs.get("ForTokenClassification", quant_mode=True)
    pt = zoo.IBertForTokenClassification.from_pretrained(path).eval()
    inp = inputs_for("ForTokenClassification", seed=10)
    labels = np.random.default_rng(1).integers(0, 2, (2, 7))
    ref = pt(**_pt(inp), labels=torch.from_numpy(labels))
    ref.loss.backward()
    loss, got = _one_step_gradients(ours, inp, labels)
    assert_close(loss, ref.loss.detach().numpy(), TOLERANCES["loss"], "loss")
    _compare_grads(got, {n: p.grad.numpy() for n, p in pt.named_parameters() if p.grad is not None}, "grad.quant")
    # transformers' residual-gradient slip, for the record
    act = hf_quant.QuantAct(8, quant_mode=True)
    act.x_min.fill_(-3.0)
    act.x_max.fill_(3.0)
    x = (torch.arange(-5.0, 5.0) * 0.01).requires_grad_()
    residual = (torch.arange(-5.0, 5.0) * 0.02).requires_grad_()
    y, _ = act(x, torch.tensor([0.01]), identity=residual, identity_scaling_factor=torch.tensor([0.02]))
    y.sum().backward()
    assert x.grad is not None and residual.grad is None


# --- configs, bad input, API ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value", [("hidden_act", "relu"), ("position_embedding_type", "relative_key"), ("force_dequant", "softmax2")]
)
def test_bad_configs_raise(field, value):
    with pytest.raises(ValueError, match=field):
        IBertConfig(**{**TINY, field: value})


def test_bad_inputs_raise(pairs):
    _, ours, _ = pairs.get("ForQuestionAnswering", quant_mode=True)
    inp = inputs_for("ForQuestionAnswering")
    with pytest.raises(InputError, match="input_ids"):
        ours(input_ids=inp["input_ids"] + 200)
    with pytest.raises(InputError, match="max_position_embeddings"):
        ours(input_ids=np.full((1, 63), 5))  # 62 positions fit: 64 - pad 1 - 1
    with pytest.raises(InputError, match="token_type_ids"):
        ours(input_ids=inp["input_ids"], token_type_ids=inp["token_type_ids"][:, :3])
    with pytest.raises(TypeError, match="IBertConfig"):
        ztf.TFIBertModel(transformers.IBertConfig(**TINY))
    with pytest.raises(ValueError, match="prev_act_scaling_factor"):
        ours.ibert.encoder.layer[0].attention.self_attention.query(tf.zeros((1, 2, 32)))
    with pytest.raises(NotImplementedError, match="resize_token_embeddings"):
        ours.resize_token_embeddings(120)
    assert ours(input_ids=np.full((1, 62), 5)).start_logits.shape == (1, 62)


def test_frozen_integer_weights_give_the_same_numbers(pairs):
    _, ours, _ = pairs.get("ForMaskedLM", quant_mode=True)
    inp = inputs_for("ForMaskedLM", seed=12)
    want = ours(**inp, output_hidden_states=True)
    ours.freeze_integer_weights()
    try:
        assert ours.ibert.encoder.layer[0].intermediate.dense.frozen
        got = tf.function(lambda x: ours(**x, output_hidden_states=True))(inp)
        for x, y in zip(want.hidden_states, got.hidden_states):
            np.testing.assert_array_equal(y.numpy(), x.numpy())
        np.testing.assert_array_equal(got.logits.numpy(), want.logits.numpy())
    finally:
        ours.freeze_integer_weights(False)
    assert not ours.ibert.embeddings.word_embeddings.frozen


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(calibrated WIDE quant model, its padded inputs, PyTorch's hidden states on them), built once."""
    import nezha_zoo.pt as zoo
    from nezha_zoo.testing import IBERT_WIDE as WIDE
    from nezha_zoo.testing import ibert_padded_inputs as padded_inputs

    def batch(seed: int) -> dict:
        return padded_inputs(2, 32, WIDE["vocab_size"], seed)

    ours = ztf.TFIBertModel(IBertConfig(**WIDE, quant_mode=True), seed=0)
    for s in range(2):  # calibration: every scale a random float32, no power of two
        ours(**batch(10 + s), training=True)
    path = tmp_path_factory.mktemp("ibert_wide")
    ours.save_pretrained(path)
    pt = zoo.IBertModel.from_pretrained(path).eval()
    inp = batch(0)
    with torch.no_grad():
        want = pt(**_pt(inp), output_hidden_states=True).hidden_states
    return ours, inp, want


@pytest.mark.pt
@pytest.mark.parametrize("frozen", [False, True])
def test_quant_graph_and_xla_equal_eager_and_pytorch_at_width(wide, frozen):
    # head size 48, calibrated scales no power of two: before quant.exact_div, Grappler and XLA turned
    # divisions by scales into reciprocal products and moved integers one step (19683 outputs here)
    ours, inp, want = wide
    ours.freeze_integer_weights(frozen)
    x = {k: tf.constant(v) for k, v in inp.items()}

    def forward(x):
        return ours(**x, output_hidden_states=True).hidden_states

    try:
        for name, fn in (
            ("eager", forward),
            ("graph", tf.function(forward)),
            ("xla", tf.function(forward, jit_compile=True)),
        ):
            got = fn(x)
            assert len(got) == len(want) == 2
            for i, (w, g) in enumerate(zip(want, got)):
                np.testing.assert_array_equal(g.numpy(), w.numpy(), err_msg=f"{name}: hidden_states[{i}]")
    finally:
        ours.freeze_integer_weights(False)
