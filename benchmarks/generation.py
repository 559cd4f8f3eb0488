"""Decoding speed of every causal-LM family in every backend, and their greedy tokens side by side.

``python -m benchmarks.generation`` builds one seeded checkpoint per causal-LM family at a small but
real size (:data:`BENCH_CONFIGS`) and, for each backend, times ``generate`` (greedy, prompt of 16
tokens, 64 new tokens, no eos so every run decodes all of them) at batch 1 and 8:

* ``pt``: PyTorch eager loop over the growing cache;
* ``tf`` / ``tf-xla``: the whole loop in one ``tf.function`` over the fixed-size KVCache, without
  and with XLA (``jit_compile``);
* ``flax``: the whole loop under one ``jax.jit`` over the fixed-size cache.

The first call (tracing and compilation included) is timed separately as ``warmup_s``; the figure
is the median of ``--repeats`` timed calls after it, as tokens/s = batch x new tokens / median.  The
same run checks that the greedy continuations of all backends are identical and says so per row.

Output under ``--out`` (default ``benchmarks/results``): ``generation.json`` (machine, versions,
every measurement, the tokens' agreement) and ``generation.md``.  ``--smoke`` runs tiny configs in
seconds of decoding (plus compilation); ``tests/equivalence/test_bench_generation_smoke.py`` runs that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nezha_zoo.hardware import machine_info
from nezha_zoo.pretrained import random_weights, save_weights
from nezha_zoo.spec.registry import get_family, model_class

BACKENDS = ("pt", "tf", "tf-xla", "flax")

#: family key -> (config fields, what the size stands for).  No eos: every run decodes all tokens.
BENCH_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "electra": (
        dict(vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
             intermediate_size=1024, max_position_embeddings=512, is_decoder=True, eos_token_id=None),
        "electra-small generator shape (decoder)",
    ),
    "xlm_roberta_xl": (
        dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
             max_position_embeddings=514, is_decoder=True, eos_token_id=None),
        "XLM-R-XL layers at width 512, 4 layers",
    ),
    "mpt": (
        dict(vocab_size=32000, d_model=512, n_heads=8, n_layers=4, max_seq_len=512, eos_token_id=None),
        "MPT d_model 512, 4 layers",
    ),
}  # fmt: skip

SMOKE_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "electra": (
        dict(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64, is_decoder=True),
        "tiny",
    ),
    "xlm_roberta_xl": (
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64, is_decoder=True),
        "tiny",
    ),
    "mpt": (dict(vocab_size=99, d_model=32, n_heads=4, n_layers=2, max_seq_len=64), "tiny"),
}  # fmt: skip


def build_checkpoint(family_key: str, fields: dict[str, Any], directory: str, seed: int = 0) -> str:
    """Write a seeded random ``ForCausalLM`` checkpoint of ``family_key`` with config ``fields``."""
    family = get_family(family_key)
    config = family.config_class(**fields)
    spec = family.model_spec(config, "ForCausalLM")
    save_weights(directory, config, spec, family, random_weights(spec, config, seed))
    return directory


def _generator(backend: str, family_key: str, path: str) -> Callable[[np.ndarray, int], np.ndarray]:
    """``(input_ids, max_new_tokens) -> tokens`` for one backend, model loaded from ``path``."""
    if backend == "pt":
        import torch

        model = model_class(family_key, "ForCausalLM", "pt").from_pretrained(path).eval()

        def run_pt(ids, new):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=new, eos_token_id=None).numpy()

        return run_pt
    if backend in ("tf", "tf-xla"):
        model = model_class(family_key, "ForCausalLM", "tf").from_pretrained(path)
        xla = backend == "tf-xla"
        return lambda ids, new: model.generate(ids, max_new_tokens=new, eos_token_id=None, jit_compile=xla).numpy()
    if backend == "flax":
        model = model_class(family_key, "ForCausalLM", "flax").from_pretrained(path)
        return lambda ids, new: np.asarray(model.generate(ids, max_new_tokens=new, eos_token_id=None))
    raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")


def measure(
    run: Callable[[np.ndarray, int], np.ndarray], ids: np.ndarray, new: int, repeats: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Warm-up call (timed apart), then the median of ``repeats`` calls; returns (figures, tokens)."""
    start = time.perf_counter()
    tokens = run(ids, new)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run(ids, new)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    generated = tokens.shape[1] - ids.shape[1]
    return {
        "warmup_s": warmup,
        "median_s": median,
        "repeats": repeats,
        "new_tokens": int(generated),
        "tokens_per_s": ids.shape[0] * generated / median,
    }, tokens


