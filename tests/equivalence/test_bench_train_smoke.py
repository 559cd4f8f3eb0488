"""The training-step benchmark keeps working: its smoke mode (LoRA against full fine-tuning, and ours
against transformers) writes json, markdown and a chart, with hand-checked parameter and state counts."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("matplotlib")

from benchmarks import train  # noqa: E402
from nezha_zoo.hardware import cpu_features  # noqa: E402

pytestmark = [pytest.mark.pt, pytest.mark.tf, pytest.mark.flax]

# Electra smoke config: hidden 32, 2 layers; rank 8 on query and value: A (8, 32) + B (32, 8) each.
LORA_PARAMS = 2 * 2 * (8 * 32 + 32 * 8)
FULL_PARAMS = 20_044  # every weight of the tiny ElectraForSequenceClassification


def _run(tmp_path, *args):
    out = tmp_path / "out"
    rc = train.main(
        ["--smoke", "--out", str(out), "--min-time", "0", "--repeats", "2", "--workdir", str(tmp_path / "ckpt"), *args]
    )
    assert rc == 0
    return out


def test_lora_smoke_reports_times_state_and_memory(tmp_path):
    out = _run(tmp_path, "--lora", "--backends", "pt,pt+lora", "--memory-steps", "1")
    report = json.loads((out / "lora.json").read_text())
    assert report["kind"] == "lora" and report["machine"]["cpu_flags"] == cpu_features().flags()
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == {"pt", "pt+lora"} and all("error" not in r for r in rows.values()), rows
    full, lora = rows["pt"], rows["pt+lora"]
    assert full["trainable_params"] == FULL_PARAMS and lora["trainable_params"] == LORA_PARAMS
    # AdamW: exp_avg and exp_avg_sq (float32) per trainable tensor, plus a float32 step count each
    assert lora["optimizer_state_tensors"] == 3 * 8  # 2 layers x (query, value) x (A, B)
    assert lora["optimizer_state_bytes"] == 2 * 4 * LORA_PARAMS + 4 * 8
    assert full["optimizer_state_bytes"] > 2 * 4 * FULL_PARAMS
    for r in (full, lora):  # measured each in its own fresh process
        assert r["runs"] >= 2 and r["median_ms"] > 0 and r["loaded_bytes"] > 0
        assert r["step_peak_bytes"] >= 0 and r["first_steps_peak_bytes"] >= 0
    md = (out / "lora.md").read_text()
    assert "| electra | pt | " in md and "CPU flags: " in md
    # the report again from the json alone
    again = tmp_path / "again"
    assert train.main(["--render", str(out / "lora.json"), "--out", str(again)]) == 0
    assert (again / "lora.md").read_text() == md


def test_train_smoke_sets_ours_against_transformers(tmp_path):
    backends = ["pt", "pt-plain", "hf-pt", "tf", "flax", "flax+lora"]
    out = _run(tmp_path, "--families", "electra", "--backends", ",".join(backends), "--no-memory")
    report = json.loads((out / "train.json").read_text())
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == set(backends) and all("error" not in r for r in rows.values()), rows
    assert all(r["median_ms"] > 0 and r["warmup_s"] > 0 and r["trainable_params"] > 0 for r in rows.values())
    assert rows["hf-pt"]["trainable_params"] == rows["pt"]["trainable_params"] == FULL_PARAMS
    # pt is our default (oneDNN training products where faster), pt-plain the switch off (F.linear)
    assert (rows["pt"]["mode"], rows["pt-plain"]["mode"]) == ("eager", "eager+plain")
    # optax adamw: mu and nu of the adapter tree and one int32 count
    assert rows["flax+lora"]["trainable_params"] == LORA_PARAMS
    assert rows["flax+lora"]["optimizer_state_bytes"] == 2 * 4 * LORA_PARAMS + 4
    assert rows["tf"]["jit_compile"] is False  # Keras' default on a CPU-only TensorFlow
    md = (out / "train.md").read_text()
    pt_cell = next(line for line in md.splitlines() if line.startswith("| electra |"))
    assert pt_cell.split("|")[2].strip().strip("*").endswith("x")  # "N.NNx", bold below 1
    assert "- electra pt: " in md and "- electra flax" not in md  # no transformers' Flax step in this run
    assert os.path.getsize(out / "train.png") > 1000


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown backend 'hf-pt\\+lora'"):
        train._spec_of("hf-pt+lora")
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--backends", "pt,onnx", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        train.main(["--smoke", "--families", "bert", "--out", str(tmp_path)])


def _row(family, backend, median_ms):
    return {
        "family": family, "backend": backend, "framework": train._framework(backend), "mode": "m",
        "shape": "8x128", "median_ms": median_ms, "min_ms": median_ms, "max_ms": median_ms, "spread": 0.0,
        "runs": 3, "warmup_s": 1.0, "reference_gflops": 100.0, "loss": 0.7, "trainable_params": 10,
        "optimizer_state_bytes": 80, "optimizer_state_tensors": 3,
    }  # fmt: skip


def test_render_merges_runs_and_sets_ours_against_transformers(tmp_path):
    header = {
        "kind": "train", "machine": {"cpu": "cpu", "cpu_flags": ["avx2"], "cores": 2, "threads": 2,
        "load_average": [1.0, 1.0, 1.0]}, "versions": {}, "matmul": {"n": 2048, "gflops": 100.0}, "smoke": False,
        "shape": "8x128", "lora": {"rank": 8, "target_modules": ["query", "value"]}, "results": [], "wall_s": 60.0,
    }  # fmt: skip
    runs = {
        "pt.json": [_row("electra", "pt", 100.0), _row("electra", "pt-compile", 90.0), _row("electra", "hf-pt", 99.0)],
        "tf.json": [_row("electra", "tf", 120.0), _row("electra", "hf-tf", 100.0), _row("mpnet", "tf", 50.0)],
    }
    for name, rows in runs.items():
        (tmp_path / name).write_text(json.dumps({**header, "rows": rows, "sizes": {"electra": "base"}}))
    paths = ",".join(str(tmp_path / name) for name in runs)
    assert train.main(["--render", paths, "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "train.md").read_text()
    # best of ours against best of transformers per framework: 99 / 90 = 1.10x; 100 / 120 = 0.83x (a miss)
    assert "| electra | 1.10x | **0.83x** |  |" in md
    assert "| mpnet |  |  |  |" in md  # transformers has no TF MPNet row in this run
    assert "- electra pt: 100.0 ms vs hf-pt 99.0 ms -> **0.99x**" in md
    assert md.count("- run ") == 2
    merged = json.loads((tmp_path / "out" / "train.json").read_text())
    assert len(merged["rows"]) == 6 and merged["wall_s"] == 120.0
    (tmp_path / "lora.json").write_text(json.dumps({**header, "kind": "lora", "rows": [], "sizes": {}}))
    with pytest.raises(ValueError, match="different kinds"):
        train.merge_reports([str(tmp_path / "pt.json"), str(tmp_path / "lora.json")])
