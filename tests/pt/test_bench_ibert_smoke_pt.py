"""The I-BERT quant-vs-float benchmark runs (``--smoke``: tiny model) and writes positive timings."""

from __future__ import annotations

import json

import pytest

from benchmarks import ibert_quant

pytestmark = [pytest.mark.pt, pytest.mark.hf]


def test_smoke_benchmark_writes_positive_timings(tmp_path):
    # one layer: the run is nearly all traces and compiles, per layer; --layers is a path of its own
    assert ibert_quant.main(["--smoke", "--out", str(tmp_path), "--repeats", "1", "--layers", "1"]) == 0
    result = json.loads((tmp_path / "ibert_quant_smoke.json").read_text())
    assert result["config"]["num_hidden_layers"] == 1 and result["model"].endswith(", 1 layers")
    assert set(result["backends"]) == set(ibert_quant.BACKENDS)
    for name, timings in result["backends"].items():
        assert set(timings) == {"float", "quant"}, name
        for mode, by_shape in timings.items():
            assert set(by_shape) == set(result["shapes"]), (name, mode)
            assert all(t > 0 for t in by_shape.values()), (name, mode, by_shape)
    md = (tmp_path / "ibert_quant_smoke.md").read_text()
    assert "quant/float" in md and "| pt |" in md


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        ibert_quant.main(["--smoke", "--out", str(tmp_path), "--backends", "pt,mxnet"])
