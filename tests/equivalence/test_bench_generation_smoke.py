"""The generation benchmark keeps working: its smoke mode writes JSON and markdown with a positive
tokens/s for every backend (transformers included), family and decoding mode, identical greedy and
beam-search tokens across backends, and the "Against transformers" table."""

from __future__ import annotations

import json
import re

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
    assert {(r["family"], r["backend"], r["mode"]) for r in rows} == {
        (f, b, m) for f in generation.SMOKE_CONFIGS for b in generation.BACKENDS for m in generation.MODES
    }
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["warmup_s"] > 0 and r["new_tokens"] == report["new_tokens"]
    assert {r["batch"] for r in rows} == {2}
    assert report["agreement"] and all(a["identical"] for a in report["agreement"])
    assert {a["mode"] for a in report["agreement"]} == set(generation.DETERMINISTIC)
    markdown = (tmp_path / "generation.md").read_text()
    assert "| mpt | beam4 | 2 | flax |" in markdown and "## Against transformers" in markdown
    assert re.search(r"\| mpt \| beam4 \| 2 \| \d+\.\d\dx \| \d+\.\d\dx \| \d+\.\d\dx \| \d+\.\d\dx \|", markdown)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        generation.main(["--smoke", "--backends", "pt,onnx", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        generation.main(["--smoke", "--modes", "greedy,contrastive", "--out", str(tmp_path)])
