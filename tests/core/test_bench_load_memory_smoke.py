"""benchmarks/load_memory.py --smoke: every backend loads a sharded checkpoint in a fresh process and
the report holds real measurements (weights verified against the file, sizes from the spec)."""

from __future__ import annotations

import json

import pytest

from benchmarks import load_memory
from nezha_zoo.spec.registry import get_family


def test_load_memory_smoke(tmp_path):
    report = load_memory.main(["--smoke", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    results = report["results"]
    assert [(r["backend"], r["dtype"]) for r in results] == [
        (b, d) for b in load_memory.BACKENDS for d in load_memory.DTYPES
    ], [r.get("error") for r in results]
    fam = get_family(report["family"])
    n_params = fam.model_spec(fam.config_class(**report["config"]), "Model").num_parameters()
    assert report["shards"] > 1  # really a sharded checkpoint
    for r in results:
        assert r["weights_match"], r  # what was loaded is what the file holds (checksum)
        assert r["param_dtypes"] == [r["dtype"]]
        itemsize = 4 if r["dtype"] == "float32" else 2
        assert round(r["model_mib"] * 2**20) == n_params * itemsize
        assert r["peak_reset"] and r["peak_mib"] >= r["after_mib"] > 0 and r["load_s"] > 0
        assert r["ratio"] == pytest.approx((r["peak_mib"] - r["baseline_mib"]) / r["model_mib"])
    saved = json.loads((tmp_path / "out" / "load_memory_smoke.json").read_text())
    assert saved["results"] == results
    table = (tmp_path / "out" / "load_memory_smoke.md").read_text()
    assert table.count("| pt |") == 2 and table.count("| flax |") == 2 and table.count("| tf |") == 2
    assert not list((tmp_path / "work").iterdir())  # the generated checkpoint is removed
