"""``make bench`` keeps working: the forward benchmark's smoke mode, and its FLOP count checked by hand."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("jax")
pytest.importorskip("matplotlib")

from benchmarks import forward
from nezha_zoo.families.electra import ElectraConfig

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]


def test_flop_count_matches_a_hand_count():
    c = ElectraConfig(
        vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37,
    )  # fmt: skip
    b, s, h, i, e = 3, 10, 32, 37, 16
    per_token = 2 * (e * h + c.num_hidden_layers * (4 * h * h + 2 * h * i))  # projection, q k v o, FFN
    attention = c.num_hidden_layers * 2 * (2 * b * s * s * h)  # q.k^T and probs.v
    assert forward.forward_flops("electra", c, b, s) == per_token * b * s + attention


def test_smoke_run_writes_json_markdown_and_chart(tmp_path):
    backends = ["pt", "tf", "flax", "hf-pt"]
    rc = forward.main(
        ["--smoke", "--families", "electra", "--backends", ",".join(backends), "--out", str(tmp_path),
         "--min-time", "0", "--repeats", "1", "--workdir", str(tmp_path / "ckpt")]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "forward.json").read_text())
    assert report["matmul"]["gflops"] > 0
    rows = report["rows"]
    assert {r["backend"] for r in rows} == set(backends)
    assert all("error" not in r and r["median_ms"] > 0 and r["gflops"] > 0 for r in rows)
    assert {r["shape"] for r in rows} == {"1x8", "2x16"}
    # ours vs transformers in PyTorch at both shapes, and the matmul-fraction target line
    assert sum(v.startswith("- electra pt ") for v in report["verdicts"]) == 2
    assert "| electra | flax | 2x16 |" in (tmp_path / "forward.md").read_text()
    assert os.path.getsize(tmp_path / "forward.png") > 1000
