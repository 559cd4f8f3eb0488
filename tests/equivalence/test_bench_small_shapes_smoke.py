"""The small-shape and key/value-cache benchmarks keep working (smoke configs, seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def test_small_shapes_isolate_times_each_backend_alone_with_the_threads_asked(tmp_path):
    argv = ["--smoke", "--threads", "1", "--rounds", "2", "--pause", "0", "--isolate", "--backends", "pt,flax"]
    assert small_shapes.main([*argv, "--workdir", str(tmp_path), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "small_shapes.json").read_text())
    assert report["isolated"] is True and report["pause_s"] == 0
    assert list(report["times_s"]) == ["pt", "flax"]
    assert all(len(ts) == 2 and min(ts) > 0 for ts in report["times_s"].values())
    assert len({*report["pid"].values(), os.getpid()}) == 3  # two fresh processes, not this one
    assert report["jax_cpus"] == {"pt": None, "flax": 1}  # JAX is started only where Flax is timed
    text = (tmp_path / "small_shapes.md").read_text()
    assert "each backend alone in its process" in text and "0.0 s pause" in text and "CPU flags: " in text


_START_JAX = """
import json, os
from benchmarks.harness import start_jax
before = os.sched_getaffinity(0)
cpus = start_jax(1)
import jax.numpy as jnp
(jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()
names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
try:
    start_jax(1)
    again = "started twice"
except RuntimeError as e:
    again = str(e)
pool = sum("XLAEigen" in n for n in names)
print(json.dumps({"cpus": cpus, "restored": os.sched_getaffinity(0) == before, "pool": pool, "again": again}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_start_jax_sizes_the_cpu_pool_and_gives_the_cpus_back():
    # XLA sizes its CPU pool from the CPUs it sees at start-up (two on CI's machine without start_jax)
    proc = subprocess.run([sys.executable, "-c", _START_JAX], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["cpus"] == 1 and got["pool"] == 1 and got["restored"]
    assert "already started" in got["again"]


@pytest.mark.tf
def test_linear_rows_times_tf_and_jax_products_on_the_same_weights(tmp_path):
    pytest.importorskip("tensorflow")
    # main checks each framework's product against F.linear before timing it (a wrong layout fails)
    out = tmp_path / "rows.json"
    argv = ["--shapes", "32:24:b,16:8:n", "--rows", "1,3", "--rounds", "1", "--hot", "--others", "tf,jax"]
    cmd = [sys.executable, "-m", "benchmarks.linear_rows", *argv, "--out", str(out)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    medians = json.loads(out.read_text())
    assert {"32->24|3|tf", "32->24|3|jax", "32->24|1|read", "16->8|3|onednn_wx"} <= medians.keys()
    assert all(t > 0 for t in medians.values())


def test_kv_cache_smoke_decodes_the_same_tokens_in_place_and_with_cat():
    # main raises unless ours (in place), ours with torch.cat and transformers decode the same tokens
    argv = ["--smoke", "--threads", "0", "--rounds", "1", "--batches", "2", "--prompt", "4", "--new", "8"]
    assert kv_cache.main(argv) == 0
