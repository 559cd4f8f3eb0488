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
    backends = ["pt", "pt-packed", "tf", "tf-packed", "flax", "flax-packed", "hf-pt"]
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
    assert all(0 < r["reference_gflops"] and r["matmul_fraction"] > 0 for r in rows)
    md = (tmp_path / "forward.md").read_text()
    assert "| electra | flax | 2x16 |" in md
    # every backend's dense products alone, in its own framework, at the largest shape
    assert {r["backend"] for r in report["results"] if r["gemms"]["gemm_ms"] > 0} == set(backends)
    assert "## Where the time goes" in md and "## Where PyTorch eager spends its time" in md
    assert os.path.getsize(tmp_path / "forward.png") > 1000


def test_backends_of_a_process_are_timed_in_turn_with_the_reference():
    calls: list[str] = []

    def runner(name):
        return (lambda ids, mask: calls.append(name)), (lambda out: out)

    runners = {b: runner(b) for b in ("ours", "theirs", "compiled")}
    out = forward._time_interleaved(runners, lambda: calls.append("matmul"), 1, 4, 10, min_time=0, repeats=4)
    warm = calls[: 2 * len(runners) + 1]  # compile + one more call each, then the reference once
    assert sorted(warm) == sorted([*runners, *runners, "matmul"])
    timed = calls[len(warm) :]
    rounds = [timed[i : i + 5] for i in range(0, len(timed), 5)]  # three backends, then two products
    assert len(rounds) == 4 and all(r[-2:] == ["matmul", "matmul"] for r in rounds)
    # each round runs every backend once, starting from a different one
    assert all(sorted(r[:3]) == sorted(runners) for r in rounds)
    assert [r[0] for r in rounds] == ["ours", "theirs", "compiled", "ours"]
    assert {b: len(t) for b, t in out["times_s"].items()} == dict.fromkeys(runners, 4)
    assert len(out["reference_s"]) == 8  # two products a round


def test_against_transformers_takes_the_best_mode_of_each_side_packed_included():
    # pt-packed (the opt-in PackedLinear path) is one of our modes: when it is the fastest, it is ours
    assert forward.BACKENDS["pt-packed"] == ("pt", "ours", "eager+packed")
    # the same switch in every framework (nezha_zoo.packing): TF and Flax packed modes are ours too
    assert forward.BACKENDS["tf-packed"] == ("tf", "ours", "tf.function+packed")
    assert forward.BACKENDS["flax-packed"] == ("flax", "ours", "jax.jit+packed")
    rows = [
        {"family": "electra", "framework": "pt", "shape": "1x16", "backend": b, "median_ms": ms}
        for b, ms in (("pt", 3.0), ("pt-packed", 2.0), ("pt-compile", 2.5), ("hf-pt", 4.0), ("hf-pt", 5.0))
    ]
    (line,) = forward.verdicts(rows)
    assert line.startswith("- electra pt 1x16: ours pt-packed 2.00 ms vs transformers hf-pt 4.00 ms -> 2.00x (met)")
    assert "| pt | electra | 2.00x |" in forward.summary(rows)