def _set_threads(threads: int) -> dict[str, Any]:
    """Pin each framework's intra-op thread count (before their runtimes start); report what holds."""
    if threads <= 0:
        return {"requested": "framework defaults"}
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}")
    import tensorflow as tf
    import torch

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"requested": threads, "torch": torch.get_num_threads()}
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        out["tf"] = threads
    except RuntimeError:  # TF already initialised in this process (e.g. under pytest)
        out["tf"] = "already initialised: default"
    out["jax"] = os.environ["XLA_FLAGS"]
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "tensorflow-cpu", "tensorflow", "keras", "jax", "flax", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Generation speed (greedy, compiled decoding)",
        "",
        f"Prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens; warm-up (tracing and "
        f"compilation) excluded and listed apart; median of {report['repeats']} runs.  "
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, shared with other jobs "
        f"while measured; threads: {report['threads']}; "
        f"CPU flags: {', '.join(report['machine'].get('cpu_flags', [])) or 'none'}.",
        "",
        "| family | backend | batch | tokens/s | median s | warm-up s |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['backend']} | {r['batch']} | error: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['family']} | {r['backend']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                f"{r['median_s']:.3f} | {r['warmup_s']:.2f} |"
            )
    lines += ["", "## Greedy continuations", ""]
    for a in report["agreement"]:
        verdict = "identical in " + ", ".join(a["backends"]) if a["identical"] else "DIFFER: " + a["detail"]
        lines.append(f"- {a['family']} batch {a['batch']}: {verdict}; row 0 continues with {a['row0']}")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(BENCH_CONFIGS), help="comma-separated family keys")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per framework (default 1: small decode ops on a shared host lose more to "
        "thread synchronisation than they gain; 0 leaves the frameworks' defaults)",
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny configs, 4 + 4 tokens, batch 2")
    args = parser.parse_args(argv)
    configs = SMOKE_CONFIGS if args.smoke else BENCH_CONFIGS
    if args.smoke:
        args.prompt_len, args.new_tokens, args.repeats, args.batches = 4, 4, 1, "2"
    families = [f for f in args.families.split(",") if f]
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(families) - set(configs)) + sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown families/backends {unknown}")
    batches = [int(b) for b in args.batches.split(",")]
    threads = _set_threads(args.threads)

    from nezha_zoo.testing import pin_precision

    for framework in ("pt", "tf", "flax"):
        pin_precision(framework)
    rows, agreement = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for family_key in families:
            fields, _ = configs[family_key]
            path = build_checkpoint(family_key, fields, os.path.join(tmp, family_key))
            prompts = {b: rng.integers(3, fields["vocab_size"], (b, args.prompt_len)) for b in batches}
            outputs: dict[tuple[str, int], np.ndarray] = {}
            for backend in backends:
                try:
                    run = _generator(backend, family_key, path)
                except Exception as err:  # noqa: BLE001  (a backend that cannot load is reported, not fatal)
                    rows += [
                        {"family": family_key, "backend": backend, "batch": b, "error": repr(err)} for b in batches
                    ]
                    continue
                for b in batches:
                    figures, tokens = measure(run, prompts[b], args.new_tokens, args.repeats)
                    outputs[(backend, b)] = tokens
                    rows.append({"family": family_key, "backend": backend, "batch": b, **figures})
                    sys.stdout.write(
                        f"{family_key:15s} {backend:7s} batch {b}: {figures['tokens_per_s']:9.1f} tokens/s "
                        f"(warm-up {figures['warmup_s']:.1f} s)\n"
                    )
                    sys.stdout.flush()
            for b in batches:
                got = {be: outputs[(be, b)] for be in backends if (be, b) in outputs}
                if not got:
                    continue
                first = next(iter(got.values()))
                differ = [be for be, t in got.items() if t.shape != first.shape or not np.array_equal(t, first)]
                agreement.append(
                    {
                        "family": family_key,
                        "batch": b,
                        "backends": list(got),
                        "identical": not differ,
                        "detail": "" if not differ else f"{differ} differ from {next(iter(got))}",
                        "row0": first[0, args.prompt_len :].tolist(),
                    }
                )
            _write(args, configs, families, rows, agreement, threads)
    return 0 if all("error" not in r for r in rows) and all(a["identical"] for a in agreement) else 1


def _write(args: argparse.Namespace, configs, families, rows, agreement, threads) -> None:
    """Write the report so far (after each family, so a long run leaves its finished part behind)."""
    report = {
        "machine": machine_info(threads),
        "versions": _versions(),
        "threads": threads,
        "smoke": args.smoke,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "configs": {f: configs[f][0] for f in families},
        "rows": rows,
        "agreement": agreement,
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generation.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "generation.md"), "w") as f:
        f.write(_markdown(report))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
