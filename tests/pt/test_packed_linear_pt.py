"""PackedLinear (issue #23): opt-in oneDNN-packed weights for inference products, re-packed when the weight changes
(version counter, replacement, or writes through ``.data`` seen by the fingerprint); training products on oneDNN by
default where that is faster (AVX-512), with the switch's ``False`` / ``NEZHA_ZOO_PACKED_LINEAR=0`` keeping F.linear."""

from __future__ import annotations

import contextlib
import copy
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nezha_zoo.packing as shared_switch
import nezha_zoo.pt as zoo
from nezha_zoo.hardware import cpu_features
from nezha_zoo.pt import layers
from nezha_zoo.pt.heads import VocabProjection
from nezha_zoo.pt.layers import PackedLinear, _packing_available, packed_linear, set_packed_linear
from nezha_zoo.pt.quant import QuantLinear
from nezha_zoo.spec.registry import get_family, model_class
from nezha_zoo.testing import IBERT_SMOKE, TOLERANCES, assert_close, pin_precision, tiny_inputs

pytestmark = [pytest.mark.pt]

pin_precision("pt")


def _layer() -> PackedLinear:
    torch.manual_seed(0)
    return PackedLinear(48, 40).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1))


needs_packing = pytest.mark.skipif(not _packing_available(), reason="this PyTorch build has no oneDNN")


@pytest.fixture
def packing():
    """Packing on for one test (it is off by default), restored afterwards."""
    with packed_linear():
        yield


def test_switch_is_the_shared_process_wide_one():
    """``nezha_zoo.pt``'s switch is :mod:`nezha_zoo.packing`'s (tested in tests/core), and PackedLinear reads it."""
    assert zoo.set_packed_linear is set_packed_linear is shared_switch.set_packed_linear
    assert zoo.packed_linear is packed_linear is shared_switch.packed_linear
    assert layers.PACKED_LINEAR_ENV == shared_switch.PACKED_LINEAR_ENV
    before = shared_switch.packed_linear_enabled()
    with packed_linear():
        assert shared_switch.packed_linear_enabled() is True
    assert shared_switch.packed_linear_enabled() is before


@needs_packing
def test_inference_path_packs_and_matches_f_linear(packing):
    layer, x = _layer(), _x()
    with torch.inference_mode():
        got = layer(x)
    assert layer._packed is not None, "the inference call did not take the packed path"
    assert got.shape == (2, 5, 40)
    assert_close(got, F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "packed vs F.linear")
    no_bias = PackedLinear(48, 40, bias=False).eval()
    with torch.no_grad():
        assert_close(no_bias(x), F.linear(x, no_bias.weight), TOLERANCES["hidden"], "packed, no bias")


@needs_packing
def test_weight_changes_repack(packing):
    layer, x = _layer(), _x()
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-3.0)  # in place: the version counter moves
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after in-place")
        layer.load_state_dict({"weight": torch.randn(40, 48), "bias": torch.randn(40)})
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after load")
        layer.weight = torch.nn.Parameter(torch.randn(40, 48))  # replaced
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after replace")
        layer.drop_packed_weight()
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after drop")


@needs_packing
@pytest.mark.parametrize(
    "write",
    [
        lambda w: w.data.mul_(0.9).add_(0.1),  # an EMA update
        lambda w: w.data.normal_(0.0, 0.02),  # transformers-style _init_weights
        lambda w: w.data.copy_(torch.randn(w.shape)),
        lambda w: w.data.view(-1)[:1].add_(1.0),  # the first element alone: sampled
    ],
    ids=["mul_add", "normal", "copy", "first_element"],
)
def test_writes_through_data_are_caught(packing, write):
    # .data writes leave the version counter alone; the fingerprint sees them and the layer re-packs
    layer, x = _layer(), _x()
    with torch.no_grad():
        layer(x)
        version, packed = layer.weight._version, layer._packed[-1]
        write(layer.weight)
        assert layer.weight._version == version, "this write should bypass the version counter"
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after .data write")
    assert layer._packed[-1] is not packed


