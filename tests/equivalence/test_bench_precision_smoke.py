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
from nezha_zoo.hardware import cpu_features  # noqa: E402

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
    assert report["cpu_flags"] == cpu_features().flags()
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


def test_runs_of_single_frameworks_merge_into_one_report(tmp_path):
    def part(fw, load):
        report = {
            "machine": {"cpu": "cpu", "cores": 2, "threads": 2}, "cpu_flags": ["avx512_bf16"], "smoke": True,
            "frameworks": [fw], "load_before": [load, 0, 0], "load_after": [load + 1, 0, 0],
            "matmul": {"gflops": 10.0 * load}, "wall_s": 1.0, "rows": [{"framework": fw, "error": "x"}],
            "results": [{"framework": fw, "error": "x"}],
        }  # fmt: skip
        (tmp_path / f"{fw}.json").write_text(json.dumps(report))
        return str(tmp_path / f"{fw}.json")

    out = tmp_path / "merged"
    assert precision.main(["--merge", part("pt", 3), part("flax", 5), "--out", str(out)]) == 0
    merged = json.loads((out / "precision.json").read_text())
    assert merged["frameworks"] == ["pt", "flax"] and [r["framework"] for r in merged["rows"]] == ["pt", "flax"]
    md = (out / "precision.md").read_text()
    assert "- pt: load average (1 min) 3.0 before, 4.0 after" in md and "- flax: load average (1 min) 5.0" in md
    assert md.rstrip().endswith(precision.XLA_BF16_NOTE)  # why XLA widens bf16 dots, under the tables
