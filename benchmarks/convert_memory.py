"""Peak memory and time of checkpoint conversion: nezha_zoo's streaming converter vs transformers.

``python -m benchmarks.convert_memory`` generates a sharded Electra checkpoint of about 2.2 GB
(canonical safetensors, 500 MB shards, one 1 GB embedding table) and converts it four ways, each in a
fresh subprocess that reports its own peak resident memory (``VmHWM``) and wall time:

- ``nezha-zoo convert SRC DST --to hf-flax`` vs ``FlaxElectraForMaskedLM.from_pretrained(SRC,
  from_pt=True).save_pretrained(DST)``;
- ``nezha-zoo convert SRC DST --to hf-tf`` vs ``TFElectraForMaskedLM.from_pretrained(SRC,
  from_pt=True).save_pretrained(DST)`` (tf-keras, ``TF_USE_LEGACY_KERAS=1``).

Each run also records its resident memory after imports, before any weight is read, so the
conversion's own working memory is ``peak - after imports``.  Results go to
``benchmarks/results/convert_memory.{json,md}``; every generated file is deleted afterwards.
``--smoke`` does the same on a tiny checkpoint (used by the test suite).  Needs the ``test`` extra
(transformers, tf-keras) and, for the full run, 10 GB of available memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import numpy as np

FULL = dict(
    vocab_size=250_000,
    embedding_size=1024,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=512,
)
SMOKE = dict(
    vocab_size=1000,
    embedding_size=32,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
HEAD = "ForMaskedLM"
MIN_AVAILABLE_GB = 10

# Runs in the child: report VmRSS after imports and VmHWM at the end as JSON on the last line.
_CHILD = textwrap.dedent(
    """
    import json, sys, time

    def status(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    kind, src, dst = sys.argv[1:4]
    if kind == "nezha_zoo":
        from nezha_zoo.cli.main import main
        rss = status("VmRSS"); t0 = time.perf_counter()
        rc = main(["convert", src, dst, "--to", *sys.argv[4:], "--quiet"])
        assert rc == 0, rc
    elif kind == "transformers-flax":
        import transformers
        transformers.logging.set_verbosity_error()
        rss = status("VmRSS"); t0 = time.perf_counter()
        model = transformers.FlaxElectraForMaskedLM.from_pretrained(src, from_pt=True)
        model.save_pretrained(dst)
    elif kind == "transformers-tf":
        import transformers
        transformers.logging.set_verbosity_error()
        rss = status("VmRSS"); t0 = time.perf_counter()
        model = transformers.TFElectraForMaskedLM.from_pretrained(src, from_pt=True)
        model.save_pretrained(dst)
    else:
        raise SystemExit(kind)
    seconds = time.perf_counter() - t0
    print(json.dumps({"rss_after_imports": rss, "peak_rss": status("VmHWM"), "seconds": seconds}))
    """
)


def _available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def generate(directory: str, sizes: dict[str, int], max_shard_size: str) -> dict[str, Any]:
    """Write a random Electra checkpoint (canonical safetensors) a shard at a time."""
    from nezha_zoo import ElectraConfig
    from nezha_zoo.pretrained import save_weights
    from nezha_zoo.spec import get_family

    family = get_family("electra")
    config = ElectraConfig(**sizes)
    spec = family.model_spec(config, HEAD)
    rng = np.random.default_rng(0)

    def arrays():
        for p in spec:
            yield p.name, (rng.standard_normal(p.shape, dtype=np.float32) * 0.02)

    files = save_weights(directory, config, spec, family, arrays(), max_shard_size=max_shard_size)
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in files if f.endswith(".safetensors"))
    largest = max(p.size * 4 for p in spec)
    return {"parameters": spec.num_parameters(), "bytes": total, "largest_tensor_bytes": largest, "files": len(files)}


def _measure(kind: str, src: str, dst: str, fmt: str, *extra: str) -> dict[str, Any]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    if kind == "transformers-tf":
        env["TF_USE_LEGACY_KERAS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, src, dst, fmt, *extra], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} -> {fmt} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = wall
    out["output_bytes"] = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
    return out


def run(smoke: bool, out_dir: str, workdir: str | None = None) -> dict[str, Any]:
    """Generate, convert four ways, delete; returns the results (also written to ``out_dir``)."""
    sizes, shard = (SMOKE, "50KB") if smoke else (FULL, "500MB")
    if not smoke and _available_bytes() < MIN_AVAILABLE_GB * 10**9:
        raise SystemExit(
            f"only {_available_bytes() / 1e9:.1f} GB of memory available; the full benchmark needs "
            f"{MIN_AVAILABLE_GB} GB (transformers holds the model twice). Try later or use --smoke."
        )
    root = tempfile.mkdtemp(prefix="nezha-zoo-convert-bench-", dir=workdir)
    try:
        src = os.path.join(root, "src")
        checkpoint = generate(src, sizes, shard)
        # transformers' Flax from_pt refuses sharded safetensors ("Support for sharded checkpoints
        # using safetensors is coming soon!"), so it gets the same weights as one model.safetensors.
        single = os.path.join(root, "single")
        _measure("nezha_zoo", src, single, "safetensors", "--max-shard-size", "100GB")
        rows = []
        for fmt, theirs, their_src in (("hf-flax", "transformers-flax", single), ("hf-tf", "transformers-tf", src)):
            for kind, source in (("nezha_zoo", src), (theirs, their_src)):
                dst = os.path.join(root, f"{kind}-{fmt}")
                res = _measure(kind, source, dst, fmt)
                label = "sharded" if source == src else "single file"
                rows.append({"target": fmt, "converter": kind, "source": label, **res})
                shutil.rmtree(dst)  # one output on disk at a time
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "mode": "smoke" if smoke else "full",
        "config": {"family": "electra", "head": HEAD, **sizes, "max_shard_size": shard},
        "checkpoint": checkpoint,
        "rows": rows,
        "cpu_count": os.cpu_count(),
    }
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "convert_memory" + ("_smoke" if smoke else ""))
    with open(stem + ".json", "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    with open(stem + ".md", "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table."""
    gb = 1e9
    ck = result["checkpoint"]
    lines = [
        f"# Checkpoint conversion: peak memory and time ({result['mode']})",
        "",
        f"Electra {HEAD}, {ck['parameters']:,} parameters, {ck['bytes'] / gb:.2f} GB of float32 safetensors in "
        f"{ck['files'] - 2} shards of at most {result['config']['max_shard_size']} (largest tensor "
        f"{ck['largest_tensor_bytes'] / gb:.2f} GB). Each conversion ran in a fresh process; peak = VmHWM.",
        "",
        "| target | converter | source | peak RSS (GB) | after imports (GB) | peak - imports (GB) | time (s) "
        "| output (GB) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['target']} | {r['converter']} | {r['source']} | {r['peak_rss'] / gb:.2f} | "
            f"{r['rss_after_imports'] / gb:.2f} | "
            f"{(r['peak_rss'] - r['rss_after_imports']) / gb:.2f} | {r['seconds']:.1f} | {r['output_bytes'] / gb:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convert_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoint (seconds, not minutes)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results directory")
    parser.add_argument("--workdir", help="where to generate the checkpoint (default: the system temp dir)")
    args = parser.parse_args(argv)
    result = run(args.smoke, args.out, args.workdir)
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
