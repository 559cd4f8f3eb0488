"""PyTorch I-BERT quant mode in integer dtypes (issue #23): inference computes the integer kernels'
elementwise maths in int8/int32/int64, bit for bit the float64 rules it replaces and transformers'
``quant_modules`` evaluated exactly.

Each kernel has two paths in :mod:`nezha_zoo.pt.quant`: a dequantized input ``x`` that carries its
exact integers (``_nz_int``, attached by the kernel that made it) takes the integer-dtype path in
inference; the same ``x`` without them (a copy) takes the float64 path.  The adversarial inputs below
sit on the rounding boundaries of each rule: ties of the round-half-even requantization, the clamp of
the GELU polynomial, odd products before ``floor(/ 2)``, negative values under ``floor`` (an
arithmetic right shift), mean ties in LayerNorm, the exponent boundaries ``k * x0`` of the softmax.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.ibert import quant_modules as hf_quant

import nezha_zoo.pt as zoo
from nezha_zoo import IBertConfig
from nezha_zoo.families.ibert import set_int8_products
from nezha_zoo.pt import quant
from nezha_zoo.testing import IBERT_SMOKE as SMOKE
from nezha_zoo.testing import IBERT_WIDE, ibert_layer_norm_rows, pin_precision

pytestmark = [pytest.mark.pt, pytest.mark.hf]


@pytest.fixture(scope="module", autouse=True)
def _precision():
    pin_precision("pt")


def _carrying(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` carrying the integer-dtype ``q``, as a kernel output does in inference."""
    return quant._attach(q.to(scale.dtype) * scale, q, scale)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # no attached integers: the float64 path


def _both(module, x: torch.Tensor, scale: torch.Tensor):
    """(integer-dtype path, float64 path) outputs of ``module`` on the same dequantized input."""
    with torch.no_grad():
        y_int, s_int = module(x, scale)
        y_f64, s_f64 = module(_plain(x), scale)
    assert torch.equal(s_int, s_f64)
    return y_int, y_f64, s_int


def _hf_exact(module, x: torch.Tensor, scale: torch.Tensor):
    """transformers' kernel evaluated on the exact integers in float64 (its float32 rounds them)."""
    s = scale.double()
    with torch.no_grad():
        return module(torch.round(x.double() / s) * s, scale)


def test_requantization_ties_and_wide_inputs():
    # ratio 2**-3 exactly: every odd multiple of 4 is a tie of round-half-even; wide |q| up to 2**31
    # (the float64 product rounds there, by definition) and per-channel scales
    q = torch.cat([torch.arange(-64, 65, dtype=torch.int32), torch.tensor([2**31 - 1, -(2**31) + 1, 2**22 + 3])])
    q = q.reshape(1, -1).expand(3, -1).contiguous()
    for s_in, s_out in ((torch.tensor([2.0**-3]), torch.tensor([1.0])), (torch.tensor([3e-5]), torch.tensor([0.011]))):
        for bits in (8, 16, 22):
            want = quant.fixed_point_requantize(q.double(), s_in, bits, s_out)
            got = quant.requantize_int(q, s_in, bits, s_out)
            assert not got.is_floating_point() and torch.equal(got.double(), want)
    ident = torch.randint(-(2**21), 2**21, q.shape, dtype=torch.int32)
    s_in, s_id, s_out = torch.tensor([2e-5]), torch.tensor([7e-6]), torch.tensor([4e-3])
    want = quant.fixed_point_requantize(q.double(), s_in, 8, s_out, ident.double(), s_id)
    got = quant.requantize_int(q, s_in, 8, s_out, ident, s_id)
    assert got.dtype == torch.int8 and torch.equal(got.double(), want)


def test_quant_act_integer_path_matches_transformers():
    torch.manual_seed(0)
    s_in = torch.tensor([1e-4])
    q = torch.randint(-(2**20), 2**20, (4, 9, 16), dtype=torch.int32)
    q[0, 0, :8] = torch.tensor([0, 1, -1, 2**20 - 1, -(2**20), 127, -128, 64])
    x = _carrying(q, s_in)
    ha, za = hf_quant.QuantAct(8, quant_mode=True), quant.QuantAct(8, quant_mode=True)
    ha.train()
    with torch.no_grad():
        ha(x.float(), s_in)
    ha.eval()
    za.load_state_dict(ha.state_dict())
    za.eval()
    y_int, y_f64, s = _both(za, x, s_in)
    assert y_int._nz_int[0].dtype == torch.int8
    assert torch.equal(y_int, y_f64)
    with torch.no_grad():
        assert torch.equal(ha(x.float(), s_in)[0], y_int)  # 20-bit inputs: transformers' float32 is exact


