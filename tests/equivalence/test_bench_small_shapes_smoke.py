"""The small-shape and key/value-cache benchmarks keep working (smoke configs, seconds)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("transformers")

from benchmarks import kv_cache, small_shapes  # noqa: E402

pytestmark = [pytest.mark.pt, pytest.mark.flax, pytest.mark.hf]


def test_small_shapes_smoke_times_every_backend(tmp_path):
    backends = ["pt", "pt-packed", "flax", "flax-packed", "flax-op-by-op", "flax-jit"]
    argv = ["--smoke", "--threads", "0", "--rounds", "2", "--backends", ",".join(backends)]
    assert small_shapes.main([*argv, "--workdir", str(tmp_path), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "small_shapes.json").read_text())
    assert list(report["times_s"]) == backends
    assert all(len(ts) == 2 and min(ts) > 0 for ts in report["times_s"].values())
    assert "| flax-jit |" in (tmp_path / "small_shapes.md").read_text()
    with pytest.raises(SystemExit):
        small_shapes.main(["--smoke", "--threads", "0", "--backends", "pt,onnx"])


def test_kv_cache_smoke_decodes_the_same_tokens_in_place_and_with_cat():
    # main raises unless ours (in place), ours with torch.cat and transformers decode the same tokens
    argv = ["--smoke", "--threads", "0", "--rounds", "1", "--batches", "2", "--prompt", "4", "--new", "8"]
    assert kv_cache.main(argv) == 0
