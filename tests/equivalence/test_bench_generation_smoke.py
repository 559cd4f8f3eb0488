"""The generation benchmark keeps working: its smoke mode writes JSON and markdown with a positive
tokens/s for every backend and family, and identical greedy tokens across backends."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("jax")

from benchmarks import generation  # noqa: E402

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]


def test_smoke_run_reports_every_backend(tmp_path):
    assert generation.main(["--smoke", "--threads", "0", "--out", str(tmp_path)]) == 0  # leave pytest's threads
    report = json.loads((tmp_path / "generation.json").read_text())
    rows = report["rows"]
    assert {(r["family"], r["backend"]) for r in rows} == {
        (f, b) for f in generation.SMOKE_CONFIGS for b in generation.BACKENDS
    }
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["warmup_s"] > 0 and r["new_tokens"] == report["new_tokens"]
    assert {r["batch"] for r in rows} == {2}
    assert report["agreement"] and all(a["identical"] for a in report["agreement"])
    assert "| mpt | flax | 2 |" in (tmp_path / "generation.md").read_text()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        generation.main(["--smoke", "--backends", "pt,onnx", "--out", str(tmp_path)])