@pytest.mark.parametrize("s_val", [3e-4, 2.0**-9, 0.05])
def test_int_gelu_boundaries(s_val):
    s = torch.full((24,), s_val) * torch.linspace(0.5, 2.0, 24)  # per channel, as after a QuantLinear
    zg, hg = quant.IntGELU(quant_mode=True), hf_quant.IntGELU(quant_mode=True)
    b_int = torch.floor(-1.769 / (s / 1.4142)).to(torch.int64)  # the polynomial's clamp, per channel
    rows = [b_int, b_int + 1, b_int - 1, -b_int, -b_int + 1, -b_int - 1, torch.zeros_like(b_int)]
    rows += [torch.full_like(b_int, v) for v in (1, -1, 2**20, -(2**20), 2**24, -(2**24))]
    q = torch.stack(rows).to(torch.int32)  # (13, 24)
    y_int, y_f64, s_out = _both(zg, _carrying(q, s), s)
    assert y_int._nz_int[0].dtype == torch.int64
    assert torch.equal(y_int, y_f64)
    assert torch.equal(_hf_exact(hg, q.double() * s.double(), s)[0], y_f64)


@pytest.mark.parametrize("shift", [0, 3])
def test_int_layer_norm_boundaries(shift):
    torch.manual_seed(shift)
    n = 24
    zn = quant.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    with torch.no_grad():
        zn.weight.normal_(1.0, 0.2)
        zn.bias.normal_(0.0, 0.3)
        zn.shift.fill_(shift)
    zn.eval()
    hn = hf_quant.IntLayerNorm(n, 1e-5, output_bit=32, quant_mode=True)
    hn.load_state_dict(zn.state_dict())
    hn.eval()
    s = torch.tensor([3e-6])
    q = torch.from_numpy(ibert_layer_norm_rows(n, 6, seed=shift))  # (1, 6, n): the rule's edges
    y_int, y_f64, _ = _both(zn, _carrying(q, s), s)
    assert y_int._nz_int[0].dtype == torch.int64
    assert torch.equal(y_int, y_f64)
    with torch.no_grad():
        assert torch.equal(_hf_exact(hn, q.double() * s.double(), s)[0], y_f64)


