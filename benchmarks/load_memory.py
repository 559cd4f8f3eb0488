"""Peak memory of ``from_pretrained`` on a large sharded checkpoint, per backend and dtype (issue #5).

``python -m benchmarks.load_memory`` generates (once, cached under ``--workdir``) a sharded safetensors
checkpoint of a reduced XLM-RoBERTa-XL -- the real vocabulary (250880) and width (2560), 2 of its 36
layers: about 3.2 GB in float32, in ~500 MB shards -- then, for each backend and dtype, in a fresh
process:

* ``baseline``: resident memory after importing the framework and the model class;
* ``peak``: the process's high-water mark (``VmHWM``, reset after the imports through
  ``/proc/self/clear_refs``) while ``from_pretrained(path, dtype=...)`` runs;
* ``model``: the loaded model's weight bytes (parameters x itemsize, tied weights once);
* ``ratio = (peak - baseline) / model``: 1.0 is the floor (the weights themselves); the target is
  <= 1.3, i.e. loading never holds two copies of the weights;
* the load time, and whether the loaded weights equal the checkpoint (a checksum over every tensor).

The float32 checkpoint is loaded as float32 and as bfloat16 (converted piece by piece while loading).
Results go to ``--out`` (default ``benchmarks/results``, not committed): ``load_memory.json`` and
``load_memory.md``.  ``--smoke`` does the same on a tiny config in seconds (the test suite runs it).
The generated checkpoint is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from benchmarks.harness import reset_peak_rss as _reset_peak
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.pretrained import iter_random_weights, save_weights
from nezha_zoo.spec.registry import get_family, model_class

BACKENDS = ("pt", "tf", "flax")
DTYPES = ("float32", "bfloat16")
TARGET_RATIO = 1.3

#: The reduced XLM-R-XL: real vocabulary, width, heads and MLP; 2 layers instead of 36.
FULL = dict(
    vocab_size=250880,
    hidden_size=2560,
    num_hidden_layers=2,
    num_attention_heads=32,
    intermediate_size=10240,
    max_position_embeddings=514,
)
SMOKE = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=66,
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# --- the child process: one backend, one dtype ------------------------------------------------------


def _checksum(arrays) -> float:
    """Sum over every weight of sum(|x|) in float64 (equal checkpoints and models give equal sums)."""
    total = 0.0
    for a in arrays:
        a = np.asarray(a)
        # In slices, so checking a 2.5 GB table adds no full-size temporary to the measurement (which
        # has already been read by then anyway).
        flat = a.reshape(-1)
        for i in range(0, flat.size, 1 << 24):
            total += float(np.abs(flat[i : i + (1 << 24)].astype(np.float64)).sum())
    return total


def _model_arrays(backend: str, model: Any):
    if backend == "pt":
        from nezha_zoo.pt.modeling_utils import _numpy_view

        seen: set[int] = set()
        for p in model.parameters():  # tied weights once
            if id(p) not in seen:
                seen.add(id(p))
                yield _numpy_view(p)
    elif backend == "tf":
        for v in model.weights:
            yield v.numpy()
    else:
        import jax

        yield from jax.tree_util.tree_leaves(model.params)


def child(backend: str, dtype: str, path: str, family: str) -> dict[str, Any]:
    """Load ``path`` with ``backend`` in ``dtype``; measure memory and time (run in a fresh process)."""
    cls = model_class(family, "Model", backend)  # imports nezha_zoo.<backend> before the baseline
    if backend == "flax":
        import jax.numpy as jnp  # noqa: F401  (the framework is fully imported before the baseline)
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    model = cls.from_pretrained(path, dtype=dtype)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    after = _status_kib("VmRSS")
    arrays = list(_model_arrays(backend, model))
    model_bytes = sum(int(np.asarray(a).size) * np.asarray(a).dtype.itemsize for a in arrays)
    dtypes = sorted({str(np.asarray(a).dtype) for a in arrays})
    return {
        "backend": backend,
        "dtype": dtype,
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
        "after_mib": after / 1024,
        "peak_reset": reset,
        "model_mib": model_bytes / 2**20,
        "ratio": (peak - baseline) * 1024 / model_bytes,
        "load_s": seconds,
        "param_dtypes": dtypes,
        "checksum": _checksum(arrays),
    }


# --- the parent: generate, run the children, report -------------------------------------------------


def generate(workdir: str, config_fields: dict[str, Any], family: str, shard_size: str) -> tuple[str, int]:
    """Write (or reuse) the checkpoint; returns its directory and its size in bytes."""
    fam = get_family(family)
    config = fam.config_class(**config_fields)
    path = os.path.join(workdir, f"{family}-{config.hidden_size}x{config.num_hidden_layers}-v{config.vocab_size}")
    stamp = os.path.join(path, ".complete")
    if not os.path.isfile(stamp):
        spec = fam.model_spec(config, "Model")
        # Streamed: one tensor is generated at a time and each shard written as soon as it is full.
        save_weights(path, config, spec, fam, iter_random_weights(spec, config, seed=0), max_shard_size=shard_size)
        with open(stamp, "w") as fh:
            fh.write("ok\n")
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return path, size


def checkpoint_checksum(path: str, dtype: str) -> float:
    """The checksum the loaded model must have: every tensor cast to ``dtype`` (as loading does)."""
    from nezha_zoo.dtypes import numpy_dtype

    target = numpy_dtype(dtype)
    total = 0.0
    with open_checkpoint(path) as reader:
        for key in reader.keys():
            total += _checksum([np.asarray(reader.get(key)).astype(target)])
    return total


def run_child(backend: str, dtype: str, path: str, family: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.load_memory", "--child", backend, "--dtype", dtype, "--path", path]
    cmd += ["--family", family]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"backend": backend, "dtype": dtype, "error": proc.stderr.strip().splitlines()[-5:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# from_pretrained peak memory ({report['family']}, {report['checkpoint_mib']:.0f} MiB float32 "
        f"checkpoint in {report['shards']} shards)",
        "",
        f"Config: {report['config']}.  Target: (peak - baseline) / model <= {TARGET_RATIO}.",
        "",
        "| backend | dtype | baseline MiB | peak - baseline MiB | model MiB | ratio | load s | weights match "
        "| verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['dtype']} | error: {' '.join(r['error'])[-200:]} |||||||")
            continue
        ok = "ok" if r["ratio"] <= TARGET_RATIO else "OVER"
        lines.append(
            f"| {r['backend']} | {r['dtype']} | {r['baseline_mib']:.0f} | {r['peak_mib'] - r['baseline_mib']:.0f} | "
            f"{r['model_mib']:.0f} | {r['ratio']:.3f} | {r['load_s']:.1f} | {r['weights_match']} | {ok} |"
        )
    return "\n".join(lines) + "\n"


def _say(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or, with ``--child``, one measurement); returns the report dict."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join("/tmp", "nezha_zoo_load_memory"))
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--family", default="xlm-roberta-xl")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--layers", type=int, default=None, help="encoder layers (default 2; smoke 2)")
    ap.add_argument("--shard-size", default=None, help="max shard size (default 500MB; smoke 20KB)")
    ap.add_argument("--smoke", action="store_true", help="tiny config, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    family = get_family(args.family).key

    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.dtype, args.path, family)) + "\n")  # the parent reads it
        return {}

    fields = dict(SMOKE if args.smoke else FULL)
    if family == "electra":  # the same shapes: embeddings as wide as the encoder
        fields["embedding_size"] = fields["hidden_size"]
    if args.layers is not None:
        fields["num_hidden_layers"] = args.layers
    shard_size = args.shard_size or ("20KB" if args.smoke else "500MB")
    path, size = generate(args.workdir, fields, family, shard_size)
    shards = sum(1 for f in os.listdir(path) if f.endswith(".safetensors"))
    _say(f"checkpoint: {path} ({size / 2**20:.0f} MiB, {shards} shards)")
    expected: dict[str, float] = {}
    results = []
    try:
        for backend in args.backends.split(","):
            for dtype in args.dtypes.split(","):
                r = run_child(backend, dtype, path, family, args.timeout)
                if "error" not in r:
                    if dtype not in expected:
                        expected[dtype] = checkpoint_checksum(path, dtype)
                    want = expected[dtype]
                    r["weights_match"] = bool(abs(r["checksum"] - want) <= 1e-9 * max(1.0, abs(want)))
                _say(json.dumps(r))
                results.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    report = {
        "family": family,
        "config": fields,
        "checkpoint_mib": size / 2**20,
        "shards": shards,
        "smoke": args.smoke,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "target_ratio": TARGET_RATIO,
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = "load_memory_smoke" if args.smoke else "load_memory"
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump(report, fh, indent=2)
    table = markdown(report)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(table)
    _say(table)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