def test_the_fingerprint_spans_rows_and_columns():
    weight = torch.arange(768 * 768, dtype=torch.float32).view(768, 768)
    sample = layers._fingerprint_view(weight)  # int32 bits of the sampled elements, a view
    assert sample.numel() == layers.FINGERPRINT_SIZE and sample.dtype == torch.int32
    index = sample.view(torch.float32).flatten().long()  # the flat positions they were taken from
    assert index[0] == 0 and index.unique().numel() == layers.FINGERPRINT_SIZE and index.max() < 768 * 768
    rows, cols = (index // 768).unique().numel(), (index % 768)[:: layers.FINGERPRINT_RUN].unique().numel()
    runs = layers.FINGERPRINT_SIZE // layers.FINGERPRINT_RUN
    assert rows >= runs and cols == runs  # every run in its own row(s), starting at its own column
    # the same elements TF's Dense compares (one sample rule, nezha_zoo.packing)
    assert index.tolist() == shared_switch.fingerprint_indices((768, 768)).tolist()
    small = torch.arange(10, dtype=torch.float32).view(2, 5)
    assert layers._fingerprint_view(small).view(torch.float32).flatten().tolist() == list(range(10))  # all of it


def test_switch_off_and_default_inference_use_f_linear_exactly():
    layer, x = _layer(), _x()
    layer.train()
    with packed_linear(False):
        out = layer(x)  # gradients on, switch off: plain F.linear, bit for bit
    assert type(out.grad_fn).__name__ != "_OneDNNLinearBackward"
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert layer.weight.grad is not None and layer._packed is None
    layer.eval()
    with torch.no_grad(), packed_linear(None):  # no packed copy by default: the plain-weight inference product
        assert torch.equal(layer(x), layers.linear(x, layer.weight, layer.bias))
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "default inference")
    assert layer._packed is None
    previous = set_packed_linear(True)
    try:
        assert set_packed_linear(False) is True
        with torch.no_grad():  # switch off: F.linear itself, no row route and no packed copy
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is None
    finally:
        set_packed_linear(previous)


@needs_packing
def test_copies_drop_the_packed_weight_and_train_frees_it(packing):
    layer, x = _layer(), _x()
    with torch.no_grad():
        want = layer(x)
    assert layer._packed is not None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._packed is None
        with torch.no_grad():
            assert_close(clone(x), want, TOLERANCES["hidden"], "copy")
    layer.train()
    assert layer._packed is None


#: Tiny configs of the families whose blocks use PackedLinear (the BERT blocks, MPT).
FAMILY_CONFIGS = {
    "electra": dict(vocab_size=99, embedding_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=64),
    "nezha": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, max_relative_position=8),
    "mpt": dict(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64),
}  # fmt: skip