def test_int_softmax_boundaries_and_masks():
    s = torch.tensor([2.0**-7])  # x0 = floor(-0.6931 / s) = -89: scores at multiples of x0 are exponent boundaries
    x0 = -89
    L = 64
    base = torch.arange(0, -L, -1, dtype=torch.int64) * 7
    rows = [base, torch.arange(L) * x0, torch.arange(L) * x0 + 1, torch.arange(L) * x0 - 1, base * 0]
    rows.append(torch.full((L,), 30 * x0).index_fill_(0, torch.tensor([0]), 0))  # at the exponent clamp
    q = torch.stack(rows)[None].expand(2, -1, -1).contiguous()  # (2, 6, L)
    zs, hs = quant.IntSoftmax(8, quant_mode=True), quant.IntSoftmax(8, quant_mode=True)
    hf = hf_quant.IntSoftmax(8, quant_mode=True)
    hf.train()
    with torch.no_grad():
        hf(q.double() * s.double(), s)
    hf.eval()
    for m in (zs, hs):
        m.load_state_dict(hf.state_dict())
        m.eval()
    mask = torch.zeros(2, 1, L)
    mask[1, :, L // 2 :] = torch.finfo(torch.float32).min
    with torch.no_grad():
        scores = zs.mask_scores_int(q.to(torch.int32), mask, s)
        assert scores is not None and scores.dtype == torch.int32
        p_int, _ = zs.forward_int(scores, s)
        p_f64, _ = hs.forward_int(q.double() + mask.double() / s.double(), s)
        # transformers' int_exp and 16-bit act on the exact integers; its normalisation, whose
        # ``exp / s`` it leaves unrounded (float noise), on the rounded 16-bit integers
        x = q.double() + mask.double() / s.double()
        e, s_e = hf.int_exp(x - x.max(dim=-1, keepdim=True).values, s)
        e16, s16 = hf.act(e, s_e)
        e16 = torch.round(e16.double() / s16.double())
        p_hf = torch.floor(e16 * torch.floor(2**32 / e16.sum(dim=-1, keepdim=True)) / 2**24)
    assert torch.equal(p_int, p_f64) and torch.equal(p_hf.float(), p_f64)
    assert p_int[1, :, L // 2 :].max() == 0
    # a row with no visible key, or a mask that is neither 0 nor very negative: the float64 rule
    full = mask.clone()
    full[1] = torch.finfo(torch.float32).min
    assert zs.mask_scores_int(q.to(torch.int32), full, s) is None
    assert zs.mask_scores_int(q.to(torch.int32), mask * 1e-35, s) is None  # -3.4e3: a score offset


class _Float64Ops(TorchDispatchMode):
    """Names of the ops with a float64 output of at least ``min_numel`` elements."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel, self.names = min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() >= self.min_numel:
                self.names.append((func.__name__.split(".")[0], tuple(t.shape)))
        return out


#: float64 ops an inference forward still runs on activation-sized tensors: the dyadic rescaling of a
#: requantization (an IEEE float64 product, rounded: its definition) and the dequantized outputs of the
#: linear, GELU and LayerNorm kernels (float64 values by their API).
FLOAT64_OPS = {"to", "_to_copy", "mul_", "round_", "add_", "clamp_", "dropout"}


def test_quant_forward_computes_in_integer_dtypes():
    torch.manual_seed(0)
    model = zoo.IBertModel(IBertConfig(**SMOKE, initializer_range=0.2, quant_mode=True))
    ids = torch.randint(3, 99, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    model.train()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # calibrate
    model.eval()
    dtypes: dict[str, torch.dtype] = {}

    def hook(module, args, out):
        x, s = out
        if s is not None and getattr(x, "_nz_int", None) is not None:
            dtypes[module.__class__.__name__] = x._nz_int[0].dtype

    for m in model.modules():
        if isinstance(m, (quant.QuantLinear, quant.QuantAct, quant.IntGELU, quant.IntLayerNorm)):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        spy = _Float64Ops(min_numel=ids.numel() * SMOKE["hidden_size"])  # activation-sized (B, L, H) and larger
        with spy:
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want)
    assert set(dtypes) == {"QuantLinear", "QuantAct", "IntGELU", "IntLayerNorm"}
    assert all(not torch.empty(0, dtype=d).is_floating_point() for d in dtypes.values()), dtypes
    # no float64 polynomial, floor, division, sign, max or subtraction: those run in integers now
    names = {name for name, _ in spy.names}
    assert names and names <= FLOAT64_OPS, sorted({n for n in spy.names if n[0] not in FLOAT64_OPS})


# --- the layer on integers end to end ----------------------------------------------------------
# In eval inference an I-BERT layer chains its kernels' ``_forward_int`` (no dequantized tensor
# between them) and runs its feed-forward part over row blocks (``INT_BLOCK_BYTES``); a hook on any
# sublayer sends it through the modules' ``forward`` instead, which is the reference here.


def _calibrated(seed: int = 0, **overrides) -> zoo.IBertModel:
    torch.manual_seed(seed)
    model = zoo.IBertModel(IBertConfig(**{**SMOKE, "initializer_range": 0.2, **overrides}, quant_mode=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)  # nonzero biases: the bias integers take part
    model.train()
    with torch.no_grad():
        for s in range(2):
            g = torch.Generator().manual_seed(100 + s)
            model(input_ids=torch.randint(3, 99, (3, 16), generator=g))
    return model.eval()


def _padded_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 99, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _module_path(model: torch.nn.Module):
    """A no-op hook on a sublayer of the embeddings and of every layer: they run module by module."""
    blocks = [model.embeddings.LayerNorm, *(layer.output for layer in model.encoder.layer)]
    return [block.register_forward_hook(lambda *a: None) for block in blocks]


def _outputs(model, inputs, grad: bool = False):
    context = torch.enable_grad() if grad else torch.inference_mode()
    with context:
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    return [out.last_hidden_state, out.pooler_output, *out.hidden_states, *out.attentions]


# 3 sequences of 13 tokens (one intra-op thread); one sequence's widest temporaries take
# 8 * 13 * max(32, 4 * 13) = 5408 bytes, a feed-forward row 8 * 37: one block; one sequence a group,
# feed-forward blocks of 5, 5, 3 rows; groups of 2 and 1 sequences
BLOCK_BYTES = [None, 5 * 8 * 37, 2 * 5408]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # INT_BLOCK_BYTES is a budget per intra-op thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[True, False], ids=["int8_products", "float_products"])
def products(request):
    """Both product paths of ``QuantLinear``, whatever this CPU has."""
    previous = set_int8_products(request.param)
    yield request.param
    set_int8_products(previous)


@pytest.mark.parametrize("block_bytes", BLOCK_BYTES)
def test_layer_on_integers_matches_the_modules(monkeypatch, one_thread, products, block_bytes):
    from nezha_zoo.pt import ibert

    if block_bytes is not None:
        monkeypatch.setattr(ibert, "INT_BLOCK_BYTES", block_bytes)
    _assert_paths_agree(monkeypatch, _calibrated(), _padded_inputs())


def test_layer_on_integers_matches_the_modules_wide(monkeypatch, products):
    # width 384, intermediate 1536: output.dense sums 1536 terms, past the float32 fused product's
    # exact range, so the float products take the chunked path (int64 accumulators)
    wide = {k: IBERT_WIDE[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size")}
    _assert_paths_agree(monkeypatch, _calibrated(num_hidden_layers=1, **wide), _padded_inputs())


def _assert_paths_agree(monkeypatch, model, inputs):
    """The integer path runs (no kernel's forward) and equals the module path bit for bit."""
    from nezha_zoo.pt import ibert

    _outputs(model, inputs)  # the softmax builds its exponential table (with its QuantAct) once
    calls = {"int": 0, "module": 0}

    def counting(cls, name, key, returned=False):
        original = getattr(cls, name)

        def counted(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls[key] += out is not None if returned else 1
            return out

        monkeypatch.setattr(cls, name, counted)

    counting(ibert.IBertLayer, "_forward_int", "int", returned=True)
    counting(ibert.IBertEmbeddings, "_forward_int", "int", returned=True)
    for kernel in (quant.QuantLinear, quant.QuantEmbedding, quant.QuantAct, quant.IntLayerNorm):
        counting(kernel, "forward", "module")
    fast = _outputs(model, inputs)
    layers = model.config.num_hidden_layers
    assert calls == {"int": 1 + layers, "module": 0}  # no kernel's forward ran
    # the reference: module by module, each kernel recovering its input integers and taking its
    # float64 rule (no integer dtypes handed over)
    handles = _module_path(model)
    monkeypatch.setattr(quant, "integer_of", lambda x, scale: None)
    reference = _outputs(model, inputs)
    monkeypatch.undo()
    for h in handles:
        h.remove()
    assert calls["int"] == 1 + layers and calls["module"] > 0
    assert len(fast) == len(reference)
    for got, want in zip(fast, reference):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # the layer output still carries its int8 integers for the next layer
    hidden = fast[2 + layers]
    assert quant.integer_of(hidden, hidden._nz_int[1]).dtype == torch.int8


def test_layer_on_integers_hands_over_to_the_modules():
    model = _calibrated()
    inputs = _padded_inputs()
    reference = _outputs(model, inputs)
    # a hook sees its sublayer's call, as in transformers
    seen = []
    handle = model.encoder.layer[0].intermediate.register_forward_hook(lambda m, a, out: seen.append(out[0].shape))
    hooked = _outputs(model, inputs)
    handle.remove()
    assert seen == [(3, 13, SMOKE["intermediate_size"])]
    # a head mask, and autograd in eval mode, take the modules too
    head_mask = torch.ones(SMOKE["num_hidden_layers"], SMOKE["num_attention_heads"])
    with torch.inference_mode():
        masked = model(**inputs, head_mask=head_mask).last_hidden_state
    with_grad = _outputs(model, inputs, grad=True)
    for got, want in zip(hooked, reference):
        assert torch.equal(got, want)
    assert torch.equal(masked, reference[0])
    for got, want in zip(with_grad, reference):
        assert torch.equal(got.detach().to(want.dtype), want)


@pytest.mark.parametrize("force_dequant", ["gelu", "layernorm", "softmax", "nonlinear"])
def test_layer_on_integers_respects_force_dequant(force_dequant):
    model = _calibrated(force_dequant=force_dequant)
    inputs = _padded_inputs()
    fast = _outputs(model, inputs)
    handles = _module_path(model)
    reference = _outputs(model, inputs)
    for h in handles:
        h.remove()
    for got, want in zip(fast, reference):
        assert torch.equal(got, want)


def test_eval_constants_follow_weights_and_ranges():
    """The constants kept between eval calls (scales, multipliers, bias integers) are recomputed when a
    weight, a calibrated range or a buffer changes: the model then equals a fresh one with that state."""
    model = _calibrated()
    inputs = _padded_inputs()
    _outputs(model, inputs)  # fills every kernel's constants

    def fresh_copy():
        twin = zoo.IBertModel(IBertConfig(**{**SMOKE, "initializer_range": 0.2}, quant_mode=True))
        twin.load_state_dict(model.state_dict())
        return twin.eval()

    layer = model.encoder.layer[0]
    with torch.no_grad():
        layer.intermediate.dense.weight.mul_(1.5)  # in place: the weight's version moves
        layer.intermediate.dense.bias.add_(0.25)
        layer.output.LayerNorm.bias.add_(0.5)
        layer.attention.self.value_activation.x_max.mul_(2.0)  # a frozen range edited by hand
    got = _outputs(model, inputs)
    for a, b in zip(got, _outputs(fresh_copy(), inputs)):
        assert torch.equal(a, b)
    # new state loaded in place (load_state_dict copies into the same tensors)
    model.load_state_dict(_calibrated(seed=3).state_dict())
    got = _outputs(model, inputs)
    for a, b in zip(got, _outputs(fresh_copy(), inputs)):
        assert torch.equal(a, b)
    # recalibration: a training-mode forward moves the ranges; eval outputs follow
    model.train()
    with torch.no_grad():
        model(**inputs)
    model.eval()
    got = _outputs(model, inputs)
    for a, b in zip(got, _outputs(fresh_copy(), inputs)):
        assert torch.equal(a, b)


def test_eval_constants_made_under_inference_mode_serve_autograd():
    """Constants first made under ``torch.inference_mode`` are ordinary tensors: a later eval forward
    with autograd (quantization-aware fine-tuning in eval mode, input attributions) can save them."""
    model = _calibrated()
    inputs = _padded_inputs()
    _outputs(model, inputs)
    out = model(**inputs).last_hidden_state
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)


def test_eval_constants_cache():
    cache = quant.EvalConstants()
    a, b = torch.ones(1), torch.ones(1)
    made = []

    def make(tag):
        return lambda: made.append(tag) or tag

    assert cache.get((a, None), make("a")) == "a"
    assert cache.get((a, None), make("again")) == "a"  # the same tensors: kept
    assert cache.get((b, None), make("b")) == "b"  # equal values, another tensor: recomputed
    a.add_(0)  # modified in place (its version moves)
    assert cache.get((a, None), make("a2")) == "a2"
    a.data = torch.zeros(3)  # storage replaced
    assert cache.get((a, None), make("a3")) == "a3"
    assert made == ["a", "b", "a2", "a3"]
    for i in range(quant.EvalConstants.SIZE):  # the oldest entries make room
        cache.get((torch.ones(1),), make(i))
    assert cache.get((b, None), make("b2")) == "b2"
    with torch.inference_mode():
        value = cache.get((a,), lambda: torch.ones(2) * 2)
    assert not value.is_inference()  # usable by a later forward with autograd
    assert copy.deepcopy(cache).entries == () and pickle.loads(pickle.dumps(cache)).entries == ()
