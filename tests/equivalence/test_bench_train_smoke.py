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
    assert report["kind"] == "lora" and "avx" in report["machine"]["cpu_flags"]
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
    backends = ["pt", "hf-pt", "tf", "flax", "flax+lora"]
    out = _run(tmp_path, "--families", "electra", "--backends", ",".join(backends), "--no-memory")
    report = json.loads((out / "train.json").read_text())
    rows = {r["backend"]: r for r in report["rows"]}
    assert set(rows) == set(backends) and all("error" not in r for r in rows.values()), rows
    assert all(r["median_ms"] > 0 and r["warmup_s"] > 0 and r["trainable_params"] > 0 for r in rows.values())
    assert rows["hf-pt"]["trainable_params"] == rows["pt"]["trainable_params"] == FULL_PARAMS
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
