"""The bfloat16/float32 benchmark keeps working: its smoke mode times every framework's modes in both
dtypes, forward and training, and reports the CPU's unit flags and the dot dtypes XLA compiled."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("jax")
pytest.importorskip("optax")

from benchmarks import precision  # noqa: E402

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]


def test_smoke_run_reports_both_dtypes_of_every_mode(tmp_path):
    assert precision.main(["--smoke", "--repeats", "1", "--out", str(tmp_path), "--workdir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "precision.json").read_text())
    rows = report["rows"]
    assert all("error" not in r for r in rows), rows
    models = {(r["what"], r["task"]) for r in rows if not r["what"].endswith("matmul")}
    assert models == {(m, t) for m in precision.MODES for t in precision.TASKS}
    assert {r["what"] for r in rows if r["what"].endswith("matmul")} == {"pt matmul", "tf matmul", "flax matmul"}
    for r in rows:
        for dtype in precision.DTYPES:
            assert r[f"{dtype}_ms"] > 0 and r[f"{dtype}_gflops"] > 0 and r[f"{dtype}_runs"] >= 1
        assert r["bf16_over_f32"] == pytest.approx(r["bfloat16_ms"] / r["float32_ms"])
    info = {k: v for res in report["results"] for k, v in res["info"].items()}
    for mode in ("tf-xla", "flax"):  # the compiled forward has the model's dense products, one dot each at least
        for dtype in precision.DTYPES:
            assert sum(info[f"{mode} {dtype} forward dots"].values()) >= 2 * 6  # 2 layers x (q k v o + FFN)
    assert report["cpu_flags"] == precision.cpu_flags()
    md = (tmp_path / "precision.md").read_text()
    assert "| pt | pt | train |" in md and "| tf | tf-xla | forward |" in md and "unit flags:" in md


def test_hlo_dot_dtypes_are_read_from_the_defining_instructions():
    hlo = """
  %a = bf16[4,8]{1,0} parameter(0)
  %wide = f32[4,8]{1,0} convert(%a)
  %b = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%wide, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %dot.2 = bf16[4,2]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={1}
"""
    assert precision._hlo_dots(hlo) == {"f32 x f32 -> f32": 1, "bf16 x bf16 -> bf16": 1}


def test_unknown_framework_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        precision.main(["--smoke", "--frameworks", "pt,onnx", "--out", str(tmp_path)])
