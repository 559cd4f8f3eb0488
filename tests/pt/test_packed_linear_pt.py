"""PackedLinear (issue #23): oneDNN-packed weights for inference products, re-packed when the weight changes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from nezha_zoo.pt.layers import PackedLinear, _packing_available, set_packed_linear
from nezha_zoo.testing import TOLERANCES, assert_close, pin_precision

pytestmark = [pytest.mark.pt]

pin_precision("pt")


def _layer() -> PackedLinear:
    torch.manual_seed(0)
    return PackedLinear(48, 40).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1))


needs_packing = pytest.mark.skipif(not _packing_available(), reason="this PyTorch build has no oneDNN")


@needs_packing
def test_inference_path_packs_and_matches_f_linear():
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
def test_weight_changes_repack():
    layer, x = _layer(), _x()
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-3.0)  # in place: the version counter moves
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after in-place")
        layer.load_state_dict({"weight": torch.randn(40, 48), "bias": torch.randn(40)})
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after load")
        layer.weight = torch.nn.Parameter(torch.randn(40, 48))  # replaced
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after replace")
        layer.weight.data.copy_(torch.randn(40, 48))  # bypasses the counter: the documented escape hatch
        layer.drop_packed_weight()
        assert_close(layer(x), F.linear(x, layer.weight, layer.bias), TOLERANCES["hidden"], "after drop")


def test_autograd_and_switch_use_f_linear_exactly():
    layer, x = _layer(), _x()
    layer.train()
    out = layer(x)  # gradients on: plain F.linear, bit for bit
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert layer.weight.grad is not None and layer._packed is None
    layer.eval()
    previous = set_packed_linear(False)
    try:
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is None
    finally:
        set_packed_linear(previous)


@needs_packing
def test_copies_drop_the_packed_weight_and_train_frees_it():
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
