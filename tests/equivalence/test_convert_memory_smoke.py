"""The conversion memory benchmark runs end to end on a tiny checkpoint (``--smoke``)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tf_keras")
pytest.importorskip("flax")

from benchmarks.convert_memory import main

pytestmark = [pytest.mark.hf, pytest.mark.tf, pytest.mark.flax]


def test_convert_memory_smoke(tmp_path, capsys):
    assert main(["--smoke", "--out", str(tmp_path / "results"), "--workdir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results" / "convert_memory_smoke.json").read_text())
    rows = {(r["target"], r["converter"]): r for r in result["rows"]}
    assert set(rows) == {
        ("hf-flax", "nezha_zoo"),
        ("hf-flax", "transformers-flax"),
        ("hf-tf", "nezha_zoo"),
        ("hf-tf", "transformers-tf"),
    }
    for r in rows.values():
        assert r["peak_rss"] >= r["rss_after_imports"] > 0 and r["seconds"] > 0 and r["output_bytes"] > 0
    # both converters wrote the same amount of Flax weights; every generated file is gone
    assert rows[("hf-flax", "nezha_zoo")]["output_bytes"] > result["checkpoint"]["bytes"] // 2
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
    assert "| hf-tf | transformers-tf |" in (tmp_path / "results" / "convert_memory_smoke.md").read_text()
    assert "peak RSS" in capsys.readouterr().out