def _tiny_model(family: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The seeded base model of ``family`` at its tiny config and its inputs (tensors by argument name)."""
    fam = get_family(family)
    torch.manual_seed(0)
    model = model_class(fam, "Model", "pt")(fam.config_class(**FAMILY_CONFIGS[family]))
    inp = tiny_inputs(vocab_size=99, type_vocab_size=None, seed=3)
    return model, {k: torch.from_numpy(v) for k, v in inp.items()}


@needs_packing
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_models_give_the_same_outputs_packed_and_after_an_ema_update(family):
    model, inp = _tiny_model(family)
    model.eval()
    for step in range(2):
        with torch.no_grad():
            want = model(**inp)[0]
            with packed_linear():
                got = model(**inp)[0]
        packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
        assert packed and all(m._packed is not None for m in packed), "not every block product took the packed path"
        assert_close(got, want, TOLERANCES["hidden"], f"{family} packed, step {step}")
        with torch.no_grad():  # an EMA step through .data: invisible to the version counter
            for p in model.parameters():
                p.data.mul_(0.5).add_(0.5 * torch.randn_like(p))


@needs_packing
def test_training_path_runs_all_three_products_on_onednn(packing):
    """Forward, ``g W`` and ``g^T x`` run on oneDNN and match float64 ``F.linear`` to float32 rounding."""
    layer, x = _layer(), _x().requires_grad_()
    layer.train()
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward", "the training call did not take the oneDNN path"
    want = F.linear(x, layer.weight, layer.bias)
    assert_close(out, want, TOLERANCES["hidden"], "oneDNN training forward vs F.linear")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
    calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert calls == 2, f"the backward ran {calls} oneDNN products, not g W and g^T x"
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
    ref = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), g.double())
    for name, a, b in zip(("input", "weight", "bias"), got, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert_close(a, b, TOLERANCES["hidden"], f"the {name} gradient vs float64 F.linear")
    gx = torch.autograd.grad((layer(x) * g).sum(), x, create_graph=True)[0]  # a double backward still works
    (gx**2).sum().backward()
    gx_ref = torch.autograd.grad((F.linear(x, layer.weight, layer.bias) * g).sum(), x, create_graph=True)[0]
    w_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    (gx_ref**2).sum().backward()
    assert torch.equal(w_grad, layer.weight.grad), "double backward differs from F.linear's"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps F.linear's casts
        assert layer(x).dtype == torch.bfloat16
    no_bias = PackedLinear(48, 40, bias=False).train()
    assert_close(no_bias(x), F.linear(x, no_bias.weight), TOLERANCES["hidden"], "oneDNN training forward, no bias")


def test_default_training_products_are_onednn_where_faster(monkeypatch):
    """Unset, the switch puts training products on oneDNN on AVX-512 CPUs, unless oneDNN is capped below AVX-512
    (where they were slower than F.linear's); ``True`` / ``False`` override the machine's default."""
    avx512 = cpu_features().avx512f
    monkeypatch.setitem(layers._PACKING, "onednn_avx512", None)  # restored after the test
    for cap, want in ((None, avx512), ("AVX2", False), ("avx2_vnni", False), ("AVX512_CORE", avx512), ("ALL", avx512)):
        for name in layers._ONEDNN_ISA_ENV:
            monkeypatch.delenv(name, raising=False)
        if cap is not None:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        layers._PACKING["onednn_avx512"] = None  # probed again
        assert layers._onednn_avx512() is want, cap
        with packed_linear(None):
            assert layers.onednn_training() is want
        with packed_linear(True):
            assert layers.onednn_training() is True
        with packed_linear(False):
            assert layers.onednn_training() is False


def test_environment_zero_keeps_f_linear_in_training(monkeypatch):
    """``NEZHA_ZOO_PACKED_LINEAR=0`` (read at import: re-read here) gives plain F.linear training products."""
    layer, x = _layer(), _x()
    layer.train()
    monkeypatch.setenv(shared_switch.PACKED_LINEAR_ENV, "0")
    monkeypatch.setitem(shared_switch._STATE, "enabled", shared_switch._from_env())
    assert shared_switch.packed_linear_setting() is False and layers.onednn_training() is False
    out = layer(x)
    assert type(out.grad_fn).__name__ != "_OneDNNLinearBackward"
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


def _train_step(model, inp, setting, products=(PackedLinear,)):
    """Output, loss, gradients by name and the backward node of every ``products`` call of one training step run
    with the switch at ``setting`` (dropout masks seeded alike)."""
    nodes = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, out: nodes.append(type((out[0] if isinstance(out, tuple) else out).grad_fn))
        )
        for m in model.modules()
        if isinstance(m, products)
    ]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    try:
        with packed_linear(setting):
            out = model(**inp)[0]
    finally:
        for h in hooks:
            h.remove()
    loss = out.pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), loss.detach(), grads, nodes


def _assert_same_step(label, got, want):
    """(output, loss, gradients by name) of two training steps agree: output and loss to float32 rounding, every
    gradient relative to its largest element."""
    assert_close(got[1], want[1], TOLERANCES["hidden"], f"{label} training loss, oneDNN products")
    assert_close(got[0], want[0], TOLERANCES["hidden"], f"{label} training output, oneDNN products")
    assert got[2].keys() == want[2].keys() and want[2]
    for name, grad in want[2].items():
        scale = max(float(grad.abs().max()), 1e-12)
        assert_close(got[2][name] / scale, grad / scale, TOLERANCES["grad_rel"], f"{label} gradient of {name}")


@needs_packing
@pytest.mark.parametrize("setting", [True, None], ids=["switch-on", "default"])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_models_train_the_same_with_onednn_products(family, setting):
    """One training step's loss and gradients with oneDNN products (switch on, and the default on a machine where
    it picks them) match the switch off's F.linear (same dropout masks)."""
    model, inp = _tiny_model(family)
    model.train()
    want, want_loss, want_grads, plain_nodes = _train_step(model, inp, False)
    got, got_loss, got_grads, nodes = _train_step(model, inp, setting)
    onednn = setting or layers._onednn_avx512()
    assert plain_nodes and not any(n.__name__ == "_OneDNNLinearBackward" for n in plain_nodes)
    assert nodes and all((n.__name__ == "_OneDNNLinearBackward") is onednn for n in nodes), nodes
    _assert_same_step(family, (got, got_loss, got_grads), (want, want_loss, want_grads))


#: Large products outside the blocks that take the same training path (``layers.linear``): the LM heads'
#: ``VocabProjection`` and transform ``dense``, Electra's discriminator ``dense``, I-BERT's float-mode QuantLinear.
OTHER_PRODUCTS = {
    "electra-ForMaskedLM": ("electra", "ForMaskedLM", (VocabProjection,)),
    "electra-ForPreTraining": ("electra", "ForPreTraining", (PackedLinear,)),
    "ibert-ForMaskedLM": ("ibert", "ForMaskedLM", (QuantLinear, VocabProjection)),
}


@needs_packing
@pytest.mark.parametrize("case", sorted(OTHER_PRODUCTS))
def test_heads_and_ibert_float_products_train_on_the_same_path(case):
    family, head, products = OTHER_PRODUCTS[case]
    fields = IBERT_SMOKE if family == "ibert" else FAMILY_CONFIGS[family]
    torch.manual_seed(0)
    model = model_class(get_family(family), head, "pt")(get_family(family).config_class(**fields)).train()
    inp = {k: torch.from_numpy(v) for k, v in tiny_inputs(vocab_size=99, type_vocab_size=None, seed=3).items()}
    want, want_loss, want_grads, plain_nodes = _train_step(model, inp, False, products)
    got, got_loss, got_grads, nodes = _train_step(model, inp, True, products)
    assert plain_nodes and not any(n.__name__ == "_OneDNNLinearBackward" for n in plain_nodes)
    assert nodes and all(n.__name__ == "_OneDNNLinearBackward" for n in nodes), nodes
    _assert_same_step(case, (got, got_loss, got_grads), (want, want_loss, want_grads))


# --- linear without autograd: the default inference product by row count, on the plain weight (no copy) ---


def _route_taken(fn, weight_shape: tuple[int, int] | None = None) -> str | None:
    """Which of ``linear_route``'s products ``fn()`` ran, read from the ops it dispatched (its profile); a oneDNN
    product whose first operand has ``weight_shape`` (out, in) is ``W x^T``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = prof.key_averages(group_by_input_shape=True)
    ops = {e.key for e in events}
    if "mkldnn::_linear_pointwise" in ops:
        firsts = [list(e.input_shapes[0]) for e in events if e.key == "mkldnn::_linear_pointwise"]
        return "onednn_wx" if weight_shape and all(f == list(weight_shape) for f in firsts) else "onednn"
    if "aten::linear" in ops:
        return "linear"
    if ops & {"aten::mm", "aten::addmm"}:
        return "wx"  # a bare product: W x^T
    return None


@pytest.fixture(params=[True, False], ids=["avx512", "avx2"])
def onednn_isa(request, monkeypatch):
    """Both CPU-specific routes on any machine: oneDNN with AVX-512 or held to AVX2."""
    monkeypatch.setattr(layers, "_onednn_avx512", lambda: request.param)
    return request.param


def test_linear_route_thresholds(onednn_isa):
    route = layers.linear_route
    wide = layers.WX_MAX_IN_FEATURES + 1
    out = layers.FAST_MIN_WEIGHT_ELEMENTS // layers.ONEDNN_WX_MIN_IN_FEATURES  # the smallest weight that qualifies
    assert {route(r, 256, 255) for r in (1, 2, 16, 4096)} == {"linear"}  # small weights: F.linear
    if not _packing_available():
        assert {route(r, i, 768) for r in (1, 16, 4096) for i in (768, wide)} == {"linear"}
        return
    assert route(1, 768, 768) == route(1, wide, 768) == route(1, 512, out) == "onednn"  # one row, either ISA
    assert route(2, 512, out - 1) == "linear"
    for rows in range(2, layers.WX_MAX_ROWS + 1):
        assert route(rows, 768, 768) == route(rows, layers.WX_MAX_IN_FEATURES, 768) == route(rows, 512, out) == "wx"
        assert route(rows, wide, 768) == ("onednn" if onednn_isa else "onednn_wx")
    low = layers.ONEDNN_WX_MIN_ROWS_AVX512
    assert route(low - 1, 768, 768) == ("onednn" if onednn_isa else "onednn_wx")
    for rows in (low, layers.ONEDNN_WX_MAX_ROWS):
        assert route(rows, 768, 768) == route(rows, 512, out) == "onednn_wx"
        assert route(rows, 511, 4096) == ("onednn" if onednn_isa else "linear")  # narrow input: x W^T
    for rows in (layers.ONEDNN_WX_MAX_ROWS + 1, 4096):
        assert route(rows, 768, 768) == ("onednn" if onednn_isa else "linear")


def test_onednn_isa_follows_cpu_flags_and_the_isa_cap(monkeypatch):
    monkeypatch.setitem(layers._PACKING, "onednn_avx512", None)  # probed again; restored after the test
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert layers._onednn_avx512() is False
    layers._PACKING["onednn_avx512"] = None
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert layers._onednn_avx512() is layers.cpu_features().avx512f


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "in_features, out_features",
    [(48, 97), (layers.ONEDNN_WX_MIN_IN_FEATURES, 515), (layers.WX_MAX_IN_FEATURES + 8, 257), (300, 900)],
)  # no row count below equals out_features
def test_no_grad_linear_matches_f_linear_and_takes_its_route(onednn_isa, bias, in_features, out_features):
    """Every row count around the thresholds, 2-D, 3-D and non-contiguous input: the route
    ``linear_route`` names is the one taken, and it agrees with ``F.linear`` to float32 rounding."""
    torch.manual_seed(0)
    layer = PackedLinear(in_features, out_features, bias=bias).eval()
    w, b = layer.weight, layer.bias
    edges = (layers.WX_MAX_ROWS, layers.ONEDNN_WX_MIN_ROWS_AVX512, layers.ONEDNN_WX_MAX_ROWS)
    for rows in sorted({1, 2, *edges, *(e + 1 for e in edges)}):
        for x in (
            torch.randn(rows, in_features),
            torch.randn(1, rows, in_features),
            torch.randn(in_features, rows).t(),  # non-contiguous
            torch.randn(rows, 2 * in_features)[:, ::2],  # non-contiguous, strided last dim
        ):
            want = F.linear(x, w, b)
            with torch.no_grad():
                got = layer(x)
            route = layers.linear_route(rows, in_features, out_features)
            where = f"{rows} rows, input {tuple(x.shape)} {x.stride()}, route {route}"
            assert got.shape == want.shape and got.is_contiguous(), where
            assert_close(got, want, TOLERANCES["hidden"], where)
            assert layer._packed is None, where  # no copy of the weight
            if x.dim() == 3:  # the route depends on the row count only: one profile per count
                with torch.no_grad():
                    taken = _route_taken(lambda: layer(x), tuple(w.shape))  # noqa: B023 (called at once)
                assert taken == route, f"{where}: ran {taken}"


def test_switch_off_disables_the_no_grad_routes(onednn_isa, monkeypatch):
    """``set_packed_linear(False)`` is ``F.linear`` bit for bit at every row count, for PackedLinear and the LM
    heads' VocabProjection alike, where the default takes a faster product (the tiny weights made to qualify)."""
    monkeypatch.setattr(layers, "FAST_MIN_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(layers, "ONEDNN_WX_MIN_IN_FEATURES", 0)
    torch.manual_seed(0)
    modules = (PackedLinear(48, 97).eval(), VocabProjection(48, 301, bias=False))
    edges = (layers.WX_MAX_ROWS, layers.ONEDNN_WX_MIN_ROWS_AVX512, layers.ONEDNN_WX_MAX_ROWS)
    faster = set()
    for module in modules:
        for rows in sorted({1, 2, *edges, *(e + 1 for e in edges)}):
            x = torch.randn(1, rows, 48)
            want = F.linear(x, module.weight, module.bias)
            with torch.no_grad():
                with packed_linear(None):
                    faster.add(_route_taken(lambda: module(x), tuple(module.weight.shape)))  # noqa: B023
                with packed_linear(False):
                    got = module(x)
                    taken = _route_taken(lambda: module(x), tuple(module.weight.shape))  # noqa: B023
            assert torch.equal(got, want), (type(module).__name__, rows)
            assert taken == "linear", (type(module).__name__, rows, taken)
            assert getattr(module, "_packed", None) is None
    assert "wx" in faster and (faster - {"linear", "wx"} or not _packing_available()), faster  # the test can fail


def _onednn_calls(fn):
    """``(oneDNN ops fn() dispatched, its result)``, read from its profile."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::")), result


@needs_packing
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags(), on CPU builds
@pytest.mark.parametrize("setting", [None, True], ids=["default", "packed"])
def test_torch_turning_onednn_off_keeps_every_product_off_onednn(onednn_isa, setting, monkeypatch):
    """Under ``torch.backends.mkldnn.flags(enabled=False)`` (or ``torch.backends.mkldnn.enabled = False``) no
    oneDNN op runs: no-grad products at every row count (F.linear bit for bit; MKL's ``(W x^T)^T`` at 2-4 rows),
    the packed path, training products and their backward (F.linear's, bit for bit), and the backward of a
    forward that ran on oneDNN; restored, the oneDNN products run again."""
    monkeypatch.setattr(layers, "FAST_MIN_WEIGHT_ELEMENTS", 0)  # the tiny weight takes a base model's routes
    monkeypatch.setattr(layers, "ONEDNN_WX_MIN_IN_FEATURES", 0)
    torch.manual_seed(0)
    layer = PackedLinear(48, 97).eval()
    w, b = layer.weight, layer.bias
    edges = (layers.WX_MAX_ROWS, layers.ONEDNN_WX_MIN_ROWS_AVX512, layers.ONEDNN_WX_MAX_ROWS)
    onednn_rows = 0
    with packed_linear(setting), torch.no_grad():
        for rows in sorted({1, 2, *edges, *(e + 1 for e in edges)}):
            x = torch.randn(1, rows, 48)
            want = F.linear(x, w, b)
            with torch.backends.mkldnn.flags(enabled=False):
                calls, got = _onednn_calls(lambda: layer(x))  # noqa: B023 (called at once)
                route = layers.linear_route(rows, 48, 97)
            assert calls == 0, (rows, route)
            if 1 < rows <= layers.WX_MAX_ROWS:
                assert route == "wx"
                assert_close(got, want, TOLERANCES["hidden"], f"{rows} rows, oneDNN off")
            else:
                assert route == "linear" and torch.equal(got, want), (rows, route)
            calls, _ = _onednn_calls(lambda: layer(x))  # noqa: B023 (the flag restored)
            on_route = layers.linear_route(rows, 48, 97)
            assert (calls > 0) is bool(setting or on_route.startswith("onednn")), (rows, on_route, calls)
            onednn_rows += calls > 0
        before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # the flag itself
        try:
            calls, got = _onednn_calls(lambda: layer(x))  # the last row count's
        finally:
            torch.backends.mkldnn.enabled = before
        assert calls == 0 and torch.equal(got, want)
    assert onednn_rows >= 3, "the test can fail: oneDNN ran at most row counts with the flag on"
    layer.train()
    x, g = torch.randn(2, 5, 48, requires_grad=True), torch.randn(2, 5, 97)
    want = F.linear(x, w, b)
    want_grads = torch.autograd.grad(want, (x, w, b), g)

    def step(call=layer):
        out = call(x)
        return out, torch.autograd.grad(out, (x, w, b), g)

    with packed_linear(setting):
        with torch.backends.mkldnn.flags(enabled=False):
            calls, (out, grads) = _onednn_calls(step)
        assert calls == 0 and type(out.grad_fn).__name__ != "_OneDNNLinearBackward"
        assert torch.equal(out, want) and all(torch.equal(a, r) for a, r in zip(grads, want_grads))
        calls, (out, grads) = _onednn_calls(step)  # the flag restored: oneDNN where onednn_training says so
        onednn = layers.onednn_training()
        assert (calls == 3) is onednn and (type(out.grad_fn).__name__ == "_OneDNNLinearBackward") is onednn
        out = layer(x)  # a oneDNN forward (where it runs on oneDNN), its backward with oneDNN turned off
        with torch.backends.mkldnn.flags(enabled=False):
            calls, grads = _onednn_calls(lambda: torch.autograd.grad(out, (x, w, b), g))
        assert calls == 0
        for name, a, r in zip(("input", "weight", "bias"), grads, want_grads):
            assert_close(a, r, TOLERANCES["hidden"], f"the {name} gradient, oneDNN off for the backward")


def test_no_grad_routes_keep_f_linear_for_training_autocast_compile_and_other_dtypes(onednn_isa):
    torch.manual_seed(0)
    layer = PackedLinear(48, 40).eval()
    x = torch.randn(16, 48)
    want = F.linear(x, layer.weight, layer.bias)
    with packed_linear(None):  # autograd on: no row route; the training product (oneDNN where faster)
        out = layer(x)
        if layers.onednn_training() and _packing_available():
            assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
            assert_close(out, want, TOLERANCES["hidden"], "default training product")
        else:  # F.linear, bit for bit
            assert torch.equal(out, want)
            assert _route_taken(lambda: layer(x)) == "linear"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        assert got.dtype == torch.bfloat16 and torch.equal(got, F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        compiled = torch.compile(layer, backend="eager", fullgraph=True)  # traced: F.linear
        assert torch.equal(compiled(x), want)
        x64, l64 = x.double(), copy.deepcopy(layer).double()
        assert torch.equal(l64(x64), F.linear(x64, l64.weight, l64.bias))
        assert _route_taken(lambda: l64(x64)) == "linear"
        with pytest.raises(RuntimeError):  # a bad width still fails with F.linear's error
            layer(torch.randn(16, 47))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_models_infer_as_they_train_with_the_default_products(family, monkeypatch):
    """A model's no-grad forward (the default row-count products) matches its autograd forward (the training
    products)."""
    monkeypatch.setattr(layers, "FAST_MIN_WEIGHT_ELEMENTS", 0)  # the tiny weights take a base model's routes
    monkeypatch.setattr(layers, "ONEDNN_WX_MIN_IN_FEATURES", 0)
    model, inp = _tiny_model(family)
    model.eval()
    want = model(**inp)[0]
    with torch.no_grad():
        got = model(**inp)[0]
        taken = _route_taken(lambda: model(**inp))
    assert_close(got, want, TOLERANCES["hidden"], f"{family} inference vs autograd forward")
    if _packing_available():
        assert taken in ("onednn", "onednn_wx"), f"the block products took {taken}, not a oneDNN product"


@needs_packing
def test_linear_rows_benchmark_smoke(tmp_path):
    """``benchmarks.linear_rows`` times every candidate product and checks each against ``F.linear``."""
    linear_rows = pytest.importorskip("benchmarks.linear_rows")
    out = tmp_path / "rows.json"
    argv = ["--shapes", "32:24:b,16:8:n", "--rows", "1,3", "--rounds", "1", "--hot", "--out", str(out)]
    assert linear_rows.main(argv) == 0
    medians = json.loads(out.read_text())
    assert {"32->24|1|mv", "32->24|3|onednn_wx", "16->8|3|wx", "16->8|1|F.linear"} <= medians.keys()


def test_benchmarks_run_each_pytorch_mode_under_the_setting_it_names(tmp_path, monkeypatch):
    """In ``benchmarks.forward``, ``small_shapes`` and ``train``, ``pt`` (what a user gets) runs under the switch's
    default ``None``, ``pt-plain`` with it off (``False``), ``pt-packed`` on (``True``): one table,
    ``benchmarks.harness.PT_PACKED_LINEAR_SETTINGS``, which each benchmark's PyTorch runner sets around its calls
    (session 12's ``forward`` and ``small_shapes`` ran ``pt`` with ``False`` and went unnoticed)."""
    harness = pytest.importorskip("benchmarks.harness")
    forward, small_shapes, train = (
        pytest.importorskip(f"benchmarks.{m}") for m in ("forward", "small_shapes", "train")
    )
    want = {"pt": None, "pt-compile": None, "pt-plain": False, "pt-packed": True}
    seen: list[bool | None] = []

    @contextlib.contextmanager
    def recording(enabled=True):
        seen.append(enabled)
        with packed_linear(enabled):
            yield

    monkeypatch.setattr(zoo, "packed_linear", recording)  # the benchmarks import it when they build a runner
    threads = torch.get_num_threads()  # the runners set it: leave it as it is
    ids, mask = forward._inputs(2, 8, 20)
    pt_path = forward._checkpoint(str(tmp_path), "electra", smoke=True)
    train_path = train._checkpoint(str(tmp_path), "electra", smoke=True)
    runners = {
        "forward": (forward.BACKENDS, lambda b: forward._make_runner(b, "electra", pt_path, threads)[0](ids, mask)),
        "small_shapes": (small_shapes.BACKENDS, lambda b: small_shapes._runner(b, "electra", pt_path, 0)(ids, mask)),
        "train": (
            [*train.BACKENDS, *train.LORA_BACKENDS],
            lambda b: train.make_step(b, "electra", train_path, threads)[0](ids, mask, np.zeros(2, np.int64)),
        ),
    }
    for bench, (backends, run) in runners.items():
        ours = [b for b in dict.fromkeys(backends) if b.startswith("pt")]  # every PyTorch backend of ours
        assert {"pt", "pt-packed"} <= set(ours), bench
        for b in ours:
            assert harness.pt_packed_linear_setting(b) is want[b.partition("+")[0]], (bench, b)
            if "compile" not in b:  # compiled code reads no switch (and compiling takes seconds)
                seen.clear()
                run(b)
                assert seen and all(s is want[b.partition("+")[0]] for s in seen), (bench, b, seen)
    assert harness.pt_packed_linear_setting("hf-pt") is None  # transformers' read no switch
    with pytest.raises(KeyError):
        harness.pt_packed_linear_setting("pt-undeclared")
